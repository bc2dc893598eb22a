"""The TLB timeline API: where it is mounted, how long a timeline may take, who may call it."""

from __future__ import annotations

from pydantic import Field, SecretStr

from duo_gateway.config.base import StrictModel


class TimelineConfig(StrictModel):
    enabled: bool = True
    #: The API prefix; the contract is POST {prefix}/timeline.
    path_prefix: str = Field(default="/tlb/v1", pattern=r"^/[A-Za-z0-9/_.-]*[A-Za-z0-9_.-]$")
    #: The whole timeline answers within this; sources still running are reported as "timeout".
    deadline_s: float = Field(default=10.0, gt=0, le=120)
    #: Longest period one request may cover, in days (a bounded query per source).
    max_period_days: int = Field(default=36_600, ge=1)
    #: Ask DUO's own TLB hospitals too (consent-checked C-FIND), so the timeline is national.
    include_tlb_hospitals: bool = True
    #: Key (32 bytes, base64) sealing the opaque study ids the API hands out; replicas must share it.
    #: Unset: a key file under storage.path (keys/study-id.key), made on first start. Set it through
    #: the environment (DUO__TIMELINE__STUDY_ID_KEY), never in the file.
    study_id_key: SecretStr | None = None
    #: How long a study id from a timeline may be used for a transfer (or a view). It is bound to the
    #: requester's URA as well: another organisation presenting it is refused.
    study_id_ttl_s: float = Field(default=24 * 3600.0, ge=60, le=30 * 86400)
