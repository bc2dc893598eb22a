"""DICOMweb frames and rendered images (dicomweb/render.py) on datasets made here with pydicom and numpy.

Rendered images are decoded again with Pillow and compared with the expected pixels computed in numpy from
the standard's formulas (PS3.3 C.11.2.1.2 and C.11.2.1.3): exactly for PNG, within a tolerance for JPEG.
Compressed instances come from pydicom's real encoders (pylibjpeg-openjpeg, pyjpegls).
"""

from __future__ import annotations

import copy
from io import BytesIO
from typing import Any

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate, encapsulate_extended, generate_frames
from pydicom.pixels import convert_color_space, pixel_array
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    SecondaryCaptureImageStorage,
    generate_uid,
)

from duo_gateway.dicomweb.render import RenderError, frame_bytes, frame_count, render, thumbnail

Array = np.ndarray[Any, Any]
_PLUGINS = {JPEG2000Lossless: "pylibjpeg", JPEGLSLossless: "pyjpegls"}


def _dataset(data: bytes, rows: int, columns: int, *, frames: int | None = None, samples: int = 1,
             bits_allocated: int = 8, bits_stored: int | None = None, signed: bool = False,
             photometric: str = "MONOCHROME2", planar: int | None = None,
             syntax: UID = ExplicitVRLittleEndian, **elements: Any) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = syntax
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.Rows, ds.Columns = rows, columns
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    if samples > 1:
        ds.PlanarConfiguration = planar or 0
    ds.BitsAllocated = bits_allocated
    ds.BitsStored = bits_stored or bits_allocated
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = int(signed)
    if frames is not None:
        ds.NumberOfFrames = frames
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    ds.PixelData = data
    ds["PixelData"].VR = "OB" if bits_allocated <= 8 else "OW"
    return ds


def _compressed(ds: Dataset, syntax: UID, *, encapsulate_ext: bool = False) -> Dataset:
    out = copy.deepcopy(ds)
    out.compress(syntax, encoding_plugin=_PLUGINS[syntax], generate_instance_uid=False,
                 encapsulate_ext=encapsulate_ext)
    return out


def _image(data: bytes, media: str = "PNG") -> Array:
    with Image.open(BytesIO(data)) as image:
        assert image.format == media
        return np.asarray(image)


def _linear(x: Array, center: float, width: float) -> Array:
    """PS3.3 C.11.2.1.2.1, transcribed as written, onto 0..255."""
    low, high = center - 0.5 - (width - 1) / 2, center - 0.5 + (width - 1) / 2
    ramp = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    return np.rint(np.select([x <= low, x > high], [0.0, 255.0], ramp)).astype(np.uint8)


def _ct(rows: int = 24, columns: int = 32, frames: int = 1, seed: int = 1) -> Array:
    """Signed 16-bit stored values spanning air to bone once rescaled (slope 0.5, intercept -1024)."""
    rng = np.random.default_rng(seed)
    return rng.integers(-200, 6000, (frames, rows, columns)).astype(np.int16)


def _ct_dataset(stored: Array, **elements: Any) -> Dataset:
    frames, rows, columns = stored.shape
    return _dataset(stored.astype("<i2").tobytes(), rows, columns, frames=frames if frames > 1 else None,
                    bits_allocated=16, signed=True, RescaleSlope=0.5, RescaleIntercept=-1024, **elements)


