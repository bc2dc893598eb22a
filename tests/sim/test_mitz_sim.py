"""The Mitz simulator over real HTTP on 127.0.0.1, driven with the gateway's own codec."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from lxml import etree
from structlog.testing import capture_logs

from duo_gateway.mitz.codec import MitzAnswerError, MitzFault
from duo_gateway.mitz.fhir import build_subscription, parse_notification
from duo_gateway.mitz.xacml import ClosedAnswer, ClosedQuestion, build_closed_question, parse_closed_answer
from duo_gateway.mitz.xcpd import Location, OpenQuestion, build_open_question, parse_open_answer
from duo_gateway.sim.behaviour import MitzMisbehaviour
from duo_gateway.sim.config import SimMitz, SimNetworkConfig, default_network
from duo_gateway.sim.mitz import (
    CLOSED_ROUTE,
    CONSENT_ADMIN_ROUTE,
    OPEN_ROUTE,
    SUBSCRIPTION_ROUTE,
    MitzSimulator,
)
from duo_gateway.soap.envelope import SoapFault, new_message_id, parse_envelope

ALL = "999911120"  # consent everywhere
PARTIAL = "900186021"  # first TLB hospital and the first institution of each community
NONE = "123456782"  # no consent
UNKNOWN = "100000009"  # valid BSN, not in the network
HOSP1, HOSP2 = "00010001", "00010002"
NOORD1, NOORD2, ZUID1 = "00020011", "00020012", "00020021"
TLB_HC = "urn:oid:2.16.528.1.1007.99.30000"
SOAP_CT = "application/soap+xml; charset=UTF-8"


@dataclass
class Mitz:
    sim: MitzSimulator
    client: TestClient[web.Request, web.Application]

    def url(self, path: str) -> str:
        return str(self.client.make_url(path))

    async def closed(
        self, bsn: str, holder_ura: str, categories: tuple[str, ...] = ("GGC002",)
    ) -> tuple[int, ClosedAnswer]:
        q = ClosedQuestion(
            bsn=bsn,
            holder_ura=holder_ura,
            holder_type="V6",
            categories=categories,
            requester_uzi="000095254",
            requester_role="01.039",
            requester_ura="00000666",
            requester_type="V6",
        )
        message_id = new_message_id()
        data = build_closed_question(q, self.url(CLOSED_ROUTE), message_id)
        resp = await self.client.post(CLOSED_ROUTE, data=data, headers={"Content-Type": SOAP_CT})
        return resp.status, parse_closed_answer(await resp.read(), message_id, len(categories))

    def open_request(self, bsn: str) -> tuple[str, bytes]:
        q = OpenQuestion(
            bsn=bsn,
            requester_uzi="000095254",
            requester_role="01.039",
            requester_ura="00000666",
            requester_type="V6",
            issuer="urn:oid:2.16.528.1.1007.99.30000",
        )
        message_id = new_message_id()
        return message_id, build_open_question(q, self.url(OPEN_ROUTE), message_id, datetime.now(UTC))

    async def open(self, bsn: str) -> list[Location]:
        message_id, data = self.open_request(bsn)
        resp = await self.client.post(OPEN_ROUTE, data=data, headers={"Content-Type": SOAP_CT})
        return parse_open_answer(await resp.read(), message_id)

    async def behave(self, **kwargs: Any) -> None:
        resp = await self.client.put("/admin/behaviour", json=kwargs)
        assert resp.status == 200, await resp.text()


async def _start(sim: MitzSimulator) -> AsyncIterator[Mitz]:
    async with TestServer(sim.app(), host="127.0.0.1", port=0) as server, TestClient(server) as client:
        yield Mitz(sim, client)


@pytest.fixture
async def mitz() -> AsyncIterator[Mitz]:
    async for m in _start(MitzSimulator(default_network(), tlb_home_community_id=TLB_HC)):
        yield m


@dataclass
class Receiver:
    url: str
    bodies: list[Any]
    content_types: list[str]


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    """A stand-in for the gateway's notify endpoint, on its own port."""
    bodies: list[Any] = []
    content_types: list[str] = []

    async def notify(request: web.Request) -> web.Response:
        content_types.append(request.content_type)
        bodies.append(json.loads(await request.read()))
        return web.Response(status=200)

    app = web.Application()
    app.router.add_post("/mitz/notify", notify)
    async with TestServer(app, host="127.0.0.1", port=0) as server:
        yield Receiver(str(server.make_url("/mitz/notify")), bodies, content_types)


