"""Key Object Selection (KOS) manifests for XDS-I.b / XCA-I (xca.md §7), built without any I/O.

The input is a flat list of instance references, as a C-FIND at IMAGE level returns them, so the same
builder serves the simulator (which knows its datasets) and the real gateway (which only sees a PACS
through queries). The SOP Instance UID is a function of the study and the referenced instances: the
XDS uniqueId of the manifest stays stable across re-indexing, and a changed study gets a new one.
"""

from __future__ import annotations

import struct
import uuid
import zlib
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from functools import partial
from io import BytesIO
from typing import Final

from pydicom.charset import convert_encodings, decode_bytes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, UID, ExplicitVRLittleEndian

KOS_SOP_CLASS_UID = UID("1.2.840.10008.5.1.4.1.1.88.59")
#: Namespace of the manifest UIDs; changing it changes every manifest's XDS uniqueId.
_KOS_NAMESPACE = uuid.UUID("c3a4e1d2-7b5f-5e0a-8f6d-4b4f53000001")
_IMPLEMENTATION_VERSION = "DUO_GW_KOS_1"

#: SOP class UID prefixes that are not images and so are referenced as COMPOSITE, not IMAGE
#: (SR and KOS documents, presentation states, waveforms, encapsulated documents, raw data, ...).
_NON_IMAGE_PREFIXES = (
    "1.2.840.10008.5.1.4.1.1.88.",  # structured reports, KOS
    "1.2.840.10008.5.1.4.1.1.11.",  # presentation states
    "1.2.840.10008.5.1.4.1.1.9.",  # waveforms
    "1.2.840.10008.5.1.4.1.1.104.",  # encapsulated PDF / CDA / STL
    "1.2.840.10008.5.1.4.1.1.66",  # raw data, spatial registration, segmentation-free fiducials
    "1.2.840.10008.5.1.4.1.1.481.",  # RT objects (RT Image is the exception, handled below)
)
_IMAGE_EXCEPTIONS = frozenset({"1.2.840.10008.5.1.4.1.1.481.1"})  # RT Image Storage


@dataclass(frozen=True, order=True)
class InstanceRef:
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str


@dataclass(frozen=True)
class KosPatient:
    patient_id: str
    name: str = ""
    issuer_of_patient_id: str | None = None
    #: ISO OID of the issuer (IssuerOfPatientIDQualifiersSequence), e.g. the BSN OID.
    issuer_oid: str | None = None
    birth_date: str = ""
    sex: str = ""


@dataclass(frozen=True)
class KosStudy:
    study_instance_uid: str
    study_date: str = ""
    study_time: str = ""
    accession_number: str = ""
    study_id: str = ""
    description: str | None = None
    referring_physician_name: str = ""


def is_image_sop_class(sop_class_uid: str) -> bool:
    if sop_class_uid in _IMAGE_EXCEPTIONS:
        return True
    return not sop_class_uid.startswith(_NON_IMAGE_PREFIXES)


def _name_uid(*parts: str) -> UID:
    return UID(f"2.25.{uuid.uuid5(_KOS_NAMESPACE, '|'.join(parts)).int}")


def kos_sop_instance_uid(study_instance_uid: str, refs: Iterable[InstanceRef]) -> UID:
    """Deterministic: same study and same set of instances (in any order) give the same UID."""
    members = sorted({(r.series_instance_uid, r.sop_class_uid, r.sop_instance_uid) for r in refs})
    return _name_uid("kos", study_instance_uid, *(":".join(m) for m in members))


