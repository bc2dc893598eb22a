"""The SAML 2.0 / XUA vocabulary of the Dutch exchange: names, codes, the assertion DUO writes.

One module for what an XUA assertion *says*, apart from what DUO *accepts* (:mod:`duo_gateway.xua`)
and from the Mitz messages that carry it (:mod:`duo_gateway.mitz.xcpd`), so every direction speaks
exactly the same attribute dialect: the assertion DUO issues as XCA Initiating Gateway, the one the
open question sends to Mitz, the one DUO validates as Responding Gateway, and the XACML closed
question, which reuses the same attribute ids and code systems (mitz.md §2, §3; netherlands.md §3, §5).
"""

from __future__ import annotations

import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from lxml import etree

from duo_gateway.bsn import BSN_OID, NLMINBIZA
from duo_gateway.soap.xml import XS_NS, XSI_NS, format_datetime, qname

SAML_NS: Final = "urn:oasis:names:tc:SAML:2.0:assertion"
WSSE_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"
#: Attribute values are typed hl7 elements (II, CE, CV), in the assertion as in the XACML request.
HL7_NS: Final = "urn:hl7-org:v3"

SAML_BEARER: Final = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
SAML_HOLDER_OF_KEY: Final = "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key"
#: Prefix of the SAML 2.0 authentication context classes (SAML authn-context §3.4).
SAML_AC_CLASSES: Final = "urn:oasis:names:tc:SAML:2.0:ac:classes:"
SAML_X509: Final = f"{SAML_AC_CLASSES}X509"
#: Twiin's assertion lifetime (netherlands.md §3).
ASSERTION_VALIDITY: Final = timedelta(minutes=10)

URA_OID: Final = "2.16.528.1.1007.3.3"
UZI_OID: Final = "2.16.528.1.1007.3.1"
ORG_TYPE_OID: Final = "2.16.840.1.113883.2.4.15.1060"
ROLE_OID: Final = "2.16.840.1.113883.2.4.15.111"
PURPOSE_OID: Final = "2.16.840.1.113883.1.11.20448"
CIBG: Final = "CIBG"

ATTR_RESOURCE_ID: Final = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"
ATTR_ROLE: Final = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_PROVIDER_ID: Final = "urn:ihe:iti:xua:2017:subject:provider-identifier"
ATTR_MANDATED: Final = "urn:nl:otv:names:tc:1.0:subject:mandated"
ATTR_PROVIDER_INSTITUTION: Final = "urn:nl:otv:names:tc:1.0:subject:provider-institution"
ATTR_CONSULTING_TYPE: Final = "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code"
ATTR_PURPOSE: Final = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"

#: The purposes of use Mitz knows (mitz.md §5).
PURPOSES: Final[frozenset[str]] = frozenset({"TREAT", "COC"})

#: The decisions an AuthzDecisionStatement may state (SAML core §2.7.4, DecisionType).
AUTHZ_DECISIONS: Final[frozenset[str]] = frozenset({"Permit", "Deny", "Indeterminate"})


class SamlError(ValueError):
    """An assertion's attributes are not shaped as this vocabulary requires.

    Raised without a protocol around it, so each reader turns it into its own refusal (a WS-Security
    fault at the XCA door, a Mitz security error in the simulator).
    """


# --------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------


