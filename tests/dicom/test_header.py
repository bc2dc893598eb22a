"""The identifying-elements walk (dicom/header.py) against pydicom's own parse of the same bytes."""

from __future__ import annotations

import copy
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence

from duo_gateway.dicom.header import IDENTIFYING_KEYWORDS, cut_elements
from duo_gateway.sim.config import default_network
from duo_gateway.sim.studies import generate_studies

NET = default_network()


@pytest.fixture(scope="module")
def instance() -> Dataset:
    study = generate_studies(NET.patients[0], NET.hospitals[0], 1, NET.seed, image_size=32)[0]
    ds = copy.deepcopy(study.instances[0])
    other = Dataset()
    other.PatientID = NET.patients[0].bsn
    other.IssuerOfPatientID = "NLMINBIZA"
    ds.OtherPatientIDsSequence = Sequence([other])
    return ds


def _encode(ds: Dataset, *, implicit: bool, undefined: bool) -> bytes:
    ds = copy.deepcopy(ds)
    for element in ds:
        if element.VR == "SQ":
            element.is_undefined_length = undefined
            for item in element.value:
                item.is_undefined_length_sequence_item = undefined
    buffer = DicomBytesIO()
    buffer.is_implicit_VR, buffer.is_little_endian = implicit, True
    write_dataset(buffer, ds)
    return buffer.getvalue()


@pytest.mark.parametrize("implicit", [False, True])
@pytest.mark.parametrize("undefined", [False, True])
def test_the_cut_holds_exactly_the_identifying_elements_pydicom_reads(instance: Dataset, implicit: bool,
                                                                    undefined: bool) -> None:
    data = _encode(instance, implicit=implicit, undefined=undefined)
    assert (b"\xfe\xff\xdd\xe0" in data) == undefined  # Sequence Delimitation Items where asked
    cut = cut_elements(data, implicit=implicit)
    assert cut is not None
    header = read_dataset(BytesIO(cut), implicit, True)
    full = read_dataset(BytesIO(data), implicit, True)
    present = [k for k in IDENTIFYING_KEYWORDS if k in full]
    assert {"SOPInstanceUID", "StudyInstanceUID", "PatientID", "OtherPatientIDsSequence"} <= set(present)
    assert [e.keyword for e in header] == present
    for keyword in present:
        assert header[keyword].value == full[keyword].value, keyword
    assert "PixelData" not in header


def test_only_a_walk_that_reached_the_pixels_or_the_whole_dataset_counts(instance: Dataset) -> None:
    data = _encode(instance, implicit=False, undefined=True)
    pixels = data.index(b"\xe0\x7f\x10\x00")
    assert cut_elements(data[:pixels + 12], implicit=False) is not None
    for cut_at in (pixels - 1, pixels // 2, 200, 9):
        assert cut_elements(data[:cut_at], implicit=False) is None, cut_at  # header cut off: no answer
    report = copy.deepcopy(instance)
    del report.PixelData
    body = _encode(report, implicit=False, undefined=False)
    assert cut_elements(body, implicit=False) is None, "no pixel data and not known to be whole"
    assert cut_elements(body, implicit=False, whole=True) is not None


def test_what_is_not_a_walk_of_element_headers_gets_no_answer(instance: Dataset) -> None:
    data = _encode(instance, implicit=False, undefined=False)
    assert cut_elements(b"\x00" * 64 + data, implicit=False) is None
    assert cut_elements(data[8:], implicit=False) is None  # starts inside an element
    swapped = data[:0] + _encode(instance, implicit=True, undefined=False)
    assert cut_elements(swapped, implicit=False) is None  # implicit bytes read as explicit


def test_a_received_file_header_matches_dcmread(tmp_path: object, instance: Dataset) -> None:
    """Through the spool's own entry point: Part 10 meta as DUO writes it, then the dataset."""
    from duo_gateway.dicom.qr import _header_from
    from duo_gateway.dicom.ul.part10 import file_meta

    ts = "1.2.840.10008.1.2.1"
    meta = file_meta(str(instance.SOPClassUID), str(instance.SOPInstanceUID), ts)
    data = meta + _encode(instance, implicit=False, undefined=False)
    header = _header_from(data, len(meta), ts, whole=True)
    assert header is not None
    reference = dcmread(BytesIO(data), stop_before_pixels=True)
    for keyword in IDENTIFYING_KEYWORDS:
        assert header.get(keyword) == reference.get(keyword), keyword
    assert _header_from(data, len(meta), "1.2.840.10008.1.2.2", whole=True) is None  # big endian: pydicom
