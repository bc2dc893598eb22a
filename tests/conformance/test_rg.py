"""The NIST XDS Toolkit's Responding Gateway cases (query, retrieve, On-Demand, RMU), DUO under test.

In the Toolkit a test first loads data into the community behind the Responding Gateway (12318,
15807: documents submitted to its registry), then sends ITI-38/ITI-39 requests of a fixed shape and
checks XPath assertions on the answers: the expected status, how many ExtrinsicObjects or
DocumentResponses came back, and that their homeCommunityId, repositoryUniqueId, uniqueId and
mimeType are the configured or requested ones. Here the requests are built below element for
element in the Toolkit's shape (not with DUO's own codec, which would share its mistakes), and the
answers are read with the same XPaths, after validation against the official XSDs.

Adaptations common to every case (docs/conformance.md says which apply where):

- **Test data.** There is no registry to submit to: the data are studies in the PACSes of DUO's
  two TLB hospitals (:class:`SimPacs`, real DICOM Q/R peers behind Mitz consent), one patient per
  data set the Toolkit submits. A "document" is a study's KOS manifest or its radiology report.
- **Identifiers.** Patient ids are BSNs (``^^^&2.16.840.1.113883.2.4.6.3&ISO``); the Toolkit's
  AssignedUuids/AssignedUids of a submission become the ids DUO announced in a FindDocuments answer.
- **The caller.** The harness's XCA peer: signed Dutch XUA, plain HTTP on loopback as a client
  without a certificate, as in the other Responding Gateway tests (mTLS and the XUA variants of
  12309/12312 have tests of their own).
- **Documents.** Where the Toolkit compares retrieved bytes with the file it submitted, the report
  must be the stored SR data set and the KOS must reference exactly the study's images.

One network serves the module; only the tests that say so change anything, each its own patient.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import uuid
from collections.abc import AsyncIterator, Sequence
from dataclasses import replace
from io import BytesIO
from pathlib import Path
from xml.sax.saxutils import escape, quoteattr

import pytest
import pytest_asyncio
from lxml import etree
from pydicom import dcmread
from pydicom.uid import UID

from duo_gateway.bsn import bsn_cx
from duo_gateway.sim.config import SimNetworkConfig, SimPatient, default_network
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.soap.envelope import SOAP12_NS, WSA_NS
from duo_gateway.xca.codes import (
    BASIC_TEXT_SR_SOP_CLASS,
    MIME_DICOM,
    QUERY_NS,
    RIM_NS,
    RS_NS,
    XDSB_NS,
    Action,
    EntryStatus,
    EntryType,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    Scheme,
    StoredQuery,
)
from duo_gateway.xca.retrieve import inline_documents, parse_retrieve_response
from tests.xca.responding_harness import HOME, Network, PacsEndpoint, Reply, _network
from tests.xca.test_responding import dataset_bytes, stored_files
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

NS = {"query": QUERY_NS, "rim": RIM_NS, "rs": RS_NS, "xdsb": XDSB_NS, "s": SOAP12_NS}
#: ITI-92 Restricted Update Document Set (the RMU profile; XCA Persistence Option over ITI-92).
RMU_ACTION = "urn:ihe:iti:2018:RestrictedUpdateDocumentSet"
LCM_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:lcm:3.0"

#: One patient per data set the Toolkit submits (valid BSNs; consent at every TLB hospital).
ONE = SimPatient(bsn="999920005", name="Smit^Joris", birth_date="19801010", sex="M", consent="all")
TWO = SimPatient(bsn="999920017", name="de Jong^Lieke", birth_date="19750505", sex="F", consent="all")
SPREAD = SimPatient(bsn="999920029", name="Bos^Henk", birth_date="19621130", sex="M", consent="all")
GROWS = SimPatient(bsn="999920030", name="Kok^Sara", birth_date="19900220", sex="F", consent="all")
#: The RMU cases' target: an entry nothing in this module retrieves, so it stays exactly as announced.
KEPT = SimPatient(bsn="999920042", name="Mulder^Daan", birth_date="19681224", sex="M", consent="all")


def pacs_contents(net: SimNetworkConfig) -> dict[str, list[GeneratedStudy]]:
    """What each hospital's PACS holds: study index 0 carries a report, index 1 does not.

    ONE: one study without report at H1 (15807/onedoc: a single document). TWO: one study with its
    report at H1 (12318, 15807/twodoc: two documents, one repository). SPREAD: a study without report
    at each hospital (two repositories). GROWS: one study without report at H1 (15829's patient with
    a single document; an image is added to it during that test). KEPT: one study without report at
    H2, whose entry the RMU cases try to update.
    """
    h1, h2 = net.hospitals
    seed = net.seed
    return {
        h1.ura: [generate_studies(ONE, h1, 2, seed)[1], generate_studies(TWO, h1, 1, seed)[0],
                 generate_studies(SPREAD, h1, 2, seed)[1], generate_studies(GROWS, h1, 2, seed)[1]],
        h2.ura: [generate_studies(SPREAD, h2, 2, seed)[1], generate_studies(KEPT, h2, 2, seed)[1]],
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    tmp = tmp_path_factory.mktemp("rg")
    net = default_network().model_copy(update={"patients": [ONE, TWO, SPREAD, GROWS, KEPT],
                                               "communities": []})
    studies = pacs_contents(net)
    pacs: list[SimPacs] = []
    try:
        for h in net.hospitals:
            p = SimPacs(h, tmp / "pacs" / h.ae_title)
            pacs.append(p)
            await asyncio.to_thread(p.preload, studies[h.ura])
            await asyncio.to_thread(p.start)
        endpoints = [PacsEndpoint(h, h.ae_title, p.port) for h, p in zip(net.hospitals, pacs, strict=True)]
        async with _network(tmp, net, endpoints, pacs, studies) as network:
            yield network
    finally:
        for p in pacs:
            await asyncio.to_thread(p.stop)


# ------------------------------------------------------------------------------------------------
# the Toolkit's requests
# ------------------------------------------------------------------------------------------------


def adhoc_query(query_id: str, slots: Sequence[tuple[str, str]], *,
                home: str | None = None) -> etree._Element:
    """An AdhocQueryRequest as the Toolkit's query.xml files have it: LeafClass, composed objects,
    ``home`` on the AdhocQuery only when the case sets one, each slot one Value."""
    home_attr = f" home={quoteattr(home)}" if home is not None else ""
    text = (
        f'<query:AdhocQueryRequest xmlns:query="{QUERY_NS}" xmlns:rim="{RIM_NS}">'
        '<query:ResponseOption returnComposedObjects="true" returnType="LeafClass"/>'
        f"<rim:AdhocQuery id={quoteattr(query_id)}{home_attr}>"
        + "".join(
            f"<rim:Slot name={quoteattr(name)}><rim:ValueList><rim:Value>{escape(value)}</rim:Value>"
            "</rim:ValueList></rim:Slot>"
            for name, value in slots
        )
        + "</rim:AdhocQuery></query:AdhocQueryRequest>"
    )
    return etree.fromstring(text.encode())


def find_documents(patient: SimPatient, *, statuses: Sequence[str] = (EntryStatus.APPROVED,),
                   entry_types: Sequence[str] | None = None, home: str | None = None) -> etree._Element:
    slots = [(QueryParam.PATIENT_ID, f"'{bsn_cx(patient.bsn)}'"), (QueryParam.STATUS, _list(statuses))]
    if entry_types is not None:
        slots.append((QueryParam.ENTRY_TYPE, _list(entry_types)))
    return adhoc_query(StoredQuery.FIND_DOCUMENTS, slots, home=home)


def get_documents(param: str, ids: Sequence[str], *, home: str | None) -> etree._Element:
    return adhoc_query(StoredQuery.GET_DOCUMENTS, [(param, _list(ids))], home=home)


def _list(values: Sequence[str]) -> str:
    return "(" + ", ".join(f"'{v}'" for v in values) + ")"


def retrieve_request(*docs: tuple[str | None, str, str]) -> etree._Element:
    """A RetrieveDocumentSetRequest of (HomeCommunityId or None to leave it out, repository, uniqueId)."""
    requests = "".join(
        "<xdsb:DocumentRequest>"
        + (f"<xdsb:HomeCommunityId>{escape(home)}</xdsb:HomeCommunityId>" if home is not None else "")
        + f"<xdsb:RepositoryUniqueId>{escape(repo)}</xdsb:RepositoryUniqueId>"
        f"<xdsb:DocumentUniqueId>{escape(uid)}</xdsb:DocumentUniqueId></xdsb:DocumentRequest>"
        for home, repo, uid in docs
    )
    return etree.fromstring(f'<xdsb:RetrieveDocumentSetRequest xmlns:xdsb="{XDSB_NS}">{requests}'
                            "</xdsb:RetrieveDocumentSetRequest>".encode())


async def iti38(duo: Network, body: etree._Element, wsdl_dir: Path) -> etree._Element:
    reply = await duo.call(duo.gateway.config.xca_responding.iti38_path, Action.ITI38, body)
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == Action.ITI38_RESPONSE
    assert_valid(wsdl_dir, reply.envelope.body)
    return reply.envelope.body


async def iti39(duo: Network, body: etree._Element, wsdl_dir: Path) -> tuple[etree._Element, Reply]:
    """The Toolkit's XCR: an MTOM request, an MTOM answer whose documents are XOP parts."""
    reply = await duo.call(duo.gateway.config.xca_responding.iti39_path, Action.ITI39, body, mtom=True)
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == Action.ITI39_RESPONSE
    assert_valid(wsdl_dir, inline_documents(reply.envelope.body, reply.parts))
    return reply.envelope.body, reply


