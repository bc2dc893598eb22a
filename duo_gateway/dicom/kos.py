"""Key Object Selection (KOS) manifests for XDS-I.b / XCA-I (xca.md §7), built without any I/O.

The input is a flat list of instance references, as a C-FIND at IMAGE level returns them, so the same
builder serves the simulator (which knows its datasets) and the real gateway (which only sees a PACS
through queries). The SOP Instance UID is a function of the study and the referenced instances: the
XDS uniqueId of the manifest stays stable across re-indexing, and a changed study gets a new one.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from io import BytesIO

from pydicom import dcmread
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.multival import MultiValue
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


def _str(value: object) -> str | None:
    """A single DICOM value as text: the first of a multi-value (e.g. several AE titles), stripped."""
    if isinstance(value, MultiValue | list | tuple):
        value = value[0] if len(value) else None
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def parse_kos(data: bytes) -> KosManifest:
    """The study, patient and per-series instance references of a KOS manifest (xca.md §7).

    Reads what :func:`build_kos` writes and what other sources write: a Part 10 file with or
    without preamble, several evidence items for one series (merged), RetrieveLocationUID and
    RetrieveAETitle on the series item or, failing that, on the instance items. Only the evidence of
    the manifest's own study is returned: that is the study an XDS-I entry stands for; a reference
    to another study (a prior, say) is not part of this study's transfer.
    """
    try:
        ds = dcmread(BytesIO(data), force=True)
        sop_class = _str(ds.get("SOPClassUID"))
        evidence = list(ds.get("CurrentRequestedProcedureEvidenceSequence") or ())
        own_study = _str(ds.get("StudyInstanceUID"))
        patient_id = _str(ds.get("PatientID")) or ""
        issuer = _str(ds.get("IssuerOfPatientID"))
        sop_uid = _str(ds.get("SOPInstanceUID")) or ""
    except Exception as exc:  # pydicom raises many types on hostile input
        raise KosError(f"not a readable DICOM object: {type(exc).__name__}: {exc}") from exc
    if sop_class is not None and sop_class != KOS_SOP_CLASS_UID:
        raise KosError(f"SOP Class {sop_class} is not Key Object Selection")
    if not evidence:
        raise KosError("manifest without Current Requested Procedure Evidence Sequence")
    studies = {_str(item.get("StudyInstanceUID")) for item in evidence} - {None}
    study_uid = own_study if own_study in studies else (next(iter(studies)) if len(studies) == 1 else None)
    if study_uid is None:
        raise KosError("no evidence for the manifest's own study")
    merged: dict[str, tuple[str | None, str | None, dict[str, str]]] = {}
    try:
        for item in evidence:
            if _str(item.get("StudyInstanceUID")) != study_uid:
                continue
            for series in item.get("ReferencedSeriesSequence") or ():
                series_uid = _str(series.get("SeriesInstanceUID"))
                if series_uid is None:
                    raise KosError("referenced series without SeriesInstanceUID")
                location = _str(series.get("RetrieveLocationUID"))
                ae_title = _str(series.get("RetrieveAETitle"))
                known_location, known_ae, instances = merged.setdefault(series_uid, (None, None, {}))
                for sop in series.get("ReferencedSOPSequence") or ():
                    sop_class_uid = _str(sop.get("ReferencedSOPClassUID"))
                    instance_uid = _str(sop.get("ReferencedSOPInstanceUID"))
                    if sop_class_uid is None or instance_uid is None:
                        raise KosError(f"series {series_uid}: a reference without SOP Class/Instance UID")
                    instances.setdefault(instance_uid, sop_class_uid)
                    location = location or _str(sop.get("RetrieveLocationUID"))
                    ae_title = ae_title or _str(sop.get("RetrieveAETitle"))
                merged[series_uid] = (known_location or location, known_ae or ae_title, instances)
    except KosError:
        raise
    except Exception as exc:
        raise KosError(f"malformed evidence: {type(exc).__name__}: {exc}") from exc
    series_list = tuple(
        KosSeries(uid, location, ae, tuple((cls, inst) for inst, cls in instances.items()))
        for uid, (location, ae, instances) in merged.items() if instances
    )
    if not series_list:
        raise KosError("manifest references no instances")
    return KosManifest(sop_uid, study_uid, patient_id, issuer, series_list)
