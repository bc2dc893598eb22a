"""The timeline app's backend (tests/support/viewer_app.py) on its own, without a browser: it must
hand the viewer exactly what the upstream DICOMweb root sent, and reach an mTLS upstream with the
client certificate the browser does not have.

The upstream here is a TLS server that requires a client certificate from the test PKI and answers
one multipart frame: DUO's view will be such a root, Orthanc (in test_viewer_orthanc) has no mTLS.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator

import aiohttp
import pytest
from aiohttp import web
from yarl import URL

from tests.support.pki import Pki
from tests.support.viewer_app import DICOMWEB_PREFIX, ProxiedRequest, viewer_app

FRAME_PATH = "studies/1.2/series/1.2.3/instances/1.2.3.4/frames/1"
FRAME_ACCEPT = "multipart/related; type=application/octet-stream; transfer-syntax=*"
BOUNDARY = "duo-test-boundary"


def _multipart(payload: bytes) -> bytes:
    return (f"--{BOUNDARY}\r\nContent-Type: application/octet-stream; transfer-syntax=1.2.840.10008.1.2.1"
            f"\r\n\r\n").encode() + payload + f"\r\n--{BOUNDARY}--\r\n".encode()


#: Bigger than any buffer on the way (several proxy chunks), and not compressible by accident.
PAYLOAD = os.urandom(3 * 1024 * 1024 + 17)


def _upstream_app() -> web.Application:
    async def frames(request: web.Request) -> web.StreamResponse:
        response = web.StreamResponse(headers={
            "Content-Type": f'multipart/related; type="application/octet-stream"; boundary={BOUNDARY}',
            "X-Seen-Accept": request.headers.get("Accept", ""),
            "X-Seen-Path": request.raw_path,
        })
        await response.prepare(request)
        body = _multipart(PAYLOAD)
        for start in range(0, len(body), 100_000):  # chunked on the wire, as a streaming server sends
            await response.write(body[start:start + 100_000])
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_get(f"/dicom-web/{FRAME_PATH}", frames)
    return app


@pytest.fixture
async def mtls_root(pki: Pki) -> AsyncIterator[str]:
    """An https DICOMweb root that refuses any client without a certificate from the test CA."""
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server_ctx.load_verify_locations(cafile=str(pki.ca_cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    runner = web.AppRunner(_upstream_app(), access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    try:
        yield f"https://127.0.0.1:{runner.addresses[0][1]}/dicom-web"
    finally:
        await runner.cleanup()


def _client_ctx(pki: Pki, *, with_certificate: bool) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if with_certificate:
        ctx.load_cert_chain(str(pki.client.cert), str(pki.client.key))
    return ctx


async def test_mtls_upstream_answer_passes_through_unchanged(pki: Pki, mtls_root: str) -> None:
    log: list[ProxiedRequest] = []
    async with (viewer_app(mtls_root, ssl=_client_ctx(pki, with_certificate=True), log=log) as base_url,
                aiohttp.ClientSession() as http,
                http.get(URL(f"{base_url}{DICOMWEB_PREFIX}/{FRAME_PATH}?x=1&y=%2F", encoded=True),
                         headers={"Accept": FRAME_ACCEPT}) as response):
        body = await response.read()
        assert response.status == 200
        # the boundary is in the header: a proxy that rewrote it would corrupt every frame
        assert response.headers["Content-Type"] == (
            f'multipart/related; type="application/octet-stream"; boundary={BOUNDARY}')
        assert response.headers["X-Seen-Accept"] == FRAME_ACCEPT
        assert response.headers["X-Seen-Path"] == f"/dicom-web/{FRAME_PATH}?x=1&y=%2F"
    assert body == _multipart(PAYLOAD)
    assert [(r.method, r.path, r.accept, r.status) for r in log] == [
        ("GET", f"{FRAME_PATH}?x=1&y=%2F", FRAME_ACCEPT, 200)]


async def test_upstream_status_passes_through(pki: Pki, mtls_root: str) -> None:
    async with (viewer_app(mtls_root, ssl=_client_ctx(pki, with_certificate=True)) as base_url,
                aiohttp.ClientSession() as http,
                http.get(f"{base_url}{DICOMWEB_PREFIX}/studies/9.9/metadata",
                         headers={"Accept": "application/dicom+json"}) as response):
        assert response.status == 404


async def test_without_the_client_certificate_the_upstream_is_a_bad_gateway(pki: Pki, mtls_root: str) -> None:
    """The certificate is the backend's to present: without it the upstream refuses the handshake and
    the page gets a 502, not a hang and not an empty 200."""
    log: list[ProxiedRequest] = []
    async with (viewer_app(mtls_root, ssl=_client_ctx(pki, with_certificate=False), log=log) as base_url,
                aiohttp.ClientSession() as http,
                http.get(f"{base_url}{DICOMWEB_PREFIX}/{FRAME_PATH}",
                         headers={"Accept": FRAME_ACCEPT}) as response):
        assert response.status == 502
    assert [r.status for r in log] == [502]


async def test_serves_the_page_and_its_packages_and_nothing_beside_them() -> None:
    async with viewer_app("http://127.0.0.1:9/dicom-web") as base_url, aiohttp.ClientSession() as http:
        for path in ("/index.html", "/viewer.js", "/node_modules/cornerstone-core/dist/cornerstone.min.js",
                     "/node_modules/cornerstone-wado-image-loader/dist/"
                     "cornerstoneWADOImageLoaderNoWebWorkers.bundle.min.js"):
            async with http.get(base_url + path) as response:
                assert response.status == 200, path
        # the page directory's parent holds this file: as sent, unnormalised by the client
        async with http.get(URL(base_url + "/%2e%2e/test_viewer_app.py", encoded=True)) as response:
            assert response.status in (403, 404)
