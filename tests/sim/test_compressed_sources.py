"""The simulated sources hold compressed studies and hand them out the way real archives do.

As stored when the requester accepts that syntax, else converted without loss, else not at all (a failed
C-STORE sub-operation, a RAD-75 XDSRepositoryError for that instance): checked against DUO's own Q/R
client, DCMTK's movescu/storescp and the RAD-75 wire format, so DUO's tests of compressed transfers rest
on peers that behave.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import subprocess
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from io import BytesIO
from pathlib import Path

import aiohttp
import numpy as np
import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    RLELossless,
)

from duo_gateway.dicom.kos import encode_part10
from duo_gateway.dicom.qr import QrClient, QrStatusError
from duo_gateway.sim.codecs import can_convert, serving_syntax
from duo_gateway.sim.config import SimCompressedStudy, SimNetworkConfig, default_network
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.xca import (
    DocumentRequest,
    ErrorCode,
    ResponseStatus,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
)
from tests.sim.test_xca_sim import Peer, retrieve_images
from tests.support.dcmtk import require_tool
from tests.support.storescp import run_storescp

#: The async tests share the module's servers, so they share its event loop.
on_module_loop = pytest.mark.asyncio(loop_scope="module")

NET = default_network()
ANNA = NET.patients[0]
HOSPITAL = NET.hospitals[0]
HOST = "127.0.0.1"
J2K, JLS, RLE = str(JPEG2000Lossless), str(JPEGLSLossless), str(RLELossless)
EXPLICIT, IMPLICIT, BASELINE = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian), str(JPEGBaseline8Bit)


def _images(study: GeneratedStudy) -> list[Dataset]:
    return [ds for ds in study.instances if "PixelData" in ds]


def _pixels(ds: Dataset) -> np.ndarray:  # type: ignore[type-arg]
    return np.asarray(ds.pixel_array)


# --- generation and the conversion rule -------------------------------------------------------------


def test_a_compressed_study_is_the_same_study_losslessly_encoded() -> None:
    plain = generate_studies(ANNA, HOSPITAL, 3, NET.seed)
    packed = generate_studies(ANNA, HOSPITAL, 3, NET.seed, encodings={0: J2K, 2: RLE})
    again = generate_studies(ANNA, HOSPITAL, 3, NET.seed, encodings={0: J2K, 2: RLE})
    for index, syntax in ((0, J2K), (1, EXPLICIT), (2, RLE)):
        before, after = plain[index], packed[index]
        assert after.study_instance_uid == before.study_instance_uid
        for old, new, rerun in zip(before.instances, after.instances, again[index].instances, strict=True):
            assert new.SOPInstanceUID == old.SOPInstanceUID  # a lossless re-encoding is the same instance
            image = "PixelData" in old
            assert str(new.file_meta.TransferSyntaxUID) == (syntax if image else EXPLICIT)  # reports as were
            assert encode_part10(new) == encode_part10(rerun)  # deterministic, like every generated study
            if image:
                assert np.array_equal(_pixels(new), _pixels(old))
                assert "LossyImageCompression" not in new


def test_what_an_archive_hands_out_for_what_a_requester_accepts() -> None:
    assert serving_syntax(JLS, [J2K, JLS, EXPLICIT]) == JLS  # as stored whenever it is acceptable
    assert serving_syntax(JLS, [J2K, EXPLICIT]) == J2K  # else the first lossless conversion
    assert serving_syntax(JLS, [BASELINE, IMPLICIT]) == IMPLICIT  # never a lossy one
    assert serving_syntax(EXPLICIT, [BASELINE]) is None
    assert serving_syntax(BASELINE, [EXPLICIT, J2K]) is None  # lossy data is never decoded into another
    assert serving_syntax(JLS, [EXPLICIT], converts=False) is None  # an archive without codecs
    assert can_convert(str(DeflatedExplicitVRLittleEndian), EXPLICIT)


def test_the_network_config_names_only_studies_it_has() -> None:
    raw = default_network().model_dump()
    raw["hospitals"][0]["compressed"] = [{"bsn": ANNA.bsn, "study": 5, "transfer_syntax": J2K}]
    with pytest.raises(ValueError, match="studies_per_patient"):
        SimNetworkConfig.model_validate(raw)
    with pytest.raises(ValueError, match="cannot encode"):
        SimCompressedStudy(bsn=ANNA.bsn, transfer_syntax=BASELINE)


# --- the TLB PACS ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pacs(tmp_path_factory: pytest.TempPathFactory
         ) -> Iterator[tuple[SimPacs, GeneratedStudy, GeneratedStudy]]:
    """A PACS holding Anna's first study as JPEG 2000 Lossless, and the same study uncompressed to compare."""
    stored = generate_studies(ANNA, HOSPITAL, 1, NET.seed, encodings={0: J2K})[0]
    plain = generate_studies(ANNA, HOSPITAL, 1, NET.seed)[0]
    pacs = SimPacs(HOSPITAL, tmp_path_factory.mktemp("pacs") / "storage")
    pacs.preload([stored])
    pacs.start()
    yield pacs, stored, plain
    pacs.stop()


