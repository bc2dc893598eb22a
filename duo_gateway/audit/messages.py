"""DICOM PS3.15 A.5 audit messages: the typed model, its XML form, and one builder per transaction.

Pure code, no I/O: transaction handlers build a message and hand it to the ``Auditor``. The XML follows
the DICOM audit message schema (PS3.15 A.5.1, the form IHE ATNA and IPF use), not the older RFC 3881
schema: codes are ``csd-code``/``codeSystemName``/``originalText`` attributes.

Patient identifiers, BSNs included, belong in these records: the audit trail is where the disclosure
of a patient's data is recorded. They must never reach operational logs instead.

Every text copied into a record is bounded when it is serialized (:func:`capped`): most of what a
record holds came from a caller (a ReplyTo, a query id, a document id), and a caller must not be able
to make one record as large as its request, nor the audit trail grow by its choosing.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import re
from collections.abc import Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from enum import IntEnum, StrEnum
from typing import Final, Literal

from lxml import etree

from duo_gateway.bsn import bsn_cx
from duo_gateway.saml import ORG_TYPE_OID, PURPOSE_OID, ROLE_OID, URA_OID, UZI_OID
from duo_gateway.soap.xml import format_datetime
from duo_gateway.xua import Claims, Requester

_XML_DECLARATION = b'<?xml version="1.0" encoding="UTF-8"?>'


@dataclass(frozen=True, slots=True)
class Code:
    """A coded value; ``original_text`` is required by the DICOM schema (it is the Code Meaning)."""

    code: str
    system_name: str
    original_text: str


class EventAction(StrEnum):
    CREATE = "C"
    READ = "R"
    UPDATE = "U"
    DELETE = "D"
    EXECUTE = "E"


class EventOutcome(IntEnum):
    SUCCESS = 0
    MINOR_FAILURE = 4
    SERIOUS_FAILURE = 8
    MAJOR_FAILURE = 12


class NetworkAccessPointType(IntEnum):
    MACHINE_NAME = 1
    IP_ADDRESS = 2
    TELEPHONE = 3
    EMAIL = 4
    URI = 5


class ObjectType(IntEnum):
    PERSON = 1
    SYSTEM_OBJECT = 2
    ORGANIZATION = 3
    OTHER = 4


class ObjectRole(IntEnum):
    """ParticipantObjectTypeCodeRole; only the values the gateway's transactions use."""

    PATIENT = 1
    LOCATION = 2
    REPORT = 3
    RESOURCE = 4
    MASTER_FILE = 5
    USER = 6
    SECURITY_RESOURCE = 13
    DATA_DESTINATION = 16
    DATA_REPOSITORY = 17
    QUERY = 24


EVENT_QUERY = Code("110112", "DCM", "Query")
EVENT_EXPORT = Code("110106", "DCM", "Export")
EVENT_IMPORT = Code("110107", "DCM", "Import")
EVENT_INSTANCES_TRANSFERRED = Code("110104", "DCM", "DICOM Instances Transferred")
EVENT_APPLICATION_ACTIVITY = Code("110100", "DCM", "Application Activity")
APPLICATION_START = Code("110120", "DCM", "Application Start")
APPLICATION_STOP = Code("110121", "DCM", "Application Stop")
ROLE_APPLICATION = Code("110150", "DCM", "Application")

ROLE_SOURCE = Code("110153", "DCM", "Source Role ID")
ROLE_DESTINATION = Code("110152", "DCM", "Destination Role ID")

ITI_38 = Code("ITI-38", "IHE Transactions", "Cross Gateway Query")
ITI_39 = Code("ITI-39", "IHE Transactions", "Cross Gateway Retrieve")
RAD_75 = Code("RAD-75", "IHE Transactions", "Cross Gateway Retrieve Imaging Document Set")
#: No IHE, DICOM or VZVZ code is known for the Mitz questions, so the project defines its own code
#: system: the questions stay recognisable in any Audit Record Repository and can be remapped in one
#: place if VZVZ publishes codes. The event itself is a DCM 110112 Query (action E), like ITI-38: the
#: gateway asks Mitz about a patient's consents and discloses the BSN in doing so.
MITZ_CODE_SYSTEM = "DUO Transactions"
MITZ_CLOSED_QUESTION = Code("MITZ-GAV", MITZ_CODE_SYSTEM, "Mitz Gesloten Autorisatievraag")
MITZ_OPEN_QUESTION = Code("MITZ-OAV", MITZ_CODE_SYSTEM, "Mitz Open Autorisatievraag")

ID_PATIENT_NUMBER = Code("2", "RFC-3881", "Patient Number")
ID_REPORT_NUMBER = Code("9", "RFC-3881", "Report Number")
ID_STUDY_INSTANCE_UID = Code("110180", "DCM", "Study Instance UID")
ID_SOP_CLASS_UID = Code("110181", "DCM", "SOP Class UID")

