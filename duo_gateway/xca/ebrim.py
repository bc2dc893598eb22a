"""ebRIM 3.0 registry objects: the XDS DocumentEntry as ``rim:ExtrinsicObject`` and ``rim:ObjectRef``.

Output is strict (every element ordered and sized as rim.xsd demands, every required XDS attribute
present, ``home`` always ``urn:oid:``), input is lenient (missing optional metadata becomes ``None``,
bare OIDs are normalised, unknown slots are ignored) because peers are many and imperfect.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

from lxml import etree

from duo_gateway.xca.codes import (
    OBJECT_TYPE_CLASSIFICATION,
    OBJECT_TYPE_EXTERNAL_IDENTIFIER,
    REFERENCE_ID_LIST_SLOT,
    RIM_NS,
    EntryStatus,
    EntryType,
    Scheme,
)
from duo_gateway.xca.entry_ids import HomeCommunityIdError, is_urn_uuid, name_uuid, normalise_home
from duo_gateway.xca.hl7 import Code, Xon, check_dtm

#: ebRIM LongName: the longest ``rim:Value`` (and slot name) the schema allows.
LONG_NAME = 256
_LONG_NAME = LONG_NAME
_FREE_FORM = 1024


class MetadataError(ValueError):
    """Metadata we were asked to emit that would be invalid (strict on output)."""


def rim(local: str) -> str:
    return f"{{{RIM_NS}}}{local}"


@dataclass(frozen=True)
class Author:
    """One author of a document; for Dutch imaging the institution (XON with URA) is what matters."""

    institutions: tuple[Xon, ...] = ()
    person: str | None = None
    roles: tuple[str, ...] = ()
    specialties: tuple[str, ...] = ()


@dataclass(frozen=True)
class DocumentEntry:
    entry_uuid: str
    unique_id: str
    patient_id: str
    mime_type: str
    repository_unique_id: str | None
    home: str | None
    title: str | None = None
    status: str = EntryStatus.APPROVED
    object_type: str = EntryType.STABLE
    format_code: Code | None = None
    class_code: Code | None = None
    type_code: Code | None = None
    practice_setting_code: Code | None = None
    healthcare_facility_type_code: Code | None = None
    confidentiality_codes: tuple[Code, ...] = ()
    event_codes: tuple[Code, ...] = ()
    service_start_time: str | None = None
    service_stop_time: str | None = None
    creation_time: str | None = None
    reference_ids: tuple[str, ...] = ()
    authors: tuple[Author, ...] = ()
    language_code: str | None = None
    size: int | None = None
    hash: str | None = None
    source_patient_id: str | None = None
    version: str = "1"
    #: Slots this codec does not model, kept so an Initiating Gateway can pass them through.
    extra_slots: tuple[tuple[str, tuple[str, ...]], ...] = field(default=())

    @property
    def author_uras(self) -> set[str]:
        """URAs (8-digit) of the authoring institutions, for the timeline's institution post-filter."""
        return {x.ura for a in self.authors for x in a.institutions if x.ura is not None}


@dataclass(frozen=True)
class ObjectRef:
    id: str
    home: str | None


# --- building ---


def _value(text: str, what: str, limit: int = _LONG_NAME) -> str:
    if len(text) > limit:
        raise MetadataError(f"{what} is {len(text)} characters; ebRIM allows {limit}")
    return text


def add_slot(parent: etree._Element, name: str, values: Iterable[str]) -> etree._Element:
    slot = etree.SubElement(parent, rim("Slot"), name=_value(name, "slot name"))
    vl = etree.SubElement(slot, rim("ValueList"))
    for v in values:
        etree.SubElement(vl, rim("Value")).text = _value(v, f"value of slot {name}")
    return slot


def add_name(parent: etree._Element, text: str) -> None:
    name = etree.SubElement(parent, rim("Name"))
    etree.SubElement(name, rim("LocalizedString"), value=_value(text, "name", _FREE_FORM))


def _check_home(home: str | None) -> str:
    if home is None:
        raise MetadataError("every object a responding gateway returns needs a home (xca.md §5)")
    try:
        return normalise_home(home)
    except HomeCommunityIdError as exc:
        raise MetadataError(str(exc)) from exc