def _smooth(rows: int, columns: int) -> Array:
    y, x = np.mgrid[0:rows, 0:columns]
    return (x * 255 // (columns - 1) + y * 0).astype(np.uint8)


# --- frame_count / frame_bytes, native ------------------------------------------------------------------


def test_frame_count_is_one_without_number_of_frames() -> None:
    ds = _dataset(bytes(4), 2, 2)
    assert frame_count(ds) == 1
    ds.NumberOfFrames = 3
    assert frame_count(ds) == 3


@pytest.mark.parametrize("bits", [8, 16, 32])
def test_native_frames_reassemble_the_pixel_data(bits: int) -> None:
    rng = np.random.default_rng(bits)
    pixels = rng.integers(0, 2 ** min(bits, 31), (4, 5, 7), dtype=np.int64).astype(f"<u{bits // 8}")
    data = pixels.tobytes()
    ds = _dataset(data + (b"\x00" if len(data) % 2 else b""), 5, 7, frames=4, bits_allocated=bits)
    frames = [frame_bytes(ds, n) for n in range(1, 5)]
    assert b"".join(frames) == data
    assert frames[2] == pixels[2].tobytes()


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_frames_keep_their_planar_layout(planar: int) -> None:
    rng = np.random.default_rng(planar)
    rgb = rng.integers(0, 256, (3, 6, 5, 3), dtype=np.uint8)
    stored = rgb.transpose(0, 3, 1, 2) if planar else rgb  # planar 1: each frame holds its R, G, B planes
    ds = _dataset(stored.tobytes(), 6, 5, frames=3, samples=3, photometric="RGB", planar=planar)
    assert frame_bytes(ds, 2) == stored[1].tobytes()
    assert b"".join(frame_bytes(ds, n) for n in (1, 2, 3)) == stored.tobytes()


def test_one_bit_frames_on_byte_boundaries_are_slices() -> None:
    rng = np.random.default_rng(7)
    bits = rng.integers(0, 2, (3, 4, 8), dtype=np.uint8)
    data = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds = _dataset(data, 4, 8, frames=3, bits_allocated=1)
    assert b"".join(frame_bytes(ds, n) for n in (1, 2, 3)) == data


def test_one_bit_frames_off_byte_boundaries_are_repacked() -> None:
    """5x3 = 15 pixels a frame: frame 2 starts at bit 15, and must come out starting at bit 0."""
    rng = np.random.default_rng(8)
    bits = rng.integers(0, 2, (3, 5, 3), dtype=np.uint8)
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds = _dataset(packed + b"\x00" * (len(packed) % 2), 5, 3, frames=3, bits_allocated=1)
    for n in (1, 2, 3):
        frame = frame_bytes(ds, n)
        assert len(frame) == 2
        unpacked = np.unpackbits(np.frombuffer(frame, np.uint8), bitorder="little")
        assert np.array_equal(unpacked[:15], bits[n - 1].ravel())
        assert not unpacked[15:].any()  # padding bits are zero


def test_big_endian_native_frames_come_out_little_endian() -> None:
    pixels = np.arange(2 * 3 * 4, dtype=np.uint16).reshape(2, 3, 4) * 257 + 1
    ds = _dataset(pixels.astype(">u2").tobytes(), 3, 4, frames=2, bits_allocated=16,
                  syntax=ExplicitVRBigEndian)
    assert frame_bytes(ds, 2) == pixels[1].astype("<u2").tobytes()


def test_ybr_full_422_frames_are_subsampled_size() -> None:
    data = bytes(range(2 * 4 * 4 * 2))  # 2 frames of 4x4, 2 bytes per pixel
    ds = _dataset(data, 4, 4, frames=2, samples=3, photometric="YBR_FULL_422")
    assert frame_bytes(ds, 2) == data[32:]


def test_frame_numbers_outside_the_instance_are_not_found() -> None:
    ds = _dataset(bytes(12), 2, 2, frames=3)
    for n in (0, 4, -1):
        with pytest.raises(RenderError) as caught:
            frame_bytes(ds, n)
        assert caught.value.reason == "frame"


def test_truncated_native_pixel_data_is_refused() -> None:
    ds = _dataset(bytes(10), 2, 2, frames=3)
    with pytest.raises(RenderError) as caught:
        frame_bytes(ds, 1)
    assert caught.value.reason == "unrenderable"


def test_no_pixel_data_is_no_frame() -> None:
    ds = _dataset(bytes(4), 2, 2)
    del ds.PixelData
    for call in (lambda: frame_bytes(ds, 1), lambda: render(ds)):
        with pytest.raises(RenderError) as caught:
            call()
        assert caught.value.reason == "frame"


# --- frame_bytes, encapsulated ----------------------------------------------------------------------------


def _decoded_frame(template: Dataset, frame: bytes) -> Array:
    """``frame`` decoded on its own, as a viewer would: one-frame pixel data with the image's attributes."""
    single = copy.deepcopy(template)
    single.PixelData = encapsulate([frame])
    if "NumberOfFrames" in single:
        del single.NumberOfFrames
    for keyword in ("ExtendedOffsetTable", "ExtendedOffsetTableLengths"):
        if keyword in single:
            delattr(single, keyword)
    return pixel_array(single)


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name)
def test_encapsulated_frames_by_basic_offset_table_fragments_and_extended_table(syntax: UID) -> None:
    stored = _ct(32, 40, frames=3)
    native = _ct_dataset(stored)
    with_bot = _compressed(native, syntax)
    assert with_bot.PixelData[4:8] != b"\x00\x00\x00\x00"  # pydicom writes a Basic Offset Table
    codestreams = list(generate_frames(with_bot.PixelData, number_of_frames=3))
    without_bot = copy.deepcopy(with_bot)
    without_bot.PixelData = encapsulate(codestreams, has_bot=False)
    extended = _compressed(native, syntax, encapsulate_ext=True)
    assert "ExtendedOffsetTable" in extended

    for n in (1, 2, 3):
        frames = {frame_bytes(ds, n) for ds in (with_bot, without_bot, extended)}
        assert len(frames) == 1
        frame = frames.pop()
        assert np.array_equal(_decoded_frame(with_bot, frame), stored[n - 1])


