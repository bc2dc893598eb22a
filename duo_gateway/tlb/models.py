"""The TLB timeline API's wire format, and the only place it meets the timeline's own vocabulary.

These models are the single source of truth for the JSON the API accepts and returns: the component
schemas of ``schemas/tlb-api.openapi.yaml`` are what :func:`openapi_component_schemas` generates from
them (a test compares the two), so the document cannot describe one thing while the code does another.

The request side is strict on purpose. A timeline request names a patient and speaks for a
professional; anything DUO would have to guess about (a BSN sent as a number, a date with a time, an
unknown member that might be a misspelt filter) is refused, not coerced, because a guess could show one
patient's images to a professional who asked about another, or run a query the caller did not mean.
"""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Annotated, Any, Final, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationInfo, model_validator
from pydantic.json_schema import models_json_schema
from pydantic_core import PydanticCustomError

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.config.base import AeTitle
from duo_gateway.timeline.model import SourceKind, SourceOutcome, SourceStatus, TimelineRequest
from duo_gateway.timeline.result import MergedStudy, TimelineResult
from duo_gateway.transfer.jobstore import JobState, StudyState
from duo_gateway.xua import Claims

#: Where generated component schemas point their ``$ref``s, so they can be pasted into the document.
REF_TEMPLATE: Final = "#/components/schemas/{model}"
#: A bound on one request's fan-out; the Dutch hospital landscape is well below it.
MAX_INSTITUTIONS: Final = 500
#: Validation context key carrying :attr:`TimelineConfig.max_period_days` into :class:`Period`.
MAX_PERIOD_DAYS: Final = "max_period_days"

# Patterns are written for both engines that read them: pydantic's (Rust regex, where ``$`` is the end
# of the text, not "before a final newline") and JSON Schema's ECMA-262 in the OpenAPI document.
BSN_PATTERN: Final = r"^[0-9]{9}$"
URA_PATTERN: Final = r"^[0-9]{8}$"
UZI_PATTERN: Final = r"^[0-9]{1,32}$"
ROLE_PATTERN: Final = r"^[0-9]{2}\.[0-9]{3}$"
ORG_TYPE_PATTERN: Final = r"^[A-Za-z0-9]{1,4}$"


class ProblemType(StrEnum):
    """The ``type`` of every problem this API answers with; one per thing the caller has to fix."""

    MALFORMED_JSON = "urn:duo-gateway:problem:malformed-json"
    INVALID_REQUEST = "urn:duo-gateway:problem:invalid-request"
    INVALID_BSN = "urn:duo-gateway:problem:invalid-bsn"
    INVALID_PERIOD = "urn:duo-gateway:problem:invalid-period"
    INVALID_INSTITUTION = "urn:duo-gateway:problem:invalid-institution"
    INVALID_REQUESTER = "urn:duo-gateway:problem:invalid-requester"
    UNSUPPORTED_MEDIA_TYPE = "urn:duo-gateway:problem:unsupported-media-type"
    PAYLOAD_TOO_LARGE = "urn:duo-gateway:problem:payload-too-large"
    TIMEOUT = "urn:duo-gateway:problem:timeout"
    INTERNAL = "urn:duo-gateway:problem:internal"
    INVALID_STUDY = "urn:duo-gateway:problem:invalid-study"
    INVALID_DESTINATION = "urn:duo-gateway:problem:invalid-destination"
    INVALID_PATIENT_ID = "urn:duo-gateway:problem:invalid-patient-id"
    DESTINATION_NOT_ALLOWED = "urn:duo-gateway:problem:destination-not-allowed"
    NOT_FOUND = "urn:duo-gateway:problem:not-found"
    FORBIDDEN = "urn:duo-gateway:problem:forbidden"
    TOO_MANY_REQUESTS = "urn:duo-gateway:problem:too-many-requests"
    INVALID_ASSERTION = "urn:duo-gateway:problem:invalid-assertion"
    NO_CONSENT = "urn:duo-gateway:problem:no-consent"
    SOURCE_UNAVAILABLE = "urn:duo-gateway:problem:source-unavailable"


# --------------------------------------------------------------------------------------------------
# Request
# --------------------------------------------------------------------------------------------------


