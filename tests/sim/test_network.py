"""The simulated national network, driven through the real CLI as a newcomer would run it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from tests.support.dcmtk import require_tool

CLI = [sys.executable, "-m", "duo_gateway"]


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_once_shows_every_component_healthy(tmp_path: Path) -> None:
    ports_file = tmp_path / "ports.json"
    proc = run_demo("--once", "--ports-file", str(ports_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "11 of 11 checks passed: network healthy" in proc.stdout
    ports = json.loads(ports_file.read_text())
    assert ports["duo"]["home_community_id"].startswith("urn:oid:")
    assert ports["duo"]["metrics"].endswith("/metrics")
    assert set(ports["duo"]["dicom"]) == {"ae_title", "host", "port"}
    assert set(ports["mitz"]) >= {"closed", "open", "subscriptions"}
    assert len(ports["tlb_hospitals"]) == 2
    assert all(set(h) >= {"ura", "name", "ae_title", "host", "port"} for h in ports["tlb_hospitals"])
    assert all(set(c) >= {"home_community_id", "name", "iti38", "iti39", "rad75"}
               for c in ports["xca_communities"])
    assert sorted(p["consent"] for p in ports["patients"]) == ["all", "none", "partial"]
    # loopback only, every endpoint
    text = json.dumps(ports)
    assert "0.0.0.0" not in text and "localhost" not in text
    # the demo's patients never reach stdout/stderr logs in clear except in the ports file itself
    for patient in ports["patients"]:
        assert patient["bsn"] not in proc.stderr


def test_demo_once_fails_when_the_network_is_not_healthy(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "sim.example.toml"
    sim = tmp_path / "sim.toml"
    sim.write_text(example.read_text().replace('# force_decision = "Indeterminate"',
                                               'force_decision = "Indeterminate"'))
    proc = run_demo("--once", "--sim-config", str(sim))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "[FAIL] Mitz closed question" in proc.stdout
    assert "NETWORK NOT HEALTHY" in proc.stdout


def _free_block(n: int) -> int:
    """A base port with n free consecutive ports after it (best effort, loopback)."""
    for base in range(21000, 60000, 97):
        socks = []
        try:
            for p in range(base, base + n):
                s = socket.socket()
                s.bind(("127.0.0.1", p))
                socks.append(s)
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port block")


def test_demo_keeps_running_on_fixed_ports_until_sigterm(tmp_path: Path) -> None:
    require_tool("echoscu")
    base = _free_block(8)
    ports_file = tmp_path / "ports.json"
    proc = subprocess.Popen([*CLI, "demo", "--ports-file", str(ports_file), "--base-port", str(base)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "ports file never written"
            time.sleep(0.1)
        ports = json.loads(ports_file.read_text())
        assert ports["duo"]["http"] == f"http://127.0.0.1:{base}"
        assert ports["duo"]["dicom"]["port"] == base + 1
        assert ports["mitz"]["closed"].startswith(f"http://127.0.0.1:{base + 2}/")
        assert [h["port"] for h in ports["tlb_hospitals"]] == [base + 3, base + 4]
        with urllib.request.urlopen(ports["duo"]["readyz"], timeout=10) as r:
            assert json.loads(r.read())["status"] == "ready"
        # DUO's own DICOM AE answers a real DCMTK echoscu
        dicom = ports["duo"]["dicom"]
        echo = subprocess.run(["echoscu", "-aec", dicom["ae_title"], dicom["host"], str(dicom["port"])],
                              capture_output=True, text=True, timeout=30)
        assert echo.returncode == 0, echo.stderr
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("demo did not stop on SIGTERM")
