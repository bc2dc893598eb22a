"""The DICOM JSON Model (PS3.18 Annex F.2): datasets to and from what QIDO-RS and WADO-RS metadata send.

Why not just ``Dataset.to_json_dict``: pydicom gets most of F.2 right, and its per-VR type mapping is
used here, but on datasets DUO really handles it goes wrong in ways a viewer notices:

- an empty value inside a multi-valued DS/IS (``1.5\\``) or PN raises instead of giving ``null`` (F.2.5),
  and an empty value inside a multi-valued string becomes ``""`` instead of ``null``;
- an element whose VR is still ambiguous (``ds.PixelData = ...`` gives ``"OB or OW"``; keyword-set
  Smallest/Largest Image Pixel Value give ``"US or SS"``) is written with that compound VR, which no
  reader accepts, or raises when the value is still raw bytes;
- an empty sequence gets ``"Value": []`` where F.2.5 says an empty attribute has no value at all;
- its bulk data handler sees an element but not where it is, so nested bulk data (a waveform in a
  sequence item) cannot be given a URI that finds it again; its threshold counts base64 characters and
  it never sends Pixel Data as bulk data when it is small.

Bulk data URIs are built by the caller from the element's tag path (:func:`to_dicom_json`), so this
module stays free of routes and hosts.
"""

from __future__ import annotations

import base64
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any, Final

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.filewriter import correct_ambiguous_vr_element
from pydicom.jsonrep import convert_to_python_number
from pydicom.uid import UID
from pydicom.valuerep import AMBIGUOUS_VR, BYTES_VR, PersonName

#: Pixel Data, Float Pixel Data, Double Float Pixel Data: always bulk data when a URI can be given, so
#: metadata stays small whatever the image size (what PS3.18 10.4 "metadata" resources are for).
PIXEL_DATA_TAGS: Final = frozenset({0x7FE00010, 0x7FE00008, 0x7FE00009})
#: JSON numbers are IEEE doubles (RFC 8259 §6): SV/UV values beyond this lose digits, so F.2.3.1 has
#: them sent as strings.
_JSON_SAFE_INT: Final = 2**53 - 1
_PN_GROUPS: Final = ("Alphabetic", "Ideographic", "Phonetic")


def to_dicom_json(ds: Dataset, *, bulk_uri: Callable[[str], str] | None = None,
                  include: Collection[int] | None = None, bulk_threshold: int = 1024) -> dict[str, Any]:
    """The DICOM JSON object of ``ds`` (without file meta), attributes in ascending tag order.

    Binary elements (OB, OD, OF, OL, OV, OW, UN) longer than ``bulk_threshold`` bytes, and pixel data
    of any size, become ``{"vr": .., "BulkDataURI": bulk_uri(path)}``; ``path`` is the element's tag path,
    8 upper-case hex digits per tag and 0-based item indexes between them (``"00540016/0/00181072"``),
    which the caller turns into a URI its bulk data route can resolve. Without ``bulk_uri`` every value
    is inline (``InlineBinary``, base64). ``include`` keeps only those top-level tags (QIDO-RS return
    attributes); nested items are always complete.
    """
    wanted = None if include is None else frozenset(include)
    return _dataset(ds, "", [ds], _Bulk(bulk_uri, bulk_threshold, _encapsulated(ds)), wanted)


def from_dicom_json(obj: dict[str, Any]) -> Dataset:
    """A dataset from a DICOM JSON object; ValueError for a BulkDataURI, which only I/O could resolve."""
    if not isinstance(obj, dict):
        raise ValueError("a DICOM JSON dataset is a JSON object")
    return Dataset.from_json(obj, bulk_data_uri_handler=_refuse_bulk_data)


def _refuse_bulk_data(tag: str, vr: str, uri: str) -> bytes:
    raise ValueError(f"BulkDataURI of {tag} is not resolved here: the codec does no I/O")


