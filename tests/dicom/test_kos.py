from __future__ import annotations

import random
import zlib
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence

from duo_gateway.dicom.kos import (
    KOS_SOP_CLASS_UID,
    MAX_INFLATED_BYTES,
    InstanceRef,
    KosError,
    KosPatient,
    KosSeries,
    KosStudy,
    build_kos,
    encode_part10,
    kos_sop_instance_uid,
    parse_kos,
)

CT = "1.2.840.10008.5.1.4.1.1.2"
SR = "1.2.840.10008.5.1.4.1.1.88.11"
STUDY = KosStudy("1.2.3.100", "20240102", "103000", "A123", "42", "CT thorax", "Meijer^Lotte")
PATIENT = KosPatient("999911120", "Jansen^Anna", "NLMINBIZA", "2.16.840.1.113883.2.4.6.3", "19700312", "F")
REFS = [
    InstanceRef("1.2.3.100.1", CT, "1.2.3.100.1.1"),
    InstanceRef("1.2.3.100.1", CT, "1.2.3.100.1.2"),
    InstanceRef("1.2.3.100.2", CT, "1.2.3.100.2.1"),
    InstanceRef("1.2.3.100.9", SR, "1.2.3.100.9.1"),
]


def _round_trip(ds: Dataset) -> Dataset:
    return dcmread(BytesIO(encode_part10(ds)))


def test_kos_is_a_valid_part10_key_object_selection_document() -> None:
    ds = _round_trip(
        build_kos(
            REFS,
            STUDY,
            PATIENT,
            retrieve_ae_title="AMSTEL_PACS",
            retrieve_location_uid="2.16.528.1.1007.99.10001.1",
        )
    )
    assert ds.file_meta.MediaStorageSOPClassUID == KOS_SOP_CLASS_UID
    assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
    assert ds.SOPClassUID == "1.2.840.10008.5.1.4.1.1.88.59"
    assert ds.Modality == "KO"
    concept = ds.ConceptNameCodeSequence[0]
    assert (concept.CodeValue, concept.CodingSchemeDesignator, concept.CodeMeaning) == (
        "113030",
        "DCM",
        "Manifest",
    )
    assert ds.ValueType == "CONTAINER" and ds.ContinuityOfContent == "SEPARATE"
    assert ds.ContentTemplateSequence[0].TemplateIdentifier == "2010"
    assert ds.StudyInstanceUID == STUDY.study_instance_uid
    assert ds.PatientID == "999911120" and ds.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID
    assert ds.SeriesInstanceUID != STUDY.study_instance_uid
    for keyword in (
        "PatientName",
        "PatientBirthDate",
        "PatientSex",
        "StudyDate",
        "StudyTime",
        "AccessionNumber",
        "ReferringPhysicianName",
        "StudyID",
        "SeriesNumber",
        "InstanceNumber",
        "ContentDate",
        "ContentTime",
        "Manufacturer",
        "ReferencedPerformedProcedureStepSequence",
    ):
        assert keyword in ds, keyword


def test_kos_references_every_instance_in_evidence_and_content() -> None:
    ds = _round_trip(build_kos(REFS, STUDY, PATIENT, retrieve_location_uid="2.16.528.1.1007.99.10001.1"))
    [evidence] = ds.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == STUDY.study_instance_uid
    seen = set()
    for series in evidence.ReferencedSeriesSequence:
        assert series.RetrieveLocationUID == "2.16.528.1.1007.99.10001.1"
        for sop in series.ReferencedSOPSequence:
            seen.add(
                InstanceRef(series.SeriesInstanceUID, sop.ReferencedSOPClassUID, sop.ReferencedSOPInstanceUID)
            )
    assert seen == set(REFS)
    assert len(evidence.ReferencedSeriesSequence) == 3
    content = {(i.ReferencedSOPSequence[0].ReferencedSOPInstanceUID, i.ValueType) for i in ds.ContentSequence}
    assert content == {
        ("1.2.3.100.1.1", "IMAGE"),
        ("1.2.3.100.1.2", "IMAGE"),
        ("1.2.3.100.2.1", "IMAGE"),
        ("1.2.3.100.9.1", "COMPOSITE"),
    }
    assert all(i.RelationshipType == "CONTAINS" for i in ds.ContentSequence)


