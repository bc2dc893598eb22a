from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp.test_utils import TestServer
from lxml import etree
from pydicom import dcmread

from duo_gateway.bsn import bsn_cx
from duo_gateway.sim.config import SimNetworkConfig, default_network
from duo_gateway.sim.xca import XcaCommunitySimulator, study_record
from duo_gateway.soap.envelope import (
    SOAP11_NS,
    SOAP12_NS,
    Addressing,
    SoapFault,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.soap.mtom import build_mtom, parse_content_type, parse_mtom
from duo_gateway.xca import (
    Action,
    AdhocQueryRequest,
    AdhocQueryResponse,
    Code,
    DocumentRequest,
    ErrorCode,
    ObjectRef,
    ResponseStatus,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    ReturnType,
    SeriesRequest,
    StoredQuery,
    StudyRequest,
    build_adhoc_query_request,
    build_imaging_retrieve_request,
    build_retrieve_request,
    find_documents,
    get_documents,
    parse_adhoc_query_response,
    parse_retrieve_response,
)
from duo_gateway.xca.codes import (
    BASIC_TEXT_SR_SOP_CLASS,
    DICOM_UID_REGISTRY,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    KOS_SOP_CLASS,
    STUDY_INSTANCE_UID_ID_TYPE,
)
from duo_gateway.xca.hl7 import reference_id
from duo_gateway.xca.metadata import study_kos_unique_id
from duo_gateway.xca.query import make_slots
from duo_gateway.xca.retrieve import inline_documents
from tests.xca.xsd import assert_valid

WSDL_BINDING = "{urn:ihe:iti:xds-b:2007}RespondingGateway_Binding_Soap12"


@pytest.fixture(scope="module")
def net() -> SimNetworkConfig:
    base = default_network()
    # Two studies per patient and institution: index 0 carries a report, index 1 does not.
    noord = base.communities[0].model_copy(update={"studies_per_patient": 2})
    return base.model_copy(update={"communities": [noord, base.communities[1]]})


@pytest.fixture(scope="module")
def sim(net: SimNetworkConfig) -> XcaCommunitySimulator:
    return XcaCommunitySimulator(net.communities[0], net)


@dataclass
class Peer:
    url: str
    session: aiohttp.ClientSession
    sim: XcaCommunitySimulator

    @property
    def home(self) -> str:
        return self.sim.home

    @property
    def repo(self) -> str:
        return self.sim.repository_unique_id


@pytest.fixture
async def peer(sim: XcaCommunitySimulator) -> AsyncIterator[Peer]:
    server = TestServer(sim.app(), host="127.0.0.1", port=0)
    await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Peer(str(server.make_url("")), session, sim)
    finally:
        await server.close()


@dataclass
class Answer:
    status: int
    content_type: str
    raw: bytes
    root: etree._Element | None = None
    parts: dict[str, bytes] | None = None


async def post(
    peer: Peer, path: str, action: str, body: etree._Element | None, message_id: str | None = None
) -> Answer:
    env = build_envelope(Addressing(action, message_id or new_message_id(), to=peer.url + path), body)
    headers = {"Content-Type": f'application/soap+xml; charset=UTF-8; action="{action}"'}
    async with peer.session.post(peer.url + path, data=serialize(env), headers=headers) as resp:
        raw = await resp.read()
        return Answer(resp.status, resp.headers.get("Content-Type", ""), raw)


async def soap(peer: Peer, path: str, action: str, body: etree._Element) -> tuple[Answer, etree._Element]:
    """Post, check the WS-Addressing answer, and return the response payload."""
    message_id = new_message_id()
    answer = await post(peer, path, action, body, message_id)
    assert answer.status == 200, answer.raw[:500]
    root, parts = parse_mtom(answer.content_type, answer.raw)
    env = parse_envelope(root)
    assert env.addressing.relates_to == message_id
    assert env.addressing.action == action + "Response"
    assert env.body is not None
    answer.root, answer.parts = root, parts
    return answer, env.body


async def query(peer: Peer, req: AdhocQueryRequest, wsdl_dir: Path) -> AdhocQueryResponse:
    _, body = await soap(peer, "/iti38", Action.ITI38, build_adhoc_query_request(req))
    assert_valid(wsdl_dir, body)
    return parse_adhoc_query_response(body)


async def retrieve(
    peer: Peer, req: RetrieveDocumentSetRequest, wsdl_dir: Path
) -> RetrieveDocumentSetResponse:
    answer, body = await soap(peer, "/iti39", Action.ITI39, build_retrieve_request(req))
    assert parse_content_type(answer.content_type)[0] == "multipart/related"
    assert answer.parts is not None
    assert_valid(wsdl_dir, inline_documents(body, answer.parts))
    return parse_retrieve_response(body, answer.parts)


async def retrieve_images(
    peer: Peer, req: RetrieveImagingDocumentSetRequest, wsdl_dir: Path
) -> RetrieveDocumentSetResponse:
    answer, body = await soap(peer, "/rad75", Action.RAD75, build_imaging_retrieve_request(req))
    assert parse_content_type(answer.content_type)[0] == "multipart/related"
    assert answer.parts is not None
    assert_valid(wsdl_dir, inline_documents(body, answer.parts))
    return parse_retrieve_response(body, answer.parts)


def anna(net: SimNetworkConfig) -> str:
    return bsn_cx(net.patients[0].bsn)


def docs_of(sim: XcaCommunitySimulator, bsn: str) -> list[Any]:
    return [d for d in sim.documents if d.bsn == bsn]


# --- ITI-38 through an independent client (zeep, built from the official WSDL) ---


async def test_zeep_find_documents(peer: Peer, net: SimNetworkConfig, wsdl_dir: Path) -> None:
    import zeep
    from zeep.plugins import HistoryPlugin
    from zeep.wsa import WsAddressingPlugin

    history = HistoryPlugin()  # type: ignore[no-untyped-call]
    client = zeep.Client(  # type: ignore[no-untyped-call]
        str(wsdl_dir / "iti38.wsdl"),
        settings=zeep.Settings(strict=False),
        plugins=[WsAddressingPlugin(), history],
    )
    service = client.create_service(WSDL_BINDING, peer.url + "/iti38")  # type: ignore[no-untyped-call]
    slots = [
        {"name": "$XDSDocumentEntryPatientId", "ValueList": {"_value_1": [{"Value": f"'{anna(net)}'"}]}},
        {
            "name": "$XDSDocumentEntryStatus",
            "ValueList": {"_value_1": [{"Value": "('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')"}]},
        },
    ]
    result = await asyncio.to_thread(
        service.RespondingGateway_CrossGatewayQuery,
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": StoredQuery.FIND_DOCUMENTS, "Slot": slots},
    )
    assert result.status == ResponseStatus.SUCCESS
    # zeep does not resolve ebRIM substitution groups; with strict=False it hands them over raw.
    raw_objects = list(result.RegistryObjectList._raw_elements)
    assert [etree.QName(o).localname for o in raw_objects] == ["ExtrinsicObject"] * 6
    assert all(o.get("home") == peer.home for o in raw_objects)
    assert history.last_received is not None and history.last_sent is not None
    received = history.last_received["envelope"]
    sent = history.last_sent["envelope"]
    body = received.find(f"{{{SOAP12_NS}}}Body")[0]
    assert_valid(wsdl_dir, body)
    parsed = parse_adhoc_query_response(body)
    expected = docs_of(peer.sim, net.patients[0].bsn)
    assert {e.unique_id for e in parsed.entries} == {d.entry.unique_id for d in expected}
    assert all(e.home == peer.home for e in parsed.entries)
    message_id = sent.findtext(".//{http://www.w3.org/2005/08/addressing}MessageID")
    assert received.findtext(".//{http://www.w3.org/2005/08/addressing}RelatesTo") == message_id
    # 2 institutions x 2 studies: 4 KOS entries and (index 0 of each) 2 report entries.
    formats = sorted(e.format_code.code for e in parsed.entries if e.format_code)
    assert formats == [BASIC_TEXT_SR_SOP_CLASS] * 2 + [KOS_SOP_CLASS] * 4


# --- ITI-38 filters and errors (own codec) ---


async def test_find_documents_filters(peer: Peer, net: SimNetworkConfig, wsdl_dir: Path) -> None:
    everything = await query(peer, find_documents(anna(net)), wsdl_dir)
    assert len(everything.entries) == 6
    assert all(e.author_uras <= {"00020011", "00020012"} and e.author_uras for e in everything.entries)

    kos = await query(
        peer, find_documents(anna(net), format_codes=[Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY)]), wsdl_dir
    )
    assert len(kos.entries) == 4 and all(
        e.format_code and e.format_code.code == KOS_SOP_CLASS for e in kos.entries
    )

    times = sorted(e.service_start_time or "" for e in kos.entries)
    later = await query(
        peer,
        find_documents(
            anna(net), format_codes=[Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY)], service_start_from=times[2]
        ),
        wsdl_dir,
    )
    assert sorted(e.service_start_time or "" for e in later.entries) == times[2:]
    earlier = await query(peer, find_documents(anna(net), service_start_to=times[0][:8]), wsdl_dir)
    assert earlier.entries == []  # To is exclusive, and the day started before the first study

    deprecated_only = await query(
        peer,
        find_documents(anna(net), statuses=["urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated"]),
        wsdl_dir,
    )
    assert deprecated_only.entries == []


