"""The Mitz client against the Mitz simulator over real HTTP (and TLS): fail-closed in every way."""

from __future__ import annotations

import asyncio
import base64
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from structlog.testing import capture_logs

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import Peer
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.mitz import MitzConfig
from duo_gateway.config.tls import ClientTls
from duo_gateway.consent import ConsentGate, Permit, Refusal
from duo_gateway.mitz.client import ConsentDecision, MitzClient
from duo_gateway.mitz.xacml import ClosedQuestion, build_closed_answer, parse_closed_question
from duo_gateway.mitz.xcpd import OpenQuestion
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.behaviour import MitzMisbehaviour
from duo_gateway.sim.config import default_network
from duo_gateway.sim.http import BEHAVIOUR_KEY
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.soap.envelope import parse_envelope
from tests.support.pki import Pki

ALL, PARTIAL, NONE, UNKNOWN = "999911120", "900186021", "123456782", "100000009"
HOSP1, HOSP2 = "00010001", "00010002"
TLB_HC = "urn:oid:2.16.528.1.1007.99.1"
GATEWAY = Peer(user_id="DUO_GATEWAY", host="127.0.0.1")


def question(bsn: str = ALL, holder: str = HOSP1, **kw: Any) -> ClosedQuestion:
    base: dict[str, Any] = {"bsn": bsn, "holder_ura": holder, "holder_type": "V6",
                            "requester_uzi": "000095254", "requester_role": "01.039",
                            "requester_ura": "00000666", "requester_type": "V6"}
    return ClosedQuestion(**{**base, **kw})


@dataclass
class MitzServer:
    sim: MitzSimulator
    app: web.Application
    base: str
    requests: list[str] = field(default_factory=list)

    def behave(self, **kw: Any) -> None:
        self.app[BEHAVIOUR_KEY].value = MitzMisbehaviour(**kw)

    def config(self, **kw: Any) -> MitzConfig:
        return MitzConfig.model_validate({
            "closed_url": f"{self.base}/geslotenautorisatievraag/xacml3",
            "open_url": f"{self.base}/openautorisatievraag",
            "subscriptions_url": f"{self.base}/abonnementen/fhir/Subscription", "timeout_s": 1.0, **kw})


async def serve(app: web.Application, ssl_ctx: ssl.SSLContext | None = None) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ssl_ctx).start()
    return runner, int(runner.addresses[0][1])


def counting_app(sim: MitzSimulator, requests: list[str]) -> web.Application:
    app = sim.app()

    @web.middleware
    async def count(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]],
                    ) -> web.StreamResponse:
        requests.append(request.path)
        return await handler(request)

    app.middlewares.insert(0, count)
    return app


@pytest.fixture
async def mitz() -> AsyncIterator[MitzServer]:
    sim = MitzSimulator(default_network(), tlb_home_community_id=TLB_HC)
    requests: list[str] = []
    app = counting_app(sim, requests)
    runner, port = await serve(app)
    yield MitzServer(sim, app, f"http://127.0.0.1:{port}", requests)
    await runner.cleanup()


async def ask(cfg: MitzConfig, q: ClosedQuestion, **kw: Any) -> ConsentDecision:
    client = MitzClient(cfg, gateway=GATEWAY, **kw)
    try:
        return await client.closed_question(q)
    finally:
        await client.close()


# -- every decision value -------------------------------------------------------------------------

async def test_permit_only_for_consented_holder(mitz: MitzServer) -> None:
    cfg = mitz.config()
    permit = await ask(cfg, question(ALL, HOSP2))
    assert permit == ConsentDecision(True, ("Permit",), None, "mitz")
    deny = await ask(cfg, question(PARTIAL, HOSP2))
    assert (deny.permitted, deny.decisions, deny.summary) == (False, ("Deny",), "Deny")
    assert deny.reason == "Mitz decision: GGC002=Deny"
    na = await ask(cfg, question(UNKNOWN, HOSP1))
    assert (na.permitted, na.decisions) == (False, ("NotApplicable",))
    mitz.behave(force_decision="Indeterminate")
    ind = await ask(cfg, question(ALL, HOSP1))
    assert (ind.permitted, ind.decisions, ind.summary) == (False, ("Indeterminate",), "Indeterminate")


