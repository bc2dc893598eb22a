"""Connections that never finish their request headers (or TLS handshake) are closed; others are not."""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest
from aiohttp import web

from duo_gateway.config.loader import DuoConfig
from duo_gateway.daemon import Gateway
from duo_gateway.http.slow import HeaderTimeoutSite
from tests.support.gateway import make_config
from tests.support.pki import Pki

TIMEOUT = 0.5
#: Closing happens at most one poll (TIMEOUT / 4) after the deadline; the rest is scheduling slack.
MARGIN = 0.6

Site = Callable[..., Awaitable[int]]


@pytest.fixture
async def site() -> AsyncIterator[Site]:
    """Start a HeaderTimeoutSite on loopback around a small app; returns its port."""
    runners: list[web.AppRunner] = []

    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(TIMEOUT * 2)
        return web.Response(text="slow")

    async def fast(request: web.Request) -> web.Response:
        return web.Response(text="fast")

    async def start(ssl_context: ssl.SSLContext | None = None) -> int:
        app = web.Application()
        app.router.add_get("/fast", fast)
        app.router.add_get("/slow", slow)
        runner = web.AppRunner(app)
        await runner.setup()
        runners.append(runner)
        s = HeaderTimeoutSite(runner, "127.0.0.1", 0, ssl_context=ssl_context, header_timeout_s=TIMEOUT)
        await s.start()
        return s.port

    yield start
    for runner in runners:
        await runner.cleanup()


async def _closed_after(reader: asyncio.StreamReader) -> tuple[float, bytes]:
    """Seconds until the server closes the connection, and what it sent before."""
    start = time.monotonic()
    got = await asyncio.wait_for(reader.read(), TIMEOUT + MARGIN + 1)
    return time.monotonic() - start, got


async def _request(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, path: str) -> bytes:
    writer.write(f"GET {path} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    return await reader.readexactly(length)


async def test_half_a_request_line_is_closed_at_the_deadline(site: Site) -> None:
    port = await site()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /fast HTT")
    waited, got = await _closed_after(reader)
    writer.close()
    assert got == b""
    assert TIMEOUT * 0.9 <= waited <= TIMEOUT + MARGIN


async def test_headers_trickled_byte_by_byte_do_not_extend_the_deadline(site: Site) -> None:
    port = await site()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        for byte in b"GET /fast HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 100:
            writer.write(bytes([byte]))
            await writer.drain()
            await asyncio.sleep(0.05)
            if reader.at_eof():
                raise asyncio.IncompleteReadError(b"", None)
    assert time.monotonic() - start <= TIMEOUT + MARGIN
    writer.close()


async def test_keep_alive_and_slow_handlers_are_not_cut(site: Site) -> None:
    """A client that sends each request within the deadline keeps its connection for as long as it
    likes, and a handler slower than the deadline is not the client's delay."""
    port = await site()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    start = time.monotonic()
    while time.monotonic() - start < TIMEOUT * 2:
        assert await _request(reader, writer, "/fast") == b"fast"
        await asyncio.sleep(TIMEOUT / 3)
    assert await _request(reader, writer, "/slow") == b"slow"
    # Kept alive with nothing sent, past the header deadline: still open (aiohttp's keep-alive timeout
    # governs idle connections; closing them here would race every client reusing its connection).
    await asyncio.sleep(TIMEOUT + MARGIN)
    assert await _request(reader, writer, "/fast") == b"fast"
    # The first byte of the next request starts the clock: half a request line is closed in time.
    writer.write(b"GET /fast HT")
    waited, got = await _closed_after(reader)
    assert got == b"" and waited <= TIMEOUT + MARGIN
    writer.close()


async def test_a_tls_handshake_that_never_comes_is_abandoned(site: Site, pki: Pki) -> None:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    port = await site(ctx)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)  # plain TCP: no ClientHello
    waited, got = await _closed_after(reader)
    writer.close()
    assert got == b"" and waited <= TIMEOUT + MARGIN


def _with_header_timeout(config: DuoConfig, timeout_s: float) -> DuoConfig:
    http = config.listeners.http.model_copy(update={"header_timeout_s": timeout_s})
    return config.model_copy(update={"listeners": config.listeners.model_copy(update={"http": http})})


async def test_the_gateway_listeners_apply_header_timeout_s(tmp_path: Path) -> None:
    with socket.socket() as placeholder:  # Mitz is not asked here; any closed port will do
        placeholder.bind(("127.0.0.1", 0))
        mitz_port = placeholder.getsockname()[1]
    gw = Gateway(_with_header_timeout(make_config(tmp_path, mitz_port=mitz_port, ops=True), TIMEOUT))
    await gw.start()
    try:
        assert gw.ops_url is not None
        ops_port = int(gw.ops_url.rsplit(":", 1)[1])
        for port in (gw.http_port, ops_port):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /healthz HTTP/1.1\r\nHost")
            waited, got = await _closed_after(reader)
            writer.close()
            assert got == b"" and waited <= TIMEOUT + MARGIN, port
    finally:
        await gw.stop()