async def _get(pacs: SimPacs, study: GeneratedStudy, syntaxes: list[str], spool: Path) -> dict[str, Dataset]:
    qr = QrClient("DUO_GATEWAY", HOST, pacs.port, HOSPITAL.ae_title, timeout_s=10)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.StudyInstanceUID = study.study_instance_uid
    classes = sorted({str(ds.SOPClassUID) for ds in study.instances})
    got: dict[str, Dataset] = {}
    async with aclosing(qr.get(query, qr.spool(spool, 4), classes, transfer_syntaxes=syntaxes)) as stream:
        async for item in stream:
            got[item.sop_instance_uid] = await asyncio.to_thread(dcmread, item.path)
            assert str(got[item.sop_instance_uid].file_meta.TransferSyntaxUID) == item.transfer_syntax_uid
            item.path.unlink()
    return got


@on_module_loop
async def test_pacs_c_get_sends_as_stored_when_acceptable(
        pacs: tuple[SimPacs, GeneratedStudy, GeneratedStudy], tmp_path: Path) -> None:
    server, stored, _ = pacs
    got = await _get(server, stored, [J2K, EXPLICIT], tmp_path)
    assert set(got) == {str(ds.SOPInstanceUID) for ds in stored.instances}
    for ds in stored.instances:
        assert got[str(ds.SOPInstanceUID)].get("PixelData") == ds.get("PixelData")  # the stored stream
        assert got[str(ds.SOPInstanceUID)].file_meta.TransferSyntaxUID == ds.file_meta.TransferSyntaxUID


@on_module_loop
async def test_pacs_c_get_decompresses_for_a_requester_without_the_syntax(
        pacs: tuple[SimPacs, GeneratedStudy, GeneratedStudy], tmp_path: Path) -> None:
    server, stored, plain = pacs
    got = await _get(server, stored, [IMPLICIT], tmp_path)
    for ds in _images(plain):
        received = got[str(ds.SOPInstanceUID)]
        assert str(received.file_meta.TransferSyntaxUID) == IMPLICIT
        assert received.PixelData == ds.PixelData


@on_module_loop
async def test_pacs_c_get_fails_what_it_cannot_send_losslessly(
        pacs: tuple[SimPacs, GeneratedStudy, GeneratedStudy], tmp_path: Path) -> None:
    server, stored, _ = pacs
    with pytest.raises(QrStatusError):  # every sub-operation failed
        await _get(server, dataclasses.replace(stored, instances=_images(stored)), [BASELINE], tmp_path)


def test_pacs_c_move_decompresses_for_a_destination_that_declines_compression(
        pacs: tuple[SimPacs, GeneratedStudy, GeneratedStudy], tmp_path: Path) -> None:
    server, stored, plain = pacs
    movescu = require_tool("movescu")
    with run_storescp(tmp_path, ae_title="PLAIN_SCP") as scp:  # storescp's default: uncompressed only
        server.add_move_destination(scp.ae_title, scp.host, scp.port)
        keys = ["-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={stored.study_instance_uid}"]
        done = subprocess.run([movescu, "-S", "-aec", HOSPITAL.ae_title, "-aem", scp.ae_title, *keys,
                               HOST, str(server.port)], capture_output=True, text=True, timeout=60,
                              env={**os.environ, "TCP_NODELAY": "1"}, check=False)
        assert done.returncode == 0, done.stderr
        received = {str(ds.SOPInstanceUID): ds for ds in
                    (dcmread(p) for p in scp.directory.iterdir() if not p.name.startswith("."))}
    for ds in _images(plain):
        assert received[str(ds.SOPInstanceUID)].file_meta.TransferSyntaxUID in (EXPLICIT, IMPLICIT)
        assert received[str(ds.SOPInstanceUID)].PixelData == ds.PixelData