# ------------------------------------------------------------------------------ closed question


@pytest.mark.parametrize(
    "bsn,holder,expected",
    [
        (ALL, HOSP2, "Permit"),
        (ALL, ZUID1, "Permit"),
        (PARTIAL, HOSP1, "Permit"),
        (PARTIAL, NOORD1, "Permit"),
        (PARTIAL, HOSP2, "Deny"),
        (PARTIAL, NOORD2, "Deny"),
        (NONE, HOSP1, "Deny"),
        (ALL, "00099999", "Deny"),  # a holder the patient never consented to
        (UNKNOWN, HOSP1, "NotApplicable"),
    ],
)
async def test_closed_question_follows_consent(mitz: Mitz, bsn: str, holder: str, expected: str) -> None:
    status, answer = await mitz.closed(bsn, holder)
    assert status == 200
    assert answer.reason is None
    assert answer.decisions == (expected,)
    assert answer.permitted is (expected == "Permit")


async def test_closed_question_per_category(mitz: Mitz) -> None:
    _, answer = await mitz.closed(PARTIAL, HOSP1, ("GGC002", "GGC013", "GGC999"))
    # GGC002 consent covers the lower GGC013; an unrecognised category cannot be evaluated.
    assert answer.decisions == ("Permit", "Permit", "Indeterminate")
    assert not answer.permitted


# ------------------------------------------------------------------------------ open question


async def test_open_question_lists_consented_locations(mitz: Mitz) -> None:
    locations = await mitz.open(ALL)
    by_ura = {loc.holder_ura: loc for loc in locations}
    assert sorted(by_ura) == sorted([HOSP1, HOSP2, NOORD1, NOORD2, ZUID1])
    assert by_ura[NOORD2].home_community_id == "urn:oid:2.16.528.1.1007.99.20001"
    assert by_ura[NOORD2].source_id == "2.16.528.1.1007.99.20001.1"
    assert by_ura[ZUID1].home_community_id == "urn:oid:2.16.528.1.1007.99.20002"
    assert by_ura[HOSP2].home_community_id == TLB_HC
    assert by_ura[HOSP2].source_id == "2.16.528.1.1007.99.10002.1"
    assert all(
        (loc.patient_root, loc.patient_extension) == ("2.16.840.1.113883.2.4.6.3", ALL) for loc in locations
    )


async def test_open_question_partial_and_none(mitz: Mitz) -> None:
    assert sorted(loc.holder_ura for loc in await mitz.open(PARTIAL)) == [HOSP1, NOORD1, ZUID1]
    assert await mitz.open(NONE) == []
    assert await mitz.open(UNKNOWN) == []


async def test_open_question_without_tlb_community_lists_only_xca_holders() -> None:
    async for m in _start(MitzSimulator(default_network())):
        assert sorted(loc.holder_ura for loc in await m.open(ALL)) == [NOORD1, NOORD2, ZUID1]


# ------------------------------------------------------------------------- subscriptions, notifications


def _subscription(endpoint: str, bsn: str = PARTIAL, ura: str = HOSP2) -> dict[str, Any]:
    return build_subscription(bsn, ura, "V6", endpoint, TLB_HC, "2.16.528.1.1007.99.10002.1")


async def test_subscription_201_then_202(mitz: Mitz) -> None:
    body = _subscription("https://gw.example/notify")
    first = await mitz.client.post(
        SUBSCRIPTION_ROUTE, json=body, headers={"Content-Type": "application/fhir+json"}
    )
    assert first.status == 201
    location = first.headers["Location"]
    assert location.startswith(SUBSCRIPTION_ROUTE + "/")
    created = await first.json(content_type=None)
    assert created["id"] == location.rsplit("/", 1)[1]
    assert created["status"] == "active"

    again = await mitz.client.post(
        SUBSCRIPTION_ROUTE, json=body, headers={"Content-Type": "application/fhir+json"}
    )
    assert again.status == 202
    assert again.headers["Location"] == location

    listing = await (await mitz.client.get(SUBSCRIPTION_ROUTE)).json(content_type=None)
    assert listing["resourceType"] == "Bundle"
    assert [e["resource"]["id"] for e in listing["entry"]] == [created["id"]]
    one = await mitz.client.get(location)
    assert one.status == 200


