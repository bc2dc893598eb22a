"""Deterministic, realistic-looking DICOM studies for the simulated PACSes and XCA communities.

Every simulator (TLB PACS, XCA responding gateways) and every test must agree on which studies a
patient has at an institution, without sharing state: so the whole study (UIDs, dates, pixel data,
report text) is a pure function of ``(seed, BSN, URA, study index)``. Reruns produce byte-identical
datasets, ``generate_studies(count=3)`` is a prefix of ``generate_studies(count=5)``, and nothing here
touches the network, the clock or the filesystem (except :func:`write_study`).

Studies are deliberately small (2-12 instances of ``image_size``² pixels) so a whole demo network
starts in seconds; the DICOM headers, not the pixels, are what the gateway routes on.
"""

from __future__ import annotations

import copy
import dataclasses
import math
import random
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import date, timedelta
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filewriter import dcmwrite
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    UID,
    BasicTextSRStorage,
    ComputedRadiographyImageStorage,
    CTImageStorage,
    ExplicitVRLittleEndian,
    MRImageStorage,
    UltrasoundImageStorage,
)

from duo_gateway.bsn import BSN_OID, NLMINBIZA
from duo_gateway.dicom.kos import evidence_item, instance_refs
from duo_gateway.sim.codecs import stored_as
from duo_gateway.sim.config import SimInstitution, SimPatient

#: Studies fall in the five years before this date. A fixed anchor rather than ``date.today()``
#: keeps reruns identical across days, so the PACS, the XCA simulator and the tests always agree on
#: StudyDate (and a date-range query written in a test stays true).
REFERENCE_DATE = date(2026, 11, 1)
STUDY_WINDOW_DAYS = 5 * 365


#: Every other study carries a radiology report (Basic Text SR); which ones is fixed by the index so
#: tests can rely on both kinds existing for any patient with at least two studies.
REPORT_EVERY = 2

_IMPLEMENTATION_VERSION = "DUO_GW_SIM_1"
#: Namespace of the simulator's name-based UIDs; changing it renumbers every simulated object.
_UID_NAMESPACE = uuid.UUID("6f1c3f0e-5b7a-5d2e-9c1a-44756f475753")
_MANUFACTURERS = ("Siemens Healthineers", "Philips", "GE HealthCare", "Canon Medical Systems")
_RADIOLOGISTS = ("de Boer^Pieter^^dr.", "Visser^Sanne^^dr.", "Smit^Joost^^dr.", "Mulder^Eva^^dr.")
_REFERRERS = ("Meijer^Lotte", "de Graaf^Ruben", "Bos^Iris", "Vos^Thomas", "Peters^Femke")


@dataclass(frozen=True)
class _SeriesPlan:
    description: str
    images: int
    view: str = ""


@dataclass(frozen=True)
class _Exam:
    """One kind of examination a Dutch radiology department performs, with its typical report."""

    modality: str
    body_part: str
    description: str
    series: tuple[tuple[str, str], ...]  # (series description, CR view position or "")
    findings: tuple[str, ...]
    impressions: tuple[str, ...]