async def test_every_category_must_be_permitted(mitz: MitzServer) -> None:
    """An unknown category is Indeterminate at the sim: one non-Permit spoils the whole answer."""
    d = await ask(mitz.config(), question(ALL, HOSP1, categories=("GGC002", "GGC999")))
    assert d.decisions == ("Permit", "Indeterminate")
    assert not d.permitted


# -- every failure mode fails closed --------------------------------------------------------------

FAILURES: dict[str, dict[str, Any]] = {
    "fault": {"fault": True},
    "malformed": {"malformed": True},
    "down": {"down": True},
    "timeout": {"delay_ms": 1500},
}


@pytest.mark.parametrize("mode", FAILURES)
async def test_failure_modes_are_refusals(mitz: MitzServer, mode: str) -> None:
    mitz.behave(**FAILURES[mode])
    d = await ask(mitz.config(), question(ALL, HOSP1))
    assert not d.permitted
    assert d.source == "error"
    assert d.reason
    expected = {"fault": "SOAP fault Receiver", "malformed": "malformed XML", "down": "Mitz",
                "timeout": "Mitz timeout"}[mode]
    assert expected in d.reason


async def test_unreachable_mitz_is_a_refusal() -> None:
    from duo_gateway.daemon import free_port

    base = f"http://127.0.0.1:{free_port()}"
    cfg = MitzConfig.model_validate({"closed_url": f"{base}/c", "open_url": f"{base}/o",
                                     "subscriptions_url": f"{base}/s"})
    d = await ask(cfg, question())
    assert (d.permitted, d.source) == (False, "error")
    assert "connect" in (d.reason or "")


class Liar:
    """A peer that says Permit in ways that must not count: wrong status, wrong RelatesTo."""

    def __init__(self, status: int, relates_to: str | None) -> None:
        self.status, self.relates_to = status, relates_to

    def app(self) -> web.Application:
        async def handle(request: web.Request) -> web.Response:
            env = parse_envelope(await request.read())
            relates = self.relates_to or env.addressing.message_id or ""
            parse_closed_question(env)
            return web.Response(status=self.status, body=build_closed_answer(["Permit"], relates),
                                content_type="application/soap+xml")

        app = web.Application()
        app.router.add_post("/{tail:.*}", handle)
        return app


@pytest.mark.parametrize(("status", "relates_to", "reason"), [
    (500, None, "HTTP 500"),
    (200, "urn:uuid:00000000-0000-0000-0000-000000000000", "RelatesTo"),
])
async def test_a_permit_that_does_not_belong_to_the_question_is_refused(
        status: int, relates_to: str | None, reason: str) -> None:
    runner, port = await serve(Liar(status, relates_to).app())
    try:
        base = f"http://127.0.0.1:{port}"
        cfg = MitzConfig.model_validate({"closed_url": f"{base}/c", "open_url": f"{base}/o",
                                         "subscriptions_url": f"{base}/s"})
        d = await ask(cfg, question())
    finally:
        await runner.cleanup()
    assert not d.permitted
    assert reason in (d.reason or "")