def test_several_fragments_per_frame_need_an_offset_table() -> None:
    stored = _ct(32, 40, frames=2)
    compressed = _compressed(_ct_dataset(stored), JPEG2000Lossless)
    codestreams = list(generate_frames(compressed.PixelData, number_of_frames=2))

    compressed.PixelData = encapsulate(codestreams, fragments_per_frame=2, has_bot=True)
    assert [frame_bytes(compressed, n) for n in (1, 2)] == codestreams

    compressed.PixelData = encapsulate(codestreams, fragments_per_frame=2, has_bot=False)
    with pytest.raises(RenderError, match="ambiguous"):
        frame_bytes(compressed, 1)


def test_one_frame_in_several_fragments_is_all_of_them() -> None:
    stored = _ct(32, 40)
    compressed = _compressed(_ct_dataset(stored), JPEG2000Lossless)
    codestream = next(generate_frames(compressed.PixelData, number_of_frames=1))
    compressed.PixelData = encapsulate([codestream], fragments_per_frame=3, has_bot=False)
    assert frame_bytes(compressed, 1) == codestream


def test_extended_offset_table_listing_other_frames_is_refused() -> None:
    compressed = _compressed(_ct_dataset(_ct(32, 32, frames=3)), JPEG2000Lossless)
    codestreams = list(generate_frames(compressed.PixelData, number_of_frames=3))
    compressed.PixelData, compressed.ExtendedOffsetTable, compressed.ExtendedOffsetTableLengths = (
        encapsulate_extended(codestreams[:2]))
    with pytest.raises(RenderError, match="Extended Offset Table"):
        frame_bytes(compressed, 1)


def test_malformed_encapsulation_is_refused() -> None:
    compressed = _compressed(_ct_dataset(_ct(32, 32)), JPEG2000Lossless)
    compressed.PixelData = b"\x10\x00\x10\x00" + compressed.PixelData[4:]  # not an item tag
    with pytest.raises(RenderError, match="malformed"):
        frame_bytes(compressed, 1)


# --- render: grayscale -------------------------------------------------------------------------------------


