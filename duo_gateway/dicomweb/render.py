"""Frames and rendered images for DICOMweb's view routes: PS3.18 8.7.2 frames, 8.3.5 / 9.5 rendered.

Why this module: the timeline app shows remote studies through a web viewer, which asks for ``frames/{n}``
(the pixel data of one frame, as stored) and for ``rendered`` / ``thumbnail`` images (a consumer-ready
8-bit JPEG or PNG). The HTTP routes fetch the instance; these functions turn a dataset into those bytes
and nothing else: no network, no files, no logging, no clock.

Decisions and why:

- **A frame is sliced, never decoded.** :func:`frame_bytes` hands out native pixel data byte for byte
  (only Explicit VR Big Endian is swapped, because PS3.18 bulk data of a native frame is little endian)
  and an encapsulated frame as its compressed bytes, so a viewer that decodes itself gets exactly what
  the archive holds. 1-bit data is packed without padding between frames, so a frame that does not start
  on a byte boundary is re-packed to start on one.
- **Ambiguous encapsulated layouts are refused, not guessed.** Frame boundaries come from the Extended
  Offset Table, else the Basic Offset Table, else one fragment per frame when the counts agree. A
  multi-frame image with more fragments than frames and no table could only be split by searching for
  end-of-image markers, which a codestream may contain by chance: a wrong frame shown as the right one is
  worse than an error. One frame in many fragments is unambiguous: all fragments are the frame.
- **Rendering follows the PS3.3 grayscale pipeline up to VOI** (C.11): the Modality LUT (rescale slope
  and intercept, or a Modality LUT Sequence), then a window, then the polarity (MONOCHROME1 inverted).
  Enhanced objects keep rescale and window per frame in functional groups; the frame's own values win
  over the shared ones, which win over the top-level ones, so a multi-frame enhanced CT renders each
  frame as its modality intended. Presentation states, VOI LUT Sequences and the Presentation LUT Shape
  are not applied (a follow-up if a viewer needs them).
- **The window is the caller's, else the image's, else the frame's range.** A request window replaces
  the centre and width but keeps the image's VOI LUT Function (LINEAR, LINEAR_EXACT or SIGMOID), because
  that function is how the modality meant its values to be seen. Without any window the frame is
  stretched linearly from its minimum to its maximum so that something visible comes out.
- **Colour becomes RGB through pydicom**: YBR_FULL and YBR_FULL_422 by its conversion, PALETTE COLOR by
  :func:`pydicom.pixels.apply_color_lut`; more than 8 bits per sample keep their top 8.
- **Only the frame asked for is decoded** (``Decoder.as_array(index=...)``): a thumbnail of a 500-frame
  cine costs one frame.
- **Errors say whose fault they are.** :class:`RenderError` carries a ``reason`` the route maps to a
  status: ``parameter`` (400), ``frame`` (404), ``unrenderable`` (406: not in that media type, or this
  pixel data cannot be decoded).

Everything here is CPU-bound (decoding, resampling, JPEG encoding), and the decoders are C libraries fed
other organisations' data (see :mod:`duo_gateway.dicom.decode_worker`): callers run these functions off the
event loop, in an executor or a helper process, never on it.
"""

from __future__ import annotations

import math
import struct
from io import BytesIO
from typing import Any, Final, Literal

import numpy as np
import numpy.typing as npt
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.encaps import generate_fragments, get_frame, parse_basic_offsets, parse_fragments
from pydicom.pixels.decoders.base import get_decoder
from pydicom.pixels.processing import apply_color_lut, apply_modality_lut, convert_color_space
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import UID

RenderErrorReason = Literal["parameter", "frame", "unrenderable"]

#: Media types :func:`render` produces, with Pillow's format name for each.
MEDIA_TYPES: Final[dict[str, str]] = {"image/jpeg": "JPEG", "image/png": "PNG"}

#: Bits Allocated values a native frame can be sliced for (64 is for Double Float Pixel Data only).
_NATIVE_BITS: Final = frozenset({1, 8, 16, 32})
_YBR_CONVERTIBLE: Final = frozenset({"YBR_FULL", "YBR_FULL_422"})

_UInt8Array = npt.NDArray[np.uint8]
_FloatArray = npt.NDArray[np.float64]