# ------------------------------------------------------------------------------------------------
# the Toolkit's assertions, as XPath on the answer
# ------------------------------------------------------------------------------------------------


def query_status(body: etree._Element) -> str | None:
    return body.get("status")


def retrieve_status(body: etree._Element) -> str | None:
    response = body.find("rs:RegistryResponse", NS)
    assert response is not None
    return response.get("status")


def extrinsic_objects(body: etree._Element) -> list[etree._Element]:
    return body.findall("rim:RegistryObjectList/rim:ExtrinsicObject", NS)


def unique_id(eo: etree._Element) -> str:
    found = eo.find(f"rim:ExternalIdentifier[@identificationScheme='{Scheme.UNIQUE_ID}']", NS)
    assert found is not None
    return str(found.get("value"))


def slot(eo: etree._Element, name: str) -> str | None:
    return eo.findtext(f"rim:Slot[@name='{name}']/rim:ValueList/rim:Value", namespaces=NS)


def error_codes(body: etree._Element) -> list[str]:
    return [str(e.get("errorCode")) for e in body.iter(f"{{{RS_NS}}}RegistryError")]


def document_responses(body: etree._Element) -> list[dict[str, str | None]]:
    return [
        {name: dr.findtext(f"xdsb:{name}", namespaces=NS)
         for name in ("HomeCommunityId", "RepositoryUniqueId", "DocumentUniqueId", "mimeType",
                      "NewDocumentUniqueId")}
        for dr in body.findall("xdsb:DocumentResponse", NS)
    ]