def test_ct_png_applies_rescale_and_the_dataset_window() -> None:
    stored = _ct()
    ds = _ct_dataset(stored, WindowCenter=[40, 400], WindowWidth=[400, 2000])  # the first pair counts
    image = _image(render(ds, media_type="image/png"))
    hu = stored[0] * 0.5 - 1024
    expected = _linear(hu, 40, 400)
    assert image.shape == (24, 32) and image.dtype == np.uint8
    assert np.array_equal(image, expected)
    # The anchors, independent of the formula: below the window black, above it white.
    assert (image[hu <= 40 - 200] == 0).all() and (image[hu > 40 + 199] == 255).all()
    inside = (hu > -150) & (hu < 230)
    assert inside.any() and ((image[inside] > 0) & (image[inside] < 255)).all()


def test_a_requested_window_replaces_the_dataset_window() -> None:
    stored = _ct(seed=2)
    ds = _ct_dataset(stored, WindowCenter=40, WindowWidth=400)
    image = _image(render(ds, media_type="image/png", window=(-600.0, 1500.0)))
    assert np.array_equal(image, _linear(stored[0] * 0.5 - 1024, -600, 1500))


def test_without_a_window_the_frame_is_stretched_from_its_minimum_to_its_maximum() -> None:
    stored = (np.arange(16 * 16).reshape(1, 16, 16) + 100).astype(np.int16)
    ds = _ct_dataset(stored)
    image = _image(render(ds, media_type="image/png"))
    hu = stored[0] * 0.5 - 1024
    expected = np.rint((hu - hu.min()) * 255 / (hu.max() - hu.min())).astype(np.uint8)
    assert np.array_equal(image, expected)
    assert image.min() == 0 and image.max() == 255


def test_monochrome1_is_inverted() -> None:
    rng = np.random.default_rng(3)
    pixels = rng.integers(0, 4096, (20, 30)).astype(np.uint16)
    ds = _dataset(pixels.astype("<u2").tobytes(), 20, 30, bits_allocated=16, bits_stored=12,
                  photometric="MONOCHROME1", WindowCenter=2048, WindowWidth=4096)
    image = _image(render(ds, media_type="image/png"))
    assert np.array_equal(image, 255 - _linear(pixels.astype(np.float64), 2048, 4096))
    assert image[pixels == pixels.min()].min() > 250  # the lowest value is the whitest


def test_sigmoid_voi_lut_function() -> None:
    stored = _ct(seed=4)
    ds = _ct_dataset(stored, WindowCenter=300, WindowWidth=800, VOILUTFunction="SIGMOID")
    image = _image(render(ds, media_type="image/png"))
    hu = stored[0] * 0.5 - 1024
    expected = np.rint(255 / (1 + np.exp(-4 * (hu - 300) / 800))).astype(np.uint8)
    assert np.array_equal(image, expected)


def test_linear_exact_voi_lut_function() -> None:
    stored = _ct(seed=5)
    ds = _ct_dataset(stored, WindowCenter=100, WindowWidth=700, VOILUTFunction="LINEAR_EXACT")
    image = _image(render(ds, media_type="image/png"))
    hu = stored[0] * 0.5 - 1024
    ramp = ((hu - 100) / 700 + 0.5) * 255
    expected = np.rint(np.select([hu <= 100 - 350, hu > 100 + 350], [0.0, 255.0], ramp)).astype(np.uint8)
    assert np.array_equal(image, expected)


def test_jpeg_is_close_to_the_expected_pixels() -> None:
    rows, columns = 48, 64
    y, x = np.mgrid[0:rows, 0:columns]
    hu = (x * 30 - 900 + y * 5).astype(np.float64)  # a smooth ramp: JPEG keeps it closely
    stored = ((hu + 1024) / 0.5).astype(np.int16)[None]
    ds = _ct_dataset(stored, WindowCenter=0, WindowWidth=1600)
    image = _image(render(ds, media_type="image/jpeg", quality=95), "JPEG")
    expected = _linear(stored[0] * 0.5 - 1024, 0, 1600).astype(np.int16)
    difference = np.abs(image.astype(np.int16) - expected)
    assert image.shape == (rows, columns)
    assert difference.mean() < 1.5 and difference.max() <= 12


