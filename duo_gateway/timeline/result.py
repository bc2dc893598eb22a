"""What a timeline run hands to the TLB API: studies already merged across sources, plus every source's
outcome. It sits between the orchestration and the wire format so that neither imports the other."""

from __future__ import annotations

from dataclasses import dataclass

from duo_gateway.timeline.model import Report, SourceOutcome


@dataclass(frozen=True)
class MergedStudy:
    """One study as the timeline shows it: the same study instance UID seen by several sources is one
    entry (netherlands.md: every study appears only once), and ``sources`` says who had it."""

    study_uid: str
    #: Opaque to the caller (a sealed :class:`~duo_gateway.timeline.model.StudyRef` and BSN, see
    #: :mod:`duo_gateway.timeline.study_ids`), handed back to fetch the study, so the API never has to
    #: expose where it lives and a caller cannot forge one.
    id: str
    started: str | None = None            # ISO 8601 local date-time or date, as the source gave it
    accession_number: str | None = None
    modalities: tuple[str, ...] = ()
    description: str | None = None
    body_part: str | None = None
    series_count: int | None = None
    instance_count: int | None = None
    institution_ura: str | None = None
    institution_name: str | None = None
    reports: tuple[Report, ...] = ()
    #: Ids of the sources (:attr:`SourceOutcome.id`) that returned this study.
    sources: tuple[str, ...] = ()


@dataclass(frozen=True)
class TimelineResult:
    """A complete answer, partial results included: a source that failed is an outcome, not an exception."""

    studies: list[MergedStudy]
    sources: list[SourceOutcome]


__all__ = ["MergedStudy", "TimelineResult"]
