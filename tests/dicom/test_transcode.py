"""Lossless decompression (dicom/transcode.py) and the helper process it runs in (dicom/decode_worker.py).

Files are made in the test with real encoders (pydicom's RLE, JPEG-LS and JPEG 2000; DCMTK's dcmcjpeg
for JPEG Lossless and lossy JPEG) and decoded with the codecs DUO ships; no network.
"""

from __future__ import annotations

import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
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

from duo_gateway.dicom.decode_worker import DecodeWorker
from duo_gateway.dicom.reconcile import read_part10_header
from duo_gateway.dicom.transcode import TranscodeError, decompress_file
from tests.support.compressed import Made, ct_512, encode, native, patched, truncated

LOSSLESS = [RLELossless, JPEGLSLossless, JPEG2000Lossless, JPEGLossless, JPEGLosslessSV1]
TARGETS = [ExplicitVRLittleEndian, ImplicitVRLittleEndian]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Made]:
    """One CT (16-bit signed, with trailing padding after the pixel data) per lossless syntax, plus
    the colour, lossy and broken cases below."""
    out = tmp_path_factory.mktemp("compressed")
    study, series = generate_uid(), generate_uid()
    files: dict[str, Made] = {}
    for syntax in LOSSLESS:
        ds = native("CT_small.dcm", study_uid=study, series_uid=series)
        ds.DataSetTrailingPadding = b"\x00" * 8
        files[syntax] = encode(ds, syntax, out / f"ct-{syntax}.dcm")
    # RGB, 2 frames, JPEG 2000 with the reversible colour transform and an extended offset table;
    # a lossy history of its own that a lossless decompression must not touch
    rgb = native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series)
    rgb.PhotometricInterpretation = "YBR_RCT"
    rgb.LossyImageCompression = "01"
    rgb.LossyImageCompressionMethod = "ISO_10918_1"
    files["rgb-j2k"] = encode(rgb, JPEG2000Lossless, out / "rgb-j2k.dcm", encapsulate_ext=True)
    # YCbCr data kept as YCbCr by RLE: decompression must not turn it into RGB (not lossless)
    ybr = native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series)
    ybr.PixelData = convert_color_space(pixel_array(ybr), "RGB", "YBR_FULL").tobytes()
    ybr.PhotometricInterpretation = "YBR_FULL"
    files["ybr-rle"] = encode(ybr, RLELossless, out / "ybr-rle.dcm")
    files["lossy"] = encode(native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series),
                            JPEGBaseline8Bit, out / "lossy.dcm")
    return files


def _elements_except(path: Path, *skip: str) -> dict[int, object]:
    ds = dcmread(path)
    return {int(e.tag): e.value for e in ds if e.keyword not in skip}


@pytest.mark.parametrize("target", TARGETS, ids=["explicit", "implicit"])
@pytest.mark.parametrize("syntax", LOSSLESS, ids=[UID(s).keyword for s in LOSSLESS])
def test_decompresses_to_the_original_pixels_and_keeps_the_rest(made: dict[str, Made], tmp_path: Path,
                                                                 syntax: str, target: str) -> None:
    src = made[syntax]
    dst = tmp_path / "out.dcm"
    done = decompress_file(src.path, dst, target)
    assert (done.source_syntax, done.target_syntax, done.frames, done.photometric_interpretation) == (
        syntax, target, 1, None)
    out = dcmread(dst)
    assert out.file_meta.TransferSyntaxUID == target
    assert np.array_equal(pixel_array(dst, raw=True), src.pixels)
    assert len(out.PixelData) == 128 * 128 * 2 and out["PixelData"].VR == "OW"
    # every other element as it was, the trailing padding after the pixel data included
    assert _elements_except(dst, "PixelData") == _elements_except(src.path, "PixelData")
    if target == ExplicitVRLittleEndian:
        # ... and byte for byte: the header is not re-encoded
        with open(src.path, "rb") as a, open(dst, "rb") as b:
            ha, hb = read_part10_header(a), read_part10_header(b)
            a.seek(ha.body_offset)
            b.seek(hb.body_offset)
            assert a.read(ha.stop_offset - ha.body_offset) == b.read(hb.stop_offset - hb.body_offset)


