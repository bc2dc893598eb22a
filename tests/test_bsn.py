"""The BSN rules: the 11-proef, and where a DICOM record carries the BSN, on the record shapes real
PACSes send. ``SHAPES`` is shared with tests/sources, which checks that every consumer of the rule (the
query path and the Mitz subscription sync) reads each shape the same way through a PACS."""

from __future__ import annotations

from dataclasses import dataclass

import pytest
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset
from pydicom.sequence import Sequence as DicomSequence

from duo_gateway.bsn import (
    BSN_OID,
    BsnAttribute,
    bsn_cx,
    bsn_of,
    bsn_query,
    bsns_in,
    is_bsn_entity,
    is_bsn_issuer,
    is_valid_bsn,
    names_bsn,
    names_other_patient,
    reading_key,
)

ANNA = "999911120"
BRAM = "900186021"
CARLA = "123456782"
#: A hospital's own number that happens to pass the 11-proef (one nine-digit number in eleven does).
LOCAL_ELEVEN = "111222333"
#: Bram's BSN with its last digit mistyped: fails the 11-proef.
TYPO = "900186022"
LOCAL_ISSUER = "LOCALHIS"
HOSPITAL_OID = "2.16.528.1.1007.99.10001"
HD = f"NLMINBIZA&{BSN_OID}&ISO"


def _label(ds: Dataset, issuer: str | None, entity: str | None, entity_type: str | None) -> Dataset:
    if issuer is not None:
        ds.IssuerOfPatientID = issuer
    if entity is not None:
        qualifier = Dataset()
        qualifier.UniversalEntityID = entity
        if entity_type is not None:
            qualifier.UniversalEntityIDType = entity_type
        ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifier])
    return ds


def pid(value: str, issuer: str | None = None, entity: str | None = None,
        entity_type: str | None = None) -> Dataset:
    """A record whose PatientID is ``value``."""
    ds = Dataset()
    ds.PatientID = value
    return _label(ds, issuer, entity, entity_type)


def item(value: str, issuer: str | None = None, entity: str | None = None,
         entity_type: str | None = None) -> Dataset:
    """One OtherPatientIDsSequence item."""
    ds = Dataset()
    ds.PatientID = value
    ds.TypeOfPatientID = "TEXT"
    return _label(ds, issuer, entity, entity_type)


def others(*items: Dataset, patient_id: str = "MRN-0042", issuer: str | None = LOCAL_ISSUER) -> Dataset:
    """A record with the hospital's own number in PatientID and ``items`` as OtherPatientIDsSequence."""
    ds = pid(patient_id, issuer)
    ds.OtherPatientIDsSequence = DicomSequence(list(items))
    return ds


@dataclass(frozen=True)
class Shape:
    id: str
    attribute: BsnAttribute
    record: Dataset
    #: The one patient the record is, or None when it is nobody's.
    patient: str | None


