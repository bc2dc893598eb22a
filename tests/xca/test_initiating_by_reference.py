"""ITI-38 by reference: FindDocuments for ObjectRefs, then GetDocuments in batches (issue 13).

DUO's :class:`~duo_gateway.xca.initiating.finder.CommunityClient` against the real community simulator
on loopback, which holds 23 manifest-only studies of the patient besides its regular ones. A script
middleware in front of the simulator makes it refuse what a real registry refuses (XDSTooManyResults,
a busy batch, another patient's entry) for the requests a test names, and records every request so
its shape is checked against the official XSD. What the community holds is read from the simulator's
own index, never from DUO's answer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from datetime import date
from pathlib import Path

import pytest
from aiohttp import web
from lxml import etree

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.config import SimNetworkConfig, default_network
from duo_gateway.sim.pki import Pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    Addressing,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.xca.codes import (
    Action,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    StoredQuery,
)
from duo_gateway.xca.ebrim import LONG_NAME, DocumentEntry, ObjectRef, build_extrinsic_object
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.initiating.finder import CommunityClient, CommunityResponse
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_request,
    build_adhoc_query_response,
    decode_slot,
    get_documents,
    get_documents_batches,
    parse_adhoc_query_request,
)
from duo_gateway.xmldsig import load_signing_pair
from tests.xca.recording import BSN, CLAIMS, DUO_HOME, IDENTITY, Handler, serve
from tests.xca.xsd import assert_valid

WIDE = (date(2000, 1, 1), date(2035, 12, 31))
#: Manifest-only studies of the patient at the first institution: with BATCH, five GetDocuments.
MANY = 23
BATCH = 5
OTHER_BSN = "900186021"


@pytest.fixture(scope="module")
def net() -> SimNetworkConfig:
    base = default_network()
    noord = base.communities[0].model_copy(update={"manifest_only_studies": {BSN: MANY}})
    return base.model_copy(update={"communities": [noord, base.communities[1]]})


# --- the community, scripted -----------------------------------------------------------------------

#: Given a parsed ITI-38 request, an answer body to send instead of the simulator's, or None.
Script = Callable[[AdhocQueryRequest], etree._Element | None]


@dataclass
class Peer:
    url: str
    sim: XcaCommunitySimulator
    requests: list[AdhocQueryRequest] = field(default_factory=list)
    bodies: list[etree._Element] = field(default_factory=list)
    script: Script | None = None

    def config(self, **kw: object) -> XcaCommunity:
        base: dict[str, object] = {
            "home_community_id": self.sim.home, "name": "XDS Noord", "iti38": f"{self.url}/iti38",
            "iti39": f"{self.url}/iti39", "timeout_s": 5.0, "retries": 1, "retry_backoff_s": 0.01,
            "iti38_batch_size": BATCH}
        return XcaCommunity.model_validate({**base, **kw})

    def get_documents(self) -> list[AdhocQueryRequest]:
        return [r for r in self.requests if r.query_id == StoredQuery.GET_DOCUMENTS]


def failure(*errors: RegistryError) -> etree._Element:
    return build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.FAILURE, (), errors))


@pytest.fixture
async def peer(sim: XcaCommunitySimulator) -> AsyncIterator[Peer]:
    app = sim.app()
    state = Peer("", sim)

    @web.middleware
    async def scripted(request: web.Request, handler: Handler) -> web.StreamResponse:
        env = parse_envelope(await request.read())
        assert env.body is not None
        state.bodies.append(env.body)
        query = parse_adhoc_query_request(env.body)
        state.requests.append(query)
        answer = state.script(query) if state.script is not None else None
        if answer is None:
            return await handler(request)
        reply = build_envelope(Addressing(action=Action.ITI38_RESPONSE, message_id=new_message_id(),
                                          relates_to=env.addressing.message_id), answer)
        return web.Response(body=serialize(reply), headers={
            "Content-Type": f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38_RESPONSE}"'})

    app.middlewares.insert(0, scripted)
    server = await serve(app)
    state.url = str(server.make_url("")).rstrip("/")
    try:
        yield state
    finally:
        await server.close()


@pytest.fixture
async def client_for(rsa_pki: Pki) -> AsyncIterator[Callable[..., CommunityClient]]:
    made: list[CommunityClient] = []
    pair = load_signing_pair(rsa_pki.client.key, rsa_pki.client.cert)

    def make(cfg: XcaCommunity, auditor: Auditor | None = None) -> CommunityClient:
        client = CommunityClient(cfg, home_community_id=DUO_HOME, xua=XuaConfig(), signing=pair,
                                 metrics=Metrics(), auditor=auditor, identity=IDENTITY)
        made.append(client)
        return client

    yield make
    for client in made:
        await client.close()


async def ask(client: CommunityClient) -> CommunityResponse:
    return await client.find_documents(CLAIMS, BSN, WIDE[0], WIDE[1], deadline_s=20.0)


def holdings(sim: XcaCommunitySimulator, bsn: str = BSN) -> list[DocumentEntry]:
    """What the community holds of the patient, in its own order: the answer DUO must end up with."""
    return [d.entry for d in sim.documents if d.bsn == bsn]


def uuids(request: AdhocQueryRequest) -> list[str]:
    return request.values(QueryParam.ENTRY_UUID) or []


# --- the codec -------------------------------------------------------------------------------------


def test_a_batch_of_entry_uuids_is_spread_over_values_that_fit_the_schema(
        sim: XcaCommunitySimulator, wsdl_dir: Path) -> None:
    ids = [e.entry_uuid for e in holdings(sim)]
    request = get_documents(sim.home, entry_uuids=ids)
    (slot,) = request.slots
    assert len(slot.values) == math.ceil(len(ids) / 5)  # five quoted UUIDs fit one 256-character Value
    assert all(len(v) <= LONG_NAME for v in slot.values)
    assert decode_slot(slot.values) == ids
    element = build_adhoc_query_request(request)
    assert_valid(wsdl_dir, element)
    assert parse_adhoc_query_request(element).values(QueryParam.ENTRY_UUID) == ids
    with pytest.raises(ValueError, match="urn:uuid"):
        get_documents(sim.home, entry_uuids=["Document01"])


def test_get_documents_batches_ask_each_reference_once_per_home_in_order() -> None:
    other = "urn:oid:2.16.528.1.1007.99.20009"
    ids = [f"urn:uuid:00000000-0000-4000-8000-{i:012d}" for i in range(7)]
    refs = [ObjectRef(ids[0], DUO_HOME), ObjectRef(ids[1], other), ObjectRef(ids[2], DUO_HOME),
            ObjectRef(ids[0].upper().replace("URN:UUID:", "urn:uuid:"), DUO_HOME),
            *(ObjectRef(i, DUO_HOME) for i in ids[3:])]
    batches = get_documents_batches(refs, 3)
    assert [(b.home, uuids(b)) for b in batches] == [
        (DUO_HOME, [ids[0], ids[2], ids[3]]), (DUO_HOME, ids[4:7]), (other, [ids[1]])]
    assert all(b.query_id == StoredQuery.GET_DOCUMENTS and b.return_type is ReturnType.LEAF_CLASS
               for b in batches)
    with pytest.raises(ValueError, match="no home"):
        get_documents_batches([ObjectRef(ids[0], None)], 3)
    with pytest.raises(ValueError, match="not a urn:uuid"):
        get_documents_batches([ObjectRef("Document01", DUO_HOME)], 3)


# --- asking by reference ---------------------------------------------------------------------------


async def test_configured_by_reference_asks_objectrefs_then_getdocuments_in_batches(
        peer: Peer, client_for: Callable[..., CommunityClient], wsdl_dir: Path, tmp_path: Path) -> None:
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path)
    await auditor.start()
    resp = await ask(client_for(peer.config(iti38_by_reference=True), auditor))
    await auditor.stop()
    held = holdings(peer.sim)
    batches = math.ceil(len(held) / BATCH)
    assert (resp.status, resp.errors) == ("ok", ())
    assert resp.entries == tuple(held)  # every entry, each field as held, in the community's order
    assert resp.attempts == 1 + batches
    assert "asked by reference (iti38_by_reference)" in resp.detail

    first, *gets = peer.requests
    assert first.query_id == StoredQuery.FIND_DOCUMENTS and first.return_type is ReturnType.OBJECT_REF
    assert first.values(QueryParam.PATIENT_ID) == [bsn_cx(BSN)]
    assert first.values(QueryParam.STATUS) == [EntryStatus.APPROVED]
    assert len(gets) == batches and gets == peer.get_documents()
    assert [i for g in gets for i in uuids(g)] == [e.entry_uuid for e in held]
    for g in gets:
        assert g.home == peer.sim.home and g.return_type is ReturnType.LEAF_CLASS
        assert 1 <= len(uuids(g)) <= BATCH
    for body in peer.bodies:
        assert_valid(wsdl_dir, body)

    records = parse_file_records((tmp_path / "audit" / "audit.log").read_bytes()).records
    queries = []
    for record in records:
        root = etree.fromstring(parse_message(record).msg)
        query = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']")
        patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
        assert query is not None and patient is not None
        assert patient.get("ParticipantObjectID") == bsn_cx(BSN)  # each request disclosed the patient
        queries.append(str(query.get("ParticipantObjectID")))
    assert sorted(queries) == sorted([StoredQuery.FIND_DOCUMENTS] + [StoredQuery.GET_DOCUMENTS] * batches)


async def test_answers_over_the_limit_are_asked_by_reference_and_a_batch_over_it_in_halves(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    """The limit scaled down (an entry is ~7 kB): the LeafClass answer and a batch of five are over
    it, two or three entries are not. The real limit is exercised by the 5,000-entry timeline test."""
    resp = await ask(client_for(peer.config(iti38_max_answer_bytes=26_000)))
    held = holdings(peer.sim)
    assert (resp.status, resp.entries) == ("ok", tuple(held))
    assert "the LeafClass answer was refused: answer over the size limit" in resp.detail
    assert "the limit is xca_communities.iti38_max_answer_bytes = 26000 bytes" in resp.detail
    leaf, refs, *gets = peer.requests
    assert (leaf.return_type, refs.return_type) == (ReturnType.LEAF_CLASS, ReturnType.OBJECT_REF)
    sizes = [len(uuids(g)) for g in gets]
    full, rest = divmod(len(held), BATCH)
    assert sorted(sizes) == sorted([5, 2, 3] * full + ([rest] if rest else []))
    assert resp.attempts == 2 + len(gets)


async def test_too_many_results_for_leafclass_is_asked_again_by_reference(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    def capped(query: AdhocQueryRequest) -> etree._Element | None:
        if query.query_id == StoredQuery.FIND_DOCUMENTS and query.return_type is ReturnType.LEAF_CLASS:
            return failure(RegistryError(ErrorCode.TOO_MANY_RESULTS, "more than 20 entries",
                                         location=peer.sim.home))
        return None

    peer.script = capped
    resp = await ask(client_for(peer.config()))
    assert (resp.status, resp.entries) == ("ok", tuple(holdings(peer.sim)))
    leaf, refs, *gets = peer.requests
    assert (leaf.return_type, refs.return_type) == (ReturnType.LEAF_CLASS, ReturnType.OBJECT_REF)
    assert len(gets) == math.ceil(len(resp.entries) / BATCH) and resp.attempts == 2 + len(gets)
    assert "XDSTooManyResults" in resp.detail and "asked by reference" in resp.detail


async def test_a_batch_that_fails_leaves_the_community_partial_with_the_rest(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    held = holdings(peer.sim)
    lost = {e.entry_uuid for e in held[BATCH:2 * BATCH]}  # the second batch

    def busy(query: AdhocQueryRequest) -> etree._Element | None:
        if set(uuids(query)) & lost:
            return failure(RegistryError(ErrorCode.REGISTRY_BUSY, "try later", location=peer.sim.home))
        return None

    peer.script = busy
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert resp.status == "partial"
    assert resp.entries == tuple(e for e in held if e.entry_uuid not in lost)
    assert [e.error_code for e in resp.errors] == [ErrorCode.REGISTRY_BUSY]
    assert f"1 GetDocuments requests failed, {BATCH} entries not fetched" in resp.detail
    # A registry Failure would come back the same within this deadline: not asked again.
    assert len([g for g in peer.get_documents() if set(uuids(g)) & lost]) == 1


async def test_a_batch_answered_with_garbage_is_reported_as_a_registry_error_part(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    held = holdings(peer.sim)
    lost = held[-1].entry_uuid  # in the last batch
    last_batch = len(held) - BATCH * ((len(held) - 1) // BATCH)

    def garbage(query: AdhocQueryRequest) -> etree._Element | None:
        if lost in uuids(query):
            return etree.Element("not-an-answer")
        return None

    peer.script = garbage
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert resp.status == "partial" and resp.entries == tuple(held[:-last_batch])
    (error,) = resp.errors
    assert error.error_code == ErrorCode.REGISTRY_ERROR and error.location == peer.sim.home
    assert "malformed answer" in error.code_context


async def test_a_batch_refused_as_too_many_results_is_asked_again_in_halves(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    def at_most_two(query: AdhocQueryRequest) -> etree._Element | None:
        if len(uuids(query)) > 2:
            return failure(RegistryError(ErrorCode.TOO_MANY_RESULTS, "at most 2", location=peer.sim.home))
        return None

    peer.script = at_most_two
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert (resp.status, resp.entries) == ("ok", tuple(holdings(peer.sim)))
    sizes = [len(uuids(g)) for g in peer.get_documents()]
    held = len(resp.entries)

    def asked(size: int) -> list[int]:
        """The requests a batch of ``size`` becomes: itself, then each half while over the cap."""
        return [size] if size <= 2 else [size, *asked(size // 2), *asked(size - size // 2)]

    batches = [BATCH] * (held // BATCH) + ([held % BATCH] if held % BATCH else [])
    assert sorted(sizes) == sorted(n for b in batches for n in asked(b))  # 5 is 5, 2, 3, 1, 2
    assert resp.attempts == 1 + len(sizes)


async def test_another_patients_entry_in_one_batch_discards_the_whole_answer(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    held = holdings(peer.sim)
    stranger = holdings(peer.sim, OTHER_BSN)[0]

    def leaks(query: AdhocQueryRequest) -> etree._Element | None:
        if held[0].entry_uuid in uuids(query):
            wanted = {u.lower() for u in uuids(query)}
            entries = [replace(e, patient_id=stranger.patient_id) if i == 0 else e
                       for i, e in enumerate(x for x in held if x.entry_uuid.lower() in wanted)]
            answer = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, ()))
            objects = answer[-1]
            objects.extend(build_extrinsic_object(e) for e in entries)
            return answer
        return None

    peer.script = leaks
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert (resp.status, resp.entries) == ("error", ())
    assert [e.error_code for e in resp.errors] == [ErrorCode.RESULT_NOT_SINGLE_PATIENT]
    assert "the whole answer was discarded" in resp.detail


async def test_an_objectref_without_home_discards_the_answer(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    def homeless(query: AdhocQueryRequest) -> etree._Element | None:
        if query.return_type is ReturnType.OBJECT_REF:
            refs = [ObjectRef(e.entry_uuid, peer.sim.home) for e in holdings(peer.sim)]
            answer = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, tuple(refs)))
            del answer[-1][0].attrib["home"]
            return answer
        return None

    peer.script = homeless
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert (resp.status, resp.entries) == ("error", ())
    assert [e.error_code for e in resp.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert peer.get_documents() == []  # nothing is asked by a reference DUO cannot vouch for


async def test_every_batch_failing_reports_the_community_failed_not_partial(
        peer: Peer, client_for: Callable[..., CommunityClient]) -> None:
    def down(query: AdhocQueryRequest) -> etree._Element | None:
        if query.query_id == StoredQuery.GET_DOCUMENTS:
            return failure(RegistryError(ErrorCode.REGISTRY_ERROR, "index offline", location=peer.sim.home))
        return None

    peer.script = down
    resp = await ask(client_for(peer.config(iti38_by_reference=True)))
    assert (resp.status, resp.entries) == ("error", ())
    assert f"{math.ceil(len(holdings(peer.sim)) / BATCH)} GetDocuments requests failed" in resp.detail