async def test_find_documents_by_reference_id_links_kos_and_report(
    peer: Peer, net: SimNetworkConfig, wsdl_dir: Path
) -> None:
    _, _, study = next(s for s in peer.sim.studies if s[2].has_report)
    ref = reference_id(study.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE)
    bsn = next(p.bsn for p, _, s in peer.sim.studies if s is study)
    resp = await query(peer, find_documents(bsn_cx(bsn), reference_ids=[ref]), wsdl_dir)
    assert {e.format_code.code for e in resp.entries if e.format_code} == {
        KOS_SOP_CLASS,
        BASIC_TEXT_SR_SOP_CLASS,
    }
    assert all(ref in e.reference_ids for e in resp.entries)


async def test_object_ref_return_type_and_get_documents(
    peer: Peer, net: SimNetworkConfig, wsdl_dir: Path
) -> None:
    refs = await query(peer, find_documents(anna(net), return_type=ReturnType.OBJECT_REF), wsdl_dir)
    assert refs.objects and all(isinstance(o, ObjectRef) and o.home == peer.home for o in refs.objects)
    some = [d.entry for d in docs_of(peer.sim, net.patients[0].bsn)][:2]
    got = await query(peer, get_documents(peer.home, unique_ids=[e.unique_id for e in some]), wsdl_dir)
    assert got.entries == some
    by_uuid = await query(peer, get_documents(peer.home, entry_uuids=[some[0].entry_uuid]), wsdl_dir)
    assert by_uuid.entries == [some[0]]