SHAPES = [
    # -- the hospital keeps the BSN in PatientID -----------------------------------------------------
    Shape("pid-no-issuer", "PatientID", pid(ANNA), ANNA),  # the configuration is the label
    Shape("pid-NLMINBIZA", "PatientID", pid(ANNA, "NLMINBIZA"), ANNA),
    Shape("pid-BSN", "PatientID", pid(ANNA, "BSN"), ANNA),
    Shape("pid-oid", "PatientID", pid(ANNA, BSN_OID), ANNA),
    Shape("pid-urn-oid", "PatientID", pid(ANNA, f"urn:oid:{BSN_OID}"), ANNA),
    Shape("pid-hl7-hd", "PatientID", pid(ANNA, HD), ANNA),
    Shape("pid-qualifiers-only", "PatientID", pid(ANNA, entity=BSN_OID, entity_type="ISO"), ANNA),
    Shape("pid-qualifiers-urn", "PatientID", pid(ANNA, entity=f"urn:oid:{BSN_OID}"), ANNA),
    Shape("pid-issuer-and-qualifiers", "PatientID", pid(ANNA, "NLMINBIZA", BSN_OID, "ISO"), ANNA),
    Shape("pid-local-issuer-eleven", "PatientID", pid(LOCAL_ELEVEN, LOCAL_ISSUER), None),
    Shape("pid-local-issuer-qualifier", "PatientID", pid(LOCAL_ELEVEN, entity=HOSPITAL_OID), None),
    Shape("pid-labels-disagree", "PatientID", pid(ANNA, "NLMINBIZA", HOSPITAL_OID, "ISO"), None),
    Shape("pid-entity-type-not-oid", "PatientID", pid(ANNA, entity=BSN_OID, entity_type="DNS"), None),
    Shape("pid-hl7-hd-other-oid", "PatientID", pid(ANNA, f"NLMINBIZA&{HOSPITAL_OID}&ISO"), None),
    Shape("pid-invalid-bsn", "PatientID", pid(TYPO, "NLMINBIZA"), None),
    Shape("pid-hospital-number", "PatientID", pid("MRN-0042", LOCAL_ISSUER), None),
    Shape("pid-empty", "PatientID", pid(""), None),
    # -- the hospital keeps the BSN in an OtherPatientIDsSequence item ------------------------------
    Shape("seq-NLMINBIZA", "OtherPatientIDsSequence", others(item(ANNA, "NLMINBIZA")), ANNA),
    Shape("seq-BSN", "OtherPatientIDsSequence", others(item(ANNA, "BSN")), ANNA),
    Shape("seq-oid", "OtherPatientIDsSequence", others(item(ANNA, BSN_OID)), ANNA),
    Shape("seq-urn-oid", "OtherPatientIDsSequence", others(item(ANNA, f"urn:oid:{BSN_OID}")), ANNA),
    Shape("seq-hl7-hd", "OtherPatientIDsSequence", others(item(ANNA, HD)), ANNA),
    Shape("seq-qualifiers-only", "OtherPatientIDsSequence",
          others(item(ANNA, "", BSN_OID, "ISO")), ANNA),
    Shape("seq-qualifiers-urn", "OtherPatientIDsSequence",
          others(item(ANNA, entity=f"urn:oid:{BSN_OID}")), ANNA),
    Shape("seq-among-local-ids", "OtherPatientIDsSequence",
          others(item("MRN7", LOCAL_ISSUER), item(BRAM, "NLMINBIZA", BSN_OID, "ISO")), BRAM),
    Shape("seq-beside-unlabelled-eleven", "OtherPatientIDsSequence",
          others(item(LOCAL_ELEVEN), item(ANNA, "NLMINBIZA")), ANNA),
    Shape("seq-same-bsn-twice", "OtherPatientIDsSequence",
          others(item(ANNA, "NLMINBIZA"), item(ANNA, BSN_OID)), ANNA),
    Shape("seq-no-issuer", "OtherPatientIDsSequence", others(item(ANNA)), None),  # fail-closed
    Shape("seq-no-issuer-eleven", "OtherPatientIDsSequence", others(item(LOCAL_ELEVEN)), None),
    Shape("seq-local-issuer-eleven", "OtherPatientIDsSequence",
          others(item(LOCAL_ELEVEN, LOCAL_ISSUER)), None),
    Shape("seq-local-issuer", "OtherPatientIDsSequence", others(item(ANNA, LOCAL_ISSUER)), None),
    Shape("seq-labels-disagree", "OtherPatientIDsSequence",
          others(item(ANNA, "BSN", HOSPITAL_OID, "ISO")), None),
    Shape("seq-invalid-bsn", "OtherPatientIDsSequence", others(item(TYPO, "NLMINBIZA")), None),
    Shape("seq-two-bsns", "OtherPatientIDsSequence",
          others(item(ANNA, "NLMINBIZA"), item(BRAM, "NLMINBIZA")), None),  # nobody's: no guessing
    Shape("seq-patient-id-ignored", "OtherPatientIDsSequence",
          others(patient_id=CARLA, issuer="NLMINBIZA"), None),
    Shape("seq-absent", "OtherPatientIDsSequence", pid(CARLA), None),
]


