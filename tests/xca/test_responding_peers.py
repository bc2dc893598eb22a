"""The responding gateway against independently written peers on both sides.

- **Orthanc as a TLB hospital's PACS**, loaded with generated studies by DCMTK ``storescu``: DUO's
  ITI-38, ITI-39 (on-demand KOS) and RAD-75 must work against a PACS nobody here wrote.
- **zeep as the XDS community**, built from the official WSDLs: its calls must succeed, and what it
  receives is checked field by field. zeep sends plain SOAP, so it gets inline base64 documents.
  Its reader of MTOM answers takes the first part as the envelope whatever ``start`` says, as Apache
  CXF's does: so its network's peer is configured ``rad75_envelope = "first"``, and zeep reads an
  MTOM RAD-75 answer made for it, but not the streamed one (envelope last) the Orthanc network's
  default peer gets.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lxml import etree
from pydicom import dcmread

from duo_gateway.bsn import bsn_cx
from duo_gateway.sim.config import default_network
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from duo_gateway.soap.envelope import SOAP12_NS, WSA_NS
from duo_gateway.xca.codes import (
    BASIC_TEXT_SR_SOP_CLASS,
    DCM_SCHEME,
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    KOS_SOP_CLASS,
    MIME_DICOM,
    STUDY_INSTANCE_UID_ID_TYPE,
    EntryStatus,
    ResponseStatus,
    StoredQuery,
)
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.hl7 import reference_id
from duo_gateway.xca.query import find_documents, parse_adhoc_query_response
from duo_gateway.xca.retrieve import DocumentRequest, RetrieveImagingDocumentSetRequest
from duo_gateway.xua import security_header
from tests.support.clients import plain_xca_peer
from tests.support.orthanc import Orthanc, load_with_storescu, run_orthanc
from tests.xca.responding_harness import (
    HOME,
    PEER_HOME,
    XUA_ISSUER,
    Network,
    PacsEndpoint,
    Reply,
    running_external_pacs_network,
    running_network,
)
from tests.xca.test_responding import (
    ALL,
    H1,
    dataset_bytes,
    is_kos,
    iti38,
    iti39,
    kos_of,
    rad75,
    repo,
    studies_of,
    study_request,
)
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

NET = default_network()
XDSB = "urn:ihe:iti:xds-b:2007"
XDSIB = "urn:ihe:rad:xdsi-b:2009"


# ------------------------------------------------------------------------------------------------
# Orthanc as the PACS of TLB hospital H1
# ------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, list[GeneratedStudy]]]:
    tmp = tmp_path_factory.mktemp("orthanc")
    hospital = next(h for h in NET.hospitals if h.ura == H1)
    patient = next(p for p in NET.patients if p.bsn == ALL)
    studies = generate_studies(patient, hospital, 2, NET.seed)
    files = [str(p) for s in studies for p in write_study(s, tmp / "send" / s.study_instance_uid)]
    with run_orthanc(tmp / "orthanc", ae_title="ORTHANC_H1") as server:
        load_with_storescu(server, files)
        yield server, studies


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo_orthanc(
    orthanc: tuple[Orthanc, list[GeneratedStudy]], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[Network]:
    server, studies = orthanc
    hospital = next(h for h in NET.hospitals if h.ura == H1)
    endpoint = PacsEndpoint(hospital, server.ae_title, server.dicom_port, server.host)
    tmp = tmp_path_factory.mktemp("duo-orthanc")
    async with running_external_pacs_network(tmp, endpoint, studies) as network:
        yield network


def _images(study: GeneratedStudy) -> set[tuple[str, str, str]]:
    return {(str(d.SeriesInstanceUID), str(d.SOPClassUID), str(d.SOPInstanceUID))
            for d in study.instances if d.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS}


def _generated_bytes(study: GeneratedStudy, tmp: Path) -> dict[str, bytes]:
    paths = write_study(study, tmp / study.study_instance_uid)
    return {str(ds.SOPInstanceUID): p.read_bytes() for p, ds in zip(paths, study.instances, strict=True)}


async def test_orthanc_find_documents(duo_orthanc: Network, wsdl_dir: Path) -> None:
    resp = await iti38(duo_orthanc, find_documents(bsn_cx(ALL)), wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    studies = studies_of(duo_orthanc, H1, ALL)
    kos = [e for e in resp.entries if is_kos(e)]
    assert sorted(r for e in kos for r in e.reference_ids) == sorted(
        reference_id(s.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE) for s in studies
    )
    reports = [e for e in resp.entries if not is_kos(e)]
    assert len(reports) == sum(1 for s in studies if s.has_report)
    for study in studies:
        entry = kos_of(resp, H1, study.study_instance_uid)
        assert entry.home == HOME and entry.mime_type == MIME_DICOM
        assert entry.service_start_time == study.study_date + study.study_time[:6]
        acquisition = [m for m in study.modalities if m != "SR"]
        assert [c.code for c in entry.event_codes if c.scheme == DCM_SCHEME] == acquisition


async def test_orthanc_iti39_kos(duo_orthanc: Network, wsdl_dir: Path) -> None:
    resp = await iti38(duo_orthanc, find_documents(bsn_cx(ALL)), wsdl_dir)
    for mtom, study in zip((True, False), studies_of(duo_orthanc, H1, ALL), strict=True):
        entry = kos_of(resp, H1, study.study_instance_uid)
        request = DocumentRequest(entry.repository_unique_id or "", entry.unique_id, HOME)
        _, got = await iti39(duo_orthanc, [request], wsdl_dir, mtom=mtom)
        assert got.status == ResponseStatus.SUCCESS
        (doc,) = got.documents
        assert isinstance(doc.data, bytes)
        kos = dcmread(BytesIO(doc.data))
        assert kos.SOPClassUID == KOS_SOP_CLASS and kos.SOPInstanceUID == entry.unique_id
        (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
        referenced = {
            (str(se.SeriesInstanceUID), str(sop.ReferencedSOPClassUID), str(sop.ReferencedSOPInstanceUID))
            for se in evidence.ReferencedSeriesSequence for sop in se.ReferencedSOPSequence
        }
        assert referenced == _images(study)


async def test_orthanc_rad75(duo_orthanc: Network, wsdl_dir: Path, tmp_path: Path) -> None:
    study = studies_of(duo_orthanc, H1, ALL)[0]
    original = _generated_bytes(study, tmp_path)
    repository = duo_orthanc.gateway.config.tlb_hospitals[0].repository_unique_id
    request = study_request(study, repository, images_only=False)
    for syntax in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN):
        _, resp = await rad75(duo_orthanc, RetrieveImagingDocumentSetRequest((request,), (syntax,)), wsdl_dir)
        # the whole error, so a failure says which instance and why
        assert resp.status == ResponseStatus.SUCCESS and not resp.errors, (syntax, resp.errors)
        assert sorted(d.document_unique_id for d in resp.documents) == sorted(original)
        for doc in resp.documents:
            assert isinstance(doc.data, bytes)
            ds = dcmread(BytesIO(doc.data))
            assert ds.SOPInstanceUID == doc.document_unique_id
            assert ds.file_meta.TransferSyntaxUID == syntax
            stored = dcmread(BytesIO(original[doc.document_unique_id]))
            assert [(e.tag, e.value) for e in ds] == [(e.tag, e.value) for e in stored]
            if syntax == EXPLICIT_VR_LITTLE_ENDIAN:
                assert dataset_bytes(doc.data) == dataset_bytes(original[doc.document_unique_id])


# ------------------------------------------------------------------------------------------------
# zeep as the XDS side, against DUO with simulated PACSes
# ------------------------------------------------------------------------------------------------


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    tmp = tmp_path_factory.mktemp("duo-zeep")
    # The harness's XCA peer (the XUA signer's certificate is where its PKI puts it), envelope first.
    peer = {"name": "test-xca", "certificate": {"absent": True}, "rad75_envelope": "first",
            **plain_xca_peer(home_community_id=PEER_HOME, issuer=XUA_ISSUER,
                             signing_certs=[tmp / "pki" / "client.crt"])}
    async with running_network(tmp, clients={"xca": [peer]}) as network:
        yield network


class ZeepPeer:
    """One zeep client per WSDL, pointed at DUO, with the XUA header a test hands it."""

    def __init__(self, duo: Network, wsdl_dir: Path, wsdl: str, binding: str, path: str) -> None:
        import zeep
        from zeep.plugins import HistoryPlugin
        from zeep.wsa import WsAddressingPlugin

        self.duo = duo
        self.history = HistoryPlugin()  # type: ignore[no-untyped-call]
        self.client = zeep.Client(  # type: ignore[no-untyped-call]
            str(wsdl_dir / wsdl), settings=zeep.Settings(strict=False),
            plugins=[WsAddressingPlugin(), self.history],
        )
        self.service = self.client.create_service(binding, duo.url + path)  # type: ignore[no-untyped-call]

    async def call(self, operation: str, **kwargs: Any) -> Any:
        header = security_header(self.duo.assertion(), datetime.now(UTC))
        method = getattr(self.service, operation)
        return await asyncio.to_thread(method, _soapheaders=[header], **kwargs)

    def received_body(self) -> etree._Element:
        envelope = self.history.last_received["envelope"]
        sent = self.history.last_sent["envelope"]
        assert envelope.findtext(f".//{{{WSA_NS}}}RelatesTo") == sent.findtext(f".//{{{WSA_NS}}}MessageID")
        body = envelope.find(f"{{{SOAP12_NS}}}Body")
        assert body is not None
        return body[0]


def _zeep(duo: Network, wsdl_dir: Path, which: str) -> ZeepPeer:
    """Binding names as the WSDLs spell them: ITI-38/39 in the XDS.b namespace, RAD-75 in XDS-I.b's."""
    cfg = duo.gateway.config.xca_responding
    binding = "RespondingGateway_Binding_Soap12"
    if which == "iti38":
        return ZeepPeer(duo, wsdl_dir, "iti38.wsdl", f"{{{XDSB}}}{binding}", cfg.iti38_path)
    if which == "iti39":
        return ZeepPeer(duo, wsdl_dir, "iti39.wsdl", f"{{{XDSB}}}{binding}", cfg.iti39_path)
    return ZeepPeer(duo, wsdl_dir, "rad75.wsdl", f"{{{XDSIB}}}{binding}", cfg.rad75_path)