def test_sop_instance_uid_is_deterministic_and_order_independent() -> None:
    shuffled = REFS[:]
    random.Random(7).shuffle(shuffled)
    a = build_kos(REFS, STUDY, PATIENT)
    b = build_kos(
        [(r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in shuffled], STUDY, PATIENT
    )
    assert a.SOPInstanceUID == b.SOPInstanceUID == kos_sop_instance_uid(STUDY.study_instance_uid, REFS)
    assert encode_part10(a) == encode_part10(b)
    assert a.SOPInstanceUID.is_valid and len(a.SOPInstanceUID) <= 64
    # A different set of instances (a study that grew) is a different manifest.
    assert build_kos(REFS[:3], STUDY, PATIENT).SOPInstanceUID != a.SOPInstanceUID


def test_empty_manifest_is_refused() -> None:
    with pytest.raises(ValueError):
        build_kos([], STUDY, PATIENT)


# --- parse_kos: what build_kos and other vendors write ---------------------------------------------


def test_parse_kos_reads_what_build_kos_writes() -> None:
    ds = build_kos(REFS, STUDY, PATIENT, retrieve_ae_title="PACS_AE", retrieve_location_uid="1.2.3.999")
    manifest = parse_kos(encode_part10(ds))
    assert (manifest.study_instance_uid, manifest.patient_id, manifest.issuer_of_patient_id) == (
        "1.2.3.100", "999911120", "NLMINBIZA")
    assert manifest.sop_instance_uid == str(ds.SOPInstanceUID)
    assert manifest.instance_count == 4
    by_uid = {s.series_instance_uid: s for s in manifest.series}
    assert set(by_uid) == {"1.2.3.100.1", "1.2.3.100.2", "1.2.3.100.9"}
    assert by_uid["1.2.3.100.1"] == KosSeries("1.2.3.100.1", "1.2.3.999", "PACS_AE",
                                              ((CT, "1.2.3.100.1.1"), (CT, "1.2.3.100.1.2")))
    assert by_uid["1.2.3.100.9"].sop_instance_uids == ("1.2.3.100.9.1",)


def test_parse_kos_without_retrieve_information() -> None:
    manifest = parse_kos(encode_part10(build_kos(REFS, STUDY, PATIENT)))
    assert {(s.retrieve_location_uid, s.retrieve_ae_title) for s in manifest.series} == {(None, None)}


def _vendor_kos() -> bytes:
    """A manifest shaped the way other sources write them: no preamble, split and foreign evidence.

    Two evidence items for the same study (the same series split over both, one instance repeated),
    the location on the instance items instead of the series, a multi-valued AE title, and a
    reference to a prior study that is not this manifest's.
    """
    def series(uid: str, sops: list[tuple[str, str]], **kw: str | list[str]) -> Dataset:
        item = Dataset()
        item.SeriesInstanceUID = uid
        for key, value in kw.items():
            setattr(item, key, value)
        refs = []
        for cls, inst in sops:
            sop = Dataset()
            sop.ReferencedSOPClassUID = cls
            sop.ReferencedSOPInstanceUID = inst
            sop.RetrieveLocationUID = "1.2.3.777"
            refs.append(sop)
        item.ReferencedSOPSequence = DicomSequence(refs)
        return item

    def study(uid: str, items: list[Dataset]) -> Dataset:
        st = Dataset()
        st.StudyInstanceUID = uid
        st.ReferencedSeriesSequence = DicomSequence(items)
        return st

    ds = build_kos(REFS, STUDY, PATIENT)
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([
        study("1.2.3.100", [series("1.2.3.100.1", [(CT, "1.2.3.100.1.1")],
                                   RetrieveAETitle=["AE_ONE", "AE_TWO"])]),
        study("1.2.3.50", [series("1.2.3.50.1", [(CT, "1.2.3.50.1.1")])]),
        study("1.2.3.100", [series("1.2.3.100.1", [(CT, "1.2.3.100.1.2"), (CT, "1.2.3.100.1.1")])]),
    ])
    del ds.file_meta  # a bare dataset: no preamble, no File Meta Information
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=False, little_endian=True, implicit_vr=True)
    return buf.getvalue()