# --- the XCA community (RAD-75) ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def communities() -> tuple[XcaCommunitySimulator, XcaCommunitySimulator]:
    """XDS Noord as the demo has it (Anna's first study JPEG-LS Lossless), and the same community with an
    archive that converts nothing."""
    noord = NET.communities[0]
    strict = noord.model_copy(update={"converts": False})
    return XcaCommunitySimulator(noord, NET), XcaCommunitySimulator(strict, NET)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def peers(communities: tuple[XcaCommunitySimulator, XcaCommunitySimulator]
                ) -> AsyncIterator[tuple[Peer, Peer]]:
    servers = [TestServer(sim.app(), host=HOST, port=0) for sim in communities]
    for server in servers:
        await server.start_server()
    try:
        async with aiohttp.ClientSession() as session:
            yield Peer(str(servers[0].make_url("")), session, communities[0]), \
                Peer(str(servers[1].make_url("")), session, communities[1])
    finally:
        for server in servers:
            await server.close()


def _compressed_study(sim: XcaCommunitySimulator) -> GeneratedStudy:
    (uid, syntax), = sim.compressed[:1]
    assert syntax == JLS
    return next(study for _, _, study in sim.studies if study.study_instance_uid == uid)


def _request(peer: Peer, study: GeneratedStudy, instances: list[Dataset],
             syntaxes: tuple[str, ...]) -> RetrieveImagingDocumentSetRequest:
    series: dict[str, list[str]] = {}
    for ds in instances:
        series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
    return RetrieveImagingDocumentSetRequest((StudyRequest(study.study_instance_uid, tuple(
        SeriesRequest(se, tuple(DocumentRequest(peer.repo, sop, peer.home) for sop in sops))
        for se, sops in series.items())),), syntaxes)


@on_module_loop
async def test_rad75_serves_the_stored_syntax_when_listed(peers: tuple[Peer, Peer], wsdl_dir: Path) -> None:
    peer = peers[0]
    study = _compressed_study(peer.sim)
    images = _images(study)
    resp = await retrieve_images(peer, _request(peer, study, images, (J2K, JLS, EXPLICIT)), wsdl_dir)
    assert resp.status is ResponseStatus.SUCCESS
    by_uid = {d.document_unique_id: d.data for d in resp.documents}
    assert by_uid == {str(ds.SOPInstanceUID): encode_part10(ds) for ds in images}  # byte for byte as held


@on_module_loop
async def test_rad75_converts_losslessly_to_the_first_listed_it_can(
        peers: tuple[Peer, Peer], wsdl_dir: Path) -> None:
    peer = peers[0]
    study = _compressed_study(peer.sim)
    images = _images(study)
    for syntaxes, expected in (((BASELINE, J2K, EXPLICIT), J2K), ((BASELINE, IMPLICIT), IMPLICIT)):
        resp = await retrieve_images(peer, _request(peer, study, images, syntaxes), wsdl_dir)
        assert resp.status is ResponseStatus.SUCCESS, resp.errors
        held = {str(ds.SOPInstanceUID): ds for ds in images}
        for doc in resp.documents:
            assert isinstance(doc.data, bytes)
            ds = dcmread(BytesIO(doc.data))
            assert str(ds.file_meta.TransferSyntaxUID) == expected
            assert np.array_equal(_pixels(ds), _pixels(held[doc.document_unique_id]))


@on_module_loop
async def test_rad75_fails_each_instance_it_cannot_encode(peers: tuple[Peer, Peer], wsdl_dir: Path) -> None:
    """NIST rig_2018-5424a's answer: XDSRepositoryError for the instance, and the rest still delivered."""
    peer = peers[1]  # converts nothing
    study = _compressed_study(peer.sim)
    report = [ds for ds in study.instances if "PixelData" not in ds]  # held Explicit VR LE
    images = _images(study)
    assert report, "the first generated study carries a report"
    resp = await retrieve_images(peer, _request(peer, study, images + report, (EXPLICIT,)), wsdl_dir)
    assert resp.status is ResponseStatus.PARTIAL_SUCCESS
    assert [d.document_unique_id for d in resp.documents] == [str(ds.SOPInstanceUID) for ds in report]
    assert {e.error_code for e in resp.errors} == {ErrorCode.REPOSITORY_ERROR}
    assert sorted(e.code_context.split(":")[2] for e in resp.errors) == sorted(
        str(ds.SOPInstanceUID) for ds in images)
    assert all("requested transfer syntaxes" in e.code_context for e in resp.errors)
