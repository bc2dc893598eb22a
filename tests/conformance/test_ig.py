"""NIST XDS Toolkit, Initiating Gateway (XCA): 12300, 12306, 12307, 12308, 15808, 15809, 15810, 15814.

NIST drives an Initiating Gateway with ITI-18/ITI-43 from a simulated Document Consumer and reads the
logs of its two Responding Gateway simulators ("Community 1", "Community 2"). DUO's Initiating Gateway
has no ITI-18/ITI-43 door: its consumer is the TLB API, so every case is driven through
``POST /tlb/v1/timeline`` (queries) and ``POST /tlb/v1/transfers`` (retrieves) and checked at both
ends, as NIST checks: what DUO sent each community (recorded in front of the simulators, XSD-valid, the
request shape of the case) and what DUO made of the answers (the timeline's studies and sources, the
transfer's delivered instances). The NIST test data is one DocumentEntry per document; here it is one
KOS manifest entry per study (manifest-only studies of the community simulator), so "one document"
is one study on the timeline and "retrieve a document" is ITI-39 of that study's KOS, which a transfer
does before its RAD-75. Patient ids are BSNs; XUA assertions are DUO's Dutch ones (the variants are
tested elsewhere). The network is :mod:`tests.conformance.ig_network`, one per module, with two DUO
configurations of it: ``duo`` (LeafClass FindDocuments, DUO's default) and ``duo_by_reference`` (Community 1
asked by reference: ObjectRef, then GetDocuments), for the cases NIST writes for each query shape.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from lxml import etree

from duo_gateway.bsn import bsn_cx
from duo_gateway.sim.config import SimCommunity, SimInstitution, SimPatient, default_network
from duo_gateway.xca.codes import (
    STUDY_INSTANCE_UID_ID_TYPE,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    StoredQuery,
)
from duo_gateway.xca.ebrim import DocumentEntry, ObjectRef, rim
from duo_gateway.xca.hl7 import parse_reference_id
from duo_gateway.xca.query import AdhocQueryResponse, parse_adhoc_query_response
from tests.conformance.ig_network import Community, Exchange, IgNetwork, manifest_instances, running
from tests.support.storescp import StoreScp, run_storescp
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: NIST's test data patients ("Single document in Community 1", ...), as BSNs with consent everywhere.
SINGLE: Final = SimPatient(bsn="999990007", name="Een^Enkel", birth_date="19700101", sex="F", consent="all")
TWO: Final = SimPatient(bsn="999990019", name="Twee^Dubbel", birth_date="19710202", sex="M", consent="all")
BOTH: Final = SimPatient(bsn="999990020", name="Beide^Gemeenschap", birth_date="19720303", sex="F",
                         consent="all")
ERROR: Final = SimPatient(bsn="999990032", name="Fout^Register", birth_date="19730404", sex="M",
                          consent="all")
C1: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20101", name="Community 1",
    repository_unique_id="2.16.528.1.1007.99.20101.1",
    institutions=[SimInstitution(ura="00020101", name="Ziekenhuis Gemeenschap Een")], studies_per_patient=0,
    manifest_only_studies={SINGLE.bsn: 1, TWO.bsn: 2, BOTH.bsn: 1, ERROR.bsn: 1})
C2: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20102", name="Community 2",
    repository_unique_id="2.16.528.1.1007.99.20102.1",
    institutions=[SimInstitution(ura="00020201", name="Ziekenhuis Gemeenschap Twee")], studies_per_patient=0,
    manifest_only_studies={BOTH.bsn: 1, ERROR.bsn: 1})
NET: Final = default_network().model_copy(update={"patients": [SINGLE, TWO, BOTH, ERROR],
                                                  "communities": [C1, C2]})
LEAF: Final = "duo"
BY_REFERENCE: Final = "duo_by_reference"

_EXTRINSIC_OBJECTS: Final = f"{rim('RegistryObjectList')}/{rim('ExtrinsicObject')}"
_OBJECT_REFS: Final = f"{rim('RegistryObjectList')}/{rim('ObjectRef')}"


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    with run_storescp(tmp_path_factory.mktemp("own-pacs")) as scp:
        yield scp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(destination: StoreScp,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IgNetwork]:
    gateways = {LEAF: {}, BY_REFERENCE: {C1.home_community_id: {"iti38_by_reference": True}}}
    async with running(tmp_path_factory.mktemp("ig"), NET, gateways=gateways, destination=destination,
                       failing={C1.home_community_id: ERROR.bsn}) as net:
        yield net


# --- helpers: NIST's XPath reports over what a community logged ------------------------------------


def count(answer: etree._Element, path: str) -> int:
    """NIST's ``count(//AdhocQueryResponse/RegistryObjectList/...)`` on an answer as it was sent."""
    return len(answer.findall(path))


