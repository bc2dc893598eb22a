"""PACS records -> XDS DocumentEntries and KOS manifests built when retrieved: the one mapping DUO and the
sim share.

DUO answers ITI-38 for the TLB hospitals from what a study-level C-FIND returns, and builds the KOS
only when ITI-39 asks for it. Both halves must agree on every identifier without shared state, so all
of them are derived from the study (uuid5) rather than minted or stored: the entry a consumer saw in
an ITI-38 answer names a KOS whose SOP Instance UID is the entry's uniqueId, whenever it is built.

The KOS entry is a **stable** DocumentEntry assembled on first retrieve (the "Delayed Assembly" model
of the IHE HIE white paper, §2.12; docs/kos-manifests.md has the decision and why not On-Demand): its
uniqueId names one *generation* of the study (:func:`kos_generation`), whose bytes are fixed by the
first ITI-39 that builds them; from then on its hash and size are known and announced. A study that
changes is a new generation, so a new document with a new uniqueId, never new bytes under an old one.

Choices where the profiles leave a gap (xca.md §7, netherlands.md §4), kept in one place on purpose:

- **Times are copied, not shifted.** StudyDate/StudyTime (and a report's ContentDate/ContentTime)
  are local Dutch time in every TLB PACS; XDS wants UTC. They are copied digit for digit (fractional
  seconds dropped) because the C-FIND date filter that answers ``$XDSDocumentEntryServiceStartTime*``
  works on the same local values, and a one-or-two-hour shift would make an entry fall outside the
  date range it was found by. A study without a (parseable) time gets a date-only DTM.
- **creationTime of the KOS is the study time.** The manifest is built on demand, but
  :func:`kos_for_study` sets its ContentDate/ContentTime to the study's, so the entry and the object
  agree and a re-served entry is byte-identical. A study without a date has neither time.
- **Size and hash of a KOS only once it was assembled; never for reports.** DUO has not read the
  bytes when it first announces a study (the KOS does not exist yet; a report would have to be C-GET
  for every query), and a wrong value is worse than an absent one: consumers verify them. The first
  ITI-39 of a KOS records its SHA-1 and size (``xca.docindex``); later answers carry them.
- **The KOS uniqueId follows the study's generation, not its instance list.** ITI-38 does not walk
  the instances (that would cost a C-FIND per series per study per query), so :func:`kos_generation`
  is what the study-level C-FIND says of the study's content (NumberOfStudyRelatedInstances and
  -Series) plus a revision DUO bumps when a retrieve finds the content changed without those counts
  changing (a PACS that does not return them, an instance swapped for another). Either way the changed
  study gets a new uniqueId; the old one answers XDSDocumentUniqueIdError (query again), because its
  bytes can no longer be made and DUO keeps no copy of patient data to serve them from.
- **Reports stand alone and are not in the manifest.** A report gets its own entry (netherlands.md
  §4, "reports stand alone"), so the KOS leaves it out: otherwise a viewer that opens the manifest shows
  the report a second time, against "once on the timeline". Every image is referenced (IMAGE items);
  other non-report objects a PACS keeps with the study (presentation states, key-image notes) are
  referenced as COMPOSITE, because they belong to how the images are read.
- **Report entries share the study's event codes and serviceStartTime**, so a consumer filtering on
  modality, body part or date finds the report beside its images.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import date
from typing import Final

from pydicom.dataset import Dataset
from pydicom.uid import UID

from duo_gateway.bsn import BSN_OID, NLMINBIZA, bsn_cx, is_valid_bsn
from duo_gateway.config.xca import CodeConfig, DocumentCodes
from duo_gateway.dicom.kos import InstanceRef, KosPatient, KosStudy, build_kos, kos_series_instance_uid
from duo_gateway.sources.base import InstanceRecord, StudyRecord
from duo_gateway.xca.codes import (
    BODY_PART_SNOMED,
    DCM_SCHEME,
    DICOM_UID_REGISTRY,
    IHE_RAD_FORMAT_SCHEME,
    KOS_SOP_CLASS,
    MIME_DICOM,
    MODALITY_DISPLAY,
    SNOMED_CT,
    STUDY_INSTANCE_UID_ID_TYPE,
)
from duo_gateway.xca.ebrim import Author, DocumentEntry, MetadataError
from duo_gateway.xca.entry_ids import document_entry_uuid, normalise_home
from duo_gateway.xca.hl7 import Code, Xon, reference_id

#: Namespace of the KOS UIDs. Changing it renames every KOS DUO has ever announced, which
#: breaks every ITI-39 for an entry a consumer still holds: never change it.
KOS_UID_NAMESPACE: Final = uuid.UUID("5d0c2b8e-3f4a-5c61-9e27-d4f0a1b2c3d4")

BASIC_TEXT_SR: Final = "1.2.840.10008.5.1.4.1.1.88.11"
ENHANCED_SR: Final = "1.2.840.10008.5.1.4.1.1.88.22"
COMPREHENSIVE_SR: Final = "1.2.840.10008.5.1.4.1.1.88.33"
ENCAPSULATED_PDF: Final = "1.2.840.10008.5.1.4.1.1.104.1"
MIME_PDF: Final = "application/pdf"

#: SOP classes DUO offers as stand-alone report entries, with the formatCode display of the SRs.
_SR_FORMAT_DISPLAY: Final[dict[str, str]] = {
    BASIC_TEXT_SR: "Basic Text SR",
    ENHANCED_SR: "Enhanced SR",
    COMPREHENSIVE_SR: "Comprehensive SR",
}
REPORT_SOP_CLASSES: Final = frozenset({*_SR_FORMAT_DISPLAY, ENCAPSULATED_PDF})

KOS_FORMAT: Final = Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY, "Key Object Selection Document")
#: Twiin's PDF/A report format (netherlands.md §4, option a).
PDF_FORMAT: Final = Code("urn:ihe:rad:PDF", IHE_RAD_FORMAT_SCHEME, "PDF")

#: ModalitiesInStudy values that are not acquisitions (CID 29 lists acquisitions only): a report,
#: a manifest, a presentation state or a scanned document says nothing about how the patient was imaged.
NON_ACQUISITION_MODALITIES: Final = frozenset({"SR", "KO", "PR", "DOC"})


_REPORT_TITLE: Final = "Radiologisch verslag"
_STUDY_TITLE: Final = "Beeldvormend onderzoek"
_MAX_TITLE: Final = 1024  # ebRIM FreeFormText; longer PACS text would make the entry unbuildable


def kos_unique_id(study_uid: str, repository_unique_id: str, generation: str = "") -> str:
    """The SOP Instance UID of the KOS of one generation of a study at a hospital, and so its uniqueId.

    Depends on nothing ITI-38 does not know, so ITI-39 can rebuild the same object later. The
    repository is part of the name because two hospitals may hold copies of the same study. An empty
    ``generation`` (a PACS that reports no counts, never revised) gives the name DUO used before
    generations existed, so entries announced by earlier versions stay retrievable.
    """
    if not study_uid or not repository_unique_id:
        raise ValueError("a KOS uniqueId needs a study UID and a repositoryUniqueId")
    name = f"kos|{study_uid}|{repository_unique_id}" + (f"|{generation}" if generation else "")
    value = uuid.uuid5(KOS_UID_NAMESPACE, name).int
    return f"2.25.{value}"  # at most 5 + 39 characters, and an integer has no leading zero


def kos_generation(study: StudyRecord, revision: int = 0) -> str:
    """Which state of the study a KOS uniqueId names: what changes when the study's content does.

    The counts are what a study-level C-FIND already returns, so naming the generation costs ITI-38
    nothing; ``revision`` (kept by ``xca.docindex``) covers the changes the counts do not show.
    """
    if revision < 0:
        raise ValueError("a revision is never negative")
    parts = []
    if study.instance_count is not None:
        parts.append(f"i{study.instance_count}")
    if study.series_count is not None:
        parts.append(f"s{study.series_count}")
    if revision:
        parts.append(f"r{revision}")
    return ".".join(parts)


def study_kos_unique_id(study: StudyRecord, repository_unique_id: str, revision: int = 0) -> str:
    """:func:`kos_unique_id` of the study's current generation: the one ITI-38 announces."""
    return kos_unique_id(study.study_instance_uid, repository_unique_id, kos_generation(study, revision))