_EXAMS: tuple[_Exam, ...] = (
    _Exam("CT", "HEAD", "CT hersenen zonder contrast",
          (("Hersenen 5mm", ""), ("Hersenen bot 2mm", ""), ("Hersenen coronaal", "")),
          ("Geen aanwijzingen voor een intracraniële bloeding of ruimte-innemend proces.",
           "Normale wijdte van de ventrikels. Geen midline shift.",
           "Enkele periventriculaire hypodensiteiten passend bij small vessel disease."),
          ("Geen acute intracraniële afwijkingen.", "Beeld passend bij lichte small vessel disease.")),
    _Exam("CT", "CHEST", "CT thorax met contrast",
          (("Thorax mediastinum", ""), ("Thorax long", ""), ("Thorax MIP", "")),
          ("Geen aanwijzingen voor longembolieën. Geen pleuravocht.",
           "Solitaire noduls van 4 mm in de rechter onderkwab, niet verdacht.",
           "Normale grootte van het hart. Geen pathologisch vergrote lymfeklieren."),
          ("Geen longembolie.", "Kleine nodus rechter onderkwab, geen follow-up nodig (Fleischner).")),
    _Exam("CT", "ABDOMEN", "CT abdomen blanco",
          (("Abdomen 3mm", ""), ("Abdomen coronaal", "")),
          ("Normaal aspect van lever, milt en pancreas.",
           "Concrement van 6 mm in de distale linker ureter met lichte hydronefrose.",
           "Geen vrij vocht, geen vrij lucht."),
          ("Ureterolithiasis links met lichte stuwing.", "Geen acute intra-abdominale afwijkingen.")),
    _Exam("MR", "KNEE", "MRI knie links",
          (("PD sag FS", ""), ("T1 cor", ""), ("PD tra FS", "")),
          ("Horizontale scheur in de achterhoorn van de mediale meniscus.",
           "Intacte kruisbanden en collaterale banden.",
           "Gering gewrichtsvocht. Kraakbeen zonder focale defecten."),
          ("Mediale meniscusscheur.", "Geen ligamentaire letsels.")),
    _Exam("MR", "BRAIN", "MRI hersenen met contrast",
          (("T1 sag", ""), ("T2 tra", ""), ("FLAIR tra", "")),
          ("Geen aankleurende laesies. Geen diffusierestrictie.",
           "Enkele aspecifieke witte-stoflaesies, leeftijdsadequaat.",
           "Normale flow voids van de grote vaten."),
          ("Geen aanwijzingen voor een ruimte-innemend proces.", "Leeftijdsadequaat beeld.")),
    _Exam("MR", "LSPINE", "MRI lumbale wervelkolom",
          (("T2 sag", ""), ("T1 sag", ""), ("T2 tra", "")),
          ("Discusprotrusie L4-L5 met contact met de L5-wortel rechts.",
           "Normale uitlijning van de wervelkolom. Geen fracturen.",
           "Degeneratieve discopathie L5-S1."),
          ("Discushernia L4-L5 rechts.", "Degeneratieve veranderingen zonder stenose.")),
    _Exam("CR", "CHEST", "X-thorax PA en lateraal",
          (("Thorax PA", "PA"), ("Thorax lateraal", "LL")),
          ("Normale cor-thoracale ratio. Geen infiltraten.",
           "Vrije sinus phrenicocostales.", "Discrete streperige tekening basaal links."),
          ("Geen afwijkingen aan hart en longen.", "Mogelijk beginnend infiltraat basaal links.")),
    _Exam("CR", "HAND", "X-hand links",
          (("Hand PA", "PA"), ("Hand schuin", "OBL"), ("Hand lateraal", "LAT")),
          ("Fractuur van de distale metacarpale IV zonder dislocatie.",
           "Normale botstructuur. Geen fractuur.", "Artrotische veranderingen in de DIP-gewrichten."),
          ("Niet-gedisloceerde fractuur metacarpale IV.", "Geen traumatische afwijkingen.")),
    _Exam("US", "ABDOMEN", "Echo abdomen",
          (("Abdomen", ""),),
          ("Normale grootte en echogeniciteit van de lever.",
           "Galblaas met meerdere concrementen, geen wandverdikking.", "Normale nieren zonder stuwing."),
          ("Cholecystolithiasis zonder tekenen van cholecystitis.", "Normale echo van het abdomen.")),
    _Exam("US", "NECK", "Echo schildklier",
          (("Schildklier", ""),),
          ("Homogene schildklier van normale grootte.",
           "Nodus van 9 mm in de rechter lob, TI-RADS 3.", "Geen pathologische halsklieren."),
          ("TI-RADS 3 nodus rechts, controle over een jaar.", "Normale schildklier.")),
)

_SOP_CLASS: dict[str, UID] = {
    "CT": CTImageStorage,
    "MR": MRImageStorage,
    "CR": ComputedRadiographyImageStorage,
    "US": UltrasoundImageStorage,
}