def test_parse_kos_reads_other_vendors_shapes() -> None:
    data = _vendor_kos()
    assert data[128:132] != b"DICM"  # no preamble
    manifest = parse_kos(data)
    assert manifest.study_instance_uid == "1.2.3.100"
    assert manifest.series == (KosSeries("1.2.3.100.1", "1.2.3.777", "AE_ONE",
                                         ((CT, "1.2.3.100.1.1"), (CT, "1.2.3.100.1.2"))),)


@pytest.mark.parametrize(("data", "match"), [
    (b"", "Evidence|readable"),
    (b"\x00" * 128 + b"DICM" + b"\xff" * 40, "readable|Evidence"),
    (b"not dicom at all, just some text", "readable|Evidence"),
])
def test_parse_kos_refuses_garbage(data: bytes, match: str) -> None:
    with pytest.raises(KosError, match=match):
        parse_kos(data)


def test_parse_kos_refuses_other_sop_classes_and_empty_evidence() -> None:
    ds = build_kos(REFS, STUDY, PATIENT)
    ds.SOPClassUID = CT
    with pytest.raises(KosError, match="not Key Object Selection"):
        parse_kos(encode_part10(ds))
    ds = build_kos(REFS, STUDY, PATIENT)
    del ds.CurrentRequestedProcedureEvidenceSequence
    with pytest.raises(KosError, match="Evidence"):
        parse_kos(encode_part10(ds))


# --- parse_kos: every encoding, against pydicom as the reference reader ------------------------------


def _pydicom_reading(data: bytes) -> tuple[str, str, str, str | None, tuple[KosSeries, ...]]:
    """What pydicom's dcmread makes of a manifest, read the way parse_kos reads one (own study only,
    series merged, locations from the series else the first instance): the oracle for the walker."""
    ds = dcmread(BytesIO(data), force=True)
    merged: dict[str, tuple[str | None, str | None, dict[str, str]]] = {}
    for item in ds.CurrentRequestedProcedureEvidenceSequence:
        if item.StudyInstanceUID != ds.StudyInstanceUID:
            continue
        for series in item.ReferencedSeriesSequence:
            location = series.get("RetrieveLocationUID")
            ae = series.get("RetrieveAETitle")
            known_location, known_ae, instances = merged.setdefault(str(series.SeriesInstanceUID),
                                                                    (None, None, {}))
            for sop in series.ReferencedSOPSequence:
                instances.setdefault(str(sop.ReferencedSOPInstanceUID), str(sop.ReferencedSOPClassUID))
                location = location or sop.get("RetrieveLocationUID")
                ae = ae or sop.get("RetrieveAETitle")
            merged[str(series.SeriesInstanceUID)] = (known_location or (str(location) if location else None),
                                                     known_ae or (str(ae) if ae else None), instances)
    series_list = tuple(KosSeries(uid, loc, ae, tuple((c, i) for i, c in inst.items()))
                        for uid, (loc, ae, inst) in merged.items())
    return (str(ds.SOPInstanceUID), str(ds.StudyInstanceUID), str(ds.PatientID),
            str(ds.IssuerOfPatientID) if "IssuerOfPatientID" in ds else None, series_list)


def _many_refs(n: int) -> list[InstanceRef]:
    rng = random.Random(n)
    return [InstanceRef(f"1.2.3.100.{rng.randrange(1, 6)}", rng.choice([CT, SR]), f"1.2.3.100.7.{i}")
            for i in range(n)]


