"""The DICOM JSON model (dicomweb/dicomjson.py) against pydicom's own F.2 writer and reader and against
Orthanc's DICOMweb plugin (DCMTK's writer), and read by dicomweb-client from a loopback origin the way a
viewer reads WADO-RS metadata and bulk data."""

from __future__ import annotations

import copy
import json
import urllib.request
from collections.abc import Iterator
from io import BytesIO
from typing import Any
from urllib.parse import urlsplit

import pytest
from dicomweb_client import DICOMwebClient
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, JPEG2000Lossless, generate_uid

from duo_gateway.dicomweb.dicomjson import from_dicom_json, to_dicom_json
from duo_gateway.dicomweb.multipart import MultipartRelated
from duo_gateway.sim.studies import GeneratedStudy
from tests.dicomweb.conftest import Origin, dicomweb_orthanc
from tests.support.orthanc import Orthanc


def _as_pydicom_should(obj: dict[str, Any]) -> dict[str, Any]:
    """pydicom's to_json_dict output with the two deviations from F.2 that show on generated studies
    corrected: an empty sequence has no "Value" (F.2.5), and no VR is "OB or OW" (Table F.2.3-1)."""
    fixed: dict[str, Any] = {}
    for key, attribute in obj.items():
        attribute = dict(attribute)
        if attribute["vr"] == "OB or OW":
            attribute["vr"] = "OW"  # 16 bits allocated
        if attribute["vr"] == "SQ":
            if attribute.get("Value") == []:
                del attribute["Value"]
            else:
                attribute["Value"] = [_as_pydicom_should(item) for item in attribute["Value"]]
        fixed[key] = attribute
    return fixed


def _strict_json(obj: Any) -> Any:
    """What a client's JSON parser gets: RFC 8259 only (no NaN), through text and back."""
    return json.loads(json.dumps(obj, allow_nan=False))


def _assert_same(original: Dataset, back: Dataset) -> None:
    """Every element of ``original`` is in ``back`` with the same value, nested items too."""
    assert sorted(back.keys()) == sorted(original.keys())
    for elem in original:
        other = back[elem.tag]
        if elem.VR == "SQ":
            assert len(other.value) == len(elem.value), elem.tag
            for item, back_item in zip(elem.value, other.value, strict=True):
                _assert_same(item, back_item)
        elif elem.VR == "PN":
            names = [str(v) for v in (elem.value if elem.VM > 1 else [elem.value])]
            assert [str(v) for v in (other.value if other.VM > 1 else [other.value])] == names, elem.tag
        else:
            assert other.value == elem.value, elem.tag