class RenderError(ValueError):
    """Why the frame cannot be given or rendered; ``reason`` tells the route which status to answer:
    ``parameter`` 400 (a bad window, viewport, quality or size), ``frame`` 404 (no such frame, or no pixel
    data at all), ``unrenderable`` 406 (an unsupported media type, or pixel data that cannot be decoded
    or rendered)."""

    def __init__(self, message: str, reason: RenderErrorReason = "unrenderable") -> None:
        super().__init__(message)
        self.reason: RenderErrorReason = reason


def frame_count(ds: Dataset) -> int:
    """Number of Frames, 1 when absent; an empty or zero value also counts as one frame, as pydicom reads
    it, because single-frame objects sometimes carry the element with no meaningful value."""
    value = ds.get("NumberOfFrames")
    if value is None or value == "":
        return 1
    try:
        count = int(value)
    except (TypeError, ValueError) as exc:
        raise RenderError(f"Number of Frames {value!r} is not a number") from exc
    return max(count, 1)


def frame_bytes(ds: Dataset, n: int) -> bytes:
    """The ``n``-th frame (1-based) as PS3.18 8.7.2 bulk data: native pixel data sliced to the frame
    (little endian), or the frame's compressed bytes for encapsulated pixel data."""
    _check_frame(ds, n)
    buffer = _pixel_data(ds)
    syntax = _transfer_syntax(ds)
    if syntax.is_encapsulated:
        return _encapsulated_frame(ds, buffer, n)
    return _native_frame(ds, buffer, n, little_endian=syntax.is_little_endian)


def render(ds: Dataset, frame: int = 1, media_type: str = "image/jpeg", *,
           viewport: tuple[int, int] | None = None, quality: int = 90,
           window: tuple[float, float] | None = None) -> bytes:
    """The frame as a consumer-ready 8-bit image in ``media_type`` (PS3.18 8.3.5 / 9.5).

    ``viewport`` is (columns, rows): the image is scaled, up or down, to the largest size that fits in
    it with its aspect ratio kept. ``window`` is (center, width) in modality values (after rescale).
    ``quality`` (1-100) applies to JPEG only.
    """
    image_format = _image_format(media_type)
    if not 1 <= quality <= 100:
        raise RenderError(f"quality {quality} is not between 1 and 100", "parameter")
    if viewport is not None and (viewport[0] < 1 or viewport[1] < 1):
        raise RenderError(f"viewport {viewport[0]}x{viewport[1]} is empty", "parameter")
    if window is not None and not (math.isfinite(window[0]) and math.isfinite(window[1])):
        raise RenderError("window center and width must be finite numbers", "parameter")
    _check_frame(ds, frame)
    _pixel_data(ds)

    arr, properties = _decode(ds, frame)
    photometric = str(properties.get("photometric_interpretation", ds.get("PhotometricInterpretation", "")))
    samples = int(properties.get("samples_per_pixel", 1))
    if samples == 1 and photometric == "PALETTE COLOR":
        pixels = _palette(arr, ds)
    elif samples == 1:
        pixels = _grayscale(arr, ds, frame, window, inverted=photometric == "MONOCHROME1")
    elif samples == 3:
        pixels = _colour(arr, photometric, int(properties.get("bits_stored", ds.get("BitsStored") or 8)))
    else:
        raise RenderError(f"{samples} samples per pixel cannot be rendered")

    image = Image.fromarray(np.ascontiguousarray(pixels))
    if viewport is not None:
        image = _fit(image, viewport)
    out = BytesIO()
    if image_format == "JPEG":
        image.save(out, image_format, quality=quality)
    else:
        image.save(out, image_format)
    return out.getvalue()