def _undefined_lengths(ds: Dataset) -> None:
    """Every sequence and item of undefined length, as many archives write them."""
    for elem in ds:
        if elem.VR == "SQ":
            elem.is_undefined_length = True
            for item in elem.value:
                item.is_undefined_length_sequence_item = True
                _undefined_lengths(item)


@pytest.mark.parametrize("syntax", ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2", "1.2.840.10008.1.2.2",
                                    "1.2.840.10008.1.2.1.99"])
@pytest.mark.parametrize("undefined", [False, True])
def test_parse_kos_reads_every_uncompressed_syntax_and_length_form_as_pydicom_does(
        syntax: str, undefined: bool) -> None:
    ds = build_kos(_many_refs(60), STUDY, PATIENT, retrieve_ae_title="PACS_AE", retrieve_location_uid="1.2.9")
    ds.file_meta.TransferSyntaxUID = syntax
    if undefined:
        _undefined_lengths(ds)
    data = encode_part10(ds)
    assert (b"\xff\xff\xff\xff" in data) is undefined or syntax.endswith(".99")
    manifest = parse_kos(data)
    assert (manifest.sop_instance_uid, manifest.study_instance_uid, manifest.patient_id,
            manifest.issuer_of_patient_id, manifest.series) == _pydicom_reading(data)
    assert manifest.instance_count == 60


def test_parse_kos_decodes_the_patient_id_in_the_specific_character_set() -> None:
    ds = build_kos(REFS, STUDY, KosPatient("Zoë-0042", issuer_of_patient_id="ZIEKENHUIS Ü"))
    ds.SpecificCharacterSet = "ISO_IR 100"
    manifest = parse_kos(encode_part10(ds))
    assert (manifest.patient_id, manifest.issuer_of_patient_id) == ("Zoë-0042", "ZIEKENHUIS Ü")


def test_parse_kos_skips_the_content_tree_and_whatever_follows_the_evidence() -> None:
    """Only the evidence is read: garbage in the content tree after it changes nothing."""
    data = encode_part10(build_kos(REFS, STUDY, PATIENT))
    content = data.index(b"\x40\x00\x30\xa7")  # (0040,A730) ContentSequence, little endian
    spoiled = data[:content] + b"\x40\x00\x30\xa7SQ\x00\x00\xff\xff\xff\xff" + b"\x13" * 100
    assert parse_kos(spoiled).series == parse_kos(data).series


@pytest.mark.parametrize("cut", [0.3, 0.6, 0.9])
def test_parse_kos_refuses_a_truncated_manifest(cut: float) -> None:
    ds = build_kos(_many_refs(40), STUDY, PATIENT)
    del ds.ContentSequence  # so the cut falls inside the evidence
    data = encode_part10(ds)
    with pytest.raises(KosError, match="readable"):
        parse_kos(data[:int(len(data) * cut)])


def test_parse_kos_refuses_nesting_beyond_reason_and_a_deflate_bomb() -> None:
    # Implicit VR LE: the evidence, then sequences in items 40 deep, all of undefined length.
    undefined = b"\xff\xff\xff\xff"
    nested = (b"\x40\x00\x75\xa3" + undefined
              + (b"\xfe\xff\x00\xe0" + undefined + b"\x08\x00\x15\x11" + undefined) * 40)
    with pytest.raises(KosError, match="nested too deep"):
        parse_kos(nested + b"\xfe\xff\xdd\xe0\x00\x00\x00\x00" * 80)
    ds = build_kos(REFS, STUDY, PATIENT)
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.1.99"
    data = encode_part10(ds)
    meta_end = 144 + int.from_bytes(data[140:144], "little")  # FileMetaInformationGroupLength
    bomb = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    payload = bomb.compress(bytes(MAX_INFLATED_BYTES + 1024)) + bomb.flush()
    with pytest.raises(KosError, match="inflates to more than"):
        parse_kos(data[:meta_end] + payload)
