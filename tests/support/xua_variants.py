"""The NIST/Gazelle XUA assertion variants, written in the Dutch (Twiin/Mitz) XUA vocabulary.

NIST's XCA tests run each transaction once per assertion its Gazelle STS issues for a test user
(``_expired``, ``_unsigned``, ...; ``GazelleXuaUsername`` in the toolkit). The STS itself is not in
the toolkit, so what each user's assertion holds is read from the name; where a name allows two
readings both are built, and DUO must refuse both. Each reading is the valid assertion DUO would
accept with exactly one defect planted *before* signing, so a refusal can only come from that defect,
and each names the WS-Security fault (subcode and reason) DUO answers it with.

Shared by the Responding Gateway cases (``tests/conformance/test_rg_xua.py``: the assertion in
``wsse:Security``) and the Initiating Gateway cases (``test_ig_xua.py``: the TLB client's own assertion
in ``Authorization: SAML``), so both doors are held to the same readings.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from cryptography import x509
from lxml import etree

from duo_gateway import xmldsig
from duo_gateway.saml import (
    ATTR_PURPOSE,
    ATTR_ROLE,
    SAML_AC_CLASSES,
    SAML_NS,
    build_xua_assertion,
)
from duo_gateway.xmldsig import SAML_ID, PrivateKey
from duo_gateway.xua import AUTHZ_DECISION_REFUSED, Claims

Mutation = Callable[[etree._Element], None]
Signer = tuple[PrivateKey, list[x509.Certificate]]

_NS: Final = {"saml2": SAML_NS}
#: The audience of Gazelle's ``unknownaudience`` user.
UNKNOWN_AUDIENCE: Final = "http://ihe.unknown.xua/X-ServiceProvider-IHE-Unknown"
#: The NHIN vocabulary of the consent evidence NIST's toolkit writes (SamlAssertionData.getEvidenceInfo).
NHIN_NAME_FORMAT: Final = "http://www.hhs.gov/healthit/nhin"
#: The Action namespace of an AuthzDecisionStatement's "Execute" (SAML core §8.1.2: rwedc).
RWEDC: Final = "urn:oasis:names:tc:SAML:1.0:action:rwedc"


@dataclass(frozen=True)
class Reading:
    """One assertion for a NIST variant and DUO's answer to it.

    ``subcode`` and ``reason`` (a regular expression) are the WS-Security fault; ``subcode`` None means
    the assertion is authentic and DUO refuses the request by policy instead (``reason`` then matches
    :meth:`duo_gateway.xua.Requester.authorization_refusal`).
    """

    label: str
    subcode: str | None
    reason: str
    mutate: Mutation | None = None
    #: Issue time relative to now, and lifetime: the expiry cases move the assertion, not DUO's clock.
    shift: timedelta = timedelta(0)
    lifetime: timedelta = timedelta(minutes=10)
    audience: str | None = None
    signed: bool = True
    purpose: str | None = None
    role: str | None = None


def _find(a: etree._Element, path: str) -> etree._Element:
    el = a.find(path, _NS)
    assert el is not None, path
    return el


def _drop(path: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = _find(a, path)
        parent = el.getparent()
        assert parent is not None
        parent.remove(el)
    return mutate


def _duplicate(path: str, **attributes: str) -> Mutation:
    """A second copy of ``path`` right after it; ``attributes`` change the copy's hl7 value."""
    def mutate(a: etree._Element) -> None:
        el = _find(a, path)
        second = copy.deepcopy(el)
        if attributes:
            value = second.find("saml2:AttributeValue/*", _NS)
            assert value is not None, path
            for name, v in attributes.items():
                value.set(name, v)
        el.addnext(second)
    return mutate


