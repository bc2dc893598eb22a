"""Who may call DUO: the systems named here, recognised by their TLS client certificate, and what each may do.

Nothing a caller writes about itself is believed unless something signed binds it: a TLB client's
certificate binds the URAs it may speak for, an XCA peer's certificate binds the home community and the
XUA issuer it is. A request on a route whose owner is not the calling system is refused (403) before any
handler runs; a route nobody owns is served to nobody.
"""

from __future__ import annotations

import re
from typing import Literal

from pydantic import Field, field_validator, model_validator

from duo_gateway.config.base import ConfigPath, HomeCommunityId, StrictModel, Ura

#: What a TLB client may use on the TLB API; each maps onto the routes of that feature.
TlbCapability = Literal["timeline", "transfers", "views"]
TLB_CAPABILITIES: tuple[TlbCapability, ...] = ("timeline", "transfers", "views")

_HEX = re.compile(r"[0-9a-f]{64}")
ClientName = str


class CertificateMatch(StrictModel):
    """How a presented (and already CA-verified) client certificate is recognised.

    Exactly one way: a fingerprint (``sha256``, or ``cert_file`` from which it is computed), or the
    issuer together with the subject or with the URA in a UZI server certificate's subjectAltName
    (netherlands.md, "UZI server certificates"), or ``absent`` for a caller without any certificate.
    Subject or URA alone is never enough: another CA could issue the same name.
    """

    #: SHA-256 fingerprint of the DER certificate, hex (colons and case ignored).
    sha256: str | None = None
    #: PEM file of the client's certificate; its fingerprint is what is matched.
    cert_file: ConfigPath | None = None
    #: RFC 4514 issuer DN (as ``openssl x509 -issuer -nameopt RFC2253`` prints it).
    issuer: str | None = Field(default=None, min_length=1, max_length=1024)
    #: RFC 4514 subject DN; with ``issuer``.
    subject: str | None = Field(default=None, min_length=1, max_length=1024)
    #: URA in the UZI server certificate's subjectAltName; with ``issuer``.
    ura: Ura | None = None
    #: A caller presenting no certificate at all: a plain-HTTP listener on loopback (tests, a sidecar
    #: proxy that authenticated the caller itself). Never matches on a listener requiring mTLS.
    absent: bool = False

    @field_validator("sha256")
    @classmethod
    def _normalise(cls, value: str | None) -> str | None:
        if value is None:
            return None
        clean = value.replace(":", "").strip().lower()
        if not _HEX.fullmatch(clean):
            raise ValueError("sha256 must be 64 hex digits (colons allowed)")
        return clean

    @model_validator(mode="after")
    def _one_way(self) -> CertificateMatch:
        ways = [self.sha256 is not None, self.cert_file is not None,
                self.issuer is not None or self.subject is not None or self.ura is not None, self.absent]
        if sum(ways) != 1:
            raise ValueError("give exactly one of: sha256, cert_file, issuer with subject or ura, absent")
        if (self.subject is not None or self.ura is not None) and self.issuer is None:
            raise ValueError("subject and ura match only together with issuer")
        if self.issuer is not None and self.subject is None and self.ura is None:
            raise ValueError("issuer alone would admit every certificate of that CA: add subject or ura")
        return self


class _Client(StrictModel):
    name: ClientName = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    certificate: CertificateMatch
    #: Requests of this client in progress at once; more are answered 429 with Retry-After.
    max_concurrent: int = Field(default=32, ge=1, le=10_000)


class TlbClient(_Client):
    """A TLB system (a hospital's timeline app or TLB gateway) calling the TLB API."""

    #: The organisations this system may speak for: a request's ``requester.ura`` must be one of them.
    uras: list[Ura] = Field(min_length=1)
    #: The parts of the TLB API it may use.
    routes: list[TlbCapability] = Field(default_factory=lambda: list(TLB_CAPABILITIES), min_length=1)
    #: Transfer destinations (``transfers.destinations`` names) it may send to; None: every configured
    #: destination that admits the requester's URA. Ad-hoc destinations are never in this list.
    destinations: list[str] | None = None
    #: Who the professional is: ``body``, the request's ``requester`` (its URA must be one of ``uras``);
    #: or ``assertion``, a XUA assertion the client's own issuer signed, sent as ``Authorization: SAML
    #: <base64 assertion>``: the requester is taken from it and the body's must match.
    identity: Literal["body", "assertion"] = "body"
    #: With ``identity = "assertion"``: the SAML Issuer of the client's assertions and the certificates
    #: pinned to sign them.
    assertion_issuer: str | None = Field(default=None, min_length=1, max_length=1024)
    assertion_signing_certs: list[ConfigPath] = Field(default_factory=list)

    @model_validator(mode="after")
    def _assertion_trust(self) -> TlbClient:
        missing = self.assertion_issuer is None or not self.assertion_signing_certs
        if self.identity == "assertion" and missing:
            raise ValueError('identity = "assertion" needs assertion_issuer and assertion_signing_certs')
        return self


class XcaPeer(_Client):
    """An XCA Initiating Gateway of an XDS community calling DUO's responding gateway."""

    home_community_id: HomeCommunityId
    #: The SAML Issuer of the XUA assertions this peer presents; assertions of any other issuer are
    #: refused on its connection, and this issuer's assertions are refused on any other connection.
    issuer: str = Field(min_length=1, max_length=1024)
    #: The certificates allowed to sign this issuer's assertions (pinned; a chain to a CA is not enough).
    signing_certs: list[ConfigPath] = Field(min_length=1)
    #: Where the SOAP envelope goes in this peer's MTOM RAD-75 answers. ``last``: each instance is
    #: written as it arrives and the envelope, the part ``start`` names (RFC 2387), closes the message
    #: with the status and errors only then known. ``first``: for a peer whose MIME reader takes the
    #: first part as the envelope whatever ``start`` says (Apache CXF, and so IPF; zeep): every instance
    #: is spooled before the first byte, as before issue 14 (no early first byte, no spool bound).
    rad75_envelope: Literal["last", "first"] = "last"


class MitzCaller(_Client):
    """Mitz posting consent notifications to ``mitz.notify_path``."""


class ClientsConfig(StrictModel):
    tlb: list[TlbClient] = Field(default_factory=list)
    xca: list[XcaPeer] = Field(default_factory=list)
    mitz: list[MitzCaller] = Field(default_factory=list)

    @model_validator(mode="after")
    def _distinct(self) -> ClientsConfig:
        problems: list[str] = []
        names = [c.name for c in (*self.tlb, *self.xca, *self.mitz)]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            problems.append(f"duplicate client name: {', '.join(dupes)}")
        issuers = [p.issuer for p in self.xca]
        dupes = sorted({i for i in issuers if issuers.count(i) > 1})
        if dupes:
            problems.append(f"two xca peers with one issuer: {', '.join(dupes)}")
        if problems:
            raise ValueError("; ".join(problems))
        return self