@pytest.mark.parametrize(
    "mutate,status",
    [
        (lambda s: s["extension"].append({"url": "http://example.org/x", "valueString": "y"}), 400),
        (lambda s: s.update(id="client-chosen"), 400),
        (lambda s: s["channel"].update(payload="application/fhir+xml"), 422),
    ],
)
async def test_subscription_refusals(mitz: Mitz, mutate: Any, status: int) -> None:
    body = _subscription("https://gw.example/notify")
    mutate(body)
    resp = await mitz.client.post(
        SUBSCRIPTION_ROUTE, json=body, headers={"Content-Type": "application/fhir+json"}
    )
    assert resp.status == status
    assert (await resp.json(content_type=None))["resourceType"] == "OperationOutcome"
    assert mitz.sim.subscriptions == []


async def test_consent_change_notifies_subscriber(mitz: Mitz, receiver: Receiver) -> None:
    resp = await mitz.client.post(SUBSCRIPTION_ROUTE, json=_subscription(receiver.url))
    assert resp.status == 201
    # A subscriber for another holder of the same patient must not hear about HOSP2.
    other = await mitz.client.post(SUBSCRIPTION_ROUTE, json=_subscription(receiver.url + "?other", ura=HOSP1))
    assert other.status == 201

    _, before = await mitz.closed(PARTIAL, HOSP2)
    assert before.decisions == ("Deny",)

    put = await mitz.client.put(
        CONSENT_ADMIN_ROUTE, json={"bsn": PARTIAL, "holder_ura": HOSP2, "permit": True}
    )
    assert put.status == 200
    assert await put.json() == {
        "holder_ura": HOSP2,
        "permit": True,
        "changed": True,
        "notified": 1,
        "failed": 0,
    }
    assert len(receiver.bodies) == 1
    assert receiver.content_types == ["application/fhir+json"]
    note = parse_notification(receiver.bodies[0])
    assert (note.bsn, note.holder_ura, note.holder_type) == (PARTIAL, HOSP2, "V6")
    assert note.permits("RPZAC104")

    _, after = await mitz.closed(PARTIAL, HOSP2)
    assert after.permitted
    assert HOSP2 in [loc.holder_ura for loc in await mitz.open(PARTIAL)]
    listed = await (await mitz.client.get(CONSENT_ADMIN_ROUTE)).json()
    assert {"bsn": PARTIAL, "holder_ura": HOSP2, "permit": True} in listed["consents"]

    put = await mitz.client.put(
        CONSENT_ADMIN_ROUTE, json={"bsn": PARTIAL, "holder_ura": HOSP2, "permit": False}
    )
    assert (await put.json())["notified"] == 1
    revoked = parse_notification(receiver.bodies[1])
    assert not revoked.permits("RPZAC104")
    assert receiver.bodies[1]["entry"][0]["resource"]["status"] == "inactive"
    _, final = await mitz.closed(PARTIAL, HOSP2)
    assert final.decisions == ("Deny",)


async def test_unreachable_subscriber_is_not_fatal(mitz: Mitz) -> None:
    # Port 9 on loopback: nothing listens there, so the connection is refused at once.
    resp = await mitz.client.post(SUBSCRIPTION_ROUTE, json=_subscription("http://127.0.0.1:9/notify"))
    assert resp.status == 201
    put = await mitz.client.put(
        CONSENT_ADMIN_ROUTE, json={"bsn": PARTIAL, "holder_ura": HOSP2, "permit": True}
    )
    assert put.status == 200
    assert (await put.json())["failed"] == 1
    _, answer = await mitz.closed(PARTIAL, HOSP2)
    assert answer.permitted


@pytest.mark.parametrize(
    "body",
    [
        {"bsn": "900186022", "holder_ura": HOSP2, "permit": True},
        {"bsn": PARTIAL, "holder_ura": "123", "permit": True},
        {"bsn": PARTIAL, "holder_ura": HOSP2, "permit": "yes"},
        {"bsn": PARTIAL, "holder_ura": HOSP2},
    ],
)
async def test_admin_consent_validation(mitz: Mitz, body: dict[str, Any]) -> None:
    resp = await mitz.client.put(CONSENT_ADMIN_ROUTE, json=body)
    assert resp.status == 400
    _, answer = await mitz.closed(PARTIAL, HOSP2)
    assert answer.decisions == ("Deny",)


# ------------------------------------------------------------------------------ misbehaviour


