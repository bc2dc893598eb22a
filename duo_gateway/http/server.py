"""The HTTP application: middleware, operational endpoints, and the front doors mounted by modules.

Front doors (the XCA responding SOAP endpoints, the TLB timeline API) live in their own modules and
plug in through :class:`FrontDoor`, so adding one is a new module, not an edit of this file.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Protocol

from aiohttp import web

from duo_gateway.access import ClientDirectory
from duo_gateway.health import Probe, run_probes
from duo_gateway.http.access import OPS, access_middleware, route_name
from duo_gateway.http.middleware import make_middlewares
from duo_gateway.observability.metrics import Metrics

METRICS_CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class FrontDoor(Protocol):
    """Something that serves requests on DUO's HTTP listener."""

    name: str

    def mount(self, app: web.Application) -> None: ...


ProbeSource = Callable[[], list[Probe]]
ReadyHook = Callable[[], Awaitable[dict[str, Any]]]


def build_app(
    metrics: Metrics,
    probes: ProbeSource,
    readiness_timeout_s: float,
    front_doors: Sequence[FrontDoor] = (),
    *,
    clients: ClientDirectory,
    max_request_bytes: int = 16 * 1024 * 1024,
    local_checks: Callable[[], list[dict[str, Any]]] | None = None,
    ops_routes: bool = True,
) -> web.Application:
    """The main listener's application. Every route a front door mounts must be named
    ``<owner>:<route>`` (:mod:`duo_gateway.http.access`); ``ops_routes`` is off when a separate ops
    listener serves health and metrics, so they stay there."""
    app = web.Application(middlewares=[*make_middlewares(metrics), access_middleware(clients)],
                          client_max_size=max_request_bytes)
    if ops_routes:
        add_ops_routes(app, metrics, probes, readiness_timeout_s, local_checks)
    for door in front_doors:
        door.mount(app)
    return app


def build_ops_app(metrics: Metrics, probes: ProbeSource, readiness_timeout_s: float,
                  local_checks: Callable[[], list[dict[str, Any]]] | None = None) -> web.Application:
    """The separate operations listener: health and metrics only, never patient data."""
    app = web.Application(middlewares=make_middlewares(metrics), client_max_size=1024)
    add_ops_routes(app, metrics, probes, readiness_timeout_s, local_checks)
    return app


def add_ops_routes(app: web.Application, metrics: Metrics, probes: ProbeSource, readiness_timeout_s: float,
                   local_checks: Callable[[], list[dict[str, Any]]] | None) -> None:
    async def healthz(_request: web.Request) -> web.Response:
        # Liveness only: the event loop answers. Dependencies are /readyz's business.
        return web.json_response({"status": "alive"})

    async def readyz(_request: web.Request) -> web.Response:
        results = await run_probes(probes(), readiness_timeout_s)
        checks = [r.as_json() for r in results]
        for r in results:
            metrics.peer_up.labels(r.peer, r.kind).set(1 if r.ok else 0)
            metrics.observe_peer(r.peer, "probe", "ok" if r.ok else "failed", r.elapsed_ms / 1000)
        local = local_checks() if local_checks else []
        checks.extend(local)
        ready = all(c["ok"] for c in checks if c.get("essential"))
        degraded = not all(c["ok"] for c in checks)
        status = "ready" if ready and not degraded else ("degraded" if ready else "not-ready")
        return web.json_response({"status": status, "checks": checks}, status=200 if ready else 503)

    async def metrics_endpoint(_request: web.Request) -> web.Response:
        return web.Response(body=metrics.render(), headers={"Content-Type": METRICS_CONTENT_TYPE})

    app.router.add_get("/healthz", healthz, name=route_name(OPS, "healthz"))
    app.router.add_get("/readyz", readyz, name=route_name(OPS, "readyz"))
    app.router.add_get("/metrics", metrics_endpoint, name=route_name(OPS, "metrics"))