def query_answer(exchange: Exchange) -> AdhocQueryResponse:
    return parse_adhoc_query_response(exchange.response())


def study_uid(entry: DocumentEntry) -> str:
    return next(uid for uid, kind in map(parse_reference_id, entry.reference_ids)
                if kind == STUDY_INSTANCE_UID_ID_TYPE)


def studies_by_uid(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["study_instance_uid"]: s for s in answer["studies"]}


def sources(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in answer["sources"]}


def registered(community: Community, bsn: str) -> dict[str, DocumentEntry]:
    """The entries the community was loaded with for the patient (NIST's submitted test data), by uniqueId."""
    return {d.entry.unique_id: d.entry for d in community.kos_entries(bsn)}


def find_documents(exchange: Exchange, bsn: str, return_type: ReturnType) -> None:
    """The FindDocuments shape of NIST's query.xml: the patient, Approved, the requested returnType."""
    query = exchange.query()
    assert (query.query_id, query.return_type) == (StoredQuery.FIND_DOCUMENTS, return_type)
    assert query.values(QueryParam.PATIENT_ID) == [bsn_cx(bsn)]
    assert query.values(QueryParam.STATUS) == [EntryStatus.APPROVED]


async def transferred(network: IgNetwork, gateway: str, answer: dict[str, Any], uids: list[str],
                      community_docs: dict[str, set[str]], destination: StoreScp) -> None:
    """Transfer the studies ``uids`` of a timeline answer; it completes with every manifest instance."""
    by_uid = studies_by_uid(answer)
    status = await network.transfer([by_uid[u]["id"] for u in uids], gateway)
    assert status["state"] == "completed", status
    expected = set().union(*(community_docs[u] for u in uids))
    assert status["instances_stored"] == len(expected)
    received = destination.received()
    assert all(received[uid] >= 1 for uid in expected)


def retrieved(exchange: Exchange, entry: DocumentEntry, wsdl_dir: Path) -> None:
    """NIST's retrieve.xml shape: one DocumentRequest naming the queried entry's home, repository and
    uniqueId (the values the query answer reported, as ``$home$``, ``$repositoryuid$``, ``$docuid$``)."""
    assert_valid(wsdl_dir, exchange.body())
    (doc,) = exchange.retrieve().documents
    assert (doc.home, doc.repository_unique_id, doc.document_unique_id) == (
        entry.home, entry.repository_unique_id, entry.unique_id)


def manifests(community: Community, bsn: str) -> dict[str, set[str]]:
    """Study UID -> the instances its KOS (as the community holds it) references."""
    return {study_uid(d.entry): manifest_instances(d) for d in community.kos_entries(bsn)}


# --- the cases -------------------------------------------------------------------------------------


async def test_12300(network: IgNetwork, wsdl_dir: Path) -> None:
    """NIST 12300 "FindDocuments for LeafClass": the IG sends Community 1 a LeafClass FindDocuments for
    the single-document patient, answered with ExtrinsicObjectCount = 1.

    Adapted: DUO queries when a timeline is asked for (TLB API), not on an ITI-18 from a consumer; its
    FindDocuments also narrows formatCode (KOS and reports) and serviceStartTime (the period), which
    the patient's entry meets. The result is the entry's study on the timeline, from Community 1.
    """
    c1 = network.community(C1.home_community_id)
    mark = network.marks()
    answer = await network.timeline(SINGLE.bsn, LEAF)

    (sent,) = c1.since(mark[c1.home], "/iti38")
    assert_valid(wsdl_dir, sent.body())
    find_documents(sent, SINGLE.bsn, ReturnType.LEAF_CLASS)
    assert count(sent.response(), _EXTRINSIC_OBJECTS) == 1
    (entry,) = query_answer(sent).entries
    assert list(studies_by_uid(answer)) == [study_uid(entry)]
    assert answer["studies"][0]["sources"] == [c1.source_id]