@pytest.mark.parametrize("shape", SHAPES, ids=[s.id for s in SHAPES])
def test_where_the_bsn_is(shape: Shape) -> None:
    assert bsn_of(shape.record, shape.attribute) == shape.patient
    found = bsns_in(shape.record, shape.attribute)
    assert all(is_valid_bsn(b) for b in found)
    if shape.patient is not None:
        assert found == {shape.patient}
    # The record is the patient's for a query exactly when it is the patient's for the sync.
    for bsn in (ANNA, BRAM, CARLA, LOCAL_ELEVEN, TYPO):
        assert names_bsn(shape.record, shape.attribute, bsn) == (bsn == shape.patient), bsn


def test_the_other_location_is_not_read() -> None:
    """The configuration decides: a BSN where this hospital does not keep it names nobody."""
    assert bsn_of(others(item(ANNA, "NLMINBIZA"), patient_id=BRAM, issuer=None), "PatientID") == BRAM
    assert bsn_of(pid(ANNA, "NLMINBIZA"), "OtherPatientIDsSequence") is None


@pytest.mark.parametrize("issuer,expected", [
    ("NLMINBIZA", True), ("BSN", True), (BSN_OID, True), (f"urn:oid:{BSN_OID}", True), (HD, True),
    (f"&{BSN_OID}&ISO", True), ("NLMINBIZA&&", True), (f" {BSN_OID} ", True),
    ("", False), ("&&ISO", False), ("nlminbiza", False), ("BSN-NL", False), (LOCAL_ISSUER, False),
    (HOSPITAL_OID, False), (f"{BSN_OID}.1", False), (f"NLMINBIZA&{BSN_OID}&DNS", False),
    (f"{LOCAL_ISSUER}&{BSN_OID}&ISO", False), (f"NLMINBIZA&{BSN_OID}", True),
    (f"NLMINBIZA&{BSN_OID}&ISO&X", False),
])
def test_issuer_spellings(issuer: str, expected: bool) -> None:
    assert is_bsn_issuer(issuer) is expected


@pytest.mark.parametrize("entity,entity_type,expected", [
    (BSN_OID, "ISO", True), (BSN_OID, "", True), (f"urn:oid:{BSN_OID}", "URI", True),
    (f"urn:oid:{BSN_OID}", "", True), (BSN_OID, "DNS", False), (BSN_OID, "UUID", False),
    (HOSPITAL_OID, "ISO", False), ("NLMINBIZA", "", False), ("", "ISO", False),
])
def test_universal_entity(entity: str, entity_type: str, expected: bool) -> None:
    assert is_bsn_entity(entity, entity_type) is expected


@pytest.mark.parametrize("record,attribute,bsn,expected", [
    (pid(ANNA), "PatientID", ANNA, False),
    (pid(BRAM), "PatientID", ANNA, True),
    (pid("MRN-0042", LOCAL_ISSUER), "PatientID", ANNA, True),  # the BSN's place holds somebody else
    (pid(ANNA, LOCAL_ISSUER), "PatientID", ANNA, True),  # labelled as another authority's number
    (Dataset(), "PatientID", ANNA, False),  # a level without patient keys names nobody
    (pid(""), "PatientID", ANNA, False),
    (others(item(ANNA, "NLMINBIZA")), "OtherPatientIDsSequence", ANNA, False),
    (others(item(BRAM, "NLMINBIZA")), "OtherPatientIDsSequence", ANNA, True),
    (others(item(TYPO, "NLMINBIZA")), "OtherPatientIDsSequence", ANNA, True),  # labelled, even if mistyped
    (others(item(ANNA, "NLMINBIZA"), item(BRAM, "BSN")), "OtherPatientIDsSequence", ANNA, True),
    (others(item(BRAM), item("MRN7", LOCAL_ISSUER)), "OtherPatientIDsSequence", ANNA, False),  # no claim
    (others(), "OtherPatientIDsSequence", ANNA, False),
])
def test_names_other_patient(record: Dataset, attribute: BsnAttribute, bsn: str, expected: bool) -> None:
    assert names_other_patient(record, attribute, bsn) is expected


