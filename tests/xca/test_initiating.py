"""DUO as XCA Initiating Gateway (ITI-38) against the real XCA community simulator over loopback HTTP.

Every server here is an aiohttp app on 127.0.0.1 port 0. A recording middleware sits in front of the
simulator: it keeps every request DUO sends (checked against the official XSD and for a valid XUA
assertion, which the sim itself ignores), counts requests in flight, and can drop the connection or
answer 503 for the first N requests. Answers the sim cannot give (PartialSuccess, objects without
home, a wrong RelatesTo) come from a small responder built with the same codec.
"""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestServer
from lxml import etree

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.observability.metrics import Metrics
from duo_gateway.saml import SAML_NS, WSSE_NS, WSU_NS
from duo_gateway.sim.config import SimNetworkConfig, default_network
from duo_gateway.sim.pki import Pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.soap.envelope import (
    SOAP12_NS,
    WSA_ANONYMOUS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    build_fault,
    element_bytes,
    new_message_id,
    parse_envelope,
    serialize,
    serialize_with,
)
from duo_gateway.timeline.model import Report, StudyRef, TimelineStudy
from duo_gateway.timeline.xca_source import (
    institution_filter,
    iso_local,
    outcome_from_response,
    studies_from_entries,
)
from duo_gateway.xca.codes import (
    BODY_PART_SNOMED,
    KOS_SOP_CLASS,
    RIM_NS,
    SNOMED_CT,
    STUDY_INSTANCE_UID_ID_TYPE,
    Action,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    StoredQuery,
)
from duo_gateway.xca.ebrim import Author, DocumentEntry
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.hl7 import Code, Xon, reference_id
from duo_gateway.xca.initiating import finder as initiating_finder
from duo_gateway.xca.initiating.exchange import REUSE_MARGIN, SigningPair
from duo_gateway.xca.initiating.finder import (
    QUERY_FORMATS,
    CommunityClient,
    CommunityResponse,
    find_documents_query,
)
from duo_gateway.xca.metadata import KOS_FORMAT, PDF_FORMAT
from duo_gateway.xca.query import (
    AdhocQueryResponse,
    build_adhoc_query_request,
    build_adhoc_query_response,
    parse_adhoc_query_request,
)
from duo_gateway.xmldsig import DS_NS, TrustStore, load_signing_pair
from duo_gateway.xua import Claims, validate_xua
from tests.xca.recording import BSN, CLAIMS, DUO_HOME, IDENTITY, Community, Recorder, serve
from tests.xca.xsd import assert_valid

OTHER_BSN = "900186021"
WIDE = (date(2000, 1, 1), date(2035, 12, 31))

HOME = "urn:oid:2.16.528.1.1007.99.20001"
REPO = "2.16.528.1.1007.99.20001.1"


# --- fixtures --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def net() -> SimNetworkConfig:
    base = default_network()
    # Two studies per patient and institution: index 0 carries a report, index 1 does not.
    noord = base.communities[0].model_copy(update={"studies_per_patient": 2})
    return base.model_copy(update={"communities": [noord, base.communities[1]]})


@dataclass
class Clients:
    pki: Pki
    made: list[CommunityClient] = field(default_factory=list)
    #: One signing pair for every client, as the daemon gives them.
    pair: SigningPair | None = None

    def __call__(self, cfg: XcaCommunity, *, signed: bool = True, auditor: Auditor | None = None,
                 xua: XuaConfig | None = None) -> CommunityClient:
        if self.pair is None:
            self.pair = load_signing_pair(self.pki.client.key, self.pki.client.cert)
        signing = self.pair if signed else None
        client = CommunityClient(cfg, home_community_id=DUO_HOME, xua=xua or XuaConfig(), signing=signing,
                                 metrics=Metrics(), auditor=auditor, identity=IDENTITY)
        self.made.append(client)
        return client


@pytest.fixture
async def clients(rsa_pki: Pki) -> AsyncIterator[Clients]:
    made = Clients(rsa_pki)
    yield made
    for client in made.made:
        await client.close()


async def ask(client: CommunityClient, bsn: str = BSN, period: tuple[date, date] = WIDE,
              deadline_s: float = 10.0) -> CommunityResponse:
    return await client.find_documents(CLAIMS, bsn, period[0], period[1], deadline_s=deadline_s)


def sim_entries(sim: XcaCommunitySimulator, bsn: str) -> dict[str, DocumentEntry]:
    return {d.entry.unique_id: d.entry for d in sim.documents if d.bsn == bsn}


# --- a responder for answers the simulator never gives ---------------------------------------------


def responder(answer: Callable[[Envelope], web.Response]) -> web.Application:
    async def handle(request: web.Request) -> web.StreamResponse:
        return answer(parse_envelope(await request.read()))

    app = web.Application()
    app.router.add_post("/iti38", handle)
    return app


def soap_answer(body: etree._Element, relates_to: str | None,
                action: str = Action.ITI38_RESPONSE) -> web.Response:
    env = build_envelope(Addressing(action=action, message_id=new_message_id(), relates_to=relates_to), body)
    return web.Response(body=serialize(env), content_type="application/soap+xml")


