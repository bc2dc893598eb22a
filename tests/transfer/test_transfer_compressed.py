"""Compressed studies transferred end to end, over DUO's TLB API, into PACSes configured each way.

Issue 13: a compressed study from a TLB hospital and one from a community each transfer complete into
the requester's PACS, compressed when it accepts that syntax, losslessly decompressed when it accepts
only uncompressed data. The sources: a TLB hospital's **Orthanc** holding the consenting patient's study
in JPEG 2000 Lossless (fetched by DUO with C-GET), and the XCA community simulator holding her study at
its first institution in JPEG-LS Lossless (the demo network's; fetched with ITI-39 and RAD-75). The
destinations, each one of DUO's configured PACSes: Orthanc accepting every syntax, Orthanc with
``AcceptedTransferSyntaxes`` uncompressed only, DCMTK ``storescp +xa`` (every syntax it knows) and
``storescp`` in its default configuration (uncompressed only).

What lands is read back from the destination itself, not taken from DUO's status: every SOP Instance
UID the source holds, once; an image in its stored syntax with the Pixel Data element byte for byte the
source's, or, where the destination declines that syntax, in uncompressed little endian with the
source's decoded pixels; a report (no pixel data) as stored. Every peer and DUO start once for the
module; each destination gets one job carrying both studies.
"""

from __future__ import annotations

import asyncio
import urllib.request
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import AbstractContextManager, ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final, TypeVar

import numpy as np
import pytest
import pytest_asyncio
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels import pixel_array
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless

from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from tests.support.compressed import pixel_element
from tests.support.orthanc import Orthanc, run_orthanc
from tests.support.storescp import StoreScp, run_storescp
from tests.transfer.harness import (
    ALL,
    HOST,
    LOCAL_ISSUER,
    NET,
    REQUESTER,
    TLB,
    TransferNetwork,
    kos_instances,
    running,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")
PeerT = TypeVar("PeerT")

#: The consenting patient's study at the Orthanc-backed TLB hospital, stored as JPEG 2000 Lossless.
TLB_STUDY: Final[GeneratedStudy] = generate_studies(
    ALL, TLB, 1, NET.seed, image_size=NET.image_size, encodings={0: str(JPEG2000Lossless)})[0]


@dataclass(frozen=True)
class Destination:
    """One of DUO's configured PACSes and how to read back what it received."""

    name: str
    accepts_compressed: bool
    orthanc: Orthanc | None = None
    scp: StoreScp | None = None

    @property
    def config(self) -> dict[str, Any]:
        if self.orthanc is not None:
            ae_title, port = self.orthanc.ae_title, self.orthanc.dicom_port
        else:
            assert self.scp is not None
            ae_title, port = self.scp.ae_title, self.scp.port
        return {"name": self.name, "ae_title": ae_title, "host": HOST, "port": port,
                "uras": [REQUESTER["ura"]], "patient_id_issuer": LOCAL_ISSUER, "timeout_s": 10.0}

    def files(self, into: Path) -> dict[str, list[Path]]:
        """SOP Instance UID -> every file stored under it (one per C-STORE at storescp ``+uf``; Orthanc
        keeps one per instance whatever arrived twice)."""
        got: dict[str, list[Path]] = {}
        if self.scp is not None:
            paths = [p for p in sorted(self.scp.directory.iterdir())
                     if p.is_file() and not p.name.startswith(".")]
        else:
            assert self.orthanc is not None
            into.mkdir(parents=True, exist_ok=True)
            listed = self.orthanc.rest("/instances")
            assert isinstance(listed, list)
            paths = []
            for n, orthanc_id in enumerate(listed):
                path = into / f"{n}.dcm"
                url = f"http://{self.orthanc.host}:{self.orthanc.http_port}/instances/{orthanc_id}/file"
                with urllib.request.urlopen(url, timeout=10) as r:
                    path.write_bytes(r.read())
                paths.append(path)
        for path in paths:
            uid = str(dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"]).SOPInstanceUID)
            got.setdefault(uid, []).append(path)
        return got


UNCOMPRESSED_ONLY: Final[dict[str, object]] = {"AcceptedTransferSyntaxes": list(UNCOMPRESSED_LE)}
#: (name, Orthanc or storescp, accepts compressed syntaxes, the peer's options: Orthanc configuration
#: entries or storescp flags; storescp's default accepts only uncompressed syntaxes).
DESTINATIONS: Final[tuple[tuple[str, str, bool, dict[str, object] | list[str]], ...]] = (
    ("orthanc-all", "orthanc", True, {}),
    ("orthanc-uncompressed", "orthanc", False, UNCOMPRESSED_ONLY),
    ("storescp-all", "storescp", True, ["+xa"]),
    ("storescp-uncompressed", "storescp", False, []),
)


@dataclass(frozen=True)
class Peers:
    source: Orthanc
    destinations: dict[str, Destination]


@contextmanager
def stopped_together() -> Iterator[list[ExitStack]]:
    """Each peer gets its own exit stack, closed in parallel at the end: an idle Orthanc takes over 3 s
    to stop (its HTTP and DICOM servers each poll for shutdown once a second), three of them in a row
    would cost the module 10 s of teardown."""
    stacks: list[ExitStack] = []
    try:
        yield stacks
    finally:
        with ThreadPoolExecutor(max_workers=max(len(stacks), 1)) as pool:
            for done in [pool.submit(s.close) for s in stacks]:
                done.result()


@pytest.fixture(scope="module")
def peers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Peers]:
    """The TLB hospital's Orthanc holding :data:`TLB_STUDY` and the four destinations."""
    with stopped_together() as stacks:
        def peer(manager: AbstractContextManager[PeerT]) -> PeerT:
            stacks.append(ExitStack())
            return stacks[-1].enter_context(manager)

        tmp = tmp_path_factory.mktemp("source")
        files = write_study(TLB_STUDY, tmp / "send")
        source = peer(run_orthanc(tmp / "orthanc", ae_title="ORTHANC_SRC"))
        for path in files:  # over REST: storescu would offer only the syntaxes it is told to
            request = urllib.request.Request(f"http://{source.host}:{source.http_port}/instances",
                                             data=path.read_bytes(), method="POST",
                                             headers={"Content-Type": "application/dicom"})
            urllib.request.urlopen(request, timeout=30).close()
        held = source.post("/tools/find", {"Level": "Instance", "Expand": True,
                                           "Query": {"StudyInstanceUID": TLB_STUDY.study_instance_uid}})
        assert isinstance(held, list) and len(held) == len(files)

        destinations: dict[str, Destination] = {}
        for n, (name, kind, accepts, options) in enumerate(DESTINATIONS):
            work = tmp_path_factory.mktemp(name)
            ae_title = f"OWN_PACS_{n}"
            if kind == "orthanc":
                assert isinstance(options, dict)
                orthanc = peer(run_orthanc(work, ae_title=ae_title, options=options))
                destinations[name] = Destination(name, accepts, orthanc=orthanc)
            else:
                assert isinstance(options, list)
                scp = peer(run_storescp(work, ae_title=ae_title, options=options))
                destinations[name] = Destination(name, accepts, scp=scp)
        yield Peers(source, destinations)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory, peers: Peers) -> AsyncIterator[TransferNetwork]:
    # The harness configures one destination from the Orthanc it is given; ``destinations`` replaces that
    # list with all four.
    first = peers.destinations["orthanc-all"].orthanc
    assert first is not None
    async with running(tmp_path_factory.mktemp("net"), peers.source, first,
                       destinations=[d.config for d in peers.destinations.values()]) as net:
        yield net


