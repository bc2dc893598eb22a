from __future__ import annotations

import re
from dataclasses import replace
from io import BytesIO
from pathlib import Path

import pytest
from lxml import etree
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import UID

from duo_gateway.config.xca import CodeConfig, DocumentCodes
from duo_gateway.dicom.kos import encode_part10
from duo_gateway.sim.config import default_network
from duo_gateway.sim.xca import XcaCommunitySimulator, instance_record, study_record
from duo_gateway.sources.base import InstanceRecord, StudyRecord
from duo_gateway.xca import AdhocQueryResponse, ResponseStatus, build_adhoc_query_response
from duo_gateway.xca.codes import EntryStatus, EntryType
from duo_gateway.xca.ebrim import DocumentEntry, MetadataError, build_extrinsic_object
from duo_gateway.xca.entry_ids import document_entry_uuid
from duo_gateway.xca.hl7 import Code, Xon
from duo_gateway.xca.metadata import (
    BASIC_TEXT_SR,
    COMPREHENSIVE_SR,
    ENCAPSULATED_PDF,
    ENHANCED_SR,
    REPORT_SOP_CLASSES,
    dicom_dtm,
    is_report,
    kos_for_study,
    kos_unique_id,
    report_entry,
    study_entry,
)
from duo_gateway.xca.query import parse_adhoc_query_response
from tests.xca.xsd import assert_valid

BSN = "999911120"
URA = "00010990"
NAME = "Ziekenhuis st. Jansdal"
REPO = "2.999.1.7"
HOME = "urn:oid:2.999.1"
STUDY_UID = "1.2.826.0.1.3680043.8.498.10001"
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
PRESENTATION_STATE = "1.2.840.10008.5.1.4.1.1.11.1"
KOS_CLASS = "1.2.840.10008.5.1.4.1.1.88.59"
VALID_UID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")
CODES = DocumentCodes()
WHERE = {"bsn": BSN, "hospital_ura": URA, "hospital_name": NAME, "repository_unique_id": REPO, "home": HOME}

STUDY = StudyRecord(
    study_instance_uid=STUDY_UID,
    patient_id=BSN,
    study_date="20240301",
    study_time="093015.123456",
    accession_number="A0099240001",
    description="CT thorax met contrast",
    modalities=("CT", "SR"),
    body_part="CHEST",
    study_id="4711",
    patient_name="Jansen^Anna",
    patient_birth_date="19700101",
    patient_sex="F",
    institution_name=NAME,
    referring_physician="Meijer^Lotte",
)


def _instance(series: str, number: int, sop_class: str = CT_IMAGE) -> InstanceRecord:
    series_uid = f"{STUDY_UID}.{series}"
    return InstanceRecord(STUDY_UID, series_uid, sop_class, f"{series_uid}.{number}")


def _report(sop_class: str = BASIC_TEXT_SR, *, mime_type: str | None = None,
            title: str | None = None) -> InstanceRecord:
    return replace(_instance("9", 1, sop_class), content_date="20240301", content_time="110000",
                   mime_type=mime_type, title=title)


def _kos_entry(study: StudyRecord = STUDY, codes: DocumentCodes = CODES) -> DocumentEntry:
    return study_entry(study, codes=codes, **WHERE)


def _report_entry(report: InstanceRecord, study: StudyRecord = STUDY) -> DocumentEntry:
    return report_entry(report, study, codes=CODES, **WHERE)


# --- the KOS entry ---


