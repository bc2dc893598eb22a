"""The simulated national network, driven through the real CLI as a newcomer would run it."""

from __future__ import annotations

import json
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.support.dcmtk import require_tool

CLI = [sys.executable, "-m", "duo_gateway"]


def run_demo(*args: str, timeout: float = 120) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, "demo", *args], capture_output=True, text=True, timeout=timeout)


def test_demo_once_shows_every_component_healthy(tmp_path: Path) -> None:
    ports_file = tmp_path / "ports.json"
    proc = run_demo("--once", "--ports-file", str(ports_file))
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "16 of 16 checks passed: network healthy" in proc.stdout
    assert "[ok  ] Trust: callers bound to their certificates" in proc.stdout
    ports = json.loads(ports_file.read_text())
    assert ports["duo"]["home_community_id"].startswith("urn:oid:")
    assert ports["duo"]["metrics"].endswith("/metrics")
    assert set(ports["duo"]["dicom"]) == {"ae_title", "host", "port"}
    assert {ports["duo"][k].rsplit("/", 1)[-1] for k in ("iti38", "iti39", "rad75")} == {
        "iti38",
        "iti39",
        "rad75",
    }
    xua = ports["xua"]
    assert xua["audience"] == ports["duo"]["home_community_id"] and xua["issuer"].startswith("urn:oid:")
    assert Path(xua["cert"]).is_file() is False  # the demo's temp workdir is gone once --once exits
    assert set(ports["mitz"]) >= {"closed", "open", "subscriptions"}
    assert len(ports["tlb_hospitals"]) == 2
    assert all(set(h) >= {"ura", "name", "ae_title", "host", "port"} for h in ports["tlb_hospitals"])
    assert all(
        set(c) >= {"home_community_id", "name", "iti38", "iti39", "rad75"} for c in ports["xca_communities"]
    )
    assert sorted(p["consent"] for p in ports["patients"]) == ["all", "none", "partial"]
    # Issue 11's contract: DUO over mTLS, two TLB clients and two XCA peers with identities of their own.
    assert ports["duo"]["http"].startswith("https://127.0.0.1:") and set(ports["tls"]) == {"ca"}
    tlb, xca = ports["clients"]["tlb"], ports["clients"]["xca"]
    assert len(tlb) >= 2 and len({c["uras"][0] for c in tlb}) == len(tlb)
    assert all(set(c) >= {"name", "uras", "cert", "key"} for c in tlb)
    assert len(xca) >= 2 and len({p["issuer"] for p in xca}) == len(xca)
    assert all(set(p) >= {"name", "home_community_id", "issuer", "cert", "key", "signing_cert", "signing_key"}
               for p in xca)
    assert xua["issuer"] == xca[0]["issuer"] and xua["cert"] == xca[0]["signing_cert"]
    assert ports["audit"]["file"].endswith(".log")
    # The requester's own PACS, where the demo's transfers land (issue 6's contract).
    assert set(ports["requester_pacs"]) == {"name", "ae_title", "host", "port"}
    assert ports["requester_pacs"]["port"] > 0
    assert "Transfers into the requester's PACS" in proc.stdout
    # Issue 13: compressed studies at both kinds of source, which the demo's transfers take.
    compressed = ports["compressed_studies"]
    assert {c["kind"] for c in compressed} == {"tlb", "xca"} and len(compressed) >= 2
    assert all(set(c) == {"kind", "source", "study_instance_uid", "transfer_syntax"} for c in compressed)
    assert "1.2.840.10008.1.2.4.90" in {c["transfer_syntax"] for c in compressed if c["kind"] == "tlb"}
    sources = {h["ura"] for h in ports["tlb_hospitals"]}
    sources |= {c["home_community_id"] for c in ports["xca_communities"]}
    assert {c["source"] for c in compressed} <= sources
    # loopback only, every endpoint
    text = json.dumps(ports)
    assert "0.0.0.0" not in text and "localhost" not in text
    # the demo's patients never reach stdout/stderr logs in clear except in the ports file itself
    for patient in ports["patients"]:
        assert patient["bsn"] not in proc.stderr