def test_colour_j2k_becomes_rgb_interleaved_and_keeps_its_lossy_history(made: dict[str, Made],
                                                                          tmp_path: Path) -> None:
    src = made["rgb-j2k"]
    before = dcmread(src.path)
    assert before.PhotometricInterpretation == "YBR_RCT" and "ExtendedOffsetTable" in before
    done = decompress_file(src.path, tmp_path / "rgb.dcm", ExplicitVRLittleEndian)
    out = dcmread(tmp_path / "rgb.dcm")
    # the JPEG 2000 decoder undoes the colour transform itself: the pixels are RGB now
    assert done.photometric_interpretation == "RGB" and out.PhotometricInterpretation == "RGB"
    assert out.PlanarConfiguration == 0 and out.NumberOfFrames == 2 == done.frames
    assert np.array_equal(out.pixel_array, src.pixels)
    assert (out.LossyImageCompression, out.LossyImageCompressionMethod) == ("01", "ISO_10918_1")
    assert "ExtendedOffsetTable" not in out and "ExtendedOffsetTableLengths" not in out


def test_ybr_stays_ybr(made: dict[str, Made], tmp_path: Path) -> None:
    src = made["ybr-rle"]
    done = decompress_file(src.path, tmp_path / "ybr.dcm", ExplicitVRLittleEndian)
    out = dcmread(tmp_path / "ybr.dcm")
    assert done.photometric_interpretation is None and out.PhotometricInterpretation == "YBR_FULL"
    assert out.PlanarConfiguration == 0
    assert np.array_equal(pixel_array(tmp_path / "ybr.dcm", raw=True), src.pixels)


def test_encapsulated_icon_is_decompressed_too(made: dict[str, Made], tmp_path: Path) -> None:
    icon = Dataset()
    icon.SamplesPerPixel, icon.PhotometricInterpretation = 1, "MONOCHROME2"
    icon.Rows = icon.Columns = 64
    icon.BitsAllocated, icon.BitsStored, icon.HighBit, icon.PixelRepresentation = 8, 8, 7, 0
    pixels = (np.arange(64 * 64) % 251).astype(np.uint8).reshape(64, 64)
    holder = Dataset()
    holder.update(icon)
    holder.PixelData = pixels.tobytes()
    holder.file_meta = FileMetaDataset()
    holder.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    holder.compress(JPEG2000Lossless, encoding_plugin="pylibjpeg", generate_instance_uid=False)
    icon.PixelData = holder.PixelData
    icon["PixelData"].VR = "OB"
    icon["PixelData"].is_undefined_length = True
    ds = native("CT_small.dcm", study_uid=generate_uid(), series_uid=generate_uid())
    ds.IconImageSequence = Sequence([icon])
    src = encode(ds, JPEG2000Lossless, tmp_path / "icon.dcm")
    assert dcmread(src.path).IconImageSequence[0]["PixelData"].is_undefined_length
    for target in TARGETS:
        decompress_file(src.path, tmp_path / "out.dcm", target)
        out = dcmread(tmp_path / "out.dcm")
        item = out.IconImageSequence[0]
        assert not item["PixelData"].is_undefined_length
        assert np.array_equal(np.frombuffer(item.PixelData, np.uint8).reshape(64, 64), pixels)
        assert np.array_equal(out.pixel_array, src.pixels)