def kos_series_instance_uid(study_instance_uid: str) -> UID:
    """One manifest series per study, so successive manifests of a growing study share it."""
    return _name_uid("kos-series", study_instance_uid)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def build_kos(
    instance_refs: Iterable[InstanceRef | tuple[str, str, str]],
    study: KosStudy,
    patient: KosPatient,
    *,
    retrieve_ae_title: str | None = None,
    retrieve_location_uid: str | None = None,
    content_date: str | None = None,
    content_time: str | None = None,
    institution_name: str | None = None,
    manufacturer: str = "duo-gateway",
    series_number: int = 999,
) -> Dataset:
    """A Key Object Selection Document titled "Manifest" (113030, DCM) referencing every instance.

    ``retrieve_location_uid`` is the Imaging Document Source's repositoryUniqueId, which XCA-I
    consumers copy into RAD-69/75 DocumentRequests; ``retrieve_ae_title`` lets DICOM consumers
    C-MOVE instead. Content date/time default to the study's so the output is reproducible.
    """
    refs = sorted({r if isinstance(r, InstanceRef) else InstanceRef(*r) for r in instance_refs})
    if not refs:
        raise ValueError("a manifest must reference at least one instance")
    sop_uid = kos_sop_instance_uid(study.study_instance_uid, refs)

    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = KOS_SOP_CLASS_UID
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds.file_meta.ImplementationVersionName = _IMPLEMENTATION_VERSION

    # SOP Common
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.SOPClassUID = KOS_SOP_CLASS_UID
    ds.SOPInstanceUID = sop_uid
    # Patient
    ds.PatientName = patient.name
    ds.PatientID = patient.patient_id
    if patient.issuer_of_patient_id:
        ds.IssuerOfPatientID = patient.issuer_of_patient_id
    if patient.issuer_oid:
        qualifiers = Dataset()
        qualifiers.UniversalEntityID = patient.issuer_oid
        qualifiers.UniversalEntityIDType = "ISO"
        ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifiers])
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    # General Study
    ds.StudyInstanceUID = study.study_instance_uid
    ds.StudyDate = study.study_date
    ds.StudyTime = study.study_time
    ds.ReferringPhysicianName = study.referring_physician_name
    ds.StudyID = study.study_id
    ds.AccessionNumber = study.accession_number
    if study.description:
        ds.StudyDescription = study.description
    # Key Object Document Series
    ds.Modality = "KO"
    ds.SeriesInstanceUID = kos_series_instance_uid(study.study_instance_uid)
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "XDS-I Manifest"
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    # General Equipment
    ds.Manufacturer = manufacturer
    if institution_name:
        ds.InstitutionName = institution_name
    # Key Object Document
    ds.InstanceNumber = 1
    ds.ContentDate = content_date if content_date is not None else study.study_date
    ds.ContentTime = content_time if content_time is not None else study.study_time
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence(
        [evidence_item(study.study_instance_uid, refs, retrieve_ae_title, retrieve_location_uid)]
    )
    # SR Document Content, TID 2010 (Key Object Selection)
    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("113030", "DCM", "Manifest")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2010"
    ds.ContentTemplateSequence = DicomSequence([template])
    ds.ContentSequence = DicomSequence([_content_item(r) for r in refs])
    return ds


def evidence_item(
    study_uid: str, refs: Iterable[InstanceRef], ae_title: str | None = None, location_uid: str | None = None
) -> Dataset:
    """One study item of a (Current Requested Procedure / Pertinent Other) Evidence Sequence.

    Shared by the KOS manifest and SR reports, which list the images they refer to the same way.
    """
    by_series: dict[str, list[InstanceRef]] = {}
    for r in refs:
        by_series.setdefault(r.series_instance_uid, []).append(r)
    series_items = []
    for series_uid, members in by_series.items():
        item = Dataset()
        item.SeriesInstanceUID = series_uid
        if ae_title:
            item.RetrieveAETitle = ae_title
        if location_uid:
            item.RetrieveLocationUID = location_uid
        sop_items = []
        for m in members:
            sop = Dataset()
            sop.ReferencedSOPClassUID = m.sop_class_uid
            sop.ReferencedSOPInstanceUID = m.sop_instance_uid
            sop_items.append(sop)
        item.ReferencedSOPSequence = DicomSequence(sop_items)
        series_items.append(item)
    study = Dataset()
    study.StudyInstanceUID = study_uid
    study.ReferencedSeriesSequence = DicomSequence(series_items)
    return study


