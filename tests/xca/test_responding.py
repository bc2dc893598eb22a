"""DUO as XCA(-I) Responding Gateway, end to end: signed XUA in, Mitz per hospital, DICOM behind.

One network (DUO, two SimPacs hospitals, the Mitz simulator) serves the whole module: starting it
costs about two seconds, and the tests either only read or put back what they switch (a PACS down or
slow, a consent withdrawn) in a ``finally``. Every answer body is validated against the official XSDs.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path

import pytest
import pytest_asyncio
import structlog
from lxml import etree
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import BSN_OID, bsn_cx
from duo_gateway.saml import URA_OID
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.studies import GeneratedStudy
from duo_gateway.soap.envelope import SOAP11_NS, SOAP12_NS, WSA_NS
from duo_gateway.soap.mtom import XOP_NS
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca.codes import (
    BASIC_TEXT_SR_SOP_CLASS,
    DCM_SCHEME,
    DICOM_UID_REGISTRY,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    KOS_SOP_CLASS,
    MIME_DICOM,
    STUDY_INSTANCE_UID_ID_TYPE,
    Action,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    StoredQuery,
)
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.hl7 import Code, reference_id
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_request,
    find_documents,
    get_documents,
    make_slots,
    parse_adhoc_query_response,
)
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
    inline_documents,
    parse_retrieve_response,
)
from duo_gateway.xmldsig import load_signing_pair
from duo_gateway.xua import Claims, issue_assertion
from tests.xca.responding_harness import HOME, Network, Reply, running_network
from tests.xca.xsd import assert_valid

ALL, PARTIAL, NONE = "999911120", "900186021", "123456782"
H1, H2 = "00010001", "00010002"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
#: Generous for a loaded 2-core CI machine (a C-FIND plus a Mitz question took over 2 s there once).
DEADLINE_S = 4.0

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    async with running_network(
        tmp_path_factory.mktemp("duo"),
        xca_responding={"hospital_deadline_s": DEADLINE_S, "max_request_bytes": 256 * 1024},
    ) as network:
        yield network


# ------------------------------------------------------------------------------------------------
# helpers
# ------------------------------------------------------------------------------------------------


def repo(duo: Network, ura: str) -> str:
    return next(h.repository_unique_id for h in duo.net.hospitals if h.ura == ura)


def pacs_index(duo: Network, ura: str) -> int:
    return next(i for i, h in enumerate(duo.net.hospitals) if h.ura == ura)


def studies_of(duo: Network, ura: str, bsn: str) -> list[GeneratedStudy]:
    return [s for s in duo.studies[ura] if s.patient_id == bsn]


def is_kos(entry: DocumentEntry) -> bool:
    return entry.format_code is not None and entry.format_code.code == KOS_SOP_CLASS


def kos_of(resp: AdhocQueryResponse, ura: str, study_uid: str) -> DocumentEntry:
    return next(
        e for e in resp.entries
        if is_kos(e) and ura in e.author_uras
        and reference_id(study_uid, STUDY_INSTANCE_UID_ID_TYPE) in e.reference_ids
    )


async def iti38_body(duo: Network, body: etree._Element, wsdl_dir: Path) -> tuple[Reply, AdhocQueryResponse]:
    reply = await duo.call(duo.gateway.config.xca_responding.iti38_path, Action.ITI38, body)
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == Action.ITI38_RESPONSE
    assert_valid(wsdl_dir, reply.envelope.body)
    return reply, parse_adhoc_query_response(reply.envelope.body)


async def iti38(duo: Network, request: AdhocQueryRequest, wsdl_dir: Path) -> AdhocQueryResponse:
    return (await iti38_body(duo, build_adhoc_query_request(request), wsdl_dir))[1]


async def retrieve_call(
    duo: Network, path: str, action: str, body: etree._Element, wsdl_dir: Path, *, mtom: bool
) -> tuple[Reply, RetrieveDocumentSetResponse]:
    reply = await duo.call(path, action, body, mtom=mtom)
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == action + "Response"
    # The XOP infoset is what the schema describes: validate with the attachments inlined.
    assert_valid(wsdl_dir, inline_documents(reply.envelope.body, reply.parts))
    includes = list(reply.envelope.body.iter(f"{{{XOP_NS}}}Include"))
    if mtom:
        assert reply.content_type.startswith("multipart/related")
        assert 'type="application/xop+xml"' in reply.content_type
    else:
        assert reply.content_type.startswith("application/soap+xml")
        assert not includes and not reply.parts
    return reply, parse_retrieve_response(reply.envelope.body, reply.parts)


async def iti39(
    duo: Network, docs: list[DocumentRequest], wsdl_dir: Path, *, mtom: bool = False
) -> tuple[Reply, RetrieveDocumentSetResponse]:
    body = build_retrieve_request(RetrieveDocumentSetRequest(tuple(docs)))
    cfg = duo.gateway.config.xca_responding
    return await retrieve_call(duo, cfg.iti39_path, Action.ITI39, body, wsdl_dir, mtom=mtom)


async def rad75(
    duo: Network, req: RetrieveImagingDocumentSetRequest, wsdl_dir: Path, *, mtom: bool = True
) -> tuple[Reply, RetrieveDocumentSetResponse]:
    body = build_imaging_retrieve_request(req)
    cfg = duo.gateway.config.xca_responding
    return await retrieve_call(duo, cfg.rad75_path, Action.RAD75, body, wsdl_dir, mtom=mtom)


def study_request(
    study: GeneratedStudy, repository: str, *, images_only: bool = True, home: str | None = HOME
) -> StudyRequest:
    by_series: dict[str, list[DocumentRequest]] = {}
    for ds in study.instances:
        if images_only and ds.SOPClassUID == BASIC_TEXT_SR_SOP_CLASS:
            continue
        by_series.setdefault(str(ds.SeriesInstanceUID), []).append(
            DocumentRequest(repository, str(ds.SOPInstanceUID), home)
        )
    return StudyRequest(
        study.study_instance_uid, tuple(SeriesRequest(se, tuple(d)) for se, d in by_series.items())
    )


def dataset_bytes(part10: bytes) -> bytes:
    """Everything after the File Meta group: what DIMSE carries, so what must arrive unchanged.

    The group 0002 header is rewritten by whoever writes the file (implementation UID and version),
    so a network retrieve can only promise the data set itself byte for byte.
    """
    assert part10[128:132] == b"DICM"
    group_length = int.from_bytes(part10[140:144], "little")  # (0002,0000) UL, explicit VR LE
    return part10[144 + group_length:]


def stored_files(duo: Network, ura: str, study_uid: str) -> dict[str, bytes]:
    paths = duo.pacs[pacs_index(duo, ura)].instance_paths(study_uid)
    return {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes() for p in paths}


def fault_of(reply: Reply) -> tuple[str, str | None, str]:
    """(Code, Subcode local name, Reason) of a SOAP 1.2 fault answer."""
    root = parse_xml(reply.raw)
    assert root.tag == f"{{{SOAP12_NS}}}Envelope"
    ns = {"s": SOAP12_NS}
    code = root.findtext("s:Body/s:Fault/s:Code/s:Value", namespaces=ns) or ""
    sub = root.find("s:Body/s:Fault/s:Code/s:Subcode/s:Value", namespaces=ns)
    sub_local: str | None = None
    if sub is not None and sub.text:
        prefix, _, sub_local = sub.text.strip().rpartition(":")
        if sub_local in ("InvalidSecurity", "InvalidSecurityToken", "FailedAuthentication",
                         "FailedCheck", "MessageExpired"):
            assert sub.nsmap.get(prefix or None) == WSSE, "wsse subcode in the wrong namespace"
        if sub_local == "ActionNotSupported":
            assert sub.nsmap.get(prefix or None) == WSA_NS
    reason = root.findtext("s:Body/s:Fault/s:Reason/s:Text", namespaces=ns) or ""
    return code.rpartition(":")[2], sub_local, reason


@contextmanager
def pacs_behaviour(duo: Network, ura: str, behaviour: Misbehaviour) -> Iterator[None]:
    pacs = duo.pacs[pacs_index(duo, ura)]
    pacs.set_behaviour(behaviour)
    try:
        yield
    finally:
        pacs.set_behaviour(Misbehaviour())


# ------------------------------------------------------------------------------------------------
# ITI-38: consent, availability, return types
# ------------------------------------------------------------------------------------------------


async def test_find_documents_honours_consent_per_hospital(duo: Network, wsdl_dir: Path) -> None:
    everywhere = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    assert everywhere.status == ResponseStatus.SUCCESS
    kos = [e for e in everywhere.entries if is_kos(e)]
    assert {u for e in kos for u in e.author_uras} == {H1, H2}
    assert len(kos) == 4  # 2 studies x 2 hospitals
    assert all(e.home == HOME for e in everywhere.entries)
    reports = [e for e in everywhere.entries if e not in kos]
    assert reports and all(e.reference_ids for e in reports)

    partial = await iti38(duo, find_documents(bsn_cx(PARTIAL)), wsdl_dir)
    assert partial.status == ResponseStatus.SUCCESS
    assert {u for e in partial.entries for u in e.author_uras} == {H1}

    nothing = await iti38(duo, find_documents(bsn_cx(NONE)), wsdl_dir)
    assert (nothing.status, nothing.entries) == (ResponseStatus.SUCCESS, [])


async def test_a_hospital_that_is_down_makes_partial_success(duo: Network, wsdl_dir: Path) -> None:
    with pacs_behaviour(duo, H2, Misbehaviour(down=True)):
        resp = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert {u for e in resp.entries for u in e.author_uras} == {H1}
    assert [e.error_code for e in resp.errors] == [ErrorCode.REGISTRY_NOT_AVAILABLE]
    assert H2 in resp.errors[0].code_context and resp.errors[0].location == HOME


async def test_a_slow_hospital_is_cut_off_at_the_deadline(duo: Network, wsdl_dir: Path) -> None:
    with pacs_behaviour(duo, H2, Misbehaviour(delay_ms=int(DEADLINE_S * 1000) + 2000)):
        started = time.monotonic()
        resp = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
        elapsed = time.monotonic() - started
    assert elapsed < DEADLINE_S + 0.75, f"answered after {elapsed:.2f} s"
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert {u for e in resp.entries for u in e.author_uras} == {H1}
    assert len([e for e in resp.entries if is_kos(e)]) == 2
    assert [e.error_code for e in resp.errors] == [ErrorCode.REGISTRY_NOT_AVAILABLE]
    assert H2 in resp.errors[0].code_context and resp.errors[0].location == HOME


async def test_object_ref(duo: Network, wsdl_dir: Path) -> None:
    leaf = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    resp = await iti38(duo, find_documents(bsn_cx(ALL), return_type=ReturnType.OBJECT_REF), wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS
    assert resp.objects and not resp.entries
    assert all(getattr(o, "home", None) == HOME for o in resp.objects)
    assert sorted(getattr(o, "id", "") for o in resp.objects) == sorted(e.entry_uuid for e in leaf.entries)


# ------------------------------------------------------------------------------------------------
# ITI-38: metadata, filters, stored queries
# ------------------------------------------------------------------------------------------------


async def test_kos_entry_metadata_matches_the_study(duo: Network, wsdl_dir: Path) -> None:
    resp = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    hospital = duo.net.hospitals[0]
    for study in studies_of(duo, hospital.ura, ALL):
        entry = kos_of(resp, hospital.ura, study.study_instance_uid)
        assert entry.home == HOME
        assert entry.mime_type == MIME_DICOM
        assert entry.repository_unique_id == hospital.repository_unique_id
        assert entry.patient_id == f"{ALL}^^^&{BSN_OID}&ISO"
        assert entry.source_patient_id == entry.patient_id
        assert entry.format_code == Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY, entry.format_code.display)
        assert entry.reference_ids == (f"{study.study_instance_uid}^^^^{STUDY_INSTANCE_UID_ID_TYPE}",)
        assert entry.service_start_time == study.study_date + study.study_time[:6]
        assert entry.entry_uuid.startswith("urn:uuid:") and entry.unique_id.startswith("2.25.")
        (author,) = entry.authors
        (xon,) = author.institutions
        assert (xon.name, xon.identifier, xon.authority_oid) == (hospital.name, hospital.ura, URA_OID)
        modalities = [c for c in entry.event_codes if c.scheme == DCM_SCHEME]
        acquisition = [m for m in study.modalities if m not in ("SR", "KO", "PR", "DOC")]
        assert [c.code for c in modalities] == acquisition
        assert all(c.display for c in entry.event_codes)
        assert entry.class_code and entry.type_code and entry.confidentiality_codes
        assert entry.healthcare_facility_type_code and entry.practice_setting_code


async def test_kos_entry_carries_the_body_part(duo: Network, wsdl_dir: Path) -> None:
    from duo_gateway.xca.codes import BODY_PART_SNOMED, SNOMED_CT

    resp = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    study = studies_of(duo, H1, ALL)[0]
    entry = kos_of(resp, H1, study.study_instance_uid)
    region = BODY_PART_SNOMED[study.body_part]
    assert Code(region[0], SNOMED_CT, region[1]) in entry.event_codes


async def test_find_documents_by_reference_id(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H2, ALL)[0]
    ref = reference_id(study.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE)
    resp = await iti38(duo, find_documents(bsn_cx(ALL), reference_ids=[ref]), wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS
    assert resp.entries and all(e.reference_ids == (ref,) for e in resp.entries)
    assert {u for e in resp.entries for u in e.author_uras} == {H2}
    assert len([e for e in resp.entries if is_kos(e)]) == 1
    assert len([e for e in resp.entries if not is_kos(e)]) == (1 if study.has_report else 0)
    assert all(e.home == HOME for e in resp.entries)


async def test_get_documents_by_unique_id_and_by_entry_uuid(duo: Network, wsdl_dir: Path) -> None:
    found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    wanted = [found.entries[0], found.entries[-1]]
    by_uid = await iti38(duo, get_documents(HOME, unique_ids=[e.unique_id for e in wanted]), wsdl_dir)
    assert by_uid.status == ResponseStatus.SUCCESS
    assert sorted(e.entry_uuid for e in by_uid.entries) == sorted(e.entry_uuid for e in wanted)
    assert all(e.home == HOME for e in by_uid.entries)
    # GetDocuments answers with the very entries FindDocuments gave
    assert sorted(by_uid.entries, key=lambda e: e.entry_uuid) == sorted(wanted, key=lambda e: e.entry_uuid)

    by_uuid = await iti38(duo, get_documents(HOME, entry_uuids=[wanted[0].entry_uuid]), wsdl_dir)
    assert by_uuid.status == ResponseStatus.SUCCESS
    assert by_uuid.entries == [wanted[0]]

    refs = await iti38(
        duo, get_documents(HOME, unique_ids=[wanted[0].unique_id], return_type=ReturnType.OBJECT_REF),
        wsdl_dir,
    )
    assert [(getattr(o, "id", None), getattr(o, "home", None)) for o in refs.objects] == \
        [(wanted[0].entry_uuid, HOME)]


async def test_service_start_time_window(duo: Network, wsdl_dir: Path) -> None:
    kos_all = [e for e in (await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)).entries if is_kos(e)]
    starts = sorted({e.service_start_time or "" for e in kos_all})
    assert len(starts) >= 2
    low = starts[1]  # inclusive lower bound: the earliest study falls out
    resp = await iti38(duo, find_documents(bsn_cx(ALL), service_start_from=low), wsdl_dir)
    assert resp.entries and all((e.service_start_time or "") >= low for e in resp.entries)
    assert {e.entry_uuid for e in kos_all if (e.service_start_time or "") >= low} == \
        {e.entry_uuid for e in resp.entries if is_kos(e)}
    # an exclusive upper bound at that same time keeps only what is strictly earlier
    resp = await iti38(duo, find_documents(bsn_cx(ALL), service_start_to=low), wsdl_dir)
    assert {e.entry_uuid for e in resp.entries if is_kos(e)} == \
        {e.entry_uuid for e in kos_all if (e.service_start_time or "") < low}
    # a window before every study finds nothing, successfully
    empty = await iti38(duo, find_documents(bsn_cx(ALL), service_start_to="19000101"), wsdl_dir)
    assert (empty.status, empty.entries) == (ResponseStatus.SUCCESS, [])


async def test_format_code_filter(duo: Network, wsdl_dir: Path) -> None:
    kos_code = Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY)
    sr_code = Code(BASIC_TEXT_SR_SOP_CLASS, DICOM_UID_REGISTRY)
    only_kos = await iti38(duo, find_documents(bsn_cx(ALL), format_codes=[kos_code]), wsdl_dir)
    assert len(only_kos.entries) == 4 and all(is_kos(e) for e in only_kos.entries)
    only_sr = await iti38(duo, find_documents(bsn_cx(ALL), format_codes=[sr_code]), wsdl_dir)
    reports = sum(1 for ura in (H1, H2) for s in studies_of(duo, ura, ALL) if s.has_report)
    assert reports and len(only_sr.entries) == reports
    assert all(e.format_code and e.format_code.code == BASIC_TEXT_SR_SOP_CLASS for e in only_sr.entries)
    both = await iti38(duo, find_documents(bsn_cx(ALL), format_codes=[kos_code, sr_code]), wsdl_dir)
    assert len(both.entries) == 4 + reports


async def test_unknown_stored_query(duo: Network, wsdl_dir: Path) -> None:
    req = AdhocQueryRequest(
        "urn:uuid:00000000-0000-4000-8000-000000000000",
        make_slots({QueryParam.PATIENT_ID: bsn_cx(ALL)}),
    )
    resp = await iti38(duo, req, wsdl_dir)
    assert resp.status == ResponseStatus.FAILURE and not resp.objects
    assert [e.error_code for e in resp.errors] == [ErrorCode.UNKNOWN_STORED_QUERY]


async def test_missing_required_parameter(duo: Network, wsdl_dir: Path) -> None:
    no_status = AdhocQueryRequest(
        StoredQuery.FIND_DOCUMENTS, make_slots({QueryParam.PATIENT_ID: bsn_cx(ALL)})
    )
    no_patient = AdhocQueryRequest(
        StoredQuery.FIND_DOCUMENTS, make_slots({QueryParam.STATUS: [EntryStatus.APPROVED]})
    )
    no_reference = AdhocQueryRequest(
        StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID, find_documents(bsn_cx(ALL)).slots
    )
    for req, missing in ((no_status, QueryParam.STATUS), (no_patient, QueryParam.PATIENT_ID),
                         (no_reference, QueryParam.REFERENCE_ID_LIST)):
        resp = await iti38(duo, req, wsdl_dir)
        assert resp.status == ResponseStatus.FAILURE and not resp.objects
        assert [e.error_code for e in resp.errors] == [ErrorCode.STORED_QUERY_MISSING_PARAM]
        assert missing in resp.errors[0].code_context


async def test_invalid_bsn_is_an_unknown_patient_and_not_echoed(duo: Network, wsdl_dir: Path) -> None:
    wrong = "999911121"  # one digit off ALL: fails the 11-proef
    reply, resp = await iti38_body(duo, build_adhoc_query_request(find_documents(bsn_cx(wrong))), wsdl_dir)
    assert resp.status == ResponseStatus.FAILURE and not resp.objects
    assert [e.error_code for e in resp.errors] == [ErrorCode.UNKNOWN_PATIENT_ID]
    assert wrong.encode() not in reply.raw
    # a valid number under another assigning authority is not a BSN either
    reply, resp = await iti38_body(
        duo, build_adhoc_query_request(find_documents(f"{ALL}^^^&2.16.840.1.113883.2.4.6.99&ISO")), wsdl_dir
    )
    assert [e.error_code for e in resp.errors] == [ErrorCode.UNKNOWN_PATIENT_ID]
    assert ALL.encode() not in reply.raw


async def test_home_community_rules(duo: Network, wsdl_dir: Path) -> None:
    other = "urn:oid:2.999.77"
    unknown = await iti38(duo, find_documents(bsn_cx(ALL), home=other), wsdl_dir)
    assert unknown.status == ResponseStatus.FAILURE and not unknown.objects
    assert [e.error_code for e in unknown.errors] == [ErrorCode.UNKNOWN_COMMUNITY]
    # a bare OID naming DUO is DUO (lenient in)
    bare = await iti38(duo, find_documents(bsn_cx(ALL), home=HOME.removeprefix("urn:oid:")), wsdl_dir)
    assert bare.status == ResponseStatus.SUCCESS and bare.entries

    some_uid = bare.entries[0].unique_id
    no_home = AdhocQueryRequest(StoredQuery.GET_DOCUMENTS, make_slots({QueryParam.UNIQUE_ID: [some_uid]}))
    missing = await iti38(duo, no_home, wsdl_dir)
    assert missing.status == ResponseStatus.FAILURE and not missing.objects
    assert [e.error_code for e in missing.errors] == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    wrong = await iti38(duo, get_documents(other, unique_ids=[some_uid]), wsdl_dir)
    assert [e.error_code for e in wrong.errors] == [ErrorCode.UNKNOWN_COMMUNITY]


# ------------------------------------------------------------------------------------------------
# ITI-39
# ------------------------------------------------------------------------------------------------


async def test_iti39_kos_references_every_image_of_the_study(duo: Network, wsdl_dir: Path) -> None:
    found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    for mtom in (False, True):
        study = studies_of(duo, H1, ALL)[int(mtom)]
        entry = kos_of(found, H1, study.study_instance_uid)
        request = DocumentRequest(entry.repository_unique_id or "", entry.unique_id, HOME)
        reply, resp = await iti39(duo, [request], wsdl_dir, mtom=mtom)
        assert resp.status == ResponseStatus.SUCCESS and not resp.errors
        (doc,) = resp.documents
        assert (doc.home, doc.repository_unique_id, doc.document_unique_id, doc.mime_type) == \
            (HOME, repo(duo, H1), entry.unique_id, MIME_DICOM)
        assert isinstance(doc.data, bytes)
        kos = dcmread(BytesIO(doc.data))
        assert kos.SOPClassUID == KOS_SOP_CLASS
        assert kos.SOPInstanceUID == entry.unique_id == kos.file_meta.MediaStorageSOPInstanceUID
        assert kos.StudyInstanceUID == study.study_instance_uid
        assert kos.PatientID == ALL
        (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
        assert evidence.StudyInstanceUID == study.study_instance_uid
        referenced = {
            (str(se.SeriesInstanceUID), str(sop.ReferencedSOPClassUID), str(sop.ReferencedSOPInstanceUID))
            for se in evidence.ReferencedSeriesSequence for sop in se.ReferencedSOPSequence
        }
        stored = [dcmread(BytesIO(b), stop_before_pixels=True)
                  for b in stored_files(duo, H1, study.study_instance_uid).values()]
        images = {(str(d.SeriesInstanceUID), str(d.SOPClassUID), str(d.SOPInstanceUID))
                  for d in stored if d.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS}
        assert images and referenced == images
        if mtom:
            # the answer really carried the document as an attachment, not inline
            assert len(reply.parts) == 1 and next(iter(reply.parts.values())) == doc.data
        else:
            assert base64.b64encode(doc.data) in reply.raw


async def _retrieve_report(duo: Network, wsdl_dir: Path) -> tuple[bytes, bytes, str]:
    """(delivered, stored) bytes of one SR report of ALL at H2, via ITI-38 then ITI-39 (MTOM)."""
    found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    study = next(s for s in studies_of(duo, H2, ALL) if s.has_report)
    report = next(
        e for e in found.entries
        if not is_kos(e) and H2 in e.author_uras
        and reference_id(study.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE) in e.reference_ids
    )
    assert report.mime_type == MIME_DICOM
    assert report.format_code == Code(BASIC_TEXT_SR_SOP_CLASS, DICOM_UID_REGISTRY, "Basic Text SR")
    _, resp = await iti39(duo, [DocumentRequest(repo(duo, H2), report.unique_id, HOME)], wsdl_dir, mtom=True)
    assert resp.status == ResponseStatus.SUCCESS
    (doc,) = resp.documents
    assert (doc.document_unique_id, doc.mime_type) == (report.unique_id, MIME_DICOM)
    assert isinstance(doc.data, bytes)
    return doc.data, stored_files(duo, H2, study.study_instance_uid)[report.unique_id], report.unique_id


async def test_iti39_report_is_the_stored_sr(duo: Network, wsdl_dir: Path) -> None:
    delivered, stored, uid = await _retrieve_report(duo, wsdl_dir)
    got, original = dcmread(BytesIO(delivered)), dcmread(BytesIO(stored))
    assert got.SOPClassUID == BASIC_TEXT_SR_SOP_CLASS and got.SOPInstanceUID == uid
    assert got.file_meta.TransferSyntaxUID == original.file_meta.TransferSyntaxUID
    assert dataset_bytes(delivered) == dataset_bytes(stored)


async def test_iti39_errors(duo: Network, wsdl_dir: Path) -> None:
    found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    good = kos_of(found, H1, studies_of(duo, H1, ALL)[0].study_instance_uid)
    r1 = repo(duo, H1)
    cases = [
        (DocumentRequest(r1, "2.25.1234567890", HOME), ErrorCode.DOCUMENT_UNIQUE_ID_ERROR),
        (DocumentRequest(r1, good.unique_id, None), ErrorCode.MISSING_HOME_COMMUNITY_ID),
        (DocumentRequest(r1, good.unique_id, "urn:oid:2.999.77"), ErrorCode.UNKNOWN_COMMUNITY),
        (DocumentRequest("2.999.404", good.unique_id, HOME), ErrorCode.UNKNOWN_REPOSITORY_ID),
    ]
    for request, code in cases:
        _, resp = await iti39(duo, [request], wsdl_dir)
        assert resp.status == ResponseStatus.FAILURE and not resp.documents, code
        assert [e.error_code for e in resp.errors] == [code]
        assert resp.errors[0].location == HOME
    # one good and one bad: the good one is delivered, the answer is partial
    _, resp = await iti39(duo, [DocumentRequest(r1, good.unique_id, HOME), cases[0][0]], wsdl_dir)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in resp.documents] == [good.unique_id]
    assert [e.error_code for e in resp.errors] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR]


async def test_iti39_after_consent_withdrawn(duo: Network, wsdl_dir: Path) -> None:
    found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    entry = kos_of(found, H2, studies_of(duo, H2, ALL)[0].study_instance_uid)
    request = DocumentRequest(repo(duo, H2), entry.unique_id, HOME)
    duo.mitz.set_consent(ALL, H2, False)
    try:
        reply, resp = await iti39(duo, [request], wsdl_dir)
    finally:
        duo.mitz.set_consent(ALL, H2, True)
    assert resp.status == ResponseStatus.FAILURE and not resp.documents
    assert [e.error_code for e in resp.errors] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR]
    assert b"consent" not in reply.raw.lower()  # the requester learns "not available", not why
    # and with consent back, the same request delivers
    _, again = await iti39(duo, [request], wsdl_dir)
    assert again.status == ResponseStatus.SUCCESS and len(again.documents) == 1


# ------------------------------------------------------------------------------------------------
# RAD-75
# ------------------------------------------------------------------------------------------------


async def test_rad75_whole_study(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H1, ALL)[0]
    stored = stored_files(duo, H1, study.study_instance_uid)
    request = study_request(study, repo(duo, H1), images_only=False)
    reply, resp = await rad75(
        duo, RetrieveImagingDocumentSetRequest((request,), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir
    )
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    assert sorted(d.document_unique_id for d in resp.documents) == sorted(stored)
    assert len(reply.parts) == len(stored)
    for doc in resp.documents:
        assert (doc.home, doc.repository_unique_id, doc.mime_type) == (HOME, repo(duo, H1), MIME_DICOM)
        assert isinstance(doc.data, bytes)
        ds = dcmread(BytesIO(doc.data))
        assert ds.SOPInstanceUID == doc.document_unique_id
        assert ds.StudyInstanceUID == study.study_instance_uid
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert dataset_bytes(doc.data) == dataset_bytes(stored[doc.document_unique_id])


async def test_rad75_plain_soap_gets_inline_base64(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H2, ALL)[1]
    stored = stored_files(duo, H2, study.study_instance_uid)
    request = study_request(study, repo(duo, H2))
    _, resp = await rad75(
        duo, RetrieveImagingDocumentSetRequest((request,), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir,
        mtom=False,
    )
    assert resp.status == ResponseStatus.SUCCESS
    assert resp.documents and len(resp.documents) == sum(len(se.documents) for se in request.series)
    for doc in resp.documents:
        assert isinstance(doc.data, bytes)
        assert dataset_bytes(doc.data) == dataset_bytes(stored[doc.document_unique_id])


async def test_rad75_missing_instance_is_partial(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H1, ALL)[1]
    request = study_request(study, repo(duo, H1))
    first = request.series[0]
    ghost = "2.25.987654321987654321"
    series = (SeriesRequest(first.series_instance_uid,
                            (*first.documents, DocumentRequest(repo(duo, H1), ghost, HOME))),
              *request.series[1:])
    _, resp = await rad75(
        duo,
        RetrieveImagingDocumentSetRequest((StudyRequest(study.study_instance_uid, series),),
                                          (EXPLICIT_VR_LITTLE_ENDIAN,)),
        wsdl_dir,
    )
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert len(resp.documents) == sum(len(se.documents) for se in request.series)
    assert [(e.error_code, e.code_context) for e in resp.errors] == [
        (ErrorCode.DOCUMENT_UNIQUE_ID_ERROR,
         f"{study.study_instance_uid}:{first.series_instance_uid}:{ghost}")
    ]


async def test_rad75_transfer_syntax_not_available(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H1, ALL)[0]
    request = study_request(study, repo(duo, H1))
    _, resp = await rad75(duo, RetrieveImagingDocumentSetRequest((request,), (JPEG_BASELINE,)), wsdl_dir)
    assert resp.status == ResponseStatus.FAILURE and not resp.documents
    wanted = {d.document_unique_id for se in request.series for d in se.documents}
    assert {e.error_code for e in resp.errors} == {ErrorCode.REPOSITORY_ERROR}
    assert len(resp.errors) == len(wanted)
    assert all(e.location == HOME for e in resp.errors)
    assert {uid for uid in wanted if any(uid in e.code_context for e in resp.errors)} == wanted


async def test_rad75_implicit_vr_is_converted(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H2, ALL)[0]
    stored = stored_files(duo, H2, study.study_instance_uid)
    request = study_request(study, repo(duo, H2))
    _, resp = await rad75(
        duo, RetrieveImagingDocumentSetRequest((request,), (IMPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir
    )
    assert resp.status == ResponseStatus.SUCCESS and resp.documents
    for doc in resp.documents:
        assert isinstance(doc.data, bytes)
        got = dcmread(BytesIO(doc.data))
        assert got.file_meta.TransferSyntaxUID == IMPLICIT_VR_LITTLE_ENDIAN
        original = dcmread(BytesIO(stored[doc.document_unique_id]))
        assert original.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert _same_data(got, original)


def _same_data(a: Dataset, b: Dataset) -> bool:
    return [(e.tag, e.value) for e in a] == [(e.tag, e.value) for e in b]


# ------------------------------------------------------------------------------------------------
# the HTTP/SOAP edge: XUA and hostile input
# ------------------------------------------------------------------------------------------------


async def test_xua_failures_are_sender_faults(duo: Network) -> None:
    path = duo.gateway.config.xca_responding.iti38_path
    body = build_adhoc_query_request(find_documents(bsn_cx(ALL)))
    rogue_key, rogue_cert = load_signing_pair(duo.pki.rogue_client.key, duo.pki.rogue_client.cert)
    untrusted = issue_assertion(
        Claims(uzi="000095254", role="01.039", ura="00000666", organisation_type="V6", purpose="TREAT"),
        issuer="urn:oid:2.16.528.1.1007.99.777", audience=HOME, key=rogue_key, cert=rogue_cert,
        now=datetime.now(UTC),
    )
    cases = {
        "none": (await duo.call(path, Action.ITI38, body, with_xua=False), "InvalidSecurity"),
        "expired": (
            await duo.call(path, Action.ITI38, body, assertion=duo.assertion(
                now=datetime.now(UTC) - timedelta(hours=2))),
            "MessageExpired",
        ),
        "audience": (
            await duo.call(path, Action.ITI38, body, assertion=duo.assertion(audience="urn:oid:2.999.5")),
            "FailedAuthentication",
        ),
        "untrusted": (await duo.call(path, Action.ITI38, body, assertion=untrusted), "FailedAuthentication"),
    }
    for name, (reply, subcode) in cases.items():
        assert reply.status == 400, name
        code, sub, _reason = fault_of(reply)
        assert code == "Sender", name
        assert sub == subcode, name
        assert ALL.encode() not in reply.raw


async def test_soap11_is_a_version_mismatch(duo: Network) -> None:
    env = (f'<e:Envelope xmlns:e="{SOAP11_NS}"><e:Body>'
           '<x xmlns="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"/></e:Body></e:Envelope>').encode()
    reply = await duo.post(duo.gateway.config.xca_responding.iti38_path, env, 'text/xml; charset=UTF-8')
    code, _sub, _reason = fault_of(reply)
    assert code == "VersionMismatch"
    assert parse_xml(reply.raw).find(f"{{{SOAP12_NS}}}Header/{{{SOAP12_NS}}}Upgrade") is not None


async def test_hostile_bodies_are_sender_faults(duo: Network) -> None:
    path = duo.gateway.config.xca_responding.iti38_path
    ct = f'application/soap+xml; charset=UTF-8; action="{Action.ITI38}"'
    bomb = (b'<?xml version="1.0"?><!DOCTYPE l [<!ENTITY a "aaaaaaaaaa">'
            b'<!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;"><!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;">]>'
            b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&c;</s:Body></s:Envelope>')
    for data in (b"this is not XML", bomb, b"<unclosed><tag>"):
        reply = await duo.post(path, data, ct)
        assert reply.status == 400, data[:30]
        assert fault_of(reply)[0] == "Sender"
    oversized = b"<s:Envelope xmlns:s='http://www.w3.org/2003/05/soap-envelope'>" + b" " * (512 * 1024)
    reply = await duo.post(path, oversized, ct)  # announced by Content-Length
    assert reply.status == 400 and fault_of(reply)[0] == "Sender"

    async def chunks() -> AsyncIterator[bytes]:
        for _ in range(64):
            yield b" " * 8192

    # chunked, so no Content-Length to refuse up front: the bounded read must stop it
    async with duo.session.post(duo.url + path, data=chunks(), headers={"Content-Type": ct}) as r:
        assert r.status == 400
        code, _, reason = fault_of(Reply(r.status, None, {}, await r.read(), ""))
    assert code == "Sender" and "larger than" in reason


async def test_wrong_action_is_action_not_supported(duo: Network) -> None:
    body = build_adhoc_query_request(find_documents(bsn_cx(ALL)))
    reply = await duo.call(duo.gateway.config.xca_responding.iti38_path, Action.ITI39, body)
    assert reply.status == 400
    code, sub, _ = fault_of(reply)
    assert (code, sub) == ("Sender", "ActionNotSupported")


# ------------------------------------------------------------------------------------------------
# audit and logs
# ------------------------------------------------------------------------------------------------


async def test_audit_records_and_logs_without_bsn(duo: Network, wsdl_dir: Path) -> None:
    audit_file = duo.gateway.config.storage.path / "audit" / "audit.log"
    with structlog.testing.capture_logs() as logs:
        found = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
        entry = kos_of(found, H1, studies_of(duo, H1, ALL)[0].study_instance_uid)
        await iti39(duo, [DocumentRequest(repo(duo, H1), entry.unique_id, HOME)], wsdl_dir)
        study = studies_of(duo, H1, ALL)[0]
        await rad75(duo, RetrieveImagingDocumentSetRequest(
            (study_request(study, repo(duo, H1)),), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir)
        await iti38(duo, find_documents(bsn_cx("999911121")), wsdl_dir)  # an invalid BSN, refused

    def events() -> dict[str, list[etree._Element]]:
        out: dict[str, list[etree._Element]] = {}
        if audit_file.exists():
            for record in parse_file_records(audit_file.read_bytes()).records:
                ev = parse_xml(parse_message(record).msg)
                out.setdefault(ev.xpath("string(EventIdentification/EventTypeCode/@csd-code)"), []).append(ev)
        return out

    wanted = {"ITI-38": "110112", "ITI-39": "110106", "RAD-75": "110104"}
    deadline = time.monotonic() + 10
    while not all(t in events() for t in wanted) and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the auditor writes behind a queue; the file is all we can watch
    found_events = events()
    for txn, event_id in wanted.items():
        assert txn in found_events, f"no {txn} audit record"
        ids = {e.xpath("string(EventIdentification/EventID/@csd-code)") for e in found_events[txn]}
        assert ids == {event_id}, txn
        patients = {e.xpath("string(ParticipantObjectIdentification[@ParticipantObjectTypeCode='1']"
                            "/@ParticipantObjectID)")
                    for e in found_events[txn]}
        assert any(ALL in p for p in patients), (txn, patients)
    rad75_events = found_events["RAD-75"]
    assert any(study.study_instance_uid.encode() in etree.tostring(e) for e in rad75_events)

    text = repr(logs)
    for patient in duo.net.patients:
        assert patient.bsn not in text
        assert patient.name.split("^")[0] not in text
    assert "999911121" not in text


async def test_iti39_report_retrieval_closes_the_pacs_stream(duo: Network, wsdl_dir: Path) -> None:
    """The C-GET stream (and its association) ends inside the request, not at garbage collection:
    otherwise each report retrieval holds one of the hospital's few associations for an unknown time."""
    with structlog.testing.capture_logs() as logs:
        await _retrieve_report(duo, wsdl_dir)
        closed = [e for e in logs if e["event"] == "pacs_retrieve"]
    assert len(closed) == 1 and closed[0]["delivered"] == 1
