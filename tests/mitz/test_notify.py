"""MitzNotifyDoor mounted in a real Gateway, fed by the Mitz simulator's own notifications."""

from __future__ import annotations

import asyncio
import base64
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from lxml import etree
from structlog.testing import capture_logs

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.mitz import MitzConfig
from duo_gateway.daemon import Gateway
from duo_gateway.mitz.fhir import ConsentStatement, Notification, build_notification
from duo_gateway.mitz.notify import DEFAULT_MAX_BODY_BYTES
from duo_gateway.mitz.subscriptions import SubscriptionManager
from duo_gateway.sim.config import default_network
from duo_gateway.sim.mitz import CONSENT_ADMIN_ROUTE, SUBSCRIPTION_ROUTE, MitzSimulator
from duo_gateway.soap.xml import parse_xml
from tests.support.gateway import make_config

NET = default_network()
H1, H2 = NET.hospitals
ANNA, BRAM, CARLA = NET.patients
BSNS = [p.bsn for p in NET.patients]
NOTIFY_PATH = "/fhir/mitz-notify"
FHIR_JSON = "application/fhir+json"


def _hospital(h: Any) -> dict[str, Any]:
    # Port 9 on loopback: these tests never talk DICOM, the hospitals only need to exist.
    return {"ura": h.ura, "name": h.name, "ae_title": h.ae_title, "host": "127.0.0.1", "port": 9,
            "repository_unique_id": h.repository_unique_id}


def _with_mitz(cfg: DuoConfig, **updates: Any) -> DuoConfig:
    mitz = MitzConfig.model_validate({**cfg.mitz.model_dump(mode="json"), **updates})
    return cfg.model_copy(update={"mitz": mitz})


@dataclass
class Duo:
    gateway: Gateway
    sim: MitzSimulator
    mitz_url: str
    notify_url: str
    #: Everything the door told the decision cache, in order.
    calls: list[tuple[str, str]]
    audit_file: Path
    manager: SubscriptionManager
    session: aiohttp.ClientSession
    auditor: Auditor
    fail_callback: list[bool] = field(default_factory=lambda: [False])

    async def consent(self, bsn: str, holder_ura: str, permit: bool) -> dict[str, Any]:
        async with self.session.put(f"{self.mitz_url}{CONSENT_ADMIN_ROUTE}",
                                    json={"bsn": bsn, "holder_ura": holder_ura, "permit": permit}) as resp:
            assert resp.status == 200, await resp.text()
            answer: dict[str, Any] = await resp.json()
            return answer

    async def post(self, body: bytes | Any, content_type: str | None = FHIR_JSON,
                   **kwargs: Any) -> tuple[int, dict[str, Any] | None, aiohttp.ClientResponse]:
        headers = {"Content-Type": content_type} if content_type is not None else {}
        data = body if not isinstance(body, dict) else json.dumps(body).encode()
        async with self.session.post(self.notify_url, data=data, headers=headers, **kwargs) as resp:
            raw = await resp.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                parsed = None
            return resp.status, parsed, resp


@pytest.fixture
async def duo(tmp_path: Path) -> AsyncIterator[Duo]:
    """DUO representing H1 only, with the notify door; Mitz's subscriptions can name H1 and H2."""
    sim = MitzSimulator(NET, tlb_home_community_id="urn:oid:2.16.528.1.1007.99.1")
    async with TestServer(sim.app(), host="127.0.0.1", port=0) as server:
        mitz_url = str(server.make_url("")).rstrip("/")
        base = make_config(tmp_path, mitz_port=server.port or 0, hospitals=[_hospital(H1)])
        cfg = _with_mitz(base, notify_path=NOTIFY_PATH)
        calls: list[tuple[str, str]] = []
        fail = [False]

        def on_consent_change(bsn: str, holder_ura: str) -> None:
            if fail[0]:
                raise RuntimeError("cache unavailable")
            calls.append((bsn, holder_ura))

        # The gateway mounts the door itself, wired to its Mitz client's cache; the test watches
        # that wire by standing in for the client's eviction method.
        gateway = Gateway(cfg)
        gateway.mitz.consent_changed = on_consent_change  # type: ignore[method-assign]
        auditor = gateway.auditor
        await gateway.start()
        notify_url = f"{gateway.http_url}{NOTIFY_PATH}"
        # The subscriber knows both hospitals, so a notification for H2 reaches a DUO not representing it.
        sub_cfg = _with_mitz(
            make_config(tmp_path / "subscriber", mitz_port=server.port or 0,
                        hospitals=[_hospital(H1), _hospital(H2)]),
            subscriptions_url=f"{mitz_url}{SUBSCRIPTION_ROUTE}", notify_url=notify_url)
        manager = SubscriptionManager(sub_cfg, pacses={})  # only ensure() is used: no PACS is read
        async with aiohttp.ClientSession() as session:
            try:
                yield Duo(gateway, sim, mitz_url, notify_url, calls,
                          tmp_path / "storage" / "audit" / "audit.log", manager, session, auditor, fail)
            finally:
                await manager.close()
                await gateway.stop()


