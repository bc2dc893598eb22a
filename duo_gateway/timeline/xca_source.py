"""An XCA community as a timeline source: its ITI-38 answer turned into timeline studies.

A community answers in documents, the timeline speaks in studies, and the link between the two is
the study instance UID every XDS-I entry carries in its referenceIdList (xca.md §7). Choices:

- **One study per KOS entry.** The manifest is what a viewer retrieves (RAD-75 needs its uniqueId and
  repository), so it is the study's :class:`StudyRef`.
- **Reports hang under their study**, named by the same referenceIdList value; their ``Report.id`` is an
  opaque :class:`StudyRef` encoding naming the report document itself, so the API can later retrieve it
  (ITI-39) without keeping state.
- **A report whose study has no KOS entry still makes a study, with only that report.** A community
  may hold the radiologist's report while its images are elsewhere (or not shared), and dropping the
  report would hide the very thing a clinician is often after. Its StudyRef has no document to retrieve
  (``document_unique_id`` None); where another source holds the images, the timeline merge by study UID
  joins the two.
- **Entries that name no study are left out** (and counted in the detail): a timeline row needs a study.
- **Times stay local.** The serviceStartTime digits are the study's local Dutch time (see
  :mod:`duo_gateway.xca.metadata`), so ``started`` is an ISO 8601 local date-time without a zone.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Final

from duo_gateway.config.peers import XcaCommunity
from duo_gateway.timeline.model import Report, SourceOutcome, SourceStatus, StudyRef, TimelineStudy
from duo_gateway.xca.codes import BODY_PART_SNOMED, DCM_SCHEME, SNOMED_CT, STUDY_INSTANCE_UID_ID_TYPE
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.hl7 import Hl7FormatError, check_dtm, parse_reference_id
from duo_gateway.xca.initiating.finder import CommunityResponse, CommunityStatus
from duo_gateway.xca.metadata import KOS_FORMAT

#: CX.5 of an accession number in referenceIdList (ITI TF-3 §4.2.3.2.23).
ACCESSION_ID_TYPE: Final = "urn:ihe:iti:xds:2013:accession"
#: SNOMED CT anatomic region -> DICOM Body Part Examined: the reverse of what DUO and the sim send.
BODY_PART_BY_SNOMED: Final[dict[str, str]] = {code: part for part, (code, _) in BODY_PART_SNOMED.items()}
_DCM_SCHEMES: Final = frozenset({DCM_SCHEME, "DCM"})

_STATUS: Final[dict[CommunityStatus, SourceStatus]] = {
    "ok": "ok", "partial": "ok", "timeout": "timeout", "unavailable": "unavailable", "error": "error",
}


def outcome_from_response(community: XcaCommunity, response: CommunityResponse) -> SourceOutcome:
    """The timeline's view of one community's answer.

    PartialSuccess counts as "ok" because its entries are real and shown; what the community could
    not deliver stays visible in ``detail`` and ``errors``.
    """
    source_id = f"xca:{community.home_community_id}"
    studies, skipped = studies_from_entries(response.entries, source_id=source_id,
                                            home_community_id=community.home_community_id)
    detail = response.detail
    if response.status in ("ok", "partial"):
        detail = f"{detail}; {len(studies)} studies"
        if skipped:
            detail += f"; {skipped} entries without a study instance UID left out"
    return SourceOutcome(
        id=source_id, kind="xca", name=community.name, status=_STATUS[response.status], detail=detail,
        elapsed_ms=response.elapsed_s * 1000, studies=tuple(studies), errors=response.errors,
        entries=response.entries)


def studies_from_entries(entries: Iterable[DocumentEntry], *, source_id: str,
                         home_community_id: str) -> tuple[list[TimelineStudy], int]:
    """Studies in answer order, and how many entries named no study (and so were left out)."""
    kos: list[tuple[str, DocumentEntry]] = []
    reports: dict[str, list[DocumentEntry]] = {}
    skipped = 0
    for entry in entries:
        study_uid = _study_uid(entry)
        if study_uid is None:
            skipped += 1
        elif _is_kos(entry):
            kos.append((study_uid, entry))
        else:
            reports.setdefault(study_uid, []).append(entry)

    studies: list[TimelineStudy] = []
    with_kos = {uid for uid, _ in kos}
    for study_uid, entry in kos:
        home = entry.home or home_community_id
        studies.append(_study(
            study_uid, entry, source_id,
            StudyRef(kind="xca", study_uid=study_uid, home_community_id=home,
                     repository_unique_id=entry.repository_unique_id, document_unique_id=entry.unique_id),
            description=entry.title, reports=reports.get(study_uid, []), home_community_id=home_community_id))
    for study_uid, group in reports.items():
        if study_uid in with_kos:
            continue
        first = group[0]
        studies.append(_study(
            study_uid, first, source_id,
            StudyRef(kind="xca", study_uid=study_uid, home_community_id=first.home or home_community_id,
                     repository_unique_id=first.repository_unique_id),
            # A report's title describes the report, not the study: the merge may fill it from a copy
            # that has the manifest.
            description=None, reports=group, home_community_id=home_community_id))
    return studies, skipped


def institution_filter(studies: Iterable[TimelineStudy], uras: Iterable[str]) -> list[TimelineStudy]:
    """Studies authored by one of ``uras``; an empty ``uras`` keeps everything.

    URAs are compared after left-padding to eight digits (netherlands.md §6: older metadata writes
    ``10990`` for ``00010990``). A study without an institution URA is dropped whenever a filter is
    given: DUO cannot show that it comes from a chosen institution.
    """
    wanted = {u.strip().zfill(8) for u in uras}
    if not wanted:
        return list(studies)
    return [s for s in studies
            if s.institution_ura is not None and s.institution_ura.strip().zfill(8) in wanted]


def iso_local(dtm: str | None) -> str | None:
    """XDS DTM digits as ISO 8601 (``2024-03-12T14:30:00``, ``2024-03-12``); None when unusable."""
    if not dtm:
        return None
    try:
        check_dtm(dtm)
    except Hl7FormatError:
        return None
    parts = [dtm[0:4]]
    if len(dtm) >= 6:
        parts.append(dtm[4:6])
    if len(dtm) >= 8:
        parts.append(dtm[6:8])
    day = "-".join(parts)
    if len(dtm) < 10:
        return day
    time = dtm[8:].ljust(6, "0")
    return f"{day}T{time[0:2]}:{time[2:4]}:{time[4:6]}"


# --- helpers ---


def _is_kos(entry: DocumentEntry) -> bool:
    return entry.format_code is not None and entry.format_code.matches(KOS_FORMAT)


def _reference_ids(entry: DocumentEntry, id_type: str) -> list[str]:
    out: list[str] = []
    for value in entry.reference_ids:
        try:
            ident, kind = parse_reference_id(value)
        except Hl7FormatError:
            continue
        if kind == id_type:
            out.append(ident)
    return out


def _study_uid(entry: DocumentEntry) -> str | None:
    uids = _reference_ids(entry, STUDY_INSTANCE_UID_ID_TYPE)
    return uids[0] if uids else None


def _institution(entry: DocumentEntry) -> tuple[str | None, str | None]:
    """The first authoring institution with a URA; else the first named one (without URA)."""
    institutions = [x for a in entry.authors for x in a.institutions]
    for xon in institutions:
        if xon.ura is not None:
            return xon.ura, xon.name or None
    return None, (institutions[0].name or None) if institutions else None


def _study(study_uid: str, entry: DocumentEntry, source_id: str, ref: StudyRef, *, description: str | None,
           reports: list[DocumentEntry], home_community_id: str) -> TimelineStudy:
    modalities = tuple(dict.fromkeys(c.code for c in entry.event_codes if c.scheme in _DCM_SCHEMES))
    body_part = next((BODY_PART_BY_SNOMED[c.code] for c in entry.event_codes
                      if c.scheme == SNOMED_CT and c.code in BODY_PART_BY_SNOMED), None)
    accession = _reference_ids(entry, ACCESSION_ID_TYPE)
    ura, name = _institution(entry)
    return TimelineStudy(
        study_uid=study_uid, ref=ref, source_id=source_id, started=iso_local(entry.service_start_time),
        accession_number=accession[0] if accession else None, modalities=modalities,
        description=description, body_part=body_part, institution_ura=ura, institution_name=name,
        reports=tuple(_report(study_uid, r, home_community_id) for r in reports))


def _report(study_uid: str, entry: DocumentEntry, home_community_id: str) -> Report:
    ref = StudyRef(kind="xca", study_uid=study_uid, home_community_id=entry.home or home_community_id,
                   repository_unique_id=entry.repository_unique_id, document_unique_id=entry.unique_id)
    return Report(id=ref.encode(), title=entry.title, mime_type=entry.mime_type)


__all__ = [
    "ACCESSION_ID_TYPE", "BODY_PART_BY_SNOMED", "institution_filter", "iso_local", "outcome_from_response",
    "studies_from_entries",
]
