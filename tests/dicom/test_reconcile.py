"""Import reconciliation: identity rewritten, original kept, pixel data byte-identical and never in memory."""

from __future__ import annotations

import os
import tracemalloc
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from duo_gateway.bsn import names_bsn
from duo_gateway.dicom.reconcile import read_part10_header, reconcile_file
from tests.support.dicom_files import pixel_bytes, sample, write_large

BSN_OID = "2.16.840.1.113883.2.4.6.3"
LOCAL = "HOSPB-000123"
ISSUER = "HOSP_B"


def with_bsn(src: Path, dst: Path, bsn: str = "999911120") -> Path:
    """A copy of ``src`` identified the way a TLB hospital sends it: BSN with the BSN OID as qualifier."""
    ds = dcmread(src)
    ds.PatientID = bsn
    ds.IssuerOfPatientID = "NLMINBIZA"
    q = Dataset()
    q.UniversalEntityID = BSN_OID
    q.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = Sequence([q])
    if "OtherPatientIDsSequence" in ds:
        del ds.OtherPatientIDsSequence
    ds.save_as(dst, enforce_file_format=True)
    return dst


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small_implicit.dcm", "MR_small_RLE.dcm",
                                  "MR_small_jp2klossless.dcm", "MR_small_bigendian.dcm"])
def test_identity_rewritten_original_kept_pixels_identical(tmp_path: Path, name: str) -> None:
    src = with_bsn(sample(name), tmp_path / "src.dcm")
    dst = tmp_path / "dst.dcm"
    result = reconcile_file(src, dst, local_patient_id=LOCAL, issuer=ISSUER)
    assert result.changed and result.kept_original
    assert (result.original_patient_id, result.original_issuer) == ("999911120", "NLMINBIZA")

    before, after = dcmread(src), dcmread(dst)
    assert after.PatientID == LOCAL and after.IssuerOfPatientID == ISSUER
    assert "IssuerOfPatientIDQualifiersSequence" not in after  # it qualified the BSN, not the local id
    item = after.OtherPatientIDsSequence[-1]
    assert (item.PatientID, item.IssuerOfPatientID) == ("999911120", "NLMINBIZA")
    assert item.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == BSN_OID
    # everything after the header is the same bytes; the rest of the dataset is unchanged
    assert pixel_bytes(dst) == pixel_bytes(src)
    assert after.PixelData == before.PixelData
    assert after.file_meta.TransferSyntaxUID == before.file_meta.TransferSyntaxUID
    for keyword in ("SOPInstanceUID", "StudyInstanceUID", "PatientName", "Rows", "Columns"):
        assert after.get(keyword) == before.get(keyword)
    # the file meta group length matches what is really there
    meta_len = after.file_meta.FileMetaInformationGroupLength
    with open(dst, "rb") as fh:
        header = read_part10_header(fh)
    assert header.body_offset == 132 + 12 + meta_len


@pytest.mark.parametrize(("transfer_bsn", "labelled"),
                         [("999911120", True), ("999911132", False), (None, False)])
def test_an_unlabelled_bsn_moved_aside_is_labelled_only_when_it_is_the_transfers_bsn(
        tmp_path: Path, transfer_bsn: str | None, labelled: bool) -> None:
    """A PatientID-mode PACS sends its BSN without an issuer; moved aside bare, it would not read as a
    BSN in OtherPatientIDsSequence (only labelled items do), so the import would be lost to a later
    query of the requester's PACS by BSN. Labelled only when it is exactly the transfer's patient."""
    src = tmp_path / "src.dcm"
    ds = dcmread(sample("CT_small.dcm"))
    ds.PatientID = "999911120"
    for keyword in ("IssuerOfPatientID", "IssuerOfPatientIDQualifiersSequence", "OtherPatientIDsSequence"):
        if keyword in ds:
            delattr(ds, keyword)
    ds.save_as(src, enforce_file_format=True)
    dst = tmp_path / "dst.dcm"
    result = reconcile_file(src, dst, local_patient_id=LOCAL, issuer=ISSUER, bsn=transfer_bsn)
    assert result.kept_original
    after = dcmread(dst)
    item = after.OtherPatientIDsSequence[-1]
    assert item.PatientID == "999911120"
    assert ("IssuerOfPatientID" in item) is labelled
    assert names_bsn(after, "OtherPatientIDsSequence", "999911120") is labelled
    assert not names_bsn(after, "PatientID", "999911120")  # the local id is nobody's BSN


def test_idempotent_and_in_place(tmp_path: Path) -> None:
    path = with_bsn(sample("CT_small.dcm"), tmp_path / "ct.dcm")
    first = reconcile_file(path, path, local_patient_id=LOCAL, issuer=ISSUER)
    once = path.read_bytes()
    second = reconcile_file(path, path, local_patient_id=LOCAL, issuer=ISSUER)
    assert first.changed and not second.changed
    assert path.read_bytes() == once
    ds = dcmread(path)
    assert [i.PatientID for i in ds.OtherPatientIDsSequence].count("999911120") == 1
    assert not list(tmp_path.glob(".reconcile-*"))  # no temp file left behind


def test_existing_other_id_not_duplicated(tmp_path: Path) -> None:
    src = with_bsn(sample("CT_small.dcm"), tmp_path / "src.dcm")
    ds = dcmread(src)
    item = Dataset()
    item.PatientID = "999911120"
    item.IssuerOfPatientID = "NLMINBIZA"
    item.IssuerOfPatientIDQualifiersSequence = ds.IssuerOfPatientIDQualifiersSequence
    ds.OtherPatientIDsSequence = Sequence([item])
    ds.save_as(src, enforce_file_format=True)
    result = reconcile_file(src, tmp_path / "dst.dcm", local_patient_id=LOCAL, issuer=None)
    assert result.changed and not result.kept_original
    out = dcmread(tmp_path / "dst.dcm")
    assert len(out.OtherPatientIDsSequence) == 1
    assert out.PatientID == LOCAL and "IssuerOfPatientID" not in out


def test_deflated_falls_back_to_in_memory(tmp_path: Path) -> None:
    src = sample("image_dfl.dcm")
    result = reconcile_file(src, tmp_path / "dst.dcm", local_patient_id=LOCAL, issuer=ISSUER)
    assert result.changed
    out, before = dcmread(tmp_path / "dst.dcm"), dcmread(src)
    assert out.PatientID == LOCAL and out.PixelData == before.PixelData


def test_not_dicom_refused_and_nothing_written(tmp_path: Path) -> None:
    src = tmp_path / "junk.dcm"
    src.write_bytes(b"not dicom" * 100)
    with pytest.raises(ValueError):
        reconcile_file(src, tmp_path / "dst.dcm", local_patient_id=LOCAL, issuer=ISSUER)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["junk.dcm"]


@pytest.mark.parametrize("implicit", [False, True])
def test_large_file_memory_stays_small(tmp_path: Path, implicit: bool) -> None:
    src = write_large(tmp_path / "big.dcm", 100, implicit=implicit)
    dst = tmp_path / "out.dcm"
    tracemalloc.start()
    try:
        reconcile_file(src, dst, local_patient_id=LOCAL, issuer=ISSUER)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"reconcile 100 MiB pixel data: tracemalloc peak {peak / 1e6:.1f} MB")
    assert peak < 10 * (1 << 20)
    assert os.path.getsize(dst) > 100 * (1 << 20)
    assert pixel_bytes(dst) == pixel_bytes(src)
    header = dcmread(dst, stop_before_pixels=True)
    assert header.PatientID == LOCAL and header.OtherPatientIDsSequence[0].PatientID == "999911120"