@dataclass(frozen=True)
class GeneratedStudy:
    """One study as a PACS (and an XCA repository) holds it, with the key attributes the indexes need.

    ``modalities`` is ModalitiesInStudy as a PACS reports it, so it includes ``SR`` when the study
    carries a report. ``report_text`` is the report's plain text (findings and impression) so a
    document-sharing simulator can offer the same report as a stand-alone document, as Twiin asks.
    """

    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    modalities: tuple[str, ...]
    description: str
    body_part: str
    patient_id: str
    institution_ura: str
    institution_name: str
    report_text: str | None
    instances: list[Dataset]

    @property
    def has_report(self) -> bool:
        return self.report_text is not None

    @property
    def series_instance_uids(self) -> list[str]:
        return sorted({str(ds.SeriesInstanceUID) for ds in self.instances})


def generate_studies(
    patient: SimPatient,
    institution: SimInstitution,
    count: int,
    seed: int,
    image_size: int = 64,
    encodings: Mapping[int, str] | None = None,
) -> list[GeneratedStudy]:
    """The ``count`` studies ``patient`` has at ``institution``.

    Ordered by generation index, not by date: raising ``count`` must only append studies, so a
    simulator configured for more studies still serves the ones a test already knows. ``encodings``
    (study index -> transfer syntax, e.g. from ``SimHospital.encodings``) stores those studies as an
    archive configured so would: their images compressed, the rest Explicit VR Little Endian. The
    encoders are deterministic, so a compressed study is as reproducible as an uncompressed one.
    """
    if count < 0:
        raise ValueError("count must be >= 0")
    if not 8 <= image_size <= 1024:
        raise ValueError("image_size must be within 8..1024")
    studies = [_generate_study(patient, institution, seed, index, image_size) for index in range(count)]
    for index, transfer_syntax in (encodings or {}).items():
        if 0 <= index < count:
            study = studies[index]
            studies[index] = dataclasses.replace(
                study, instances=[stored_as(ds, transfer_syntax) for ds in study.instances])
    return studies


def write_study(study: GeneratedStudy, folder: Path) -> list[Path]:
    """Write each instance as a Part-10 file named by its SOP Instance UID (unique, so re-writing the
    same study is idempotent and two studies never collide in one folder)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths: list[Path] = []
    for ds in study.instances:
        path = folder / f"{ds.SOPInstanceUID}.dcm"
        dcmwrite(path, ds, enforce_file_format=True)
        paths.append(path)
    return paths


def _uid(seed: int, patient: SimPatient, institution: SimInstitution, *parts: object) -> UID:
    """A ``2.25.<UUID>`` UID from a name-based (v5) UUID.

    ``generate_uid(prefix=None, ...)`` ignores ``entropy_srcs`` and returns a random UUID, so it
    cannot give reproducible UIDs; a v5 UUID is the standard way to derive a UUID from a name, and
    PS3.5 B.2 makes any UUID a valid UID under the 2.25 root.
    """
    name = "|".join([str(seed), patient.bsn, institution.ura, *map(str, parts)])
    return UID(f"2.25.{uuid.uuid5(_UID_NAMESPACE, name).int}")


@dataclass(frozen=True)
class StudyHeader:
    """What a study-level C-FIND says of generated study ``index``, without generating the study.

    Equal, field for field, to the :class:`GeneratedStudy` of the same index (it is drawn first, from
    the same random stream), at a few microseconds instead of milliseconds: enough to list thousands
    of studies, whose instances are only generated (:func:`generate_study`) if one is retrieved.
    """

    index: int
    study_instance_uid: str
    accession_number: str
    study_id: str
    study_date: str
    study_time: str
    modalities: tuple[str, ...]
    description: str
    body_part: str
    patient_id: str
    institution_ura: str
    institution_name: str
    #: As a study-level C-FIND counts them (NumberOfStudyRelatedSeries/Instances), report included:
    #: DUO names a KOS generation by them (``xca.metadata.kos_generation``).
    series_count: int
    instance_count: int


def study_headers(patient: SimPatient, institution: SimInstitution, indexes: range,
                  seed: int) -> list[StudyHeader]:
    """The headers of studies ``indexes`` of ``patient`` at ``institution`` (see :class:`StudyHeader`)."""
    return [_draw(patient, institution, seed, index).header for index in indexes]


def generate_study(patient: SimPatient, institution: SimInstitution, index: int, seed: int,
                   image_size: int = 64) -> GeneratedStudy:
    """Study ``index`` alone, exactly as :func:`generate_studies` makes it."""
    if not 8 <= image_size <= 1024:
        raise ValueError("image_size must be within 8..1024")
    return _generate_study(patient, institution, seed, index, image_size)


@dataclass(frozen=True)
class _Drawn:
    """The first draws of a study's random stream: its header, and what the instances go on from."""

    header: StudyHeader
    rng: random.Random
    exam: _Exam
    uid: _StudyUids
    study_day: date
    manufacturer: str
    referrer: str
    plans: list[_SeriesPlan]