def test_jpeg_quality_changes_the_encoding() -> None:
    ds = _ct_dataset(_ct(64, 64, seed=6), WindowCenter=500, WindowWidth=2000)
    assert len(render(ds, quality=20)) < len(render(ds, quality=95))


def test_one_bit_frame_renders_black_and_white() -> None:
    rng = np.random.default_rng(9)
    bits = rng.integers(0, 2, (3, 5, 3), dtype=np.uint8)
    packed = np.packbits(bits.ravel(), bitorder="little").tobytes()
    ds = _dataset(packed + b"\x00" * (len(packed) % 2), 5, 3, frames=3, bits_allocated=1)
    assert np.array_equal(_image(render(ds, 2, "image/png")), bits[1] * 255)


def test_each_frame_of_a_multiframe_image_renders_itself() -> None:
    stored = _ct(frames=3, seed=10)
    ds = _ct_dataset(stored, WindowCenter=200, WindowWidth=1000)
    for n in (1, 2, 3):
        image = _image(render(ds, n, "image/png"))
        assert np.array_equal(image, _linear(stored[n - 1] * 0.5 - 1024, 200, 1000))


def test_enhanced_functional_groups_rescale_and_window_per_frame() -> None:
    """Each frame's own rescale and the shared window win over the top-level window."""
    stored = _ct(frames=2, seed=11)
    ds = _ct_dataset(stored, WindowCenter=9999, WindowWidth=2)  # top level, to be overridden
    frames = []
    for slope, intercept in ((1.0, -1024.0), (0.25, -100.0)):
        transformation = Dataset()
        transformation.RescaleSlope, transformation.RescaleIntercept = slope, intercept
        item = Dataset()
        item.PixelValueTransformationSequence = [transformation]
        frames.append(item)
    ds.PerFrameFunctionalGroupsSequence = frames
    voi = Dataset()
    voi.WindowCenter, voi.WindowWidth = 500, 3000
    shared = Dataset()
    shared.FrameVOILUTSequence = [voi]
    ds.SharedFunctionalGroupsSequence = [shared]

    assert np.array_equal(_image(render(ds, 1, "image/png")), _linear(stored[0] * 1.0 - 1024, 500, 3000))
    assert np.array_equal(_image(render(ds, 2, "image/png")), _linear(stored[1] * 0.25 - 100, 500, 3000))


@pytest.mark.parametrize("syntax", [JPEG2000Lossless, JPEGLSLossless], ids=lambda s: s.name)
def test_compressed_multiframe_renders_the_frame_asked_for(syntax: UID) -> None:
    stored = _ct(32, 40, frames=3, seed=12)
    ds = _compressed(_ct_dataset(stored, WindowCenter=400, WindowWidth=1800), syntax)
    for n in (1, 3):
        image = _image(render(ds, n, "image/png"))
        assert np.array_equal(image, _linear(stored[n - 1] * 0.5 - 1024, 400, 1800))


# --- render: colour ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("planar", [0, 1])
def test_rgb_renders_as_stored(planar: int) -> None:
    rng = np.random.default_rng(20 + planar)
    rgb = rng.integers(0, 256, (2, 10, 12, 3), dtype=np.uint8)
    stored = rgb.transpose(0, 3, 1, 2) if planar else rgb
    ds = _dataset(stored.tobytes(), 10, 12, frames=2, samples=3, photometric="RGB", planar=planar)
    image = _image(render(ds, 2, "image/png"))
    assert image.shape == (10, 12, 3)
    assert np.array_equal(image, rgb[1])


