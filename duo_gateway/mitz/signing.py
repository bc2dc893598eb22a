"""Optional XML-DSig of the XACML closed question (mitz.md §2.2): Signature first in the query, over
the Request by its xml:id, exc-c14n / rsa-sha256 / sha256 with the certificate in KeyInfo."""

from __future__ import annotations

from duo_gateway.config.mitz import MitzConfig
from duo_gateway.mitz.client import RequestSigner
from duo_gateway.mitz.xacml import XACML_NS, XACML_SAML_NS
from duo_gateway.soap.xml import parse_xml, qname, to_bytes
from duo_gateway.xmldsig import XML_ID, load_signing_pair, sign


def request_signer(cfg: MitzConfig) -> RequestSigner | None:
    """A signer for the configured pair, or None when requests go unsigned. Keys load once, here."""
    pair = cfg.signing_pair()
    if pair is None:
        return None
    key, cert = load_signing_pair(pair[0], pair[1])

    def signer(request: bytes) -> bytes:
        root = parse_xml(request)
        query = root.find(f".//{qname(XACML_SAML_NS, 'XACMLAuthzDecisionQuery')}")
        target = query.find(qname(XACML_NS, "Request")) if query is not None else None
        if query is None or target is None:
            raise ValueError("not a closed question: no XACMLAuthzDecisionQuery/Request to sign")
        sign(query, target, key, cert, digest="sha256", id_attribute=XML_ID, position=0)
        return to_bytes(root)

    return signer


__all__ = ["request_signer"]