Start = Callable[[Callable[[Envelope], web.Response]], Awaitable[Community]]


@pytest.fixture
async def custom() -> AsyncIterator[Start]:
    servers: list[TestServer] = []

    async def start(answer: Callable[[Envelope], web.Response]) -> Community:
        recorder = Recorder()
        app = responder(answer)
        app.middlewares.append(recorder.middleware)
        server = await serve(app)
        servers.append(server)
        return Community(str(server.make_url("")).rstrip("/"), app, recorder, HOME)

    yield start
    for server in servers:
        await server.close()


# --- happy path: entries and the studies they become -----------------------------------------------


def _iso(da: str, tm: str) -> str:
    return f"{da[:4]}-{da[4:6]}-{da[6:]}T{tm[:2]}:{tm[2:4]}:{tm[4:6]}"


async def test_find_documents_returns_kos_and_reports_as_studies(
        community: Community, sim: XcaCommunitySimulator, clients: Clients) -> None:
    studies = sorted((g for p, _, g in sim.studies if p.bsn == BSN), key=lambda g: g.study_date)
    assert len(studies) == 4 and sum(g.has_report for g in studies) == 2
    # From the second study's day up to and including the third's: To is the exclusive next midnight,
    # so a study later on date_to is still found and the first and last are not.
    period = (date.fromisoformat(_iso(studies[1].study_date, "000000")[:10]),
              date.fromisoformat(_iso(studies[2].study_date, "000000")[:10]))
    cfg = community.config()
    resp = await ask(clients(cfg), period=period)

    assert (resp.status, resp.attempts, resp.errors) == ("ok", 1, ())
    wanted = {g.study_instance_uid for g in studies[1:3]}
    expected = {uid: e for uid, e in sim_entries(sim, BSN).items()
                if any(r.startswith(tuple(wanted)) for r in e.reference_ids)}
    assert {e.unique_id for e in resp.entries} == set(expected)
    assert {e.unique_id: e for e in resp.entries} == expected  # every field survives the round trip

    outcome = outcome_from_response(cfg, resp)
    assert (outcome.id, outcome.kind, outcome.name, outcome.status) == (
        f"xca:{sim.home}", "xca", "XDS Noord", "ok")
    assert outcome.entries == resp.entries and "2 studies" in outcome.detail
    by_uid = {s.study_uid: s for s in outcome.studies}
    assert set(by_uid) == wanted
    for g in studies[1:3]:
        study = by_uid[g.study_instance_uid]
        kos = next(e for e in expected.values() if e.format_code == KOS_FORMAT
                   and e.reference_ids[0].startswith(g.study_instance_uid))
        assert study.ref == StudyRef(kind="xca", study_uid=g.study_instance_uid, home_community_id=sim.home,
                                     repository_unique_id=sim.repository_unique_id,
                                     document_unique_id=kos.unique_id)
        assert study.source_id == f"xca:{sim.home}"
        assert study.started == _iso(g.study_date, g.study_time)
        assert study.modalities == tuple(m for m in g.modalities if m != "SR")
        assert study.body_part == g.body_part
        assert study.description == g.description
        assert (study.institution_ura, study.institution_name) == (g.institution_ura, g.institution_name)
        assert study.accession_number is None  # the sim's entries carry only the study UID
        assert (study.series_count, study.instance_count) == (None, None)
        report_entries = [e for e in expected.values() if e.format_code != KOS_FORMAT
                          and e.reference_ids[0].startswith(g.study_instance_uid)]
        assert len(report_entries) == (1 if g.has_report else 0)
        assert study.reports == tuple(
            Report(StudyRef("xca", g.study_instance_uid, sim.home, sim.repository_unique_id,
                            e.unique_id).encode(), e.title, "application/dicom") for e in report_entries)


async def test_unknown_patient_is_an_empty_ok(community: Community, clients: Clients) -> None:
    resp = await ask(clients(community.config()), bsn="100000009")
    assert (resp.status, resp.entries) == ("ok", ())


# --- what DUO sends -------------------------------------------------------------------------------


def _slot(env: Envelope, name: str) -> list[str]:
    assert env.body is not None
    req = parse_adhoc_query_request(env.body)
    return req.values(name) or []


