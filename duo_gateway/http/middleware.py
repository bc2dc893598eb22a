"""Request correlation, metrics and last-resort error handling for every HTTP front door."""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from duo_gateway.http.problem import problem_response
from duo_gateway.observability.metrics import Metrics

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
REQUEST_ID_HEADER = "X-Request-ID"
_SAFE_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{8,128}$")
log = structlog.get_logger(__name__)
access_log = structlog.get_logger("duo_gateway.access_log")


def _route_label(request: web.Request) -> str:
    """The route template, never the raw path: raw paths would explode metric cardinality."""
    info = request.match_info.route.resource
    if info is None:
        return "unmatched"
    canonical: str = info.canonical
    return canonical


def make_middlewares(metrics: Metrics) -> list[Middleware]:
    @web.middleware
    async def correlate(request: web.Request, handler: Handler) -> web.StreamResponse:
        incoming = request.headers.get(REQUEST_ID_HEADER, "")
        request_id = incoming if _SAFE_REQUEST_ID.match(incoming) else str(uuid.uuid4())
        peer = request.remote or "unknown"
        structlog.contextvars.clear_contextvars()
        structlog.contextvars.bind_contextvars(request_id=request_id, peer=peer)
        route = _route_label(request)
        started = time.perf_counter()
        status = 500
        metrics.http_in_flight.inc()
        try:
            response = await handler(request)
            status = response.status
        except web.HTTPException as exc:
            status = exc.status
            exc.headers[REQUEST_ID_HEADER] = request_id
            raise
        except Exception:
            # Nothing reaches the client as a stack trace; the log has it, under the request id.
            log.exception("unhandled error", route=route)
            response = problem_response(500, "Internal error",
                                        f"unexpected failure; quote request id {request_id}")
        finally:
            elapsed = time.perf_counter() - started
            metrics.http_in_flight.dec()
            metrics.http_requests.labels(route, request.method, str(status)).inc()
            metrics.http_latency.labels(route, request.method).observe(elapsed)
            # The access log line: request id, peer and (bound by the access middleware) the caller.
            access_log.info("http_request", method=request.method, route=route, status=status,
                            elapsed_ms=round(elapsed * 1000, 1))
            structlog.contextvars.unbind_contextvars("request_id", "peer", "caller")
        response.headers[REQUEST_ID_HEADER] = request_id
        return response

    return [correlate]
