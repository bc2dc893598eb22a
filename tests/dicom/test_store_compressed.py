"""Compressed instances relayed by the real StoreClient into real PACSes, each way.

A destination that accepts the instance's syntax gets the file untouched (no decode, the same pixel
data bytes); one that accepts only uncompressed data gets lossless data decompressed (the same pixels),
lossy data refused with that reason and an undecodable stream refused for that instance alone. Peers:
Orthanc accepting everything, Orthanc with ``AcceptedTransferSyntaxes`` uncompressed only, DCMTK
storescp with ``+xa`` (all it knows) and with its default (uncompressed only). One running peer of each
kind for the module; the instances are made once (tests/support/compressed.py).
"""

from __future__ import annotations

import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.dicom.status import SOP_CLASS_NOT_SUPPORTED, UNABLE_TO_PROCESS
from duo_gateway.dicom.store_scu import StoreClient, StoreResult
from tests.support.compressed import Made, ct_512, encode, native, pixel_element, truncated
from tests.support.orthanc import Orthanc, run_orthanc
from tests.support.storescp import StoreScp, run_storescp

DUO_AE = "DUO_TEST"
OWN = ["00010001"]
LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1]
UNCOMPRESSED = [ImplicitVRLittleEndian, ExplicitVRLittleEndian]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    out = tmp_path_factory.mktemp("relay")
    study, series = generate_uid(), generate_uid()
    files = {syntax: encode(native("CT_small.dcm", study_uid=study, series_uid=series), syntax,
                            out / f"ct-{syntax}.dcm") for syntax in LOSSLESS}
    rgb = native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series)
    rgb.PhotometricInterpretation = "YBR_RCT"  # JPEG 2000 with the reversible colour transform
    files["rgb"] = encode(rgb, JPEG2000Lossless, out / "rgb.dcm")
    files["lossy"] = encode(native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series),
                            JPEGBaseline8Bit, out / "lossy.dcm")
    files["corrupt"] = truncated(files[JPEG2000Lossless], out / "corrupt.dcm", keep=4000)
    files["sibling"] = encode(native("CT_small.dcm", study_uid=study, series_uid=series), JPEG2000Lossless,
                              out / "sibling.dcm")
    return files


@pytest.fixture(scope="module")
def orthanc_all(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("orthanc-all")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def orthanc_plain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    options: dict[str, object] = {"AcceptedTransferSyntaxes": [str(ts) for ts in UNCOMPRESSED]}
    with run_orthanc(tmp_path_factory.mktemp("orthanc-plain"), options=options) as orthanc:
        yield orthanc


def _to(host: str, port: int, ae_title: str) -> DestinationPacs:
    return DestinationPacs(uras=OWN, name="dest", ae_title=ae_title, host=host, port=port, timeout_s=10)


async def _relay(dest: DestinationPacs, files: list[Made]) -> tuple[list[StoreResult], int]:
    async with StoreClient(dest, DUO_AE) as client:
        results = [await client.store(m.path, sop_class_uid=m.sop_class_uid,
                                      sop_instance_uid=m.sop_instance_uid,
                                      transfer_syntax_uid=m.transfer_syntax_uid) for m in files]
        return results, client.decompressed


def _orthanc_files(orthanc: Orthanc, into: Path) -> dict[str, tuple[str, Path]]:
    """SOP Instance UID -> (transfer syntax Orthanc stored, the file downloaded from it)."""
    into.mkdir()
    held: dict[str, tuple[str, Path]] = {}
    listed = orthanc.rest("/instances?expand")
    assert isinstance(listed, list)
    for item in listed:
        uid = str(item["MainDicomTags"]["SOPInstanceUID"])
        meta = orthanc.rest(f"/instances/{item['ID']}/metadata?expand")
        assert isinstance(meta, dict)
        path = into / f"{uid}.dcm"
        url = f"http://{orthanc.host}:{orthanc.http_port}/instances/{item['ID']}/file"
        with urllib.request.urlopen(url, timeout=10) as r:
            path.write_bytes(r.read())
        held[uid] = (str(meta["TransferSyntax"]), path)
    return held


def _scp_files(scp: StoreScp) -> dict[str, Path]:
    got = {}
    for path in scp.directory.iterdir():
        if path.is_file() and not path.name.startswith("."):
            got[str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)] = path
    return got


def _assert_decompressed(path: Path, source: Made) -> None:
    out = dcmread(path)
    assert out.file_meta.TransferSyntaxUID in UNCOMPRESSED, out.file_meta.TransferSyntaxUID
    assert np.array_equal(pixel_array(path, raw=True), source.pixels)
    if out.SamplesPerPixel == 3:
        assert out.PhotometricInterpretation == "RGB" and out.PlanarConfiguration == 0


# -- Orthanc ---------------------------------------------------------------------------------------


async def test_accepted_compressed_syntaxes_go_untouched_into_orthanc(made: dict[str, Made],
                                                                       orthanc_all: Orthanc,
                                                                       tmp_path: Path) -> None:
    files = [*(made[s] for s in LOSSLESS), made["rgb"], made["lossy"]]
    results, decompressed = await _relay(_to(orthanc_all.host, orthanc_all.dicom_port, orthanc_all.ae_title),
                                         files)
    assert [r.detail for r in results] == ["stored"] * len(files)  # nothing converted
    assert decompressed == 0  # and nothing decoded: the file is streamed as it is
    held = _orthanc_files(orthanc_all, tmp_path / "held")
    assert sorted(held) == sorted(m.sop_instance_uid for m in files)
    for m in files:
        syntax, path = held[m.sop_instance_uid]
        assert syntax == m.transfer_syntax_uid, m.name
        assert pixel_element(path) == pixel_element(m.path), m.name  # pixel data bytes unchanged