def _eleven_test(value: str) -> str:
    if not is_valid_bsn(value):
        # The value stays out of the message: it is echoed to the caller and may be logged.
        raise PydanticCustomError("bsn_eleven_test", "not a BSN: the number fails the 11-proef")
    return value


Bsn = Annotated[str, Field(pattern=BSN_PATTERN, description="Burgerservicenummer: nine digits passing the "
                           "11-proef (netherlands.md §8); legacy eight-digit numbers must be padded "
                           "by the caller, never by DUO."),
                AfterValidator(_eleven_test)]
Ura = Annotated[str, Field(pattern=URA_PATTERN,
                           description="URA (UZI register abonneenummer): eight digits.")]


class _Request(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class Patient(_Request):
    bsn: Bsn


class Period(_Request):
    """Inclusive calendar dates; the study date is what the sources filter on."""

    date_from: date = Field(alias="from", description="First day (inclusive), YYYY-MM-DD.")
    date_to: date = Field(alias="to", description="Last day (inclusive), YYYY-MM-DD; not before `from`.")

    @model_validator(mode="after")
    def _ordered_and_bounded(self, info: ValidationInfo) -> Period:
        if self.date_from > self.date_to:
            raise PydanticCustomError("period_order", "the period ends before it starts (from is after to)")
        limit = (info.context or {}).get(MAX_PERIOD_DAYS)
        days = (self.date_to - self.date_from).days + 1
        if isinstance(limit, int) and days > limit:
            # Every source is asked for the whole period: the bound keeps each query bounded.
            raise PydanticCustomError("period_too_long", "the period covers {days} days; at most {limit} "
                                      "are allowed", {"days": days, "limit": limit})
        return self


class Requester(_Request):
    """The professional the caller speaks for: the same attributes an XUA assertion carries, and what the
    Mitz consent question is asked with (netherlands.md §3)."""

    ura: Ura
    organization_type: str = Field(pattern=ORG_TYPE_PATTERN,
                                   description="Care-provider type, RoleCodeNL 2.16.840.1.113883.2.4.15.1060 "
                                   "(e.g. V6, Z3).")
    uzi: str = Field(pattern=UZI_PATTERN, description="UZI number of the responsible professional.")
    role: str = Field(pattern=ROLE_PATTERN,
                      description="Professional role, RoleCodeNL 2.16.840.1.113883.2.4.15.111 (e.g. 01.015).")
    purpose: Literal["TREAT", "COC"] = Field(description="Purpose of use, as Mitz knows it.")
    mandated_uzi: str | None = Field(default=None, pattern=UZI_PATTERN,
                                     description="UZI of a professional acting on the requester's mandate.")

    def claims(self) -> Claims:
        return Claims(uzi=self.uzi, role=self.role, ura=self.ura, purpose=self.purpose,
                      organisation_type=self.organization_type, mandated_uzi=self.mandated_uzi)

    @model_validator(mode="after")
    def _acceptable_claims(self) -> Requester:
        # Claims has the last word, so the API never accepts a requester the consent gate would refuse
        # as malformed; the patterns above are the documented subset of the same rules.
        try:
            self.claims()
        except ValueError as exc:
            raise PydanticCustomError("requester_claims", "not acceptable as requester claims: {reason}",
                                      {"reason": str(exc)}) from exc
        return self


class TimelineQuery(_Request):
    """POST {prefix}/timeline: one patient, one period, optionally some institutions, one requester."""

    patient: Patient
    period: Period
    institutions: list[Ura] = Field(default_factory=list, max_length=MAX_INSTITUTIONS,
                                    description="Only studies from these institutions (URAs); empty or "
                                    "absent: every institution. Any well-formed URA is accepted; one "
                                    "DUO has never heard of simply matches nothing.")
    requester: Requester

    def to_request(self) -> TimelineRequest:
        return TimelineRequest(
            bsn=self.patient.bsn,
            date_from=self.period.date_from,
            date_to=self.period.date_to,
            # A repeated URA asks nothing new; order is kept so what the caller sees is predictable.
            institutions=tuple(dict.fromkeys(self.institutions)),
            requester=self.requester.claims(),
        )


# --------------------------------------------------------------------------------------------------
# Response
# --------------------------------------------------------------------------------------------------


class _Response(BaseModel):
    # Every member is always present (null when unknown), so clients need not tell "absent" from null.
    model_config = ConfigDict(extra="forbid", frozen=True, json_schema_serialization_defaults_required=True)


class ReportLink(_Response):
    id: str
    title: str | None
    mime_type: str | None = None


class Institution(_Response):
    ura: str | None
    name: str | None


class Study(_Response):
    id: str = Field(description="Opaque; hand it back to fetch the study. Not a DICOM identifier.")
    study_instance_uid: str
    accession_number: str | None
    started: str | None = Field(description="ISO 8601 local date-time or date, as the source reported it.")
    modalities: list[str]
    description: str | None
    body_part: str | None
    series_count: int | None = Field(ge=0)
    instance_count: int | None = Field(ge=0)
    institution: Institution
    reports: list[ReportLink]
    sources: list[str] = Field(description="Ids of the entries in `sources` that returned this study.")

    @classmethod
    def from_merged(cls, study: MergedStudy) -> Study:
        return cls(
            id=study.id, study_instance_uid=study.study_uid, accession_number=study.accession_number,
            started=study.started, modalities=list(study.modalities), description=study.description,
            body_part=study.body_part, series_count=study.series_count, instance_count=study.instance_count,
            institution=Institution(ura=study.institution_ura, name=study.institution_name),
            reports=[ReportLink(id=r.id, title=r.title, mime_type=r.mime_type) for r in study.reports],
            sources=list(study.sources),
        )


class Source(_Response):
    """One source asked (or skipped), so the clinician can tell an empty timeline from an incomplete one."""

    id: str
    kind: SourceKind
    name: str
    status: SourceStatus
    detail: str
    elapsed_ms: int = Field(ge=0)

    @classmethod
    def from_outcome(cls, outcome: SourceOutcome) -> Source:
        return cls(id=outcome.id, kind=outcome.kind, name=outcome.name, status=outcome.status,
                   detail=outcome.detail, elapsed_ms=max(0, round(outcome.elapsed_ms)))


class TimelineAnswer(_Response):
    studies: list[Study]
    sources: list[Source]

    @classmethod
    def from_result(cls, result: TimelineResult) -> TimelineAnswer:
        return cls(studies=[Study.from_merged(s) for s in result.studies],
                   sources=[Source.from_outcome(o) for o in result.sources])


# --------------------------------------------------------------------------------------------------
# Transfers
# --------------------------------------------------------------------------------------------------

#: A DICOM LO value without backslash: what PatientID may hold.
PATIENT_ID_PATTERN: Final = r"^[ -\[\]-~]{1,64}$"
MAX_TRANSFER_STUDIES: Final = 100
#: Most studies one view request may name (the configured views.max_studies may be lower).
MAX_VIEW_STUDIES: Final = 200


class DestinationAddress(_Request):
    """An ad-hoc destination, accepted only where the gateway's configuration allows it."""

    ae_title: AeTitle
    host: str = Field(min_length=1, max_length=253, pattern=r"^[A-Za-z0-9.:_-]+$")
    port: int = Field(ge=1, le=65535)


class TransferQuery(_Request):
    """POST {prefix}/transfers: studies from a timeline, brought into the requester's own PACS."""

    studies: list[Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[A-Za-z0-9_-]+$")]] = Field(
        min_length=1, max_length=MAX_TRANSFER_STUDIES,
        description="Study `id`s exactly as a timeline answer gave them (opaque, sealed by DUO).")
    destination: str | DestinationAddress = Field(
        description="The name of a configured destination PACS, or an AE title/host/port where allowed.")
    requester: Requester
    local_patient_id: str | None = Field(
        default=None, pattern=PATIENT_ID_PATTERN,
        description="The patient's id in the destination PACS: DUO writes it as PatientID (keeping the "
        "original in OtherPatientIDsSequence) so the study lands on the right patient.")


class ViewQuery(_Request):
    """POST {prefix}/views: studies from a timeline, shown in a viewer over DICOMweb before import."""

    studies: list[Annotated[str, Field(min_length=1, max_length=4096, pattern=r"^[A-Za-z0-9_-]+$")]] = Field(
        min_length=1, max_length=MAX_VIEW_STUDIES,
        description="Study `id`s exactly as a timeline answer gave them (opaque, sealed by DUO), all of "
        "one patient.")
    requester: Requester


class ViewStudy(_Response):
    id: str = Field(description="The study id from the request.")
    study_instance_uid: str
    source: str = Field(description="Where DUO fetches it from, e.g. `tlb:00010001` or `xca:urn:oid:…`.")
    instances: int = Field(ge=0, description="Instances in the source's manifest.")


class ViewCreated(_Response):
    id: str
    dicomweb: str = Field(description="The view's DICOMweb root (PS3.18): a capability URL, usable by the "
                          "client that made the view only, until `expires_at` or until deleted.")
    expires_at: str = Field(description="RFC 3339, UTC.")
    studies: list[ViewStudy]


#: The store's own states, so the API cannot drift from what jobs can be in.
TransferState = JobState
StudyTransferState = StudyState


class TransferAccepted(_Response):
    id: str
    state: TransferState
    href: str = Field(description="Where to read the transfer's state.")


class StudyTransfer(_Response):
    id: str = Field(description="The study id from the request.")
    state: StudyTransferState
    instances_expected: int | None = Field(ge=0, description="From the source's manifest; null until read.")
    instances_stored: int = Field(ge=0)
    instances_failed: int = Field(ge=0)
    bytes: int = Field(ge=0)
    detail: str | None


class TransferStatus(_Response):
    id: str
    state: TransferState
    instances_expected: int | None = Field(ge=0)
    instances_stored: int = Field(ge=0, description="Stored at the destination with a success status.")
    instances_failed: int = Field(ge=0, description="Not stored (yet): the last attempt failed.")
    bytes: int = Field(ge=0)
    destination: str
    created: str = Field(description="ISO 8601, UTC.")
    updated: str = Field(description="ISO 8601, UTC.")
    cancel_requested: bool
    studies: list[StudyTransfer]
    errors: list[str]


class TransferList(_Response):
    """One page of the calling client's own transfers, newest first."""

    transfers: list[TransferStatus]
    limit: int = Field(ge=1)
    offset: int = Field(ge=0)


class FieldError(_Response):
    pointer: str = Field(description="RFC 6901 JSON Pointer into the request body; empty: the body itself.")
    detail: str
    code: str = Field(description="Machine-readable reason (e.g. missing, string_pattern_mismatch, "
                      "bsn_eleven_test, period_order, period_too_long, extra_forbidden).")


class Problem(BaseModel):
    """RFC 9457 problem details. Not closed (RFC 9457 §3.2: clients ignore members they do not know)."""

    model_config = ConfigDict(frozen=True)

    type: str = Field(description="What went wrong; one of the listed URNs, or about:blank.",
                      examples=[t.value for t in ProblemType])
    title: str
    status: int = Field(ge=400, le=599)
    detail: str
    errors: list[FieldError] | None = Field(default=None, description="Each refused member of the request.")
    request_id: str | None = Field(default=None, description="Also in the X-Request-ID header; quote it "
                                   "when asking about this request.")


def openapi_component_schemas() -> dict[str, Any]:
    """The ``components.schemas`` of the OpenAPI document, as the models define them.

    Requests are described as validated, responses as serialised (pydantic's two JSON Schema modes).
    """
    _, top = models_json_schema(
        [(TimelineQuery, "validation"), (TimelineAnswer, "serialization"), (Problem, "serialization"),
         (TransferQuery, "validation"), (TransferAccepted, "serialization"),
         (TransferStatus, "serialization"), (TransferList, "serialization"),
         (ViewQuery, "validation"), (ViewCreated, "serialization")],
        ref_template=REF_TEMPLATE)
    defs: dict[str, Any] = top["$defs"]
    return defs


__all__ = [
    "MAX_INSTITUTIONS",
    "MAX_PERIOD_DAYS",
    "DestinationAddress",
    "FieldError",
    "Institution",
    "Patient",
    "Period",
    "Problem",
    "ProblemType",
    "ReportLink",
    "Requester",
    "Source",
    "Study",
    "StudyTransfer",
    "TimelineAnswer",
    "TimelineQuery",
    "TransferAccepted",
    "TransferList",
    "TransferQuery",
    "TransferStatus",
    "ViewCreated",
    "ViewQuery",
    "ViewStudy",
    "openapi_component_schemas",
]
