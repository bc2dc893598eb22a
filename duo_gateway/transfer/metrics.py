"""Transfer metrics, on the gateway's one registry: what ops graph to see relays move and fail."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

#: Bytes per second of one job, from 1 MB/s (a slow WAN link) to 1 GB/s (loopback).
_THROUGHPUT_BUCKETS = (1e6, 5e6, 10e6, 25e6, 50e6, 100e6, 250e6, 500e6, 1e9)


class TransferMetrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.bytes = Counter("duo_transfer_bytes_total",
                             "Bytes of instances stored at destinations (counted once per instance).",
                             registry=registry)
        self.instances = Counter("duo_transfer_instances_total",
                                 "Instances relayed, by outcome (stored, or failed per attempt).",
                                 ["outcome"], registry=registry)
        self.jobs = Counter("duo_transfer_jobs_total", "Transfer jobs by the state they ended in.", ["state"],
                            registry=registry)
        self.submitted = Counter("duo_transfer_jobs_submitted_total", "Transfer jobs accepted.",
                                 registry=registry)
        self.running = Gauge("duo_transfer_jobs_running", "Jobs this process is working on now.",
                             registry=registry)
        self.throughput = Histogram("duo_transfer_job_throughput_bytes_per_second",
                                    "Bytes stored per second over a whole job.", buckets=_THROUGHPUT_BUCKETS,
                                    registry=registry)