async def test_uncompressed_only_orthanc_gets_lossless_decompressed_lossy_refused(
        made: dict[str, Made], orthanc_plain: Orthanc, tmp_path: Path) -> None:
    lossless = [*(made[s] for s in LOSSLESS), made["rgb"]]
    files = [*lossless, made["lossy"], made["corrupt"], made["sibling"]]
    results, decompressed = await _relay(
        _to(orthanc_plain.host, orthanc_plain.dicom_port, orthanc_plain.ae_title), files)
    outcomes = {m.sop_instance_uid: r for m, r in zip(files, results, strict=True)}
    for m in [*lossless, made["sibling"]]:
        result = outcomes[m.sop_instance_uid]
        assert result.outcome == "stored" and f"converted from {m.name}" in result.detail, result.detail
    assert decompressed == len(lossless) + 1

    lossy = outcomes[made["lossy"].sop_instance_uid]
    assert (lossy.outcome, lossy.status, lossy.local) == ("refused", SOP_CLASS_NOT_SUPPORTED, True)
    assert "JPEG Baseline" in lossy.detail and "lossy" in lossy.detail, lossy.detail
    corrupt = outcomes[made["corrupt"].sop_instance_uid]
    assert (corrupt.outcome, corrupt.status, corrupt.local) == ("refused", UNABLE_TO_PROCESS, True)
    assert "could not decompress" in corrupt.detail and "frame 1" in corrupt.detail, corrupt.detail

    held = _orthanc_files(orthanc_plain, tmp_path / "held")
    assert sorted(held) == sorted(m.sop_instance_uid for m in [*lossless, made["sibling"]])
    for m in [*lossless, made["sibling"]]:
        syntax, path = held[m.sop_instance_uid]
        assert syntax == ExplicitVRLittleEndian, m.name  # the first uncompressed syntax accepted
        _assert_decompressed(path, m)


# -- DCMTK storescp ----------------------------------------------------------------------------------


async def test_storescp_accepting_all_and_uncompressed_only(made: dict[str, Made], tmp_path: Path) -> None:
    """``+xa`` accepts every syntax storescp 3.6.7 knows, which leaves out JPEG Lossless process 14 with
    its own predictor (.57): that one arrives decompressed, every other one as it was sent."""
    lossless = [*(made[s] for s in LOSSLESS), made["rgb"]]
    everything = [*lossless, made["lossy"]]
    with run_storescp(tmp_path / "all", ae_title="ALL", options=["+xa"]) as scp:
        results, decompressed = await _relay(_to(scp.host, scp.port, scp.ae_title), everything)
        received = _scp_files(scp)
    assert sorted(received) == sorted(m.sop_instance_uid for m in everything)
    for m, result in zip(everything, results, strict=True):
        path = received[m.sop_instance_uid]
        if m.transfer_syntax_uid == JPEGLossless:
            assert "converted from" in result.detail
            _assert_decompressed(path, m)
            continue
        assert result.detail == "stored", m.name
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == m.transfer_syntax_uid
        assert pixel_element(path) == pixel_element(m.path), m.name
    assert decompressed == 1

    with run_storescp(tmp_path / "plain", ae_title="PLAIN") as scp:
        results, decompressed = await _relay(_to(scp.host, scp.port, scp.ae_title), everything)
        received = _scp_files(scp)
    assert [r.outcome for r in results] == ["stored"] * len(lossless) + ["refused"]
    assert "lossy" in results[-1].detail and decompressed == len(lossless)
    assert sorted(received) == sorted(m.sop_instance_uid for m in lossless)
    for m in lossless:
        _assert_decompressed(received[m.sop_instance_uid], m)


# -- a decompression that outlasts the destination's idle timeout ------------------------------------


async def test_converted_copy_goes_out_on_a_new_association_after_an_idle_timeout(tmp_path: Path) -> None:
    """The destination drops an association idle for 0.2 s; starting the decoder helper and decoding 4
    frames of 512x512 JPEG 2000 take longer, so the copy must go out on a new association rather than
    fail the instance (or be decoded again on a retry)."""
    big = ct_512(tmp_path / "big.dcm", 4, study_uid=generate_uid(), series_uid=generate_uid())
    received: list[tuple[str, str, bytes]] = []

    def on_store(event: Any) -> int:
        received.append((str(event.request.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
                         event.dataset.PixelData))
        return 0

    ae = AE(ae_title="IDLE")
    ae.network_timeout = 0.2
    ae.add_supported_context(CTImageStorage, [ExplicitVRLittleEndian])
    server = ae.start_server(("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        async with StoreClient(_to("127.0.0.1", int(server.server_address[1]), "IDLE"), DUO_AE) as client:
            result = await client.store(big.path, sop_class_uid=big.sop_class_uid,
                                        sop_instance_uid=big.sop_instance_uid,
                                        transfer_syntax_uid=big.transfer_syntax_uid)
            associations = client.associations
    finally:
        server.shutdown()
    assert result.outcome == "stored", result.detail
    assert associations == 2
    assert [(uid, ts) for uid, ts, _ in received] == [(big.sop_instance_uid, ExplicitVRLittleEndian)]
    assert np.array_equal(np.frombuffer(received[0][2], "<i2").reshape(4, 512, 512), big.pixels)