def _content_item(ref: InstanceRef) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "IMAGE" if is_image_sop_class(ref.sop_class_uid) else "COMPOSITE"
    sop = Dataset()
    sop.ReferencedSOPClassUID = ref.sop_class_uid
    sop.ReferencedSOPInstanceUID = ref.sop_instance_uid
    item.ReferencedSOPSequence = DicomSequence([sop])
    return item


def instance_refs(datasets: Iterable[Dataset]) -> list[InstanceRef]:
    """References of datasets already in hand (or C-FIND IMAGE-level identifiers)."""
    return [
        InstanceRef(str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.SOPInstanceUID)) for ds in datasets
    ]


def encode_part10(ds: Dataset) -> bytes:
    """The DICOM Part-10 file bytes (what an XDS-I repository stores and ITI-39 returns)."""
    buf = BytesIO()
    dcmwrite(buf, ds, enforce_file_format=True)
    return buf.getvalue()


# --- reading manifests ------------------------------------------------------------------------------


class KosError(ValueError):
    """Bytes that are not a usable KOS manifest (not DICOM, not a KOS, or without evidence)."""


@dataclass(frozen=True)
class KosSeries:
    """One referenced series as a consumer needs it to ask for the images (RAD-69/75 or C-MOVE)."""

    series_instance_uid: str
    #: RetrieveLocationUID: the Imaging Document Source's repositoryUniqueId for RAD-69/75.
    retrieve_location_uid: str | None
    retrieve_ae_title: str | None
    #: (SOP Class UID, SOP Instance UID) in manifest order, duplicates dropped.
    instances: tuple[tuple[str, str], ...]

    @property
    def sop_instance_uids(self) -> tuple[str, ...]:
        return tuple(uid for _, uid in self.instances)


@dataclass(frozen=True)
class KosManifest:
    sop_instance_uid: str
    study_instance_uid: str
    patient_id: str
    issuer_of_patient_id: str | None
    series: tuple[KosSeries, ...]

    @property
    def instance_count(self) -> int:
        return sum(len(s.instances) for s in self.series)


# How a manifest is read: a walker over its bytes instead of pydicom's dcmread. pydicom makes a
# Dataset, a DataElement and a validated UID object per reference and the collector then walks them
# all: ~150-400 us per referenced instance, rising with the count (a 64 MiB manifest, ~880,000
# references, was minutes of CPU holding the GIL, and gen-2 collections over millions of objects
# paused the event loop). The walker reads only the elements a transfer needs, keeps two strings per
# reference, and skips everything else by its length: ~9 us per reference, flat (docs/performance.md,
# "Bounded answers and KOS manifests").

_UNDEFINED: Final = 0xFFFFFFFF
_ITEM: Final = 0xFFFEE000
_ITEM_END: Final = 0xFFFEE00D
_SEQUENCE_END: Final = 0xFFFEE0DD
#: Explicit VRs with a 2-byte reserved field and a 4-byte length (PS3.5 7.1.2).
_LONG_VRS: Final = frozenset({b"OB", b"OD", b"OF", b"OL", b"OV", b"OW", b"SQ", b"SV", b"UC", b"UN", b"UR",
                              b"UT", b"UV"})
_VRS: Final = _LONG_VRS | {b"AE", b"AS", b"AT", b"CS", b"DA", b"DS", b"DT", b"FL", b"FD", b"IS", b"LO",
                           b"LT", b"PN", b"SH", b"SL", b"SS", b"ST", b"TM", b"UI", b"UL", b"US"}
#: Deeper nesting than this is no manifest (a KOS nests three levels for its references).
_MAX_DEPTH: Final = 32
#: A deflated manifest is inflated up to this size, no further.
MAX_INFLATED_BYTES: Final = 64 * 1024 * 1024
_IMPLICIT_LE: Final = "1.2.840.10008.1.2"
_EXPLICIT_BE: Final = "1.2.840.10008.1.2.2"
_DEFLATED_LE: Final = "1.2.840.10008.1.2.1.99"

