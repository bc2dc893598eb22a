"""Lossless decompression of one Part 10 file into uncompressed little endian: file to file, no network.

Why it exists: real archives store JPEG 2000, JPEG-LS, JPEG Lossless and RLE, and a requester's PACS may
accept only uncompressed data. Refusing those instances would fail a transfer that can be done without
changing a single pixel value, so when the destination declines a lossless syntax the C-STORE client
(``store_scu.py``) decompresses a copy with :func:`decompress_file` and sends that instead. What may be
converted into what is :mod:`duo_gateway.dicom.syntaxes`' rule (the one home of it): only the
``lossless`` class is decompressed here; lossy data is refused before any decoding (see that module).

Decisions and why:

- **Frame by frame, never the instance.** The header is split off with ``reconcile.read_part10_header``
  (parsed with pydicom, small); the encapsulated frames are read from the open file one at a time by
  pydicom's ``Decoder.iter_array`` and each decoded frame is written out before the next is read. The
  new pixel data length is known from the header (rows x columns x samples x frames), so the element
  is written in one pass. Memory: one encoded and one decoded frame (plus the codec's own buffers).
- **No colour conversion of DUO's own.** Frames are decoded ``raw``: pydicom does not turn YBR_FULL into
  RGB (a floating-point round trip, not lossless). Only what the codec itself does is recorded: the
  JPEG 2000 decoder inverts the reversible/irreversible component transform and yields RGB, so
  YBR_RCT/YBR_ICT becomes RGB; JPEG component IDs that say RGB make it RGB. Decoded frames are
  colour-by-pixel, so Planar Configuration is written as 0 for colour data (RLE stores by plane, and an
  inherited 1 would mislabel the new bytes).
- **Everything else byte for byte.** Header elements are written as they were read (raw bytes, when the
  target is Explicit VR Little Endian, the encoding every encapsulated syntax already uses); elements
  after the pixel data are copied. Lossy Image Compression and its ratio/method stay as they are: a
  lossless decompression does not change the image's history. The Extended Offset Table (and its
  lengths) only describes encapsulated frames and is dropped. An encapsulated icon (Icon Image
  Sequence, PS3.5 A.4 lets it use the file's syntax) is decompressed too, in memory (it is tiny).
- **Which decoder.** pydicom tries every installed plugin; we name the one we chose per syntax so the
  result does not depend on what else happens to be installed: pylibjpeg-openjpeg for JPEG 2000 and
  HTJ2K, pyjpegls for JPEG-LS, pydicom's own RLE decoder, GDCM for JPEG Lossless (process 14, the only
  permissively licensed decoder for it; see pyproject.toml). Another installed plugin is a fallback.
- **A broken stream is that instance's problem.** Any failure to decode, a frame of the wrong size or
  count, or a malformed item structure is a :class:`TranscodeError` (``reason="corrupt"``) which the
  caller turns into a refusal of this instance alone; disk errors stay ``OSError`` (the spool may
  recover).
- **Not in the daemon's process.** The codecs are C/C++ libraries fed other organisations' data and
  can hang or abort the process; the daemon runs this module in a helper process
  (:mod:`duo_gateway.dicom.decode_worker`), never in its own.
"""

from __future__ import annotations

import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, Final, Literal

import numpy as np
from pydicom.dataset import Dataset
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.pixels.decoders.base import Decoder, get_decoder
from pydicom.pixels.utils import as_pixel_options
from pydicom.uid import (
    UID,
    HTJ2KLossless,
    HTJ2KLosslessRPCL,
    JPEG2000Lossless,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
)

from duo_gateway.dicom.reconcile import CHUNK, PIXEL_TAGS, copy_range, read_part10_header, write_part10_header
from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE, syntax_class

TranscodeReason = Literal["lossy", "unsupported", "corrupt"]

#: The decoding plugin chosen per syntax (pydicom plugin names); any other installed one is a fallback.
PREFERRED_PLUGIN: Final = {
    str(JPEG2000Lossless): "pylibjpeg", str(HTJ2KLossless): "pylibjpeg", str(HTJ2KLosslessRPCL): "pylibjpeg",
    str(JPEGLSLossless): "pyjpegls", str(RLELossless): "pydicom",
    str(JPEGLossless): "gdcm", str(JPEGLosslessSV1): "gdcm",
}