async def test_delay_is_observable(mitz: Mitz) -> None:
    await mitz.behave(delay_ms=400)
    started = time.monotonic()
    _, answer = await mitz.closed(PARTIAL, HOSP1)
    assert time.monotonic() - started >= 0.4
    assert answer.permitted
    message_id = new_message_id()
    q = ClosedQuestion(
        bsn=PARTIAL,
        holder_ura=HOSP1,
        holder_type="V6",
        requester_uzi="1",
        requester_role="01.039",
        requester_ura="00000666",
        requester_type="V6",
    )
    data = build_closed_question(q, mitz.url(CLOSED_ROUTE), message_id)
    with pytest.raises(asyncio.TimeoutError):
        await mitz.client.post(
            CLOSED_ROUTE,
            data=data,
            headers={"Content-Type": SOAP_CT},
            timeout=aiohttp.ClientTimeout(total=0.1),
        )


async def test_down_refuses_the_connection(mitz: Mitz) -> None:
    await mitz.behave(down=True)
    with pytest.raises(aiohttp.ClientError):
        await mitz.closed(PARTIAL, HOSP1)
    with pytest.raises(aiohttp.ClientError):
        await mitz.open(PARTIAL)
    await mitz.behave(down=False)
    _, answer = await mitz.closed(PARTIAL, HOSP1)
    assert answer.permitted


async def test_malformed_answers_fail_closed(mitz: Mitz) -> None:
    await mitz.behave(malformed=True)
    status, answer = await mitz.closed(PARTIAL, HOSP1)  # consented: would be Permit
    assert status == 200
    assert not answer.permitted
    assert answer.reason is not None and "malformed" in answer.reason
    with pytest.raises(MitzAnswerError):
        await mitz.open(PARTIAL)


async def test_fault_answers(mitz: Mitz) -> None:
    await mitz.behave(fault=True)
    status, answer = await mitz.closed(PARTIAL, HOSP1)
    assert status == 500
    assert not answer.permitted
    assert answer.reason is not None and "Receiver" in answer.reason
    with pytest.raises(MitzFault) as exc_info:
        await mitz.open(PARTIAL)
    assert exc_info.value.code == "Receiver"


@pytest.mark.parametrize("forced", ["Indeterminate", "Deny", "NotApplicable"])
async def test_force_decision_overrides_consent(mitz: Mitz, forced: str) -> None:
    await mitz.behave(force_decision=forced)
    _, answer = await mitz.closed(ALL, HOSP1, ("GGC002", "GGC012"))
    assert answer.decisions == (forced, forced)
    assert answer.reason is None
    assert not answer.permitted


async def test_misbehaviour_from_config() -> None:
    net = default_network()
    net = SimNetworkConfig.model_validate(
        {
            **net.model_dump(),
            "mitz": SimMitz(behaviour=MitzMisbehaviour(force_decision="Permit")).model_dump(),
        }
    )
    async for m in _start(MitzSimulator(net)):
        _, answer = await m.closed(NONE, HOSP1)
        assert answer.decisions == ("Permit",)


# ------------------------------------------------------------------------------ request validation


async def _fault_of(resp: aiohttp.ClientResponse) -> SoapFault:
    assert resp.headers["Content-Type"].startswith("application/soap+xml")
    with pytest.raises(SoapFault) as exc_info:
        parse_envelope(await resp.read())
    return exc_info.value


async def test_soap11_is_a_version_mismatch(mitz: Mitz) -> None:
    message_id = new_message_id()
    q = ClosedQuestion(
        bsn=PARTIAL,
        holder_ura=HOSP1,
        holder_type="V6",
        requester_uzi="1",
        requester_role="01.039",
        requester_ura="00000666",
        requester_type="V6",
    )
    data = build_closed_question(q, mitz.url(CLOSED_ROUTE), message_id).replace(
        b"http://www.w3.org/2003/05/soap-envelope", b"http://schemas.xmlsoap.org/soap/envelope/"
    )
    resp = await mitz.client.post(
        CLOSED_ROUTE, data=data, headers={"Content-Type": "text/xml; charset=utf-8", "SOAPAction": '""'}
    )
    assert resp.status == 500  # SOAP 1.2 Part 2 §7.5.1.2: VersionMismatch is a 500
    body = await resp.read()
    upgrade = etree.fromstring(body).find(
        "{http://www.w3.org/2003/05/soap-envelope}Header/{http://www.w3.org/2003/05/soap-envelope}Upgrade"
    )
    assert upgrade is not None
    fault = await _fault_of(resp)
    assert fault.code == "VersionMismatch"


