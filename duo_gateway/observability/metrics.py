"""Prometheus metrics. One registry per gateway instance, so tests and the demo can run several."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_MIB = 1024 * 1024
#: Spool high-water marks, in bytes: around the default 64 MiB window and an instance or two.
_SPOOL_BUCKETS = tuple(float(m * _MIB) for m in (1, 4, 16, 32, 64, 96, 128, 256, 512, 1024))


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.http_requests = Counter(
            "duo_http_requests_total", "HTTP requests handled, by route template and status.",
            ["route", "method", "status"], registry=self.registry)
        self.http_latency = Histogram(
            "duo_http_request_duration_seconds", "HTTP request handling time by route template.",
            ["route", "method"], buckets=_BUCKETS, registry=self.registry)
        self.http_in_flight = Gauge(
            "duo_http_requests_in_flight", "HTTP requests being handled now.", registry=self.registry)
        self.peer_requests = Counter(
            "duo_peer_requests_total", "Outbound calls to peers, by peer, operation and outcome.",
            ["peer", "operation", "outcome"], registry=self.registry)
        self.peer_latency = Histogram(
            "duo_peer_request_duration_seconds", "Outbound call time by peer and operation.",
            ["peer", "operation"], buckets=_BUCKETS, registry=self.registry)
        self.peer_up = Gauge(
            "duo_peer_up", "1 when the last readiness probe of the peer succeeded.", ["peer", "kind"],
            registry=self.registry)

        #: What a retrieve from a PACS held spooled at most, against its window: the proof that the
        #: window (xca_responding.retrieve_window) bounds the disk, and how close it gets.
        self.spool_high_water = Histogram(
            "duo_retrieve_spool_high_water_bytes", "Most bytes one PACS retrieve held spooled at once.",
            ["peer"], buckets=_SPOOL_BUCKETS, registry=self.registry)
        self.spool_last_high_water = Gauge(
            "duo_retrieve_spool_last_high_water_bytes",
            "Most bytes the last finished PACS retrieve held spooled at once.", ["peer"],
            registry=self.registry)
        self.spool_window = Gauge(
            "duo_retrieve_spool_window_bytes", "The byte window of the last PACS retrieve (0: none).",
            ["peer"], registry=self.registry)

        self.mitz_decisions = Counter(
            "duo_mitz_decisions_total", "Closed-question outcomes: the decision, or why there is none.",
            ["result", "source"], registry=self.registry)
        self.mitz_localizations = Counter(
            "duo_mitz_localizations_total", "Open-question outcomes.", ["result"], registry=self.registry)

    def observe_peer(self, peer: str, operation: str, outcome: str, seconds: float) -> None:
        self.peer_requests.labels(peer, operation, outcome).inc()
        self.peer_latency.labels(peer, operation).observe(seconds)

    def observe_spool(self, peer: str, high_water_bytes: int, window_bytes: int | None) -> None:
        self.spool_high_water.labels(peer).observe(high_water_bytes)
        self.spool_last_high_water.labels(peer).set(high_water_bytes)
        self.spool_window.labels(peer).set(window_bytes or 0)

    def render(self) -> bytes:
        return generate_latest(self.registry)