def xca_study(network: TransferNetwork) -> tuple[str, dict[str, Dataset]]:
    """The patient's JPEG-LS study in the community: its UID and the instances its KOS manifest lists (what
    a transfer delivers; the report is a document of its own), as the archive holds them."""
    [study_uid] = [uid for uid, ts in network.community_sim.compressed if ts == str(JPEGLSLossless)]
    listed = kos_instances(network.community_sim, study_uid)
    held: dict[str, Dataset] = {}
    for _, _, study in network.community_sim.studies:
        if study.study_instance_uid == study_uid:
            for ds in study.instances:
                found = network.community_sim.instance(study_uid, str(ds.SeriesInstanceUID),
                                                       str(ds.SOPInstanceUID))
                assert found is not None
                if "PixelData" in found:
                    assert str(ds.SOPInstanceUID) in listed, "every image is in the manifest"
                if str(ds.SOPInstanceUID) in listed:
                    held[str(ds.SOPInstanceUID)] = found
    assert set(held) == listed
    return study_uid, held


def as_files(instances: dict[str, Dataset], folder: Path) -> dict[str, Path]:
    folder.mkdir(parents=True, exist_ok=True)
    out: dict[str, Path] = {}
    for uid, ds in instances.items():
        out[uid] = folder / f"{uid}.dcm"
        dcmwrite(out[uid], ds, enforce_file_format=True)
    return out


def check_landed(held: dict[str, Path], landed: dict[str, list[Path]], stored_syntax: str,
                 accepts_compressed: bool) -> None:
    """Every instance of ``held`` (SOP Instance UID -> the source's file) arrived once, as the destination
    accepts it."""
    images = 0
    for uid, source_path in held.items():
        [path] = landed[uid]
        source_ds = dcmread(source_path, stop_before_pixels=True)
        arrived = str(dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID)
        if source_ds.file_meta.TransferSyntaxUID != stored_syntax:  # the report: no pixel data to compress
            assert "PixelData" not in dcmread(source_path), uid
            assert arrived == str(source_ds.file_meta.TransferSyntaxUID), uid
            continue
        images += 1
        if accepts_compressed:
            assert arrived == stored_syntax, uid
            assert pixel_element(path) == pixel_element(source_path), uid
        else:
            assert arrived in UNCOMPRESSED_LE, (uid, arrived)
            assert np.array_equal(pixel_array(path, raw=True), pixel_array(source_path, raw=True)), uid
    assert images > 0, "the study has compressed images"


@pytest.mark.parametrize("name", [d[0] for d in DESTINATIONS])
async def test_compressed_studies_from_a_hospital_and_a_community_land_complete(
        network: TransferNetwork, peers: Peers, name: str, tmp_path: Path) -> None:
    destination = peers.destinations[name]
    ids = {s["study_instance_uid"]: s["id"] for s in (await network.timeline(ALL.bsn))["studies"]}
    xca_uid, xca_held = xca_study(network)
    tlb_id, xca_id = ids[TLB_STUDY.study_instance_uid], ids[xca_uid]

    status, accepted = await network.submit([tlb_id, xca_id], destination=name)
    assert status == 202, accepted
    job = await network.wait(accepted["id"])
    assert job["state"] == "completed", job

    landed = await asyncio.to_thread(destination.files, tmp_path / "landed")
    tlb_held = await asyncio.to_thread(as_files, {str(ds.SOPInstanceUID): ds for ds in TLB_STUDY.instances},
                                       tmp_path / "tlb")
    xca_files = await asyncio.to_thread(as_files, xca_held, tmp_path / "xca")
    for study_id, held in ((tlb_id, tlb_held), (xca_id, xca_files)):
        [study] = [s for s in job["studies"] if s["id"] == study_id]
        assert study["state"] == "completed", study
        assert study["instances_stored"] == study["instances_expected"] == len(held), study
    assert sorted(landed) == sorted([*tlb_held, *xca_files]), "both studies' instances, no more, no less"
    check_landed(tlb_held, {u: landed[u] for u in tlb_held}, str(JPEG2000Lossless),
                 destination.accepts_compressed)
    check_landed(xca_files, {u: landed[u] for u in xca_files}, str(JPEGLSLossless),
                 destination.accepts_compressed)
