"""Outbound HTTP to peers: one place for TLS per peer, deadlines, metrics and request correlation.

Every call to Mitz or an XCA community goes through :class:`PeerClient`, so each peer gets its own
TLS material (mTLS client certificate, CA bundle), each call has a hard deadline, the Prometheus
``duo_peer_*`` series are fed uniformly, and the inbound request id travels on as ``X-Request-ID``.
Errors are not interpreted here: callers map them to their protocol's answer (fail closed for Mitz,
XDSUnavailableCommunity for a community).
"""

from __future__ import annotations

import ssl
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import aiohttp
import structlog
from multidict import CIMultiDictProxy

from duo_gateway.config.tls import ClientTls
from duo_gateway.observability.metrics import Metrics
from duo_gateway.tls import client_context

REQUEST_ID_HEADER = "X-Request-ID"


@dataclass(frozen=True)
class PeerResponse:
    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    elapsed_s: float


@dataclass(frozen=True)
class PeerStream:
    """An answer whose body is still on the wire: read ``content`` as far as the protocol needs.

    ``content`` is aiohttp's reader (``async read(n)``); the total timeout of the call keeps running
    while it is read.
    """

    status: int
    headers: CIMultiDictProxy[str]
    content: aiohttp.StreamReader


class PeerCallError(Exception):
    """No HTTP answer at all: refused, reset, TLS failure, timeout, or an oversized body."""

    def __init__(self, kind: str, detail: str) -> None:
        super().__init__(f"{kind}: {detail}")
        self.kind = kind  # "timeout" | "tls" | "connect" | "protocol" | "too-large"
        self.detail = detail


class PeerClient:
    """HTTP client of one peer (e.g. "mitz"); owns its aiohttp session and TLS context."""

    def __init__(self, peer: str, tls: ClientTls | None, metrics: Metrics | None = None, *,
                 max_body_bytes: int = 64 * 1024 * 1024, pool_size: int = 32) -> None:
        self.peer = peer
        self._ssl: ssl.SSLContext = client_context(tls)
        self._metrics = metrics
        self._max_body = max_body_bytes
        self._pool_size = pool_size
        self._session: aiohttp.ClientSession | None = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            connector = aiohttp.TCPConnector(ssl=self._ssl, limit=self._pool_size)
            self._session = aiohttp.ClientSession(connector=connector, trust_env=False)
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(self, url: str, body: bytes | dict[str, object], *, operation: str, timeout_s: float,
                   content_type: str | None = None) -> PeerResponse:
        """POST and read the whole (bounded) answer within ``timeout_s``, connect time included."""
        async with self._exchange(url, body, operation, timeout_s, content_type) as (resp, started):
            data = await self._read_bounded(resp)
            return PeerResponse(resp.status, resp.headers, data, time.perf_counter() - started)

    @asynccontextmanager
    async def stream_post(self, url: str, body: bytes, *, operation: str, timeout_s: float,
                          content_type: str | None = None) -> AsyncIterator[PeerStream]:
        """POST and hand over the answer as soon as its headers are in; the body is read by the caller.

        For answers too big to hold (RAD-75 image batches): the caller streams ``content`` to disk.
        ``timeout_s`` is total, connect time and body reading included, like :meth:`post`. Transport
        failures while the caller reads the body become :class:`PeerCallError` too; the caller's own
        exceptions pass through unchanged. The metric is observed once, when the block is left, with
        the HTTP status as outcome only if the caller got through the body without a transport error.
        """
        async with self._exchange(url, body, operation, timeout_s, content_type) as (resp, _):
            yield PeerStream(resp.status, resp.headers, resp.content)

    @asynccontextmanager
    async def _exchange(self, url: str, body: bytes | dict[str, object], operation: str, timeout_s: float,
                        content_type: str | None) -> AsyncIterator[tuple[aiohttp.ClientResponse, float]]:
        """One POST: headers, the total deadline, transport errors as :class:`PeerCallError`, and the
        peer metric observed once, whatever the caller does with the answer inside the block."""
        headers = {}
        if content_type is not None:
            headers["Content-Type"] = content_type
        request_id = structlog.contextvars.get_contextvars().get("request_id")
        if isinstance(request_id, str):
            headers[REQUEST_ID_HEADER] = request_id
        started = time.perf_counter()
        outcome = "error"
        try:
            kwargs: dict[str, object] = {"json": body} if isinstance(body, dict) else {"data": body}
            async with self._get_session().post(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=timeout_s),
                    allow_redirects=False, **kwargs) as resp:  # type: ignore[arg-type]
                yield resp, started
                outcome = str(resp.status)
        except PeerCallError as exc:
            outcome = exc.kind
            raise
        except TimeoutError as exc:
            outcome = "timeout"
            raise PeerCallError("timeout", f"no complete answer within {timeout_s:g} s") from exc
        except aiohttp.ClientConnectorCertificateError as exc:
            outcome = "tls"
            raise PeerCallError("tls", str(exc.certificate_error)) from exc
        except aiohttp.ClientSSLError as exc:
            outcome = "tls"
            raise PeerCallError("tls", type(exc).__name__) from exc
        except aiohttp.ClientConnectorError as exc:
            outcome = "connect"
            raise PeerCallError("connect", exc.strerror or type(exc).__name__) from exc
        except aiohttp.ClientError as exc:
            outcome = "protocol"
            raise PeerCallError("protocol", type(exc).__name__) from exc
        finally:
            if self._metrics is not None:
                self._metrics.observe_peer(self.peer, operation, outcome, time.perf_counter() - started)

    async def _read_bounded(self, resp: aiohttp.ClientResponse) -> bytes:
        if resp.content_length is not None and resp.content_length > self._max_body:
            raise PeerCallError("too-large", f"announced {resp.content_length} bytes")
        chunks: list[bytes] = []
        size = 0
        async for chunk in resp.content.iter_chunked(64 * 1024):
            size += len(chunk)
            if size > self._max_body:
                raise PeerCallError("too-large", f"more than {self._max_body} bytes")
            chunks.append(chunk)
        return b"".join(chunks)