def _question_bytes(mitz: Mitz, bsn: str = PARTIAL) -> bytes:
    q = ClosedQuestion(
        bsn=bsn,
        holder_ura=HOSP1,
        holder_type="V6",
        requester_uzi="1",
        requester_role="01.039",
        requester_ura="00000666",
        requester_type="V6",
    )
    return build_closed_question(q, mitz.url(CLOSED_ROUTE), "urn:uuid:req-1")


@pytest.mark.parametrize(
    "case",
    [
        "content_type",
        "not_xml",
        "not_soap",
        "dtd",
        "invalid_bsn",
        "wrong_action",
        "no_message_id",
        "missing_attr",
    ],
)
async def test_bad_requests_get_sender_faults(mitz: Mitz, case: str) -> None:
    data, content_type = _question_bytes(mitz), SOAP_CT
    if case == "content_type":
        content_type = "text/plain"
    elif case == "not_xml":
        data = b"this is not xml"
    elif case == "not_soap":
        data = b"<?xml version='1.0'?><Request xmlns='urn:x'/>"
    elif case == "dtd":
        data = b'<!DOCTYPE x [<!ENTITY e "e">]>' + data.split(b"?>", 1)[1]
    elif case == "invalid_bsn":
        data = data.replace(PARTIAL.encode(), b"900186022")
    elif case == "wrong_action":
        data = data.replace(
            b">XACMLAuthorizationDecisionQueryRequest<", b">urn:ihe:iti:2009:PatientLocationQuery<"
        )
    elif case == "no_message_id":
        data = data.replace(b"<a:MessageID>urn:uuid:req-1</a:MessageID>", b"")
    elif case == "missing_attr":
        data = data.replace(b'code="01.039"', b"")
    resp = await mitz.client.post(CLOSED_ROUTE, data=data, headers={"Content-Type": content_type})
    assert resp.status == 400
    fault = await _fault_of(resp)
    assert fault.code == "Sender"
    if case == "wrong_action":
        assert fault.subcode == ("http://www.w3.org/2005/08/addressing", "ActionNotSupported")
    assert PARTIAL not in fault.reason and "900186022" not in fault.reason


async def test_open_question_without_assertion_is_invalid_security(mitz: Mitz) -> None:
    _, data = mitz.open_request(PARTIAL)
    root = etree.fromstring(data)
    header = root.find("{http://www.w3.org/2003/05/soap-envelope}Header")
    assert header is not None
    security = header.find(
        "{http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd}Security"
    )
    assert security is not None
    header.remove(security)
    resp = await mitz.client.post(OPEN_ROUTE, data=etree.tostring(root), headers={"Content-Type": SOAP_CT})
    assert resp.status == 400
    fault = await _fault_of(resp)
    assert fault.code == "Sender"
    assert fault.subcode is not None and fault.subcode[1] == "InvalidSecurity"


async def test_unknown_must_understand_header(mitz: Mitz) -> None:
    data = _question_bytes(mitz).replace(
        b"</s:Header>", b'<x:Extra xmlns:x="urn:example" s:mustUnderstand="1">?</x:Extra></s:Header>'
    )
    resp = await mitz.client.post(CLOSED_ROUTE, data=data, headers={"Content-Type": SOAP_CT})
    assert (await _fault_of(resp)).code == "MustUnderstand"


# ------------------------------------------------------------------------------ logging


async def test_logs_never_carry_a_bsn(mitz: Mitz, receiver: Receiver) -> None:
    with capture_logs() as logs:
        await mitz.closed(PARTIAL, HOSP1)
        await mitz.closed(UNKNOWN, HOSP1)
        await mitz.open(ALL)
        await mitz.client.post(SUBSCRIPTION_ROUTE, json=_subscription(receiver.url))
        await mitz.client.put(CONSENT_ADMIN_ROUTE, json={"bsn": PARTIAL, "holder_ura": HOSP2, "permit": True})
        await mitz.client.post(
            CLOSED_ROUTE,
            data=_question_bytes(mitz).replace(PARTIAL.encode(), b"900186022"),
            headers={"Content-Type": SOAP_CT},
        )
        await mitz.behave(malformed=True)
        await mitz.closed(NONE, HOSP1)
    events = [e["event"] for e in logs]
    assert {"mitz.closed", "mitz.open", "mitz.subscription", "mitz.consent_changed", "mitz.fault"} <= set(
        events
    )
    closed = next(e for e in logs if e["event"] == "mitz.closed")
    assert closed["holder_ura"] == HOSP1 and closed["decisions"] == ["Permit"]
    text = repr(logs)
    for bsn in (PARTIAL, UNKNOWN, ALL, NONE, "900186022"):
        assert bsn not in text