async def test_request_is_xsd_valid_with_addressing_and_a_signed_xua_assertion(
        community: Community, clients: Clients, rsa_pki: Pki, wsdl_dir: Path) -> None:
    cfg = community.config()
    resp = await ask(clients(cfg, xua=XuaConfig(issuer="urn:oid:2.16.528.1.1007.99.1.7")),
                     period=(date(2023, 1, 1), date(2023, 12, 31)))
    assert resp.status == "ok"
    (raw,), (content_type,) = community.recorder.bodies, community.recorder.content_types
    assert content_type.startswith("application/soap+xml")
    assert f'action="{Action.ITI38}"' in content_type
    root = etree.fromstring(raw)
    assert root.tag == f"{{{SOAP12_NS}}}Envelope"
    env = parse_envelope(raw)
    assert env.body is not None
    assert_valid(wsdl_dir, env.body)

    a = env.addressing
    assert (a.action, a.to, a.reply_to) == (Action.ITI38, f"{community.url}/iti38", WSA_ANONYMOUS)
    assert a.message_id is not None and a.message_id.startswith("urn:uuid:")
    req = parse_adhoc_query_request(env.body)
    assert (req.query_id, req.home) == (StoredQuery.FIND_DOCUMENTS, community.home)
    assert _slot(env, QueryParam.PATIENT_ID) == [bsn_cx(BSN)]
    assert _slot(env, QueryParam.STATUS) == [EntryStatus.APPROVED]
    assert set(_slot(env, QueryParam.FORMAT_CODE)) == {c.query_form() for c in QUERY_FORMATS} == {
        f"{KOS_SOP_CLASS}^^1.2.840.10008.2.6.1", "1.2.840.10008.5.1.4.1.1.88.11^^1.2.840.10008.2.6.1",
        "1.2.840.10008.5.1.4.1.1.88.22^^1.2.840.10008.2.6.1",
        "1.2.840.10008.5.1.4.1.1.88.33^^1.2.840.10008.2.6.1",
        "urn:ihe:rad:PDF^^1.3.6.1.4.1.19376.1.2.3"}
    assert _slot(env, QueryParam.SERVICE_START_TIME_FROM) == ["20230101000000"]
    assert _slot(env, QueryParam.SERVICE_START_TIME_TO) == ["20240101000000"]  # day after date_to

    trust = TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True)
    requester = validate_xua(env, XuaConfig(), issuer="urn:oid:2.16.528.1.1007.99.1.7", trusted=trust,
                             audiences=[cfg.home_community_id], now=datetime.now(UTC))
    assert requester is not None
    assert (requester.uzi, requester.role, requester.ura, requester.purpose) == (
        CLAIMS.uzi, CLAIMS.role, CLAIMS.ura, "TREAT")
    assert requester.issuer == "urn:oid:2.16.528.1.1007.99.1.7"
    assert requester.patient_bsn == BSN
    digests = {el.get("Algorithm") for el in root.iter(f"{{{DS_NS}}}DigestMethod")}
    assert digests == {"http://www.w3.org/2001/04/xmlenc#sha256"}
    # Meant for this community only: another audience refuses it.
    with pytest.raises(SoapFault):
        validate_xua(env, XuaConfig(), issuer="urn:oid:2.16.528.1.1007.99.1.7", trusted=trust,
                     audiences=["urn:oid:2.16.528.1.1007.99.20002"], now=datetime.now(UTC))


async def test_issuer_defaults_to_duos_home_and_each_attempt_gets_its_own_message_id(
        community: Community, clients: Clients, rsa_pki: Pki) -> None:
    community.recorder.status_first = 1
    resp = await ask(clients(community.config()))
    assert (resp.status, resp.attempts) == ("ok", 2)
    first, second = community.recorder.envelopes()
    assert first.addressing.message_id != second.addressing.message_id
    trust = TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True)
    requester = validate_xua(second, XuaConfig(), issuer=DUO_HOME, trusted=trust,
                             audiences=[community.home], now=datetime.now(UTC))
    assert requester is not None and requester.issuer == DUO_HOME


def _audiences(env: Envelope) -> list[str]:
    return [a.text or "" for a in env.headers[-1].iter(f"{{{SAML_NS}}}Audience")]


def _assertion_id(env: Envelope) -> str:
    (assertion,) = env.headers[-1].iter(f"{{{SAML_NS}}}Assertion")
    return assertion.get("ID") or ""


def test_a_request_spliced_from_serialized_parts_is_the_envelope_lxml_would_build() -> None:
    query = build_adhoc_query_request(find_documents_query(BSN, *WIDE, HOME))
    security = etree.Element(f"{{{WSSE_NS}}}Security", nsmap={"wsse": WSSE_NS})
    security.set(f"{{{SOAP12_NS}}}mustUnderstand", "1")  # the envelope's own namespace, declared again
    etree.SubElement(security, f"{{{SAML_NS}}}Assertion").text = "x < y & 'z'"
    addressing = Addressing(action=Action.ITI38, message_id=new_message_id(), to="https://c.test/iti38?a=1&b=2",
                            reply_to=WSA_ANONYMOUS)
    built = serialize(build_envelope(addressing, query, [security]))
    spliced = serialize_with(addressing, element_bytes(query), [element_bytes(security)])
    assert spliced.startswith(b"<?xml version='1.0' encoding='UTF-8'?>")

    def c14n(raw: bytes) -> bytes:
        return etree.tostring(etree.fromstring(raw), method="c14n", exclusive=True)

    assert c14n(spliced) == c14n(built)
    env = parse_envelope(spliced)
    assert env.addressing == addressing
    assert env.body is not None and parse_adhoc_query_request(env.body) == parse_adhoc_query_request(query)


