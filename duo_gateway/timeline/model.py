"""The national timeline's own vocabulary, between the sources (XCA communities, TLB hospitals) and
the TLB API: one study, one source's outcome, the request. No wire format lives here."""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass, field
from datetime import date
from typing import Literal

from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xua import Claims

SourceKind = Literal["xca", "tlb"]
SourceStatus = Literal["ok", "no-consent", "not-localized", "timeout", "unavailable", "error"]


@dataclass(frozen=True)
class TimelineRequest:
    bsn: str
    date_from: date
    date_to: date
    #: URAs to keep (empty: every institution).
    institutions: tuple[str, ...]
    requester: Claims
    #: The TLB system that carried the request (its configured client name), for the audit trail.
    client: str | None = None


@dataclass(frozen=True)
class Report:
    id: str
    title: str | None
    mime_type: str | None = None


@dataclass(frozen=True)
class StudyRef:
    """Where a study can be fetched from; encoded as the API's opaque study ``id`` (issue: transfers)."""

    kind: SourceKind
    study_uid: str
    #: XCA: the community; TLB: DUO's own home community id.
    home_community_id: str
    #: XCA: the repository and the KOS uniqueId to retrieve; TLB: the hospital's URA.
    repository_unique_id: str | None = None
    document_unique_id: str | None = None
    hospital_ura: str | None = None

    def encode(self) -> str:
        data = {"k": self.kind, "s": self.study_uid, "h": self.home_community_id,
                "r": self.repository_unique_id, "d": self.document_unique_id, "a": self.hospital_ura}
        raw = json.dumps({k: v for k, v in data.items() if v is not None}, separators=(",", ":"))
        return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")

    @classmethod
    def decode(cls, value: str) -> StudyRef:
        """Strict: an id that was not made by :meth:`encode` raises ValueError."""
        try:
            data = json.loads(base64.urlsafe_b64decode(value + "=" * (-len(value) % 4)))
            kind = data["k"]
            if kind not in ("xca", "tlb") or not isinstance(data["s"], str) or not isinstance(data["h"], str):
                raise ValueError("bad kind or uid")
            return cls(kind, data["s"], data["h"], data.get("r"), data.get("d"), data.get("a"))
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise ValueError("not a timeline study id") from exc


@dataclass(frozen=True)
class TimelineStudy:
    """One study as a source describes it; merged across sources by study instance UID."""

    study_uid: str
    ref: StudyRef
    source_id: str
    started: str | None = None            # ISO 8601 local date-time or date
    accession_number: str | None = None
    modalities: tuple[str, ...] = ()
    description: str | None = None
    body_part: str | None = None
    series_count: int | None = None
    instance_count: int | None = None
    institution_ura: str | None = None
    institution_name: str | None = None
    reports: tuple[Report, ...] = ()


@dataclass(frozen=True)
class SourceOutcome:
    """What one source (asked or skipped) contributed, and why not more."""

    id: str
    kind: SourceKind
    name: str
    status: SourceStatus
    detail: str = ""
    elapsed_ms: float = 0.0
    studies: tuple[TimelineStudy, ...] = ()
    #: Registry errors a community returned alongside results (PartialSuccess), for the detail.
    errors: tuple[RegistryError, ...] = field(default=())
    #: Raw entries as received (XCA), kept for audit and for callers that need more than the summary.
    entries: tuple[DocumentEntry, ...] = field(default=())