@pytest.mark.parametrize("which", ["ct", "report"])
def test_differs_from_pydicom_only_where_pydicom_breaks_f2(which: str,
                                                           request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(which)
    ours = to_dicom_json(ds)
    theirs = ds.to_json_dict(bulk_data_threshold=10**9)
    assert ours == _as_pydicom_should(theirs)
    assert list(ours) == sorted(ours), "attributes in ascending tag order"
    assert _strict_json(ours) == ours


def test_report_sequences_nest_and_empty_ones_have_no_value(report: Dataset) -> None:
    ours = to_dicom_json(report)
    assert ours["0040A372"] == {"vr": "SQ"}  # PerformedProcedureCodeSequence, empty
    content = ours["0040A730"]["Value"]  # ContentSequence: language, findings, impression
    assert [item["0040A040"]["Value"] for item in content] == [["CODE"], ["CONTAINER"], ["CONTAINER"]]
    findings = content[1]["0040A730"]["Value"]
    assert all(item["0040A160"]["vr"] == "UT" for item in findings)
    assert ours["0040A073"]["Value"][0]["0040A075"]["vr"] == "PN"  # VerifyingObserverName


@pytest.mark.parametrize("which", ["ct", "report"])
def test_round_trip_through_our_reader_and_pydicoms(which: str, request: pytest.FixtureRequest) -> None:
    ds: Dataset = request.getfixturevalue(which)
    text = _strict_json(to_dicom_json(ds))
    _assert_same(ds, from_dicom_json(text))
    _assert_same(ds, Dataset.from_json(json.dumps(text)))


def test_input_is_not_changed(ct: Dataset) -> None:
    before = ct["PixelData"].VR
    to_dicom_json(ct, bulk_uri=lambda path: path)
    assert ct["PixelData"].VR == before == "OB or OW"


def test_bulk_data_uri_paths_and_threshold() -> None:
    ds = Dataset()
    ds.BitsAllocated = 8
    ds.PixelData = b"\x01" * 4  # tiny, still bulk: pixel data always is
    ds.add_new(0x00091010, "OB", b"\x02" * 1024)  # at the threshold: inline
    ds.add_new(0x00091011, "OB", b"\x03" * 1025)  # over it: bulk
    wave = Dataset()
    wave.WaveformBitsAllocated = 16
    wave.WaveformData = b"\x04\x00" * 600
    wave.ChannelMinimumValue = b"\x00\x00"
    ds.WaveformSequence = DicomSequence([Dataset(), wave])
    paths: list[str] = []

    def uri(path: str) -> str:
        paths.append(path)
        return f"https://duo.example/bulk/{path}"

    out = to_dicom_json(ds, bulk_uri=uri)
    assert out["7FE00010"] == {"vr": "OB", "BulkDataURI": "https://duo.example/bulk/7FE00010"}
    assert out["00091010"]["InlineBinary"] == "AgIC" * 341 + "Ag=="
    assert out["00091011"] == {"vr": "OB", "BulkDataURI": "https://duo.example/bulk/00091011"}
    item = out["54000100"]["Value"][1]
    assert item["54001010"] == {"vr": "OW", "BulkDataURI": "https://duo.example/bulk/54000100/1/54001010"}
    assert item["54000110"] == {"vr": "OW", "InlineBinary": "AAA="}  # "OB or OW" resolved, 16 bits
    assert sorted(paths) == ["00091011", "54000100/1/54001010", "7FE00010"]
    with pytest.raises(ValueError, match="BulkDataURI"):
        from_dicom_json(out)
    inline = to_dicom_json(ds)
    assert inline["7FE00010"] == {"vr": "OB", "InlineBinary": "AQEBAQ=="}
    _assert_same(ds, from_dicom_json(inline))


def test_encapsulated_pixel_data_is_ob() -> None:
    """PS3.5 A.4: encapsulated pixel data is OB whatever BitsAllocated says (pydicom's VR correction
    alone would call 16-bit pixel data OW unless the element was read with undefined length)."""
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = JPEG2000Lossless
    ds.BitsAllocated = 16
    ds.PixelData = b"\xfe\xff\x00\xe0\x00\x00\x00\x00"  # an empty basic offset table item
    assert to_dicom_json(ds, bulk_uri=str)["7FE00010"] == {"vr": "OB", "BulkDataURI": "7FE00010"}
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assert to_dicom_json(ds, bulk_uri=str)["7FE00010"] == {"vr": "OW", "BulkDataURI": "7FE00010"}


def test_empty_values_are_null_inside_and_absent_alone() -> None:
    """F.2.5: an empty attribute has no Value; an empty value among others is null. pydicom raises on the
    DS and PN cases and writes "" for the CS one."""
    ds = Dataset()
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.PixelSpacing = ["0.5", ""]
    ds.add_new(0x00081060, "PN", ["de Boer^Pieter", "", "Visser^Sanne"])  # Name of Physicians Reading
    ds.SeriesNumber = None
    ds.StudyDescription = ""
    ds.ReferencedSeriesSequence = DicomSequence([])
    ds.ReferencedStudySequence = DicomSequence([Dataset()])
    out = _strict_json(to_dicom_json(ds))
    assert out["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}
    assert out["00280030"] == {"vr": "DS", "Value": [0.5, None]}
    assert out["00081060"] == {"vr": "PN", "Value": [{"Alphabetic": "de Boer^Pieter"}, None,
                                                      {"Alphabetic": "Visser^Sanne"}]}
    assert out["00200011"] == {"vr": "IS"}
    assert out["00081030"] == {"vr": "LO"}
    assert out["00081115"] == {"vr": "SQ"}
    assert out["00081110"] == {"vr": "SQ", "Value": [{}]}
    back = from_dicom_json(out)
    assert back.ImageType == ["ORIGINAL", "", "AXIAL"]
    assert [str(name) for name in back[0x00081060].value] == ["de Boer^Pieter", "", "Visser^Sanne"]
    assert back.PixelSpacing[0] == 0.5 and back.PixelSpacing[1] is None
    assert back.ReferencedSeriesSequence == [] and len(back.ReferencedStudySequence) == 1


def test_person_name_groups_and_character_set() -> None:
    """F.2.2: one object per name with its non-empty component groups; decoded through the dataset's
    Specific Character Set, here ISO 2022 (Japanese) as read back from a file."""
    ds = Dataset()
    ds.SpecificCharacterSet = ["", "ISO 2022 IR 87"]
    ds.PatientName = "Yamada^Tarou=山田^太郎=やまだ^たろう"
    ds.ReferringPhysicianName = "=山田^太郎"
    ds.add_new(0x00081070, "PN", "Müller^Jürgen==")  # Operators' Name; trailing empty groups
    buffer = BytesIO()
    dcmwrite(buffer, ds, implicit_vr=False, little_endian=True)
    read = dcmread(BytesIO(buffer.getvalue()), force=True)
    out = _strict_json(to_dicom_json(read))
    assert out["00100010"]["Value"] == [{"Alphabetic": "Yamada^Tarou", "Ideographic": "山田^太郎",
                                         "Phonetic": "やまだ^たろう"}]
    assert out["00080090"]["Value"] == [{"Ideographic": "山田^太郎"}]
    assert out["00081070"]["Value"] == [{"Alphabetic": "Müller^Jürgen"}]
    assert str(from_dicom_json(out).PatientName) == "Yamada^Tarou=山田^太郎=やまだ^たろう"


def test_numbers_tags_private_elements_and_what_is_left_out() -> None:
    ds = Dataset()
    ds.add_new(0x00080000, "UL", 64)  # a group length: says nothing once re-encoded
    ds.add_new(0x00020010, "UI", "1.2.840.10008.1.2.1")  # file meta in the body: not in the model
    ds.SeriesNumber = "7"
    ds.ImagePositionPatient = ["-125.5", "0", "1e2"]
    ds.Rows = 512
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]
    ds.add_new(0x00090010, "LO", "ACME 1.0")  # private creator
    ds.add_new(0x00091001, "UN", b"\x00\x01\x02\x03")
    ds.SelectorSVValue = [-(2**62), 12]
    ds.SelectorUVValue = 2**53 - 1
    out = _strict_json(to_dicom_json(ds))
    assert "00080000" not in out and "00020010" not in out
    assert out["00200011"] == {"vr": "IS", "Value": [7]}
    assert out["00200032"] == {"vr": "DS", "Value": [-125.5, 0, 100]}
    assert out["00280010"] == {"vr": "US", "Value": [512]}
    assert out["00280009"] == {"vr": "AT", "Value": ["00181063", "00181065"]}
    assert out["00090010"] == {"vr": "LO", "Value": ["ACME 1.0"]}
    assert out["00091001"] == {"vr": "UN", "InlineBinary": "AAECAw=="}
    assert out["00720082"] == {"vr": "SV", "Value": [str(-(2**62)), 12]}  # beyond 2**53: a string, exact
    assert out["00720083"] == {"vr": "UV", "Value": [2**53 - 1]}  # still exact as a JSON number
    back = from_dicom_json(out)
    assert back.SelectorSVValue == [-(2**62), 12]
    assert back[0x00091001].value == b"\x00\x01\x02\x03"
    assert back.FrameIncrementPointer == [0x00181063, 0x00181065]


def test_private_elements_read_implicit_are_un_inline(ct: Dataset) -> None:
    ds = copy.deepcopy(ct)
    ds.add_new(0x00290010, "LO", "DUO TEST")
    ds.add_new(0x00291010, "OB", b"\x10\x20" * 8)
    buffer = BytesIO()
    ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    dcmwrite(buffer, ds, enforce_file_format=True)
    read = dcmread(BytesIO(buffer.getvalue()))
    out = to_dicom_json(read, bulk_uri=lambda path: path)
    assert out["00291010"] == {"vr": "UN", "InlineBinary": "ECAQIBAgECAQIBAgECAQIA=="}
    assert out["7FE00010"] == {"vr": "OW", "BulkDataURI": "7FE00010"}  # implicit VR pixel data is OW


def test_include_keeps_top_level_tags_only(report: Dataset) -> None:
    wanted = {0x0020000D, 0x0040A730, 0x00100010, 0x00080054}  # the last is absent: no attribute
    out = to_dicom_json(report, include=wanted)
    assert list(out) == ["00100010", "0020000D", "0040A730"]
    assert out["0040A730"] == to_dicom_json(report)["0040A730"]


def test_ambiguous_us_or_ss_follows_pixel_representation() -> None:
    ds = Dataset()
    ds.PixelRepresentation = 1
    ds.SmallestImagePixelValue = -1024
    ds.BitsAllocated = 16
    ds.PixelData = b"\x00\x00"
    out = to_dicom_json(ds)
    assert out["00280106"] == {"vr": "SS", "Value": [-1024]}
    assert ds["SmallestImagePixelValue"].VR == "US or SS"
    element = DataElement(0x00280107, "US or SS", 4095)
    unsigned = Dataset()
    unsigned.add(element)
    assert to_dicom_json(unsigned)["00280107"] == {"vr": "US", "Value": [4095]}


def test_dicomweb_client_reads_metadata_and_bulk_data(origin: Origin, ct_study: GeneratedStudy) -> None:
    """A WADO-RS metadata answer with bulk data URIs, and the bulk data behind them as multipart
    octet-stream: dicomweb-client fetches both, and pydicom rebuilds every instance from them."""
    study = ct_study.study_instance_uid
    metadata: list[dict[str, Any]] = []
    for ds in ct_study.instances:
        base = f"{origin.url}/studies/{study}/series/{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}"
        obj = to_dicom_json(ds, bulk_uri=f"{base}/bulk/{{}}".format)
        metadata.append(obj)
        for path, value in _bulk_values(ds, obj):
            writer = MultipartRelated("application/octet-stream")
            origin.serve(urlsplit(f"{base}/bulk/{path}").path, writer.content_type,
                         writer.part_head() + value + writer.PART_END + writer.end())
    origin.serve(urlsplit(f"{origin.url}/studies/{study}/metadata").path, "application/dicom+json",
                 json.dumps(metadata).encode())

    client = DICOMwebClient(url=origin.url)
    got = client.retrieve_study_metadata(study)
    assert got == _strict_json(metadata)
    assert any("BulkDataURI" in obj.get("7FE00010", {}) for obj in got)

    def fetch(uri: str) -> bytes:
        # the client's parts are bytearrays, which pydicom would take for a list of numbers
        return bytes(client.retrieve_bulkdata(uri)[0])

    for obj, ds in zip(got, ct_study.instances, strict=True):
        _assert_same(ds, Dataset.from_json(obj, bulk_data_uri_handler=fetch))
    assert origin.accept_headers[0] == "application/dicom+json, application/json"


def _bulk_values(ds: Dataset, obj: dict[str, Any], prefix: str = "") -> list[tuple[str, bytes]]:
    found: list[tuple[str, bytes]] = []
    for key, attribute in obj.items():
        elem = ds[int(key, 16)]
        if "BulkDataURI" in attribute:
            found.append((prefix + key, bytes(elem.value)))
        elif attribute["vr"] == "SQ":
            for index, item in enumerate(attribute.get("Value", [])):
                found += _bulk_values(elem.value[index], item, f"{prefix}{key}/{index}/")
    return found


@pytest.fixture(scope="module")
def odd(ct: Dataset) -> Dataset:
    """The CT with the values F.2 has special rules for, as a new instance of its series."""
    ds = copy.deepcopy(ct)
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.ImageType = ["ORIGINAL", "", "AXIAL"]
    ds.PixelSpacing = ["0.5", ""]
    ds.add_new(0x00081060, "PN", ["de Boer^Pieter", "", "=Visser"])
    ds.add_new(0x00081070, "PN", "Müller^Jürgen==")
    ds.SeriesNumber = None
    ds.StudyDescription = ""
    ds.ReferencedSeriesSequence = DicomSequence([])
    ds.ReferencedStudySequence = DicomSequence([Dataset()])
    ds.add_new(0x00290010, "LO", "ACME 1.0")
    ds.add_new(0x00291001, "OB", b"\x00\x01\x02\x03")
    ds.add_new(0x00291002, "OB", b"\x00\x01" * 2000)
    ds.FrameIncrementPointer = [0x00181063, 0x00181065]
    ds.SelectorSVValue = [-(2**62), 12]
    ds.ImagePositionPatient = ["-125.5", "0", "1e2"]
    ds.SmallestImagePixelValue = 0
    return ds


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory, ct_study: GeneratedStudy,
            odd: Dataset) -> Iterator[Orthanc]:
    with dicomweb_orthanc(tmp_path_factory.mktemp("orthanc"), [*ct_study.instances, odd]) as peer:
        yield peer