async def test_unknown_patient_is_an_empty_success(peer: Peer, wsdl_dir: Path) -> None:
    resp = await query(peer, find_documents(bsn_cx("111222333")), wsdl_dir)
    assert resp.status is ResponseStatus.SUCCESS and resp.objects == ()


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (
            lambda net, home: replace(
                find_documents(anna(net)), query_id="urn:uuid:00000000-0000-0000-0000-0000000000ff"
            ),
            ErrorCode.UNKNOWN_STORED_QUERY,
        ),
        (
            lambda net, home: replace(
                find_documents(anna(net)),
                slots=make_slots(
                    {"$XDSDocumentEntryStatus": ["urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"]}
                ),
            ),
            ErrorCode.STORED_QUERY_MISSING_PARAM,
        ),
        (
            lambda net, home: replace(get_documents(home, unique_ids=["2.25.1"]), home=None),
            ErrorCode.MISSING_HOME_COMMUNITY_ID,
        ),
        (lambda net, home: find_documents(anna(net), home="urn:oid:1.2.3.4"), ErrorCode.UNKNOWN_COMMUNITY),
    ],
)
async def test_query_errors(
    peer: Peer, net: SimNetworkConfig, wsdl_dir: Path, make: Any, code: ErrorCode
) -> None:
    resp = await query(peer, make(net, peer.home), wsdl_dir)
    assert resp.status is ResponseStatus.FAILURE
    assert [e.error_code for e in resp.errors] == [code]
    assert resp.errors[0].location == peer.home