def documents(body: etree._Element, reply: Reply) -> dict[str, bytes]:
    """The retrieved bytes by DocumentUniqueId (what the Toolkit hashes and compares)."""
    out: dict[str, bytes] = {}
    for doc in parse_retrieve_response(body, reply.parts).documents:
        assert isinstance(doc.data, bytes)
        out[doc.document_unique_id] = doc.data
    return out


def repo_of(duo: Network, index: int) -> str:
    return duo.net.hospitals[index].repository_unique_id


def study_of(duo: Network, patient: SimPatient, index: int = 0) -> GeneratedStudy:
    return next(s for s in duo.studies[duo.net.hospitals[index].ura] if s.patient_id == patient.bsn)


def kos_references(data: bytes) -> set[str]:
    kos = dcmread(BytesIO(data))
    return {str(i.ReferencedSOPInstanceUID) for st in kos.CurrentRequestedProcedureEvidenceSequence
            for se in st.ReferencedSeriesSequence for i in se.ReferencedSOPSequence}


def images_of(study: GeneratedStudy) -> set[str]:
    return {str(ds.SOPInstanceUID) for ds in study.instances if ds.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS}


def assert_is_stored_document(duo: Network, data: bytes, uid: str, study: GeneratedStudy, index: int) -> None:
    """The Toolkit's ReferenceDocument check, adapted: a report is the stored SR (its data set byte for
    byte), a KOS is the manifest of exactly the study's images, under the requested uniqueId."""
    stored = stored_files(duo, duo.net.hospitals[index].ura, study.study_instance_uid)
    if uid in stored:
        assert dataset_bytes(data) == dataset_bytes(stored[uid])
    else:
        assert dcmread(BytesIO(data)).SOPInstanceUID == uid
        assert kos_references(data) == images_of(study)


# ------------------------------------------------------------------------------------------------
# ITI-38
# ------------------------------------------------------------------------------------------------


async def test_12310(duo: Network, wsdl_dir: Path) -> None:
    """NIST 12310 "FindDocuments for LeafClass" (step finddocs).

    Same request (FindDocuments, LeafClass, patient id and Approved, no home) and assertions: Success,
    exactly 2 ExtrinsicObjects, each with the configured homeCommunityId. Adapted: the two documents
    of 12318's submission are patient TWO's study at a TLB hospital, announced as its KOS and its
    report; the patient id is a BSN.
    """
    body = await iti38(duo, find_documents(TWO), wsdl_dir)
    assert query_status(body) == ResponseStatus.SUCCESS
    eos = extrinsic_objects(body)
    assert len(eos) == 2
    assert [eo.get("home") for eo in eos] == [HOME, HOME]


async def test_12311(duo: Network, wsdl_dir: Path) -> None:
    """NIST 12311 "GetDocuments for LeafClass" (step getdocs).

    Same request (GetDocuments by ``$XDSDocumentEntryEntryUUID``, two values, ``home`` on the
    AdhocQuery) and assertion: Success, exactly 2 ExtrinsicObjects; the reported ids are the ones asked
    for. Adapted: the two entryUUIDs 12318 assigned on submission are those DUO announced for patient
    TWO in a FindDocuments answer.
    """
    found = extrinsic_objects(await iti38(duo, find_documents(TWO), wsdl_dir))
    uuids = [str(eo.get("id")) for eo in found]
    body = await iti38(duo, get_documents(QueryParam.ENTRY_UUID, uuids, home=HOME), wsdl_dir)
    assert query_status(body) == ResponseStatus.SUCCESS
    eos = extrinsic_objects(body)
    assert len(eos) == 2
    assert sorted(str(eo.get("id")) for eo in eos) == sorted(uuids)
    assert sorted(map(unique_id, eos)) == sorted(map(unique_id, found))
    assert {slot(eo, "repositoryUniqueId") for eo in eos} == {repo_of(duo, 0)}
    assert {eo.get("home") for eo in eos} == {HOME}