def test_query_asks_for_every_issuer_attribute_the_rule_reads() -> None:
    query = bsn_query("STUDY", "PatientID", ANNA)
    assert (query.QueryRetrieveLevel, query.PatientID, query.IssuerOfPatientID) == ("STUDY", ANNA, "")
    [qualifier] = query.IssuerOfPatientIDQualifiersSequence
    assert (qualifier.UniversalEntityID, qualifier.UniversalEntityIDType) == ("", "")
    assert "OtherPatientIDsSequence" not in query

    query = bsn_query("IMAGE", "OtherPatientIDsSequence", ANNA)
    assert (query.QueryRetrieveLevel, query.PatientID) == ("IMAGE", "")
    [wanted] = query.OtherPatientIDsSequence
    assert (wanted.PatientID, wanted.IssuerOfPatientID) == (ANNA, "")
    [qualifier] = wanted.IssuerOfPatientIDQualifiersSequence
    assert (qualifier.UniversalEntityID, qualifier.UniversalEntityIDType) == ("", "")
    # Universal matching when no patient is given; the query itself names nobody.
    listing = bsn_query("STUDY", "OtherPatientIDsSequence")
    assert listing.OtherPatientIDsSequence[0].PatientID == ""
    assert bsn_of(listing, "OtherPatientIDsSequence") is None


@pytest.mark.parametrize("value,expected", [
    (ANNA, True), (BRAM, True), (CARLA, True), (LOCAL_ELEVEN, True),
    (TYPO, False), ("000000000", False), ("99991112", False), ("0999911120", False),
    ("99991112O", False), ("٩٩٩٩١١١٢٠", False), ("", False),
])
def test_eleven_proef(value: str, expected: bool) -> None:
    assert is_valid_bsn(value) is expected


def test_cx() -> None:
    assert bsn_cx(ANNA) == f"{ANNA}^^^&{BSN_OID}&ISO"


def encoded(record: Dataset, sop_uid: str, implicit: bool) -> Dataset:
    """``record`` with its own SOP Instance UID, written and read back: raw, as the receive path has it."""
    copy = Dataset(record)
    copy.SOPInstanceUID = sop_uid
    buf = DicomBytesIO()
    buf.is_little_endian, buf.is_implicit_VR = True, implicit
    write_dataset(buf, copy)
    return read_dataset(DicomBytesIO(buf.getvalue()), implicit, True)


@pytest.mark.parametrize("implicit", [False, True])
def test_a_reading_key_is_shared_exactly_by_records_read_alike(implicit: bool) -> None:
    """Equal keys must mean equal readings (a validator reuses them); instances of one patient share
    a key whatever else differs; a record already decoded gets none."""
    for shape in SHAPES:
        one, two = (encoded(shape.record, uid, implicit) for uid in ("1.2.3", "1.2.4"))
        assert reading_key(one) is not None and reading_key(one) == reading_key(two), shape.id
    keyed = [(reading_key(encoded(s.record, "1.2.3", implicit)), s) for s in SHAPES]
    for key, shape in keyed:
        for other_key, other in keyed:
            if key == other_key:
                assert bsn_of(shape.record, shape.attribute) == bsn_of(other.record, shape.attribute)
    assert len({k for k, _s in keyed}) > len(SHAPES) // 2  # distinct records, distinct keys
    raw = encoded(SHAPES[0].record, "1.2.3", implicit)
    raw.get("PatientID")
    assert reading_key(raw) is None