# --- ITI-39 ---


async def test_retrieve_kos_and_report(peer: Peer, net: SimNetworkConfig, wsdl_dir: Path) -> None:
    docs = [d for d in docs_of(peer.sim, net.patients[0].bsn)][:2]
    req = RetrieveDocumentSetRequest(
        tuple(DocumentRequest(peer.repo, d.entry.unique_id, peer.home) for d in docs)
    )
    resp = await retrieve(peer, req, wsdl_dir)
    assert resp.status is ResponseStatus.SUCCESS
    assert [(r.document_unique_id, r.data, r.mime_type, r.home) for r in resp.documents] == [
        (d.entry.unique_id, d.data, "application/dicom", peer.home) for d in docs
    ]
    kos = dcmread(BytesIO(resp.documents[0].data))  # type: ignore[arg-type]
    assert kos.SOPClassUID == KOS_SOP_CLASS and kos.SOPInstanceUID == docs[0].entry.unique_id


async def test_retrieve_errors(peer: Peer, net: SimNetworkConfig, wsdl_dir: Path) -> None:
    good = docs_of(peer.sim, net.patients[0].bsn)[0].entry.unique_id
    resp = await retrieve(
        peer,
        RetrieveDocumentSetRequest(
            (
                DocumentRequest(peer.repo, good, peer.home),
                DocumentRequest(peer.repo, "2.25.999", peer.home),
                DocumentRequest("1.2.3.999", good, peer.home),
                DocumentRequest(peer.repo, good, None),
            )
        ),
        wsdl_dir,
    )
    assert resp.status is ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in resp.documents] == [good]
    assert [e.error_code for e in resp.errors] == [
        ErrorCode.DOCUMENT_UNIQUE_ID_ERROR,
        ErrorCode.UNKNOWN_REPOSITORY_ID,
        ErrorCode.MISSING_HOME_COMMUNITY_ID,
    ]
    assert all(e.location == peer.home for e in resp.errors)
    failed = await retrieve(
        peer, RetrieveDocumentSetRequest((DocumentRequest(peer.repo, good, None),)), wsdl_dir
    )
    assert failed.status is ResponseStatus.FAILURE and failed.documents == ()


# --- RAD-75: query -> KOS -> images ---