async def test_15811(duo: Network, wsdl_dir: Path) -> None:
    """NIST 15811 "FindDocuments for LeafClass RG test": sections OneDocFindDocuments,
    OneDocGetDocuments and TwoDocFindDocuments, each with its homeCommunityId validation.

    Same requests (FindDocuments without ``home``; GetDocuments by one entryUUID with ``home``) and
    assertions: Success, 1, 1 and 2 ExtrinsicObjects, every ``home`` the Responding Gateway's
    configured one, schema-valid. Adapted: 15807's single-document patient is ONE (one study, no
    report), its two-document patient is TWO (a study and its report); the entryUUID 15807 assigned
    is the one DUO announced for ONE.
    """
    one = await iti38(duo, find_documents(ONE), wsdl_dir)
    assert query_status(one) == ResponseStatus.SUCCESS
    [eo] = extrinsic_objects(one)
    assert eo.get("home") == HOME
    assert slot(eo, "repositoryUniqueId") == repo_of(duo, 0) and eo.get("mimeType") == MIME_DICOM

    by_uuid = await iti38(duo, get_documents(QueryParam.ENTRY_UUID, [str(eo.get("id"))], home=HOME), wsdl_dir)
    assert query_status(by_uuid) == ResponseStatus.SUCCESS
    [again] = extrinsic_objects(by_uuid)
    assert again.get("home") == HOME and unique_id(again) == unique_id(eo)

    two = await iti38(duo, find_documents(TWO), wsdl_dir)
    assert query_status(two) == ResponseStatus.SUCCESS
    eos = extrinsic_objects(two)
    assert len(eos) == 2
    assert [e.get("home") for e in eos] == [HOME, HOME]


async def test_15815(duo: Network, wsdl_dir: Path) -> None:
    """NIST 15815 "Responding Gateway negative tests": sections MissingCommunity and UnknownCommunity.

    Same requests (GetDocuments by ``$XDSDocumentEntryUniqueId`` ``('1.2.3.4.5')``, without ``home``
    and with ``home="urn:oid:1.2.555.6.7.8"``) and assertions: Failure with XDSMissingHomeCommunityId,
    Failure with XDSUnknownCommunity. Adapted, beyond the Toolkit (issue 13): the ITI-39 negatives a
    Responding Gateway owes too, in 15813's request shape: an unknown repositoryUniqueId is
    XDSUnknownRepositoryId, an unknown document in a known repository is XDSDocumentUniqueIdError, and
    either beside a good document is PartialSuccess that still delivers the good one; every error
    names DUO's homeCommunityId as location.
    """
    missing = await iti38(duo, get_documents(QueryParam.UNIQUE_ID, ["1.2.3.4.5"], home=None), wsdl_dir)
    assert query_status(missing) == ResponseStatus.FAILURE
    assert error_codes(missing) == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert extrinsic_objects(missing) == []
    unknown = await iti38(duo, get_documents(QueryParam.UNIQUE_ID, ["1.2.3.4.5"],
                                             home="urn:oid:1.2.555.6.7.8"), wsdl_dir)
    assert query_status(unknown) == ResponseStatus.FAILURE
    assert error_codes(unknown) == [ErrorCode.UNKNOWN_COMMUNITY]
    assert extrinsic_objects(unknown) == []

    [eo] = extrinsic_objects(await iti38(duo, find_documents(ONE), wsdl_dir))
    good = (HOME, repo_of(duo, 0), unique_id(eo))
    no_repository = (HOME, "1.2.555.6.7.8.9", unique_id(eo))
    no_document = (HOME, repo_of(duo, 0), "1.2.3.4.5")
    for bad, code in ((no_repository, ErrorCode.UNKNOWN_REPOSITORY_ID),
                      (no_document, ErrorCode.DOCUMENT_UNIQUE_ID_ERROR)):
        body, _ = await iti39(duo, retrieve_request(bad), wsdl_dir)
        assert retrieve_status(body) == ResponseStatus.FAILURE
        assert error_codes(body) == [code] and document_responses(body) == []
        body, reply = await iti39(duo, retrieve_request(good, bad), wsdl_dir)
        assert retrieve_status(body) == ResponseStatus.PARTIAL_SUCCESS
        assert error_codes(body) == [code]
        assert [d["DocumentUniqueId"] for d in document_responses(body)] == [good[2]]
        assert set(documents(body, reply)) == {good[2]}
        assert {e.get("location") for e in body.iter(f"{{{RS_NS}}}RegistryError")} == {HOME}


# ------------------------------------------------------------------------------------------------
# ITI-39
# ------------------------------------------------------------------------------------------------


