"""Every HTTP route has an owner: the kind of system that may call it, checked before any handler runs.

Front doors name their routes ``<owner>:<route>`` (``tlb:timeline``, ``tlb:transfers.status``,
``xca:iti38``, ``mitz:notify``, ``ops:healthz``). :func:`access_middleware` identifies the caller from
its TLS client certificate (:mod:`duo_gateway.access`), refuses a caller that is not of the route's
owner kind (or, for the TLB API, a client without that capability) with 403, and bounds the requests
each caller has in progress (429 with ``Retry-After``). A route without an owner is served to nobody.

The refusal is spoken in the route's own language: each door registers a :data:`Denial` renderer for
its owner kind (problem+json for the TLB API, a SOAP Fault for XCA, an OperationOutcome for Mitz).
"""

from __future__ import annotations

import functools
import ssl
from collections.abc import Awaitable, Callable
from typing import Final

import structlog
from aiohttp import web
from aiohttp.typedefs import Middleware

from duo_gateway.access import Caller, ClientDirectory, PeerCertificate
from duo_gateway.config.access import TLB_CAPABILITIES
from duo_gateway.http.problem import problem_response

log = structlog.get_logger(__name__)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
#: (status, detail, caller) -> the response in the owner's language.
Denial = Callable[[int, str, Caller], web.Response]

CALLER_KEY: Final = web.RequestKey("duo.caller", Caller)
DENIALS: Final = web.AppKey("duo.denials", dict[str, Denial])
#: Owner of the operational routes: anyone who can reach the listener (they serve no patient data).
OPS: Final = "ops"
#: Seconds a refused-for-load caller is told to wait.
RETRY_AFTER_S: Final = 1


def route_name(owner: str, route: str) -> str:
    return f"{owner}:{route}"


def route_owner(request: web.Request) -> tuple[str | None, str]:
    """(owner, route) from the matched route's name; (None, "") for an unnamed route."""
    name = request.match_info.route.name or ""
    owner, sep, route = name.partition(":")
    return (owner, route) if sep else (None, "")


def caller_of(request: web.Request) -> Caller:
    """The caller :func:`access_middleware` identified; a request that bypassed it is nobody."""
    return request.get(CALLER_KEY) or Caller(None)


def peer_certificate(request: web.Request) -> PeerCertificate | None:
    transport = request.transport
    if transport is None:
        return None
    ssl_object = transport.get_extra_info("ssl_object")
    if not isinstance(ssl_object, ssl.SSLObject | ssl.SSLSocket):
        return None
    der = ssl_object.getpeercert(binary_form=True)
    return _identified(der) if der else None


@functools.lru_cache(maxsize=1024)
def _identified(der: bytes) -> PeerCertificate:
    """Parsed and hashed once per certificate, not once per request: a handful of peers call all day."""
    return PeerCertificate.from_der(der)


def register_denial(app: web.Application, owner: str, denial: Denial) -> None:
    if DENIALS not in app:
        app[DENIALS] = {}
    app[DENIALS][owner] = denial


def _default_denial(status: int, detail: str, _caller: Caller) -> web.Response:
    title = {403: "Forbidden", 429: "Too many requests"}.get(status, "Refused")
    return problem_response(status, title, detail)


def _capability(route: str) -> str:
    """``transfers.status`` -> ``transfers``: a TLB route belongs to the capability it starts with."""
    return route.partition(".")[0]


def allowed(caller: Caller, owner: str, route: str) -> str | None:
    """None when ``caller`` may use the route, else why not (for the log and the 403 detail)."""
    if owner == OPS:
        return None
    if caller.client is None:
        who = "no client certificate" if caller.certificate is None else "this certificate"
        return f"{who} is not a configured client of this gateway"
    if caller.kind != owner:
        return f"client {caller.client.name} ({caller.kind}) may not use {owner} routes"
    tlb = caller.tlb
    if tlb is not None:
        capability = _capability(route)
        if capability in TLB_CAPABILITIES and capability not in tlb.routes:
            return f"client {tlb.name} may not use {capability}"
    return None


def access_middleware(directory: ClientDirectory) -> Middleware:
    in_progress: dict[str, int] = {}

    @web.middleware
    async def access(request: web.Request, handler: Handler) -> web.StreamResponse:
        certificate = peer_certificate(request)
        owner, route = route_owner(request)
        caller = directory.identify(certificate, owner if owner != OPS else None)
        request[CALLER_KEY] = caller
        structlog.contextvars.bind_contextvars(caller=caller.name)
        if request.match_info.http_exception is not None:
            return await handler(request)  # 404/405: nothing is served, nothing to own
        denials = request.app.get(DENIALS, {})
        render = denials.get(owner or "", _default_denial)
        reason = "this route has no owner" if owner is None else allowed(caller, owner, route)
        if reason is not None:
            log.warning("access_denied", route=f"{owner}:{route}" if owner else request.path,
                        certificate=certificate.label if certificate else None, reason=reason)
            return render(403, reason, caller)
        if caller.client is None:
            return await handler(request)
        key = caller.name
        limit = caller.client.max_concurrent
        if in_progress.get(key, 0) >= limit:
            log.warning("client_over_limit", limit=limit)
            response = render(429, f"client {caller.client.name} has {limit} requests in progress already; "
                                   f"retry later", caller)
            response.headers["Retry-After"] = str(RETRY_AFTER_S)
            return response
        in_progress[key] = in_progress.get(key, 0) + 1
        try:
            return await handler(request)
        finally:
            left = in_progress[key] - 1
            if left:
                in_progress[key] = left
            else:
                del in_progress[key]

    return access