def _draw(patient: SimPatient, institution: SimInstitution, seed: int, index: int) -> _Drawn:
    # A string seed is hashed with SHA-512 by random.Random (not hash()), so this is stable across
    # processes regardless of PYTHONHASHSEED.
    rng = random.Random(f"{seed}|{patient.bsn}|{institution.ura}|{index}")
    exam = rng.choice(_EXAMS)
    uid = _StudyUids(seed, patient, institution, index)

    study_day = REFERENCE_DATE - timedelta(days=rng.randrange(1, STUDY_WINDOW_DAYS))
    study_date = study_day.strftime("%Y%m%d")
    minutes = rng.randrange(7 * 60 + 30, 18 * 60)
    study_time = f"{minutes // 60:02d}{minutes % 60:02d}{rng.randrange(60):02d}"
    accession = f"A{institution.ura[-4:]}{study_day.year % 100:02d}{rng.randrange(10**6):06d}"
    study_id = f"{rng.randrange(1, 10**6):06d}"
    manufacturer = rng.choice(_MANUFACTURERS)
    referrer = rng.choice(_REFERRERS)
    reported = index % REPORT_EVERY == 0
    modalities = (exam.modality, "SR") if reported else (exam.modality,)
    plans = _plan_series(exam, rng)  # the next draws either way, so drawing them here changes nothing
    header = StudyHeader(
        index=index, study_instance_uid=str(uid.study), accession_number=accession, study_id=study_id,
        study_date=study_date, study_time=study_time, modalities=modalities, description=exam.description,
        body_part=exam.body_part, patient_id=patient.bsn, institution_ura=institution.ura,
        institution_name=institution.name, series_count=len(plans) + reported,
        instance_count=sum(p.images for p in plans) + reported)
    return _Drawn(header, rng, exam, uid, study_day, manufacturer, referrer, plans)


def _generate_study(
    patient: SimPatient, institution: SimInstitution, seed: int, index: int, image_size: int
) -> GeneratedStudy:
    drawn = _draw(patient, institution, seed, index)
    rng, exam, uid, study_day = drawn.rng, drawn.exam, drawn.uid, drawn.study_day
    study_date, study_time = drawn.header.study_date, drawn.header.study_time
    accession, study_id = drawn.header.accession_number, drawn.header.study_id
    manufacturer, referrer = drawn.manufacturer, drawn.referrer

    common = Dataset()
    common.SpecificCharacterSet = "ISO_IR 100"
    _patient_module(common, patient, study_day)
    common.StudyInstanceUID = uid.study
    common.StudyDate = study_date
    common.StudyTime = study_time
    common.AccessionNumber = accession
    common.StudyID = study_id
    common.StudyDescription = exam.description
    common.ReferringPhysicianName = referrer
    common.InstitutionName = institution.name
    common.Manufacturer = manufacturer

    instances: list[Dataset] = []
    series_plans = drawn.plans
    frame_of_reference = uid.make("for")
    for series_number, plan in enumerate(series_plans, start=1):
        series_uid = uid.make("series", series_number)
        series_time = _add_minutes(study_time, series_number * 2)
        for instance_number in range(1, plan.images + 1):
            ds = _image(
                common, exam, plan, rng, image_size,
                sop_uid=uid.make("sop", series_number, instance_number),
                series_uid=series_uid,
                series_number=series_number,
                instance_number=instance_number,
                series_time=series_time,
                frame_of_reference=frame_of_reference,
            )
            instances.append(ds)

    report_text: str | None = None
    if index % REPORT_EVERY == 0:
        findings = rng.sample(exam.findings, k=2)
        impression = rng.choice(exam.impressions)
        report_text = "Bevindingen: " + " ".join(findings) + "\nConclusie: " + impression
        instances.append(
            _report(common, instances, uid, findings, impression, rng, series_number=len(series_plans) + 1)
        )

    header = drawn.header  # the header fields are the header's, so the two cannot disagree
    return GeneratedStudy(
        study_instance_uid=header.study_instance_uid,
        accession_number=header.accession_number,
        study_id=header.study_id,
        study_date=header.study_date,
        study_time=header.study_time,
        modalities=header.modalities,
        description=header.description,
        body_part=header.body_part,
        patient_id=header.patient_id,
        institution_ura=header.institution_ura,
        institution_name=header.institution_name,
        report_text=report_text,
        instances=instances,
    )