async def test_12306(network: IgNetwork, wsdl_dir: Path) -> None:
    """NIST 12306 "FindDocuments for ObjectRef": the IG sends Community 1 a FindDocuments for ObjectRef,
    answered with ObjectRefCount = 2 (the patient NIST submitted two documents for).

    Adapted: DUO asks for ObjectRefs when a community is configured ``iti38_by_reference`` (or when the
    LeafClass answer would be over its limit, see tests/timeline/test_timeline_by_reference.py), driven
    by a timeline; it then fetches the entries (12307), whose studies the timeline shows.
    """
    c1 = network.community(C1.home_community_id)
    mark = network.marks()
    answer = await network.timeline(TWO.bsn, BY_REFERENCE)

    first = c1.since(mark[c1.home], "/iti38")[0]
    assert_valid(wsdl_dir, first.body())
    find_documents(first, TWO.bsn, ReturnType.OBJECT_REF)
    assert count(first.response(), _OBJECT_REFS) == 2
    refs = query_answer(first).objects
    assert all(isinstance(r, ObjectRef) and r.home == c1.home for r in refs)
    assert set(studies_by_uid(answer)) == {study_uid(e) for e in registered(c1, TWO.bsn).values()}


async def test_12307(network: IgNetwork, wsdl_dir: Path) -> None:
    """NIST 12307 "GetDocuments": the IG sends Community 1 a GetDocuments (LeafClass) with ``home`` and
    the two entryUUIDs 12306 returned, answered with ExtrinsicObjectCount = 2.

    Adapted: DUO sends it right after its ObjectRef query (12306), in one batch here (two UUIDs,
    ``iti38_batch_size`` 100); the two entries become the patient's two studies on the timeline.
    """
    c1 = network.community(C1.home_community_id)
    mark = network.marks()
    answer = await network.timeline(TWO.bsn, BY_REFERENCE)

    refs_exchange, get = c1.since(mark[c1.home], "/iti38")
    assert_valid(wsdl_dir, get.body())
    query = get.query()
    assert (query.query_id, query.return_type, query.home) == (
        StoredQuery.GET_DOCUMENTS, ReturnType.LEAF_CLASS, c1.home)
    referenced = [o.id for o in query_answer(refs_exchange).objects if isinstance(o, ObjectRef)]
    assert query.values(QueryParam.ENTRY_UUID) == referenced
    assert count(get.response(), _EXTRINSIC_OBJECTS) == 2
    entries = query_answer(get).entries
    assert {e.unique_id for e in entries} == set(registered(c1, TWO.bsn))
    assert set(studies_by_uid(answer)) == {study_uid(e) for e in entries}
    assert all(s["sources"] == [c1.source_id] for s in answer["studies"])


async def test_12308(network: IgNetwork, destination: StoreScp, wsdl_dir: Path) -> None:
    """NIST 12308 "Retrieve single document": the IG sends Community 1 a RetrieveDocumentSetRequest with
    one DocumentRequest for Document01 of 12307 (its home, repositoryUniqueId and uniqueId); Success.

    Adapted: DUO retrieves a document when a TLB client transfers the study it belongs to: ITI-39 of
    the study's KOS manifest (application/dicom, not NIST's text/plain), then RAD-75 of the images it
    lists. The retrieved document is checked by use: the transfer completes with exactly the
    manifest's instances in the destination PACS.
    """
    c1 = network.community(C1.home_community_id)
    mark = network.marks()
    answer = await network.timeline(TWO.bsn, BY_REFERENCE)
    _, get = c1.since(mark[c1.home], "/iti38")
    document01 = query_answer(get).entries[0]

    mark = network.marks()
    await transferred(network, BY_REFERENCE, answer, [study_uid(document01)], manifests(c1, TWO.bsn),
                      destination)
    (sent,) = c1.since(mark[c1.home], "/iti39")
    retrieved(sent, document01, wsdl_dir)