async def _zeep_find(duo: Network, wsdl_dir: Path) -> Any:
    peer = _zeep(duo, wsdl_dir, "iti38")
    slots = [
        {"name": name, "ValueList": {"_value_1": [{"Value": value}]}}
        for name, value in (("$XDSDocumentEntryPatientId", f"'{bsn_cx(ALL)}'"),
                            ("$XDSDocumentEntryStatus", f"('{EntryStatus.APPROVED}')"))
    ]
    result = await peer.call(
        "RespondingGateway_CrossGatewayQuery",
        ResponseOption={"returnType": "LeafClass", "returnComposedObjects": True},
        AdhocQuery={"id": StoredQuery.FIND_DOCUMENTS, "Slot": slots},
    )
    body = peer.received_body()
    assert_valid(wsdl_dir, body)
    return result, parse_adhoc_query_response(body)


async def test_zeep_find_documents(duo: Network, wsdl_dir: Path) -> None:
    result, parsed = await _zeep_find(duo, wsdl_dir)
    assert result.status == ResponseStatus.SUCCESS
    # zeep does not resolve ebRIM substitution groups; with strict=False it hands them over raw.
    raw = list(result.RegistryObjectList._raw_elements)
    assert [etree.QName(o).localname for o in raw] == ["ExtrinsicObject"] * len(parsed.entries)
    assert all(o.get("home") == HOME for o in raw)
    own = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    def by_uuid(e: DocumentEntry) -> str:
        return e.entry_uuid

    assert sorted(parsed.entries, key=by_uuid) == sorted(own.entries, key=by_uuid)
    studies = studies_of(duo, H1, ALL)
    for study in studies:
        entry = kos_of(parsed, H1, study.study_instance_uid)
        assert entry.home == HOME and entry.mime_type == MIME_DICOM
        assert entry.service_start_time == study.study_date + study.study_time[:6]


