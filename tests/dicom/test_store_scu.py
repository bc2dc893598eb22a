"""The C-STORE SCU against real peers: Orthanc, DCMTK storescp and pynetdicom SCPs that misbehave on cue."""

from __future__ import annotations

import asyncio
import dataclasses
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.uid import (
    UID,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, StoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, MRImageStorage  # type: ignore[attr-defined]

from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.daemon import free_port
from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.dicom.store_scu import (
    StoreClient,
    StoreResult,
    StoreUnavailable,
    classify,
)
from duo_gateway.dicom.transcode import transcode_uncompressed
from tests.support.dicom_files import pixel_bytes, sample, write_large
from tests.support.orthanc import run_orthanc
from tests.support.storescp import run_storescp

HOST = "127.0.0.1"
DUO_AE = "DUO_TEST"


@dataclasses.dataclass(frozen=True)
class Instance:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str


def copies(template: str, n: int, out: Path, study_uid: str) -> list[Instance]:
    """``n`` copies of a pydicom test file in a new series of ``study_uid``, in the file's own syntax."""
    out.mkdir(parents=True, exist_ok=True)
    series_uid = generate_uid()
    result = []
    for number in range(1, n + 1):
        ds = dcmread(sample(template))
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = series_uid
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.InstanceNumber = number
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        result.append(Instance(path, str(ds.SOPClassUID), str(ds.SOPInstanceUID),
                               str(ds.file_meta.TransferSyntaxUID)))
    return result


#: The organisation the test destinations belong to.
OWN = ["00010001"]

def destination(port: int, ae_title: str = "DEST", timeout_s: float = 5) -> DestinationPacs:
    return DestinationPacs(uras=OWN, name="dest", ae_title=ae_title, host=HOST, port=port,
                           timeout_s=timeout_s)


async def store(client: StoreClient, inst: Instance) -> StoreResult:
    return await client.store(inst.path, sop_class_uid=inst.sop_class_uid,
                              sop_instance_uid=inst.sop_instance_uid,
                              transfer_syntax_uid=inst.transfer_syntax_uid)


def leftovers(directory: Path, pattern: str) -> list[Path]:
    return list(directory.rglob(pattern))


# -- a pynetdicom SCP on cue -----------------------------------------------------------------------


@dataclasses.dataclass
class Scp:
    port: int
    received: list[tuple[str, str, bytes | None]]  # (SOP instance UID, transfer syntax, PixelData)
    associations: list[int]


@contextmanager
def pynetdicom_scp(handler: Callable[[Any], int] | None = None,
                   contexts: list[tuple[str, list[UID]]] | None = None) -> Iterator[Scp]:
    """A storage SCP on a free loopback port; ``handler(event)`` may return a status (default 0)."""
    ae = AE(ae_title="DEST")
    if contexts is None:
        for cx in StoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, [ExplicitVRLittleEndian, ImplicitVRLittleEndian,
                                                          RLELossless])
    else:
        for sop, tss in contexts:
            ae.add_supported_context(sop, tss)
    scp = Scp(0, [], [])
    lock = threading.Lock()

    def on_store(event: Any) -> int:
        status = handler(event) if handler is not None else 0
        if status == 0:
            ds = event.dataset
            with lock:
                scp.received.append((str(ds.SOPInstanceUID), str(event.context.transfer_syntax),
                                     ds.get("PixelData")))
        return status

    def on_open(event: Any) -> None:
        with lock:
            scp.associations.append(1)

    server = start_acceptor(ae, (HOST, 0),
                            evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ESTABLISHED, on_open)])
    scp.port = int(server.server_address[1])
    try:
        yield scp
    finally:
        server.shutdown()


# -- status classification -------------------------------------------------------------------------


def test_classify() -> None:
    assert classify(0x0000) == "stored"
    assert {classify(s) for s in (0xB000, 0xB006, 0xB007)} == {"warning"}
    assert {classify(s) for s in (0xA700, 0xA7FF)} == {"transient"}
    assert {classify(s) for s in (0xA900, 0xC000, 0xCFFF, 0x0122, 0x0210, 0x0117)} == {"refused"}