def _set(path: str, attribute: str, value: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        _find(a, path).set(attribute, value)
    return mutate


def _text(path: str, value: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        _find(a, path).text = value
    return mutate


def _attr(name: str) -> str:
    return f"saml2:AttributeStatement/saml2:Attribute[@Name='{name}']"


def authz_consent(decision: str = "Permit", resource: str = "https://duo.example/xca") -> Mutation:
    """An AuthzDecisionStatement with consent evidence, in the shape the NIST toolkit writes.

    The NHIN Authorization Framework form: ``Decision`` on a ``Resource`` (the service), Action
    ``Execute``, and an Evidence assertion whose attributes point at the patient's consent policy
    (``AccessConsentPolicy``) and the signed consent document (``InstanceAccessConsentPolicy``).
    """
    def mutate(a: etree._Element) -> None:
        statement = etree.SubElement(a, f"{{{SAML_NS}}}AuthzDecisionStatement",
                                     Decision=decision, Resource=resource)
        etree.SubElement(statement, f"{{{SAML_NS}}}Action", Namespace=RWEDC).text = "Execute"
        evidence = etree.SubElement(etree.SubElement(statement, f"{{{SAML_NS}}}Evidence"),
                                    f"{{{SAML_NS}}}Assertion", ID="_consent-evidence", Version="2.0",
                                    IssueInstant=a.get("IssueInstant", ""))
        etree.SubElement(evidence, f"{{{SAML_NS}}}Issuer").text = _find(a, "saml2:Issuer").text
        conditions = _find(a, "saml2:Conditions")
        etree.SubElement(evidence, f"{{{SAML_NS}}}Conditions", NotBefore=conditions.get("NotBefore", ""),
                         NotOnOrAfter=conditions.get("NotOnOrAfter", ""))
        attributes = etree.SubElement(evidence, f"{{{SAML_NS}}}AttributeStatement")
        for name, value in (("AccessConsentPolicy", "urn:oid:2.16.528.1.1007.99.8.1"),
                            ("InstanceAccessConsentPolicy", "urn:oid:2.16.528.1.1007.99.8.1.2222")):
            attribute = etree.SubElement(attributes, f"{{{SAML_NS}}}Attribute", Name=name,
                                         NameFormat=NHIN_NAME_FORMAT)
            etree.SubElement(attribute, f"{{{SAML_NS}}}AttributeValue").text = value
    return mutate


_AUTHN = "saml2:AuthnStatement"
_CONTEXT = f"{_AUTHN}/saml2:AuthnContext"
_CLASS_REF = f"{_CONTEXT}/saml2:AuthnContextClassRef"

#: NIST variant (the suffix of the test id) -> the readings DUO must answer as shown.
VARIANTS: Final[dict[str, tuple[Reading, ...]]] = {
    "expired": (
        Reading("expired ten minutes ago", "MessageExpired", "the assertion expired at",
                shift=timedelta(minutes=-20)),
    ),
    "invalidauthnstatement": (
        # AuthnContext is required by the SAML schema; AuthnInstant must be an xs:dateTime.
        Reading("AuthnStatement without AuthnContext", "InvalidSecurityToken",
                "AuthnStatement must hold exactly one AuthnContext, found 0", mutate=_drop(_CONTEXT)),
        Reading("AuthnInstant not a dateTime", "InvalidSecurityToken",
                "AuthnStatement/@AuthnInstant is missing or not an xs:dateTime",
                mutate=_set(_AUTHN, "AuthnInstant", "testAuthnInstant")),
    ),
    "notyetvalid": (
        Reading("valid from ten minutes on", "InvalidSecurityToken", "the assertion is not valid before",
                shift=timedelta(minutes=10)),
    ),
    "secondauthncontext": (
        Reading("a second AuthnContext", "InvalidSecurityToken",
                "AuthnStatement must hold exactly one AuthnContext, found 2", mutate=_duplicate(_CONTEXT)),
        # Gazelle's reading: a second kind of authentication, password over IP, not the UZI pass.
        Reading("InternetProtocol authentication", "FailedAuthentication",
                "authentication class .*:InternetProtocol is not accepted",
                mutate=_text(_CLASS_REF, f"{SAML_AC_CLASSES}InternetProtocol")),
    ),
    "secondpurposeofuse": (
        Reading("a second purpose of use", "InvalidSecurityToken", "purposeofuse appears 2 times",
                mutate=_duplicate(_attr(ATTR_PURPOSE), code="COC")),
        # Gazelle's reading: another purpose than the one access is granted for (only TREAT here).
        Reading("purpose COC, not granted", "FailedAuthentication", "purposeofuse 'COC' is not accepted",
                purpose="COC"),
    ),
    "secondrole": (
        Reading("a second role", "InvalidSecurityToken", "subject:role appears 2 times",
                mutate=_duplicate(_attr(ATTR_ROLE), code="01.015")),
        # Gazelle's reading: another role, one without business with images (RoleCodeNL "other").
        Reading("role 99.999, not allowed", "FailedAuthentication",
                "role '99.999' may not consult imaging here", role="99.999"),
    ),
    "unknownaudience": (
        Reading("an unknown audience", "FailedAuthentication", f"audience {UNKNOWN_AUDIENCE} is not accepted",
                audience=UNKNOWN_AUDIENCE),
    ),
    "unsigned": (
        Reading("no signature", "InvalidSecurityToken", "the assertion is not signed", signed=False),
    ),
    "withauthzconsent": (
        Reading("a Permit with consent evidence", None, f"{AUTHZ_DECISION_REFUSED} \\(Decision Permit\\)",
                mutate=authz_consent()),
    ),
}

#: The variants NIST expects a SOAP Fault for (all but ``withauthzconsent``, xca.md §11).
FAULT_VARIANTS: Final = tuple(v for v in VARIANTS if v != "withauthzconsent")


def variant_assertion(reading: Reading, *, claims: Claims, issuer: str, audience: str, signer: Signer,
                      now: datetime) -> etree._Element:
    """The assertion of ``reading``: what :func:`duo_gateway.xua.issue_assertion` would sign for
    ``claims``, with the reading's one change made before signing (or no signature at all)."""
    issued = now + reading.shift
    assertion = build_xua_assertion(
        issuer=issuer, uzi=claims.uzi, role=reading.role or claims.role, ura=claims.ura,
        org_type=claims.organisation_type, purpose=reading.purpose or claims.purpose, now=issued,
        audience=reading.audience or audience, validity=reading.lifetime, mandated_uzi=claims.mandated_uzi)
    if reading.mutate is not None:
        reading.mutate(assertion)
    if reading.signed:
        key, cert = signer
        xmldsig.sign(assertion, assertion, key, cert, digest="sha256", id_attribute=SAML_ID, position=1)
    return assertion


__all__ = ["FAULT_VARIANTS", "UNKNOWN_AUDIENCE", "VARIANTS", "Reading", "Signer", "authz_consent",
           "variant_assertion"]
