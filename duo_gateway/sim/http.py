"""Shared plumbing of the HTTP simulators: the misbehaviour switch and its admin endpoint.

Every HTTP simulator mounts :func:`behaviour_middleware` and :func:`admin_routes` so tests can make
any peer slow or down with the same call: ``PUT /admin/behaviour`` with a JSON Misbehaviour body.
Format-specific misbehaviour (malformed answers, SOAP Faults, forced decisions) is up to each
simulator, which reads :func:`current_behaviour`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager

from aiohttp import web
from pydantic import ValidationError

from duo_gateway.sim.behaviour import Misbehaviour


class BehaviourSwitch:
    """Mutable holder: a running aiohttp app's state must not be reassigned, only what it holds."""

    def __init__(self, behaviour: Misbehaviour) -> None:
        self.value = behaviour


BEHAVIOUR_KEY: web.AppKey[BehaviourSwitch] = web.AppKey("sim_behaviour", BehaviourSwitch)
ADMIN_PREFIX = "/admin/"

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def current_behaviour(app: web.Application) -> Misbehaviour:
    return app[BEHAVIOUR_KEY].value


@contextmanager
def misbehaving(app: web.Application, behaviour: Misbehaviour) -> Iterator[None]:
    """A running simulator behaves as ``behaviour`` for the block and is switched back after it, also
    when the block fails: the in-process form of ``PUT /admin/behaviour`` for tests and benches."""
    switch = app[BEHAVIOUR_KEY]
    before = switch.value
    switch.value = behaviour
    try:
        yield
    finally:
        switch.value = before


def install_behaviour(app: web.Application, behaviour: Misbehaviour) -> None:
    """Mount the switch; the concrete class (e.g. MitzMisbehaviour) decides what admin PUTs accept."""
    app[BEHAVIOUR_KEY] = BehaviourSwitch(behaviour)
    app.middlewares.append(behaviour_middleware)
    app.router.add_get("/admin/behaviour", _get_behaviour)
    app.router.add_put("/admin/behaviour", _put_behaviour)


@web.middleware
async def behaviour_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    if request.path.startswith(ADMIN_PREFIX):
        return await handler(request)
    behaviour = current_behaviour(request.app)
    if behaviour.down:
        # A peer that is down accepts nothing: close the connection without an HTTP answer, the
        # way a crashed or firewalled service looks to the client.
        if request.transport is not None:
            request.transport.close()
        raise web.HTTPServiceUnavailable(text="simulated outage")
    await behaviour.delay()
    return await handler(request)


async def _get_behaviour(request: web.Request) -> web.Response:
    return web.json_response(current_behaviour(request.app).model_dump())


async def _put_behaviour(request: web.Request) -> web.Response:
    cls = type(current_behaviour(request.app))
    try:
        behaviour = cls.model_validate(await request.json())
    except (ValidationError, ValueError) as exc:
        return web.json_response({"title": "invalid behaviour", "detail": str(exc)}, status=400,
                                 content_type="application/problem+json")
    request.app[BEHAVIOUR_KEY].value = behaviour
    return web.json_response(behaviour.model_dump())