async def test_status_classes_from_a_real_scp(tmp_path: Path) -> None:
    study = generate_uid()
    insts = copies("CT_small.dcm", 5, tmp_path, study)
    answers = {insts[0].sop_instance_uid: 0xA700, insts[1].sop_instance_uid: 0xC000,
               insts[2].sop_instance_uid: 0xB000, insts[3].sop_instance_uid: 0xA900}

    def handler(event: Any) -> int:
        return answers.get(str(event.request.AffectedSOPInstanceUID), 0)

    with pynetdicom_scp(handler) as scp:
        async with StoreClient(destination(scp.port), DUO_AE) as client:
            results = [await store(client, i) for i in insts]
        assert [r.outcome for r in results] == ["transient", "refused", "warning", "refused", "stored"]
        assert [r.status for r in results] == [0xA700, 0xC000, 0xB000, 0xA900, 0]
        assert [r.stored for r in results] == [False, False, True, False, True]
        assert "out of resources" in results[0].detail and "warning" in results[2].detail
        assert [r.sop_instance_uid for r in results] == [i.sop_instance_uid for i in insts]
        assert client.associations == 1 and len(scp.associations) == 1  # a failure status keeps it


# -- Orthanc ---------------------------------------------------------------------------------------


async def test_multi_series_study_into_orthanc(tmp_path: Path) -> None:
    study = generate_uid()
    ct = copies("CT_small.dcm", 6, tmp_path / "ct", study)             # CT, Explicit VR LE
    mr = copies("MR_small_implicit.dcm", 4, tmp_path / "mr", study)    # MR, Implicit VR LE
    rle = copies("MR_small_RLE.dcm", 3, tmp_path / "rle", study)       # MR, RLE: not yet proposed
    j2k = copies("MR_small_jp2klossless.dcm", 2, tmp_path / "j2k", study)
    everything = ct + mr + rle + j2k
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        dest = DestinationPacs(uras=OWN, name="orthanc", ae_title=orthanc.ae_title, host=orthanc.host,
                               port=orthanc.dicom_port, timeout_s=10)
        async with StoreClient(dest, DUO_AE) as client:
            results = [await store(client, i) for i in everything]
            # nothing declared up front: MR, then RLE, then JPEG 2000 each needed a larger association
            assert client.associations == 4
        assert {r.outcome for r in results} == {"stored"}, [r.detail for r in results]
        listed = orthanc.rest("/instances?expand")
        assert isinstance(listed, list)
        uids = [str(i["MainDicomTags"]["SOPInstanceUID"]) for i in listed]
        assert sorted(uids) == sorted(i.sop_instance_uid for i in everything)  # each exactly once
        # sent as stored: Orthanc kept every file's own transfer syntax
        for item in listed:
            meta = orthanc.rest(f"/instances/{item['ID']}/metadata?expand")
            assert isinstance(meta, dict)
            uid = str(item["MainDicomTags"]["SOPInstanceUID"])
            want = next(i.transfer_syntax_uid for i in everything if i.sop_instance_uid == uid)
            assert meta["TransferSyntax"] == want


async def test_expect_avoids_reassociation(tmp_path: Path) -> None:
    study = generate_uid()
    insts = copies("CT_small.dcm", 2, tmp_path / "ct", study) + copies("MR_small_RLE.dcm", 2, tmp_path / "r",
                                                                       study)
    with pynetdicom_scp() as scp:
        async with StoreClient(destination(scp.port), DUO_AE) as client:
            client.expect((i.sop_class_uid, i.transfer_syntax_uid) for i in insts)
            results = [await store(client, i) for i in insts]
            assert client.associations == 1
    assert {r.outcome for r in results} == {"stored"}


# -- DCMTK storescp ----------------------------------------------------------------------------------


async def test_large_instance_to_storescp_streams_with_flat_memory(tmp_path: Path) -> None:
    big = write_large(tmp_path / "big.dcm", 64)
    header = dcmread(big, stop_before_pixels=True)
    with run_storescp(tmp_path / "scp", ae_title="DEST") as scp:
        async with StoreClient(destination(scp.port, timeout_s=30), DUO_AE) as client:
            tracemalloc.start()
            try:
                started = time.perf_counter()
                result = await client.store(big, sop_class_uid=str(header.SOPClassUID),
                                            sop_instance_uid=str(header.SOPInstanceUID),
                                            transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID))
                elapsed = time.perf_counter() - started
                _, peak = tracemalloc.get_traced_memory()
            finally:
                tracemalloc.stop()
    print(f"\n64 MiB instance to storescp: {elapsed:.2f} s, tracemalloc peak {peak / 1e6:.1f} MB")
    assert result.outcome == "stored", result.detail
    assert peak < 8 * (1 << 20)  # the bounded PDU queue: ~1 MiB in flight, not the whole instance
    received = [p for p in scp.directory.iterdir() if p.is_file() and not p.name.startswith(".")]
    assert len(received) == 1
    assert pixel_bytes(received[0]) == pixel_bytes(big)