def _child_id(entry: DocumentEntry, role: str, index: int) -> str:
    # Deterministic ids for the nested objects keep a re-served entry byte-identical.
    return name_uuid(entry.entry_uuid, role, str(index))


def build_object_ref(ref: ObjectRef) -> etree._Element:
    el = etree.Element(rim("ObjectRef"), nsmap={"rim": RIM_NS})
    el.set("id", ref.id)
    el.set("home", _check_home(ref.home))
    return el


_REQUIRED_CODES = (
    "format_code", "class_code", "type_code", "practice_setting_code", "healthcare_facility_type_code",
)


def build_extrinsic_object(entry: DocumentEntry) -> etree._Element:
    """A complete stable DocumentEntry; refuses to emit one an XDS consumer would reject."""
    if not is_urn_uuid(entry.entry_uuid):
        raise MetadataError("entryUUID must be a urn:uuid")
    for name in _REQUIRED_CODES:
        if getattr(entry, name) is None:
            raise MetadataError(f"DocumentEntry.{name} is required")
    if not entry.confidentiality_codes:
        raise MetadataError("DocumentEntry.confidentialityCode is required")
    if not entry.repository_unique_id:
        raise MetadataError("DocumentEntry.repositoryUniqueId is required for retrieval")
    for t in (entry.service_start_time, entry.service_stop_time, entry.creation_time):
        if t is not None:
            check_dtm(t)
    home = _check_home(entry.home)

    eo = etree.Element(rim("ExtrinsicObject"), nsmap={"rim": RIM_NS})
    eo.set("id", entry.entry_uuid)
    eo.set("lid", entry.entry_uuid)
    eo.set("home", home)
    eo.set("objectType", entry.object_type)
    eo.set("status", entry.status)
    eo.set("mimeType", _value(entry.mime_type, "mimeType"))
    eo.set("isOpaque", "false")

    # Slots come first (IdentifiableType), in the order IPF and NIST samples use.
    if entry.creation_time:
        add_slot(eo, "creationTime", [entry.creation_time])
    if entry.hash:
        add_slot(eo, "hash", [entry.hash])
    if entry.language_code:
        add_slot(eo, "languageCode", [entry.language_code])
    add_slot(eo, "repositoryUniqueId", [entry.repository_unique_id])
    if entry.service_start_time:
        add_slot(eo, "serviceStartTime", [entry.service_start_time])
    if entry.service_stop_time:
        add_slot(eo, "serviceStopTime", [entry.service_stop_time])
    if entry.size is not None:
        add_slot(eo, "size", [str(entry.size)])
    add_slot(eo, "sourcePatientId", [entry.source_patient_id or entry.patient_id])
    if entry.reference_ids:
        add_slot(eo, REFERENCE_ID_LIST_SLOT, entry.reference_ids)
    for name, values in entry.extra_slots:
        add_slot(eo, name, values)
    if entry.title:
        add_name(eo, entry.title)
    etree.SubElement(eo, rim("VersionInfo"), versionName=entry.version)

    for i, author in enumerate(entry.authors):
        cl = _classification(eo, entry, Scheme.AUTHOR, "author", i, "")
        if author.person:
            add_slot(cl, "authorPerson", [author.person])
        if author.institutions:
            add_slot(cl, "authorInstitution", [str(x) for x in author.institutions])
        if author.roles:
            add_slot(cl, "authorRole", author.roles)
        if author.specialties:
            add_slot(cl, "authorSpecialty", author.specialties)
    codes: list[tuple[Scheme, str, Sequence[Code]]] = [
        (Scheme.CLASS_CODE, "classCode", [c for c in [entry.class_code] if c]),
        (Scheme.CONFIDENTIALITY_CODE, "confidentialityCode", entry.confidentiality_codes),
        (Scheme.EVENT_CODE_LIST, "eventCode", entry.event_codes),
        (Scheme.FORMAT_CODE, "formatCode", [c for c in [entry.format_code] if c]),
        (Scheme.HEALTHCARE_FACILITY_TYPE_CODE, "facilityCode",
         [c for c in [entry.healthcare_facility_type_code] if c]),
        (Scheme.PRACTICE_SETTING_CODE, "practiceCode", [c for c in [entry.practice_setting_code] if c]),
        (Scheme.TYPE_CODE, "typeCode", [c for c in [entry.type_code] if c]),
    ]
    for scheme, role, code_values in codes:
        for i, code in enumerate(code_values):
            cl = _classification(eo, entry, scheme, role, i, code.code)
            add_slot(cl, "codingScheme", [code.scheme])
            add_name(cl, code.display or code.code)
    _external_identifier(eo, entry, Scheme.PATIENT_ID, entry.patient_id, "XDSDocumentEntry.patientId")
    _external_identifier(eo, entry, Scheme.UNIQUE_ID, entry.unique_id, "XDSDocumentEntry.uniqueId")
    return eo