async def _sent_assertion_id(client: CommunityClient, community: Community, claims: Claims = CLAIMS,
                             bsn: str = BSN) -> str:
    """Ask once; the ID of the assertion that request carried."""
    await client.find_documents(claims, bsn, *WIDE, deadline_s=10.0)
    return _assertion_id(community.recorder.envelopes()[-1])


async def test_each_community_s_assertion_names_it_alone(
        community: Community, clients: Clients, rsa_pki: Pki) -> None:
    """An assertion is a bearer token: one naming several communities could be replayed by any of them
    at the others, so each asked community gets an assertion whose only audience is itself."""
    asked = clients(community.config())
    other = "urn:oid:2.16.528.1.1007.99.20009"
    sibling = clients(community.config(home_community_id=other, name="XDS Zuid"))
    sha1_home = "urn:oid:2.16.528.1.1007.99.20008"
    sha1 = clients(community.config(home_community_id=sha1_home, signature_algorithm="sha1"))
    resp = await asked.find_documents(CLAIMS, BSN, *WIDE, deadline_s=10.0)
    assert resp.status == "ok"
    for client in (sibling, sha1):  # the sim answers these with an error: only the requests matter here
        await client.find_documents(CLAIMS, BSN, *WIDE, deadline_s=10.0)
    env, sibling_env, sha1_env = community.recorder.envelopes()
    assert (_audiences(env), _audiences(sibling_env), _audiences(sha1_env)) == (
        [community.home], [other], [sha1_home])
    assert len({_assertion_id(e) for e in (env, sibling_env, sha1_env)}) == 3
    assert {el.get("Algorithm") for el in sha1_env.headers[-1].iter(f"{{{DS_NS}}}DigestMethod")} == {
        "http://www.w3.org/2000/09/xmldsig#sha1"}
    trust = TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True)
    cfg = XuaConfig()
    requester = validate_xua(env, cfg, issuer=DUO_HOME, trusted=trust, audiences=[community.home],
                             now=datetime.now(UTC))
    assert requester is not None and requester.patient_bsn == BSN
    # Replayed at a sibling community, the assertion is refused there.
    with pytest.raises(SoapFault, match="is not accepted"):
        validate_xua(env, cfg, issuer=DUO_HOME, trusted=trust, audiences=[other], now=datetime.now(UTC))


def _created(env: Envelope) -> str:
    (created,) = env.headers[-1].iter(f"{{{WSU_NS}}}Created")
    return created.text or ""


async def test_a_retry_reuses_the_assertion_under_a_fresh_timestamp(
        community: Community, clients: Clients) -> None:
    client = clients(community.config())
    community.recorder.status_first = 1
    # A Timestamp has millisecond digits: hold the (in-process) community so the retry's must differ.
    community.recorder.after = lambda: time.sleep(0.002)
    resp = await client.find_documents(CLAIMS, BSN, *WIDE, deadline_s=10.0)
    assert (resp.status, resp.attempts) == ("ok", 2)
    first, second = community.recorder.envelopes()
    assert _assertion_id(first) == _assertion_id(second)
    assert _created(first) != _created(second)
    assert _audiences(first) == _audiences(second) == [community.home]


async def test_assertions_are_reused_per_requester_and_patient_until_near_their_end(
        community: Community, clients: Clients, rsa_pki: Pki) -> None:
    """Reuse spares the signatures of a clinician's next timeline of the same patient; it never mixes
    requesters, patients or communities, never reaches into an assertion's last minute, and stays
    bounded. What a reused assertion carries still passes a receiver's full XUA check."""
    client = clients(community.config(), xua=XuaConfig(reuse_assertions=2))
    first = await _sent_assertion_id(client, community)
    assert await _sent_assertion_id(client, community) == first
    other_requester = replace(CLAIMS, uzi="000095255")
    assert await _sent_assertion_id(client, community, claims=other_requester) != first
    assert await _sent_assertion_id(client, community) == first  # used last now
    assert await _sent_assertion_id(client, community, bsn=OTHER_BSN) != first
    # Three for a bound of two: the least recently used (the other requester's) was let go.
    assert list(client.signer._assertions) == [(CLAIMS, BSN), (CLAIMS, OTHER_BSN)]
    sibling = clients(community.config(home_community_id="urn:oid:2.16.528.1.1007.99.20009"))
    assert await _sent_assertion_id(sibling, community) != first

    reused = community.recorder.envelopes()[1]
    cfg = XuaConfig()
    requester = validate_xua(reused, cfg, issuer=DUO_HOME,
                             trusted=TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True),
                             audiences=[community.home], now=datetime.now(UTC))
    assert requester is not None and requester.patient_bsn == BSN

    # Within REUSE_MARGIN of its NotOnOrAfter an assertion is signed afresh, not reused.
    assertion, _expires = client.signer._assertions[(CLAIMS, BSN)]
    client.signer._assertions[(CLAIMS, BSN)] = (assertion, datetime.now(UTC) + REUSE_MARGIN)
    assert await _sent_assertion_id(client, community) != first


