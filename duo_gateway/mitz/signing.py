"""Optional XML-DSig of the XACML closed question (mitz.md §2.2): Signature first in the query, over
the Request by its xml:id, exc-c14n / rsa-sha256 / sha256 with the certificate in KeyInfo."""

from __future__ import annotations

from duo_gateway.config.mitz import MitzConfig
from duo_gateway.mitz.client import RequestSigner
from duo_gateway.soap.xml import parse_xml, to_bytes
from duo_gateway.xmldsig import load_signing_pair, sign

_XACML_SAML = "urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14"
_XACML = "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"
_XML_ID = "{http://www.w3.org/XML/1998/namespace}id"


def request_signer(cfg: MitzConfig) -> RequestSigner | None:
    """A signer for the configured pair, or None when requests go unsigned. Keys load once, here."""
    pair = cfg.signing_pair()
    if pair is None:
        return None
    key, cert = load_signing_pair(pair[0], pair[1])

    def signer(request: bytes) -> bytes:
        root = parse_xml(request)
        query = root.find(f".//{{{_XACML_SAML}}}XACMLAuthzDecisionQuery")
        target = query.find(f"{{{_XACML}}}Request") if query is not None else None
        if query is None or target is None:
            raise ValueError("not a closed question: no XACMLAuthzDecisionQuery/Request to sign")
        sign(query, target, key, cert, digest="sha256", id_attribute=_XML_ID, position=0)
        return to_bytes(root)

    return signer


__all__ = ["request_signer"]