def test_rgb_jpeg_is_close() -> None:
    y, x = np.mgrid[0:32, 0:48]
    rgb = np.stack([x * 5, y * 7, np.full_like(x, 90)], axis=-1).astype(np.uint8)
    ds = _dataset(rgb.tobytes(), 32, 48, samples=3, photometric="RGB")
    image = _image(render(ds, quality=95), "JPEG")
    assert np.abs(image.astype(np.int16) - rgb).mean() < 2.5


def test_sixteen_bit_rgb_keeps_its_top_eight_bits() -> None:
    rng = np.random.default_rng(22)
    rgb = rng.integers(0, 4096, (6, 7, 3)).astype(np.uint16)
    ds = _dataset(rgb.astype("<u2").tobytes(), 6, 7, samples=3, photometric="RGB", bits_allocated=16,
                  bits_stored=12)
    assert np.array_equal(_image(render(ds, media_type="image/png")), (rgb >> 4).astype(np.uint8))


def test_ybr_full_renders_as_rgb() -> None:
    rng = np.random.default_rng(23)
    rgb = rng.integers(0, 256, (8, 10, 3), dtype=np.uint8)
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    ds = _dataset(ybr.tobytes(), 8, 10, samples=3, photometric="YBR_FULL")
    image = _image(render(ds, media_type="image/png"))
    assert np.abs(image.astype(np.int16) - rgb).max() <= 3  # two 8-bit colour conversions


def test_ybr_full_422_renders_as_rgb() -> None:
    """Chroma is shared by each pair of pixels: blocks two pixels wide survive the subsampling intact."""
    rng = np.random.default_rng(24)
    pairs = rng.integers(0, 256, (6, 4, 3), dtype=np.uint8)
    rgb = np.repeat(pairs, 2, axis=1)  # 6 x 8
    ybr = convert_color_space(rgb, "RGB", "YBR_FULL")
    # Y1 Y2 Cb Cr per pair of pixels (PS3.3 C.7.6.3.1.2)
    packed = np.concatenate([ybr[:, 0::2, :1], ybr[:, 1::2, :1], ybr[:, 0::2, 1:]], axis=-1)
    ds = _dataset(packed.tobytes(), 6, 8, samples=3, photometric="YBR_FULL_422")
    image = _image(render(ds, media_type="image/png"))
    assert image.shape == (6, 8, 3)
    assert np.abs(image.astype(np.int16) - rgb).max() <= 3


def test_palette_colour_uses_the_lookup_tables() -> None:
    rng = np.random.default_rng(25)
    indices = rng.integers(0, 256, (9, 11), dtype=np.uint8)
    luts = [rng.integers(0, 65536, 256).astype(np.uint16) for _ in range(3)]
    elements: dict[str, Any] = {}
    for colour, lut in zip(("Red", "Green", "Blue"), luts, strict=True):
        elements[f"{colour}PaletteColorLookupTableDescriptor"] = [256, 0, 16]
        elements[f"{colour}PaletteColorLookupTableData"] = lut.astype("<u2").tobytes()
    ds = _dataset(indices.tobytes(), 9, 11, photometric="PALETTE COLOR", **elements)
    image = _image(render(ds, media_type="image/png"))
    expected = np.stack([(lut[indices] >> 8).astype(np.uint8) for lut in luts], axis=-1)
    assert np.array_equal(image, expected)


# --- viewport and thumbnail ------------------------------------------------------------------------------


def _identity(pixels: Array, frames: int | None = None) -> Dataset:
    """8-bit grayscale whose window maps every value onto itself (LINEAR, centre 128, width 256)."""
    rows, columns = pixels.shape[-2:]
    return _dataset(pixels.astype(np.uint8).tobytes(), rows, columns, frames=frames,
                    WindowCenter=128, WindowWidth=256)


def test_identity_window_is_the_identity() -> None:
    pixels = np.arange(256, dtype=np.uint8).reshape(16, 16)
    assert np.array_equal(_image(render(_identity(pixels), media_type="image/png")), pixels)