SOURCE_TYPE_APPLICATION_SERVER = Code("4", "DCM", "Application Server Process Tier in Multi-tier System")
#: The XUA assertion a disclosure was made on (see :class:`Requestor`). No DICOM or IHE code names a
#: SAML assertion as an object, so it lives in the project's code system like the Mitz questions.
ID_XUA_ASSERTION = Code("XUA-ASSERTION", MITZ_CODE_SYSTEM, "XUA Assertion ID")

# --- bounds on what a caller can put into a record ------------------------------------------------

#: Longest attribute value or short text (UserID, ParticipantObjectID, a code...). Every legitimate
#: value is far shorter (UIDs 64, OIDs and URLs well under 200); the bound exists for hostile ones.
MAX_FIELD_CHARS = 256
#: EventOutcomeDescription and ParticipantObjectDetail values: explanations may run longer.
MAX_TEXT_CHARS = 1024
#: ParticipantObjectQuery: IHE wants the query as sent; real ITI-38 queries are a few KiB.
MAX_QUERY_BYTES = 16 * 1024


def capped(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    """``value``, or its head with a marker saying it was cut and how long it was, never over ``limit``.

    The one bound for text copied into a record. The marker keeps a cut value recognisable as cut,
    so nobody mistakes the head for the whole (a cut document id is not another document id).
    """
    if len(value) <= limit:
        return value
    marker = f"...[cut, {len(value)} chars]"
    if len(marker) >= limit:
        return value[:limit]  # a limit too small for the marker still is a limit
    return value[:limit - len(marker)] + marker


def _capped_bytes(value: bytes, limit: int) -> bytes:
    if len(value) <= limit:
        return value
    marker = f"...[cut, {len(value)} bytes]".encode("ascii")
    if len(marker) >= limit:
        return value[:limit]
    return value[:limit - len(marker)] + marker


@dataclass(frozen=True, slots=True)
class EventIdentification:
    event_id: Code
    action: EventAction
    #: Must be timezone-aware: a repository merges records from many machines.
    date_time: datetime
    outcome: EventOutcome
    type_codes: tuple[Code, ...] = ()
    outcome_description: str | None = None
    #: Why the data was asked for (DICOM PS3.15 A.5.1 PurposeOfUse; the XUA purposeofuse attribute).
    purposes_of_use: tuple[Code, ...] = ()

    def __post_init__(self) -> None:
        if self.date_time.tzinfo is None or self.date_time.utcoffset() is None:
            raise ValueError("EventDateTime must be timezone-aware")


@dataclass(frozen=True, slots=True)
class ActiveParticipant:
    user_id: str
    user_is_requestor: bool
    role_id_codes: tuple[Code, ...] = ()
    alternative_user_id: str | None = None
    user_name: str | None = None
    network_access_point_id: str | None = None
    network_access_point_type: NetworkAccessPointType | None = None

    def __post_init__(self) -> None:
        if (self.network_access_point_id is None) != (self.network_access_point_type is None):
            raise ValueError("NetworkAccessPointID and NetworkAccessPointTypeCode go together")


@dataclass(frozen=True, slots=True)
class AuditSourceIdentification:
    source_id: str
    enterprise_site_id: str | None = None
    type_codes: tuple[Code, ...] = (SOURCE_TYPE_APPLICATION_SERVER,)


@dataclass(frozen=True, slots=True)
class ParticipantObjectDetail:
    """A type/value pair; the value is kept as bytes because the schema carries it base64-encoded."""

    type: str
    value: bytes

    @classmethod
    def text(cls, type_: str, value: str) -> ParticipantObjectDetail:
        return cls(type_, value.encode("utf-8"))


@dataclass(frozen=True, slots=True)
class SopClassCount:
    uid: str
    number_of_instances: int


@dataclass(frozen=True, slots=True)
class DicomObjectDescription:
    """The DICOM extension of a participant object (PS3.15 A.5.1 DICOMObjectDescriptionContents)."""

    accession_numbers: tuple[str, ...] = ()
    sop_classes: tuple[SopClassCount, ...] = ()
    study_uids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ParticipantObjectIdentification:
    object_id: str
    type_code: ObjectType
    type_code_role: ObjectRole
    id_type_code: Code
    #: The schema allows a name or a query, never both.
    name: str | None = None
    #: Raw query bytes (e.g. the SOAP request); serialized base64.
    query: bytes | None = None
    details: tuple[ParticipantObjectDetail, ...] = ()
    description: DicomObjectDescription | None = None

    def __post_init__(self) -> None:
        if self.name is not None and self.query is not None:
            raise ValueError("ParticipantObjectName and ParticipantObjectQuery are mutually exclusive")


@dataclass(frozen=True, slots=True)
class AuditMessage:
    event: EventIdentification
    participants: tuple[ActiveParticipant, ...]
    source: AuditSourceIdentification
    objects: tuple[ParticipantObjectIdentification, ...] = ()

    def __post_init__(self) -> None:
        if not self.participants:
            raise ValueError("an audit message needs at least one ActiveParticipant")


# --- serialization ---------------------------------------------------------------------------------

# Characters XML 1.0 cannot carry at all. Peer-supplied values (user IDs, query IDs) may contain them;
# replacing beats refusing, since refusing would let a peer keep its request out of the audit trail.
_NOT_XML = re.compile("[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]")


def _text(value: str, limit: int = MAX_FIELD_CHARS) -> str:
    return _NOT_XML.sub("\ufffd", capped(value, limit))


def _set(element: etree._Element, name: str, value: str | int | None) -> None:
    if value is not None:
        element.set(name, _text(str(value)))


def _code(parent: etree._Element, tag: str, code: Code) -> None:
    element = etree.SubElement(parent, tag)
    element.set("csd-code", _text(code.code))
    element.set("codeSystemName", _text(code.system_name))
    element.set("originalText", _text(code.original_text))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _event(root: etree._Element, event: EventIdentification) -> None:
    element = etree.SubElement(root, "EventIdentification")
    element.set("EventActionCode", event.action.value)
    element.set("EventDateTime", format_datetime(event.date_time))
    element.set("EventOutcomeIndicator", str(int(event.outcome)))
    _code(element, "EventID", event.event_id)
    for type_code in event.type_codes:
        _code(element, "EventTypeCode", type_code)
    if event.outcome_description is not None:
        etree.SubElement(element, "EventOutcomeDescription").text = _text(event.outcome_description,
                                                                           MAX_TEXT_CHARS)
    for purpose in event.purposes_of_use:  # after the description: the schema's element order
        _code(element, "PurposeOfUse", purpose)


def _participant(root: etree._Element, participant: ActiveParticipant) -> None:
    element = etree.SubElement(root, "ActiveParticipant")
    _set(element, "UserID", participant.user_id)
    _set(element, "AlternativeUserID", participant.alternative_user_id)
    _set(element, "UserName", participant.user_name)
    element.set("UserIsRequestor", "true" if participant.user_is_requestor else "false")
    _set(element, "NetworkAccessPointID", participant.network_access_point_id)
    if participant.network_access_point_type is not None:
        element.set("NetworkAccessPointTypeCode", str(int(participant.network_access_point_type)))
    for role in participant.role_id_codes:
        _code(element, "RoleIDCode", role)


def _source(root: etree._Element, source: AuditSourceIdentification) -> None:
    element = etree.SubElement(root, "AuditSourceIdentification")
    _set(element, "AuditEnterpriseSiteID", source.enterprise_site_id)
    _set(element, "AuditSourceID", source.source_id)
    for type_code in source.type_codes:
        _code(element, "AuditSourceTypeCode", type_code)


def _object(root: etree._Element, obj: ParticipantObjectIdentification) -> None:
    element = etree.SubElement(root, "ParticipantObjectIdentification")
    _set(element, "ParticipantObjectID", obj.object_id)
    element.set("ParticipantObjectTypeCode", str(int(obj.type_code)))
    element.set("ParticipantObjectTypeCodeRole", str(int(obj.type_code_role)))
    _code(element, "ParticipantObjectIDTypeCode", obj.id_type_code)
    if obj.name is not None:
        etree.SubElement(element, "ParticipantObjectName").text = _text(obj.name)
    details = list(obj.details)
    if obj.query is not None:
        query = _capped_bytes(obj.query, MAX_QUERY_BYTES)
        etree.SubElement(element, "ParticipantObjectQuery").text = _b64(query)
        if len(obj.query) > MAX_QUERY_BYTES:
            # The head alone cannot prove what was asked; its length and digest can be matched to a copy.
            details.append(ParticipantObjectDetail.text(
                "QueryCut", f"{len(obj.query)} bytes, sha256 {hashlib.sha256(obj.query).hexdigest()}"))
    for detail in details:
        child = etree.SubElement(element, "ParticipantObjectDetail")
        child.set("type", _text(detail.type))
        child.set("value", _b64(_capped_bytes(detail.value, MAX_TEXT_CHARS)))
    if obj.description is not None:
        _description(element, obj.description)


def _description(parent: etree._Element, description: DicomObjectDescription) -> None:
    element = etree.SubElement(parent, "ParticipantObjectDescription")
    for number in description.accession_numbers:
        etree.SubElement(element, "Accession").set("Number", _text(number))
    for sop in description.sop_classes:
        child = etree.SubElement(element, "SOPClass")
        child.set("UID", _text(sop.uid))
        child.set("NumberOfInstances", str(sop.number_of_instances))
    if description.study_uids:
        contains = etree.SubElement(element, "ParticipantObjectContainsStudy")
        for uid in description.study_uids:
            etree.SubElement(contains, "StudyIDs").set("UID", _text(uid))


def to_xml(message: AuditMessage) -> bytes:
    """The UTF-8 ``<AuditMessage>`` document, with the XML declaration IPF sends after the BOM."""
    root = etree.Element("AuditMessage")
    _event(root, message.event)
    for participant in message.participants:
        _participant(root, participant)
    _source(root, message.source)
    for obj in message.objects:
        _object(root, obj)
    return _XML_DECLARATION + etree.tostring(root, encoding="UTF-8")


# --- builders for the gateway's transactions --------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Peer:
    """One side of a network exchange as the audit record names it.

    ``user_id`` is what identifies the process: an endpoint URL, a WS-Addressing ReplyTo, an AE title.
    ``host`` (IP or DNS name) becomes the NetworkAccessPointID. ``alternative_user_id`` is conventionally
    this gateway's process ID, set only on the local side.
    """

    user_id: str
    host: str | None = None
    alternative_user_id: str | None = None
    user_name: str | None = None


@dataclass(frozen=True, slots=True)
class DocumentRef:
    """A retrieved document (ITI-39) or DICOM instance (RAD-75) and where it came from."""

    document_unique_id: str
    repository_unique_id: str
    home_community_id: str | None = None


@dataclass(frozen=True, slots=True)
class StudyTransfer:
    study_uid: str
    sop_classes: tuple[SopClassCount, ...] = ()


#: Code meanings for the RoleIDCode/PurposeOfUse ``originalText`` the schema requires; a code not
#: listed keeps its code as meaning rather than be refused: the record must still be written.
_ROLE_NAMES: dict[str, str] = {
    "01.000": "Arts", "01.010": "Cardioloog", "01.015": "Huisarts", "01.039": "Radioloog",
    "97.000": "Radiodiagnostisch laborant",
}
_ORGANISATION_TYPES: dict[str, str] = {
    "V4": "Ziekenhuis", "V5": "Universitair Medisch Centrum", "V6": "Algemeen ziekenhuis",
    "Z4": "Zelfstandig behandelcentrum", "Z5": "Diagnostisch centrum", "B1": "Beeldvormende diagnostiek",
    "B2": "Echocentrum", "L1": "Laboratorium", "P4": "Polikliniek", "Z3": "Huisartspraktijk",
}
_PURPOSES: dict[str, str] = {"TREAT": "Treatment", "COC": "Coordination of care"}


@dataclass(frozen=True, slots=True)
class Requestor:
    """Who asked for a disclosure: the professional, their organisation, why, and on whose word.

    How the record names them (IHE ITI TF-2 3.40.4.2 XUA audit, DICOM PS3.15 A.5, IPF's XUA processor):

    - **the professional**, an ActiveParticipant with UserIsRequestor ``true``: UserID the UZI number as
      an HL7 CX with the UZI-register's OID (``000095254^^^&2.16.528.1.1007.3.1&ISO``), the same form the
      record gives the patient's BSN, so the identifier says which register it is from (a bare number
      could be a BIG, an AGB or a local login); RoleIDCode the RoleCodeNL role
      (2.16.840.1.113883.2.4.15.111); UserName the IHE XUA form ``alias<user@issuer>``, with ``user``
      the assertion's Subject NameID or, as in Twiin/Mitz tokens that carry none, the UZI, and
      ``issuer`` who vouched for the person (the assertion Issuer; for the TLB API the client system);
    - **a mandated person** acting for the professional (``urn:nl:otv:names:tc:1.0:subject:mandated``),
      when there is one, as a second requesting person;
    - **the organisation**, an ActiveParticipant with UserIsRequestor ``false`` (it is accountable,
      but the person initiated the event): UserID the URA as a CX with the URA OID, RoleIDCode the
      organisation type when known;
    - **the purpose of use** as EventIdentification/PurposeOfUse;
    - **the assertion id** as a ParticipantObject (type 2, role 13 Security Resource, ID type
      ``XUA-ASSERTION``, with its issuer as a detail). Not in UserName's ``alias``: IHE and IPF give that
      to the NameID's SPProvidedID, and an object id is what an Audit Record Repository indexes, so
      "every disclosure made on assertion X" is one search. Records without an assertion (the TLB
      API without ``identity = "assertion"``) simply have no such object.
    """

    uzi: str
    role: str
    ura: str
    purpose: str
    organisation_type: str | None = None
    mandated_uzi: str | None = None
    assertion_id: str | None = None
    issuer: str | None = None
    #: The assertion's Subject NameID, when it has one.
    subject: str | None = None

    @classmethod
    def of(cls, claims: Claims, *, assertion_id: str | None = None, issuer: str | None = None) -> Requestor:
        """The requestor of validated claims; a :class:`~duo_gateway.xua.Requester` brings its own
        assertion id, issuer and subject, which win over the arguments (they are what was verified)."""
        subject: str | None = None
        if isinstance(claims, Requester):
            assertion_id, issuer, subject = claims.assertion_id, claims.issuer, claims.subject
        return cls(uzi=claims.uzi, role=claims.role, ura=claims.ura, purpose=claims.purpose,
                   organisation_type=claims.organisation_type, mandated_uzi=claims.mandated_uzi,
                   assertion_id=assertion_id, issuer=issuer, subject=subject)

    def purpose_code(self) -> Code:
        return Code(self.purpose, PURPOSE_OID, _PURPOSES.get(self.purpose, self.purpose))

    def participants(self) -> tuple[ActiveParticipant, ...]:
        user_name = None if self.issuer is None else f"<{self.subject or self.uzi}@{self.issuer}>"
        people = [ActiveParticipant(
            user_id=_cx(self.uzi, UZI_OID), user_is_requestor=True, user_name=user_name,
            role_id_codes=(Code(self.role, ROLE_OID, _ROLE_NAMES.get(self.role, self.role)),))]
        if self.mandated_uzi is not None:
            people.append(ActiveParticipant(user_id=_cx(self.mandated_uzi, UZI_OID), user_is_requestor=True))
        organisation_roles = () if self.organisation_type is None else (Code(
            self.organisation_type, ORG_TYPE_OID,
            _ORGANISATION_TYPES.get(self.organisation_type, self.organisation_type)),)
        people.append(ActiveParticipant(user_id=_cx(self.ura, URA_OID), user_is_requestor=False,
                                        role_id_codes=organisation_roles))
        return tuple(people)

    def assertion_object(self) -> ParticipantObjectIdentification | None:
        if self.assertion_id is None:
            return None
        details = () if self.issuer is None else (ParticipantObjectDetail.text("Issuer", self.issuer),)
        return ParticipantObjectIdentification(
            object_id=self.assertion_id, type_code=ObjectType.SYSTEM_OBJECT,
            type_code_role=ObjectRole.SECURITY_RESOURCE, id_type_code=ID_XUA_ASSERTION, details=details)


def _cx(number: str, oid: str) -> str:
    return f"{number}^^^&{oid}&ISO"


def active_participant(peer: Peer, *, requestor: bool, role: Code) -> ActiveParticipant:
    """One side of an exchange as an ActiveParticipant; the access point type follows from the host."""
    nap_type: NetworkAccessPointType | None = None
    if peer.host is not None:
        try:
            ipaddress.ip_address(peer.host)
            nap_type = NetworkAccessPointType.IP_ADDRESS
        except ValueError:
            nap_type = NetworkAccessPointType.MACHINE_NAME
    return ActiveParticipant(
        user_id=peer.user_id,
        user_is_requestor=requestor,
        role_id_codes=(role,),
        alternative_user_id=peer.alternative_user_id,
        user_name=peer.user_name,
        network_access_point_id=peer.host,
        network_access_point_type=nap_type,
    )


def patient_object(patient_id: str) -> ParticipantObjectIdentification:
    """The patient as a participant object (type 1, role 1); ``patient_id`` as the transaction carried it."""
    return ParticipantObjectIdentification(
        object_id=patient_id,
        type_code=ObjectType.PERSON,
        type_code_role=ObjectRole.PATIENT,
        id_type_code=ID_PATIENT_NUMBER,
    )


def _document_object(doc: DocumentRef) -> ParticipantObjectIdentification:
    details = [ParticipantObjectDetail.text("Repository Unique Id", doc.repository_unique_id)]
    if doc.home_community_id is not None:
        details.append(ParticipantObjectDetail.text("ihe:homeCommunityID", doc.home_community_id))
    return ParticipantObjectIdentification(
        object_id=doc.document_unique_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=ID_REPORT_NUMBER,
        details=tuple(details),
    )


def _study_object(study: StudyTransfer) -> ParticipantObjectIdentification:
    description = DicomObjectDescription(sop_classes=study.sop_classes) if study.sop_classes else None
    return ParticipantObjectIdentification(
        object_id=study.study_uid,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=ID_STUDY_INSTANCE_UID,
        description=description,
    )


def _now(when: datetime | None) -> datetime:
    return datetime.now(UTC) if when is None else when


def _message(event: EventIdentification, participants: Sequence[ActiveParticipant],
             source: AuditSourceIdentification, objects: Sequence[ParticipantObjectIdentification],
             patient_id: str | None, requestor: Requestor | None = None) -> AuditMessage:
    """Assemble a record; ``requestor``'s people follow the requesting system's participant (the
    first one that has UserIsRequestor), their purpose goes into the event, their assertion is an object."""
    all_participants = list(participants)
    all_objects = list(objects)
    if requestor is not None:
        event = replace(event, purposes_of_use=(*event.purposes_of_use, requestor.purpose_code()))
        at = next((i + 1 for i, p in enumerate(all_participants) if p.user_is_requestor), 0)
        all_participants[at:at] = requestor.participants()
        assertion = requestor.assertion_object()
        if assertion is not None:
            all_objects.append(assertion)
    if patient_id is not None:
        all_objects.append(patient_object(patient_id))
    return AuditMessage(event=event, participants=tuple(all_participants), source=source,
                        objects=tuple(all_objects))


def iti38_query(
    *,
    initiating: Peer,
    responding: Peer,
    audit_source: AuditSourceIdentification,
    query_id: str,
    query_request: bytes,
    patient_id: str | None,
    home_community_id: str | None = None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    extra_participants: Sequence[ActiveParticipant] = (),
    requestor: Requestor | None = None,
) -> AuditMessage:
    """Cross Gateway Query, recorded the same way by both gateways (only the local ``Peer`` differs).

    The initiating gateway is the requesting Source, the responding one the Destination. ``query_id``
    is the stored-query UUID, ``query_request`` the AdhocQueryRequest as sent; ``patient_id`` is the
    CX form from the query (see ``duo_gateway.bsn.bsn_cx``). ``requestor`` is who asked, from the XUA
    assertion (see :class:`Requestor`); ``extra_participants`` any further participant.
    """
    details = [ParticipantObjectDetail.text("QueryEncoding", "UTF-8")]
    if home_community_id is not None:
        details.append(
            ParticipantObjectDetail.text("urn:ihe:iti:xca:2010:homeCommunityId", home_community_id))
    query = ParticipantObjectIdentification(
        object_id=query_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.QUERY,
        id_type_code=ITI_38,
        query=query_request,
        details=tuple(details),
    )
    event = EventIdentification(EVENT_QUERY, EventAction.EXECUTE, _now(when), outcome, (ITI_38,),
                                outcome_description)
    participants = [
        active_participant(initiating, requestor=True, role=ROLE_SOURCE),
        *extra_participants,
        active_participant(responding, requestor=False, role=ROLE_DESTINATION),
    ]
    return _message(event, participants, audit_source, [query], patient_id, requestor)


def iti39_retrieve(
    *,
    side: Literal["initiating", "responding"],
    initiating: Peer,
    responding: Peer,
    audit_source: AuditSourceIdentification,
    documents: Sequence[DocumentRef],
    patient_id: str | None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    extra_participants: Sequence[ActiveParticipant] = (),
    requestor: Requestor | None = None,
) -> AuditMessage:
    """Cross Gateway Retrieve: Export (R) on the responding side, Import (C) on the initiating side.

    The responding gateway is the Source of the documents, the initiating one the requesting
    Destination. Per CP-ITI-493 successes and failures go in separate records: call once per outcome.
    """
    event_id, action = (EVENT_EXPORT, EventAction.READ) if side == "responding" else (
        EVENT_IMPORT, EventAction.CREATE)
    event = EventIdentification(event_id, action, _now(when), outcome, (ITI_39,), outcome_description)
    participants = [
        active_participant(responding, requestor=False, role=ROLE_SOURCE),
        *extra_participants,
        active_participant(initiating, requestor=True, role=ROLE_DESTINATION),
    ]
    return _message(event, participants, audit_source, [_document_object(d) for d in documents], patient_id,
                    requestor)


def rad75_retrieve(
    *,
    side: Literal["initiating", "responding"],
    initiating: Peer,
    responding: Peer,
    audit_source: AuditSourceIdentification,
    studies: Sequence[StudyTransfer],
    documents: Sequence[DocumentRef],
    patient_id: str | None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    extra_participants: Sequence[ActiveParticipant] = (),
    requestor: Requestor | None = None,
) -> AuditMessage:
    """Cross Gateway Retrieve Imaging Document Set as DICOM Instances Transferred (110104).

    The sending (responding) side records Read, the receiving (initiating) side Create, as DICOM
    PS3.15 A.5.3.3 defines the action from the receiver's point of view and IPF does for RAD-75.
    One record per outcome (CP-ITI-493); each study is its own Study Instance UID object.
    """
    action = EventAction.READ if side == "responding" else EventAction.CREATE
    event = EventIdentification(EVENT_INSTANCES_TRANSFERRED, action, _now(when), outcome, (RAD_75,),
                                outcome_description)
    participants = [
        active_participant(responding, requestor=False, role=ROLE_SOURCE),
        *extra_participants,
        active_participant(initiating, requestor=True, role=ROLE_DESTINATION),
    ]
    objects = [_study_object(s) for s in studies] + [_document_object(d) for d in documents]
    return _message(event, participants, audit_source, objects, patient_id, requestor)


def mitz_consent_question(
    *,
    question: Literal["closed", "open"],
    gateway: Peer,
    mitz: Peer,
    audit_source: AuditSourceIdentification,
    bsn: str,
    request_id: str,
    request: bytes | None,
    result: str | None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    extra_participants: Sequence[ActiveParticipant] = (),
) -> AuditMessage:
    """The gateway asking Mitz about a patient's consent (closed question) or data locations (open).

    ``outcome`` says whether the question got an answer; the answer itself goes in ``result`` (the
    XACML Decision for the closed question, the number of data holders for the open one), so a Deny
    is a successful question, not a failed event. ``request_id`` is the message ID of the request.
    """
    code = MITZ_CLOSED_QUESTION if question == "closed" else MITZ_OPEN_QUESTION
    details = (ParticipantObjectDetail.text("MitzResult", result),) if result is not None else ()
    query = ParticipantObjectIdentification(
        object_id=request_id,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.QUERY,
        id_type_code=code,
        query=request,
        details=details,
    )
    event = EventIdentification(EVENT_QUERY, EventAction.EXECUTE, _now(when), outcome, (code,),
                                outcome_description)
    participants = [
        active_participant(gateway, requestor=True, role=ROLE_SOURCE),
        *extra_participants,
        active_participant(mitz, requestor=False, role=ROLE_DESTINATION),
    ]
    return _message(event, participants, audit_source, [query], bsn_cx(bsn))


def dicom_query(
    *,
    requestor: Peer,
    responder: Peer,
    audit_source: AuditSourceIdentification,
    sop_class_uid: str,
    identifier: bytes,
    transfer_syntax_uid: str,
    patient_id: str | None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
) -> AuditMessage:
    """A C-FIND (PS3.15 A.5.3.10): the query is the encoded identifier data set, keyed by SOP Class."""
    query = ParticipantObjectIdentification(
        object_id=sop_class_uid,
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=ID_SOP_CLASS_UID,
        query=identifier,
        details=(ParticipantObjectDetail.text("TransferSyntax", transfer_syntax_uid),),
    )
    event = EventIdentification(EVENT_QUERY, EventAction.EXECUTE, _now(when), outcome, (),
                                outcome_description)
    participants = [
        active_participant(requestor, requestor=True, role=ROLE_SOURCE),
        active_participant(responder, requestor=False, role=ROLE_DESTINATION),
    ]
    return _message(event, participants, audit_source, [query], patient_id)


def dicom_instances_transferred(
    *,
    side: Literal["source", "destination"],
    source: Peer,
    destination: Peer,
    requestor: Literal["source", "destination"],
    audit_source: AuditSourceIdentification,
    studies: Sequence[StudyTransfer],
    patient_id: str | None,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    on_behalf_of: Requestor | None = None,
    stored_as: str | None = None,
) -> AuditMessage:
    """C-STORE, or the C-STOREs of a C-MOVE (PS3.15 A.5.3.3), recorded by the ``side`` this gateway is.

    ``source`` sends the instances, ``destination`` receives them. ``requestor`` names which system
    asked: the sender for a C-STORE push, the receiver for a C-MOVE this gateway issued to pull a
    study. ``on_behalf_of`` is the person and organisation the transfer is for (a transfer's requester).
    ``stored_as`` is the patient id the instances were relabelled to (import reconciliation): the patient
    object keeps the original id and carries the new one as a detail, so the trail links the two.
    """
    action = EventAction.READ if side == "source" else EventAction.CREATE
    event = EventIdentification(EVENT_INSTANCES_TRANSFERRED, action, _now(when), outcome, (),
                                outcome_description)
    participants = [
        active_participant(source, requestor=requestor == "source", role=ROLE_SOURCE),
        active_participant(destination, requestor=requestor == "destination", role=ROLE_DESTINATION),
    ]
    objects = [_study_object(s) for s in studies]
    if stored_as is not None and patient_id is not None:
        relabelled = patient_object(patient_id)
        detail = ParticipantObjectDetail.text(STORED_AS_DETAIL, stored_as)
        objects.append(replace(relabelled, details=(*relabelled.details, detail)))
        patient_id = None
    return _message(event, participants, audit_source, objects, patient_id, on_behalf_of)


#: Detail type of the patient id instances were stored under when a transfer relabelled them.
STORED_AS_DETAIL: Final = "StoredAsPatientID"


def application_activity(
    *,
    started: bool,
    application: Peer,
    audit_source: AuditSourceIdentification,
    when: datetime | None = None,
) -> AuditMessage:
    """Gateway start or stop (PS3.15 A.5.3.1): gaps in the trail are only explainable if these exist."""
    event = EventIdentification(EVENT_APPLICATION_ACTIVITY, EventAction.EXECUTE, _now(when),
                                EventOutcome.SUCCESS, (APPLICATION_START if started else APPLICATION_STOP,))
    participant = active_participant(application, requestor=False, role=ROLE_APPLICATION)
    return _message(event, [participant], audit_source, [], None)


#: PS3.16 CID 400 "Patient Record": Mitz's consent notification updates what DUO knows of the patient's
#: consent record (action U); a Subscription creates a patient-specific record at Mitz (action C).
EVENT_PATIENT_RECORD = Code("110110", "DCM", "Patient Record")
MITZ_NOTIFICATION = Code("MITZ-NOTIFY", MITZ_CODE_SYSTEM, "Mitz Toestemmingsnotificatie")


def mitz_consent_notification(
    *,
    mitz: Peer,
    gateway: Peer,
    audit_source: AuditSourceIdentification,
    notification_id: str | None,
    bsn: str | None,
    holder_ura: str | None,
    result: str,
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
) -> AuditMessage:
    """Mitz (source, requestor) posting a consent notification to the gateway (destination).

    Recorded for every notification received, rejected ones included (then ``bsn`` is None: nothing
    in a body that failed validation is trusted as a patient identifier). ``result`` says what the
    gateway did: e.g. ``permit``/``deny`` when acted on, ``ignored`` for a holder it does not
    represent, ``rejected`` for an invalid body. ``notification_id`` is the Bundle id when there is one.
    """
    details = [ParticipantObjectDetail.text("MitzResult", result)]
    if holder_ura is not None:
        details.append(ParticipantObjectDetail.text("providerid", holder_ura))
    notification = ParticipantObjectIdentification(
        object_id=notification_id or "unidentified",
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.REPORT,
        id_type_code=MITZ_NOTIFICATION,
        details=tuple(details),
    )
    event = EventIdentification(EVENT_PATIENT_RECORD, EventAction.UPDATE, _now(when), outcome,
                                (MITZ_NOTIFICATION,), outcome_description)
    participants = [
        active_participant(mitz, requestor=True, role=ROLE_SOURCE),
        active_participant(gateway, requestor=False, role=ROLE_DESTINATION),
    ]
    return _message(event, participants, audit_source, [notification],
                    bsn_cx(bsn) if bsn is not None else None)


TLB_TIMELINE = Code("TLB-TIMELINE", MITZ_CODE_SYSTEM, "TLB Tijdlijn")


def timeline_disclosure(
    *,
    gateway: Peer,
    requestor: Requestor,
    audit_source: AuditSourceIdentification,
    bsn: str,
    study_uids: Sequence[str],
    sources: Sequence[str],
    outcome: EventOutcome = EventOutcome.SUCCESS,
    outcome_description: str | None = None,
    when: datetime | None = None,
    client: Peer | None = None,
) -> AuditMessage:
    """The timeline DUO handed to a TLB requester: an Export (DCM 110106) of study metadata.

    Every study disclosed is its own Study Instance UID object, so an Audit Record Repository can
    answer "who saw which study of this patient"; the sources asked go in a detail for context.
    ``requestor`` is the professional and organisation; ``client``, when known, the TLB system that
    carried the request (the Destination of the metadata).
    """
    event = EventIdentification(EVENT_EXPORT, EventAction.READ, _now(when), outcome, (TLB_TIMELINE,),
                                outcome_description)
    participants = [active_participant(gateway, requestor=False, role=ROLE_SOURCE)]
    if client is not None:
        participants.append(active_participant(client, requestor=True, role=ROLE_DESTINATION))
    objects = [_study_object(StudyTransfer(uid)) for uid in study_uids]
    if sources:
        objects.append(ParticipantObjectIdentification(
            object_id="timeline-sources", type_code=ObjectType.SYSTEM_OBJECT, type_code_role=ObjectRole.QUERY,
            id_type_code=TLB_TIMELINE,
            details=(ParticipantObjectDetail.text("Sources", ",".join(sources)),)))
    return _message(event, participants, audit_source, objects, bsn_cx(bsn), requestor)