async def test_without_reuse_every_request_and_retry_signs_anew(
        community: Community, clients: Clients) -> None:
    client = clients(community.config(), xua=XuaConfig(reuse_assertions=0))
    first = await _sent_assertion_id(client, community)
    assert await _sent_assertion_id(client, community) != first
    community.recorder.status_first = 1
    resp = await client.find_documents(CLAIMS, BSN, *WIDE, deadline_s=10.0)
    assert (resp.status, resp.attempts) == ("ok", 2)
    *_, attempt, retry = community.recorder.envelopes()
    assert _assertion_id(attempt) != _assertion_id(retry)
    assert client.signer._assertions == {}


async def test_sha1_signature_when_the_community_wants_it(
        community: Community, clients: Clients, rsa_pki: Pki) -> None:
    resp = await ask(clients(community.config(signature_algorithm="sha1")))
    assert resp.status == "ok"
    (raw,) = community.recorder.bodies
    root = etree.fromstring(raw)
    assert {el.get("Algorithm") for el in root.iter(f"{{{DS_NS}}}DigestMethod")} == {
        "http://www.w3.org/2000/09/xmldsig#sha1"}
    assert {el.get("Algorithm") for el in root.iter(f"{{{DS_NS}}}SignatureMethod")} == {
        "http://www.w3.org/2000/09/xmldsig#rsa-sha1"}
    env = parse_envelope(raw)
    trust = TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True)
    ok = validate_xua(env, XuaConfig(allow_sha1=True), issuer=DUO_HOME, trusted=trust,
                      audiences=[community.home], now=datetime.now(UTC))
    assert ok is not None
    with pytest.raises(SoapFault):
        validate_xua(env, XuaConfig(), issuer=DUO_HOME, trusted=trust,
                     audiences=[community.home], now=datetime.now(UTC))


async def test_without_a_signing_pair_nothing_is_sent(community: Community, clients: Clients) -> None:
    resp = await ask(clients(community.config(), signed=False))
    assert (resp.status, resp.attempts, resp.entries) == ("error", 0, ())
    assert "signing key" in resp.detail and "not asked" in resp.detail
    assert community.recorder.bodies == []


# --- retries ------------------------------------------------------------------------------------


async def test_a_dropped_connection_is_retried_and_then_succeeds(
        community: Community, clients: Clients, sim: XcaCommunitySimulator) -> None:
    community.recorder.drop_first = 1
    resp = await ask(clients(community.config()))
    assert (resp.status, resp.attempts) == ("ok", 2)
    assert len(community.recorder.bodies) == 2
    assert {e.unique_id for e in resp.entries} == set(sim_entries(sim, BSN))


async def test_sim_down_for_the_first_attempt_then_back(community: Community, clients: Clients) -> None:
    community.behave(down=True)
    community.recorder.after = community.behave  # back up once the first request has been dropped
    resp = await ask(clients(community.config(retries=3)))
    assert (resp.status, resp.attempts, len(community.recorder.bodies)) == ("ok", 2, 2)


@pytest.mark.parametrize("status", [502, 503, 504])
async def test_gateway_errors_are_retried(community: Community, clients: Clients, status: int) -> None:
    community.recorder.status_first, community.recorder.status = 1, status
    resp = await ask(clients(community.config()))
    assert (resp.status, resp.attempts) == ("ok", 2)


async def test_a_503_that_persists_is_unavailable_after_all_retries(
        community: Community, clients: Clients) -> None:
    community.recorder.status_first = 99
    resp = await ask(clients(community.config(retries=2)))
    assert (resp.status, resp.attempts, resp.detail) == ("unavailable", 3, "HTTP 503")
    assert len(community.recorder.bodies) == 3


async def test_a_soap_fault_is_an_error_and_not_retried(community: Community, clients: Clients) -> None:
    community.behave(fault=True)
    resp = await ask(clients(community.config(retries=3)))
    assert (resp.status, resp.attempts) == ("error", 1)
    assert resp.detail == "SOAP fault Receiver: simulated responding gateway failure"
    assert len(community.recorder.bodies) == 1


async def test_a_malformed_answer_is_an_error_and_not_retried(community: Community, clients: Clients) -> None:
    community.behave(malformed=True)
    resp = await ask(clients(community.config(retries=3)))
    assert (resp.status, resp.attempts) == ("error", 1)
    assert resp.detail.startswith("malformed answer")
    assert len(community.recorder.bodies) == 1


async def test_a_registry_failure_is_an_error_with_its_codes_and_not_retried(
        custom: Start, clients: Clients) -> None:
    def failure(env: Envelope) -> web.Response:
        errors = (RegistryError(ErrorCode.REGISTRY_BUSY, "try later", location=HOME),)
        return soap_answer(build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.FAILURE, (), errors)),
                           env.addressing.message_id)

    peer = await custom(failure)
    resp = await ask(clients(peer.config(retries=3)))
    assert (resp.status, resp.attempts, [e.error_code for e in resp.errors]) == (
        "error", 1, ["XDSRegistryBusy"])
    assert resp.detail == "registry Failure: XDSRegistryBusy: try later"
    assert outcome_from_response(peer.config(), resp).status == "error"