def test_study_entry_field_by_field() -> None:
    e = _kos_entry()
    assert e.entry_uuid == document_entry_uuid(e.unique_id, HOME)
    assert e.unique_id == kos_unique_id(STUDY_UID, REPO)
    assert e.patient_id == e.source_patient_id == "999911120^^^&2.16.840.1.113883.2.4.6.3&ISO"
    assert e.mime_type == "application/dicom"
    assert (e.repository_unique_id, e.home) == (REPO, HOME)
    assert e.title == "CT thorax met contrast"
    assert (e.status, e.object_type) == (EntryStatus.APPROVED, EntryType.STABLE)
    assert e.format_code == Code(KOS_CLASS, "1.2.840.10008.2.6.1", "Key Object Selection Document")
    assert e.class_code == Code("363679005", "2.16.840.1.113883.6.96", "Imaging")
    assert e.type_code == Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    assert e.practice_setting_code == Code("394914008", "2.16.840.1.113883.6.96", "Radiology")
    assert e.healthcare_facility_type_code == Code("22232009", "2.16.840.1.113883.6.96", "Hospital")
    assert e.confidentiality_codes == (Code("N", "2.16.840.1.113883.5.25", "normal"),)
    assert e.event_codes == (
        Code("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),
        Code("43799004", "2.16.840.1.113883.6.96", "Chest"),
    )
    assert e.service_start_time == e.creation_time == "20240301093015"  # fraction dropped
    assert e.service_stop_time is None
    assert e.reference_ids == (f"{STUDY_UID}^^^^urn:ihe:iti:xds:2016:studyInstanceUID",)
    assert e.language_code == "nl-NL"
    assert (e.size, e.hash) == (None, None)  # the on-demand KOS does not exist yet
    [author] = e.authors
    assert [str(x) for x in author.institutions] == [
        "Ziekenhuis st. Jansdal^^^^^&2.16.528.1.1007.3.3&ISO^^^^00010990"
    ]
    assert e.author_uras == {URA}


def test_codes_come_from_the_hospital_config() -> None:
    codes = DocumentCodes(
        kos_class=CodeConfig(code="X1", scheme="2.999.5", display="Own class"),
        confidentiality=CodeConfig(code="R", scheme="2.16.840.1.113883.5.25", display="restricted"),
        language="en-GB",
    )
    e = _kos_entry(codes=codes)
    assert e.class_code == Code("X1", "2.999.5", "Own class")
    assert e.confidentiality_codes == (Code("R", "2.16.840.1.113883.5.25", "restricted"),)
    assert e.language_code == "en-GB"


@pytest.mark.parametrize(
    ("da", "tm", "dtm"),
    [
        ("20240301", "093015.123456", "20240301093015"),
        ("20240301", "093015", "20240301093015"),
        ("20240301", "0930", "202403010930"),
        ("20240301", "09", "2024030109"),
        ("2024.03.01", "09:30:15", "20240301093015"),  # ACR-NEMA forms
        ("20240301", None, "20240301"),
        ("20240301", "", "20240301"),
        ("20240301", "2530", "20240301"),  # not a time: date only, never a guess
        ("20240301", "09301", "20240301"),
        ("20240231", "093015", None),  # not a date
        ("2024", "093015", None),
        (None, "093015", None),
    ],
)
def test_dicom_dtm(da: str | None, tm: str | None, dtm: str | None) -> None:
    assert dicom_dtm(da, tm) == dtm


def test_study_without_time_has_a_date_only_dtm() -> None:
    e = _kos_entry(replace(STUDY, study_time=None))
    assert e.service_start_time == e.creation_time == "20240301"


def test_study_without_date_has_no_times() -> None:
    e = _kos_entry(replace(STUDY, study_date=None))
    assert e.service_start_time is None and e.creation_time is None


def test_non_acquisition_modalities_are_not_event_codes() -> None:
    study = replace(STUDY, modalities=("SR", "KO", "ct", " MR ", "PR", "DOC", "CT", "OCT"), body_part=None)
    assert _kos_entry(study).event_codes == (
        Code("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),
        Code("MR", "1.2.840.10008.2.16.4", "Magnetic Resonance"),
        Code("OCT", "1.2.840.10008.2.16.4", "OCT"),  # no display known: the code stands for itself
    )


def test_unknown_body_part_is_left_out() -> None:
    assert _kos_entry(replace(STUDY, body_part="ELBOWISH")).event_codes == (
        Code("CT", "1.2.840.10008.2.16.4", "Computed Tomography"),
    )
    assert _kos_entry(replace(STUDY, body_part="lspine")).event_codes[-1] == Code(
        "122496007", "2.16.840.1.113883.6.96", "Lumbar spine"
    )


def test_title_falls_back_to_modalities_and_date() -> None:
    untitled = replace(STUDY, description=None, modalities=("CT", "MR", "SR"))
    assert _kos_entry(untitled).title == "CT MR 01-03-2024"
    assert _kos_entry(replace(STUDY, description="  ")).title == "CT 01-03-2024"
    bare = replace(STUDY, description=None, modalities=(), study_date=None)
    assert _kos_entry(bare).title == "Beeldvormend onderzoek"


def test_xon_pads_the_ura_and_refuses_what_is_not_one() -> None:
    e = study_entry(STUDY, codes=CODES, **{**WHERE, "hospital_ura": "10990"})
    assert e.author_uras == {URA}
    assert str(e.authors[0].institutions[0]).endswith("^^^^00010990")
    with pytest.raises(MetadataError):
        study_entry(STUDY, codes=CODES, **{**WHERE, "hospital_ura": "URA-1"})


def test_invalid_bsn_is_refused_without_echoing_it() -> None:
    with pytest.raises(MetadataError) as exc:
        study_entry(STUDY, codes=CODES, **{**WHERE, "bsn": "999911121"})
    assert "999911121" not in str(exc.value)


def test_bare_and_urn_home_give_the_same_entry() -> None:
    assert study_entry(STUDY, codes=CODES, **{**WHERE, "home": "2.999.1"}) == _kos_entry()


def test_entries_are_deterministic() -> None:
    a, b = _kos_entry(), _kos_entry(replace(STUDY))
    assert a == b
    assert etree.tostring(build_extrinsic_object(a)) == etree.tostring(build_extrinsic_object(b))
    other_home = study_entry(STUDY, codes=CODES, **{**WHERE, "home": "urn:oid:2.999.2"})
    assert other_home.entry_uuid != a.entry_uuid and other_home.unique_id == a.unique_id


# --- kos_unique_id ---


def test_kos_unique_id_is_a_valid_stable_uid() -> None:
    uid = kos_unique_id(STUDY_UID, REPO)
    assert uid.startswith("2.25.") and len(uid) <= 64 and VALID_UID.match(uid)
    assert UID(uid).is_valid
    assert kos_unique_id(STUDY_UID, REPO) == uid
    assert kos_unique_id(STUDY_UID, "2.999.1.8") != uid  # a copy at another hospital is another KOS
    assert kos_unique_id(STUDY_UID + "1", REPO) != uid
    with pytest.raises(ValueError):
        kos_unique_id("", REPO)


def test_kos_unique_id_is_pinned() -> None:
    """Changing the derivation orphans every KOS entry a consumer still holds: it must be deliberate."""
    assert kos_unique_id("1.2.3", "2.999.1.7") == "2.25.46084802040474087023851309979274547499"


# --- report entries ---


@pytest.mark.parametrize(
    ("sop_class", "display"),
    [(BASIC_TEXT_SR, "Basic Text SR"), (ENHANCED_SR, "Enhanced SR"), (COMPREHENSIVE_SR, "Comprehensive SR")],
)
def test_sr_report_entry(sop_class: str, display: str) -> None:
    report = _report(sop_class)
    e = _report_entry(report)
    assert e.mime_type == "application/dicom"
    assert e.format_code == Code(sop_class, "1.2.840.10008.2.6.1", display)
    assert e.unique_id == report.sop_instance_uid
    assert e.entry_uuid == document_entry_uuid(report.sop_instance_uid, HOME)
    assert e.class_code == Code("9491000146107", "2.16.840.1.113883.6.96", "Imaging Documentation")
    assert e.type_code == Code("722124004", "2.16.840.1.113883.6.96", "Radiologisch verslag")
    # Linked to the study's KOS entry, and found by the same filters.
    kos = _kos_entry()
    assert e.reference_ids == kos.reference_ids
    assert e.event_codes == kos.event_codes and e.service_start_time == kos.service_start_time
    assert e.authors == kos.authors and e.patient_id == kos.patient_id
    assert e.repository_unique_id == REPO and e.home == HOME
    assert e.title == "Radiologisch verslag: CT thorax met contrast"
    assert e.creation_time == "20240301110000"
    assert (e.size, e.hash) == (None, None)


def test_pdf_report_entry() -> None:
    report = _report(ENCAPSULATED_PDF, mime_type="application/pdf", title="Verslag CT thorax")
    e = _report_entry(report)
    assert e.mime_type == "application/pdf"
    assert e.format_code == Code("urn:ihe:rad:PDF", "1.3.6.1.4.1.19376.1.2.3", "PDF")
    assert e.title == "Verslag CT thorax"
    assert e.unique_id == report.sop_instance_uid


def test_report_title_and_creation_fallbacks() -> None:
    untimed = replace(_report(), content_date=None, content_time=None)
    e = _report_entry(untimed, replace(STUDY, description=None))
    assert e.title == "Radiologisch verslag"
    assert e.creation_time == "20240301093015"  # the study's time, the best lower bound


def test_report_sop_classes_and_refusals() -> None:
    assert REPORT_SOP_CLASSES == {BASIC_TEXT_SR, ENHANCED_SR, COMPREHENSIVE_SR, ENCAPSULATED_PDF}
    assert is_report(_report()) and is_report(_report(ENCAPSULATED_PDF))
    assert not is_report(_instance("1", 1)) and not is_report(_instance("8", 1, KOS_CLASS))
    with pytest.raises(ValueError, match="not a report"):
        _report_entry(_instance("1", 1))
    with pytest.raises(ValueError, match="another study"):
        _report_entry(replace(_report(), study_instance_uid="1.2.3"))


# --- the KOS object ---

IMAGES = [_instance("1", 1), _instance("1", 2), _instance("2", 1)]
PR = _instance("3", 1, PRESENTATION_STATE)


def _kos_roundtrip(instances: list[InstanceRecord], **kw: str) -> Dataset:
    ds = kos_for_study(STUDY, instances, bsn=BSN, repository_unique_id=REPO, **kw)
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return dcmread(BytesIO(buf.getvalue()))


def _references(kos: Dataset) -> dict[str, str]:
    """SOP Instance UID -> content item value type, checked against the evidence sequence."""
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    assert evidence.StudyInstanceUID == STUDY_UID
    in_evidence = set(_sop_uids(kos))
    items = {
        item.ReferencedSOPSequence[0].ReferencedSOPInstanceUID: item.ValueType
        for item in kos.ContentSequence
    }
    assert set(items) == in_evidence
    return items


def test_kos_for_study_roundtrips_and_is_what_iti38_announced() -> None:
    stale_kos = InstanceRecord(STUDY_UID, f"{STUDY_UID}.8", KOS_CLASS, kos_unique_id(STUDY_UID, REPO))
    kos = _kos_roundtrip([*IMAGES, PR, _report(), stale_kos], retrieve_ae_title="PACS1")
    entry = _kos_entry()
    assert kos.SOPInstanceUID == entry.unique_id
    assert kos.file_meta.MediaStorageSOPInstanceUID == entry.unique_id
    assert kos.SOPClassUID == KOS_CLASS
    # Every image as IMAGE, the presentation state as COMPOSITE; the report is its own entry and the
    # manifest never references itself.
    assert _references(kos) == {
        **{i.sop_instance_uid: "IMAGE" for i in IMAGES}, PR.sop_instance_uid: "COMPOSITE",
    }
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    assert {s.RetrieveLocationUID for s in evidence.ReferencedSeriesSequence} == {REPO}
    assert {s.RetrieveAETitle for s in evidence.ReferencedSeriesSequence} == {"PACS1"}
    assert kos.PatientID == BSN
    assert kos.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == "2.16.840.1.113883.2.4.6.3"
    assert kos.InstitutionName == NAME
    # The manifest's content time is the study's, which the entry announced as creationTime.
    assert (kos.ContentDate, kos.ContentTime) == ("20240301", "093015.123456")


def test_kos_uid_does_not_follow_the_instance_list_but_content_does() -> None:
    small = kos_for_study(STUDY, IMAGES[:1], bsn=BSN, repository_unique_id=REPO)
    full = kos_for_study(STUDY, IMAGES, bsn=BSN, repository_unique_id=REPO)
    again = kos_for_study(STUDY, list(reversed(IMAGES)), bsn=BSN, repository_unique_id=REPO)
    assert small.SOPInstanceUID == full.SOPInstanceUID == kos_unique_id(STUDY_UID, REPO)
    assert encode_part10(full) == encode_part10(again)  # deterministic, order-independent
    assert encode_part10(small) != encode_part10(full)


def test_kos_for_study_refusals() -> None:
    with pytest.raises(ValueError, match="another study"):
        kos_for_study(STUDY, [*IMAGES, replace(IMAGES[0], study_instance_uid="1.2.3")], bsn=BSN,
                      repository_unique_id=REPO)
    with pytest.raises(ValueError):
        kos_for_study(STUDY, [_report()], bsn=BSN, repository_unique_id=REPO)
    with pytest.raises(MetadataError):
        kos_for_study(STUDY, IMAGES, bsn="123456789", repository_unique_id=REPO)


# --- wire validity ---


def _all_entries() -> list[DocumentEntry]:
    return [
        _kos_entry(),
        _kos_entry(replace(STUDY, study_instance_uid=STUDY_UID + "2", study_time=None, description=None)),
        _kos_entry(replace(STUDY, study_instance_uid=STUDY_UID + "3", study_date=None, modalities=(),
                           body_part=None)),
        _report_entry(_report()),
        _report_entry(replace(_report(ENCAPSULATED_PDF, mime_type="application/pdf"),
                              sop_instance_uid=STUDY_UID + ".9.2")),
        _report_entry(replace(_report(COMPREHENSIVE_SR), sop_instance_uid=STUDY_UID + ".9.3")),
    ]


def test_every_entry_validates_and_roundtrips(wsdl_dir: Path) -> None:
    entries = _all_entries()
    body = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, tuple(entries)))
    assert_valid(wsdl_dir, body)
    assert parse_adhoc_query_response(body).entries == entries