def is_report(record: InstanceRecord) -> bool:
    """Whether DUO offers this instance as a stand-alone report entry (netherlands.md §4)."""
    return record.sop_class_uid in REPORT_SOP_CLASSES


def study_entry(
    study: StudyRecord,
    *,
    bsn: str,
    hospital_ura: str,
    hospital_name: str,
    repository_unique_id: str,
    home: str,
    codes: DocumentCodes,
    revision: int = 0,
    assembled: tuple[str, int] | None = None,
) -> DocumentEntry:
    """The KOS DocumentEntry that makes a study visible in an ITI-38 answer (xca.md §7).

    ``revision`` is the study's (``xca.docindex``); ``assembled`` the (SHA-1, size) recorded when this
    generation's KOS was first built, None before: a stable entry announces them once they are known.
    """
    home = _home(home)
    started = dicom_dtm(study.study_date, study.study_time)
    unique_id = study_kos_unique_id(study, repository_unique_id, revision)
    digest, size = assembled if assembled is not None else (None, None)
    return DocumentEntry(
        # Keyed by the uniqueId, which includes the repository: one study held by two hospitals
        # gives two distinct entries in one answer.
        entry_uuid=document_entry_uuid(unique_id, home),
        unique_id=unique_id,
        patient_id=_patient_cx(bsn),
        source_patient_id=_patient_cx(bsn),
        mime_type=MIME_DICOM,
        repository_unique_id=repository_unique_id,
        home=home,
        title=_clip(study.description) or _fallback_study_title(study),
        format_code=KOS_FORMAT,
        class_code=_code(codes.kos_class),
        type_code=_code(codes.kos_type),
        practice_setting_code=_code(codes.practice_setting),
        healthcare_facility_type_code=_code(codes.facility_type),
        confidentiality_codes=(_code(codes.confidentiality),),
        event_codes=event_codes(study),
        service_start_time=started,
        creation_time=started,
        reference_ids=(reference_id(study.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE),),
        authors=(_author(hospital_name, hospital_ura),),
        language_code=codes.language,
        hash=digest,
        size=size,
    )