def _orthanc_metadata(orthanc: Orthanc, ds: Dataset) -> tuple[dict[str, Any], dict[str, Any]]:
    """Orthanc's metadata of ``ds``, and ours with bulk data URIs made the way Orthanc makes them."""
    base = (f"http://{orthanc.host}:{orthanc.http_port}/dicom-web/studies/{ds.StudyInstanceUID}/series/"
            f"{ds.SeriesInstanceUID}/instances/{ds.SOPInstanceUID}")
    with urllib.request.urlopen(f"{base}/metadata", timeout=10) as answer:
        theirs: dict[str, Any] = json.loads(answer.read())[0]
    return theirs, to_dicom_json(ds, bulk_uri=lambda path: f"{base}/bulk/{path.lower()}")


def test_same_metadata_as_orthanc(orthanc: Orthanc, ct_study: GeneratedStudy) -> None:
    """Every instance of the study, the report's nested and empty sequences included, attribute for
    attribute and bulk data URI for bulk data URI."""
    for ds in ct_study.instances:
        theirs, ours = _orthanc_metadata(orthanc, ds)
        assert ours == theirs


def test_odd_values_against_orthanc(orthanc: Orthanc, odd: Dataset) -> None:
    """Orthanc (DCMTK 3.6.7) agrees on null for empty values among others, absent values, empty
    groups left out, AT, DS and US numbers. It differs where it is the odd one out: it writes an empty
    name among others as {} (F.2.5: null) with an empty Alphabetic group, drops a sequence holding one
    empty item and the 64-bit SV element, and sends every private binary value as bulk data."""
    theirs, ours = _orthanc_metadata(orthanc, odd)
    differing = {"00081060", "00081110", "00720082", "00291001"}
    assert {key: value for key, value in ours.items() if key not in differing} == \
        {key: value for key, value in theirs.items() if key not in differing}
    assert theirs["00081060"]["Value"] == [{"Alphabetic": "de Boer^Pieter"}, {},
                                           {"Alphabetic": "", "Ideographic": "Visser"}]
    assert ours["00081060"]["Value"] == [{"Alphabetic": "de Boer^Pieter"}, None, {"Ideographic": "Visser"}]
    assert "00081110" not in theirs and "00720082" not in theirs
    assert ours["00080008"] == {"vr": "CS", "Value": ["ORIGINAL", None, "AXIAL"]}
    assert ours["00291001"] == {"vr": "OB", "InlineBinary": "AAECAw=="}