_PIXEL_DATA = 0x7FE00010
_EXTENDED_OFFSETS = (0x7FE00001, 0x7FE00002)
_ICON_IMAGE_SEQUENCE = 0x00880200
_ITEM = 0xE000FFFE  # (FFFE,E000) read as one little-endian uint32 of group, element
_SEQUENCE_DELIMITER = 0xE0DDFFFE
_UNDEFINED = 0xFFFFFFFF


class TranscodeError(ValueError):
    """Why this file cannot be decompressed; ``reason`` lets the caller word and classify its verdict."""

    def __init__(self, reason: TranscodeReason, detail: str) -> None:
        super().__init__(detail)
        self.reason: TranscodeReason = reason
        self.detail = detail


@dataclass(frozen=True)
class Decompressed:
    """What :func:`decompress_file` did (for the caller's log line and result)."""

    source_syntax: UID
    target_syntax: UID
    frames: int
    #: The Photometric Interpretation written, when the decoder changed it (YBR_RCT -> RGB), else None.
    photometric_interpretation: str | None


def decompress_file(src: Path, dst: Path, target: str,
                    progress: Callable[[], None] | None = None) -> Decompressed:
    """Write ``src`` (a lossless compressed Part 10 file) to ``dst`` uncompressed as ``target``.

    ``target`` is one of :data:`~duo_gateway.dicom.syntaxes.UNCOMPRESSED_LE`; Explicit VR keeps the
    header bytes as they are. ``progress`` is called after each frame (the caller's liveness clock).
    Raises :class:`TranscodeError` for data that must not or cannot be decoded, ``OSError`` for I/O.
    """
    target_uid = UID(target)
    if target_uid not in UNCOMPRESSED_LE:
        raise ValueError(f"cannot decompress into {target_uid.name}")
    with open(src, "rb") as fin, open(dst, "wb") as out:
        try:
            header = read_part10_header(fin)
        except (ValueError, struct.error, EOFError) as exc:
            raise TranscodeError("corrupt", f"unreadable DICOM header: {exc}") from None
        ts = header.transfer_syntax
        decoder = _decoder(ts)
        value_offset, end_offset = _encapsulated_extent(fin, header.stop_offset, header.size)
        ds = header.dataset
        try:
            options = as_pixel_options(ds)
            rows, columns = int(options["rows"]), int(options["columns"])
            samples, bits = int(options["samples_per_pixel"]), int(options["bits_allocated"])
            frames = int(options["number_of_frames"])
        except (KeyError, TypeError, ValueError) as exc:
            raise TranscodeError("corrupt", f"image pixel description incomplete: {exc}") from None
        if bits not in (8, 16, 32) or rows <= 0 or columns <= 0 or samples not in (1, 3) or frames <= 0:
            raise TranscodeError("unsupported", f"cannot decompress {rows}x{columns}, {samples} sample(s) of "
                                 f"{bits} bits allocated, {frames} frame(s)")
        frame_bytes = rows * columns * samples * (bits // 8)
        fin.seek(value_offset)
        decoded = _frames(decoder, fin, options)
        first, properties = _next_frame(decoded, 0)
        declared_pi = str(options.get("photometric_interpretation", ""))
        new_pi = str(properties.get("photometric_interpretation", declared_pi))
        changed_pi = new_pi if new_pi and new_pi != declared_pi else None

        if changed_pi is not None:
            ds.PhotometricInterpretation = changed_pi
        if samples > 1:
            ds.PlanarConfiguration = 0
        for tag in _EXTENDED_OFFSETS:
            if tag in ds:
                del ds[tag]
        if _ICON_IMAGE_SEQUENCE in ds:
            _decompress_icons(ds, decoder, ts)
        write_part10_header(out, header, ds, target_uid)

        total = frame_bytes * frames
        vr = b"OW" if bits > 8 else b"OB"
        padded = total + (total & 1)
        if target_uid.is_implicit_VR:
            out.write(struct.pack("<HHI", 0x7FE0, 0x0010, padded))
        else:
            out.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, vr, 0, padded))
        count = 0
        frame: np.ndarray[Any, Any] | None = first
        while frame is not None:
            _write_frame(out, frame, frame_bytes, bits, count)
            count += 1
            if progress is not None:
                progress()
            if count == frames:
                break
            frame, properties = _next_frame(decoded, count)
            if str(properties.get("photometric_interpretation", new_pi)) != new_pi:
                raise TranscodeError("corrupt", f"frame {count + 1} decodes to another colour space")
        if count != frames:
            raise TranscodeError("corrupt", f"{count} of {frames} frames in the pixel data")
        if total & 1:
            out.write(b"\x00")

        fin.seek(end_offset)
        _copy_tail(fin, out, header.size - end_offset, target_uid)
    return Decompressed(ts, target_uid, frames, changed_pi)