async def test_a_delay_beyond_the_deadline_is_a_timeout_within_the_deadline(
        community: Community, clients: Clients) -> None:
    community.behave(delay_ms=5000)
    started = time.perf_counter()
    resp = await ask(clients(community.config(timeout_s=20)), deadline_s=0.5)
    elapsed = time.perf_counter() - started
    assert (resp.status, resp.attempts) == ("timeout", 1)
    assert 0.45 <= elapsed < 0.8
    assert outcome_from_response(community.config(), resp).status == "timeout"


async def test_a_community_timeout_is_retried_while_the_deadline_has_room(
        community: Community, clients: Clients) -> None:
    community.behave(delay_ms=5000)
    started = time.perf_counter()
    resp = await ask(clients(community.config(timeout_s=0.3, retries=5)), deadline_s=1.0)
    elapsed = time.perf_counter() - started
    assert resp.status == "timeout"
    assert 2 <= resp.attempts <= 4 and len(community.recorder.bodies) == resp.attempts
    assert elapsed < 1.3


async def test_a_closed_port_is_unavailable_after_the_retries(clients: Clients) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = XcaCommunity.model_validate({
        "home_community_id": "urn:oid:2.16.528.1.1007.99.20009", "name": "Gone",
        "iti38": f"http://127.0.0.1:{port}/iti38", "iti39": f"http://127.0.0.1:{port}/iti39",
        "retries": 2, "retry_backoff_s": 0.01})
    resp = await ask(clients(cfg))
    assert (resp.status, resp.attempts) == ("unavailable", 3)
    assert resp.detail.startswith("connection failed")
    assert outcome_from_response(cfg, resp).status == "unavailable"


# --- answers the simulator never gives ------------------------------------------------------------


def _entries_for(sim: XcaCommunitySimulator, bsn: str) -> tuple[DocumentEntry, ...]:
    return tuple(d.entry for d in sim.documents if d.bsn == bsn)


async def test_partial_success_keeps_entries_and_errors(
        custom: Start, clients: Clients,
        sim: XcaCommunitySimulator) -> None:
    error = RegistryError(ErrorCode.UNAVAILABLE_COMMUNITY, "Martini Noord did not answer",
                          location=sim.home)
    entries = _entries_for(sim, BSN)

    def partial(env: Envelope) -> web.Response:
        body = build_adhoc_query_response(
            AdhocQueryResponse(ResponseStatus.PARTIAL_SUCCESS, entries, (error,)))
        return soap_answer(body, env.addressing.message_id)

    peer = await custom(partial)
    cfg = peer.config()
    resp = await ask(clients(cfg))
    assert resp.status == "partial"
    assert resp.entries == entries and resp.errors == (error,)
    assert "XDSUnavailableCommunity: Martini Noord did not answer" in resp.detail
    outcome = outcome_from_response(cfg, resp)
    assert outcome.status == "ok" and outcome.errors == (error,)
    assert "XDSUnavailableCommunity" in outcome.detail
    assert len(outcome.studies) == 4


async def test_objects_without_home_fail_the_community_naming_it(
        custom: Start, clients: Clients,
        sim: XcaCommunitySimulator) -> None:
    entries = _entries_for(sim, BSN)

    def homeless(env: Envelope) -> web.Response:
        body = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, entries))
        first = body.find(f".//{{{RIM_NS}}}ExtrinsicObject")
        assert first is not None
        del first.attrib["home"]
        return soap_answer(body, env.addressing.message_id)

    peer = await custom(homeless)
    resp = await ask(clients(peer.config(retries=2)))
    assert (resp.status, resp.entries, resp.attempts) == ("error", (), 1)
    (error,) = resp.errors
    assert error.error_code == ErrorCode.MISSING_HOME_COMMUNITY_ID
    assert "XDS Noord" in error.code_context and peer.home in error.code_context
    assert entries[0].entry_uuid in error.code_context
    outcome = outcome_from_response(peer.config(), resp)
    assert (outcome.status, outcome.studies) == ("error", ())
    assert "XDSMissingHomeCommunityId" in outcome.detail


async def test_entries_of_another_patient_discard_the_answer(
        custom: Start, clients: Clients,
        sim: XcaCommunitySimulator) -> None:
    mixed = _entries_for(sim, BSN) + _entries_for(sim, OTHER_BSN)[:1]

    def wrong(env: Envelope) -> web.Response:
        body = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, mixed))
        return soap_answer(body, env.addressing.message_id)

    peer = await custom(wrong)
    with structlog.testing.capture_logs() as logs:
        resp = await ask(clients(peer.config()))
    assert (resp.status, resp.entries) == ("error", ())
    assert [e.error_code for e in resp.errors] == [ErrorCode.RESULT_NOT_SINGLE_PATIENT]
    assert OTHER_BSN not in resp.detail and OTHER_BSN not in repr(logs)