def _classification(
    eo: etree._Element, entry: DocumentEntry, scheme: Scheme, role: str, index: int, node: str
) -> etree._Element:
    cl = etree.SubElement(eo, rim("Classification"))
    cl.set("id", _child_id(entry, role, index))
    cl.set("objectType", OBJECT_TYPE_CLASSIFICATION)
    cl.set("classificationScheme", scheme)
    cl.set("classifiedObject", entry.entry_uuid)
    cl.set("nodeRepresentation", _value(node, "nodeRepresentation"))
    return cl


def _external_identifier(eo: etree._Element, entry: DocumentEntry, scheme: Scheme, value: str,
                         name: str) -> None:
    ei = etree.SubElement(eo, rim("ExternalIdentifier"))
    ei.set("id", _child_id(entry, name, 0))
    ei.set("objectType", OBJECT_TYPE_EXTERNAL_IDENTIFIER)
    ei.set("registryObject", entry.entry_uuid)
    ei.set("identificationScheme", scheme)
    ei.set("value", _value(value, name))
    add_name(ei, name)


# --- parsing ---
#
# An Initiating Gateway decodes every entry of every community's answer on its event loop, so this is
# one pass over each element's children with tag dispatch (no ElementPath ``find``, which compiles and
# walks a path per call, nor ``iterchildren(tag)``, whose set-up costs more than the few children it
# skips). What it reads is exactly what the path-based reading did: direct children
# only, slots of the same name concatenated, values stripped, the first ``Name/LocalizedString``.

_SLOT = rim("Slot")
_VALUE_LIST = rim("ValueList")
_VALUE = rim("Value")
_NAME = rim("Name")
_LOCALIZED_STRING = rim("LocalizedString")
_CLASSIFICATION = rim("Classification")
_EXTERNAL_IDENTIFIER = rim("ExternalIdentifier")
_VERSION_INFO = rim("VersionInfo")


def _slot_into(slot: etree._Element, out: dict[str, list[str]]) -> None:
    """Add one ``rim:Slot``'s values (``ValueList/Value`` texts, stripped) under its name."""
    values = out.setdefault(slot.get("name") or "", [])
    for value_list in slot:  # plain iteration with a tag test: cheaper than iterchildren(tag) here
        if value_list.tag == _VALUE_LIST:
            for value in value_list:
                if value.tag == _VALUE:
                    values.append((value.text or "").strip())


def _first(slots: dict[str, list[str]], name: str) -> str | None:
    values = slots.get(name)
    return values[0] if values and values[0] else None


def _localized(name: etree._Element) -> tuple[bool, str | None]:
    """(found, ``value``) of the first LocalizedString of one ``rim:Name``. Not found: the next Name
    is looked at, as the path ``Name/LocalizedString`` would."""
    for ls in name:
        if ls.tag == _LOCALIZED_STRING:
            return True, ls.get("value")
    return False, None


def _lenient_home(value: str | None) -> str | None:
    if not value:
        return None
    try:
        return normalise_home(value)
    except HomeCommunityIdError:
        return value  # kept verbatim so the initiator can name it in an XDSUnknownCommunity error


_MODELLED_SLOTS = frozenset({
    "creationTime", "hash", "languageCode", "repositoryUniqueId", "serviceStartTime", "serviceStopTime",
    "size", "sourcePatientId", REFERENCE_ID_LIST_SLOT,
})