_SPECIFIC_CHARACTER_SET: Final = 0x00080005
_SOP_CLASS: Final = 0x00080016
_SOP_INSTANCE: Final = 0x00080018
_RETRIEVE_AE_TITLE: Final = 0x00080054
_REFERENCED_SERIES: Final = 0x00081115
_REFERENCED_SOP_CLASS: Final = 0x00081150
_REFERENCED_SOP_INSTANCE: Final = 0x00081155
_REFERENCED_SOP: Final = 0x00081199
_PATIENT_ID: Final = 0x00100020
_ISSUER_OF_PATIENT_ID: Final = 0x00100021
_STUDY_INSTANCE: Final = 0x0020000D
_SERIES_INSTANCE: Final = 0x0020000E
_EVIDENCE: Final = 0x0040A375
_RETRIEVE_LOCATION: Final = 0x0040E011

#: (tag, VR or None when implicit, value offset, value length or _UNDEFINED)
_Header = tuple[int, bytes | None, int, int]


class _Malformed(Exception):
    """The bytes break DICOM's encoding rules (turned into a KosError by parse_kos)."""


class _Walker:
    """Element headers, values and nesting of one encoding (implicit/explicit VR, byte order) over one
    buffer. Every value is located by its length; nothing is decoded that is not asked for."""

    __slots__ = ("_tag", "_u16", "_u32", "data", "implicit")

    def __init__(self, data: bytes, *, implicit: bool, little: bool) -> None:
        self.data = data
        self.implicit = implicit
        order = "<" if little else ">"
        self._tag = struct.Struct(order + "HH")
        self._u16 = struct.Struct(order + "H")
        self._u32 = struct.Struct(order + "I")

    def header(self, pos: int) -> _Header:
        group, element = self._tag.unpack_from(self.data, pos)
        if self.implicit or group == 0xFFFE:  # items and delimiters never carry a VR
            return group << 16 | element, None, pos + 8, self._u32.unpack_from(self.data, pos + 4)[0]
        vr = self.data[pos + 4:pos + 6]
        if vr in _LONG_VRS:
            return group << 16 | element, vr, pos + 12, self._u32.unpack_from(self.data, pos + 8)[0]
        return group << 16 | element, vr, pos + 8, self._u16.unpack_from(self.data, pos + 6)[0]

    def _inner(self, vr: bytes | None) -> _Walker:
        """Who reads a sequence's content: UN content is Implicit VR Little Endian (PS3.5 6.2.2)."""
        if vr == b"UN" and not self.implicit:
            return _Walker(self.data, implicit=True, little=True)
        return self

    def end_of(self, vr: bytes | None, pos: int, length: int, depth: int) -> int:
        """Where a value that starts at ``pos`` ends (for undefined lengths: after its delimiter)."""
        if length != _UNDEFINED:
            end = pos + length
            if end > len(self.data):
                raise _Malformed(f"a value of {length} bytes runs past the end")
            return end
        return self._inner(vr)._skip_items(pos, depth + 1)

    def _skip_items(self, pos: int, depth: int) -> int:
        if depth > _MAX_DEPTH:
            raise _Malformed("sequences nested too deep")
        while True:
            tag, _, start, length = self.header(pos)
            if tag == _SEQUENCE_END:
                return start
            if tag != _ITEM:
                raise _Malformed(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item was due")
            if length == _UNDEFINED:
                pos = self._skip_dataset(start, depth)
            else:
                pos = self.end_of(None, start, length, depth)

    def _skip_dataset(self, pos: int, depth: int) -> int:
        while True:
            tag, vr, start, length = self.header(pos)
            if tag == _ITEM_END:
                return start
            pos = self.end_of(vr, start, length, depth)

    def dataset(self, pos: int, end: int | None, depth: int, visit: Callable[[_Header], int | None]) -> int:
        """Hand each element of the dataset at ``pos`` to ``visit``, up to ``end`` or, when None, the
        item delimiter; returns where the dataset ends (after the delimiter).

        ``visit`` returns where the element's value ends when it read the value itself (so nothing is
        scanned twice), None to have it skipped, or :data:`_STOP` to end the walk there.
        """
        limit = len(self.data) if end is None else end
        while pos < limit:
            header = self.header(pos)
            if header[0] == _ITEM_END and end is None:
                return header[2]
            done = visit(header)
            if done == _STOP:
                return pos
            pos = self.end_of(header[1], header[2], header[3], depth) if done is None else done
        if end is None:
            raise _Malformed("an item without its delimiter")
        if pos > end:
            raise _Malformed("an element runs past its item")
        return pos

    def sequence(self, vr: bytes | None, pos: int, length: int, depth: int,
                 visit: Callable[[_Walker, int, int | None], int]) -> int:
        """Hand each item of the sequence value at ``pos`` to ``visit`` (its walker, where its dataset
        starts, and where it ends, None for undefined) which returns where the item ended; returns
        where the value ends."""
        if depth > _MAX_DEPTH:
            raise _Malformed("sequences nested too deep")
        walker = self._inner(vr)
        end = None if length == _UNDEFINED else self.end_of(vr, pos, length, depth)
        limit = len(self.data) if end is None else end
        while pos < limit:
            tag, _, start, item_length = walker.header(pos)
            if tag == _SEQUENCE_END:
                return start if end is None else end
            if tag != _ITEM:
                raise _Malformed(f"({tag >> 16:04X},{tag & 0xFFFF:04X}) where a sequence item was due")
            item_end = None if item_length == _UNDEFINED else walker.end_of(None, start, item_length, depth)
            pos = visit(walker, start, item_end)
            if item_end is not None and pos != item_end:
                raise _Malformed("an item's elements do not fill its length")
        if end is None:
            raise _Malformed("a sequence without its delimiter")
        return end

    def text(self, pos: int, length: int) -> str | None:
        """The first value of a UI/AE/CS element (DICOM's default repertoire), stripped; None if empty."""
        if length == _UNDEFINED:
            raise _Malformed("a text value of undefined length")
        first = self.data[pos:pos + length].split(b"\\", 1)[0].strip(b" \0")
        return first.decode("ascii") if first else None


def _open(data: bytes) -> tuple[_Walker, int]:
    """The walker of the dataset's encoding and where the dataset starts: after the preamble and the
    File Meta Information when present; a bare dataset is explicit VR when its first element has a VR
    (what pydicom's ``force`` guesses too)."""
    pos = 132 if data[128:132] == b"DICM" else 0
    meta = _Walker(data, implicit=False, little=True)
    syntax: str | None = None
    while data[pos:pos + 2] == b"\x02\x00":  # group 0002 is Explicit VR Little Endian
        tag, vr, start, length = meta.header(pos)
        if tag == 0x00020010:
            syntax = meta.text(start, length)
        pos = meta.end_of(vr, start, length, 0)
    if syntax is None:
        return _Walker(data, implicit=data[pos + 4:pos + 6] not in _VRS, little=True), pos
    if syntax == _IMPLICIT_LE:
        return _Walker(data, implicit=True, little=True), pos
    if syntax == _EXPLICIT_BE:
        return _Walker(data, implicit=False, little=False), pos
    if syntax == _DEFLATED_LE:
        inflater = zlib.decompressobj(-zlib.MAX_WBITS)
        inflated = inflater.decompress(data[pos:], MAX_INFLATED_BYTES)
        if inflater.unconsumed_tail or (len(inflated) == MAX_INFLATED_BYTES and not inflater.eof):
            raise _Malformed(f"inflates to more than {MAX_INFLATED_BYTES} bytes")
        return _Walker(inflated, implicit=False, little=True), 0
    return _Walker(data, implicit=False, little=True), pos  # every other syntax encodes explicit LE


def _decode(walker: _Walker, pos: int, length: int, charset: list[str]) -> str | None:
    """A LO value (patient id, issuer) in the dataset's Specific Character Set; the first value, stripped."""
    if length == _UNDEFINED:
        raise _Malformed("a text value of undefined length")
    text = decode_bytes(walker.data[pos:pos + length], charset, {0x5C}).split("\\", 1)[0].strip(" \0")
    return text or None


@dataclass
class _Top:
    """What the manifest says at its top level, and its evidence by study."""

    sop_class: str | None = None
    sop_instance: str = ""
    study: str | None = None
    patient_id: str = ""
    issuer: str | None = None
    evidence: int = 0
    #: Study UID -> its references (series UID -> location, AE title, {instance: class}), in manifest
    #: order, with the first reason a reference of that study was unusable.
    studies: dict[str | None, tuple[_Merged, KosError | None]] = field(default_factory=dict)


_Merged = dict[str, tuple[str | None, str | None, dict[str, str]]]
_STOP: Final = -1


def _read(data: bytes) -> _Top:
    walker, start = _open(data)
    top = _Top()
    charset = convert_encodings(None)

    def visit(header: _Header) -> int | None:
        nonlocal charset
        tag, vr, pos, length = header
        if tag == _SPECIFIC_CHARACTER_SET:
            raw = walker.data[pos:pos + length].decode("ascii", "replace")
            charset = convert_encodings([v.strip() for v in raw.split("\\")])
        elif tag == _SOP_CLASS:
            top.sop_class = walker.text(pos, length)
        elif tag == _SOP_INSTANCE:
            top.sop_instance = walker.text(pos, length) or ""
        elif tag == _PATIENT_ID:
            top.patient_id = _decode(walker, pos, length, charset) or ""
        elif tag == _ISSUER_OF_PATIENT_ID:
            top.issuer = _decode(walker, pos, length, charset)
        elif tag == _STUDY_INSTANCE:
            top.study = walker.text(pos, length)
        elif tag == _EVIDENCE:
            return walker.sequence(vr, pos, length, 1, partial(_read_study, top))
        elif tag > _EVIDENCE:
            return _STOP  # elements come in tag order: the content tree after it is not needed
        return None

    walker.dataset(start, len(walker.data), 0, visit)
    return top


def _read_study(top: _Top, walker: _Walker, start: int, end: int | None) -> int:
    """One evidence item: its series are read before its StudyInstanceUID (tag order), so they are
    gathered first and filed under the study once the item is complete."""
    top.evidence += 1
    series: _Merged = {}
    problem: KosError | None = None
    study: str | None = None

    def visit(header: _Header) -> int | None:
        nonlocal problem, study
        tag, vr, pos, length = header
        if tag == _REFERENCED_SERIES:
            def one(item: _Walker, item_start: int, item_end: int | None) -> int:
                nonlocal problem
                try:
                    return _read_series(item, item_start, item_end, series)
                except KosError as exc:  # only an error if this turns out to be the manifest's study
                    problem = problem or exc
                    return item.dataset(item_start, item_end, 3, lambda _: None)
            return walker.sequence(vr, pos, length, 2, one)
        if tag == _STUDY_INSTANCE:
            study = walker.text(pos, length)
        return None

    after = walker.dataset(start, end, 2, visit)
    known, known_problem = top.studies.get(study, ({}, None))
    for uid, (location, ae_title, instances) in series.items():
        old_location, old_ae, old_instances = known.get(uid, (None, None, {}))
        for instance, sop_class in instances.items():
            old_instances.setdefault(instance, sop_class)
        known[uid] = (old_location or location, old_ae or ae_title, old_instances)
    top.studies[study] = (known, known_problem or problem)
    return after


def _read_series(walker: _Walker, start: int, end: int | None, merged: _Merged) -> int:
    """One ReferencedSeriesSequence item into ``merged``; returns where the item ends."""
    series_uid: str | None = None
    location: str | None = None
    ae_title: str | None = None
    instances: dict[str, str] = {}

    #: The elements of the reference being read, and the first location and AE title met on one.
    found: dict[int, str | None] = {}
    sop_location: str | None = None
    sop_ae: str | None = None
    reader = walker

    def visit_sop(header: _Header) -> None:
        if header[0] in _SOP_TAGS:
            found[header[0]] = reader.text(header[2], header[3])

    def sop(item: _Walker, item_start: int, item_end: int | None) -> int:
        nonlocal reader, sop_location, sop_ae
        found.clear()
        reader = item
        after = item.dataset(item_start, item_end, 4, visit_sop)
        sop_class, instance = found.get(_REFERENCED_SOP_CLASS), found.get(_REFERENCED_SOP_INSTANCE)
        if sop_class is None or instance is None:
            raise KosError(f"series {series_uid or '?'}: a reference without SOP Class/Instance UID")
        instances.setdefault(instance, sop_class)
        sop_location = sop_location or found.get(_RETRIEVE_LOCATION)
        sop_ae = sop_ae or found.get(_RETRIEVE_AE_TITLE)
        return after

    def visit(header: _Header) -> int | None:
        nonlocal series_uid, location, ae_title
        tag, vr, pos, length = header
        if tag == _SERIES_INSTANCE:
            series_uid = walker.text(pos, length)
        elif tag == _RETRIEVE_LOCATION:
            location = walker.text(pos, length)
        elif tag == _RETRIEVE_AE_TITLE:
            ae_title = walker.text(pos, length)
        elif tag == _REFERENCED_SOP:
            return walker.sequence(vr, pos, length, 3, sop)
        return None

    after = walker.dataset(start, end, 3, visit)
    if series_uid is None:
        raise KosError("referenced series without SeriesInstanceUID")
    # The series item's own location and AE title first, else the first instance item's.
    location = location or sop_location
    ae_title = ae_title or sop_ae
    known_location, known_ae, known = merged.get(series_uid, (None, None, {}))
    for instance, sop_class in instances.items():
        known.setdefault(instance, sop_class)
    merged[series_uid] = (known_location or location, known_ae or ae_title, known)
    return after


_SOP_TAGS: Final = frozenset({_REFERENCED_SOP_CLASS, _REFERENCED_SOP_INSTANCE, _RETRIEVE_LOCATION,
                              _RETRIEVE_AE_TITLE})


def parse_kos(data: bytes) -> KosManifest:
    """The study, patient and per-series instance references of a KOS manifest (xca.md §7).

    Reads what :func:`build_kos` writes and what other sources write: a Part 10 file with or
    without preamble (or a bare dataset), in any of the uncompressed transfer syntaxes or deflated,
    sequences and items of defined or undefined length; several evidence items for one series
    (merged), RetrieveLocationUID and RetrieveAETitle on the series item or, failing that, on the
    instance items. Only the evidence of the manifest's own study is returned: that is the study an
    XDS-I entry stands for; a reference to another study (a prior, say) is not part of this study's
    transfer. Time and memory are linear in the manifest's size: every byte is looked at once.
    """
    try:
        top = _read(data)
    except KosError:
        raise
    except (_Malformed, struct.error, zlib.error, UnicodeDecodeError, LookupError) as exc:
        raise KosError(f"not a readable DICOM object: {type(exc).__name__}: {exc}") from exc
    if top.sop_class is not None and top.sop_class != KOS_SOP_CLASS_UID:
        raise KosError(f"SOP Class {top.sop_class} is not Key Object Selection")
    if not top.evidence:
        raise KosError("manifest without Current Requested Procedure Evidence Sequence")
    named = set(top.studies) - {None}
    study_uid = top.study if top.study in named else (next(iter(named)) if len(named) == 1 else None)
    if study_uid is None:
        raise KosError("no evidence for the manifest's own study")
    merged, problem = top.studies[study_uid]
    if problem is not None:
        raise problem
    series_list = tuple(
        KosSeries(uid, location, ae, tuple((cls, inst) for inst, cls in instances.items()))
        for uid, (location, ae, instances) in merged.items() if instances
    )
    if not series_list:
        raise KosError("manifest references no instances")
    return KosManifest(top.sop_instance, study_uid, top.patient_id, top.issuer, series_list)