@pytest.mark.parametrize("mode", ["relates-to", "action", "not-soap", "http-500-no-fault"])
async def test_answers_that_break_the_exchange_are_errors_and_not_retried(
        custom: Start, clients: Clients,
        mode: str) -> None:
    empty = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS))

    def answer(env: Envelope) -> web.Response:
        if mode == "relates-to":
            return soap_answer(empty, new_message_id())
        if mode == "action":
            return soap_answer(empty, env.addressing.message_id, action=Action.ITI39_RESPONSE)
        if mode == "not-soap":
            return web.Response(body=b"<html><body>Welcome to nginx</body></html>", content_type="text/html")
        return web.Response(status=500, text="Internal Server Error")

    peer = await custom(answer)
    resp = await ask(clients(peer.config(retries=3)))
    assert (resp.status, resp.attempts, len(peer.recorder.bodies)) == ("error", 1, 1)
    expected = {"relates-to": "RelatesTo", "action": "wsa:Action", "not-soap": "malformed answer",
                "http-500-no-fault": "HTTP 500 without a SOAP answer"}[mode]
    assert expected in resp.detail


# --- concurrency ----------------------------------------------------------------------------------


async def test_at_most_max_concurrency_requests_in_flight_across_timelines(
        community: Community, clients: Clients) -> None:
    community.behave(delay_ms=150)
    client = clients(community.config(max_concurrency=2))
    results = await asyncio.gather(*(ask(client) for _ in range(6)))
    assert [r.status for r in results] == ["ok"] * 6
    assert len(community.recorder.bodies) == 6
    assert community.recorder.max_in_flight == 2


async def test_waiting_for_a_slot_counts_against_the_deadline(community: Community, clients: Clients) -> None:
    community.behave(delay_ms=1000)
    client = clients(community.config(max_concurrency=1))
    started = time.perf_counter()
    first, second = await asyncio.gather(ask(client, deadline_s=3.0), ask(client, deadline_s=0.3))
    assert first.status == "ok"
    assert (second.status, second.attempts) == ("timeout", 0)
    assert "busy" in second.detail
    assert time.perf_counter() - started < 1.6


# --- audit and logs -------------------------------------------------------------------------------


async def test_every_attempt_is_audited_and_logs_carry_no_bsn(
        custom: Start, clients: Clients,
        tmp_path: Path) -> None:
    calls: list[int] = []

    def busy_then_fault(env: Envelope) -> web.Response:
        calls.append(1)
        if len(calls) == 1:
            return web.Response(status=503)
        # A peer that echoes the patient id in its fault reason.
        fault = SoapFault("Receiver", f"no documents for {BSN}")
        return web.Response(status=500, body=serialize(build_fault(fault, env.addressing.message_id)),
                            content_type="application/soap+xml")

    peer = await custom(busy_then_fault)
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path)
    await auditor.start()
    with structlog.testing.capture_logs() as logs:
        resp = await ask(clients(peer.config(), auditor=auditor))
    await auditor.stop()
    assert (resp.status, resp.attempts) == ("error", 2)
    assert BSN not in resp.detail and "[patient]" in resp.detail
    assert BSN not in repr(logs)
    assert any(e["event"] == "xca query" and e["status"] == "error" for e in logs)

    records = parse_file_records((tmp_path / "audit" / "audit.log").read_bytes()).records
    assert len(records) == 2
    for record in records:
        root = etree.fromstring(parse_message(record).msg)
        assert root.find("EventIdentification/EventTypeCode[@csd-code='ITI-38']") is not None
        patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
        assert patient is not None and patient.get("ParticipantObjectID") == bsn_cx(BSN)
        query = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']")
        assert query is not None and query.get("ParticipantObjectID") == StoredQuery.FIND_DOCUMENTS
        assert root.find("EventIdentification").get("EventOutcomeIndicator") == "8"  # type: ignore[union-attr]
        users = {p.get("UserID") for p in root.iter("ActiveParticipant")}
        # The requester as a person (UZI) and an organisation (URA), each qualified by its register's OID.
        assert users == {"DUO_GATEWAY", f"{CLAIMS.uzi}^^^&2.16.528.1.1007.3.1&ISO",
                         f"{CLAIMS.ura}^^^&2.16.528.1.1007.3.3&ISO", f"{peer.url}/iti38"}


# --- the conversion on its own --------------------------------------------------------------------



def _entry(unique_id: str, *, study: str | None, fmt: Code = KOS_FORMAT, ura: str | None = "10990",
           extra_refs: tuple[str, ...] = (), events: tuple[Code, ...] = (), start: str | None = "20240312",
           mime: str = "application/dicom", title: str | None = "title") -> DocumentEntry:
    refs = ((reference_id(study, STUDY_INSTANCE_UID_ID_TYPE),) if study else ()) + extra_refs
    return DocumentEntry(
        entry_uuid=f"urn:uuid:00000000-0000-0000-0000-{int(unique_id.rsplit('.', 1)[-1]):012d}",
        unique_id=unique_id, patient_id=bsn_cx(BSN), mime_type=mime, repository_unique_id=REPO, home=HOME,
        title=title, format_code=fmt, event_codes=events, service_start_time=start, reference_ids=refs,
        authors=(Author(institutions=(Xon("St. Jansdal", ura),)),))


