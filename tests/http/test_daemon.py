"""The daemon's HTTP edge: mTLS, health, readiness, metrics, request ids and graceful shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.config.tls import ClientTls, ServerTls
from duo_gateway.daemon import Gateway, free_port
from duo_gateway.dicom.echo import c_echo
from duo_gateway.soap.xml import parse_xml
from duo_gateway.tls import client_context
from tests.support.gateway import make_config
from tests.support.pki import Pki


@pytest.fixture
async def mitz_stub() -> AsyncIterator[int]:
    """Any listening HTTP server stands for Mitz here: readiness only checks reachability."""
    app = web.Application()
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


def mtls_settings(pki: Pki) -> dict[str, Any]:
    return {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), "ca_file": str(pki.ca_cert),
            "client_auth": "required"}


def client_ctx(pki: Pki, cert: bool = True, rogue: bool = False) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    if cert:
        pair = pki.rogue_client if rogue else pki.client
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


async def test_mtls_refuses_clients_without_a_valid_certificate(tmp_path: Path, pki: Pki,
                                                                mitz_stub: int) -> None:
    gw = Gateway(make_config(tmp_path, mitz_port=mitz_stub, tls=mtls_settings(pki)))
    await gw.start()
    try:
        url = f"https://127.0.0.1:{gw.http_port}/healthz"
        async with aiohttp.ClientSession() as s:
            async with s.get(url, ssl=client_ctx(pki)) as resp:
                assert resp.status == 200
                assert await resp.json() == {"status": "alive"}
            for ctx in (client_ctx(pki, cert=False), client_ctx(pki, rogue=True)):
                with pytest.raises(aiohttp.ClientError):
                    async with s.get(url, ssl=ctx) as resp:
                        await resp.read()
        # Plain HTTP on the TLS port is not served either.
        async with aiohttp.ClientSession() as s:
            with pytest.raises(aiohttp.ClientError):
                async with s.get(f"http://127.0.0.1:{gw.http_port}/healthz") as resp:
                    await resp.read()
    finally:
        await gw.stop()


async def test_readiness_reports_each_peer_and_fails_only_on_essentials(tmp_path: Path,
                                                                        mitz_stub: int) -> None:
    dead = free_port()
    hospital = {"ura": "00010001", "name": "Down", "ae_title": "DOWN_PACS", "host": "127.0.0.1",
                "port": dead, "repository_unique_id": "2.16.528.1.1007.99.1.1", "timeout_s": 1.0}
    gw = Gateway(make_config(tmp_path, mitz_port=mitz_stub, hospitals=[hospital]))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.http_url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 200, body
        assert body["status"] == "degraded"
        checks = {c["peer"]: c for c in body["checks"]}
        assert checks["mitz"]["ok"] is True
        assert checks["tlb:00010001"]["ok"] is False
        assert checks["tlb:00010001"]["kind"] == "dicom"
        assert checks["audit"]["ok"] is True
    finally:
        await gw.stop()

    gw = Gateway(make_config(tmp_path, mitz_port=free_port()))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.http_url}/readyz") as resp:
            body = await resp.json()
            assert resp.status == 503
        assert body["status"] == "not-ready"
        assert not {c["peer"]: c for c in body["checks"]}["mitz"]["ok"]
    finally:
        await gw.stop()


async def test_metrics_request_ids_and_ops_listener(tmp_path: Path, mitz_stub: int) -> None:
    gw = Gateway(make_config(tmp_path, mitz_port=mitz_stub, ops=True))
    await gw.start()
    try:
        assert gw.ops_url is not None
        async with aiohttp.ClientSession() as s:
            async with s.get(f"{gw.ops_url}/healthz", headers={"X-Request-ID": "trace-12345678"}) as r:
                assert r.headers["X-Request-ID"] == "trace-12345678"
            async with s.get(f"{gw.ops_url}/healthz", headers={"X-Request-ID": "bad id; drop"}) as r:
                assert r.headers["X-Request-ID"] != "bad id; drop"
                assert len(r.headers["X-Request-ID"]) == 36
            async with s.get(f"{gw.http_url}/no/such/route") as r:
                assert r.status == 404
            # With an ops listener, health and metrics stay there: the main listener does not serve them.
            for path in ("/healthz", "/readyz", "/metrics"):
                async with s.get(f"{gw.http_url}{path}") as r:
                    assert r.status == 404, path
            await (await s.get(f"{gw.ops_url}/readyz")).read()
            async with s.get(f"{gw.ops_url}/metrics") as r:
                text = await r.text()
                assert r.headers["Content-Type"].startswith("text/plain")
        assert 'duo_http_requests_total{method="GET",route="/healthz",status="200"} 2.0' in text
        assert 'route="unmatched",status="404"' in text
        assert 'duo_http_request_duration_seconds_bucket{le="0.005",method="GET",route="/healthz"}' in text
        assert 'duo_peer_up{kind="mitz",peer="mitz"} 1.0' in text
    finally:
        await gw.stop()


class SlowDoor:
    """A front door whose handler takes a while, to catch requests in flight at shutdown."""

    name = "slow"

    def __init__(self) -> None:
        self.started = asyncio.Event()

    def mount(self, app: web.Application) -> None:
        async def slow(_request: web.Request) -> web.Response:
            self.started.set()
            await asyncio.sleep(1.0)
            return web.json_response({"done": True})

        app.router.add_get("/slow", slow, name="tlb:slow")  # the plain test client is a TLB client


async def test_graceful_shutdown_finishes_in_flight_requests(tmp_path: Path, mitz_stub: int) -> None:
    door = SlowDoor()
    gw = Gateway(make_config(tmp_path, mitz_port=mitz_stub), front_doors=[door])
    await gw.start()
    url = gw.http_url
    async with aiohttp.ClientSession() as s:
        async def call() -> tuple[int, Any]:
            async with s.get(f"{url}/slow") as resp:
                return resp.status, await resp.json()

        in_flight = asyncio.create_task(call())
        await door.started.wait()
        stopping = asyncio.create_task(gw.stop())
        await asyncio.sleep(0.2)
        # Stopped accepting: a new connection is refused while the old request is still running.
        async with aiohttp.ClientSession() as fresh:
            with pytest.raises(aiohttp.ClientConnectionError):
                async with fresh.get(f"{url}/healthz") as resp:
                    await resp.read()
        assert await in_flight == (200, {"done": True})
        await asyncio.wait_for(stopping, 10)


async def test_gateway_start_and_stop_are_in_the_audit_trail(tmp_path: Path, mitz_stub: int) -> None:
    gw = Gateway(make_config(tmp_path, mitz_port=mitz_stub))
    await gw.start()
    await gw.stop()
    records = parse_file_records((tmp_path / "storage" / "audit" / "audit.log").read_bytes()).records
    events = [parse_xml(parse_message(r).msg) for r in records]
    assert [e.xpath("string(EventIdentification/EventID/@csd-code)") for e in events] == ["110100", "110100"]
    assert [e.xpath("string(EventIdentification/EventTypeCode/@csd-code)") for e in events] == \
        ["110120", "110121"]
    assert all(e.xpath("string(ActiveParticipant/RoleIDCode/@csd-code)") == "110150" for e in events)


def test_serve_exits_0_on_sigterm_and_logs_json(tmp_path: Path) -> None:
    port = free_port()
    cfg = tmp_path / "duo.toml"
    cfg.write_text(f"""
