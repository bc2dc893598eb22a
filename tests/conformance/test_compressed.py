"""NIST XCA-I transfer syntax cases: rig_2018-5422a/b, rig_2018-5424a (DUO as Responding Imaging Gateway)
and iig_2018-5402a/b, iig_2018-5404a (DUO as Initiating Imaging Gateway).

- **Responding**: DUO is called over HTTP with RAD-75 as NIST's Initiating Imaging Gateway simulator calls
  it (one DocumentRequest, NIST's TransferSyntaxUIDList), with an XUA assertion. Behind DUO is a TLB
  hospital's PACS, not an Imaging Document Source: an Orthanc holding a JPEG 2000 Lossless study and a
  study made JPEG Lossless (1.2.840.10008.1.2.4.70) by DCMTK ``dcmcjpeg``, reached by C-GET instead of
  RAD-69. So NIST's "validate the RAD-69 request" step becomes "the PACS was asked in the requested
  syntaxes": what comes back is in one of them, byte for byte as the PACS holds it.
- **Initiating**: DUO has no RAD-69 door; its consumer is the TLB API, which transfers whole studies into
  the requester's PACS and does not let the consumer pick syntaxes (DUO asks its own list, PREFERRED). The
  RAD-75 requests DUO sends are checked as NIST checks them (study, series, documents, home, repository,
  the syntax list carrying the one the community holds), and the images as NIST checks them, at the
  requester's PACS (a SimPacs storing whatever it is sent), where the PatientID is the requester's local
  id by design (dicom/reconcile.py).

One Orthanc, two DUOs (responding, initiating) and the simulators are shared by the whole module.
"""

from __future__ import annotations

import asyncio
import dataclasses
import subprocess
import urllib.request
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import pytest_asyncio
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
    JPEGLSLossless,
)

from duo_gateway.config.loader import parse_config
from duo_gateway.daemon import Gateway
from duo_gateway.dicom.kos import encode_part10
from duo_gateway.dicom.syntaxes import PREFERRED
from duo_gateway.sim.config import SimCommunity, SimCompressedStudy, SimInstitution, default_network
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.network import REQUESTER_PACS
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.pki import make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.xca.codes import MIME_DICOM, Action, ErrorCode, ResponseStatus
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    parse_imaging_retrieve_request,
)
from tests.support.clients import plain_clients
from tests.support.dcmtk import require_tool
from tests.support.orthanc import Orthanc, run_orthanc
from tests.support.peers import Peer, serve_peer
from tests.transfer.harness import kos_instances
from tests.xca.recording import Recorder
from tests.xca.responding_harness import HOME, Network, PacsEndpoint, running_external_pacs_network
from tests.xca.test_responding import ALL, H1, dataset_bytes, rad75

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOST: Final = "127.0.0.1"
BASE = default_network()
ANNA = next(p for p in BASE.patients if p.bsn == ALL)
HOSPITAL = next(h for h in BASE.hospitals if h.ura == H1)
JPEG_LOSSLESS, J2K, JLS = str(JPEGLosslessSV1), str(JPEG2000Lossless), str(JPEGLSLossless)
BASELINE = str(JPEGBaseline8Bit)
#: The tags NIST's sameDcmImgs compares; PatientID apart (the requester's own id after a transfer).
NIST_TAGS: Final = ("SOPClassUID", "SOPInstanceUID", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "SeriesInstanceUID")
NOORD = BASE.communities[0]  # Anna's UMC Noord study is held as JPEG-LS Lossless (the demo's)
#: An archive without codecs, holding Anna's study Deflated: a syntax DUO never asks for (dicom/syntaxes.py).
OOST = SimCommunity(home_community_id="urn:oid:2.16.528.1.1007.99.20003", name="XDS Oost",
                    repository_unique_id="2.16.528.1.1007.99.20003.1",
                    institutions=[SimInstitution(ura="00020031", name="Isala Oost")], converts=False,
                    compressed=[SimCompressedStudy(bsn=ALL,
                                                   transfer_syntax=str(DeflatedExplicitVRLittleEndian))])