def test_lossy_and_corrupt_data_are_refused_with_the_reason(made: dict[str, Made], tmp_path: Path) -> None:
    with pytest.raises(TranscodeError) as lossy:
        decompress_file(made["lossy"].path, tmp_path / "lossy.dcm", ExplicitVRLittleEndian)
    assert lossy.value.reason == "lossy" and "JPEG Baseline" in lossy.value.detail
    cut = truncated(made[JPEG2000Lossless], tmp_path / "cut.dcm", keep=4000)
    with pytest.raises(TranscodeError) as broken:
        decompress_file(cut.path, tmp_path / "cut-out.dcm", ExplicitVRLittleEndian)
    assert broken.value.reason == "corrupt" and "frame 1" in broken.value.detail
    # a file that ends inside its pixel data is found before a decoder sees it
    whole = made[RLELossless].path.read_bytes()
    (tmp_path / "short.dcm").write_bytes(whole[: len(whole) - 200])
    with pytest.raises(TranscodeError) as short:
        decompress_file(tmp_path / "short.dcm", tmp_path / "short-out.dcm", ExplicitVRLittleEndian)
    assert short.value.reason == "corrupt"


def test_memory_stays_at_a_few_frames_and_cost_per_512_frame(tmp_path: Path) -> None:
    """12 frames of 512x512x16-bit JPEG 2000 (6 MiB decoded): memory is per frame, not per instance."""
    src = ct_512(tmp_path / "ct512.dcm", 12, study_uid=generate_uid(), series_uid=generate_uid())
    tracemalloc.start()
    try:
        started = time.perf_counter()
        decompress_file(src.path, tmp_path / "out.dcm", ExplicitVRLittleEndian)
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    total = 12 * 512 * 512 * 2
    print(f"\n12 x 512x512x16 J2K frames decompressed in {elapsed:.3f} s "
          f"({elapsed / 12 * 1000:.0f} ms/frame), tracemalloc peak {peak / 1e6:.2f} MB "
          f"of {total / 1e6:.2f} MB pixel data")
    assert peak < total / 2
    assert np.array_equal(pixel_array(tmp_path / "out.dcm"), src.pixels)


# -- the helper process -------------------------------------------------------------------------------


def test_worker_survives_a_hanging_and_a_crashing_decoder(made: dict[str, Made], tmp_path: Path) -> None:
    """Two streams that take a codec down, found by fuzzing the pinned versions: CharLS (pyjpegls 1.5)
    loops forever on a JPEG-LS codestream cut to a third; GDCM (python-gdcm 3.2) aborts the process on
    a JPEG Lossless codestream whose first marker after SOI is not a marker (0xFF25). Either is that
    instance's ``corrupt`` verdict, and the next instance decodes in a fresh helper."""
    good = made[JPEG2000Lossless]
    worker = DecodeWorker(stall_s=1)
    try:
        ticks: list[int] = []
        done = worker.decompress(good.path, tmp_path / "a.dcm", ExplicitVRLittleEndian,
                                 progress=lambda: ticks.append(1))
        assert done.frames == 1 and len(ticks) == 2  # helper ready, one frame
        decompress_file(good.path, tmp_path / "b.dcm", ExplicitVRLittleEndian)
        assert (tmp_path / "a.dcm").read_bytes() == (tmp_path / "b.dcm").read_bytes()

        hang = truncated(made[JPEGLSLossless], tmp_path / "hang.dcm", keep=4574)
        started = time.monotonic()
        with pytest.raises(TranscodeError) as hung:
            worker.decompress(hang.path, tmp_path / "hang-out.dcm", ExplicitVRLittleEndian)
        assert hung.value.reason == "corrupt" and "hung" in hung.value.detail, hung.value.detail
        assert time.monotonic() - started < 10

        crash = patched(made[JPEGLossless], tmp_path / "crash.dcm", {2: 0x25})
        with pytest.raises(TranscodeError) as crashed:
            worker.decompress(crash.path, tmp_path / "crash-out.dcm", ExplicitVRLittleEndian)
        assert crashed.value.reason == "corrupt" and "SIGABRT" in crashed.value.detail, crashed.value.detail

        worker.decompress(made[JPEGLossless].path, tmp_path / "c.dcm", ImplicitVRLittleEndian)
        assert np.array_equal(pixel_array(tmp_path / "c.dcm"), made[JPEGLossless].pixels)
        assert worker.started == 3  # the first, one after the hang, one after the crash
    finally:
        worker.close()
