"""A TLB hospital as a timeline source: Mitz closed question, then C-FIND, exactly as for ITI-38.

The timeline is national: studies held in DUO's own TLB hospitals are found through the same
consent-checked :class:`~duo_gateway.sources.base.ImagingSource` path the Responding Gateway uses,
with the TLB requester as the one Mitz is asked about.
"""

from __future__ import annotations

import time

import structlog

from duo_gateway.config.peers import TlbHospital
from duo_gateway.consent import ConsentGate, Refusal
from duo_gateway.sources.base import ImagingSource, InstanceRecord, SourceUnavailable, StudyRecord
from duo_gateway.timeline.model import (
    Report,
    SourceOutcome,
    SourceStatus,
    StudyRef,
    TimelineRequest,
    TimelineStudy,
)
from duo_gateway.xca.metadata import is_report
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

_REPORT_MODALITIES = ("SR", "DOC")


def _iso(da: str | None, tm: str | None) -> str | None:
    if not da or len(da) != 8 or not da.isdigit():
        return None
    day = f"{da[0:4]}-{da[4:6]}-{da[6:8]}"
    digits = (tm or "").split(".")[0].replace(":", "")
    if len(digits) >= 4 and digits.isdigit():
        digits = digits.ljust(6, "0")[:6]
        return f"{day}T{digits[0:2]}:{digits[2:4]}:{digits[4:6]}"
    return day


def study_from_record(record: StudyRecord, hospital: TlbHospital, home: str, source_id: str,
                      reports: list[InstanceRecord]) -> TimelineStudy:
    return TimelineStudy(
        study_uid=record.study_instance_uid,
        ref=StudyRef(kind="tlb", study_uid=record.study_instance_uid, home_community_id=home,
                     repository_unique_id=hospital.repository_unique_id, hospital_ura=hospital.ura),
        source_id=source_id, started=_iso(record.study_date, record.study_time),
        accession_number=record.accession_number or None,
        modalities=tuple(m for m in record.modalities if m not in ("SR", "KO", "PR", "DOC")),
        description=record.description or None, body_part=record.body_part,
        series_count=record.series_count, instance_count=record.instance_count,
        institution_ura=hospital.ura, institution_name=hospital.name,
        reports=tuple(Report(r.sop_instance_uid, r.title or "Radiologisch verslag", r.mime_type or
                             "application/dicom") for r in reports))


async def ask_tlb_hospital(request: TimelineRequest, requester: Claims, hospital: TlbHospital,
                           source: ImagingSource, gate: ConsentGate, home: str) -> SourceOutcome:
    """Never raises for what the hospital or Mitz does: every outcome is a SourceOutcome."""
    started = time.perf_counter()
    source_id = f"tlb:{hospital.ura}"

    def outcome(status: SourceStatus, detail: str, studies: tuple[TimelineStudy, ...] = ()) -> SourceOutcome:
        return SourceOutcome(source_id, "tlb", hospital.name, status, detail,
                             (time.perf_counter() - started) * 1000, studies)

    verdict = await gate.check(gate.for_hospital(requester, request.bsn, hospital))
    if isinstance(verdict, Refusal):
        if verdict.denied:
            return outcome("no-consent", f"Mitz: {verdict.summary}")
        return outcome("error", f"consent could not be established: {verdict.reason}")
    try:
        records = await source.find_studies(verdict, request.bsn, date_from=request.date_from,
                                            date_to=request.date_to)
        studies = []
        for record in records:
            reports: list[InstanceRecord] = []
            if any(m in _REPORT_MODALITIES for m in record.modalities):
                instances = await source.find_instances(verdict, request.bsn, record.study_instance_uid,
                                                        modalities=_REPORT_MODALITIES)
                reports = [i for i in instances if is_report(i)]
            studies.append(study_from_record(record, hospital, home, source_id, reports))
    except SourceUnavailable as exc:
        return outcome(exc.kind, exc.detail)
    return outcome("ok", f"{len(studies)} studies", tuple(studies))
