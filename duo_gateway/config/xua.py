"""XUA (IHE ITI-40): whose SAML assertions DUO believes, and how DUO signs its own."""

from __future__ import annotations

from pydantic import Field, model_validator

from duo_gateway.config.base import ConfigPath, StrictModel


class XuaConfig(StrictModel):
    #: Refuse inbound XCA requests without a valid assertion. Only a closed test network turns it off.
    required: bool = True
    #: PEM files with the certificates that may sign assertions, or the CAs that issue them.
    trusted_certs: list[ConfigPath] = Field(default_factory=list)
    #: Audiences DUO accepts (AudienceRestriction). Empty: the gateway's own home community id.
    audiences: list[str] = Field(default_factory=list)
    #: Some live peers still sign with SHA-1; accept it only when a peer really needs it.
    allow_sha1: bool = False
    #: Tolerated clock difference when checking NotBefore/NotOnOrAfter.
    clock_skew_s: float = Field(default=60.0, ge=0, le=600)
    #: Assertions valid for longer than this are refused (Twiin tokens live 10 minutes).
    max_lifetime_s: float = Field(default=3600.0, gt=0, le=86400)
    #: Issuer of the assertions DUO itself sends (Initiating Gateway). Empty: home community id.
    issuer: str | None = None
    #: Key and certificate DUO signs its own assertions with.
    signing_key_file: ConfigPath | None = None
    signing_cert_file: ConfigPath | None = None
    #: Signed assertions DUO keeps per community to reuse for later requests of the same requester
    #: about the same patient, until a minute before they expire (least recently used dropped first;
    #: ~5 kB each, so 128 for 50 communities is ~32 MB at most). Reuse exposes nothing new: each names
    #: that one community as its only audience, and the community already holds it. 0: sign one per
    #: request.
    reuse_assertions: int = Field(default=128, ge=0, le=100_000)

    @model_validator(mode="after")
    def _pair(self) -> XuaConfig:
        if (self.signing_key_file is None) != (self.signing_cert_file is None):
            raise ValueError("signing_key_file and signing_cert_file go together")
        return self