def report_entry(
    report: InstanceRecord,
    study: StudyRecord,
    *,
    bsn: str,
    hospital_ura: str,
    hospital_name: str,
    repository_unique_id: str,
    home: str,
    codes: DocumentCodes,
) -> DocumentEntry:
    """A stand-alone report entry, linked to its study's KOS entry through referenceIdList.

    A PDF report is announced as ``application/pdf``: ITI-39 must then return the encapsulated PDF,
    not the DICOM object that wraps it (Twiin's option a, netherlands.md §4).
    """
    if not is_report(report):
        raise ValueError(f"SOP class {report.sop_class_uid} is not a report DUO offers")
    if report.study_instance_uid != study.study_instance_uid:
        raise ValueError("the report belongs to another study")
    home = _home(home)
    if report.sop_class_uid == ENCAPSULATED_PDF:
        mime_type, format_code = MIME_PDF, PDF_FORMAT
    else:
        mime_type = MIME_DICOM
        format_code = Code(report.sop_class_uid, DICOM_UID_REGISTRY, _SR_FORMAT_DISPLAY[report.sop_class_uid])
    description = _clip(study.description)
    title = _clip(report.title) or (f"{_REPORT_TITLE}: {description}" if description else _REPORT_TITLE)
    started = dicom_dtm(study.study_date, study.study_time)
    return DocumentEntry(
        entry_uuid=document_entry_uuid(report.sop_instance_uid, home),
        unique_id=report.sop_instance_uid,
        patient_id=_patient_cx(bsn),
        source_patient_id=_patient_cx(bsn),
        mime_type=mime_type,
        repository_unique_id=repository_unique_id,
        home=home,
        title=_clip(title),
        format_code=format_code,
        class_code=_code(codes.report_class),
        type_code=_code(codes.report_type),
        practice_setting_code=_code(codes.practice_setting),
        healthcare_facility_type_code=_code(codes.facility_type),
        confidentiality_codes=(_code(codes.confidentiality),),
        event_codes=event_codes(study),
        service_start_time=started,
        # A report without content date/time was written at some unknown point; the study time is
        # the best lower bound and keeps creationTime filters from losing it altogether.
        creation_time=dicom_dtm(report.content_date, report.content_time) or started,
        reference_ids=(reference_id(study.study_instance_uid, STUDY_INSTANCE_UID_ID_TYPE),),
        authors=(_author(hospital_name, hospital_ura),),
        language_code=codes.language,
    )


def kos_for_study(
    study: StudyRecord,
    instances: Sequence[InstanceRecord],
    *,
    bsn: str,
    repository_unique_id: str,
    revision: int = 0,
    retrieve_ae_title: str | None = None,
    institution_name: str | None = None,
) -> Dataset:
    """The manifest ITI-39 returns for a study entry: its SOP Instance UID is the entry's uniqueId
    (of ``study``'s generation at ``revision``, as :func:`study_entry` names it).

    ``instances`` may be the whole study as C-FIND lists it: reports are dropped here (they are entries
    of their own, see the module notes), so every caller builds the same manifest from the same PACS
    answer. A KOS DUO built earlier and a PACS stored back is dropped too, of any generation (DUO's
    manifests of a study share one series): a manifest never references itself or its predecessors.
    Raises ValueError when nothing is left (a study of reports only has no manifest to give).
    """
    sop_uid = UID(study_kos_unique_id(study, repository_unique_id, revision))
    strangers = {i.study_instance_uid for i in instances} - {study.study_instance_uid}
    if strangers:
        raise ValueError("instances of another study cannot go into this study's manifest")
    own_series = kos_series_instance_uid(study.study_instance_uid)
    refs = [
        InstanceRef(i.series_instance_uid, i.sop_class_uid, i.sop_instance_uid)
        for i in instances
        if i.sop_instance_uid != sop_uid and i.series_instance_uid != own_series and not is_report(i)
    ]
    ds = build_kos(
        refs,
        KosStudy(
            study.study_instance_uid,
            study.study_date or "",
            study.study_time or "",
            study.accession_number or "",
            study.study_id or "",
            study.description,
            study.referring_physician or "",
        ),
        KosPatient(
            _patient_id(bsn),
            study.patient_name or "",
            NLMINBIZA,
            BSN_OID,
            study.patient_birth_date or "",
            study.patient_sex or "",
        ),
        retrieve_ae_title=retrieve_ae_title,
        retrieve_location_uid=repository_unique_id,
        institution_name=institution_name if institution_name is not None else study.institution_name,
    )
    ds.SOPInstanceUID = sop_uid
    ds.file_meta.MediaStorageSOPInstanceUID = sop_uid
    return ds