async def test_tls_failures_are_refusals(pki: Pki) -> None:
    sim = MitzSimulator(default_network())
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server_ctx.load_verify_locations(cafile=str(pki.ca_cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    runner, port = await serve(sim.app(), server_ctx)
    base = f"https://127.0.0.1:{port}"
    urls = {"closed_url": f"{base}/geslotenautorisatievraag/xacml3",
            "open_url": f"{base}/openautorisatievraag",
            "subscriptions_url": f"{base}/abonnementen/fhir/Subscription"}
    try:
        good = ClientTls(ca_file=pki.ca_cert, cert_file=pki.client.cert, key_file=pki.client.key)
        ok = await ask(MitzConfig.model_validate({**urls, "tls": good.model_dump()}), question())
        assert ok.permitted, ok.reason
        for tls in (ClientTls(ca_file=pki.ca_cert),                              # no client certificate
                    ClientTls(ca_file=pki.rogue_ca_cert, cert_file=pki.client.cert,  # server not trusted
                              key_file=pki.client.key),
                    ClientTls(ca_file=pki.ca_cert, cert_file=pki.rogue_client.cert,  # client not trusted
                              key_file=pki.rogue_client.key)):
            d = await ask(MitzConfig.model_validate({**urls, "tls": tls.model_dump()}), question())
            assert (d.permitted, d.source) == (False, "error"), tls
            assert d.reason and d.reason.startswith("Mitz ")
    finally:
        await runner.cleanup()


# -- caching, eviction, coalescing ----------------------------------------------------------------

class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_cache_is_off_by_default(mitz: MitzServer) -> None:
    client = MitzClient(mitz.config(), gateway=GATEWAY)
    for _ in range(3):
        assert (await client.closed_question(question())).source == "mitz"
    await client.close()
    assert len(mitz.requests) == 3


async def test_cache_expiry_and_key_covers_every_attribute(mitz: MitzServer) -> None:
    clock = FakeClock()
    client = MitzClient(mitz.config(cache_ttl_s=30), gateway=GATEWAY, clock=clock)
    try:
        assert (await client.closed_question(question())).source == "mitz"
        assert (await client.closed_question(question())).source == "cache"
        assert len(mitz.requests) == 1
        # any attribute differs -> a different question -> asked
        for variant in (question(requester_role="01.015"), question(requester_ura="00000667"),
                        question(purpose="COC"), question(holder_type="V5"),
                        question(requester_uzi="000095255"),
                        question(mandated_uzi="000095256"), question(requester_type="V5")):
            assert (await client.closed_question(variant)).source == "mitz"
        assert len(mitz.requests) == 8
        clock.now += 31
        assert (await client.closed_question(question())).source == "mitz"
        assert len(mitz.requests) == 9
    finally:
        await client.close()


async def test_notification_evicts_and_next_answer_is_fresh(mitz: MitzServer) -> None:
    client = MitzClient(mitz.config(cache_ttl_s=60), gateway=GATEWAY)
    try:
        assert (await client.closed_question(question(ALL, HOSP1))).permitted
        mitz.sim.set_consent(ALL, HOSP1, permit=False)      # patient withdraws consent in Mitz
        assert (await client.closed_question(question(ALL, HOSP1))).source == "cache"  # not yet told
        client.consent_changed(ALL, HOSP1)                   # the notification arrives
        fresh = await client.closed_question(question(ALL, HOSP1))
        assert (fresh.permitted, fresh.source) == (False, "mitz")
    finally:
        await client.close()


async def test_an_answer_in_flight_during_a_notification_is_not_cached(mitz: MitzServer) -> None:
    client = MitzClient(mitz.config(cache_ttl_s=60), gateway=GATEWAY)
    mitz.behave(delay_ms=300)
    try:
        pending = asyncio.create_task(client.closed_question(question()))
        await asyncio.sleep(0.1)
        client.consent_changed(ALL, HOSP1)
        assert (await pending).permitted            # the caller that asked first gets its answer
        mitz.behave()
        assert (await client.closed_question(question())).source == "mitz"  # but it was not cached
    finally:
        await client.close()


async def test_concurrent_identical_questions_are_coalesced(mitz: MitzServer) -> None:
    mitz.behave(delay_ms=200)
    client = MitzClient(mitz.config(), gateway=GATEWAY)
    try:
        results = await asyncio.gather(*(client.closed_question(question()) for _ in range(10)),
                                       client.closed_question(question(holder=HOSP2)))
    finally:
        await client.close()
    assert all(r.permitted for r in results)
    assert len(mitz.requests) == 2


async def test_a_cancelled_caller_does_not_cancel_the_shared_question(mitz: MitzServer) -> None:
    mitz.behave(delay_ms=200)
    client = MitzClient(mitz.config(), gateway=GATEWAY)
    try:
        first = asyncio.create_task(client.closed_question(question()))
        second = asyncio.create_task(client.closed_question(question()))
        await asyncio.sleep(0.05)
        first.cancel()
        assert (await second).permitted
    finally:
        await client.close()


# -- open question --------------------------------------------------------------------------------

def open_q(bsn: str) -> OpenQuestion:
    return OpenQuestion(bsn=bsn, requester_uzi="000095254", requester_role="01.039", requester_ura="00000666",
                        requester_type="V6", issuer="urn:oid:2.16.528.1.1007.99.1")


async def test_open_question_lists_locations(mitz: MitzServer) -> None:
    client = MitzClient(mitz.config(), gateway=GATEWAY)
    try:
        everywhere = await client.open_question(open_q(ALL))
        nowhere = await client.open_question(open_q(NONE))
        mitz.behave(fault=True)
        broken = await client.open_question(open_q(ALL))
        mitz.behave(malformed=True)
        garbage = await client.open_question(open_q(ALL))
    finally:
        await client.close()
    assert everywhere.ok and len(everywhere.locations) == 5
    assert {loc.holder_ura for loc in everywhere.locations} >= {HOSP1, HOSP2, "00020011"}
    assert {loc.home_community_id for loc in everywhere.locations if loc.holder_ura == HOSP1} == {TLB_HC}
    assert nowhere == type(nowhere)(True, ())
    assert not broken.ok and "HTTP 500" in (broken.reason or "")
    assert not garbage.ok and garbage.reason


# -- audit and logs -------------------------------------------------------------------------------

async def test_every_question_is_audited_and_logs_carry_no_bsn(mitz: MitzServer, tmp_path: Path) -> None:
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path)
    await auditor.start()
    metrics = Metrics()
    client = MitzClient(mitz.config(cache_ttl_s=10), gateway=GATEWAY, auditor=auditor, metrics=metrics)
    with capture_logs() as logs:
        await client.closed_question(question(ALL, HOSP1))
        await client.closed_question(question(ALL, HOSP1))
        await client.closed_question(question(PARTIAL, HOSP2))
        await client.open_question(open_q(ALL))
    await client.close()
    await auditor.stop()
    records = parse_file_records((tmp_path / "audit" / "audit.log").read_bytes()).records
    assert len(records) == 4
    text = b"\n".join(records)
    assert f"{ALL}^^^&amp;2.16.840.1.113883.2.4.6.3&amp;ISO".encode() in text
    # ParticipantObjectDetail values are xs:base64Binary in the DICOM audit schema
    assert base64.b64encode(b"Permit (cached)") in text and base64.b64encode(b"Deny") in text
    assert ALL not in repr(logs) and PARTIAL not in repr(logs)
    assert [entry["decision"] for entry in logs if entry["event"] == "mitz closed question"] == \
        ["Permit", "Permit", "Deny"]
    rendered = metrics.render().decode()
    assert 'duo_mitz_decisions_total{result="Permit",source="cache"} 1.0' in rendered
    assert 'duo_peer_requests_total{operation="closed-question",outcome="200",peer="mitz"} 2.0' in rendered


# -- end to end through a caller: nothing is disclosed without a Permit ---------------------------

GATE_MODES = ["permit", "deny", "notapplicable", "indeterminate", *FAILURES, "incomplete"]


@pytest.mark.parametrize("mode", GATE_MODES)
async def test_the_gate_discloses_only_on_permit(mitz: MitzServer, mode: str, tmp_path: Path) -> None:
    """A caller whose data source is a real simulated PACS query: it runs only on a Permit."""
    from duo_gateway.dicom.qr import QrClient
    from duo_gateway.sim.pacs import SimPacs
    from duo_gateway.sim.studies import generate_studies

    net = default_network()
    hospital = net.hospitals[0]
    bsn = {"deny": NONE, "notapplicable": UNKNOWN}.get(mode, ALL)
    if mode == "indeterminate":
        mitz.behave(force_decision="Indeterminate")
    elif mode in FAILURES:
        mitz.behave(**FAILURES[mode])
    produced: list[str] = []
    client = MitzClient(mitz.config(), gateway=GATEWAY)
    gate = ConsentGate(client, categories=("GGC002",))

    async def studies(permit: Permit) -> list[str]:
        assert permit.covers(bsn, hospital.ura)
        produced.append(bsn)
        from pydicom.dataset import Dataset

        q = Dataset()
        q.QueryRetrieveLevel, q.PatientID, q.StudyInstanceUID = "STUDY", bsn, ""
        found = await QrClient("DUO", "127.0.0.1", pacs.port, hospital.ae_title).find_all(q)
        return [str(d.StudyInstanceUID) for d in found]

    def form() -> ClosedQuestion:
        return question(bsn, hospital.ura, requester_uzi="" if mode == "incomplete" else "000095254")

    with SimPacs(hospital, tmp_path / "pacs") as pacs:
        pacs.preload([s for p in net.patients for s in generate_studies(p, hospital, 2, net.seed)])
        result = await gate.disclose(form, studies)
    await client.close()
    if mode == "permit":
        assert isinstance(result, list) and len(result) == 2
        assert produced == [ALL]
    else:
        assert isinstance(result, Refusal), result
        assert result.reason
        assert produced == []


def test_permits_cannot_be_forged() -> None:
    decision = ConsentDecision(True, ("Permit",), None, "mitz")
    with pytest.raises(TypeError):
        Permit(question(), decision, object())


# -- optional XML-DSig of the XACML request -------------------------------------------------------

async def test_signed_closed_question_verifies_and_is_answered(mitz: MitzServer, tmp_path: Path) -> None:
    """With sign_requests the Request is signed by xml:id (mitz.md §2.2); Mitz still answers it."""
    from datetime import UTC, datetime

    from duo_gateway.mitz.signing import request_signer
    from duo_gateway.soap.xml import parse_xml
    from duo_gateway.xmldsig import XML_ID, TrustStore, verify
    from tests.support.pki import make_pki

    rsa = make_pki(tmp_path / "pki", key_type="rsa")
    cfg = mitz.config(sign_requests=True, signing_key_file=str(rsa.client.key),
                      signing_cert_file=str(rsa.client.cert))
    seen: list[bytes] = []
    signer = request_signer(cfg)
    assert signer is not None

    def recording(request: bytes) -> bytes:
        seen.append(signer(request))
        return seen[-1]

    d = await ask(cfg, question(), signer=recording)
    assert d.permitted, d.reason
    root = parse_xml(seen[0])
    ns = {"q": "urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14",
          "x": "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17", "ds": "http://www.w3.org/2000/09/xmldsig#"}
    query = root.xpath("//q:XACMLAuthzDecisionQuery", namespaces=ns)[0]
    assert query[0].tag == "{http://www.w3.org/2000/09/xmldsig#}Signature"  # first child
    request = query.find("x:Request", ns)
    verified = verify(query[0], expected_referenced=request, id_attribute=XML_ID,
                      trusted=TrustStore.from_pem_files([rsa.ca_cert]), now=datetime.now(UTC))
    assert verified.digest_algorithm == "sha256"
    assert verified.signature_algorithm.endswith("rsa-sha256")