#: Mitz knows the demo hospitals too; this DUO is configured with the communities only.
NET = BASE.model_copy(update={"communities": [NOORD, OOST]})
REQUESTER = {"ura": REQUESTER_PACS.ura, "organization_type": "V6", "uzi": "000095254", "role": "01.039",
             "purpose": "TREAT"}
LOCAL_ID: Final = "EZ-5402"


def jpeg_lossless(ds: Dataset, workdir: Path) -> Dataset:
    """``ds`` made JPEG Lossless SV1 by DCMTK's dcmcjpeg (its lossless default): pydicom cannot encode it."""
    workdir.mkdir(parents=True, exist_ok=True)
    source, target = workdir / f"{ds.SOPInstanceUID}.dcm", workdir / f"{ds.SOPInstanceUID}.jpl.dcm"
    ds.save_as(source, enforce_file_format=True)
    done = subprocess.run([require_tool("dcmcjpeg"), str(source), str(target)], capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    out = dcmread(target)
    assert str(out.file_meta.TransferSyntaxUID) == JPEG_LOSSLESS
    return out


def _images(study: GeneratedStudy) -> list[Dataset]:
    return [ds for ds in study.instances if "PixelData" in ds]


# ------------------------------------------------------------------------------------------------------
# DUO as Responding Imaging Gateway, Orthanc as the hospital's PACS
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Held:
    """What the hospital's PACS holds: a JPEG 2000 Lossless study and a JPEG Lossless one, as files."""

    j2k: GeneratedStudy
    jpeg_lossless: GeneratedStudy
    files: dict[str, bytes]  # SOP Instance UID -> the Part-10 file given to the PACS


@pytest.fixture(scope="module")
def held_by_orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Orthanc, Held]]:
    tmp = tmp_path_factory.mktemp("orthanc-compressed")
    j2k, plain = generate_studies(ANNA, HOSPITAL, 2, BASE.seed, encodings={0: J2K})
    lossless = dataclasses.replace(plain, instances=[
        jpeg_lossless(ds, tmp / "dcmcjpeg") if "PixelData" in ds else ds for ds in plain.instances])
    files: dict[str, bytes] = {}
    for study in (j2k, lossless):
        for path in write_study(study, tmp / "send" / study.study_instance_uid):
            files[path.stem] = path.read_bytes()
    with run_orthanc(tmp / "orthanc", ae_title="ORTHANC_JPEG") as server:
        for data in files.values():  # over REST: storescu would offer only the syntaxes it is told to
            request = urllib.request.Request(f"http://{server.host}:{server.http_port}/instances", data=data,
                                             method="POST", headers={"Content-Type": "application/dicom"})
            urllib.request.urlopen(request, timeout=30).close()
        yield server, Held(j2k, lossless, files)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def rig(held_by_orthanc: tuple[Orthanc, Held], tmp_path_factory: pytest.TempPathFactory
              ) -> AsyncIterator[Network]:
    server, held = held_by_orthanc
    endpoint = PacsEndpoint(HOSPITAL, server.ae_title, server.dicom_port, server.host)
    tmp = tmp_path_factory.mktemp("duo-rig-compressed")
    async with running_external_pacs_network(tmp, endpoint, [held.j2k, held.jpeg_lossless]) as network:
        yield network


def _one(ds: Dataset) -> RetrieveImagingDocumentSetRequest:
    """NIST's RAD-75 shape: one study, one series, one DocumentRequest (the syntaxes are the test's)."""
    return RetrieveImagingDocumentSetRequest((StudyRequest(str(ds.StudyInstanceUID), (SeriesRequest(
        str(ds.SeriesInstanceUID), (DocumentRequest(HOSPITAL.repository_unique_id, str(ds.SOPInstanceUID),
                                                    HOME),)),)),), ())