def test_xon_parses_back() -> None:
    [author] = _kos_entry().authors
    assert Xon.parse(str(author.institutions[0])) == Xon(NAME, URA)


# --- the simulator uses this mapping ---


def test_sim_serves_exactly_this_mapping() -> None:
    net = default_network()
    community = net.communities[0]
    sim = XcaCommunitySimulator(community, net)
    by_unique_id = {d.entry.unique_id: d for d in sim.documents}
    assert len(by_unique_id) == len(sim.documents)
    reports = 0
    for patient, institution, study in sim.studies:
        record = study_record(patient, study)
        where = {"bsn": patient.bsn, "hospital_ura": institution.ura, "hospital_name": institution.name,
                 "repository_unique_id": community.repository_unique_id, "home": community.home_community_id}
        kos_entry = study_entry(record, codes=DocumentCodes(), **where)
        served = by_unique_id[kos_entry.unique_id]
        assert served.entry == kos_entry
        kos = dcmread(BytesIO(served.data))
        assert kos.SOPInstanceUID == kos_entry.unique_id
        images = {str(ds.SOPInstanceUID) for ds in study.instances if not is_report(instance_record(ds))}
        assert set(_sop_uids(kos)) == images
        for ds in study.instances:
            inst = instance_record(ds)
            if is_report(inst):
                reports += 1
                assert by_unique_id[inst.sop_instance_uid].entry == report_entry(
                    inst, record, codes=DocumentCodes(), **where
                )
    assert reports > 0


def _sop_uids(kos: Dataset) -> list[str]:
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    return [str(sop.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence
            for sop in s.ReferencedSOPSequence]


def test_one_study_at_two_hospitals_gives_two_distinct_entries() -> None:
    """A study copied to a second hospital's PACS must not collide in one ITI-38 answer."""
    first = study_entry(STUDY, codes=CODES, **WHERE)
    second = study_entry(STUDY, codes=CODES, **{**WHERE, "repository_unique_id": "2.999.77.1",
                                                "hospital_ura": "00010099"})
    assert first.unique_id != second.unique_id
    assert first.entry_uuid != second.entry_uuid