def thumbnail(ds: Dataset, media_type: str = "image/jpeg", *, size: int = 128) -> bytes:
    """The middle frame rendered into a ``size``×``size`` viewport: the middle of a cine or a volume says
    more about it than its first frame, which is often a blank or a scout."""
    if size < 1:
        raise RenderError(f"thumbnail size {size} is empty", "parameter")
    return render(ds, (frame_count(ds) + 1) // 2, media_type, viewport=(size, size))


# --- frames --------------------------------------------------------------------------------------------


def _check_frame(ds: Dataset, n: int) -> None:
    count = frame_count(ds)
    if not 1 <= n <= count:
        raise RenderError(f"frame {n} does not exist: the instance has {count}", "frame")


def _pixel_data(ds: Dataset) -> bytes:
    if "PixelData" not in ds:
        raise RenderError("the instance has no Pixel Data", "frame")
    value = ds.PixelData
    if not isinstance(value, bytes | bytearray):
        raise RenderError("the Pixel Data value is not bytes")
    return bytes(value)


def _transfer_syntax(ds: Dataset) -> UID:
    """The dataset's transfer syntax: whether the pixel data is encapsulated, and its byte order, are only
    known from it."""
    file_meta = getattr(ds, "file_meta", None)
    syntax = file_meta.get("TransferSyntaxUID") if file_meta is not None else None
    if not syntax:
        raise RenderError("the dataset has no Transfer Syntax UID")
    return UID(str(syntax))


def _required_int(ds: Dataset, keyword: str) -> int:
    value = ds.get(keyword)
    if value is None or value == "":
        raise RenderError(f"the dataset has no {keyword}")
    return int(value)


def _native_frame(ds: Dataset, buffer: bytes, n: int, *, little_endian: bool) -> bytes:
    rows, columns = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    bits = _required_int(ds, "BitsAllocated")
    samples = int(ds.get("SamplesPerPixel") or 1)
    if bits not in _NATIVE_BITS:
        raise RenderError(f"Bits Allocated {bits} cannot be sliced into frames")
    # Planar Configuration does not change a frame's size: each frame holds its own colour planes.
    # YBR_FULL_422 keeps one Cb and one Cr per two pixels: two samples per pixel on average.
    if samples == 3 and ds.get("PhotometricInterpretation") == "YBR_FULL_422":
        per_frame = rows * columns * 2
    else:
        per_frame = rows * columns * samples
    count = frame_count(ds)

    if bits == 1:
        if not little_endian:
            raise RenderError("1-bit pixel data in big endian is not supported")
        if len(buffer) * 8 < per_frame * count:
            raise RenderError("the Pixel Data is shorter than its frames")
        start = (n - 1) * per_frame
        if per_frame % 8 == 0:
            return buffer[start // 8:(start + per_frame) // 8]
        # Frames are packed back to back: this one starts mid-byte, re-pack it to start on a byte.
        first, last = start // 8, (start + per_frame + 7) // 8
        unpacked = np.unpackbits(np.frombuffer(buffer, np.uint8, last - first, first), bitorder="little")
        shift = start % 8
        return np.packbits(unpacked[shift:shift + per_frame], bitorder="little").tobytes()

    size = per_frame * bits // 8
    if len(buffer) < size * count:
        raise RenderError("the Pixel Data is shorter than its frames")
    data = buffer[(n - 1) * size:n * size]
    if little_endian or bits == 8:
        return data
    return np.frombuffer(data, f">u{bits // 8}").astype(f"<u{bits // 8}").tobytes()


def _encapsulated_frame(ds: Dataset, buffer: bytes, n: int) -> bytes:
    frames = frame_count(ds)
    try:
        basic = parse_basic_offsets(buffer)
        offsets_raw, lengths_raw = ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths")
        if offsets_raw and lengths_raw:
            offsets = struct.unpack(f"<{len(offsets_raw) // 8}Q", offsets_raw[:len(offsets_raw) // 8 * 8])
            lengths = struct.unpack(f"<{len(lengths_raw) // 8}Q", lengths_raw[:len(lengths_raw) // 8 * 8])
            if len(offsets) != frames or len(lengths) != frames:
                raise RenderError(f"the Extended Offset Table does not list {frames} frames")
            frame = get_frame(buffer, n - 1, extended_offsets=(list(offsets), list(lengths)))
            if len(frame) != lengths[n - 1]:
                raise RenderError("the Pixel Data is shorter than the Extended Offset Table says")
            return frame
        if basic:
            if len(basic) != frames:
                raise RenderError(f"the Basic Offset Table does not list {frames} frames")
            return get_frame(buffer, n - 1)
        stream = BytesIO(buffer)
        stream.seek(8)  # past the empty Basic Offset Table item
        fragments, positions = parse_fragments(stream)
        if fragments == 0:
            raise RenderError("the encapsulated Pixel Data has no fragments")
        if frames == 1:
            return b"".join(generate_fragments(stream))
        if fragments != frames:
            raise RenderError(f"{fragments} fragments for {frames} frames without an offset table: "
                              "the frame boundaries are ambiguous")
        stream.seek(positions[n - 1])
        return next(generate_fragments(stream))
    except RenderError:
        raise
    except (ValueError, struct.error, StopIteration) as exc:
        raise RenderError(f"the encapsulated Pixel Data is malformed: {exc}") from exc


# --- rendering -----------------------------------------------------------------------------------------


def _image_format(media_type: str) -> str:
    image_format = MEDIA_TYPES.get(media_type.split(";", 1)[0].strip().lower())
    if image_format is None:
        raise RenderError(f"cannot render as {media_type!r}: only {', '.join(MEDIA_TYPES)}")
    return image_format


def _decode(ds: Dataset, frame: int) -> tuple[npt.NDArray[Any], dict[str, str | int]]:
    """The frame's pixels as pydicom decodes them (YBR_FULL / YBR_FULL_422 already RGB, signedness and
    unused bits corrected), with the pixel properties that describe the decoded array."""
    syntax = _transfer_syntax(ds)
    if not syntax.is_encapsulated and ds.get("BitsAllocated") == 1:
        return _unpacked_bits(ds, frame)
    try:
        decoder = get_decoder(syntax)
    except NotImplementedError as exc:
        raise RenderError(f"no decoder for transfer syntax {syntax}") from exc
    if not decoder.is_available:
        raise RenderError(f"no decoder installed for transfer syntax {syntax}")
    try:
        arr, properties = decoder.as_array(ds, index=frame - 1, validate=True, **as_pixel_options(ds))
    except Exception as exc:  # the codecs fail in many ways; each means this frame cannot be shown
        raise RenderError(f"the pixel data cannot be decoded ({type(exc).__name__}: {exc})") from exc
    return arr, properties


def _unpacked_bits(ds: Dataset, frame: int) -> tuple[npt.NDArray[Any], dict[str, str | int]]:
    """A 1-bit frame unpacked from :func:`frame_bytes`: pydicom 3.0 mis-slices a single 1-bit frame that
    starts mid-byte (``as_array`` with ``index``), and ours is re-packed to start on a byte."""
    if int(ds.get("SamplesPerPixel") or 1) != 1:
        raise RenderError("1-bit pixel data with more than one sample per pixel cannot be rendered")
    rows, columns = _required_int(ds, "Rows"), _required_int(ds, "Columns")
    bits = np.unpackbits(np.frombuffer(frame_bytes(ds, frame), np.uint8), bitorder="little")
    properties: dict[str, str | int] = {
        "photometric_interpretation": str(ds.get("PhotometricInterpretation", "")),
        "samples_per_pixel": 1, "bits_stored": 1}
    return bits[:rows * columns].reshape(rows, columns), properties


def _frame_item(ds: Dataset, frame: int, sequence: str) -> Dataset:
    """Where the frame's ``sequence`` attributes live: its per-frame functional group, else the shared
    one, else the dataset itself (classic single-frame objects keep them at the top level)."""
    for groups, index in (("PerFrameFunctionalGroupsSequence", frame - 1),
                          ("SharedFunctionalGroupsSequence", 0)):
        items = ds.get(groups)
        if items is not None and len(items) > index:
            inner = items[index].get(sequence)
            if inner:
                item: Dataset = inner[0]
                return item
    return ds


def _first_number(value: Any) -> float | None:
    """The first value of a (possibly multi-valued) DS element; None when absent or not a number."""
    if value is None or value == "":
        return None
    if not isinstance(value, str | bytes) and hasattr(value, "__getitem__"):
        if len(value) == 0:
            return None
        value = value[0]
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _modality(arr: npt.NDArray[Any], ds: Dataset, frame: int) -> _FloatArray:
    source = _frame_item(ds, frame, "PixelValueTransformationSequence")
    if source is ds and ds.get("ModalityLUTSequence"):
        return np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    values = arr.astype(np.float64)
    slope = _first_number(source.get("RescaleSlope"))
    intercept = _first_number(source.get("RescaleIntercept"))
    if slope is not None and slope != 1.0:
        values *= slope
    if intercept is not None and intercept != 0.0:
        values += intercept
    return values


def _voi(values: _FloatArray, center: float, width: float, function: str) -> _FloatArray:
    """PS3.3 C.11.2.1.2 (LINEAR), C.11.2.1.3.2 (LINEAR_EXACT) and C.11.2.1.3.1 (SIGMOID) onto 0-255."""
    if function == "SIGMOID":
        with np.errstate(over="ignore"):  # far below the centre exp() overflows to inf: 255 / inf is 0
            result: _FloatArray = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
        return result
    if function == "LINEAR_EXACT":
        return np.clip(((values - center) / width + 0.5) * 255.0, 0.0, 255.0)
    if width == 1.0:  # LINEAR at its narrowest is a threshold (the ramp has no width to divide by)
        return np.where(values > center - 0.5, 255.0, 0.0)
    return np.clip(((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0, 0.0, 255.0)


def _valid_width(width: float, function: str) -> bool:
    """PS3.3 C.11.2.1.2: LINEAR needs a width of at least 1, LINEAR_EXACT and SIGMOID a positive one."""
    return width >= 1.0 if function == "LINEAR" else width > 0.0


def _grayscale(arr: npt.NDArray[Any], ds: Dataset, frame: int, window: tuple[float, float] | None, *,
               inverted: bool) -> _UInt8Array:
    values = _modality(arr, ds, frame)
    voi = _frame_item(ds, frame, "FrameVOILUTSequence")
    function = str(voi.get("VOILUTFunction") or "LINEAR").upper()
    if function not in ("LINEAR", "LINEAR_EXACT", "SIGMOID"):
        function = "LINEAR"
    if window is not None:
        center, width = window
        if not _valid_width(width, function):
            raise RenderError(f"window width {width} is too small for {function}", "parameter")
    else:
        center_or_none = _first_number(voi.get("WindowCenter"))
        width_or_none = _first_number(voi.get("WindowWidth"))
        if center_or_none is not None and width_or_none is not None and _valid_width(width_or_none,
                                                                                     function):
            center, width = center_or_none, width_or_none
        else:
            center = width = math.nan
    if math.isnan(width):
        low, high = float(values.min()), float(values.max())
        if high > low:
            mapped = (values - low) * (255.0 / (high - low))
        else:
            mapped = np.zeros_like(values)
    else:
        mapped = _voi(values, center, width, function)
    grey = np.rint(mapped).astype(np.uint8)
    if inverted:
        grey = 255 - grey
    return grey


def _colour(arr: npt.NDArray[Any], photometric: str, bits_stored: int) -> _UInt8Array:
    if photometric in _YBR_CONVERTIBLE and arr.dtype == np.uint8:
        arr = convert_color_space(arr, photometric, "RGB")
    elif photometric != "RGB":
        raise RenderError(f"colour pixel data in {photometric} cannot be rendered")
    if bits_stored > 8:
        arr = arr.astype(np.uint32) >> (bits_stored - 8)
    return np.asarray(np.clip(arr, 0, 255), dtype=np.uint8)


def _palette(arr: npt.NDArray[Any], ds: Dataset) -> _UInt8Array:
    try:
        rgb = apply_color_lut(arr, ds)[..., :3]
    except (ValueError, AttributeError, KeyError, IndexError) as exc:
        raise RenderError(f"the palette colour lookup table cannot be applied: {exc}") from exc
    if rgb.dtype.itemsize > 1:
        rgb = rgb >> (8 * (rgb.dtype.itemsize - 1))
    return np.asarray(rgb, dtype=np.uint8)


def _fit(image: Image.Image, viewport: tuple[int, int]) -> Image.Image:
    """The image scaled to the largest size within ``viewport`` that keeps its aspect ratio."""
    columns, rows = image.size
    scale = min(viewport[0] / columns, viewport[1] / rows)
    size = (min(viewport[0], max(1, round(columns * scale))), min(viewport[1], max(1, round(rows * scale))))
    if size == image.size:
        return image
    return image.resize(size, Image.Resampling.LANCZOS)


__all__ = ["MEDIA_TYPES", "RenderError", "RenderErrorReason", "frame_bytes", "frame_count", "render",
           "thumbnail"]
