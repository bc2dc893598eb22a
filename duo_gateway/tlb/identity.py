"""Who the professional is, for a TLB client with ``identity = "assertion"``: a signed XUA assertion.

By default a TLB client names the professional in the request body, and DUO believes it only for the
organisations the client's certificate binds. A client configured with ``identity = "assertion"``
proves more: each request carries an ITI-40 assertion its own issuer signed (``Authorization: SAML
<base64 of the assertion>``), checked exactly like an XCA peer's (pinned signer, audience, validity,
role and purpose allow-lists, :func:`duo_gateway.xua.validate_assertion`). The requester is then the
assertion's; the body's ``requester`` must say the same, so a client cannot ask in one name and be
audited in another. An assertion carrying an authorization decision is refused (403), as at the XCA
door and for the same reason (:mod:`duo_gateway.xua`): consent is Mitz's, never the caller's.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Final

from duo_gateway.config.access import TlbClient
from duo_gateway.config.loader import DuoConfig
from duo_gateway.soap.envelope import SoapFault
from duo_gateway.soap.xml import XmlError, parse_xml
from duo_gateway.xmldsig import TrustStore
from duo_gateway.xua import Claims, Requester, accepted_audiences, validate_assertion

#: The authorization scheme of the header carrying the assertion.
SCHEME: Final = "SAML"
#: A signed assertion is a few KiB; this bounds what is decoded and parsed before anything is checked.
MAX_ASSERTION_BYTES: Final = 64 * 1024


class AssertionRefused(Exception):
    """No usable assertion (401) or one that does not match the body (403); ``detail`` says which."""

    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class AssertionIdentity:
    """The pinned signers of every TLB client with ``identity = "assertion"``, loaded once at start."""

    config: DuoConfig
    trust: Mapping[str, TrustStore]

    @classmethod
    def from_config(cls, config: DuoConfig) -> AssertionIdentity:
        """Raises OSError/ValueError for an unreadable file or a CA pinned as signer: a start-up error."""
        trust = {c.name: TrustStore.from_pem_files(c.assertion_signing_certs, pinned=True)
                 for c in config.clients.tlb if c.identity == "assertion"}
        return cls(config, trust)

    def requester(self, client: TlbClient, authorization: str | None, stated: Claims,
                  now: datetime | None = None) -> Requester:
        """The professional ``client`` speaks for on this request, proven by its assertion."""
        assert client.assertion_issuer is not None
        trusted = self.trust.get(client.name)
        if trusted is None:
            raise AssertionRefused(401, f"client {client.name} has no pinned assertion signers")
        xml = _decode(authorization)
        try:
            root = parse_xml(xml, max_bytes=MAX_ASSERTION_BYTES)
        except XmlError as exc:
            raise AssertionRefused(401, f"the assertion is not acceptable XML: {exc}"[:300]) from None
        audiences = accepted_audiences(self.config)
        try:
            asserted = validate_assertion(root, self.config.xua, issuer=client.assertion_issuer,
                                          trusted=trusted, audiences=audiences, now=now or datetime.now(UTC))
        except SoapFault as fault:
            raise AssertionRefused(401, f"the assertion is refused: {fault.reason}"[:300]) from None
        mismatched = [name for name in ("uzi", "role", "ura", "purpose", "mandated_uzi")
                      if getattr(asserted, name) != getattr(stated, name)]
        if asserted.organisation_type is not None and asserted.organisation_type != stated.organisation_type:
            mismatched.append("organisation_type")
        if mismatched:
            raise AssertionRefused(403, "requester differs from the assertion in: " + ", ".join(mismatched))
        refusal = asserted.authorization_refusal()
        if refusal is not None:
            # Authentic, so not 401: the policy of duo_gateway.xua refuses what the assertion asks.
            raise AssertionRefused(403, refusal)
        return asserted


def _decode(authorization: str | None) -> bytes:
    if not authorization:
        raise AssertionRefused(401, f"this client must send its XUA assertion as 'Authorization: {SCHEME} …'")
    scheme, _, value = authorization.strip().partition(" ")
    if scheme.lower() != SCHEME.lower() or not value.strip():
        raise AssertionRefused(401, f"the Authorization scheme must be {SCHEME}")
    value = value.strip()
    if len(value) > MAX_ASSERTION_BYTES * 4 // 3 + 4:
        raise AssertionRefused(401, f"the assertion is larger than {MAX_ASSERTION_BYTES} bytes")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise AssertionRefused(401, "the assertion is not base64") from None


__all__ = ["SCHEME", "AssertionIdentity", "AssertionRefused"]
