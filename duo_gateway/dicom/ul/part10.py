"""The Part 10 file meta header (PS3.10 7.1) a received dataset is prefixed with in the spool, by hand.

A DIMSE C-STORE carries the dataset alone; the spool keeps Part 10 files (preamble, ``DICM``, group
0002 in Explicit VR Little Endian) because every later reader (validation, reconciliation, the C-STORE
SCU, the RAD-75 answer) opens them as such. Encoding a dozen elements by hand keeps pydicom off the
receive path; the dataset bytes that follow are written as they arrive, never parsed here.
"""

from __future__ import annotations

import struct
from typing import Final

from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

#: The implementation DUO names in file meta and in A-ASSOCIATE user information (as dicom/kos.py).
IMPLEMENTATION_CLASS_UID: Final = str(PYDICOM_IMPLEMENTATION_UID)
IMPLEMENTATION_VERSION_NAME: Final = "DUO_GW_UL_1"

_SHORT = struct.Struct("<HH2sH")
_LONG = struct.Struct("<HH2s2xI")


def _element(element: int, vr: bytes, value: bytes) -> bytes:
    if vr in (b"OB", b"OW", b"UN", b"SQ", b"UT"):
        return _LONG.pack(2, element, vr, len(value)) + value
    return _SHORT.pack(2, element, vr, len(value)) + value


def _even(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def file_meta(sop_class_uid: str, sop_instance_uid: str, transfer_syntax_uid: str,
              source_ae: str = "") -> bytes:
    """Preamble, prefix and group 0002: the bytes a Part 10 file starts with, before the dataset."""
    body = b"".join([
        _element(0x0001, b"OB", b"\x00\x01"),
        _element(0x0002, b"UI", _even(sop_class_uid.encode("ascii"), b"\0")),
        _element(0x0003, b"UI", _even(sop_instance_uid.encode("ascii"), b"\0")),
        _element(0x0010, b"UI", _even(transfer_syntax_uid.encode("ascii"), b"\0")),
        _element(0x0012, b"UI", _even(IMPLEMENTATION_CLASS_UID.encode("ascii"), b"\0")),
        _element(0x0013, b"SH", _even(IMPLEMENTATION_VERSION_NAME.encode("ascii"), b" ")),
        *([_element(0x0016, b"AE", _even(source_ae.strip().encode("ascii", "replace"), b" "))]
          if source_ae.strip() else []),
    ])
    return bytes(128) + b"DICM" + _SHORT.pack(2, 0, b"UL", 4) + struct.pack("<I", len(body)) + body
