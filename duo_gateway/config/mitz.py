"""How DUO reaches Mitz. Every field errs on the side of no disclosure."""

from __future__ import annotations

from pydantic import AnyHttpUrl, Field, model_validator

from duo_gateway.config.base import ConfigPath, StrictModel
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
    #: Data categories (gegevenscategorie) asked in the closed question; GGC002 covers imaging.
    categories: list[str] = Field(default_factory=lambda: ["GGC002"], min_length=1)
    #: XML-DSig-sign the XACML request (whether Mitz requires it is unverified).
    sign_requests: bool = False
    #: Signing key and certificate (RSA, PKIoverheid); default to the mTLS client pair in ``tls``.
    signing_key_file: ConfigPath | None = None
    signing_cert_file: ConfigPath | None = None
    #: The URL Mitz posts consent notifications to, as whitelisted by the Mitz team; it is the
    #: rest-hook endpoint of every subscription. None disables subscriptions.
    notify_url: AnyHttpUrl | None = None
    #: Path on DUO's HTTP listener that receives those notifications.
    notify_path: str = Field(default="/mitz/notify", pattern=r"^/[A-Za-z0-9/_.-]*$")
    #: How often to look for new patients in each TLB hospital's PACS and subscribe them (0 = never).
    subscription_sync_interval_s: float = Field(default=0.0, ge=0)
    #: On the first sync, how far back (in days of StudyDate) to look for patients.
    subscription_lookback_days: int = Field(default=30, ge=1, le=36500)

    @model_validator(mode="after")
    def _signing_material(self) -> MitzConfig:
        if (self.signing_key_file is None) != (self.signing_cert_file is None):
            raise ValueError("signing_key_file and signing_cert_file go together")
        if self.sign_requests and self.signing_key_file is None and (
                self.tls is None or self.tls.key_file is None):
            raise ValueError("sign_requests needs signing_key_file/signing_cert_file or a tls client pair")
        return self

    def signing_pair(self) -> tuple[ConfigPath, ConfigPath] | None:
        """(key, cert) to sign XACML requests with, or None when requests go unsigned."""
        if not self.sign_requests:
            return None
        if self.signing_key_file is not None and self.signing_cert_file is not None:
            return self.signing_key_file, self.signing_cert_file
        assert self.tls is not None and self.tls.key_file is not None and self.tls.cert_file is not None
        return self.tls.key_file, self.tls.cert_file
