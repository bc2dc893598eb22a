"""`duo-gateway mitz check`: hospital IT's Mitz connection test, run as a real subprocess."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp import web

from duo_gateway.daemon import free_port
from duo_gateway.sim.behaviour import MitzMisbehaviour
from duo_gateway.sim.config import default_network
from duo_gateway.sim.http import BEHAVIOUR_KEY
from duo_gateway.sim.mitz import MitzSimulator

CONFIG = """
[gateway]
home_community_id = "urn:oid:2.16.528.1.1007.99.1"
ura = "00099001"
name = "DUO"
[mitz]
closed_url = "{base}/geslotenautorisatievraag/xacml3"
open_url = "{base}/openautorisatievraag"
subscriptions_url = "{base}/abonnementen/fhir/Subscription"
timeout_s = 1.0
[[tlb_hospitals]]
ura = "00010002"
name = "Maas"
organisation_type = "V5"
ae_title = "MAAS_PACS"
host = "127.0.0.1"
port = 11112
repository_unique_id = "2.16.528.1.1007.99.10002.1"
"""


@pytest.fixture
async def mitz_app() -> AsyncIterator[tuple[web.Application, str]]:
    app = MitzSimulator(default_network()).app()
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield app, f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


async def check(config: Path, *args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "duo_gateway", "mitz", "check", "--config", str(config), *args,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


async def test_mitz_check_prints_the_decision(mitz_app: tuple[web.Application, str], tmp_path: Path) -> None:
    app, base = mitz_app
    cfg = tmp_path / "duo.toml"
    cfg.write_text(CONFIG.format(base=base))
    who = ["--requester-ura", "00000666"]

    code, out, err = await check(cfg, "--bsn", "999911120", "--holder-ura", "00010001", *who)
    assert code == 0, err
    assert out.startswith("PERMIT: disclosure allowed (decision Permit")

    code, out, _ = await check(cfg, "--bsn", "900186021", "--holder-ura", "00010002", *who, "--json")
    assert code == 0
    assert json.loads(out) == {"permitted": False, "decision": "Deny", "decisions": {"GGC002": "Deny"},
                               "reason": "Mitz decision: GGC002=Deny"}

    app[BEHAVIOUR_KEY].value = MitzMisbehaviour(fault=True)
    code, out, _ = await check(cfg, "--bsn", "999911120", "--holder-ura", "00010001", *who)
    assert code == 1
    assert "NO CONSENT" in out and "reason: HTTP 500: SOAP fault Receiver" in out
    assert "999911120" not in out  # the decision output names no patient

    code, _, err = await check(cfg, "--bsn", "123456789", "--holder-ura", "00010001", *who)
    assert code == 2
    assert "invalid question" in err


async def test_mitz_check_without_mitz(tmp_path: Path) -> None:
    cfg = tmp_path / "duo.toml"
    cfg.write_text(CONFIG.format(base=f"http://127.0.0.1:{free_port()}"))
    code, out, _ = await check(cfg, "--bsn", "999911120", "--holder-ura", "00010001",
                               "--requester-ura", "00000666")
    assert code == 1
    assert "reason: Mitz connect" in out
