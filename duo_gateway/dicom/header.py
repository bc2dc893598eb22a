"""The identifying elements of a received dataset, found by walking its top-level element headers.

Why: every instance DUO receives is checked before it is queued (its SOP Instance UID is the one
announced, its study and patient are the ones asked for). pydicom's parser builds all of a header's
elements to answer that, about 1 ms per instance on the event loop, the largest single cost of a
RAD-75 answer or a relay after the bytes themselves. Here the top level is walked element header
by element header (skipping every value by its length), the few wanted elements are cut out, and
pydicom decodes only those. Pure: bytes in, bytes out, no I/O.

The walk stops at the first Pixel Data element (plain, float or double). It gives up (None) where
pydicom must decide instead: a big-endian or deflated dataset, an element of undefined length
other than a sequence it can delimit, bytes that end before the pixel data (the caller reads the
file then), or anything that does not parse as element headers.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable
from typing import Final

from pydicom.datadict import tag_for_keyword
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRBigEndian, ImplicitVRLittleEndian

from duo_gateway.dicom.reconcile import PIXEL_TAGS

#: What a validator may look at: identity, study and patient keys (bsn.py reads the last four).
IDENTIFYING_KEYWORDS: Final = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "PatientID", "IssuerOfPatientID",
    "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence", "StudyInstanceUID",
    "SeriesInstanceUID",
)


def _tag(keyword: str) -> int:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return int(tag)


IDENTIFYING_TAGS: Final = frozenset(_tag(k) for k in IDENTIFYING_KEYWORDS)
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                              b"UT", b"UV"})
_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQ_END: Final = 0xFFFEE0DD
_TAG = struct.Struct("<HH")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class _Stop(Exception):
    """The bytes cannot be walked here; pydicom decides."""


def walkable(transfer_syntax_uid: str) -> bool:
    """Whether :func:`cut_elements` can walk a dataset in this syntax (little endian, not deflated)."""
    return transfer_syntax_uid not in (str(ExplicitVRBigEndian), str(DeflatedExplicitVRLittleEndian))


def is_implicit(transfer_syntax_uid: str) -> bool:
    return transfer_syntax_uid == str(ImplicitVRLittleEndian)


def cut_elements(data: bytes | bytearray | memoryview, *, implicit: bool,
                 wanted: Iterable[int] = IDENTIFYING_TAGS, whole: bool = False) -> bytes | None:
    """The encoded top-level elements of ``wanted`` in ``data`` (a dataset, no meta), in order.

    None unless the walk reached the pixel data, or ``whole`` says ``data`` is the entire dataset and
    the walk reached its end: an answer from a cut-off header would lack elements.
    """
    keep = wanted if isinstance(wanted, frozenset) else frozenset(wanted)
    view = memoryview(data)
    end = len(view)
    pos = 0
    out = bytearray()
    previous = -1
    try:
        while pos < end:
            start = pos
            tag, pos, length = _header(view, pos, end, implicit)
            if tag <= previous:
                return None  # top-level tags ascend (PS3.5 7.1): this is not a walk of element headers
            previous = tag
            if tag in PIXEL_TAGS:
                return bytes(out)
            if length == _UNDEFINED:
                pos = _skip_undefined(view, pos, end, implicit)
            else:
                pos += length
                if pos > end:
                    return None
            if tag in keep:
                out += view[start:pos]
    except _Stop:
        return None
    return bytes(out) if whole and pos == end else None


def _header(view: memoryview, pos: int, end: int, implicit: bool) -> tuple[int, int, int]:
    """(tag, value offset, value length) of the element header at ``pos``."""
    if pos + 8 > end:
        raise _Stop
    group, element = _TAG.unpack_from(view, pos)
    tag = group << 16 | element
    if implicit or group == 0xFFFE:  # items and delimiters have no VR in any syntax
        return tag, pos + 8, _U32.unpack_from(view, pos + 4)[0]
    vr = bytes(view[pos + 4:pos + 6])
    if vr in _LONG_VRS:
        if pos + 12 > end:
            raise _Stop
        return tag, pos + 12, _U32.unpack_from(view, pos + 8)[0]
    if not vr.isalpha() or not vr.isupper():
        raise _Stop
    return tag, pos + 8, _U16.unpack_from(view, pos + 6)[0]


def _skip_undefined(view: memoryview, pos: int, end: int, implicit: bool, depth: int = 0) -> int:
    """Past the Sequence Delimitation Item of an undefined-length sequence starting at ``pos``."""
    if depth > 8:
        raise _Stop
    while True:
        tag, pos, length = _header(view, pos, end, implicit)
        if tag == _SEQ_END:
            return pos
        if tag != _ITEM:
            raise _Stop  # encapsulated fragments or garbage: not a sequence of datasets
        if length != _UNDEFINED:
            pos += length
            continue
        while True:  # an item of undefined length: its elements, up to the Item Delimitation Item
            tag, pos, length = _header(view, pos, end, implicit)
            if tag == _ITEM_END:
                break
            if length == _UNDEFINED:
                pos = _skip_undefined(view, pos, end, implicit, depth + 1)
            else:
                pos += length
            if pos > end:
                raise _Stop