class _StudyUids:
    """Every UID of a study hangs off the same entropy, so no UID can collide with another study's."""

    def __init__(self, seed: int, patient: SimPatient, institution: SimInstitution, index: int) -> None:
        self._key = (seed, patient, institution, index)
        self.study = self.make("study")

    def make(self, *parts: object) -> UID:
        seed, patient, institution, index = self._key
        return _uid(seed, patient, institution, "study", index, *parts)


def _plan_series(exam: _Exam, rng: random.Random) -> list[_SeriesPlan]:
    if exam.modality in ("CT", "MR"):
        n_series = rng.randint(2, min(3, len(exam.series)))
        return [_SeriesPlan(desc, rng.randint(2, 3)) for desc, _ in exam.series[:n_series]]
    if exam.modality == "CR":
        # One image per view, each view its own series, as CR readers typically send them.
        return [_SeriesPlan(desc, 1, view) for desc, view in exam.series]
    desc, _ = exam.series[0]
    return [_SeriesPlan(desc, rng.randint(3, 5))]


def _patient_module(ds: Dataset, patient: SimPatient, study_day: date) -> None:
    ds.PatientName = patient.name
    ds.PatientID = patient.bsn
    ds.IssuerOfPatientID = NLMINBIZA
    qualifiers = Dataset()
    qualifiers.UniversalEntityID = BSN_OID
    qualifiers.UniversalEntityIDType = "ISO"
    ds.IssuerOfPatientIDQualifiersSequence = DicomSequence([qualifiers])
    other = Dataset()
    other.PatientID = patient.bsn
    other.IssuerOfPatientID = NLMINBIZA
    other_qualifiers = Dataset()
    other_qualifiers.UniversalEntityID = BSN_OID
    other_qualifiers.UniversalEntityIDType = "ISO"
    other.IssuerOfPatientIDQualifiersSequence = DicomSequence([other_qualifiers])
    other.TypeOfPatientID = "TEXT"
    ds.OtherPatientIDsSequence = DicomSequence([other])
    ds.PatientBirthDate = patient.birth_date
    ds.PatientSex = patient.sex
    birth = date(int(patient.birth_date[:4]), int(patient.birth_date[4:6]), int(patient.birth_date[6:]))
    age = study_day.year - birth.year - ((study_day.month, study_day.day) < (birth.month, birth.day))
    ds.PatientAge = f"{max(age, 0):03d}Y"


def _add_minutes(hhmmss: str, minutes: int) -> str:
    total = (int(hhmmss[:2]) * 60 + int(hhmmss[2:4]) + minutes) % (24 * 60)
    return f"{total // 60:02d}{total % 60:02d}{hhmmss[4:6]}"


def _file_meta(sop_class: UID, sop_instance: UID) -> FileMetaDataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_instance
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    meta.ImplementationVersionName = _IMPLEMENTATION_VERSION
    return meta


def _start(common: Dataset, sop_class: UID, sop_uid: UID) -> Dataset:
    # A deep copy: instances must not share sequence items, or editing one (as a PACS or a test
    # might) would silently edit the whole study.
    ds = copy.deepcopy(common)
    ds.file_meta = _file_meta(sop_class, sop_uid)
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.InstanceCreationDate = common.StudyDate
    ds.InstanceCreationTime = common.StudyTime
    return ds


