"""Burgerservicenummer: validation (11-proef), the identifier forms it travels in, and where a DICOM
record carries it.

**Where is the BSN in a DICOM record.** This module holds the one rule; the query path
(:class:`~duo_gateway.sources.dicom_pacs.DicomPacsSource`: which studies and instances are the
patient's) and the Mitz subscription sync (which patients a hospital has imaging for) both use it, so
a record can never be one patient's on one path and nobody's, or another's, on the other.

The Dutch guideline's tag is not settled and PACSes differ, so each hospital's configuration says where
its PACS keeps the BSN (``bsn_attribute``, netherlands.md §4):

- ``PatientID``: the record's PatientID is the BSN. The configuration is the label here, so a PatientID
  without any issuer counts. An issuer that *is* given must name the BSN's authority: a PACS that also
  holds local numbers in PatientID (studies imported under the hospital's own number, as DUO's own
  transfers reconcile them, with that hospital's IssuerOfPatientID) labels them, and a local number
  that happens to pass the 11-proef must never be disclosed, or queried, as somebody's BSN.
- ``OtherPatientIDsSequence``: one item of that sequence is the BSN, beside the hospital's own
  numbers. An item counts only when it carries an issuer and every issuer it carries names the BSN's
  authority. An item without any issuer is *not* a BSN: that sequence routinely lists unlabelled
  local and legacy numbers, and about one random nine-digit number in eleven passes the 11-proef, so
  accepting them would be a guess that discloses a stranger's number (fail-closed).

Issuer spellings that name the BSN's authority, as PACSes and HL7-to-DICOM brokers actually fill
them: IssuerOfPatientID ``NLMINBIZA`` (the assigning authority name on every Dutch BSN, also in Mitz
and XCPD), ``BSN`` (hand-configured PACSes), the BSN OID bare or as ``urn:oid:``, or the HL7 HD form
a broker copies whole from PID-3.4 (``NLMINBIZA&2.16.840.1.113883.2.4.6.3&ISO``, trailing
components may be left off; every component given must agree); and an
IssuerOfPatientIDQualifiersSequence item whose UniversalEntityID is the BSN OID (bare or
``urn:oid:``) with UniversalEntityIDType ISO, URI or absent. Names are compared exactly: a near
miss is some other authority's number until a person decides otherwise. Two labels that disagree
(NLMINBIZA beside another OID) are a data error that makes the identifier not a BSN.

Every value returned passes :func:`is_valid_bsn`. A record that names two different BSNs belongs to
nobody: no guess can say which patient it is, and either guess could disclose the wrong person's
images or subscribe the wrong person at Mitz.

No I/O here: a pydicom Dataset in, values out.
"""

from __future__ import annotations

from typing import Final, Literal

from pydicom.dataelem import RawDataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence as DicomSequence

BSN_OID = "2.16.840.1.113883.2.4.6.3"
_WEIGHTS = (9, 8, 7, 6, 5, 4, 3, 2, -1)

#: Where a hospital's PACS keeps the BSN (``TlbHospital.bsn_attribute``).
BsnAttribute = Literal["PatientID", "OtherPatientIDsSequence"]

#: The BSN's assigning-authority name: IssuerOfPatientID in Dutch DICOM, PID-3.4 in HL7, and required
#: by Mitz/XCPD on every BSN II (B365: "verplicht volgens Mitz handleiding"). What DUO writes.
NLMINBIZA: Final = "NLMINBIZA"
#: Assigning-authority names read as the BSN: NLMINBIZA as Mitz/XCPD/Twiin name it, BSN as PACSes do.
BSN_ISSUER_NAMES: Final = frozenset({NLMINBIZA, "BSN"})
#: IssuerOfPatientID values that name the BSN's authority (the HD form is recognised on top).
BSN_ISSUERS: Final = BSN_ISSUER_NAMES | {BSN_OID, f"urn:oid:{BSN_OID}"}
#: UniversalEntityIDType values under which a UniversalEntityID can be the BSN OID.
_OID_ENTITY_TYPES: Final = frozenset({"", "ISO", "URI"})


def is_valid_bsn(value: str) -> bool:
    """Exactly nine ASCII digits, not all zeros, passing the 11-proef.

    Eight-digit legacy numbers are refused: padding must be an explicit decision upstream, since a
    silently padded typo could name another person.
    """
    if len(value) != 9 or not value.isascii() or not value.isdigit() or value == "000000000":
        return False
    return sum(int(d) * w for d, w in zip(value, _WEIGHTS, strict=True)) % 11 == 0


def bsn_cx(bsn: str) -> str:
    """The HL7 CX form used for XDS patientId: ``BSN^^^&OID&ISO``."""
    return f"{bsn}^^^&{BSN_OID}&ISO"


# -- BSN in DICOM ----------------------------------------------------------------------------------


def _is_bsn_oid(value: str) -> bool:
    return value.removeprefix("urn:oid:") == BSN_OID


def is_bsn_issuer(issuer: str) -> bool:
    """Whether an IssuerOfPatientID value names the BSN's assigning authority.

    Exact spellings only (after trimming the padding DICOM allows): a near miss is some other
    authority's number until a person decides otherwise.
    """
    value = issuer.strip()
    if value in BSN_ISSUERS:
        return True
    parts = value.split("&")
    if len(parts) not in (2, 3):
        return False
    namespace, universal_id, id_type = (p.strip() for p in [*parts, ""][:3])
    if not namespace and not universal_id:
        return False
    return ((not namespace or namespace in BSN_ISSUER_NAMES)
            and (not universal_id or _is_bsn_oid(universal_id))
            and id_type in ("", "ISO"))