async def test_15808(network: IgNetwork, wsdl_dir: Path) -> None:
    """NIST 15808 "Query Single Responding Gateway test", its three sections; the IG is configured with
    both communities and the content is in Community 1 only.

    - SingleDocumentFindDocuments: one DocumentEntry; its home, mimeType and uniqueId are the ones
      Community 1 was loaded with;
    - SingleDocumentGetDocuments: GetDocuments by that entry's entryUUID with ``home``: one entry,
      home Community 1;
    - TwoDocumentsFindDocuments: two DocumentEntries, both home Community 1.

    Adapted: driven by timelines (DUO configuration ``duo`` for FindDocuments, ``duo_by_reference``
    for GetDocuments, which DUO sends after an ObjectRef FindDocuments); the assertions are on the
    answers Community 1 gave DUO, and on the timeline: the entries' studies, each from Community 1's
    source (DUO's name for home), and Community 2 asked and found empty.
    """
    c1, c2 = network.community(C1.home_community_id), network.community(C2.home_community_id)

    # SingleDocumentFindDocuments
    mark = network.marks()
    answer = await network.timeline(SINGLE.bsn, LEAF)
    (sent,) = c1.since(mark[c1.home], "/iti38")
    assert_valid(wsdl_dir, sent.body())
    find_documents(sent, SINGLE.bsn, ReturnType.LEAF_CLASS)
    assert count(sent.response(), _EXTRINSIC_OBJECTS) == 1
    (entry,) = query_answer(sent).entries
    (loaded,) = registered(c1, SINGLE.bsn).values()
    assert (entry.home, entry.mime_type, entry.unique_id) == (C1.home_community_id, loaded.mime_type,
                                                              loaded.unique_id)
    (elsewhere,) = c2.since(mark[c2.home], "/iti38")
    find_documents(elsewhere, SINGLE.bsn, ReturnType.LEAF_CLASS)
    assert count(elsewhere.response(), _EXTRINSIC_OBJECTS) == 0
    assert [(s["study_instance_uid"], s["sources"]) for s in answer["studies"]] == [
        (study_uid(entry), [c1.source_id])]
    assert {s["id"]: s["status"] for s in answer["sources"]} == {c1.source_id: "ok", c2.source_id: "ok"}

    # SingleDocumentGetDocuments
    mark = network.marks()
    answer = await network.timeline(SINGLE.bsn, BY_REFERENCE)
    _, get = c1.since(mark[c1.home], "/iti38")
    assert_valid(wsdl_dir, get.body())
    query = get.query()
    assert (query.query_id, query.home, query.values(QueryParam.ENTRY_UUID)) == (
        StoredQuery.GET_DOCUMENTS, C1.home_community_id, [loaded.entry_uuid])
    assert count(get.response(), _EXTRINSIC_OBJECTS) == 1
    assert [e.home for e in query_answer(get).entries] == [C1.home_community_id]
    assert [s["study_instance_uid"] for s in answer["studies"]] == [study_uid(loaded)]

    # TwoDocumentsFindDocuments
    mark = network.marks()
    answer = await network.timeline(TWO.bsn, LEAF)
    (sent,) = c1.since(mark[c1.home], "/iti38")
    assert count(sent.response(), _EXTRINSIC_OBJECTS) == 2
    entries = query_answer(sent).entries
    assert [e.home for e in entries] == [C1.home_community_id] * 2
    assert {s["study_instance_uid"] for s in answer["studies"]} == {study_uid(e) for e in entries}
    assert all(s["sources"] == [c1.source_id] for s in answer["studies"])


async def test_15809(network: IgNetwork, destination: StoreScp, wsdl_dir: Path) -> None:
    """NIST 15809 "Retrieve Single Responding Gateway test": OneDocRetrieve (the document of 15808's
    single-document patient) and TwoDocRetrieve (both of the two-document patient); each retrieved
    document's home, repositoryUniqueId and uniqueId are the requested ones, its mimeType the one
    the query reported.

    Adapted: a retrieve is a transfer of the entries' studies (TLB API). TwoDocRetrieve is one
    transfer of both studies, which DUO performs as one single-document ITI-39 per study (each study's
    KOS) rather than one request with two DocumentRequests. DUO accepts only the document it named
    (uniqueId) and reads it as the DICOM manifest the query's mimeType announced; the transfer
    completing with exactly each manifest's instances is the check on the retrieved document.
    """
    c1 = network.community(C1.home_community_id)
    for patient in (SINGLE, TWO):
        answer = await network.timeline(patient.bsn, LEAF)
        entries = registered(c1, patient.bsn)
        mark = network.marks()
        await transferred(network, LEAF, answer, [study_uid(e) for e in entries.values()],
                          manifests(c1, patient.bsn), destination)
        sent = c1.since(mark[c1.home], "/iti39")
        assert len(sent) == len(entries)
        for exchange in sent:
            (doc,) = exchange.retrieve().documents
            retrieved(exchange, entries[doc.document_unique_id], wsdl_dir)
            assert entries[doc.document_unique_id].mime_type == "application/dicom"