@dataclass(frozen=True)
class _Bulk:
    """When a binary value goes out by reference, and how the reference is made."""

    uri: Callable[[str], str] | None
    threshold: int
    encapsulated: bool  # the dataset's pixel data is encapsulated, so OB (PS3.5 A.4)


def _encapsulated(ds: Dataset) -> bool:
    meta = getattr(ds, "file_meta", None)
    syntax = getattr(meta, "TransferSyntaxUID", None) if meta is not None else None
    return syntax is not None and UID(str(syntax)).is_encapsulated


def _dataset(ds: Dataset, prefix: str, ancestors: list[Dataset], bulk: _Bulk,
             include: frozenset[int] | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for tag in sorted(ds.keys()):
        # File meta is not part of the model; group lengths describe an encoding the JSON does not have.
        if tag >> 16 == 0x0002 or tag & 0xFFFF == 0 or (include is not None and tag not in include):
            continue
        key = f"{tag:08X}"
        out[key] = _element(ds[tag], prefix + key, ancestors, bulk)
    return out


def _element(elem: DataElement, path: str, ancestors: list[Dataset], bulk: _Bulk) -> dict[str, Any]:
    elem = _resolved(elem, ancestors, bulk)
    vr = str(elem.VR)
    if elem.is_empty:
        return {"vr": vr}
    if vr == "SQ":
        return {"vr": vr, "Value": [_dataset(item, f"{path}/{index}/", [item, *ancestors], bulk, None)
                                    for index, item in enumerate(elem.value)]}
    if vr in BYTES_VR:
        data = bytes(elem.value)
        if bulk.uri is not None and (elem.tag in PIXEL_DATA_TAGS or len(data) > bulk.threshold):
            return {"vr": vr, "BulkDataURI": bulk.uri(path)}
        return {"vr": vr, "InlineBinary": base64.b64encode(data).decode("ascii")}
    values = list(elem.value) if elem.VM > 1 else [elem.value]
    return {"vr": vr, "Value": [_value(v, vr) for v in values]}


def _value(value: Any, vr: str) -> Any:
    """One value of a multi-valued element in its F.2.3 JSON type; an empty one is null (F.2.5)."""
    if value is None or value == "":
        return None
    if vr == "PN":
        groups = (value if isinstance(value, PersonName) else PersonName(value)).components
        name = {group: text for group, text in zip(_PN_GROUPS, groups, strict=False) if text}
        return name or None
    if vr == "AT":
        return f"{int(value):08X}"
    number = convert_to_python_number(value, vr)
    if vr in ("SV", "UV") and abs(number) > _JSON_SAFE_INT:
        return str(number)
    return number if isinstance(number, int | float) else str(number)


def _resolved(elem: DataElement, ancestors: list[Dataset], bulk: _Bulk) -> DataElement:
    """``elem`` with a single VR: the model has no "OB or OW". pydicom decides from the surrounding
    attributes (BitsAllocated, PixelRepresentation) as it would when writing; on a copy, so the caller's
    dataset is not changed by being read."""
    if elem.VR not in AMBIGUOUS_VR:
        return elem
    if elem.tag in PIXEL_DATA_TAGS and bulk.encapsulated:
        return DataElement(elem.tag, "OB", elem.value)
    copy = DataElement(elem.tag, elem.VR, elem.value, is_undefined_length=elem.is_undefined_length)
    root = ancestors[-1]
    little_endian = getattr(root, "original_encoding", (None, True))[1] is not False
    try:
        fixed = correct_ambiguous_vr_element(copy, ancestors[0], little_endian, ancestors)
    except AttributeError:  # the attribute the choice depends on is missing
        fixed = copy
    assert isinstance(fixed, DataElement)
    if fixed.VR in AMBIGUOUS_VR:  # undecidable: the value's own type says which half applies
        value: Any = fixed.value
        if isinstance(value, bytes | bytearray):
            vr = "OB" if "OB" in fixed.VR else "OW"
        else:
            vr = "SS" if any(v is not None and v < 0 for v in (value if fixed.VM > 1 else [value])) else "US"
        return DataElement(fixed.tag, vr, value)
    return fixed