def _hospital_cfg(duo: Duo, ura: str) -> Any:
    found = duo.manager._config.hospital_by_ura(ura)
    assert found is not None
    return found


def _notification(bsn: str = ANNA.bsn, holder: str = H1.ura, permit: bool = True) -> dict[str, Any]:
    return build_notification(Notification(
        bsn=bsn, holder_ura=holder, holder_type="V6", date_time=datetime.now(UTC),
        statements=(ConsentStatement(provider_categories=("RPZAC104",), permit=permit),)))


async def _audit_events(duo: Duo, expected: int) -> list[etree._Element]:
    """The notification events (DCM 110110) in the gateway's audit file, once ``expected`` are there:
    the Auditor writes behind, so the file is polled rather than the Auditor stopped under the gateway."""
    deadline = asyncio.get_running_loop().time() + 5
    while True:
        records = parse_file_records(duo.audit_file.read_bytes()).records if duo.audit_file.exists() else []
        events = [e for e in (parse_xml(parse_message(r).msg) for r in records)
                  if e.xpath("string(EventIdentification/EventID/@csd-code)") == "110110"]
        if len(events) >= expected or asyncio.get_running_loop().time() > deadline:
            return events
        await asyncio.sleep(0.05)


# ------------------------------------------------------------------------------------------ the real flow


async def test_consent_change_at_mitz_reaches_the_cache(duo: Duo) -> None:
    outcome = await duo.manager.ensure(BRAM.bsn, _hospital_cfg(duo, H1.ura))
    assert outcome.status == "created"
    assert [s.endpoint for s in duo.sim.subscriptions] == [duo.notify_url]

    with capture_logs() as logs:
        granted = await duo.consent(BRAM.bsn, H1.ura, True)
        withdrawn = await duo.consent(BRAM.bsn, H1.ura, False)
    # The sim counts a delivery only on a 2xx; the callback had run by the time that answer came.
    assert (granted["notified"], granted["failed"]) == (1, 0)
    assert (withdrawn["notified"], withdrawn["failed"]) == (1, 0)
    assert duo.calls == [(BRAM.bsn, H1.ura), (BRAM.bsn, H1.ura)]
    decisions = [e["decisions"] for e in logs if e["event"] == "mitz_notification"]
    assert decisions == ["permit", "deny"]
    for bsn in BSNS:
        assert bsn not in repr(logs)


async def test_callback_failure_is_not_acknowledged(duo: Duo) -> None:
    """The answer depends on the eviction: Mitz must retry a change DUO could not apply."""
    await duo.manager.ensure(ANNA.bsn, _hospital_cfg(duo, H1.ura))
    duo.fail_callback[0] = True
    answer = await duo.consent(ANNA.bsn, H1.ura, False)
    assert (answer["notified"], answer["failed"]) == (0, 1)
    status, outcome, _ = await duo.post(_notification(ANNA.bsn))
    assert status == 500
    assert outcome is not None and outcome["issue"][0]["code"] == "exception"


async def test_notification_for_a_hospital_not_represented_is_acknowledged_and_ignored(duo: Duo) -> None:
    await duo.manager.ensure(CARLA.bsn, _hospital_cfg(duo, H2.ura))
    with capture_logs() as logs:
        answer = await duo.consent(CARLA.bsn, H2.ura, True)
    assert (answer["notified"], answer["failed"]) == (1, 0)
    assert duo.calls == []
    ignored = [e for e in logs if e["event"] == "mitz_notification_ignored"]
    assert [e["holder_ura"] for e in ignored] == [H2.ura]
    assert CARLA.bsn not in repr(logs)


# ------------------------------------------------------------------------------------------ direct posts


async def test_plain_application_json_is_accepted_and_answered_with_an_operation_outcome(duo: Duo) -> None:
    status, outcome, resp = await duo.post(_notification(permit=False), content_type="application/json")
    assert status == 200
    assert resp.content_type == FHIR_JSON
    assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
    assert outcome["issue"][0]["severity"] == "information"
    assert duo.calls == [(ANNA.bsn, H1.ura)]
    assert resp.headers.get("X-Request-ID")  # the app's middleware saw it
    assert f'route="{NOTIFY_PATH}"' in duo.gateway.metrics.render().decode()


def _bad_bundle() -> dict[str, Any]:
    bundle = _notification()
    patient = next(e for e in bundle["entry"] if e["resource"]["resourceType"] == "Patient")
    patient["resource"]["identifier"][0]["value"] = "900186022"  # fails the 11-proef
    return bundle