async def test_15810(network: IgNetwork, destination: StoreScp, wsdl_dir: Path) -> None:
    """NIST 15810 "Two Responding Gateway Response test": TwoRGFindDocuments returns one DocumentEntry
    from each community (count 2, distinct homes, each its community's), then RG1Retrieve and
    RG2Retrieve retrieve each document from its own community.

    Adapted: the query is a timeline, whose two studies come from the two communities' sources; each
    retrieve is a transfer of one study, whose ITI-39 must go to that study's community only.
    """
    c1, c2 = network.community(C1.home_community_id), network.community(C2.home_community_id)
    mark = network.marks()
    answer = await network.timeline(BOTH.bsn, LEAF)
    found: list[DocumentEntry] = []
    for community in (c1, c2):
        (sent,) = community.since(mark[community.home], "/iti38")
        find_documents(sent, BOTH.bsn, ReturnType.LEAF_CLASS)
        (entry,) = query_answer(sent).entries
        assert entry.home == community.home and entry.mime_type == "application/dicom"
        found.append(entry)
    assert len(answer["studies"]) == 2
    assert {study_uid(e): [c.source_id] for e, c in zip(found, (c1, c2), strict=True)} == {
        s["study_instance_uid"]: s["sources"] for s in answer["studies"]}

    for entry, community, other in ((found[0], c1, c2), (found[1], c2, c1)):  # RG1Retrieve, RG2Retrieve
        mark = network.marks()
        await transferred(network, LEAF, answer, [study_uid(entry)], manifests(community, BOTH.bsn),
                          destination)
        (sent,) = community.since(mark[community.home], "/iti39")
        retrieved(sent, entry, wsdl_dir)
        assert other.since(mark[other.home], "/iti39") == []


async def test_15814(network: IgNetwork, wsdl_dir: Path) -> None:
    """NIST 15814 "Initiating Gateway negative tests", XDSRegistryError: Community 1 answers the
    patient's FindDocuments with an XDSRegistryError, Community 2 with one DocumentEntry; the IG
    passes both the error and the entry on, as PartialSuccess, ExtrinsicObjectCount = 1, its home
    Community 2's.

    Adapted: the TLB API answers JSON, not an AdhocQueryResponse: the PartialSuccess is a 200 timeline
    with Community 2's study and a source per community, Community 1's in status ``error`` naming the
    XDSRegistryError it returned and Community 2's ``ok``.
    """
    c1, c2 = network.community(C1.home_community_id), network.community(C2.home_community_id)
    mark = network.marks()
    answer = await network.timeline(ERROR.bsn, LEAF)

    (refused,) = c1.since(mark[c1.home], "/iti38")
    find_documents(refused, ERROR.bsn, ReturnType.LEAF_CLASS)
    failure = query_answer(refused)
    assert failure.status == ResponseStatus.FAILURE
    assert [e.error_code for e in failure.errors] == [ErrorCode.REGISTRY_ERROR]
    (sent,) = c2.since(mark[c2.home], "/iti38")
    assert_valid(wsdl_dir, sent.body())
    assert count(sent.response(), _EXTRINSIC_OBJECTS) == 1
    (entry,) = query_answer(sent).entries
    assert entry.home == C2.home_community_id

    assert [(s["study_instance_uid"], s["sources"]) for s in answer["studies"]] == [
        (study_uid(entry), [c2.source_id])]
    by_source = sources(answer)
    assert by_source[c1.source_id]["status"] == "error"
    assert ErrorCode.REGISTRY_ERROR in by_source[c1.source_id]["detail"]
    assert by_source[c2.source_id]["status"] == "ok"
