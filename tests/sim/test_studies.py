from __future__ import annotations

import array
import functools
import math
import random
import sys
from collections import Counter
from datetime import date, timedelta
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, BasicTextSRStorage, ExplicitVRLittleEndian

from duo_gateway.bsn import BSN_OID
from duo_gateway.sim.config import SimInstitution, SimPatient, default_network
from duo_gateway.sim.studies import (
    REFERENCE_DATE,
    STUDY_WINDOW_DAYS,
    GeneratedStudy,
    _pixels,
    generate_studies,
    write_study,
)

NET = default_network()
PATIENT = NET.patients[0]
HOSPITAL = NET.hospitals[0]

IMAGE_SOP_CLASSES = {
    "CT": "1.2.840.10008.5.1.4.1.1.2",
    "MR": "1.2.840.10008.5.1.4.1.1.4",
    "CR": "1.2.840.10008.5.1.4.1.1.1",
    "US": "1.2.840.10008.5.1.4.1.1.6.1",
}


def _all_uids(studies: list[GeneratedStudy]) -> list[str]:
    uids: list[str] = []
    for study in studies:
        uids.append(study.study_instance_uid)
        for ds in study.instances:
            uids.extend([str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)])
    return uids


@functools.cache
def _every_study() -> list[GeneratedStudy]:
    """Six studies per patient per data holder of the demo network, generated once per session.

    Its users check UIDs, counts, dates and modalities, none of which depends on the image size, so
    the smallest images keep the pixel generation out of their time."""
    return [
        s
        for p in NET.patients
        for inst in [*NET.hospitals, *(i for c in NET.communities for i in c.institutions)]
        for s in generate_studies(p, inst, 6, NET.seed, image_size=8)
    ]


def _texts(item: Dataset) -> list[str]:
    found = [str(item.TextValue)] if "TextValue" in item else []
    for child in item.get("ContentSequence", []):
        found.extend(_texts(child))
    return found


def test_same_seed_same_studies_down_to_the_pixels() -> None:
    a = generate_studies(PATIENT, HOSPITAL, 4, seed=7)
    b = generate_studies(PATIENT, HOSPITAL, 4, seed=7)
    assert _all_uids(a) == _all_uids(b)
    assert [s.study_date for s in a] == [s.study_date for s in b]
    assert [s.report_text for s in a] == [s.report_text for s in b]
    for sa, sb in zip(a, b, strict=True):
        for da, db in zip(sa.instances, sb.instances, strict=True):
            assert da == db


def test_seed_patient_and_institution_each_change_every_uid() -> None:
    base = set(_all_uids(generate_studies(PATIENT, HOSPITAL, 3, seed=7)))
    other_seed = set(_all_uids(generate_studies(PATIENT, HOSPITAL, 3, seed=8)))
    other_patient = set(_all_uids(generate_studies(NET.patients[1], HOSPITAL, 3, seed=7)))
    other_hospital = set(_all_uids(generate_studies(PATIENT, NET.hospitals[1], 3, seed=7)))
    assert base.isdisjoint(other_seed)
    assert base.isdisjoint(other_patient)
    assert base.isdisjoint(other_hospital)


def test_more_studies_only_appends() -> None:
    three = generate_studies(PATIENT, HOSPITAL, 3, seed=NET.seed)
    five = generate_studies(PATIENT, HOSPITAL, 5, seed=NET.seed)
    assert _all_uids(three) == _all_uids(five[:3])


def test_uids_are_valid_and_unique_across_the_whole_network() -> None:
    # series UIDs repeat once per instance in _all_uids; SOP and study UIDs must not collide at all
    for uid in set(_all_uids(_every_study())):
        assert UID(uid).is_valid, uid
        assert len(uid) <= 64
    sops = [str(ds.SOPInstanceUID) for s in _every_study() for ds in s.instances]
    assert len(sops) == len(set(sops))
    studies = [s.study_instance_uid for s in _every_study()]
    assert len(studies) == len(set(studies))


def test_counts_modalities_and_reports() -> None:
    studies = _every_study()
    modalities_seen: set[str] = set()
    for index_in_list, study in enumerate(studies):
        index = index_in_list % 6
        assert 2 <= len(study.instances) <= 12, study.description
        image_modalities = {str(ds.Modality) for ds in study.instances if ds.Modality != "SR"}
        assert len(image_modalities) == 1
        (modality,) = image_modalities
        modalities_seen.add(modality)
        series = Counter(str(ds.SeriesInstanceUID) for ds in study.instances if ds.Modality != "SR")
        if modality in ("CT", "MR"):
            assert 2 <= len(series) <= 3 and all(2 <= n <= 3 for n in series.values())
        elif modality == "CR":
            assert 2 <= len(series) <= 3 and set(series.values()) == {1}
        else:
            assert len(series) == 1
        srs = [ds for ds in study.instances if ds.Modality == "SR"]
        # every other study (deterministically: the even indices) carries exactly one report
        assert len(srs) == (1 if index % 2 == 0 else 0)
        assert study.has_report == bool(srs)
        assert study.modalities == ((modality, "SR") if srs else (modality,))
        for ds in study.instances:
            assert ds.StudyInstanceUID == study.study_instance_uid
            assert ds.AccessionNumber == study.accession_number
            assert ds.SOPClassUID == (BasicTextSRStorage if ds.Modality == "SR"
                                      else IMAGE_SOP_CLASSES[modality])
    assert modalities_seen == {"CT", "MR", "CR", "US"}