def test_demo_once_fails_when_the_network_is_not_healthy(tmp_path: Path) -> None:
    example = Path(__file__).resolve().parents[2] / "config" / "sim.example.toml"
    sim = tmp_path / "sim.toml"
    sim.write_text(
        example.read_text().replace('# force_decision = "Indeterminate"', 'force_decision = "Indeterminate"')
    )
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
    base = _free_block(9)  # DUO HTTP, DICOM, Mitz, 2 PACS, 2 communities, requester PACS, DUO ops
    ports_file = tmp_path / "ports.json"
    proc = subprocess.Popen(
        [*CLI, "demo", "--ports-file", str(ports_file), "--base-port", str(base)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 60
        while not ports_file.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "ports file never written"
            time.sleep(0.1)
        ports = json.loads(ports_file.read_text())
        assert ports["duo"]["http"] == f"https://127.0.0.1:{base}"
        assert ports["duo"]["dicom"]["port"] == base + 1
        assert ports["mitz"]["closed"].startswith(f"http://127.0.0.1:{base + 2}/")
        assert [h["port"] for h in ports["tlb_hospitals"]] == [base + 3, base + 4]
        with urllib.request.urlopen(ports["duo"]["readyz"], timeout=10) as r:  # the plain ops listener
            assert json.loads(r.read())["status"] == "ready"
        # The generated config is in the workdir, and DUO's own check-config accepts it.
        config = Path(ports["config"])
        checked = subprocess.run([*CLI, "check-config", str(config)], capture_output=True, text=True,
                                 timeout=60, check=False)
        assert checked.returncode == 0, checked.stderr
        # Without a client certificate, DUO's listener does not even finish the handshake.
        anonymous = ssl.create_default_context(cafile=ports["tls"]["ca"])
        with pytest.raises(OSError):
            urllib.request.urlopen(ports["duo"]["tlb_api"] + "/openapi.yaml", timeout=10, context=anonymous)
        # DUO's own DICOM AE answers a real DCMTK echoscu
        dicom = ports["duo"]["dicom"]
        echo = subprocess.run(
            ["echoscu", "-aec", dicom["ae_title"], dicom["host"], str(dicom["port"])],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert echo.returncode == 0, echo.stderr
        # An outside XDS tool talks to the demo with the advertised XUA issuer material.
        assert query_duo_like_an_xds_community(ports) >= 4
        proc.terminate()
        proc.wait(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            pytest.fail("demo did not stop on SIGTERM")


def query_duo_like_an_xds_community(ports: dict[str, Any]) -> int:
    """ITI-38 FindDocuments to the running demo, signed with the ports file's XUA pair: entry count."""
    from datetime import UTC, datetime

    from duo_gateway.bsn import bsn_cx
    from duo_gateway.soap.envelope import (
        WSA_ANONYMOUS,
        Addressing,
        build_envelope,
        new_message_id,
        parse_envelope,
        serialize,
    )
    from duo_gateway.xca.codes import Action, ResponseStatus
    from duo_gateway.xca.query import build_adhoc_query_request, find_documents, parse_adhoc_query_response
    from duo_gateway.xmldsig import load_signing_pair
    from duo_gateway.xua import Claims, issue_assertion, security_header

    xua, url, peer = ports["xua"], ports["duo"]["iti38"], ports["clients"]["xca"][0]
    key, cert = load_signing_pair(Path(xua["key"]), Path(xua["cert"]))
    now = datetime.now(UTC)
    assertion = issue_assertion(
        Claims(uzi="000095254", role="01.039", ura="00020011", organisation_type="V6"),
        issuer=xua["issuer"],
        audience=xua["audience"],
        key=key,
        cert=cert,
        now=now,
    )
    everywhere = next(p["bsn"] for p in ports["patients"] if p["consent"] == "all")
    env = build_envelope(
        Addressing(Action.ITI38, new_message_id(), url, None, WSA_ANONYMOUS),
        build_adhoc_query_request(find_documents(bsn_cx(everywhere))),
        [security_header(assertion, now)],
    )
    request = urllib.request.Request(
        url,
        data=serialize(env),
        method="POST",
        headers={"Content-Type": f'application/soap+xml; charset=UTF-8; action="{Action.ITI38}"'},
    )
    tls = ssl.create_default_context(cafile=ports["tls"]["ca"])
    tls.load_cert_chain(peer["cert"], peer["key"])  # the XCA peer whose issuer signed the assertion
    with urllib.request.urlopen(request, timeout=30, context=tls) as r:
        answer = parse_envelope(r.read())
    assert answer.body is not None
    response = parse_adhoc_query_response(answer.body)
    assert response.status == ResponseStatus.SUCCESS
    return len(response.entries)