def _saml_attribute(stmt: etree._Element, name: str, hl7_local: str, xsi_type: str,
                    attrs: Sequence[tuple[str, str]]) -> None:
    attr = etree.SubElement(stmt, qname(SAML_NS, "Attribute"))
    attr.set("Name", name)
    value = etree.SubElement(attr, qname(SAML_NS, "AttributeValue"))
    # Default namespace on the hl7 child so the unprefixed xsi:type QName ("II") resolves to
    # {urn:hl7-org:v3}II, exactly as B365 writes it.
    hl7 = etree.SubElement(value, qname(HL7_NS, hl7_local), nsmap={None: HL7_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    hl7.set(qname(XSI_NS, "type"), xsi_type)
    for k, v in attrs:
        hl7.set(k, v)


def build_xua_assertion(
    *,
    issuer: str,
    uzi: str,
    role: str,
    ura: str,
    org_type: str | None,
    purpose: str,
    now: datetime,
    audience: str,
    validity: timedelta = ASSERTION_VALIDITY,
    mandated_uzi: str | None = None,
    patient_bsn: str | None = None,
    assertion_id: str | None = None,
) -> etree._Element:
    """An unsigned assertion in the Twiin/Mitz XUA vocabulary (mitz.md §3, netherlands.md §3).

    One builder for the open question and for the XCA assertions DUO signs (``duo_gateway.xua``), so
    both directions speak exactly the same attribute dialect. ``org_type`` may be None because Twiin
    does not list the consulting facility type among its ITI-40 attributes. ``patient_bsn`` becomes an
    XACML ``resource-id`` II (BSN root, NLMINBIZA as on every Mitz BSN): a project choice, since
    neither Twiin nor Mitz documents a patient attribute in the token (UNVERIFIED).
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if validity <= timedelta(0):
        raise ValueError("validity must be positive")
    issued = format_datetime(now)
    assertion = etree.Element(qname(SAML_NS, "Assertion"),
                              nsmap={"saml2": SAML_NS, "xsi": XSI_NS, "xs": XS_NS})
    assertion.set("ID", assertion_id or f"_{uuid.uuid4().hex}")
    assertion.set("Version", "2.0")
    assertion.set("IssueInstant", issued)
    etree.SubElement(assertion, qname(SAML_NS, "Issuer")).text = issuer
    subject = etree.SubElement(assertion, qname(SAML_NS, "Subject"))
    etree.SubElement(subject, qname(SAML_NS, "SubjectConfirmation")).set("Method", SAML_BEARER)
    conditions = etree.SubElement(assertion, qname(SAML_NS, "Conditions"))
    conditions.set("NotBefore", issued)
    conditions.set("NotOnOrAfter", format_datetime(now + validity))
    restriction = etree.SubElement(conditions, qname(SAML_NS, "AudienceRestriction"))
    etree.SubElement(restriction, qname(SAML_NS, "Audience")).text = audience
    authn = etree.SubElement(assertion, qname(SAML_NS, "AuthnStatement"))
    authn.set("AuthnInstant", issued)
    context = etree.SubElement(authn, qname(SAML_NS, "AuthnContext"))
    etree.SubElement(context, qname(SAML_NS, "AuthnContextClassRef")).text = SAML_X509
    stmt = etree.SubElement(assertion, qname(SAML_NS, "AttributeStatement"))
    _saml_attribute(stmt, ATTR_PROVIDER_ID, "id", "II",
                    [("root", UZI_OID), ("extension", uzi), ("assigningAuthorityName", CIBG)])
    if mandated_uzi is not None:
        _saml_attribute(stmt, ATTR_MANDATED, "id", "II",
                        [("root", UZI_OID), ("extension", mandated_uzi), ("assigningAuthorityName", CIBG)])
    _saml_attribute(stmt, ATTR_ROLE, "Role", "CE",
                    [("code", role), ("codeSystem", ROLE_OID), ("codeSystemName", "RoleCodeNL")])
    _saml_attribute(stmt, ATTR_PROVIDER_INSTITUTION, "id", "II", [("root", URA_OID), ("extension", ura)])
    if org_type is not None:
        _saml_attribute(stmt, ATTR_CONSULTING_TYPE, "consulting-facility-type-code", "CV",
                        [("code", org_type), ("codeSystem", ORG_TYPE_OID)])
    _saml_attribute(stmt, ATTR_PURPOSE, "PurposeOfUse", "CE",
                    [("code", purpose), ("codeSystem", PURPOSE_OID)])
    if patient_bsn is not None:
        _saml_attribute(stmt, ATTR_RESOURCE_ID, "id", "II",
                        [("root", BSN_OID), ("extension", patient_bsn),
                         ("assigningAuthorityName", NLMINBIZA)])
    return assertion


# --------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------


def single_attribute_values(statements: Iterable[etree._Element],
                            names: Collection[str]) -> dict[str, etree._Element]:
    """The one hl7 element of each attribute in ``names``; any second occurrence or value is refused.

    A second role or purpose (NIST ``_secondrole``/``_secondpurposeofuse``) would leave it to chance
    which one the consent question carries. Attributes not in ``names`` are left alone: whether an
    unknown attribute is tolerated is the caller's policy, not the vocabulary's. Only direct children
    are read, so a nested copy of an attribute can never be the one acted on. Raises
    :class:`SamlError`.
    """
    found: dict[str, list[etree._Element]] = {}
    for statement in statements:
        for attr in statement:
            if attr.tag != qname(SAML_NS, "Attribute"):
                continue
            name = (attr.get("Name") or "").strip()
            if name in names:
                found.setdefault(name, []).append(attr)
    values: dict[str, etree._Element] = {}
    for name, attrs in found.items():
        if len(attrs) > 1:
            raise SamlError(f"attribute {name} appears {len(attrs)} times; it must be single-valued")
        attr_values = [v for v in attrs[0] if v.tag == qname(SAML_NS, "AttributeValue")]
        if len(attr_values) != 1:
            raise SamlError(f"attribute {name} must have exactly one AttributeValue, "
                            f"found {len(attr_values)}")
        children = [c for c in attr_values[0] if isinstance(c.tag, str)]
        if len(children) != 1 or etree.QName(children[0]).namespace != HL7_NS:
            raise SamlError(f"attribute {name} must hold one typed hl7 element")
        values[name] = children[0]
    return values


@dataclass(frozen=True)
class AuthzDecision:
    """What one ``AuthzDecisionStatement`` says: that its issuer decided ``decision`` on ``resource``.

    XUA's consent evidence (BPPC, the NHIN AccessConsentPolicy) travels as this statement with an
    ``Evidence`` of its own; only the fact and its two attributes are kept, because a reader's policy
    needs to know *that* the issuer wrote a decision, never to act on the evidence behind it.
    """

    decision: str
    resource: str


def evidence_assertions(assertion: etree._Element) -> list[etree._Element]:
    """The assertions ``assertion`` cites as evidence: at ``AuthzDecisionStatement/Evidence/Assertion``.

    Exactly that chain of direct children, so a reader that tolerates evidence assertions tolerates
    nothing nested anywhere else (an Advice, a deeper level, another statement).
    """
    return [evidence
            for statement in assertion if statement.tag == qname(SAML_NS, "AuthzDecisionStatement")
            for holder in statement if holder.tag == qname(SAML_NS, "Evidence")
            for evidence in holder if evidence.tag == qname(SAML_NS, "Assertion")]


def authz_decisions(assertion: etree._Element) -> tuple[AuthzDecision, ...]:
    """Every ``AuthzDecisionStatement`` directly in ``assertion``, checked against the SAML schema.

    A statement must name its Decision (one of :data:`AUTHZ_DECISIONS`) and Resource and hold at least
    one Action (SAML core §2.7.4); anything else is refused with :class:`SamlError`, so an unreadable
    decision can never be taken for no decision at all.
    """
    found: list[AuthzDecision] = []
    for statement in assertion:
        if statement.tag != qname(SAML_NS, "AuthzDecisionStatement"):
            continue
        decision = (statement.get("Decision") or "").strip()
        if decision not in AUTHZ_DECISIONS:
            raise SamlError(f"AuthzDecisionStatement Decision must be one of "
                            f"{', '.join(sorted(AUTHZ_DECISIONS))}")
        resource = statement.get("Resource")
        if resource is None:
            raise SamlError("AuthzDecisionStatement must name its Resource")
        if not any(c.tag == qname(SAML_NS, "Action") for c in statement):
            raise SamlError("AuthzDecisionStatement must hold at least one Action")
        found.append(AuthzDecision(decision, resource.strip()))
    return tuple(found)


def hl7_type(el: etree._Element) -> str | None:
    """The hl7 local name of ``xsi:type``, or None when it is absent or not in the hl7 namespace.

    Resolved through the element's own namespace map, because the prefix is the writer's choice
    (B365 writes an unprefixed ``II`` under a default hl7 namespace).
    """
    value = el.get(qname(XSI_NS, "type"))
    if value is None:
        return None
    prefix, _, local = value.strip().rpartition(":")
    return local if el.nsmap.get(prefix or None) == HL7_NS else None


__all__ = [
    "ASSERTION_VALIDITY", "ATTR_CONSULTING_TYPE", "ATTR_MANDATED", "ATTR_PROVIDER_ID",
    "ATTR_PROVIDER_INSTITUTION", "ATTR_PURPOSE", "ATTR_RESOURCE_ID", "ATTR_ROLE", "AUTHZ_DECISIONS", "CIBG",
    "HL7_NS", "ORG_TYPE_OID", "PURPOSES", "PURPOSE_OID", "ROLE_OID", "SAML_AC_CLASSES", "SAML_BEARER",
    "SAML_HOLDER_OF_KEY", "SAML_NS", "SAML_X509", "URA_OID", "UZI_OID", "WSSE_NS", "WSU_NS", "AuthzDecision",
    "SamlError", "authz_decisions", "build_xua_assertion", "evidence_assertions", "hl7_type",
    "single_attribute_values",
]