def _decoder(ts: UID) -> Decoder:
    if syntax_class(ts) != "lossless":
        # The caller checks first; this is the guard that keeps lossy data from ever being decoded here.
        reason: TranscodeReason = "lossy" if syntax_class(ts) == "lossy" else "unsupported"
        raise TranscodeError(reason, f"{ts.name} is not a lossless compressed syntax: not decompressed")
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise TranscodeError("unsupported", f"no decoder for {ts.name}") from None
    if not decoder.is_available:
        raise TranscodeError("unsupported", f"no {ts.name} decoder installed")
    return decoder


def _plugin(decoder: Decoder, ts: UID) -> str:
    preferred = PREFERRED_PLUGIN.get(str(ts), "")
    return preferred if preferred in decoder.available_plugins else ""


def _frames(decoder: Decoder, fin: BinaryIO,
            options: dict[str, Any]) -> Iterator[tuple[np.ndarray[Any, Any], dict[str, str | int]]]:
    return decoder.iter_array(fin, raw=True, decoding_plugin=_plugin(decoder, decoder.UID), **options)


def _next_frame(decoded: Iterator[tuple[np.ndarray[Any, Any], dict[str, str | int]]],
                index: int) -> tuple[np.ndarray[Any, Any] | None, dict[str, str | int]]:
    """The next decoded frame, or None when the stream has no more; a decoder failure is 'corrupt'."""
    try:
        return next(decoded)
    except StopIteration:
        return None, {}
    except (MemoryError, OSError):
        raise
    except Exception as exc:
        # The plugins raise RuntimeError, ValueError, their own types: all mean "this stream is broken".
        first_line = str(exc).strip().splitlines()
        text = " ".join(line.strip() for line in first_line[:3])
        raise TranscodeError("corrupt", f"frame {index + 1} could not be decoded: {text}"[:300]) from None


def _write_frame(out: BinaryIO, frame: np.ndarray[Any, Any], frame_bytes: int, bits: int, index: int) -> None:
    little = frame.astype(frame.dtype.newbyteorder("<"), copy=False)
    if little.dtype.itemsize * 8 != bits or little.nbytes != frame_bytes:
        raise TranscodeError("corrupt", f"frame {index + 1} decoded to {little.nbytes} bytes of "
                             f"{little.dtype.itemsize * 8}-bit samples, expected {frame_bytes} of {bits}-bit")
    out.write(np.ascontiguousarray(little).tobytes())


def _encapsulated_extent(fin: BinaryIO, offset: int, size: int) -> tuple[int, int]:
    """(start of the Pixel Data value, first byte after its sequence delimiter), checking every item
    header on the way, so a truncated or malformed stream is found before any byte is written."""
    fin.seek(offset)
    head = fin.read(12)
    if len(head) < 12:
        raise TranscodeError("corrupt", "no pixel data element")
    group, elem, vr, _, length = struct.unpack("<HH2sHI", head)
    if ((group << 16) | elem) != _PIXEL_DATA or length != _UNDEFINED:
        raise TranscodeError("corrupt", f"({group:04X},{elem:04X}) {vr!r} is not encapsulated pixel data")
    value = fin.tell()
    position = value
    items = 0
    while True:
        item = fin.read(8)
        if len(item) < 8:
            raise TranscodeError("corrupt", "pixel data ends without a sequence delimiter (truncated)")
        tag, item_length = struct.unpack("<II", item)
        position += 8
        if tag == _SEQUENCE_DELIMITER:
            return value, position
        if tag != _ITEM or item_length == _UNDEFINED or position + item_length > size:
            raise TranscodeError("corrupt", f"malformed pixel data item {items + 1}")
        position += item_length
        fin.seek(position)
        items += 1


def _copy_tail(fin: BinaryIO, out: BinaryIO, length: int, target: UID) -> None:
    """Elements after the pixel data (e.g. trailing padding): verbatim when still Explicit VR, else
    re-encoded (they are small)."""
    if length <= 0:
        return
    if not target.is_implicit_VR:
        remaining = length
        while remaining > 0:
            chunk = fin.read(min(CHUNK, remaining))
            if not chunk:
                raise TranscodeError("corrupt", "file ended inside an element after the pixel data")
            out.write(chunk)
            remaining -= len(chunk)
        return
    tail = read_dataset(fin, is_implicit_VR=False, is_little_endian=True)
    if len(tail):
        fp = DicomFileLike(out)
        fp.is_implicit_VR = True
        fp.is_little_endian = True
        tail.set_original_encoding(False, True)
        write_dataset(fp, tail)


