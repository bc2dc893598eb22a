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
