"""Pixel data the way the simulated archives hold and hand it out: pydicom's codecs, never a lossy step.

A real archive stores some studies compressed and hands each instance out in a syntax the requester
accepts: as stored when that is acceptable, else converted without loss when it has the codec, else not
at all (a failed C-STORE sub-operation, a RAD-75 XDSRepositoryError). The simulators (the TLB PACS, the
XCA communities) do the same with pydicom's encoders (JPEG 2000 Lossless through pylibjpeg-openjpeg,
JPEG-LS Lossless through pyjpegls, RLE natively) and decoders, so what DUO receives from them is what
a real codec produces. Which conversions keep the pixels is :mod:`duo_gateway.dicom.syntaxes`' call;
nothing here touches the network or the filesystem.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from io import BytesIO
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.pixels.decoders.base import get_decoder
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGLSLossless,
    RLELossless,
)

from duo_gateway.dicom.syntaxes import syntax_class

#: The syntaxes a simulator can store an instance in or convert one to.
ENCODABLE: Final = frozenset(str(ts) for ts in (
    ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian,
    JPEG2000Lossless, JPEGLSLossless, RLELossless,
))


def can_convert(stored: str, target: str) -> bool:
    """Whether an instance stored in ``stored`` can be handed out in ``target`` with the same pixels."""
    if stored == target:
        return True
    if target not in ENCODABLE or syntax_class(stored) == "lossy":
        return False  # decoding lossy data into another syntax would hide that it is lossy
    if syntax_class(stored) == "uncompressed":
        return True
    try:
        return bool(get_decoder(UID(stored)).is_available)
    except NotImplementedError:  # pydicom has no decoder at all for it
        return False


def serving_syntax(stored: str, acceptable: Sequence[str], *, converts: bool = True) -> str | None:
    """The syntax to hand an instance out in: the stored one when acceptable, else the first acceptable one
    it converts to without loss (unless the archive ``converts`` nothing), else None (it cannot be)."""
    if stored in acceptable:
        return stored
    if not converts:
        return None
    return next((ts for ts in acceptable if can_convert(stored, ts)), None)


def encoded(ds: Dataset, transfer_syntax: str) -> Dataset:
    """A copy of ``ds`` in ``transfer_syntax``; ValueError when that would lose pixel data.

    A compressed syntax compresses the pixel data only; an object without any (a report) keeps its
    elements and is just written in that syntax's explicit little endian encoding, as DICOM defines.
    """
    stored = str(ds.file_meta.TransferSyntaxUID)
    if not can_convert(stored, transfer_syntax):
        raise ValueError(f"cannot convert {stored} to {transfer_syntax} without loss")
    out = copy.deepcopy(ds)
    if stored == transfer_syntax:
        return out
    target = UID(transfer_syntax)
    # The same SOP Instance UID: a lossless re-encoding is the same instance (PS3.5 8.2.1), and pydicom
    # would otherwise make a new one.
    if "PixelData" in out and UID(stored).is_compressed:
        out.decompress(generate_instance_uid=False)
    if target.is_compressed and "PixelData" in out:
        out.compress(target, generate_instance_uid=False)
    else:
        out.file_meta.TransferSyntaxUID = target
    # Written and read back, so the dataset is what an archive would hold: encoded in the target syntax
    # through and through (pynetdicom refuses one whose elements say another encoding than its meta).
    buffer = BytesIO()
    dcmwrite(buffer, out, enforce_file_format=True)
    buffer.seek(0)
    return dcmread(buffer)


def stored_as(ds: Dataset, transfer_syntax: str) -> Dataset:
    """How an archive that keeps a study in ``transfer_syntax`` holds this instance of it: an image
    compression applies to images only (a report stays as it was); another encoding to every object."""
    if UID(transfer_syntax).is_compressed and "PixelData" not in ds:
        return ds
    return encoded(ds, transfer_syntax)


__all__ = ["ENCODABLE", "can_convert", "encoded", "serving_syntax", "stored_as"]