async def test_rad75_retrieves_every_instance_the_kos_references(
    peer: Peer, net: SimNetworkConfig, wsdl_dir: Path
) -> None:
    kos_entries = (
        await query(
            peer, find_documents(anna(net), format_codes=[Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY)]), wsdl_dir
        )
    ).entries
    entry = kos_entries[0]
    assert entry.repository_unique_id is not None
    kos_resp = await retrieve(
        peer,
        RetrieveDocumentSetRequest(
            (DocumentRequest(entry.repository_unique_id, entry.unique_id, entry.home),)
        ),
        wsdl_dir,
    )
    kos = dcmread(BytesIO(kos_resp.documents[0].data))  # type: ignore[arg-type]
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    studies = (
        StudyRequest(
            evidence.StudyInstanceUID,
            tuple(
                SeriesRequest(
                    series.SeriesInstanceUID,
                    tuple(
                        DocumentRequest(series.RetrieveLocationUID, sop.ReferencedSOPInstanceUID, peer.home)
                        for sop in series.ReferencedSOPSequence
                    ),
                )
                for series in evidence.ReferencedSeriesSequence
            ),
        ),
    )
    resp = await retrieve_images(
        peer, RetrieveImagingDocumentSetRequest(studies, (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir
    )
    assert resp.status is ResponseStatus.SUCCESS
    wanted = {
        sop.ReferencedSOPInstanceUID
        for s in evidence.ReferencedSeriesSequence
        for sop in s.ReferencedSOPSequence
    }
    assert {d.document_unique_id for d in resp.documents} == wanted
    for doc in resp.documents:
        assert doc.mime_type == "application/dicom"
        ds = dcmread(BytesIO(doc.data))  # type: ignore[arg-type]
        assert ds.SOPInstanceUID == doc.document_unique_id
        assert ds.StudyInstanceUID == evidence.StudyInstanceUID


def _one_instance(sim: XcaCommunitySimulator) -> tuple[str, str, str]:
    _, _, study = sim.studies[0]
    ds = study.instances[0]
    return study.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)


async def test_rad75_partial_and_failure(peer: Peer, wsdl_dir: Path) -> None:
    study, series, sop = _one_instance(peer.sim)
    req = RetrieveImagingDocumentSetRequest(
        (
            StudyRequest(
                study,
                (
                    SeriesRequest(
                        series,
                        (
                            DocumentRequest(peer.repo, sop, peer.home),
                            DocumentRequest(peer.repo, "2.25.404", peer.home),
                        ),
                    ),
                ),
            ),
        ),
        (EXPLICIT_VR_LITTLE_ENDIAN,),
    )
    partial = await retrieve_images(peer, req, wsdl_dir)
    assert partial.status is ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in partial.documents] == [sop]
    assert [(e.error_code, e.code_context) for e in partial.errors] == [
        (ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, f"{study}:{series}:2.25.404")
    ]
    missing = RetrieveImagingDocumentSetRequest(
        (StudyRequest("2.25.1", (SeriesRequest("2.25.2", (DocumentRequest(peer.repo, sop, peer.home),)),)),),
        (EXPLICIT_VR_LITTLE_ENDIAN,),
    )
    failure = await retrieve_images(peer, missing, wsdl_dir)
    assert failure.status is ResponseStatus.FAILURE
    assert failure.errors[0].code_context == f"2.25.1:2.25.2:{sop}"


async def test_rad75_transfer_syntax(peer: Peer, wsdl_dir: Path) -> None:
    study, series, sop = _one_instance(peer.sim)
    studies = (StudyRequest(study, (SeriesRequest(series, (DocumentRequest(peer.repo, sop, peer.home),)),)),)
    implicit = await retrieve_images(
        peer,
        RetrieveImagingDocumentSetRequest(studies, ("1.2.840.10008.1.2.4.50", IMPLICIT_VR_LITTLE_ENDIAN)),
        wsdl_dir,
    )
    ds = dcmread(BytesIO(implicit.documents[0].data))  # type: ignore[arg-type]
    assert ds.file_meta.TransferSyntaxUID == IMPLICIT_VR_LITTLE_ENDIAN and ds.SOPInstanceUID == sop
    jpeg_only = await retrieve_images(
        peer, RetrieveImagingDocumentSetRequest(studies, ("1.2.840.10008.1.2.4.50",)), wsdl_dir
    )
    assert jpeg_only.status is ResponseStatus.FAILURE
    assert jpeg_only.errors[0].error_code == ErrorCode.REPOSITORY_ERROR


