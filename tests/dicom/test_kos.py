from __future__ import annotations

import random
from io import BytesIO

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.dicom.kos import (
    KOS_SOP_CLASS_UID,
    InstanceRef,
    KosPatient,
    KosStudy,
    build_kos,
    encode_part10,
    kos_sop_instance_uid,
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
