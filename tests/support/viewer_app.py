"""The timeline app's backend as the browser test needs it: it serves the web viewer page and
reverse-proxies ``/dicomweb/...`` to one upstream DICOMweb root.

The proxy is how the timeline app deploys a viewer against DUO: a browser cannot present DUO's
client certificate, the app's backend can (``ssl``), so the page only ever talks to its own origin.
Bodies stream through untouched (no decompression, no re-encoding of multipart answers): what the
viewer library receives is what the upstream sent, so the test holds the upstream, not the proxy.

The page's npm packages are installed here (``npm ci`` from the committed lock file into the
gitignored ``node_modules``), once per lock file: a stamp keyed on its hash makes a second run
offline and instant, as ``make test`` expects of everything it installs.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import shutil
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from ssl import SSLContext

import aiohttp
import pytest
from aiohttp import web
from aiohttp.typedefs import Handler
from yarl import URL

from tests.support.peers import serve_peer

PAGE_DIR = Path(__file__).resolve().parent.parent / "viewer" / "page"
#: Where the proxy answers; the page's DICOMweb root is ``{base_url}{DICOMWEB_PREFIX}``.
DICOMWEB_PREFIX = "/dicomweb"
_STAMP = ".duo-installed"
#: Request headers a viewer's DICOMweb request depends on; the rest (cookies, origin, the browser's
#: user agent) are the browser's business with the app, not the upstream's.
_FORWARDED_REQUEST_HEADERS = ("Accept", "Accept-Encoding", "Accept-Charset", "Content-Type", "Range",
                              "If-None-Match", "If-Modified-Since")
#: Hop-by-hop headers (RFC 9110 7.6.1) and the ones aiohttp writes for its own response.
_DROPPED_RESPONSE_HEADERS = frozenset({"connection", "keep-alive", "proxy-authenticate",
                                       "proxy-authorization", "te", "trailer", "transfer-encoding", "upgrade",
                                       "server", "date"})
_CHUNK = 64 * 1024


@dataclass(frozen=True)
class ProxiedRequest:
    """One request the page made of the upstream: the contract a DICOMweb server must meet for it."""

    method: str
    #: Below the DICOMweb root, with the query string: ``studies/1.2/series/3.4/metadata``.
    path: str
    accept: str
    status: int
    #: The upstream's answer as it was passed on (multipart/related; type=...; transfer-syntax=...).
    content_type: str = ""


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((PAGE_DIR / name).read_bytes())
    return digest.hexdigest()


def install_page() -> Path:
    """The page directory with its npm packages installed; skip loudly without npm, fail under CI.

    Blocking (``npm ci`` takes ~15 s the first time): call it off the event loop. A lock on the page
    directory keeps two test processes from installing into one ``node_modules`` at once.
    """
    npm = shutil.which("npm")
    if npm is None:
        msg = "npm not installed (apt-get install npm): the web viewer page cannot be installed"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    stamp = PAGE_DIR / "node_modules" / _STAMP
    wanted = _lock_digest()
    fd = os.open(PAGE_DIR, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        if stamp.is_file() and stamp.read_text() == wanted:
            return PAGE_DIR
        # --ignore-scripts: the page needs the packages' dist/ files only, and no install script of a
        # dependency gets to run (or to fetch a binary from outside the registry)
        proc = subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--ignore-scripts"], cwd=PAGE_DIR,
                              capture_output=True, text=True, timeout=600,
                              env={**os.environ, "npm_config_update_notifier": "false"})
        if proc.returncode != 0:
            raise RuntimeError(f"npm ci failed in {PAGE_DIR}:\n{proc.stdout[-2000:]}{proc.stderr[-4000:]}")
        stamp.write_text(wanted)
        return PAGE_DIR
    finally:
        os.close(fd)  # releases the lock


def _proxy(upstream_root: str, session: aiohttp.ClientSession, ssl: SSLContext | None,
           log: list[ProxiedRequest] | None) -> Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        # raw, as the page wrote it: decoding and re-encoding could change a query's meaning
        path = request.raw_path[len(DICOMWEB_PREFIX) + 1:]
        accept = request.headers.get("Accept", "")
        headers = {name: value for name in _FORWARDED_REQUEST_HEADERS
                   if (value := request.headers.get(name)) is not None}
        try:
            upstream = await session.request(request.method, URL(f"{upstream_root}/{path}", encoded=True),
                                             headers=headers,
                                             data=request.content if request.body_exists else None,
                                             ssl=ssl if ssl is not None else True)
        except aiohttp.ClientError as exc:
            if log is not None:
                log.append(ProxiedRequest(request.method, path, accept, 502))
            raise web.HTTPBadGateway(text=f"upstream DICOMweb root unreachable: {exc}") from exc
        if log is not None:
            log.append(ProxiedRequest(request.method, path, accept, upstream.status,
                                      upstream.headers.get("Content-Type", "")))
        async with upstream:
            response = web.StreamResponse(status=upstream.status, reason=upstream.reason)
            for name, value in upstream.headers.items():
                if name.lower() not in _DROPPED_RESPONSE_HEADERS:
                    response.headers.add(name, value)
            await response.prepare(request)
            # an upstream that breaks off mid-body raises here: the browser sees the cut, as it would
            async for chunk in upstream.content.iter_chunked(_CHUNK):
                await response.write(chunk)
            await response.write_eof()
        return response

    return handler


@asynccontextmanager
async def viewer_app(upstream_root: str, *, ssl: SSLContext | None = None,
                     log: list[ProxiedRequest] | None = None) -> AsyncIterator[str]:
    """Serve the viewer page and proxy ``/dicomweb/...`` to ``upstream_root`` (e.g. Orthanc's
    ``http://127.0.0.1:8042/dicom-web`` or a DUO view's DICOMweb root) on a free loopback port; yields
    the app's base URL. ``ssl`` is the client context for an https upstream (DUO's mTLS); every proxied
    request is appended to ``log`` when one is given."""
    page = await asyncio.to_thread(install_page)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    # auto_decompress off: a gzip'd answer passes through with its Content-Encoding, as sent
    async with aiohttp.ClientSession(timeout=timeout, auto_decompress=False) as session:
        app = web.Application()
        app.router.add_route("*", DICOMWEB_PREFIX + "/{tail:.*}",
                             _proxy(upstream_root.rstrip("/"), session, ssl, log))
        app.router.add_static("/", page)
        peer = await serve_peer(app)
        try:
            yield peer.url
        finally:
            await peer.runner.cleanup()
