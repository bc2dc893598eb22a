"""How DUO reaches Mitz. Every field errs on the side of no disclosure."""

from __future__ import annotations

from pydantic import AnyHttpUrl, Field

from duo_gateway.config.base import StrictModel
from duo_gateway.config.tls import ClientTls


class MitzConfig(StrictModel):
    #: ``{mitzbase}/geslotenautorisatievraag/xacml3``.
    closed_url: AnyHttpUrl
    #: ``{mitzbase}/openautorisatievraag``.
    open_url: AnyHttpUrl
    #: ``{mitzbase}/abonnementen/fhir/Subscription``.
    subscriptions_url: AnyHttpUrl
    tls: ClientTls | None = None
    #: Per-call deadline: a late answer is no answer, and no answer is no consent.
    timeout_s: float = Field(default=3.0, gt=0, le=60)
    #: Consent can be withdrawn any moment: caching is off unless asked for, and at most 60 s.
    cache_ttl_s: float = Field(default=0.0, ge=0, le=60)
    #: XML-DSig-sign the XACML request (whether Mitz requires it is unverified).
    sign_requests: bool = False
