"""Oversized KOS manifests, written fast: how a misbehaving community answers ITI-39 (issue 14).

A manifest that lists hundreds of thousands of instances is what makes a careless Initiating
Gateway read, hold and parse tens of MiB. Building one with pydicom takes minutes (a Dataset per
reference), so the references are written here as raw Explicit VR Little Endian bytes, sequences
and items of undefined length, around the head and tail of a real manifest that pydicom writes. The
result is a valid KOS of the same study: its own references first, then as many references to
instances that do not exist (in series of :data:`SERIES_SIZE`) as it takes to reach the size asked.
The benchmark of the manifest parser uses the same writer for its big manifests.
"""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator
from io import BytesIO
from typing import Final

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset

from duo_gateway.dicom.kos import encode_part10, parse_kos

#: Made-up references per made-up series.
SERIES_SIZE: Final = 1000
_CT: Final = b"1.2.840.10008.5.1.4.1.1.2"
_EVIDENCE: Final = 0x0040A375
_ITEM: Final = b"\xfe\xff\x00\xe0\xff\xff\xff\xff"
_ITEM_END: Final = b"\xfe\xff\x0d\xe0\x00\x00\x00\x00"
_SEQ_END: Final = b"\xfe\xff\xdd\xe0\x00\x00\x00\x00"


def _element(tag: int, vr: bytes, value: bytes) -> bytes:
    if len(value) % 2:
        value += b"\0" if vr == b"UI" else b" "
    return struct.pack("<HH", tag >> 16, tag & 0xFFFF) + vr + struct.pack("<H", len(value)) + value


def _sequence(tag: int, items: Iterable[bytes]) -> Iterator[bytes]:
    yield struct.pack("<HH", tag >> 16, tag & 0xFFFF) + b"SQ\0\0\xff\xff\xff\xff"
    for item in items:
        yield _ITEM
        yield item
        yield _ITEM_END
    yield _SEQ_END


def _series_item(series_uid: str, location: str | None, refs: Iterable[tuple[bytes, bytes]]) -> bytes:
    head = _element(0x0020000E, b"UI", series_uid.encode())
    if location:
        head += _element(0x0040E011, b"UI", location.encode())
    sops = (_element(0x00081150, b"UI", cls) + _element(0x00081155, b"UI", inst) for cls, inst in refs)
    return head + b"".join(_sequence(0x00081199, sops))


def grow_manifest(kos: bytes, size: int) -> bytes:
    """``kos`` (a Part 10 KOS) with made-up references appended to its study's evidence until the
    file is at least ``size`` bytes; smaller sizes give the manifest unchanged."""
    if len(kos) >= size:
        return kos
    manifest = parse_kos(kos)
    ds = dcmread(BytesIO(kos))
    tail = Dataset()
    for tag in [t for t in ds.keys() if t > _EVIDENCE]:
        tail[tag] = ds[tag]
        del ds[tag]
    del ds[_EVIDENCE]
    head = encode_part10(ds)
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, False
    write_dataset(buf, tail)
    tail_bytes = buf.getvalue()
    location = next((s.retrieve_location_uid for s in manifest.series), None)
    series = [_series_item(s.series_instance_uid, s.retrieve_location_uid,
                           ((c.encode(), i.encode()) for c, i in s.instances)) for s in manifest.series]
    total = len(head) + len(tail_bytes) + sum(map(len, series)) + 256  # + sequence and item markup
    base = manifest.study_instance_uid
    while total < size:
        series_uid = f"{base}.9{len(series)}"
        series.append(_series_item(series_uid, location, (
            (_CT, f"{series_uid}.{n}".encode()) for n in range(SERIES_SIZE))))
        total += len(series[-1]) + 16
    study = _element(0x0020000D, b"UI", base.encode()) + b"".join(_sequence(0x00081115, series))
    return head + b"".join(_sequence(_EVIDENCE, [study])) + tail_bytes


__all__ = ["SERIES_SIZE", "grow_manifest"]