async def test_zeep_iti39(duo: Network, wsdl_dir: Path) -> None:
    _, found = await _zeep_find(duo, wsdl_dir)
    study = studies_of(duo, H1, ALL)[0]
    entry = kos_of(found, H1, study.study_instance_uid)
    peer = _zeep(duo, wsdl_dir, "iti39")
    result = await peer.call(
        "RespondingGateway_CrossGatewayRetrieve",
        DocumentRequest=[{"HomeCommunityId": HOME, "RepositoryUniqueId": entry.repository_unique_id,
                          "DocumentUniqueId": entry.unique_id}],
    )
    assert_valid(wsdl_dir, peer.received_body())
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS
    (doc,) = result.DocumentResponse
    assert (doc.HomeCommunityId, doc.RepositoryUniqueId, doc.DocumentUniqueId, doc.mimeType) == \
        (HOME, entry.repository_unique_id, entry.unique_id, MIME_DICOM)
    assert isinstance(doc.Document, bytes)
    kos = dcmread(BytesIO(doc.Document))
    assert kos.SOPInstanceUID == entry.unique_id and kos.SOPClassUID == KOS_SOP_CLASS
    (evidence,) = kos.CurrentRequestedProcedureEvidenceSequence
    assert {(str(se.SeriesInstanceUID), str(s.ReferencedSOPClassUID), str(s.ReferencedSOPInstanceUID))
            for se in evidence.ReferencedSeriesSequence for s in se.ReferencedSOPSequence} == _images(study)