def is_bsn_entity(universal_entity_id: str, entity_id_type: str = "") -> bool:
    """Whether an IssuerOfPatientIDQualifiersSequence item's UniversalEntityID is the BSN OID.

    A type that cannot carry an OID (DNS, UUID, X500, …) contradicts the value and refuses it.
    """
    return _is_bsn_oid(universal_entity_id.strip()) and entity_id_type.strip() in _OID_ENTITY_TYPES


def bsn_query(level: str, bsn_attribute: BsnAttribute, bsn: str = "") -> Dataset:
    """A C-FIND identifier at ``level`` matching ``bsn`` (universal when empty) where the hospital
    keeps it, asking for every issuer attribute the rule reads.

    The issuer keys are return keys, never matching keys (they are sent empty): a PACS that cannot
    match on them still answers, and the answer is then judged by :func:`bsns_in`, which is the
    safeguard against a PACS that ignores part of the identifier.
    """
    query = Dataset()
    query.QueryRetrieveLevel = level
    if bsn_attribute == "PatientID":
        query.PatientID = bsn
        _ask_issuer(query)
    else:
        query.PatientID = ""
        item = Dataset()
        item.PatientID = bsn
        _ask_issuer(item)
        query.OtherPatientIDsSequence = DicomSequence([item])
    return query


def _ask_issuer(identifier: Dataset) -> None:
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = ""
    qualifiers.UniversalEntityIDType = ""
    identifier.IssuerOfPatientID = ""
    identifier.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifiers])


def bsns_in(record: Dataset, bsn_attribute: BsnAttribute) -> frozenset[str]:
    """Every valid BSN the record (a C-FIND answer or an instance header) names where the hospital
    keeps it; more than one is a data error the caller must not resolve by picking."""
    return frozenset(value for value, is_bsn in _occupants(record, bsn_attribute)
                     if is_bsn and is_valid_bsn(value))


def bsn_of(record: Dataset, bsn_attribute: BsnAttribute) -> str | None:
    """The one patient the record names, or None when it names no valid BSN or several."""
    found = bsns_in(record, bsn_attribute)
    return next(iter(found)) if len(found) == 1 else None


def names_bsn(record: Dataset, bsn_attribute: BsnAttribute, bsn: str) -> bool:
    """Whether the record is ``bsn``'s and nobody else's: the test before anything is disclosed."""
    return bsn_of(record, bsn_attribute) == bsn


def names_other_patient(record: Dataset, bsn_attribute: BsnAttribute, bsn: str) -> bool:
    """Whether the record names a patient where the BSN lives and that is not exactly ``bsn``.

    Naming nobody is not a mismatch: a PACS need not repeat patient keys at every level. Occupied in
    ``PatientID`` mode means any PatientID value (the configuration says that is the patient's
    identity, so a local number there is someone else's); in ``OtherPatientIDsSequence`` mode an item
    labelled as a BSN, valid or not (an unlabelled item is the hospital's own number, no claim).
    """
    return bool(_occupants(record, bsn_attribute)) and not names_bsn(record, bsn_attribute, bsn)


#: What the BSN is read from: the character set, PatientID, its issuer and qualifiers, and
#: OtherPatientIDsSequence (where the items carry their own PatientID and issuer).
_READ_FROM: Final = (0x00080005, 0x00100020, 0x00100021, 0x00100024, 0x00101002)


def reading_key(record: Dataset) -> tuple[object, ...] | None:
    """The still-encoded bytes the BSN rule reads in ``record``, or None when any is already decoded.

    Why: a retrieve receives hundreds of instances of one patient, and decoding each one's patient
    elements to apply the rule again was a tenth of DUO's CPU per instance. Records with equal keys
    read as the same patient by construction (same bytes, same encoding), so a caller may reuse the
    reading; a record pydicom has already decoded gets no key and is read in full.
    """
    key: list[object] = []
    for tag in _READ_FROM:
        elem = record.get_item(tag, keep_deferred=True)
        if elem is None:
            key.append(None)
        elif isinstance(elem, RawDataElement) and (isinstance(elem.value, bytes)
                                                   or (elem.value is None and elem.length == 0)):
            # an empty value reads as None or b"" depending on the syntax: the same reading
            key.append((elem.VR, elem.is_implicit_VR, elem.is_little_endian, elem.value or b""))
        else:
            return None
    return tuple(key)


def _occupants(record: Dataset, bsn_attribute: BsnAttribute) -> list[tuple[str, bool]]:
    """(value, labelled as a BSN) of each identifier in the BSN's position."""
    if bsn_attribute == "PatientID":
        value = _text(record, "PatientID")
        return [(value, all(_issuer_labels(record)))] if value else []
    found = []
    for item in _items(record, "OtherPatientIDsSequence"):
        value = _text(item, "PatientID")
        labels = _issuer_labels(item)
        if value and labels and all(labels):
            found.append((value, True))
    return found


def _issuer_labels(identifier: Dataset) -> list[bool]:
    """One verdict per issuer label the identifier carries: True when it names the BSN's authority."""
    labels = []
    issuer = _text(identifier, "IssuerOfPatientID")
    if issuer:
        labels.append(is_bsn_issuer(issuer))
    for qualifier in _items(identifier, "IssuerOfPatientIDQualifiersSequence"):
        entity = _text(qualifier, "UniversalEntityID")
        if entity:
            labels.append(is_bsn_entity(entity, _text(qualifier, "UniversalEntityIDType")))
    return labels


def _items(ds: Dataset, keyword: str) -> list[Dataset]:
    value = ds.get(keyword)
    return [item for item in value if isinstance(item, Dataset)] if isinstance(value, DicomSequence) else []


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return str(value).strip() if value is not None else ""
