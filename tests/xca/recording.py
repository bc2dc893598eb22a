"""A recording XCA community for the Initiating Gateway tests: the real simulator behind a middleware.

The middleware keeps every request DUO sends (so tests can check it against the official XSD and for
a valid XUA assertion, which the sim itself ignores), counts requests in flight, and can drop the
connection or answer an error for the first N requests. Shared by ``test_initiating`` (ITI-38) and
``test_initiating_retrieve`` (ITI-39, RAD-75); the fixtures are in this package's ``conftest``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web
from aiohttp.test_utils import TestServer
from lxml import etree

from duo_gateway.audit.messages import Peer
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.http import BEHAVIOUR_KEY
from duo_gateway.soap.envelope import Envelope, parse_envelope
from duo_gateway.soap.mtom import multipart_related, parse_mtom
from duo_gateway.xua import Claims

BSN = "999911120"
DUO_HOME = "urn:oid:2.16.528.1.1007.99.1"
CLAIMS = Claims(uzi="000095254", role="01.039", ura="00000666", organisation_type="V6")
IDENTITY = Peer(user_id="DUO_GATEWAY", host="127.0.0.1")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@dataclass
class Recorder:
    """What reached the community: bodies and headers, concurrency, and scripted first failures."""

    #: The SOAP envelope of each request (an MTOM request's root part).
    bodies: list[bytes] = field(default_factory=list)
    content_types: list[str] = field(default_factory=list)
    in_flight: int = 0
    max_in_flight: int = 0
    drop_first: int = 0
    #: Called after each request has been handled (or dropped).
    after: Callable[[], None] | None = None
    status_first: int = 0
    status: int = 503

    @web.middleware
    async def middleware(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            return await handler(request)
        raw = await request.read()
        content_type = request.headers.get("Content-Type", "")
        if multipart_related(content_type) is not None:  # an MTOM request: keep its envelope
            root, _ = parse_mtom(content_type, raw)
            raw = etree.tostring(root)
        self.bodies.append(raw)
        self.content_types.append(content_type)
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.drop_first > 0:
                self.drop_first -= 1
                assert request.transport is not None
                request.transport.close()  # a reset connection, the way the sim's "down" looks
                raise web.HTTPServiceUnavailable()
            if self.status_first > 0:
                self.status_first -= 1
                return web.Response(status=self.status, text="busy")
            return await handler(request)
        finally:
            self.in_flight -= 1
            if self.after is not None:
                self.after()

    def envelopes(self) -> list[Envelope]:
        return [parse_envelope(b) for b in self.bodies]


@dataclass
class Community:
    url: str
    app: web.Application
    recorder: Recorder
    home: str

    def config(self, **kw: Any) -> XcaCommunity:
        base: dict[str, Any] = {
            "home_community_id": self.home, "name": "XDS Noord", "iti38": f"{self.url}/iti38",
            "iti39": f"{self.url}/iti39", "timeout_s": 5.0, "retries": 2, "retry_backoff_s": 0.01,
        }
        return XcaCommunity.model_validate({**base, **kw})

    def behave(self, **kw: Any) -> None:
        self.app[BEHAVIOUR_KEY].value = Misbehaviour(**kw)


async def serve(app: web.Application) -> TestServer:
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    return server