def _decompress_icons(ds: Dataset, decoder: Decoder, ts: UID) -> None:
    """Decode encapsulated icons in place (at most a few kB of pixels each)."""
    for item in ds[_ICON_IMAGE_SEQUENCE].value:
        element = item.get(_PIXEL_DATA)
        if element is None or not element.is_undefined_length:
            continue
        try:
            arr, properties = decoder.as_array(item, raw=True, decoding_plugin=_plugin(decoder, ts))
        except (MemoryError, OSError):
            raise
        except Exception as exc:
            raise TranscodeError("corrupt", f"icon image could not be decoded: {exc}"[:300]) from None
        bits = int(item.BitsAllocated)
        data = arr.astype(arr.dtype.newbyteorder("<"), copy=False).tobytes()
        if len(data) & 1:
            data += b"\x00"
        item[_PIXEL_DATA].value = data
        item[_PIXEL_DATA].VR = "OW" if bits > 8 else "OB"
        item[_PIXEL_DATA].is_undefined_length = False
        pi = str(properties.get("photometric_interpretation", "") or "")
        if pi and pi != str(item.get("PhotometricInterpretation", "")):
            item.PhotometricInterpretation = pi
        if int(item.get("SamplesPerPixel", 1)) > 1:
            item.PlanarConfiguration = 0
        for tag in _EXTENDED_OFFSETS:
            if tag in item:
                del item[tag]



# -- streamed Explicit <-> Implicit VR Little Endian transcoding ------------------------------------

_EXPLICIT_LONG_VRS = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN",
                                b"UR", b"UT", b"UV"})


def _pixel_vr(tag: int, bits_allocated: int | None) -> bytes:
    if tag == 0x7FE00008:
        return b"OF"
    if tag == 0x7FE00009:
        return b"OD"
    return b"OW" if (bits_allocated or 16) > 8 else b"OB"


def transcode_uncompressed(src: Path, dst: Path, target: UID) -> None:
    """Rewrite an Explicit/Implicit VR Little Endian file as the other one, pixel data in chunks.

    The header goes through pydicom (small); each pixel data element gets a new element header and
    its value is copied as bytes (both syntaxes are little endian, so the value bytes are identical).
    """
    if target not in UNCOMPRESSED_LE:
        raise ValueError(f"cannot transcode to {target.name}")
    with open(src, "rb") as fin, open(dst, "wb") as out:
        header = read_part10_header(fin)
        if header.transfer_syntax not in UNCOMPRESSED_LE:
            raise ValueError(f"cannot transcode from {header.transfer_syntax.name}")
        src_implicit = header.transfer_syntax.is_implicit_VR
        bits = header.dataset.get("BitsAllocated")
        write_part10_header(out, header, header.dataset, target)
        fp = DicomFileLike(out)
        fp.is_implicit_VR = target.is_implicit_VR
        fp.is_little_endian = True
        while fin.tell() < header.size:
            raw = fin.read(8)
            if len(raw) < 8:
                raise ValueError("truncated element header")
            group, elem = struct.unpack("<HH", raw[:4])
            tag = (group << 16) | elem
            if src_implicit:
                vr = _pixel_vr(tag, bits)
                length = int(struct.unpack("<I", raw[4:8])[0])
            else:
                vr = raw[4:6]
                if vr in _EXPLICIT_LONG_VRS:
                    length = int(struct.unpack("<I", fin.read(4))[0])
                else:
                    length = int(struct.unpack("<H", raw[6:8])[0])
            if tag not in PIXEL_TAGS or length == 0xFFFFFFFF:
                raise ValueError(f"unexpected element ({group:04X},{elem:04X}) where pixel data was expected")
            if target.is_implicit_VR:
                out.write(struct.pack("<HHI", group, elem, length))
            else:
                out.write(struct.pack("<HH2sHI", group, elem, vr, 0, length))
            copy_range(fin, out, length)
            tail = read_dataset(fin, is_implicit_VR=src_implicit, is_little_endian=True,
                                stop_when=lambda t, _vr, _len: int(t) in PIXEL_TAGS)
            if len(tail):
                tail.set_original_encoding(src_implicit, True)
                write_dataset(fp, tail)

__all__ = ["PREFERRED_PLUGIN", "Decompressed", "TranscodeError", "TranscodeReason", "decompress_file",
           "transcode_uncompressed"]