def _assert_unaltered(data: bytes | Path, held: bytes) -> Dataset:
    """NIST's ValidateReturnedImages: the image as the source holds it (here: every data set byte)."""
    raw = data if isinstance(data, bytes) else data.read_bytes()
    got, want = dcmread(BytesIO(raw)), dcmread(BytesIO(held))
    assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID
    assert [got.get(t) for t in NIST_TAGS] == [want.get(t) for t in NIST_TAGS]
    assert dataset_bytes(raw) == dataset_bytes(held)
    return got


async def test_rig_2018_5422a(rig: Network, held_by_orthanc: tuple[Orthanc, Held], wsdl_dir: Path) -> None:
    """rig_2018-5422a, Xfer Syntax JPEG Lossless, Single IDS: one image asked in JPEG Lossless (.70) only.

    Adapted: the IDS is the hospital's PACS (Orthanc, the image made .70 by dcmcjpeg), reached by C-GET;
    instead of NIST's RAD-69 check, the image coming back in .70 and byte for byte as the PACS holds it
    shows the PACS was asked in that syntax.
    """
    _, held = held_by_orthanc
    ds = _images(held.jpeg_lossless)[0]
    _, resp = await rad75(rig, dataclasses.replace(_one(ds), transfer_syntaxes=(JPEG_LOSSLESS,)), wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    [doc] = resp.documents
    assert (doc.home, doc.repository_unique_id, doc.document_unique_id, doc.mime_type) == (
        HOME, HOSPITAL.repository_unique_id, str(ds.SOPInstanceUID), MIME_DICOM)
    assert isinstance(doc.data, bytes)
    _assert_unaltered(doc.data, held.files[str(ds.SOPInstanceUID)])


async def test_rig_2018_5422b(rig: Network, held_by_orthanc: tuple[Orthanc, Held], wsdl_dir: Path) -> None:
    """rig_2018-5422b, Multiple Transfer Syntaxes, Single IDS: JPEG Baseline then JPEG Lossless asked; the
    image is not held in the first, so it comes in the second.

    Adapted as rig_2018-5422a; and the same shape against the JPEG 2000 Lossless study (Baseline, then
    JPEG 2000 Lossless): every image in the second syntax, as held.
    """
    _, held = held_by_orthanc
    ds = _images(held.jpeg_lossless)[0]
    _, resp = await rad75(rig, dataclasses.replace(_one(ds), transfer_syntaxes=(BASELINE, JPEG_LOSSLESS)),
                          wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    [doc] = resp.documents
    assert (doc.home, doc.repository_unique_id, doc.document_unique_id, doc.mime_type) == (
        HOME, HOSPITAL.repository_unique_id, str(ds.SOPInstanceUID), MIME_DICOM)
    assert isinstance(doc.data, bytes)
    _assert_unaltered(doc.data, held.files[str(ds.SOPInstanceUID)])

    images = _images(held.j2k)
    series: dict[str, list[DocumentRequest]] = {}
    for image in images:
        series.setdefault(str(image.SeriesInstanceUID), []).append(
            DocumentRequest(HOSPITAL.repository_unique_id, str(image.SOPInstanceUID), HOME))
    study = StudyRequest(held.j2k.study_instance_uid,
                         tuple(SeriesRequest(se, tuple(d)) for se, d in series.items()))
    _, resp = await rad75(rig, RetrieveImagingDocumentSetRequest((study,), (BASELINE, J2K)), wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    assert sorted(d.document_unique_id for d in resp.documents) == sorted(
        str(i.SOPInstanceUID) for i in images)
    for doc in resp.documents:
        assert isinstance(doc.data, bytes)
        _assert_unaltered(doc.data, held.files[doc.document_unique_id])


async def test_rig_2018_5424a(rig: Network, held_by_orthanc: tuple[Orthanc, Held], wsdl_dir: Path) -> None:
    """rig_2018-5424a, Transfer Syntax Failure, Single IDS: one image asked in JPEG Baseline only, which
    the IDS cannot produce from what it holds: a Failure with a non-empty RegistryErrorList and no image.

    Adapted: Orthanc cannot encode the 12-bit image as 8-bit Baseline and fails that C-GET sub-operation;
    DUO answers XDSRepositoryError naming the instance (study:series:instance in codeContext, DUO's home
    community as location, as for every RAD-75 error) where NIST's sample puts the instance in location.
    """
    _, held = held_by_orthanc
    ds = _images(held.jpeg_lossless)[0]
    _, resp = await rad75(rig, dataclasses.replace(_one(ds), transfer_syntaxes=(BASELINE,)), wsdl_dir)
    assert resp.status == ResponseStatus.FAILURE
    assert not resp.documents
    assert [e.error_code for e in resp.errors] == [ErrorCode.REPOSITORY_ERROR]
    assert str(ds.SOPInstanceUID) in resp.errors[0].code_context and resp.errors[0].location == HOME


# ------------------------------------------------------------------------------------------------------
# DUO as Initiating Imaging Gateway, driven through the TLB API, the community simulator as the RIG
# ------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Initiating:
    gateway: Gateway
    communities: dict[str, tuple[XcaCommunitySimulator, Recorder]]
    destination: SimPacs
    session: aiohttp.ClientSession

    @property
    def api(self) -> str:
        return f"{self.gateway.http_url}{self.gateway.config.timeline.path_prefix}"

    async def transfer(self, study_uid: str) -> dict[str, Any]:
        """Transfer one of Anna's studies (found on her timeline) into the requester's PACS: the job."""
        body = {"patient": {"bsn": ALL}, "requester": REQUESTER,
                "period": {"from": "2015-01-01", "to": "2026-12-31"}}
        async with self.session.post(f"{self.api}/timeline", json=body) as r:
            assert r.status == 200, await r.text()
            [study] = [s for s in (await r.json())["studies"] if s["study_instance_uid"] == study_uid]
        order = {"studies": [study["id"]], "destination": "requester-pacs", "requester": REQUESTER,
                 "local_patient_id": LOCAL_ID}
        async with self.session.post(f"{self.api}/transfers", json=order) as r:
            accepted = await r.json()
            assert r.status == 202, accepted
        for _ in range(600):
            async with self.session.get(f"{self.api}/transfers/{accepted['id']}") as r:
                job: dict[str, Any] = await r.json()
            if job["state"] not in ("queued", "running"):
                return job
            await asyncio.sleep(0.1)
        raise AssertionError(f"transfer still {job['state']} after 60 s")

    def rad75_requests(self, home: str, study_uid: str) -> list[RetrieveImagingDocumentSetRequest]:
        """Every RAD-75 request DUO sent the community about the study (NIST's xcr.ids transaction log)."""
        _, recorder = self.communities[home]
        found = []
        for env in recorder.envelopes():
            if env.addressing.action == Action.RAD75 and env.body is not None:
                req = parse_imaging_retrieve_request(env.body)
                if any(s.study_instance_uid == study_uid for s in req.studies):
                    found.append(req)
        return found


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def iig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Initiating]:
    tmp = tmp_path_factory.mktemp("duo-iig-compressed")
    noord, oost = (XcaCommunitySimulator(c, NET) for c in (NOORD, OOST))
    # Anna's study at Martini Noord, its images made JPEG Lossless by DCMTK (NIST's iig_2018-5402a image).
    martini = next(s for p, i, s in noord.studies if p.bsn == ALL and i.ura == NOORD.institutions[1].ura)
    for ds in _images(martini):
        noord.store_instance(jpeg_lossless(ds, tmp / "dcmcjpeg"))
    peers: list[Peer] = []
    destination = SimPacs(REQUESTER_PACS, tmp / "requester", host=HOST)
    gateway: Gateway | None = None
    try:
        await asyncio.to_thread(destination.start)
        mitz = await serve_peer(MitzSimulator(NET, tlb_home_community_id=HOME).app())
        peers.append(mitz)
        communities: dict[str, tuple[XcaCommunitySimulator, Recorder]] = {}
        urls: dict[str, str] = {}
        for sim in (noord, oost):
            recorder = Recorder()
            app = sim.app()
            app.middlewares.insert(0, recorder.middleware)
            peer = await serve_peer(app)
            peers.append(peer)
            communities[sim.home], urls[sim.home] = (sim, recorder), peer.url
        pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
        raw = {
            "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO (IIG conformance)"},
            "listeners": {"http": {"host": HOST, "port": 0}, "dicom": {"host": HOST, "port": 0}},
            "xca_communities": [{
                "home_community_id": c.home_community_id, "name": c.name,
                "iti38": f"{urls[c.home_community_id]}/iti38", "iti39": f"{urls[c.home_community_id]}/iti39",
                "rad75": f"{urls[c.home_community_id]}/rad75", "uras": [i.ura for i in c.institutions],
                "timeout_s": 10.0, "retries": 0}
                for c in (NOORD, OOST)],
            "mitz": {"closed_url": f"{mitz.url}/geslotenautorisatievraag/xacml3",
                     "open_url": f"{mitz.url}/openautorisatievraag",
                     "subscriptions_url": f"{mitz.url}/abonnementen/fhir/Subscription"},
            "xua": {"signing_key_file": str(pki.server.key), "signing_cert_file": str(pki.server.cert)},
            "transfers": {"destinations": [{"name": "requester-pacs", "ae_title": REQUESTER_PACS.ae_title,
                                            "host": HOST, "port": destination.port,
                                            "uras": [REQUESTER["ura"]],
                                            "patient_id_issuer": "EIGEN_ZIEKENHUIS"}],
                          "retries": 0, "retry_backoff_s": 0.1},
            "clients": plain_clients(tlb_uras=[REQUESTER["ura"]]),
            "storage": {"path": str(tmp / "duo")},
            "logging": {"level": "WARNING"},
        }
        gateway = Gateway(parse_config(raw, base_dir=tmp, source="iig conformance", env={}))
        await gateway.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield Initiating(gateway, communities, destination, session)
    finally:
        if gateway is not None:
            await gateway.stop()
        for peer in peers:
            await peer.runner.cleanup()
        await asyncio.to_thread(destination.stop)


def _assert_rad75_requests(iig: Initiating, home: str, study: GeneratedStudy) -> None:
    """NIST's ValidateRad75Request (sameReqImgs): the study, its series and instances, the community's home
    and repository in every DocumentRequest, and the syntax list (DUO's, holding the community's syntax)."""
    sim, _ = iig.communities[home]
    requests = iig.rad75_requests(home, study.study_instance_uid)
    assert requests
    asked: set[str] = set()
    for req in requests:
        assert req.transfer_syntaxes == PREFERRED
        for study_uid, series_uid, doc in req.instances():
            assert study_uid == study.study_instance_uid
            assert (doc.home, doc.repository_unique_id) == (home, sim.repository_unique_id)
            assert series_uid == next(str(ds.SeriesInstanceUID) for ds in study.instances
                                      if str(ds.SOPInstanceUID) == doc.document_unique_id)
            asked.add(doc.document_unique_id)
    assert asked == kos_instances(sim, study.study_instance_uid)


def _assert_images_as_held(iig: Initiating, held: dict[str, Dataset], syntax: str) -> None:
    """NIST's ValidateReturnedImages at the requester's PACS: each image in the community's syntax, its
    encoded pixel data unchanged, NIST's tags equal but for PatientID (the requester's own id)."""
    study_uid = str(next(iter(held.values())).StudyInstanceUID)
    arrived = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, iig.destination.instance_paths(study_uid))}
    for uid, ds in held.items():
        got = arrived[uid]
        assert str(got.file_meta.TransferSyntaxUID) == syntax == str(ds.file_meta.TransferSyntaxUID)
        assert got.PixelData == ds.PixelData
        assert [got.get(t) for t in NIST_TAGS if t != "PatientID"] == [ds.get(t) for t in NIST_TAGS
                                                                      if t != "PatientID"]
        assert got.PatientID == LOCAL_ID