# -- conversion and unsupported contexts -------------------------------------------------------------


async def test_converts_lossless_data_and_refuses_the_rest(tmp_path: Path) -> None:
    study = generate_uid()
    ct = copies("CT_small.dcm", 2, tmp_path / "ct", study)             # Explicit; SCP takes Implicit only
    mr = copies("MR_small_implicit.dcm", 1, tmp_path / "mr", study)    # Implicit; SCP takes Explicit only
    rle = copies("MR_small_RLE.dcm", 1, tmp_path / "rle", study)       # RLE: not accepted, decompressed
    sc = copies("CT_small.dcm", 1, tmp_path / "sc", study)  # Secondary Capture: unsupported
    ds = dcmread(sc[0].path)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.7")
    ds.save_as(sc[0].path, enforce_file_format=True)
    sc = [dataclasses.replace(sc[0], sop_class_uid="1.2.840.10008.5.1.4.1.1.7")]
    contexts = [(CTImageStorage, [ImplicitVRLittleEndian]), (MRImageStorage, [ExplicitVRLittleEndian])]
    with pynetdicom_scp(contexts=contexts) as scp:
        async with StoreClient(destination(scp.port), DUO_AE) as client:
            results = [await store(client, i) for i in ct + mr + rle + sc]
    outcomes = [r.outcome for r in results]
    assert outcomes == ["stored", "stored", "stored", "stored", "refused"], [r.detail for r in results]
    assert "converted from RLE Lossless" in results[3].detail
    assert "1.2.840.10008.5.1.4.1.1.7" in results[4].detail and results[4].local
    got = {uid: (ts, px) for uid, ts, px in scp.received}
    for inst in ct + mr:
        ts, px = got[inst.sop_instance_uid]
        assert ts == (ImplicitVRLittleEndian if inst in ct else ExplicitVRLittleEndian)
        assert px == dcmread(inst.path).PixelData
    ts, px = got[rle[0].sop_instance_uid]
    original = dcmread(rle[0].path)
    assert ts == ExplicitVRLittleEndian and px == original.pixel_array.astype("<i2").tobytes()
    assert not leftovers(tmp_path, ".convert-*")


def test_transcode_roundtrip_keeps_every_element(tmp_path: Path) -> None:
    src = sample("CT_small.dcm")
    implicit, explicit = tmp_path / "i.dcm", tmp_path / "e.dcm"
    transcode_uncompressed(src, implicit, UID(ImplicitVRLittleEndian))
    transcode_uncompressed(implicit, explicit, UID(ExplicitVRLittleEndian))
    a, b, c = dcmread(src), dcmread(implicit), dcmread(explicit)
    assert b.file_meta.TransferSyntaxUID == ImplicitVRLittleEndian
    assert a.PixelData == b.PixelData == c.PixelData
    assert [e.tag for e in a] == [e.tag for e in b] == [e.tag for e in c]
    assert a.PatientName == c.PatientName and a.ImagePositionPatient == c.ImagePositionPatient


# -- unavailable destinations --------------------------------------------------------------------------


async def test_destination_down(tmp_path: Path) -> None:
    inst = copies("CT_small.dcm", 1, tmp_path, generate_uid())[0]
    async with StoreClient(destination(free_port(), timeout_s=2), DUO_AE) as client:
        with pytest.raises(StoreUnavailable) as info:
            await store(client, inst)
    assert info.value.retryable and (info.value.kind, info.value.label) == ("unavailable", "connect")


async def test_wrong_called_ae_rejected(tmp_path: Path) -> None:
    inst = copies("CT_small.dcm", 1, tmp_path, generate_uid())[0]
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        dest = DestinationPacs(uras=OWN, name="o", ae_title="NOT_ORTHANC", host=orthanc.host,
                               port=orthanc.dicom_port)
        async with StoreClient(dest, DUO_AE) as client:
            with pytest.raises(StoreUnavailable) as info:
                await store(client, inst)
    # Orthanc answers A-ASSOCIATE-RJ ("rejected"); once in a clean-clone CI run the association ended
    # as refused/aborted instead ("connect", not investigated further). Either way the instance is not
    # stored and the failure is retryable, which is what the relay depends on.
    assert info.value.retryable and info.value.kind == "unavailable", info.value
    assert info.value.label in ("rejected", "connect"), info.value