def _image(
    common: Dataset,
    exam: _Exam,
    plan: _SeriesPlan,
    rng: random.Random,
    size: int,
    *,
    sop_uid: UID,
    series_uid: UID,
    series_number: int,
    instance_number: int,
    series_time: str,
    frame_of_reference: UID,
) -> Dataset:
    ds = _start(common, _SOP_CLASS[exam.modality], sop_uid)
    ds.Modality = exam.modality
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = series_number
    ds.SeriesDescription = plan.description
    ds.SeriesDate = common.StudyDate
    ds.SeriesTime = series_time
    ds.BodyPartExamined = exam.body_part
    ds.InstanceNumber = instance_number
    ds.AcquisitionNumber = 1
    ds.ContentDate = common.StudyDate
    ds.ContentTime = series_time
    ds.StationName = f"{exam.modality}{rng.randint(1, 4)}"
    ds.ManufacturerModelName = f"Sim {exam.modality} {rng.randint(100, 999)}"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL" if exam.modality == "CT" else "OTHER"]

    if exam.modality in ("CT", "MR"):
        spacing = 400.0 / size if exam.body_part in ("CHEST", "ABDOMEN") else 240.0 / size
        thickness = 5.0 if exam.modality == "CT" else 4.0
        z = -100.0 + (instance_number - 1) * thickness
        ds.FrameOfReferenceUID = frame_of_reference
        ds.PositionReferenceIndicator = ""
        ds.PatientPosition = "HFS"
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        corner = round(-spacing * size / 2, 3)  # rounded: DS values are limited to 16 characters
        ds.ImagePositionPatient = [corner, corner, z]
        ds.PixelSpacing = [round(spacing, 4), round(spacing, 4)]
        ds.SliceThickness = thickness
        ds.SliceLocation = z
    if exam.modality == "CT":
        ds.KVP = rng.choice((100, 120))
        ds.RescaleIntercept = -1024
        ds.RescaleSlope = 1
        ds.RescaleType = "HU"
        ds.WindowCenter = 40
        ds.WindowWidth = 400
    elif exam.modality == "MR":
        ds.ScanningSequence = "SE"
        ds.SequenceVariant = "NONE"
        ds.ScanOptions = ""
        ds.MRAcquisitionType = "2D"
        ds.RepetitionTime = rng.choice((500, 2500, 4000))
        ds.EchoTime = rng.choice((12, 30, 90))
        ds.EchoTrainLength = 1
        ds.MagneticFieldStrength = rng.choice((1.5, 3))
    elif exam.modality == "CR":
        ds.ViewPosition = plan.view
        ds.ImagerPixelSpacing = [0.15, 0.15]
        ds.KVP = rng.choice((60, 70, 125))
    else:
        ds.ImageType = ["ORIGINAL", "PRIMARY", "ABDOMINAL" if exam.body_part == "ABDOMEN" else "SMALL PART"]

    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = size
    ds.Columns = size
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.PixelData = _pixels(size, rng)
    return ds