def _held_images(sim: XcaCommunitySimulator, study: GeneratedStudy) -> dict[str, Dataset]:
    """The community's images of ``study`` as it holds them now (store_instance included)."""
    held: dict[str, Dataset] = {}
    for ds in _images(study):
        now = sim.instance(study.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        assert now is not None
        held[str(ds.SOPInstanceUID)] = dcmread(BytesIO(encode_part10(now)))
    return held


async def test_iig_2018_5402a(iig: Initiating) -> None:
    """iig_2018-5402a, Xfer Syntax JPEG Lossless, Single Responding Gateway: the community holds the image
    JPEG Lossless (.70, made by DCMTK dcmcjpeg); DUO's RAD-75 asks for it in a list that holds .70, and
    the image reaches the consumer unaltered.

    Adapted: the consumer is a TLB transfer of the whole study (Anna's, at Martini Noord in XDS Noord, its
    images .70) into the requester's PACS, not RAD-69 for one image; DUO's list is PREFERRED, not the
    consumer's; the images are checked at the requester's PACS, PatientID being the requester's local id.
    """
    sim, _ = iig.communities[NOORD.home_community_id]
    study = next(s for p, i, s in sim.studies if p.bsn == ALL and i.ura == NOORD.institutions[1].ura)
    job = await iig.transfer(study.study_instance_uid)
    assert job["state"] == "completed", job
    assert job["instances_stored"] == job["instances_expected"] > 0
    _assert_rad75_requests(iig, NOORD.home_community_id, study)
    assert JPEG_LOSSLESS in PREFERRED
    _assert_images_as_held(iig, _held_images(sim, study), JPEG_LOSSLESS)


async def test_iig_2018_5402b(iig: Initiating) -> None:
    """iig_2018-5402b, Multiple Xfer Syntaxes, Single Responding Gateway: the image is not available in
    the first syntax asked but in a later one, and arrives in that one.

    Adapted as iig_2018-5402a: Anna's UMC Noord study, held JPEG-LS Lossless, which DUO's list names
    after JPEG 2000 Lossless; the community serves what it holds rather than the first syntax listed.
    """
    sim, _ = iig.communities[NOORD.home_community_id]
    (uid, syntax), = [(u, ts) for u, ts in sim.compressed]
    assert syntax == JLS and PREFERRED.index(JLS) > 0
    study = next(s for _, _, s in sim.studies if s.study_instance_uid == uid)
    job = await iig.transfer(uid)
    assert job["state"] == "completed", job
    assert job["instances_stored"] == job["instances_expected"] > 0
    _assert_rad75_requests(iig, NOORD.home_community_id, study)
    _assert_images_as_held(iig, _held_images(sim, study), JLS)


async def test_iig_2018_5404a(iig: Initiating) -> None:
    """iig_2018-5404a, Xfer Syntax Failure, Single Responding Gateway: the Responding Gateway cannot give
    the image in any syntax asked and says so; DUO's consumer gets a failure with the error, no image.

    Adapted: DUO's consumer does not choose the syntax, so the community (XDS Oost) holds the image in
    one DUO never asks for (Deflated Explicit VR Little Endian; see dicom/syntaxes.py) and has no codec
    to convert it (converts = false), answering XDSRepositoryError per instance; NIST's Failure status
    and non-empty RegistryErrorList become the transfer's failed state with that error in its detail.
    """
    sim, _ = iig.communities[OOST.home_community_id]
    (uid, syntax), = sim.compressed
    assert syntax not in PREFERRED
    study = next(s for _, _, s in sim.studies if s.study_instance_uid == uid)
    job = await iig.transfer(uid)
    assert job["state"] == "failed", job
    assert job["instances_stored"] == 0 and job["instances_failed"] == job["instances_expected"] > 0
    assert ErrorCode.REPOSITORY_ERROR in job["studies"][0]["detail"], job
    assert iig.destination.instance_paths(uid) == []
    _assert_rad75_requests(iig, OOST.home_community_id, study)
