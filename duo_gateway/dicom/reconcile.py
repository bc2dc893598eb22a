"""Import reconciliation of relayed instances (IHE IRWF.b style), without ever holding pixel data.

A study fetched from another hospital carries *that* hospital's patient identity (often the BSN).
Before it lands in the requester's PACS, PatientID (0010,0020) and IssuerOfPatientID (0010,0021) are
rewritten to the requester's local id, and the foreign identity is kept in OtherPatientIDsSequence
(0010,1002) so nothing is lost and the PACS (or a human) can still trace the instance back.

Why byte surgery instead of ``dcmread``/``save_as``: a relayed instance can be hundreds of MB
(multi-frame CT, tomosynthesis) and the transfer memory budget is < 300 MB whatever the study size.
So only the *header* (every top-level element before the pixel data) is parsed with pydicom; the new
header is written, then the rest of the file (pixel data, trailing padding, anything after) is copied
in fixed-size chunks. That works for every transfer syntax whose body is not deflated: Implicit and
Explicit VR, little and big endian, and encapsulated (compressed) pixel data, because the pixel data
element is copied verbatim. Deflated files (rare, small) fall back to a full in-memory rewrite.

The file meta (group 0002) is re-written with its group length recomputed; nothing else in it changes.

The header helpers (:func:`read_part10_header`, :func:`write_part10_header`) are shared with the
C-STORE client, which uses them to transcode Explicit <-> Implicit VR Little Endian the same way.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.filebase import DicomFileLike
from pydicom.filereader import read_dataset, read_preamble
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.uid import UID, DeflatedExplicitVRLittleEndian

from duo_gateway.bsn import BSN_OID, NLMINBIZA

#: Top-level tags whose values may be huge and are only ever copied as bytes, never parsed:
#: Float Pixel Data, Double Float Pixel Data, Pixel Data (PS3.5 7.6 / A.4).
PIXEL_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})
#: Copy buffer: large enough for throughput, small enough that memory stays flat.
CHUNK = 1 << 20

_PATIENT_ID = 0x00100020
_ISSUER = 0x00100021
_QUALIFIERS = 0x00100024


@dataclass
class Part10Header:
    """A Part 10 file split at its first pixel data element (or its end, when there is none)."""

    preamble: bytes
    file_meta: FileMetaDataset
    #: Every top-level element before ``stop_offset``; values of unparsed elements stay raw bytes.
    dataset: Dataset
    transfer_syntax: UID
    #: Byte offset of the dataset (first element after the file meta).
    body_offset: int
    #: Byte offset where the header stops: the first pixel data element, or the end of the file.
    stop_offset: int
    size: int


def _is_pixel_tag(tag: BaseTag, vr: str | None, length: int) -> bool:
    return int(tag) in PIXEL_TAGS


def _not_file_meta(tag: BaseTag, vr: str | None, length: int) -> bool:
    return bool(tag.group != 2)


def read_part10_header(fp: BinaryIO,
                       stop_when: Callable[[BaseTag, str | None, int], bool] = _is_pixel_tag) -> Part10Header:
    """Parse preamble, file meta and the dataset up to (excluding) the first pixel data element.

    ``fp`` is left positioned at ``stop_offset``. Raises ValueError for anything that is not a Part 10
    file with a transfer syntax in its file meta (the spool only ever holds those).
    """
    size = fp.seek(0, os.SEEK_END)
    fp.seek(0)
    try:
        preamble = read_preamble(fp, False)
    except InvalidDicomError:
        preamble = None
    if preamble is None:
        raise ValueError("not a DICOM Part 10 file (no preamble/DICM prefix)")
    meta_ds = read_dataset(fp, is_implicit_VR=False, is_little_endian=True, stop_when=_not_file_meta)
    file_meta = FileMetaDataset(meta_ds)
    if "TransferSyntaxUID" not in file_meta:
        raise ValueError("file meta has no (0002,0010) Transfer Syntax UID")
    ts = UID(str(file_meta.TransferSyntaxUID))
    body = fp.tell()
    if ts == DeflatedExplicitVRLittleEndian:
        raise ValueError("deflated transfer syntax: the body cannot be split without inflating it")
    dataset = read_dataset(fp, is_implicit_VR=ts.is_implicit_VR, is_little_endian=ts.is_little_endian,
                           stop_when=stop_when)
    return Part10Header(preamble, file_meta, dataset, ts, body, fp.tell(), size)


def write_part10_header(out: BinaryIO, header: Part10Header, dataset: Dataset,
                        transfer_syntax: UID | None = None) -> None:
    """Write preamble, file meta (group length recomputed) and ``dataset`` encoded as ``transfer_syntax``
    (default: the file's own). Raw elements are written byte for byte when the encoding is unchanged."""
    ts = transfer_syntax or header.transfer_syntax
    meta = FileMetaDataset(header.file_meta)
    meta.TransferSyntaxUID = ts
    out.write(header.preamble)
    out.write(b"DICM")
    fp = DicomFileLike(out)
    write_file_meta_info(fp, meta, enforce_standard=True)
    fp.is_implicit_VR = ts.is_implicit_VR
    fp.is_little_endian = ts.is_little_endian
    write_dataset(fp, dataset)


def copy_range(src: BinaryIO, out: BinaryIO, length: int) -> None:
    """Copy ``length`` bytes in :data:`CHUNK` pieces (never the whole value in memory)."""
    remaining = length
    while remaining > 0:
        chunk = src.read(min(CHUNK, remaining))
        if not chunk:
            raise ValueError("file ended inside an element value")
        out.write(chunk)
        remaining -= len(chunk)


# -- reconciliation -------------------------------------------------------------------------------


@dataclass(frozen=True)
class ReconcileResult:
    """What :func:`reconcile_file` did; ``changed`` is False when the file already carried the local id."""

    changed: bool
    patient_id: str
    issuer: str | None
    original_patient_id: str | None
    original_issuer: str | None
    #: The original identity was appended to OtherPatientIDsSequence (False when already there).
    kept_original: bool


def _universal_id(item: Dataset) -> str:
    qualifiers = item.get("IssuerOfPatientIDQualifiersSequence")
    if not qualifiers:
        return ""
    return str(qualifiers[0].get("UniversalEntityID", "") or "")


def _identity(item: Dataset) -> tuple[str, str, str]:
    return (str(item.get("PatientID", "") or ""), str(item.get("IssuerOfPatientID", "") or ""),
            _universal_id(item))


def _reconcile_dataset(ds: Dataset, local_patient_id: str, issuer: str | None,
                       bsn: str | None = None) -> ReconcileResult:
    """Rewrite identity in ``ds`` (a header or a full dataset) in place.

    ``bsn`` is the patient the transfer is for. A source that keeps the BSN in an unlabelled
    PatientID (its configuration says that is where the BSN is) hands over a bare number; moved into
    OtherPatientIDsSequence as it is, it would no longer read as a BSN there (:mod:`duo_gateway.bsn`
    counts only labelled items), so the kept item is labelled NLMINBIZA with the BSN OID when, and
    only when, it is exactly that BSN.
    """
    old_id = str(ds.get("PatientID", "") or "")
    old_issuer = str(ds.get("IssuerOfPatientID", "") or "")
    new_issuer = issuer or ""
    has_qualifiers = _QUALIFIERS in ds
    if old_id == local_patient_id and old_issuer == new_issuer and not has_qualifiers:
        return ReconcileResult(False, local_patient_id, issuer, None, None, False)
    kept = False
    if old_id:
        original = Dataset()
        original.PatientID = old_id
        if old_issuer:
            original.IssuerOfPatientID = old_issuer
        if has_qualifiers:
            original.IssuerOfPatientIDQualifiersSequence = ds.IssuerOfPatientIDQualifiersSequence
        elif not old_issuer and bsn is not None and old_id == bsn:
            original.IssuerOfPatientID = NLMINBIZA
            qualifier = Dataset()
            qualifier.UniversalEntityID = BSN_OID
            qualifier.UniversalEntityIDType = "ISO"
            original.IssuerOfPatientIDQualifiersSequence = Sequence([qualifier])
        original.TypeOfPatientID = "TEXT"
        others = ds.get("OtherPatientIDsSequence")
        if others is None:
            others = Sequence()
        wanted = _identity(original)
        if (old_id, old_issuer, _universal_id(original)) != (local_patient_id, new_issuer, "") and all(
                _identity(item) != wanted for item in others):
            others.append(original)
            ds.OtherPatientIDsSequence = others
            kept = True
    ds.PatientID = local_patient_id
    if issuer:
        ds.IssuerOfPatientID = issuer
    elif _ISSUER in ds:
        del ds[_ISSUER]
    if has_qualifiers:
        # The qualifiers describe the *original* issuer (e.g. the BSN OID); they now live in the item.
        del ds[_QUALIFIERS]
    return ReconcileResult(True, local_patient_id, issuer, old_id or None, old_issuer or None, kept)


def reconcile_file(src: Path, dst: Path, *, local_patient_id: str, issuer: str | None,
                   bsn: str | None = None) -> ReconcileResult:
    """Write ``src`` to ``dst`` with the requester's patient identity; ``src == dst`` rewrites in place.

    The output appears atomically (temp file in ``dst``'s directory, then rename), so a crash never
    leaves a half-written instance in the spool. Running it twice is a no-op the second time (the file
    is copied unchanged, byte for byte).
    """
    if not local_patient_id:
        raise ValueError("local_patient_id must not be empty")
    fd, tmp_name = tempfile.mkstemp(dir=dst.parent, prefix=".reconcile-", suffix=".dcm")
    tmp = Path(tmp_name)
    try:
        # The temp file's descriptor is wrapped first, so it is closed even if ``src`` cannot be opened.
        with os.fdopen(fd, "wb") as out, open(src, "rb") as fin:
            try:
                header = read_part10_header(fin)
            except ValueError:
                if not _is_deflated(src):
                    raise
                result = _reconcile_in_memory(src, out, local_patient_id, issuer, bsn)
            else:
                result = _reconcile_dataset(header.dataset, local_patient_id, issuer, bsn)
                if result.changed:
                    write_part10_header(out, header, header.dataset)
                    fin.seek(header.stop_offset)
                    copy_range(fin, out, header.size - header.stop_offset)
                else:
                    fin.seek(0)
                    shutil.copyfileobj(fin, out, CHUNK)
        os.replace(tmp, dst)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return result


def _is_deflated(path: Path) -> bool:
    from pydicom.filereader import read_file_meta_info

    try:
        return str(read_file_meta_info(path).get("TransferSyntaxUID", "")) == DeflatedExplicitVRLittleEndian
    except Exception:
        return False


def _reconcile_in_memory(src: Path, out: BinaryIO, local_patient_id: str,
                         issuer: str | None, bsn: str | None) -> ReconcileResult:
    """Deflated bodies cannot be split; they are small in practice, so decode, rewrite, re-deflate."""
    ds = dcmread(src)
    result = _reconcile_dataset(ds, local_patient_id, issuer, bsn)
    ds.save_as(out, enforce_file_format=True)
    return result
