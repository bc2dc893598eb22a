"""Closing HTTP connections that do not send their request headers in time (slowloris).

aiohttp has no header-read timeout: a client that opens a connection and sends half a request line,
or one header byte every few seconds, holds a socket, a protocol object and a file descriptor for
as long as it likes (its keep-alive timeout only runs between requests, and is long). Enough of them
exhaust the listener before any authentication happens. So the listener's sites wrap each
connection's protocol in :class:`HeaderDeadline`:

- a connection is *waiting* while aiohttp waits for a request's headers: no parsed request queued,
  none being handled, nothing of a response still to be written; partial header bytes do not count;
- a new connection must complete its first request's headers within
  ``listeners.http.header_timeout_s`` of connecting; on a kept-alive connection the clock starts with
  the first byte of the next request. A kept-alive connection that sends nothing is aiohttp's
  keep-alive timeout's business: closing it here, a few seconds after each answer, would race every
  client that reuses its connection (it sends just as the server closes, and sees a reset);
- a TLS handshake that does not finish within the same time is abandoned (asyncio's
  ``ssl_handshake_timeout``, 60 s by default); the header clock starts after the handshake, on the
  decrypted stream.

Whether aiohttp is busy is read from its request handler's state (``_messages``,
``_request_in_progress``): there is no public hook for "waiting for the next request". Both are read
with a default, so an aiohttp that renamed them degrades to "idle unless the peer is being written
to", and ``tests/http/test_slow.py`` fails loudly rather than the gateway closing live requests.
"""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import structlog
from aiohttp import web

log = structlog.get_logger(__name__)

#: How often a busy connection is looked at again, at most; an idle one is checked when due.
_POLL_S = 1.0


class HeaderDeadline(asyncio.Protocol):
    """A protocol in front of aiohttp's RequestHandler that closes connections idle too long."""

    def __init__(self, inner: asyncio.Protocol, timeout_s: float) -> None:
        self._inner = inner
        self._timeout = timeout_s
        self._poll = min(_POLL_S, timeout_s / 4)
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        #: When the headers now awaited started to be owed: at connect, or at the first byte of the
        #: next request on a kept-alive connection; None while a request is being handled or none owed.
        self._idle_since: float | None = None
        self._timer: asyncio.TimerHandle | None = None

    # -- asyncio.Protocol, forwarded -----------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self._transport = transport
        self._idle_since = self._loop.time()
        self._inner.connection_made(transport)
        self._arm(self._timeout)

    def data_received(self, data: bytes) -> None:
        self._inner.data_received(data)
        if self._busy():
            # A request's headers are complete (aiohttp parsed them synchronously just now).
            self._idle_since = None
        elif self._idle_since is None:
            # The first bytes of the next request on a kept-alive connection: its headers are now owed.
            self._idle_since = self._loop.time()

    def eof_received(self) -> bool | None:
        return self._inner.eof_received()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._transport = None
        self._inner.connection_lost(exc)

    def pause_writing(self) -> None:
        self._inner.pause_writing()

    def resume_writing(self) -> None:
        self._inner.resume_writing()

    # -- the deadline --------------------------------------------------------------------------
    def _busy(self) -> bool:
        inner: Any = self._inner
        if getattr(inner, "_messages", None) or getattr(inner, "_request_in_progress", False):
            return True
        # A response still being written to a slow reader is not the client's delay in sending.
        return self._transport is not None and self._transport.get_write_buffer_size() > 0

    def _arm(self, delay: float) -> None:
        self._timer = self._loop.call_later(max(delay, 0.0), self._check)

    def _check(self) -> None:
        self._timer = None
        transport = self._transport
        if transport is None or transport.is_closing():
            return
        now = self._loop.time()
        if self._busy():
            self._idle_since = None
            self._arm(self._poll)
            return
        if self._idle_since is None:
            # Kept alive with nothing sent: aiohttp's keep-alive timeout closes it in time.
            self._arm(self._poll)
            return
        waited = now - self._idle_since
        if waited < self._timeout:
            self._arm(min(self._poll, self._timeout - waited))
            return
        peer = transport.get_extra_info("peername")
        log.info("closing connection without complete request headers", peer=str(peer),
                 timeout_s=self._timeout)
        transport.close()


class HeaderTimeoutSite(web.TCPSite):
    """A :class:`aiohttp.web.TCPSite` whose connections get a :class:`HeaderDeadline`, and whose TLS
    handshakes must finish within the same time."""

    def __init__(self, runner: web.BaseRunner, host: str | None = None, port: int | None = None, *,
                 header_timeout_s: float, ssl_context: ssl.SSLContext | None = None) -> None:
        super().__init__(runner, host, port, ssl_context=ssl_context)
        self._header_timeout = header_timeout_s

    async def start(self) -> None:
        # TCPSite.start with the wrapping factory and the handshake timeout in its create_server call.
        await web.BaseSite.start(self)
        server = self._runner.server
        assert server is not None
        timeout = self._header_timeout

        def factory() -> HeaderDeadline:
            return HeaderDeadline(server(), timeout)

        self._server = await asyncio.get_running_loop().create_server(
            factory,
            self._host,
            self._port,
            ssl=self._ssl_context,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
            ssl_handshake_timeout=timeout if self._ssl_context is not None else None,
        )
        sockets = self._server.sockets
        self._bound_port = sockets[0].getsockname()[1] if sockets else self._port


__all__ = ["HeaderDeadline", "HeaderTimeoutSite"]