def _read_classification(cl: etree._Element, codes: dict[str, list[Code]], authors: list[Author]) -> None:
    """One ``rim:Classification``: an author, or a code under its scheme."""
    scheme = cl.get("classificationScheme") or ""
    slots: dict[str, list[str]] = {}
    display: str | None = None
    named = False
    for child in cl:
        tag = child.tag
        if tag == _SLOT:
            _slot_into(child, slots)
        elif tag == _NAME and not named:
            named, display = _localized(child)
    if scheme == Scheme.AUTHOR:
        authors.append(Author(
            institutions=tuple(Xon.parse(v) for v in slots.get("authorInstitution", []) if v),
            person=_first(slots, "authorPerson"),
            roles=tuple(slots.get("authorRole", [])),
            specialties=tuple(slots.get("authorSpecialty", [])),
        ))
        return
    codes.setdefault(scheme, []).append(
        Code(cl.get("nodeRepresentation") or "", _first(slots, "codingScheme") or "", display))


def parse_extrinsic_object(eo: etree._Element) -> DocumentEntry:
    """Lenient: an entry missing optional metadata is still an entry; only the ids are required."""
    codes: dict[str, list[Code]] = {}
    authors: list[Author] = []
    idents: dict[str, str] = {}
    slots: dict[str, list[str]] = {}
    title: str | None = None
    named = False
    version: str | None = None
    for child in eo:
        tag = child.tag
        if tag == _CLASSIFICATION:
            _read_classification(child, codes, authors)
        elif tag == _SLOT:
            _slot_into(child, slots)
        elif tag == _EXTERNAL_IDENTIFIER:
            idents[child.get("identificationScheme") or ""] = (child.get("value") or "").strip()
        elif tag == _NAME and not named:
            named, title = _localized(child)
        elif tag == _VERSION_INFO and version is None:
            version = child.get("versionName", "1")
    size_text = _first(slots, "size")

    def one(scheme: Scheme) -> Code | None:
        values = codes.get(scheme)
        return values[0] if values else None

    return DocumentEntry(
        entry_uuid=eo.get("id") or "",
        unique_id=idents.get(Scheme.UNIQUE_ID, ""),
        patient_id=idents.get(Scheme.PATIENT_ID, ""),
        mime_type=eo.get("mimeType") or "application/octet-stream",
        repository_unique_id=_first(slots, "repositoryUniqueId"),
        home=_lenient_home(eo.get("home")),
        title=title,
        status=eo.get("status") or EntryStatus.APPROVED,
        object_type=eo.get("objectType") or EntryType.STABLE,
        format_code=one(Scheme.FORMAT_CODE),
        class_code=one(Scheme.CLASS_CODE),
        type_code=one(Scheme.TYPE_CODE),
        practice_setting_code=one(Scheme.PRACTICE_SETTING_CODE),
        healthcare_facility_type_code=one(Scheme.HEALTHCARE_FACILITY_TYPE_CODE),
        confidentiality_codes=tuple(codes.get(Scheme.CONFIDENTIALITY_CODE, [])),
        event_codes=tuple(codes.get(Scheme.EVENT_CODE_LIST, [])),
        service_start_time=_first(slots, "serviceStartTime"),
        service_stop_time=_first(slots, "serviceStopTime"),
        creation_time=_first(slots, "creationTime"),
        reference_ids=tuple(v for v in slots.get(REFERENCE_ID_LIST_SLOT, []) if v),
        authors=tuple(authors),
        language_code=_first(slots, "languageCode"),
        size=int(size_text) if size_text and size_text.isdigit() else None,
        hash=_first(slots, "hash"),
        source_patient_id=_first(slots, "sourcePatientId"),
        version=version if version is not None else "1",
        extra_slots=tuple((name, tuple(values)) for name, values in slots.items()
                          if name not in _MODELLED_SLOTS),
    )


def parse_object_ref(el: etree._Element) -> ObjectRef:
    return ObjectRef(el.get("id") or "", _lenient_home(el.get("home")))