@pytest.mark.parametrize(("viewport", "size"), [
    ((32, 32), (32, 16)),   # wider than high: the width limits
    ((100, 10), (20, 10)),  # the height limits
    ((200, 150), (200, 100)),  # scaled up to fit, never beyond
    ((64, 32), (64, 32)),   # exactly the image
])
def test_viewport_keeps_the_aspect_ratio(viewport: tuple[int, int], size: tuple[int, int]) -> None:
    pixels = np.zeros((32, 64), np.uint8)
    pixels[:, 32:] = 200
    image = _image(render(_identity(pixels), media_type="image/png", viewport=viewport))
    assert (image.shape[1], image.shape[0]) == size
    quarter = size[0] // 4  # resampling rings near the edge between the halves: look away from it
    assert (image[:, :quarter] == 0).all() and (image[:, -quarter:] == 200).all()


def test_thumbnail_is_the_middle_frame_in_a_square() -> None:
    frames = np.zeros((3, 40, 80), np.uint8)
    for n, (left, right) in enumerate(((10, 20), (50, 200), (90, 240))):
        frames[n, :, :40], frames[n, :, 40:] = left, right
    ds = _identity(frames, frames=3)
    image = _image(thumbnail(ds, "image/png", size=64))
    assert image.shape == (32, 64)
    assert (image[:, :28] == 50).all() and (image[:, 36:] == 200).all()
    jpeg = _image(thumbnail(ds), "JPEG")
    assert jpeg.shape == (64, 128)
    assert abs(float(jpeg[:, :50].mean()) - 50) < 3 and abs(float(jpeg[:, 78:].mean()) - 200) < 3


def test_thumbnail_of_a_single_frame() -> None:
    pixels = np.full((10, 10), 77, np.uint8)
    assert (_image(thumbnail(_identity(pixels), "image/png", size=5)) == 77).all()


# --- refusals ----------------------------------------------------------------------------------------------


def test_media_types_other_than_jpeg_and_png_are_not_acceptable() -> None:
    ds = _identity(np.zeros((4, 4), np.uint8))
    for media_type in ("image/gif", "application/dicom", "image/jp2", ""):
        with pytest.raises(RenderError) as caught:
            render(ds, media_type=media_type)
        assert caught.value.reason == "unrenderable"
    assert _image(render(ds, media_type="IMAGE/PNG")).shape == (4, 4)


@pytest.mark.parametrize("kwargs", [
    {"quality": 0}, {"quality": 101}, {"viewport": (0, 10)}, {"viewport": (10, -1)},
    {"window": (40.0, 0.5)}, {"window": (float("nan"), 400.0)},
])
def test_bad_parameters_are_bad_requests(kwargs: dict[str, Any]) -> None:
    with pytest.raises(RenderError) as caught:
        render(_identity(np.zeros((4, 4), np.uint8)), **kwargs)
    assert caught.value.reason == "parameter"


def test_thumbnail_size_must_be_positive() -> None:
    with pytest.raises(RenderError) as caught:
        thumbnail(_identity(np.zeros((4, 4), np.uint8)), size=0)
    assert caught.value.reason == "parameter"


def test_rendering_a_frame_that_does_not_exist() -> None:
    ds = _identity(np.zeros((2, 4, 4), np.uint8), frames=2)
    for n in (0, 3):
        with pytest.raises(RenderError) as caught:
            render(ds, n)
        assert caught.value.reason == "frame"


def test_undecodable_pixel_data_is_unrenderable() -> None:
    compressed = _compressed(_ct_dataset(_ct(32, 32)), JPEG2000Lossless)
    codestream = next(generate_frames(compressed.PixelData, number_of_frames=1))
    compressed.PixelData = encapsulate([codestream[:40]])
    with pytest.raises(RenderError) as caught:
        render(compressed)
    assert caught.value.reason == "unrenderable"