async def test_zeep_rad75(duo: Network, wsdl_dir: Path) -> None:
    study = studies_of(duo, H1, ALL)[1]
    repository = duo.gateway.config.tlb_hospitals[0].repository_unique_id
    request = study_request(study, repository)
    peer = _zeep(duo, wsdl_dir, "rad75")
    result = await peer.call(
        "RespondingGateway_CrossGatewayRetrieveImagingDocumentSet",
        StudyRequest=[{
            "studyInstanceUID": request.study_instance_uid,
            "SeriesRequest": [{
                "seriesInstanceUID": se.series_instance_uid,
                "DocumentRequest": [{"HomeCommunityId": d.home, "RepositoryUniqueId": d.repository_unique_id,
                                     "DocumentUniqueId": d.document_unique_id} for d in se.documents],
            } for se in request.series],
        }],
        TransferSyntaxUIDList={"TransferSyntaxUID": [EXPLICIT_VR_LITTLE_ENDIAN]},
    )
    assert_valid(wsdl_dir, peer.received_body())
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS
    paths = duo.pacs[0].instance_paths(study.study_instance_uid)
    stored = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes() for p in paths}
    wanted = {d.document_unique_id for se in request.series for d in se.documents}
    assert {d.DocumentUniqueId for d in result.DocumentResponse} == wanted
    for doc in result.DocumentResponse:
        assert (doc.HomeCommunityId, doc.RepositoryUniqueId, doc.mimeType) == (HOME, repository, MIME_DICOM)
        ds = dcmread(BytesIO(doc.Document))
        assert ds.SOPInstanceUID == doc.DocumentUniqueId
        assert ds.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
        assert dataset_bytes(doc.Document) == dataset_bytes(stored[doc.DocumentUniqueId])


def _zeep_reads_rad75(wsdl_dir: Path, reply: Reply) -> Any:
    """What zeep makes of a RAD-75 answer it did not ask for itself (it cannot send MTOM)."""
    import requests
    import zeep

    client = zeep.Client(str(wsdl_dir / "rad75.wsdl"),  # type: ignore[no-untyped-call]
                         settings=zeep.Settings(strict=False))
    service = client.create_service(  # type: ignore[no-untyped-call]
        f"{{{XDSIB}}}RespondingGateway_Binding_Soap12", "http://127.0.0.1/unused")

    response = requests.Response()
    response.status_code = reply.status
    response.headers["Content-Type"] = reply.content_type
    response._content = reply.raw
    response.encoding = "utf-8"
    binding = service._binding
    operation = binding.get("RespondingGateway_CrossGatewayRetrieveImagingDocumentSet")
    return binding.process_reply(client, operation, response)


async def test_zeep_reads_the_mtom_rad75_answer_of_an_envelope_first_peer_not_a_streamed_one(
        duo: Network, duo_orthanc: Network, wsdl_dir: Path) -> None:
    import zeep.exceptions

    study = studies_of(duo, H1, ALL)[0]
    request = RetrieveImagingDocumentSetRequest((study_request(study, repo(duo, H1)),),
                                                (EXPLICIT_VR_LITTLE_ENDIAN,))
    reply, own = await rad75(duo, request, wsdl_dir)
    result = _zeep_reads_rad75(wsdl_dir, reply)
    assert result.RegistryResponse.status == ResponseStatus.SUCCESS
    assert {d.DocumentUniqueId: d.Document for d in result.DocumentResponse} == {
        d.document_unique_id: d.data for d in own.documents}

    streamed = studies_of(duo_orthanc, H1, ALL)[0]
    repository = duo_orthanc.gateway.config.tlb_hospitals[0].repository_unique_id
    reply, own = await rad75(duo_orthanc, RetrieveImagingDocumentSetRequest(
        (study_request(streamed, repository),), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir)
    assert own.status == ResponseStatus.SUCCESS and own.documents  # DUO's own reader finds the envelope
    with pytest.raises(zeep.exceptions.TransportError, match="invalid XML"):
        _zeep_reads_rad75(wsdl_dir, reply)  # zeep parses the first part, a DICOM file