async def test_abort_mid_association_then_reconnect(tmp_path: Path) -> None:
    insts = copies("CT_small.dcm", 4, tmp_path, generate_uid())
    poison = insts[1].sop_instance_uid

    def handler(event: Any) -> int:
        if str(event.request.AffectedSOPInstanceUID) == poison:
            event.assoc.abort()
            return 0xA700  # never reaches us; keeps the SCP from recording the instance
        return 0

    with pynetdicom_scp(handler) as scp:
        async with StoreClient(destination(scp.port), DUO_AE) as client:
            assert (await store(client, insts[0])).outcome == "stored"
            with pytest.raises(StoreUnavailable) as info:
                await store(client, insts[1])
            assert info.value.retryable and info.value.label in ("aborted", "timeout")
            later = [await store(client, i) for i in insts[2:]]
            assert {r.outcome for r in later} == {"stored"}
            assert client.associations == 2
    assert poison not in {uid for uid, _, _ in scp.received}


async def test_dimse_timeout_then_reconnect(tmp_path: Path) -> None:
    insts = copies("CT_small.dcm", 2, tmp_path, generate_uid())
    slow = insts[0].sop_instance_uid

    def handler(event: Any) -> int:
        if str(event.request.AffectedSOPInstanceUID) == slow:
            time.sleep(2.5)
        return 0

    with pynetdicom_scp(handler) as scp:
        async with StoreClient(destination(scp.port, timeout_s=1), DUO_AE) as client:
            started = time.monotonic()
            with pytest.raises(StoreUnavailable) as info:
                await store(client, insts[0])
            assert (info.value.kind, info.value.label) == ("timeout", "timeout")
            assert time.monotonic() - started < 5
            assert (await store(client, insts[1])).outcome == "stored"


async def test_cancel_aborts_and_next_store_reconnects(tmp_path: Path) -> None:
    insts = copies("CT_small.dcm", 2, tmp_path, generate_uid())
    slow = insts[0].sop_instance_uid

    def handler(event: Any) -> int:
        if str(event.request.AffectedSOPInstanceUID) == slow:
            time.sleep(1.5)
        return 0

    with pynetdicom_scp(handler) as scp:
        async with StoreClient(destination(scp.port), DUO_AE) as client:
            task = asyncio.create_task(store(client, insts[0]))
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert (await store(client, insts[1])).outcome == "stored"
            assert client.associations == 2


# -- TLS ---------------------------------------------------------------------------------------------


async def test_tls_destination_with_client_certificate(tmp_path: Path) -> None:
    import ssl

    from duo_gateway.config.tls import ClientTls
    from tests.support.pki import make_pki

    pki = make_pki(tmp_path / "pki")
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(str(pki.server.cert), str(pki.server.key))
    server_ctx.load_verify_locations(cafile=str(pki.ca_cert))
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    insts = copies("CT_small.dcm", 3, tmp_path / "ct", generate_uid())
    big = write_large(tmp_path / "big.dcm", 4)
    header = dcmread(big, stop_before_pixels=True)
    received: list[str] = []

    def on_store(event: Any) -> int:
        received.append(str(event.request.AffectedSOPInstanceUID))
        return 0

    ae = AE(ae_title="DEST")
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = start_acceptor(ae, (HOST, 0), ssl_context=server_ctx,
                            evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        tls = ClientTls(ca_file=pki.ca_cert, cert_file=pki.client.cert, key_file=pki.client.key)
        dest = DestinationPacs(uras=OWN, name="tls", ae_title="DEST", host=HOST,
                               port=int(server.server_address[1]),
                               tls=tls, timeout_s=5)
        async with StoreClient(dest, DUO_AE) as client:
            results = [await store(client, i) for i in insts]
            results.append(await client.store(big, sop_class_uid=str(header.SOPClassUID),
                                              sop_instance_uid=str(header.SOPInstanceUID),
                                              transfer_syntax_uid=str(header.file_meta.TransferSyntaxUID)))
        assert {r.outcome for r in results} == {"stored"}, [r.detail for r in results]
        assert received == [i.sop_instance_uid for i in insts] + [str(header.SOPInstanceUID)]
        # without a client certificate the destination refuses us: unavailable, not a crash
        no_cert = dest.model_copy(update={"tls": ClientTls(ca_file=pki.ca_cert)})
        async with StoreClient(no_cert, DUO_AE) as client:
            with pytest.raises(StoreUnavailable):
                await store(client, insts[0])
    finally:
        server.shutdown()