def test_study_dates_fall_in_the_recent_window() -> None:
    earliest = (REFERENCE_DATE - timedelta(days=STUDY_WINDOW_DAYS)).strftime("%Y%m%d")
    for study in _every_study():
        assert earliest <= study.study_date < REFERENCE_DATE.strftime("%Y%m%d")
        date(int(study.study_date[:4]), int(study.study_date[4:6]), int(study.study_date[6:]))
        assert len(study.study_time) == 6 and "073000" <= study.study_time < "190000"


def test_written_files_round_trip_with_required_tags(tmp_path: Path) -> None:
    patient = SimPatient(bsn="900186021", name="de Vries^Bram", birth_date="19581102", sex="M",
                         consent="all")
    institution = SimInstitution(ura="00020011", name="UMC Noord")
    studies = generate_studies(patient, institution, 4, seed=99, image_size=32)
    for study in studies:
        paths = write_study(study, tmp_path / study.study_instance_uid)
        assert len(paths) == len(study.instances)
        for path in paths:
            # force=False: a file without a proper preamble and meta would fail here
            ds = dcmread(path)
            assert ds.file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
            assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
            assert ds.file_meta.MediaStorageSOPClassUID == ds.SOPClassUID
            assert path.name == f"{ds.SOPInstanceUID}.dcm"
            assert ds.PatientID == "900186021"
            assert ds.PatientName == "de Vries^Bram"
            assert ds.IssuerOfPatientID == "NLMINBIZA"
            other = ds.OtherPatientIDsSequence[0]
            assert other.PatientID == "900186021"
            assert other.IssuerOfPatientIDQualifiersSequence[0].UniversalEntityID == BSN_OID
            assert ds.PatientBirthDate == "19581102" and ds.PatientSex == "M"
            assert ds.StudyDate == study.study_date and ds.StudyTime == study.study_time
            assert ds.InstitutionName == "UMC Noord"
            for keyword in ("StudyID", "ReferringPhysicianName", "StudyDescription", "SeriesNumber",
                            "InstanceNumber", "Modality", "SeriesInstanceUID"):
                assert keyword in ds, keyword
            if ds.Modality == "SR":
                assert ds.CompletionFlag == "COMPLETE" and ds.VerificationFlag == "VERIFIED"
                texts = _texts(ds)
                assert study.report_text is not None
                assert texts and all(t in study.report_text for t in texts)
                evidence = ds.CurrentRequestedProcedureEvidenceSequence[0]
                referenced = {str(r.ReferencedSOPInstanceUID)
                              for s in evidence.ReferencedSeriesSequence for r in s.ReferencedSOPSequence}
                images = {str(i.SOPInstanceUID) for i in study.instances if i.Modality != "SR"}
                assert referenced == images
                continue
            assert ds.BodyPartExamined == study.body_part
            assert ds.Rows == 32 and ds.Columns == 32
            assert ds.BitsAllocated == 16 and ds.PhotometricInterpretation == "MONOCHROME2"
            assert len(ds.PixelData) == 32 * 32 * 2
            if ds.Modality in ("CT", "MR"):
                assert len(ds.ImagePositionPatient) == 3
                assert ds.FrameOfReferenceUID
    assert any(s.has_report for s in studies) and not all(s.has_report for s in studies)


def test_pixel_data_is_not_flat_and_differs_between_images() -> None:
    study = generate_studies(PATIENT, HOSPITAL, 1, seed=3)[0]
    images = [ds for ds in study.instances if ds.Modality != "SR"]
    first = images[0].PixelData
    assert len(set(first[0::2])) > 20
    assert first != images[1].PixelData


def _pixels_per_pixel(size: int, rng: random.Random) -> bytes:
    """The per-pixel loop the simulator's pixel data was first defined by: the reference its
    vectorised replacement must reproduce byte for byte, or every simulated study would change."""
    cx = size / 2 + rng.uniform(-size / 10, size / 10)
    cy = size / 2 + rng.uniform(-size / 10, size / 10)
    radius = size * rng.uniform(0.30, 0.42)
    inner = radius * rng.uniform(0.25, 0.45)
    base = rng.randint(900, 1200)
    noise = [rng.randint(0, 120) for _ in range(size * 7 + 13)]
    values = array.array("H")
    for y in range(size):
        gradient_row = 200 * y // size
        for x in range(size):
            d = math.hypot(x - cx, y - cy)
            if d < inner:
                v = base + 900
            elif d < radius:
                v = base + 200 + int(300 * (1 - d / radius))
            else:
                v = gradient_row
            v += noise[(x * 31 + y * 17) % len(noise)]
            values.append(min(v, 4095))
    if sys.byteorder == "big":
        values.byteswap()
    return values.tobytes()


@pytest.mark.parametrize("size", [8, 9, 31, 64, 129])
def test_pixels_are_byte_identical_to_the_per_pixel_definition(size: int) -> None:
    for seed in range(12):
        rng_a, rng_b = random.Random(f"{seed}|{size}"), random.Random(f"{seed}|{size}")
        assert _pixels(size, rng_a) == _pixels_per_pixel(size, rng_b), seed
        assert rng_a.random() == rng_b.random(), "the same RNG draws, so later values stay the same"


def test_rejects_nonsense_arguments() -> None:
    with pytest.raises(ValueError):
        generate_studies(PATIENT, HOSPITAL, -1, seed=1)
    with pytest.raises(ValueError):
        generate_studies(PATIENT, HOSPITAL, 1, seed=1, image_size=4)
    assert generate_studies(PATIENT, HOSPITAL, 0, seed=1) == []
