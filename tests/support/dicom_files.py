"""DICOM files for the store and reconcile tests: pydicom's samples, large CTs written without
holding their pixels in memory, and a digest of everything after the Part 10 header."""

from __future__ import annotations

import hashlib
import struct
from pathlib import Path

from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from duo_gateway.dicom.reconcile import read_part10_header


def sample(name: str) -> Path:
    path = get_testdata_file(name, download=False)
    assert path is not None, name
    return Path(str(path))


def pixel_bytes(path: Path) -> str:
    """Digest of the raw bytes from the first pixel data element to the end (what must not change)."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        read_part10_header(fh)
        while chunk := fh.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def write_large(path: Path, pixel_mb: int, *, implicit: bool = False) -> Path:
    """A CT with ``pixel_mb`` MiB of native pixel data, written without holding it in memory."""
    frames = max(1, pixel_mb * (1 << 20) // (512 * 512 * 2))
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = UID("1.2.840.10008.5.1.4.1.1.2")
    ds.file_meta.MediaStorageSOPInstanceUID = uid = generate_uid()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ds.SOPInstanceUID = uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "999911120"
    ds.PatientName = "Test^Large"
    ds.Modality = "CT"
    ds.Rows = ds.Columns = 512
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)
    length = frames * 512 * 512 * 2
    chunk = bytes(range(256)) * 4096  # 1 MiB, not all zeros so a shifted copy would show
    with open(path, "ab") as fh:
        if implicit:
            fh.write(struct.pack("<HHI", 0x7FE0, 0x0010, length))
        else:
            fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, length))
        left = length
        while left:
            piece = chunk[: min(len(chunk), left)]
            fh.write(piece)
            left -= len(piece)
    return path