[gateway]
home_community_id = "urn:oid:2.16.528.1.1007.99.1"
ura = "00099001"
name = "DUO"
[listeners.http]
host = "127.0.0.1"
port = {port}
[listeners.dicom]
host = "127.0.0.1"
port = 0
[mitz]
closed_url = "http://127.0.0.1:9/closed"
open_url = "http://127.0.0.1:9/open"
subscriptions_url = "http://127.0.0.1:9/sub"
[storage]
path = "var"
[logging]
level = "INFO"
""")
    proc = subprocess.Popen([sys.executable, "-m", "duo_gateway", "serve", "--config", str(cfg)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            try:
                import urllib.request

                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                time.sleep(0.1)
        else:
            pytest.fail("daemon did not come up")
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=20)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert time.monotonic() - started < 10
    events = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    names = [e["event"] for e in events]
    assert "gateway started" in names and "gateway stopped" in names
    assert all({"timestamp", "level", "event"} <= e.keys() for e in events)
    assert (tmp_path / "var").is_dir()  # relative storage path resolved against the config file


async def test_dicom_listener_requires_a_client_certificate_under_mtls(tmp_path: Path, pki: Pki,
                                                                       mitz_stub: int) -> None:
    """DICOM over TLS on DUO's own AE, probed by DUO's own C-ECHO client with and without a cert."""
    cfg = make_config(tmp_path, mitz_port=mitz_stub)
    listeners = cfg.listeners.model_copy(update={"dicom": cfg.listeners.dicom.model_copy(
        update={"tls": ServerTls(cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca_cert)})})
    gw = Gateway(cfg.model_copy(update={"listeners": listeners}))
    await gw.start()
    try:
        ae, port = cfg.listeners.dicom.ae_title, gw.dicom_port
        good = client_context(ClientTls(ca_file=pki.ca_cert, cert_file=pki.client.cert,
                                        key_file=pki.client.key))
        no_cert = client_context(ClientTls(ca_file=pki.ca_cert))
        rogue = client_context(ClientTls(ca_file=pki.ca_cert, cert_file=pki.rogue_client.cert,
                                         key_file=pki.rogue_client.key))
        assert (await c_echo("PROBE", "127.0.0.1", port, ae, 5, good)).ok
        for ctx in (no_cert, rogue, None):
            assert not (await c_echo("PROBE", "127.0.0.1", port, ae, 5, ctx)).ok
    finally:
        await gw.stop()


def test_settle_heap_collects_start_up_garbage_then_freezes_the_rest() -> None:
    """In a fresh interpreter, since a frozen heap would stay frozen for the rest of this test run."""
    script = """
import gc, weakref
from duo_gateway.daemon import settle_heap

class Node:
    pass

garbage = Node(); garbage.me = garbage  # a cycle: only the collector frees it
dead = weakref.ref(garbage)
del garbage
kept = [Node() for _ in range(100)]
assert gc.get_freeze_count() == 0
settle_heap()
assert dead() is None, "start-up garbage must be collected, not frozen"
assert gc.get_freeze_count() >= len(kept), gc.get_freeze_count()
print("ok")
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
                          cwd=Path(__file__).resolve().parents[2])
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