def event_codes(study: StudyRecord) -> tuple[Code, ...]:
    """Acquisition modalities (DCM), then the anatomic region (SNOMED) when the PACS names a known one.

    A body part outside BODY_PART_SNOMED is left out rather than sent as free text: an eventCode a
    consumer cannot match is noise in its filters.
    """
    seen: list[str] = []
    for raw in study.modalities:
        m = raw.strip().upper()
        if m and m not in NON_ACQUISITION_MODALITIES and m not in seen:
            seen.append(m)
    out = [Code(m, DCM_SCHEME, MODALITY_DISPLAY.get(m, m)) for m in seen]
    region = BODY_PART_SNOMED.get((study.body_part or "").strip().upper())
    if region is not None:
        out.append(Code(region[0], SNOMED_CT, region[1]))
    return tuple(out)


def dicom_dtm(da: str | None, tm: str | None) -> str | None:
    """XDS DTM from a DICOM DA and TM; None without a usable date, date-only without a usable time.

    Lenient because PACSes are: ACR-NEMA ``YYYY.MM.DD`` and ``HH:MM:SS`` still occur, and TM may stop
    at the hour or minute. A value that is not a real date or time is dropped rather than guessed.
    """
    if not da:
        return None
    d = da.strip().replace(".", "").replace("-", "")
    if len(d) != 8 or not d.isascii() or not d.isdigit():
        return None
    try:
        date(int(d[:4]), int(d[4:6]), int(d[6:]))
    except ValueError:
        return None
    if not tm:
        return d
    t = tm.strip().replace(":", "").split(".", 1)[0]
    if len(t) not in (2, 4, 6) or not t.isascii() or not t.isdigit():
        return d
    limits = (23, 59, 60)  # DICOM allows a leap second; XDS DTM has no opinion
    if any(int(t[i:i + 2]) > limits[i // 2] for i in range(0, len(t), 2)):
        return d
    return d + t


# --- helpers ---


def _home(home: str) -> str:
    # Normalised before it names the entry: a bare and a urn:oid: home must give one entryUUID.
    try:
        return normalise_home(home)
    except ValueError as exc:
        raise MetadataError(str(exc)) from exc


def _patient_id(bsn: str) -> str:
    if not is_valid_bsn(bsn):
        # Never echoed: even a wrong BSN is patient data.
        raise MetadataError("patientId needs a valid BSN (11-proef)")
    return bsn


def _patient_cx(bsn: str) -> str:
    return bsn_cx(_patient_id(bsn))


def _author(name: str, ura: str) -> Author:
    if not ura.isascii() or not ura.isdigit() or len(ura) > 8:
        raise MetadataError(f"not a URA: {ura!r}")
    # Left-padded: the Nictiz set writes eight digits, and consumers compare on that form (§6).
    return Author(institutions=(Xon(name, ura.zfill(8)),))


def _code(c: CodeConfig) -> Code:
    return Code(c.code, c.scheme, c.display)


def _clip(text: str | None) -> str | None:
    if text is None:
        return None
    text = text.strip()
    return text[:_MAX_TITLE] if text else None


def _fallback_study_title(study: StudyRecord) -> str:
    """``CT MR 01-03-2024``: what a timeline row needs to tell two untitled studies apart."""
    parts = [c.code for c in event_codes(study) if c.scheme == DCM_SCHEME] or [_STUDY_TITLE]
    day = dicom_dtm(study.study_date, None)
    if day is not None:
        parts.append(f"{day[6:8]}-{day[4:6]}-{day[:4]}")  # Dutch order, as the timeline shows dates
    return " ".join(parts)