def test_entries_become_studies_with_reports_and_report_only_studies() -> None:
    chest = BODY_PART_SNOMED["CHEST"]
    entries = [
        _entry("1.2.3.1", study="9.1", extra_refs=("ACC77^^^&1.2.3&ISO^urn:ihe:iti:xds:2013:accession",),
               events=(Code("CT", "DCM"), Code("CT", "1.2.840.10008.2.16.4"), Code(chest[0], SNOMED_CT)),
               start="202403121430"),
        _entry("1.2.3.2", study="9.1", fmt=PDF_FORMAT, mime="application/pdf", title="Verslag"),
        _entry("1.2.3.3", study="9.2", fmt=Code("1.2.840.10008.5.1.4.1.1.88.11", "1.2.840.10008.2.6.1"),
               title="Los verslag", events=(Code("MR", "DCM"),), start="20230101", ura=None),
        _entry("1.2.3.4", study=None),
    ]
    studies, skipped = studies_from_entries(entries, source_id="xca:x", home_community_id=HOME)
    assert skipped == 1
    with_kos, report_only = studies
    assert with_kos == TimelineStudy(
        study_uid="9.1", ref=StudyRef("xca", "9.1", HOME, REPO, "1.2.3.1"), source_id="xca:x",
        started="2024-03-12T14:30:00", accession_number="ACC77", modalities=("CT",), description="title",
        body_part="CHEST", institution_ura="00010990", institution_name="St. Jansdal",
        reports=(Report(StudyRef("xca", "9.1", HOME, REPO, "1.2.3.2").encode(), "Verslag",
                        "application/pdf"),))
    assert report_only.ref == StudyRef("xca", "9.2", HOME, REPO, None)
    assert (report_only.description, report_only.started, report_only.modalities) == (
        None, "2023-01-01", ("MR",))
    assert (report_only.institution_ura, report_only.institution_name) == (None, "St. Jansdal")
    assert [r.title for r in report_only.reports] == ["Los verslag"]
    assert StudyRef.decode(report_only.reports[0].id).document_unique_id == "1.2.3.3"


def test_iso_local_keeps_the_precision_it_is_given() -> None:
    assert [iso_local(v) for v in ("2024", "202403", "20240312", "2024031214", "20240312143059", "2024-03",
                                   None)] == [
        "2024", "2024-03", "2024-03-12", "2024-03-12T14:00:00", "2024-03-12T14:30:59", None, None]


def test_institution_filter_pads_uras_to_eight_digits() -> None:
    def study(uid: str, ura: str | None) -> TimelineStudy:
        return TimelineStudy(uid, StudyRef("xca", uid, HOME), "xca:x", institution_ura=ura)

    studies = [study("1", "00010990"), study("2", "10990"), study("3", "00020011"), study("4", None)]
    assert [s.study_uid for s in institution_filter(studies, ["10990"])] == ["1", "2"]
    assert [s.study_uid for s in institution_filter(studies, {"00020011", "00010990"})] == ["1", "2", "3"]
    assert [s.study_uid for s in institution_filter(studies, [])] == ["1", "2", "3", "4"]
    assert institution_filter(studies, ["99999999"]) == []


def test_status_mapping(sim: XcaCommunitySimulator) -> None:
    cfg = XcaCommunity.model_validate({"home_community_id": HOME, "name": "N", "iti38": "http://127.0.0.1:1/a",
                                       "iti39": "http://127.0.0.1:1/b"})
    base = CommunityResponse(HOME, "N", "ok", detail="d", elapsed_s=0.25)
    mapped = {s: outcome_from_response(cfg, replace(base, status=s)).status
              for s in ("ok", "partial", "timeout", "unavailable", "error")}
    assert mapped == {"ok": "ok", "partial": "ok", "timeout": "timeout", "unavailable": "unavailable",
                      "error": "error"}
    assert outcome_from_response(cfg, base).elapsed_ms == 250.0


async def test_a_big_answer_is_decoded_off_the_event_loop(
        community: Community, clients: Clients, monkeypatch: pytest.MonkeyPatch) -> None:
    """Small answers are decoded on the loop (cheaper than a hand-off); one over INLINE_ANSWER_BYTES
    goes to a worker thread, so it cannot stall every other request DUO serves."""
    handed_off: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        handed_off.append(getattr(func, "__name__", ""))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    client = clients(community.config())
    assert (await ask(client)).status == "ok"
    assert handed_off == []
    monkeypatch.setattr(initiating_finder, "INLINE_ANSWER_BYTES", 100)
    resp = await ask(client)
    assert resp.status == "ok" and resp.entries
    assert handed_off == ["_interpret"]