async def test_lost_instances_are_unknown_to_rad75_while_the_kos_still_lists_them(
    peer: Peer, wsdl_dir: Path
) -> None:
    _, _, study = peer.sim.studies[0]
    kept, lost = study.instances[0], study.instances[1]
    await _behave(peer, lost_instances=[str(lost.SOPInstanceUID)])

    def asking(*instances: Any) -> RetrieveImagingDocumentSetRequest:
        return RetrieveImagingDocumentSetRequest(
            (StudyRequest(study.study_instance_uid, tuple(
                SeriesRequest(str(ds.SeriesInstanceUID),
                              (DocumentRequest(peer.repo, str(ds.SOPInstanceUID), peer.home),))
                for ds in instances)),),
            (EXPLICIT_VR_LITTLE_ENDIAN,))

    partial = await retrieve_images(peer, asking(kept, lost), wsdl_dir)
    assert partial.status is ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in partial.documents] == [str(kept.SOPInstanceUID)]
    context = f"{study.study_instance_uid}:{lost.SeriesInstanceUID}:{lost.SOPInstanceUID}"
    assert [(e.error_code, e.code_context) for e in partial.errors] == [(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR,
                                                                         context)]
    failure = await retrieve_images(peer, asking(lost), wsdl_dir)
    assert failure.status is ResponseStatus.FAILURE and not failure.documents
    # The manifest is the registry's and still names the lost instance.
    kos = next(d for d in docs_of(peer.sim, peer.sim.studies[0][0].bsn)
               if d.entry.format_code is not None and d.entry.format_code.code == KOS_SOP_CLASS
               and study.study_instance_uid.encode() in d.data)
    assert str(lost.SOPInstanceUID).encode() in kos.data


def test_given_studies_replace_the_generated_ones(net: SimNetworkConfig, sim: XcaCommunitySimulator) -> None:
    patient, institution, study = sim.studies[0]
    one_image = replace(study, instances=study.instances[:1])
    given = XcaCommunitySimulator(net.communities[0], net, studies=[(patient, institution, one_image)])
    assert given.studies == [(patient, institution, one_image)]
    # The KOS of a study's other content is another document (xca.metadata.kos_generation).
    assert [d.entry.unique_id for d in given.documents] == [
        study_kos_unique_id(study_record(patient, one_image), sim.repository_unique_id)]
    assert given.documents[0].entry.unique_id != sim.documents[0].entry.unique_id
    assert str(study.instances[0].SOPInstanceUID).encode() in given.documents[0].data
    assert str(study.instances[1].SOPInstanceUID).encode() not in given.documents[0].data


async def test_mtom_packaged_request_is_accepted(peer: Peer, net: SimNetworkConfig) -> None:
    """IPF-style clients send ITI-39 requests as MTOM even without attachments."""
    good = docs_of(peer.sim, net.patients[0].bsn)[0]
    message_id = new_message_id()
    env = build_envelope(
        Addressing(Action.ITI39, message_id),
        build_retrieve_request(
            RetrieveDocumentSetRequest((DocumentRequest(peer.repo, good.entry.unique_id, peer.home),))
        ),
    )
    content_type, body = build_mtom(env, [], Action.ITI39)
    async with peer.session.post(
        peer.url + "/iti39", data=bytes(body), headers={"Content-Type": content_type}
    ) as r:
        assert r.status == 200
        root, parts = parse_mtom(r.headers["Content-Type"], await r.read())
    payload = parse_envelope(root).body
    assert payload is not None
    assert parse_retrieve_response(payload, parts).documents[0].data == good.data


# --- bad input and misbehaviour ---


def _fault(answer: Answer) -> SoapFault:
    with pytest.raises(SoapFault) as exc:
        parse_envelope(parse_mtom(answer.content_type, answer.raw)[0])
    return exc.value


async def _raw(peer: Peer, body: bytes, content_type: str = "application/soap+xml") -> Answer:
    async with peer.session.post(peer.url + "/iti38", data=body, headers={"Content-Type": content_type}) as r:
        return Answer(r.status, r.headers.get("Content-Type", ""), await r.read())


