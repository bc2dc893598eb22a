"""Compressed instances made during the test run, from pydicom's bundled samples.

RLE, JPEG-LS and JPEG 2000 come from pydicom's own encoders (each with the plugin named, so the result
does not depend on what else is installed: GDCM's RLE encoder aborts on some inputs), JPEG Lossless
(process 14, both UIDs) and lossy JPEG from DCMTK's ``dcmcjpeg``. Each instance carries the pixels a
lossless decode must give back (``raw``: no colour conversion), taken from the uncompressed original.
"""

from __future__ import annotations

import copy
import hashlib
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.pixels import pixel_array
from pydicom.uid import (
    UID,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    RLELossless,
    generate_uid,
)

from duo_gateway.dicom.reconcile import read_part10_header
from tests.support.dcmtk import require_tool
from tests.support.dicom_files import sample

#: pydicom's encoder plugin per syntax it encodes here.
_PLUGINS = {RLELossless: "pydicom", JPEGLSLossless: "pyjpegls", JPEG2000Lossless: "pylibjpeg"}
#: dcmcjpeg's switch per syntax it encodes here.
_DCMCJPEG = {JPEGLossless: "+el", JPEGLosslessSV1: "+e1", JPEGBaseline8Bit: "+eb"}


@dataclass(frozen=True)
class Made:
    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    #: The uncompressed original's pixels, undecoded colour space (what a lossless decode yields).
    pixels: np.ndarray[Any, Any]
    #: The original's Photometric Interpretation, before encoding.
    photometric: str

    @property
    def name(self) -> str:
        return UID(self.transfer_syntax_uid).name


def native(template: str, *, study_uid: str, series_uid: str) -> Dataset:
    """A sample as an uncompressed dataset with fresh instance UIDs in the given study and series."""
    ds = dcmread(sample(template))
    if ds.file_meta.TransferSyntaxUID.is_compressed:
        ds.decompress(as_rgb=False, generate_instance_uid=False)
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    return ds


def encode(ds: Dataset, syntax: UID, out: Path, *, encapsulate_ext: bool = False) -> Made:
    """Write ``ds`` (uncompressed) to ``out`` encoded as ``syntax``."""
    out.parent.mkdir(parents=True, exist_ok=True)
    pixels = pixel_array(ds, raw=True)
    photometric = str(ds.PhotometricInterpretation)
    if syntax in _DCMCJPEG:
        plain = out.with_suffix(".native.dcm")
        ds.save_as(plain, enforce_file_format=True)
        proc = subprocess.run([require_tool("dcmcjpeg"), _DCMCJPEG[syntax], str(plain), str(out)],
                              capture_output=True, text=True, timeout=60)
        assert proc.returncode == 0, proc.stderr
        plain.unlink()
    else:
        ds = copy.deepcopy(ds)  # compress() rewrites file_meta, which a shallow copy shares
        ds.compress(syntax, encoding_plugin=_PLUGINS[syntax], generate_instance_uid=False,
                    encapsulate_ext=encapsulate_ext)
        ds.save_as(out, enforce_file_format=True)
    written = dcmread(out, stop_before_pixels=True)
    assert written.file_meta.TransferSyntaxUID == syntax, (written.file_meta.TransferSyntaxUID, syntax)
    return Made(out, str(written.SOPClassUID), str(written.SOPInstanceUID), str(syntax), pixels, photometric)


def truncated(made: Made, out: Path, keep: int) -> Made:
    """``made`` with its (single) frame's codestream cut to ``keep`` bytes, in a well-formed item."""
    ds = dcmread(made.path)
    frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    ds.PixelData = encapsulate([_even(frame[:keep])])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return Made(out, made.sop_class_uid, str(ds.SOPInstanceUID), made.transfer_syntax_uid, made.pixels,
                made.photometric)


def patched(made: Made, out: Path, changes: dict[int, int]) -> Made:
    """``made`` with bytes of its (single) frame's codestream replaced: ``{offset: new byte}``."""
    ds = dcmread(made.path)
    frame = bytearray(next(generate_frames(ds.PixelData, number_of_frames=1)))
    for offset, value in changes.items():
        frame[offset] = value
    ds.PixelData = encapsulate([_even(bytes(frame))])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.save_as(out, enforce_file_format=True)
    return Made(out, made.sop_class_uid, str(ds.SOPInstanceUID), made.transfer_syntax_uid, made.pixels,
                made.photometric)


def ct_512(out: Path, frames: int, *, study_uid: str, series_uid: str) -> Made:
    """A 512x512, 16-bit signed CT-like series of ``frames`` (smooth anatomy plus noise), J2K lossless."""
    rng = np.random.default_rng(5)
    y, x = np.mgrid[0:512, 0:512]
    body = ((x - 256) ** 2 + (y - 256) ** 2 < 200 ** 2) * 1040 - 1000
    stack = np.stack([body + rng.normal(0, 12, (512, 512)) + 40 * np.sin(x / (17 + n))
                      for n in range(frames)])
    ds = native("CT_small.dcm", study_uid=study_uid, series_uid=series_uid)
    ds.Rows = ds.Columns = 512
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    if frames > 1:
        ds.NumberOfFrames = frames
    data = stack.astype("<i2")
    ds.PixelData = (data[0] if frames == 1 else data).tobytes()
    ds["PixelData"].VR = "OW"
    return encode(ds, JPEG2000Lossless, out)


def pixel_element(path: Path) -> str:
    """Digest of the encapsulated Pixel Data element, header to sequence delimiter: what a relay that
    does not decode must deliver unchanged (a receiver may drop trailing padding after it)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        read_part10_header(fh)
        head = fh.read(12)
        assert head[:4] == b"\xe0\x7f\x10\x00" and head[8:12] == b"\xff\xff\xff\xff", head.hex()
        digest.update(head)
        while True:
            item = fh.read(8)
            digest.update(item)
            if item[:4] == b"\xfe\xff\xdd\xe0":
                return digest.hexdigest()
            assert item[:4] == b"\xfe\xff\x00\xe0", item.hex()
            digest.update(fh.read(int.from_bytes(item[4:], "little")))


def _even(data: bytes) -> bytes:
    return data + b"\x00" if len(data) & 1 else data


__all__ = ["Made", "ct_512", "encode", "native", "patched", "pixel_element", "truncated"]