async def test_12313(duo: Network, wsdl_dir: Path) -> None:
    """NIST 12313 "Retrieve multiple documents" (step retrieve_two).

    Same request (two DocumentRequests, HomeCommunityId, one RepositoryUniqueId, the two uniqueIds)
    and assertions: Success, exactly 2 DocumentResponses, the first with the configured
    HomeCommunityId and RepositoryUniqueId, each document the submitted one. Adapted: the documents
    are patient TWO's KOS and report (12318's two text documents), so "the submitted document" is the
    stored SR data set and a manifest of exactly the study's images. Beyond the Toolkit (issue 13):
    the same with one document from each of two repositories (patient SPREAD at both TLB hospitals),
    each DocumentResponse naming the repository it came from.
    """
    study = study_of(duo, TWO)
    eos = extrinsic_objects(await iti38(duo, find_documents(TWO), wsdl_dir))
    uids = [unique_id(eo) for eo in eos]
    body, reply = await iti39(duo, retrieve_request(*((HOME, repo_of(duo, 0), u) for u in uids)), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    responses = document_responses(body)
    assert len(responses) == 2
    assert (responses[0]["HomeCommunityId"], responses[0]["RepositoryUniqueId"]) == (HOME, repo_of(duo, 0))
    assert all(r["mimeType"] == MIME_DICOM for r in responses)
    got = documents(body, reply)
    assert sorted(got) == sorted(uids)
    for uid, data in got.items():
        assert_is_stored_document(duo, data, uid, study, 0)

    spread = extrinsic_objects(await iti38(duo, find_documents(SPREAD), wsdl_dir))
    wanted = sorted((HOME, str(slot(eo, "repositoryUniqueId")), unique_id(eo)) for eo in spread)
    assert [w[1] for w in wanted] == sorted([repo_of(duo, 0), repo_of(duo, 1)])
    body, reply = await iti39(duo, retrieve_request(*wanted), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    answered = sorted((r["HomeCommunityId"], r["RepositoryUniqueId"], r["DocumentUniqueId"])
                      for r in document_responses(body))
    assert answered == wanted
    got = documents(body, reply)
    for index in (0, 1):
        [uid] = [w[2] for w in wanted if w[1] == repo_of(duo, index)]
        assert_is_stored_document(duo, got[uid], uid, study_of(duo, SPREAD, index), index)


async def test_15813(duo: Network, wsdl_dir: Path) -> None:
    """NIST 15813 "Responding Gateway Retrieve test": sections RetrieveOne and RetrieveTwo.

    Same requests (the first, then both documents of 15811's TwoDocFindDocuments) and assertions:
    Success; one, then two DocumentResponses; HomeCommunityId, RepositoryUniqueId and DocumentUniqueId
    as requested (two different uniqueIds, each one requested); mimeType as in the query answer.
    Adapted: the two documents are patient TWO's KOS and report (see 15811); the document compare
    is as in 12313.
    """
    eos = extrinsic_objects(await iti38(duo, find_documents(TWO), wsdl_dir))
    home1, mime1 = eos[0].get("home"), eos[0].get("mimeType")
    repository = str(slot(eos[0], "repositoryUniqueId"))
    doc1, doc2 = unique_id(eos[0]), unique_id(eos[1])
    assert home1 is not None

    body, reply = await iti39(duo, retrieve_request((home1, repository, doc1)), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    [one] = document_responses(body)
    assert (one["HomeCommunityId"], one["RepositoryUniqueId"], one["DocumentUniqueId"]) == (
        home1, repository, doc1)
    assert one["mimeType"] == mime1
    assert_is_stored_document(duo, documents(body, reply)[doc1], doc1, study_of(duo, TWO), 0)

    body, reply = await iti39(duo, retrieve_request((home1, repository, doc1), (home1, repository, doc2)),
                              wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    first, second = document_responses(body)
    assert {first["DocumentUniqueId"], second["DocumentUniqueId"]} == {doc1, doc2}
    assert first["DocumentUniqueId"] != second["DocumentUniqueId"]
    assert first["HomeCommunityId"] == second["HomeCommunityId"] == home1
    assert first["RepositoryUniqueId"] == second["RepositoryUniqueId"] == repository
    assert first["mimeType"] == second["mimeType"] == mime1


# ------------------------------------------------------------------------------------------------
# On-Demand Documents: what DUO does instead (docs/kos-manifests.md)
# ------------------------------------------------------------------------------------------------


async def test_15829(duo: Network, wsdl_dir: Path) -> None:
    """NIST 15829 "Repeat retrieve": Gather_Inputs, finddocs, retrieve1, Publish_New_Document,
    retrieve2, Verify_Changed.

    The Toolkit asks an On-Demand Responding Gateway for the patient's single On-Demand entry
    (FindDocuments, Approved and Deprecated, ``$XDSDocumentEntryType`` On-Demand, ``home`` set),
    retrieves it, has the operator change the content, retrieves the same uniqueId again and requires
    the two documents' hashes to differ. DUO claims no On-Demand Documents Option: its KOS is a stable
    entry assembled on first retrieve (docs/kos-manifests.md), so the case is run adapted, step by step:

    - finddocs as sent finds no entry (Success, 0 ExtrinsicObjects: DUO has no On-Demand entries);
      asked for stable entries it finds the single document, stable, without hash or size yet;
    - retrieve1 as in the Toolkit (one DocumentResponse, home and repository as reported); afterwards
      the entry announces the SHA-1 and size of exactly those bytes (delayed assembly);
    - Publish_New_Document: an image is added to the study in the hospital's PACS;
    - retrieve2 of the same uniqueId is a Failure (XDSDocumentUniqueIdError): a stable document never
      changes, and the changed study is another document;
    - Verify_Changed, adapted: FindDocuments now announces the single document under a new uniqueId
      (and entryUUID), whose retrieve succeeds with a different hash and references the new image.
    """
    statuses = (EntryStatus.APPROVED, EntryStatus.DEPRECATED)
    on_demand_query = find_documents(GROWS, statuses=statuses, entry_types=(EntryType.ON_DEMAND,), home=HOME)
    on_demand = await iti38(duo, on_demand_query, wsdl_dir)
    assert query_status(on_demand) == ResponseStatus.SUCCESS and extrinsic_objects(on_demand) == []

    stable_query = find_documents(GROWS, statuses=statuses, entry_types=(EntryType.STABLE,), home=HOME)
    [eo] = extrinsic_objects(await iti38(duo, stable_query, wsdl_dir))
    assert eo.get("objectType") == EntryType.STABLE
    assert (slot(eo, "hash"), slot(eo, "size")) == (None, None)
    doc_uid, rep_uid, home = unique_id(eo), str(slot(eo, "repositoryUniqueId")), str(eo.get("home"))

    body, reply = await iti39(duo, retrieve_request((home, rep_uid, doc_uid)), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    [response] = document_responses(body)
    assert (response["HomeCommunityId"], response["RepositoryUniqueId"]) == (home, rep_uid)
    first = documents(body, reply)[doc_uid]
    hash1 = hashlib.sha1(first).hexdigest()
    [assembled] = extrinsic_objects(await iti38(duo, stable_query, wsdl_dir))
    assert unique_id(assembled) == doc_uid and assembled.get("id") == eo.get("id")
    assert (slot(assembled, "hash"), slot(assembled, "size")) == (hash1, str(len(first)))

    study = study_of(duo, GROWS)
    late = await add_image(duo, study)

    body, _ = await iti39(duo, retrieve_request((home, rep_uid, doc_uid)), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.FAILURE
    assert error_codes(body) == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR] and document_responses(body) == []

    [renewed] = extrinsic_objects(await iti38(duo, stable_query, wsdl_dir))
    new_uid = unique_id(renewed)
    assert new_uid != doc_uid and renewed.get("id") != eo.get("id")
    assert (slot(renewed, "hash"), slot(renewed, "size")) == (None, None)
    body, reply = await iti39(duo, retrieve_request((home, rep_uid, new_uid)), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.SUCCESS
    second = documents(body, reply)[new_uid]
    assert hashlib.sha1(second).hexdigest() != hash1
    assert kos_references(second) == images_of(study) | {late}
    assert kos_references(first) == images_of(study)


async def add_image(duo: Network, study: GeneratedStudy) -> str:
    """Publish_New_Document: a late image of the study's first series lands in the hospital's PACS."""
    template = next(ds for ds in study.instances if ds.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS)
    image = copy.deepcopy(template)
    uid = UID(f"2.25.{uuid.uuid5(uuid.NAMESPACE_OID, f'{template.SOPInstanceUID}|late').int}")
    image.SOPInstanceUID = uid
    image.file_meta.MediaStorageSOPInstanceUID = uid
    image.InstanceNumber = int(template.InstanceNumber) + 100
    ura = duo.net.hospitals[0].ura
    pacs = next(p for p in duo.pacs if p.hospital.ura == ura)
    await asyncio.to_thread(pacs.preload, [replace(study, instances=[image])])
    return str(uid)


async def test_15831(duo: Network, wsdl_dir: Path) -> None:
    """NIST 15831 "On Demand Retrieve to Responding Gateway without home" (section Missing_Home).

    Same request (one DocumentRequest with RepositoryUniqueId and DocumentUniqueId ``1.1.1`` and no
    HomeCommunityId) and assertion: Failure. Adapted: DUO has no On-Demand documents, so the rule is
    checked for the documents it has too: a DocumentRequest for a document DUO announced, in its
    repository, fails the same way when HomeCommunityId is left out; the error is
    XDSMissingHomeCommunityId (ITI-39 requires the element) either way.
    """
    body, _ = await iti39(duo, retrieve_request((None, "1.1.1", "1.1.1")), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.FAILURE
    assert error_codes(body) == [ErrorCode.MISSING_HOME_COMMUNITY_ID] and document_responses(body) == []

    [eo] = extrinsic_objects(await iti38(duo, find_documents(ONE), wsdl_dir))
    body, _ = await iti39(duo, retrieve_request((None, repo_of(duo, 0), unique_id(eo))), wsdl_dir)
    assert retrieve_status(body) == ResponseStatus.FAILURE
    assert error_codes(body) == [ErrorCode.MISSING_HOME_COMMUNITY_ID] and document_responses(body) == []


# ------------------------------------------------------------------------------------------------
# Restricted Metadata Update (ITI-92) and the XCA Persistence Option: not offered
# ------------------------------------------------------------------------------------------------


def rmu_request(*objects: str) -> etree._Element:
    """An ITI-92 body: lcm:SubmitObjectsRequest holding the update's SubmissionSet, DocumentEntry
    versions and HasMember associations (``objects``, ebRIM 3.0 XML in the ``rim`` prefix)."""
    return etree.fromstring(
        f'<lcm:SubmitObjectsRequest xmlns:lcm="{LCM_NS}" xmlns:rim="{RIM_NS}"><rim:RegistryObjectList>'
        + "".join(objects) + "</rim:RegistryObjectList></lcm:SubmitObjectsRequest>")


def updated_entry(eo: etree._Element, *, new_id: str, drop: Sequence[str] = (),
                  confidentiality: str | None = None) -> str:
    """A new version of the announced DocumentEntry ``eo``: same lid, a fresh id; ``drop`` removes
    slots (an incomplete update), ``confidentiality`` replaces the confidentialityCode."""
    entry = copy.deepcopy(eo)
    old_id = str(entry.get("id"))
    entry.set("id", new_id)
    for child in entry.iter():
        for attr in ("classifiedObject", "registryObject"):
            if child.get(attr) == old_id:
                child.set(attr, new_id)
    for name in drop:
        for s in entry.findall(f"rim:Slot[@name='{name}']", NS):
            entry.remove(s)
    if confidentiality is not None:
        for cl in entry.findall(f"rim:Classification[@classificationScheme='{Scheme.CONFIDENTIALITY_CODE}']",
                                NS):
            cl.set("nodeRepresentation", confidentiality)
    return etree.tostring(entry).decode()


#: classificationNode that makes a RegistryPackage a SubmissionSet.
SUBMISSION_SET_NODE = "urn:uuid:a54d6aa5-d40d-43f9-88c5-b4633d873bdd"


def submission_set(ss_id: str = "urn:uuid:2e2ce9a8-1f37-4c1d-9d2a-8d2a8b0c0001") -> str:
    return (f'<rim:RegistryPackage id="{ss_id}" xmlns:rim="{RIM_NS}"/>'
            f'<rim:Classification id="urn:uuid:2e2ce9a8-1f37-4c1d-9d2a-8d2a8b0c0002" xmlns:rim="{RIM_NS}" '
            f'classifiedObject="{ss_id}" classificationNode="{SUBMISSION_SET_NODE}"/>')


def has_member(target: str, previous_version: str | None = "1",
               ss_id: str = "urn:uuid:2e2ce9a8-1f37-4c1d-9d2a-8d2a8b0c0001", n: int = 3) -> str:
    version = (f'<rim:Slot name="PreviousVersion"><rim:ValueList><rim:Value>{previous_version}</rim:Value>'
               "</rim:ValueList></rim:Slot>") if previous_version is not None else ""
    return (f'<rim:Association id="urn:uuid:2e2ce9a8-1f37-4c1d-9d2a-8d2a8b0c{n:04d}" xmlns:rim="{RIM_NS}" '
            'associationType="urn:oasis:names:tc:ebxml-regrep:AssociationType:HasMember" '
            f'sourceObject="{ss_id}" targetObject="{target}">'
            '<rim:Slot name="SubmissionSetStatus"><rim:ValueList><rim:Value>Original</rim:Value>'
            f"</rim:ValueList></rim:Slot>{version}</rim:Association>")


async def assert_rmu_refused(duo: Network, wsdl_dir: Path, body: etree._Element, eo: etree._Element) -> None:
    """ITI-92 at each of DUO's XCA endpoints: a SOAP 1.2 Sender fault with subcode
    wsa:ActionNotSupported (DUO offers no such transaction), and the entry is what it was."""
    cfg = duo.gateway.config.xca_responding
    for path in (cfg.iti38_path, cfg.iti39_path):
        reply = await duo.call(path, RMU_ACTION, body)
        assert reply.status == 400, reply.raw[:300]
        fault = etree.fromstring(reply.raw).find("s:Body/s:Fault", NS)
        assert fault is not None
        assert fault.findtext("s:Code/s:Value", namespaces=NS, default="").endswith(":Sender")
        subcode = fault.find("s:Code/s:Subcode/s:Value", NS)
        assert subcode is not None and subcode.text is not None
        prefix, _, local = subcode.text.strip().rpartition(":")
        assert (subcode.nsmap.get(prefix or None), local) == (WSA_NS, "ActionNotSupported")
    after = await iti38(duo, get_documents(QueryParam.ENTRY_UUID, [str(eo.get("id"))], home=HOME), wsdl_dir)
    [unchanged] = extrinsic_objects(after)
    assert etree.tostring(unchanged, method="c14n") == etree.tostring(eo, method="c14n")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def kept_entry(duo: Network, wsdl_dir: Path) -> etree._Element:
    """The entry the RMU cases would update, as DUO announced it (asked once for the module)."""
    [eo] = extrinsic_objects(await iti38(duo, find_documents(KEPT), wsdl_dir))
    return eo


NEW_ID = "urn:uuid:7f3c1e9a-2b4d-4e6f-8a1b-3c5d7e9f0001"


async def test_12320(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 12320 "RMU, XCA Persistence Option, of DE with deprecated status" (rmu_update_confCode).

    The Toolkit sends ITI-92 to the Responding Gateway to change the confidentialityCode of an entry
    in the registry behind it. Not applicable: DUO does not claim the XCA Persistence Option (or any
    RMU actor), has no registry whose metadata could be updated (entries are derived from the PACS on
    every query) and no deprecated entries. What DUO owes such a request is checked instead: the same
    update (a new version of an entry DUO announced, with another confidentialityCode, in a
    SubmitObjectsRequest with SubmissionSet and HasMember/PreviousVersion) is refused with a SOAP
    Sender fault wsa:ActionNotSupported and the entry stays as it was.
    """
    eo = kept_entry
    body = rmu_request(submission_set(), updated_entry(eo, new_id=NEW_ID, confidentiality="R"),
                       has_member(NEW_ID))
    await assert_rmu_refused(duo, wsdl_dir, body, eo)


async def test_40030(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40030 "DocumentEntry Update" (update): ITI-92 with a new version of an entry (same lid).

    Not applicable (see 12320): refused with wsa:ActionNotSupported, the entry unchanged.
    """
    eo = kept_entry
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(submission_set(), updated_entry(eo, new_id=NEW_ID),
                                                        has_member(NEW_ID)), eo)


async def test_40030b(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40030b "No Original DocumentEntry": an update whose lid names no entry (must fail).

    Not applicable (see 12320): refused with wsa:ActionNotSupported before any lid is looked at; the
    entry used as the template is unchanged.
    """
    eo = kept_entry
    orphan = updated_entry(eo, new_id=NEW_ID).replace(str(eo.get("lid")),
                                                      "urn:uuid:7f3c1e9a-2b4d-4e6f-8a1b-3c5d7e9f0999")
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(submission_set(), orphan, has_member(NEW_ID)), eo)


async def test_40030c(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40030c "Wrong transaction used": an initial version (Provide-and-Register-shaped, no lid,
    no PreviousVersion) sent with the update action (must fail).

    Not applicable (see 12320): refused with wsa:ActionNotSupported; nothing is created.
    """
    eo = kept_entry
    initial = copy.deepcopy(eo)
    del initial.attrib["lid"]
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(
        submission_set(), etree.tostring(initial).decode(), has_member(str(eo.get("id")), None)), eo)


async def test_40030d(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40030d "DocumentEntry - Submit Incomplete Update": required attributes missing (must fail).

    Not applicable (see 12320): refused with wsa:ActionNotSupported, the entry unchanged.
    """
    eo = kept_entry
    incomplete = updated_entry(eo, new_id=NEW_ID, drop=("creationTime", "languageCode", "sourcePatientId"))
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(submission_set(), incomplete, has_member(NEW_ID)), eo)


async def test_40030e(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40030e "DocumentEntry - Submit Update to older version": PreviousVersion not the latest.

    Not applicable (see 12320): refused with wsa:ActionNotSupported, the entry unchanged.
    """
    eo = kept_entry
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(
        submission_set(), updated_entry(eo, new_id=NEW_ID), has_member(NEW_ID, previous_version="7")), eo)


async def test_40031(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40031 "DocumentEntry attribute Update": one update per attribute (here the
    confidentialityCode, as in its confCode section), then a query that must show it.

    Not applicable (see 12320): refused with wsa:ActionNotSupported, and the query shows the entry
    unchanged.
    """
    eo = kept_entry
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(
        submission_set(), updated_entry(eo, new_id=NEW_ID, confidentiality="V"), has_member(NEW_ID)), eo)


async def test_40037(duo: Network, wsdl_dir: Path, kept_entry: etree._Element) -> None:
    """NIST 40037 "DocumentEntry - Reject Multiple Updates For Same LogicalId": two new versions of one
    lid in one request (must fail).

    Not applicable (see 12320): refused with wsa:ActionNotSupported, the entry unchanged.
    """
    eo = kept_entry
    second_id = "urn:uuid:7f3c1e9a-2b4d-4e6f-8a1b-3c5d7e9f0002"
    await assert_rmu_refused(duo, wsdl_dir, rmu_request(
        submission_set(), updated_entry(eo, new_id=NEW_ID), updated_entry(eo, new_id=second_id),
        has_member(NEW_ID), has_member(second_id, n=4)), eo)