async def test_bad_input_gets_sender_faults(peer: Peer, net: SimNetworkConfig) -> None:
    not_xml = await _raw(peer, b"hello")
    assert not_xml.status == 400 and _fault(not_xml).code == "Sender"
    not_soap = await _raw(peer, b"<a/>")
    assert not_soap.status == 400 and _fault(not_soap).code == "Sender"
    soap11 = await _raw(
        peer, f'<e:Envelope xmlns:e="{SOAP11_NS}"><e:Body/></e:Envelope>'.encode(), "text/xml"
    )
    assert soap11.status == 500 and _fault(soap11).code == "VersionMismatch"  # SOAP 1.2 Part 2 §7.5.1.2
    wrong_action = await post(
        peer, "/iti38", Action.ITI39, build_adhoc_query_request(find_documents(anna(net)))
    )
    fault = _fault(wrong_action)
    assert wrong_action.status == 400 and fault.subcode == (
        "http://www.w3.org/2005/08/addressing",
        "ActionNotSupported",
    )


async def _behave(peer: Peer, **settings: Any) -> None:
    async with peer.session.put(peer.url + "/admin/behaviour", json=settings) as r:
        assert r.status == 200


async def test_fault_misbehaviour(peer: Peer, net: SimNetworkConfig) -> None:
    await _behave(peer, fault=True)
    message_id = new_message_id()
    answer = await post(
        peer,
        "/iti39",
        Action.ITI39,
        build_retrieve_request(
            RetrieveDocumentSetRequest((DocumentRequest(peer.repo, "2.25.1", peer.home),))
        ),
        message_id,
    )
    assert answer.status == 500
    assert _fault(answer).code == "Receiver"
    assert parse_mtom(answer.content_type, answer.raw)[0].findtext(".//{*}RelatesTo") == message_id


async def test_malformed_misbehaviour(peer: Peer, net: SimNetworkConfig) -> None:
    await _behave(peer, malformed=True)
    answer = await post(peer, "/iti38", Action.ITI38, build_adhoc_query_request(find_documents(anna(net))))
    assert answer.status == 200
    with pytest.raises(ValueError):
        parse_mtom(answer.content_type, answer.raw)


async def test_down_and_delay_misbehaviour(peer: Peer, net: SimNetworkConfig) -> None:
    body = build_adhoc_query_request(find_documents(anna(net)))
    await _behave(peer, delay_ms=300)
    started = time.monotonic()
    assert (await post(peer, "/iti38", Action.ITI38, body)).status == 200
    assert time.monotonic() - started >= 0.3
    await _behave(peer, down=True)
    try:
        answer = await post(peer, "/iti38", Action.ITI38, body)
    except aiohttp.ClientError:
        pass  # the connection was dropped, as a crashed peer looks
    else:
        assert answer.status == 503  # or the 503 arrived before the close


# --- data, determinism, privacy ---


def test_documents_are_deterministic_per_community(net: SimNetworkConfig, sim: XcaCommunitySimulator) -> None:
    again = XcaCommunitySimulator(net.communities[0], net)
    assert [d.entry for d in again.documents] == [d.entry for d in sim.documents]
    assert [d.data for d in again.documents] == [d.data for d in sim.documents]
    other = XcaCommunitySimulator(net.communities[1], net)
    assert not {d.entry.unique_id for d in other.documents} & {d.entry.unique_id for d in sim.documents}
    assert all(d.entry.home == net.communities[1].home_community_id for d in other.documents)


async def test_logs_carry_no_bsn_or_name(peer: Peer, net: SimNetworkConfig, wsdl_dir: Path) -> None:
    with structlog.testing.capture_logs() as logs:
        await query(peer, find_documents(anna(net)), wsdl_dir)
        good = docs_of(peer.sim, net.patients[0].bsn)[0].entry.unique_id
        await retrieve(
            peer, RetrieveDocumentSetRequest((DocumentRequest(peer.repo, good, peer.home),)), wsdl_dir
        )
    assert {entry["event"] for entry in logs} >= {"iti38", "iti39"}
    text = repr(logs)
    for patient in net.patients:
        assert patient.bsn not in text
        assert patient.name.split("^")[0] not in text