def _pixels(size: int, rng: random.Random) -> bytes:
    """A body-like disc over a gradient with noise: enough structure that a viewer shows an image and
    different instances differ, yet every byte follows from the seeded RNG.

    Computed with numpy over the whole image (a per-pixel Python loop made pixel data most of the
    time every simulator and test spent generating studies), but byte for byte what that loop
    produced: the same RNG draws in the same order, the distance from ``math.hypot`` (numpy's hypot
    may differ in the last bit, which would move a pixel across the disc's edge), and the same IEEE
    double arithmetic and truncation towards zero for the ring.
    """
    cx = size / 2 + rng.uniform(-size / 10, size / 10)
    cy = size / 2 + rng.uniform(-size / 10, size / 10)
    radius = size * rng.uniform(0.30, 0.42)
    inner = radius * rng.uniform(0.25, 0.45)
    base = rng.randint(900, 1200)
    noise = np.array([rng.randint(0, 120) for _ in range(size * 7 + 13)], dtype=np.int64)
    y, x = np.divmod(np.arange(size * size, dtype=np.int64), size)
    d = np.fromiter(map(math.hypot, (x - cx).tolist(), (y - cy).tolist()), dtype=np.float64,
                    count=size * size)
    ring = base + 200 + (300 * (1 - d / radius)).astype(np.int64)  # positive: astype truncates as int()
    values = np.where(d < inner, base + 900, np.where(d < radius, ring, 200 * y // size))
    values += noise[(x * 31 + y * 17) % len(noise)]
    return np.minimum(values, 4095).astype("<u2").tobytes()


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue = value
    item.CodingSchemeDesignator = scheme
    item.CodeMeaning = meaning
    return item


def _text_item(concept: Dataset, text: str) -> Dataset:
    item = Dataset()
    item.RelationshipType = "CONTAINS"
    item.ValueType = "TEXT"
    item.ConceptNameCodeSequence = DicomSequence([concept])
    item.TextValue = text
    return item


def _container(relationship: str, concept: Dataset, children: Sequence[Dataset]) -> Dataset:
    item = Dataset()
    item.RelationshipType = relationship
    item.ValueType = "CONTAINER"
    item.ConceptNameCodeSequence = DicomSequence([concept])
    item.ContinuityOfContent = "SEPARATE"
    item.ContentSequence = DicomSequence(list(children))
    return item


def _report(
    common: Dataset,
    images: list[Dataset],
    uid: _StudyUids,
    findings: list[str],
    impression: str,
    rng: random.Random,
    *,
    series_number: int,
) -> Dataset:
    """A Basic Text SR shaped like TID 2000 (Basic Diagnostic Imaging Report), in Dutch, verified:
    the form Twiin's content rules name for reports that travel with a study."""
    ds = _start(common, BasicTextSRStorage, uid.make("sr", "sop"))
    report_time = _add_minutes(common.StudyTime, 90)
    ds.Modality = "SR"
    ds.SeriesInstanceUID = uid.make("sr", "series")
    ds.SeriesNumber = series_number
    ds.SeriesDescription = "Radiologisch verslag"
    ds.SeriesDate = common.StudyDate
    ds.SeriesTime = report_time
    ds.ReferencedPerformedProcedureStepSequence = DicomSequence([])
    ds.InstanceNumber = 1
    ds.ContentDate = common.StudyDate
    ds.ContentTime = report_time
    ds.CompletionFlag = "COMPLETE"
    ds.VerificationFlag = "VERIFIED"
    observer = Dataset()
    observer.VerifyingObserverName = rng.choice(_RADIOLOGISTS)
    observer.VerifyingObserverIdentificationCodeSequence = DicomSequence([])
    observer.VerifyingOrganization = common.InstitutionName
    observer.VerificationDateTime = f"{common.StudyDate}{report_time}"
    ds.VerifyingObserverSequence = DicomSequence([observer])
    ds.PerformedProcedureCodeSequence = DicomSequence([])

    # The evidence list lets a reader (or a KOS builder) find the images this report is about.
    evidence = evidence_item(str(common.StudyInstanceUID), instance_refs(images))
    ds.CurrentRequestedProcedureEvidenceSequence = DicomSequence([evidence])

    ds.ValueType = "CONTAINER"
    ds.ConceptNameCodeSequence = DicomSequence([_code("18748-4", "LN", "Diagnostic imaging report")])
    ds.ContinuityOfContent = "SEPARATE"
    template = Dataset()
    template.MappingResource = "DCMR"
    template.TemplateIdentifier = "2000"
    ds.ContentTemplateSequence = DicomSequence([template])
    language = Dataset()
    language.RelationshipType = "HAS CONCEPT MOD"
    language.ValueType = "CODE"
    language.ConceptNameCodeSequence = DicomSequence(
        [_code("121049", "DCM", "Language of Content Item and Descendants")]
    )
    language.ConceptCodeSequence = DicomSequence([_code("nl", "RFC5646", "Dutch")])
    ds.ContentSequence = DicomSequence([
        language,
        _container("CONTAINS", _code("121070", "DCM", "Findings"),
                   [_text_item(_code("121071", "DCM", "Finding"), text) for text in findings]),
        _container("CONTAINS", _code("121072", "DCM", "Impressions"),
                   [_text_item(_code("121073", "DCM", "Impression"), impression)]),
    ])
    return ds
