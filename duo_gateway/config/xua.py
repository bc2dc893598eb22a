"""XUA (IHE ITI-40): whose SAML assertions DUO believes, and how DUO signs its own.

Who may sign is not here: each XCA peer in ``[[clients.xca]]`` names its one ``issuer`` and the
``signing_certs`` pinned for it, so an assertion is believed only from the peer whose TLS identity
its issuer belongs to, signed by a key pinned for that issuer.
"""

from __future__ import annotations

from typing import Final

from pydantic import Field, field_validator, model_validator

from duo_gateway.config.base import ConfigPath, StrictModel
from duo_gateway.saml import PURPOSES

#: RoleCodeNL (2.16.840.1.113883.2.4.15.111) of the professionals who consult imaging (mitz.md §5):
#: 01.000 Arts, 01.010 Cardioloog, 01.015 Huisarts, 01.039 Radioloog, 97.000 Radiodiagnostisch
#: laborant. Anyone else (99.999 "other", a made-up code) is refused before Mitz is asked, because
#: Mitz decides on the patient's consent, not on whether the role has any business with images.
IMAGING_ROLES: Final = ("01.000", "01.010", "01.015", "01.039", "97.000")


class XuaConfig(StrictModel):
    #: Refuse inbound XCA requests without a valid assertion. Only a closed test network turns it off.
    required: bool = True
    #: Refuse a wsse:Security header without a wsu:Timestamp (with Created). WSS peers always send one.
    require_timestamp: bool = True
    #: Role codes (RoleCodeNL) of the professionals allowed to consult: see IMAGING_ROLES.
    roles: list[str] = Field(default_factory=lambda: list(IMAGING_ROLES), min_length=1)
    #: Purposes of use accepted; each must be one Mitz knows (TREAT, COC, ...). Imaging is for treatment.
    purposes: list[str] = Field(default_factory=lambda: ["TREAT"], min_length=1)
    #: Messages remembered to refuse a replay (same WS-Addressing MessageID), per process without
    #: ``storage.url``; each is kept until its assertion expires. When full, new messages are refused
    #: (a guard that forgot could let a replay pass): size it for peak requests x assertion lifetime.
    replay_cache_max: int = Field(default=1_000_000, ge=1_000, le=100_000_000)
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

    @field_validator("purposes")
    @classmethod
    def _known_purposes(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - PURPOSES)
        if unknown:
            raise ValueError(f"unknown purpose(s) {', '.join(unknown)}: "
                             f"Mitz knows {', '.join(sorted(PURPOSES))}")
        return value

    @field_validator("roles")
    @classmethod
    def _clean_roles(cls, value: list[str]) -> list[str]:
        if any(not r or r != r.strip() for r in value):
            raise ValueError("role codes must be non-empty codes without surrounding whitespace")
        return value

    @model_validator(mode="after")
    def _pair(self) -> XuaConfig:
        if (self.signing_key_file is None) != (self.signing_cert_file is None):
            raise ValueError("signing_key_file and signing_cert_file go together")
        return self