def _two_patients() -> dict[str, Any]:
    bundle = _notification()
    extra = next(e for e in _notification(BRAM.bsn)["entry"] if e["resource"]["resourceType"] == "Patient")
    bundle["entry"].append(extra)
    return bundle


@pytest.mark.parametrize("body,code", [
    (b"{not json", "structure"),
    (b"\xff\xfe{}", "structure"),
    (b"[]", "structure"),
    (json.dumps({"resourceType": "Patient"}).encode(), "structure"),
    (_bad_bundle(), "invalid"),
    (_two_patients(), "invalid"),
    ({"resourceType": "Bundle", "type": "searchset", "entry": []}, "invalid"),
])
async def test_malformed_notifications_are_400_operation_outcomes(duo: Duo, body: Any, code: str) -> None:
    with capture_logs() as logs:
        status, outcome, resp = await duo.post(body)
    assert status == 400
    assert resp.content_type == FHIR_JSON
    assert outcome is not None and outcome["resourceType"] == "OperationOutcome"
    assert (outcome["issue"][0]["severity"], outcome["issue"][0]["code"]) == ("error", code)
    assert duo.calls == []
    assert [e["status"] for e in logs if e["event"] == "mitz_notification_rejected"] == [400]
    for bsn in [*BSNS, "900186022"]:
        assert bsn not in repr(logs)
        assert bsn not in json.dumps(outcome)


@pytest.mark.parametrize("content_type,needle", [
    ("application/fhir+xml", "XML notifications are not supported"),
    ("application/xml", "XML notifications are not supported"),
    ("text/plain", "Content-Type must be application/fhir+json"),
    (None, "Content-Type must be application/fhir+json"),
    ("application/fhir+json; charset=iso-8859-1", "UTF-8"),
])
async def test_unsupported_media_types_are_415(duo: Duo, content_type: str | None, needle: str) -> None:
    status, outcome, _ = await duo.post(json.dumps(_notification()).encode(), content_type=content_type)
    assert status == 415
    assert outcome is not None and needle in outcome["issue"][0]["diagnostics"]
    assert duo.calls == []


async def test_utf8_charset_is_accepted(duo: Duo) -> None:
    status, _, _ = await duo.post(_notification(), content_type="application/fhir+json; charset=UTF-8")
    assert status == 200
    assert duo.calls == [(ANNA.bsn, H1.ura)]


async def test_oversized_bodies_are_413(duo: Duo) -> None:
    padding = {**_notification(), "padding": "x" * DEFAULT_MAX_BODY_BYTES}
    status, outcome, _ = await duo.post(padding)
    assert status == 413
    assert outcome is not None and outcome["issue"][0]["code"] == "too-costly"

    async def chunked() -> AsyncIterator[bytes]:  # no Content-Length: caught while reading
        for _ in range(DEFAULT_MAX_BODY_BYTES // 4096 + 2):
            yield b" " * 4096

    status, _, _ = await duo.post(chunked())
    assert status == 413
    assert duo.calls == []


async def test_every_notification_is_audited(duo: Duo) -> None:
    await duo.post(_notification(ANNA.bsn, H1.ura))
    await duo.post(_notification(BRAM.bsn, H2.ura))  # not represented
    await duo.post(b"{not json")
    events = await _audit_events(duo, 3)
    assert len(events) == 3
    for event in events:
        assert event.xpath("string(EventIdentification/EventID/@csd-code)") == "110110"
        assert event.xpath("string(EventIdentification/@EventActionCode)") == "U"
        assert event.xpath("string(EventIdentification/EventTypeCode/@csd-code)") == "MITZ-NOTIFY"
        assert event.xpath("ActiveParticipant[@UserIsRequestor='true']/@UserID") == ["127.0.0.1"]
        # Without notify_url in the door's config the endpoint is named by its path.
        assert event.xpath("ActiveParticipant[@UserIsRequestor='false']/@UserID") == [NOTIFY_PATH]
    acted, ignored, rejected = events
    patient = "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']/@ParticipantObjectID"
    assert acted.xpath(patient) == [bsn_cx(ANNA.bsn)]
    assert ignored.xpath(patient) == [bsn_cx(BRAM.bsn)]
    assert rejected.xpath(patient) == []
    assert [e.xpath("string(EventIdentification/@EventOutcomeIndicator)") for e in events] == ["0", "0", "4"]
    results = [e.xpath("string(ParticipantObjectIdentification/ParticipantObjectDetail"
                       "[@type='MitzResult']/@value)") for e in events]
    assert [base64.b64decode(str(r)).decode() for r in results] == ["permit", "ignored", "rejected"]
