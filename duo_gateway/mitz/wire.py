"""Mitz wire formats as a pure codec: bytes or JSON in, frozen typed messages out, no I/O.

The same module serves both sides (the gateway's client and the simulator) so that whatever the
gateway sends is, by construction, what the simulator accepts, and every wire detail lives in one
place next to the reference it came from (``docs/mitz.md``).

Two parsing policies, on purpose:

* **Closed answers fail closed without raising.** A consent check is a security gate, so
  :func:`parse_closed_answer` turns *anything* unexpected into "not permitted" with a ``reason``; a
  caller cannot forget an ``except`` and let a bug become a disclosure.
* **Everything else raises a typed** :class:`MitzError`: an open answer or a request that is off
  must be reported, and the caller (client or simulator) maps it to its own error shape.

Choices where ``mitz.md`` marks the wire as UNVERIFIED are documented at the constant or function
that makes them.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any, Final, Literal, get_args
from urllib.parse import parse_qsl, urlsplit

from lxml import etree

from duo_gateway.bsn import BSN_OID, is_valid_bsn
from duo_gateway.soap.envelope import (
    NSMAP,
    SOAP11_NS,
    SOAP12_NS,
    WSA_ANONYMOUS,
    WSA_NS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    new_message_id,
    parse_envelope,
)
from duo_gateway.soap.xml import XmlError, parse_xml, to_bytes

# --------------------------------------------------------------------------------------------------
# Namespaces, actions, OIDs (mitz.md §2, §3, §5; netherlands.md §5)
# --------------------------------------------------------------------------------------------------

XACML_SAML_NS: Final = "urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14"
XACML_NS: Final = "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"
HL7_NS: Final = "urn:hl7-org:v3"
XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
XCPD_NS: Final = "urn:ihe:iti:xcpd:2009"
SAML_NS: Final = "urn:oasis:names:tc:SAML:2.0:assertion"
XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"
XS_NS: Final = "http://www.w3.org/2001/XMLSchema"
WSSE_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
WSU_NS: Final = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-utility-1.0.xsd"

#: Literally this, not a URI: both open implementations send it (mitz.md §2.1).
CLOSED_ACTION: Final = "XACMLAuthorizationDecisionQueryRequest"
CLOSED_RESPONSE_ACTION: Final = (
    "http://schemas.otv.nl/toestemmingsregister/XACMLAuthzDecisionQuery/"
    "IGeslotenAutorisatievraagService/XACMLAuthzDecisionQueryResponse"
)
OPEN_ACTION: Final = "urn:ihe:iti:2009:PatientLocationQuery"
OPEN_RESPONSE_ACTION: Final = "urn:ihe:iti:2009:PatientLocationQueryResponse"

CLOSED_PATH: Final = "geslotenautorisatievraag/xacml3"
OPEN_PATH: Final = "openautorisatievraag"
SUBSCRIPTION_PATH: Final = "abonnementen/fhir/Subscription"

URA_OID: Final = "2.16.528.1.1007.3.3"
UZI_OID: Final = "2.16.528.1.1007.3.1"
ORG_TYPE_OID: Final = "2.16.840.1.113883.2.4.15.1060"
ROLE_OID: Final = "2.16.840.1.113883.2.4.15.111"
DATA_CATEGORY_OID: Final = "2.16.840.1.113883.2.4.3.111.5.10.1"
PURPOSE_OID: Final = "2.16.840.1.113883.1.11.20448"
CIBG: Final = "CIBG"
#: Mitz/XCPD requires this on a BSN II (B365: "verplicht volgens Mitz handleiding").
NLMINBIZA: Final = "NLMINBIZA"
MITZ_AUDIENCE: Final = "urn:oid:2.16.840.1.113883.2.4.3.111.2.1"
SAML_BEARER: Final = "urn:oasis:names:tc:SAML:2.0:cm:bearer"
SAML_X509: Final = "urn:oasis:names:tc:SAML:2.0:ac:classes:X509"
ASSERTION_VALIDITY: Final = timedelta(minutes=10)

CAT_RESOURCE: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
CAT_ACTION: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:action"
CAT_SUBJECT: Final = "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject"
CAT_ENVIRONMENT: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:environment"

ATTR_RESOURCE_ID: Final = "urn:oasis:names:tc:xacml:2.0:resource:resource-id"
ATTR_FACILITY_TYPE: Final = "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code"
ATTR_AUTHOR_INSTITUTION: Final = "urn:ihe:iti:appc:2016:author-institution:id"
ATTR_EVENT_CODE: Final = "urn:ihe:iti:appc:2016:document-entry:event-code"
ATTR_ROLE: Final = "urn:oasis:names:tc:xacml:2.0:subject:role"
ATTR_PROVIDER_ID: Final = "urn:ihe:iti:xua:2017:subject:provider-identifier"
ATTR_MANDATED: Final = "urn:nl:otv:names:tc:1.0:subject:mandated"
ATTR_PROVIDER_INSTITUTION: Final = "urn:nl:otv:names:tc:1.0:subject:provider-institution"
ATTR_CONSULTING_TYPE: Final = "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code"
ATTR_PURPOSE: Final = "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse"

DT_II: Final = "urn:hl7-org:v3#II"
DT_CV: Final = "urn:hl7-org:v3#CV"
STATUS_OK: Final = "urn:oasis:names:tc:xacml:1.0:status:ok"

#: B365 sends ``false``, NK ``true``; Mitz's expectation is UNVERIFIED. ``false`` is chosen because
#: Results are correlated to categories by position, not by echoed attributes (see parse_closed_answer).
INCLUDE_IN_RESULT: Final = "false"

Decision = Literal["Permit", "Deny", "NotApplicable", "Indeterminate"]
DECISIONS: Final[frozenset[str]] = frozenset(get_args(Decision))
PURPOSES: Final[frozenset[str]] = frozenset({"TREAT", "COC"})

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URA_RE = re.compile(r"^[0-9]{1,8}$")


def _q(ns: str, local: str) -> str:
    return f"{{{ns}}}{local}"


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class MitzError(Exception):
    """Base of every Mitz codec error; messages never contain a BSN, so they are safe to log."""


class MitzRequestError(MitzError, ValueError):
    """A question is incomplete or malformed: the client must not ask it, the simulator refuses it."""


class MitzSecurityError(MitzRequestError):
    """The XUA assertion of an open question is missing or unacceptable (wsse:InvalidSecurity)."""


class MitzAnswerError(MitzError):
    """An answer from Mitz cannot be trusted (malformed, wrong action, not ours)."""


class MitzFault(MitzAnswerError):
    """Mitz answered with a SOAP Fault; kept apart so the client can tell "refused" from "garbage"."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"Mitz SOAP fault {code}: {reason}")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Small validators shared by both directions
# --------------------------------------------------------------------------------------------------


def _require_bsn(bsn: str, exc: type[MitzError] = MitzRequestError) -> None:
    # The value itself stays out of the message: errors end up in logs and faults.
    if not is_valid_bsn(bsn):
        raise exc("BSN is not nine digits passing the 11-proef")


def _require_text(name: str, value: str | None, exc: type[MitzError] = MitzRequestError) -> str:
    if value is None or not value.strip():
        raise exc(f"{name} is required")
    return value


def _require_ura(name: str, value: str, exc: type[MitzError] = MitzRequestError) -> None:
    if not _URA_RE.match(value):
        raise exc(f"{name} must be a URA (up to eight digits)")


def bare_oid(value: str) -> str:
    """``urn:oid:1.2.3`` or ``1.2.3`` → ``1.2.3``; FHIR ``oid`` values carry the prefix, HL7v3 roots don't."""
    return value[len("urn:oid:") :] if value.startswith("urn:oid:") else value


def is_oid(value: str) -> bool:
    return bool(_OID_RE.match(value))


# --------------------------------------------------------------------------------------------------
# Closed question (mitz.md §2)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class ClosedQuestion:
    """What the data holder asks Mitz before releasing data.

    Validated on construction because NK's rule is to refuse to ask when any input is missing
    (mitz.md §2.3): an incomplete question could only ever be answered with a meaningless decision.
    """

    bsn: str
    #: The data holder (for XDS→TLB: the TLB source hospital).
    holder_ura: str
    holder_type: str
    categories: tuple[str, ...] = ("GGC002",)
    #: The responsible professional and organisation asking for the data.
    requester_uzi: str
    requester_role: str
    requester_ura: str
    requester_type: str
    purpose: str = "TREAT"
    #: UZI of the person acting on the responsible professional's behalf, when there is one.
    mandated_uzi: str | None = None

    def __post_init__(self) -> None:
        _require_bsn(self.bsn)
        for name in ("holder_ura", "holder_type", "requester_uzi", "requester_role", "requester_ura",
                     "requester_type"):
            _require_text(name, getattr(self, name))
        _require_ura("holder_ura", self.holder_ura)
        _require_ura("requester_ura", self.requester_ura)
        if not isinstance(self.categories, tuple) or not self.categories:
            raise MitzRequestError("at least one data category is required (as a tuple)")
        for category in self.categories:
            _require_text("category", category)
        if self.purpose not in PURPOSES:
            raise MitzRequestError("purpose must be TREAT or COC")
        if self.mandated_uzi is not None:
            _require_text("mandated_uzi", self.mandated_uzi)


def _request_envelope(
    action: str,
    message_id: str,
    to_url: str,
    body: etree._Element,
    security: etree._Element | None = None,
) -> etree._Element:
    """Headers in the order of the mitz.md §2.4 skeleton (Action, MessageID, To, ReplyTo)."""
    env = etree.Element(_q(SOAP12_NS, "Envelope"), nsmap=NSMAP)
    header = etree.SubElement(env, _q(SOAP12_NS, "Header"))
    action_el = etree.SubElement(header, _q(WSA_NS, "Action"))
    action_el.set(_q(SOAP12_NS, "mustUnderstand"), "1")
    action_el.text = action
    etree.SubElement(header, _q(WSA_NS, "MessageID")).text = message_id
    to_el = etree.SubElement(header, _q(WSA_NS, "To"))
    to_el.set(_q(SOAP12_NS, "mustUnderstand"), "1")
    to_el.text = to_url
    reply = etree.SubElement(header, _q(WSA_NS, "ReplyTo"))
    etree.SubElement(reply, _q(WSA_NS, "Address")).text = WSA_ANONYMOUS
    if security is not None:
        header.append(security)
    etree.SubElement(env, _q(SOAP12_NS, "Body")).append(body)
    return env


def _xacml_attribute(
    parent: etree._Element,
    attribute_id: str,
    data_type: str,
    hl7_local: str,
    hl7_attrs: Sequence[tuple[str, str]],
) -> None:
    attr = etree.SubElement(parent, _q(XACML_NS, "Attribute"))
    attr.set("AttributeId", attribute_id)
    attr.set("IncludeInResult", INCLUDE_IN_RESULT)
    value = etree.SubElement(attr, _q(XACML_NS, "AttributeValue"))
    value.set("DataType", data_type)
    hl7 = etree.SubElement(value, _q(HL7_NS, hl7_local))
    for k, v in hl7_attrs:
        hl7.set(k, v)


def _ii(parent: etree._Element, attribute_id: str, root: str, extension: str,
        authority: str | None = None) -> None:
    attrs = [("root", root), ("extension", extension)]
    if authority is not None:
        attrs.append(("assigningAuthorityName", authority))
    _xacml_attribute(parent, attribute_id, DT_II, "InstanceIdentifier", attrs)


def _cv(parent: etree._Element, attribute_id: str, code: str, code_system: str) -> None:
    _xacml_attribute(parent, attribute_id, DT_CV, "CodedValue", [("code", code), ("codeSystem", code_system)])


def _attributes(request: etree._Element, category: str, xml_id: str) -> etree._Element:
    block = etree.SubElement(request, _q(XACML_NS, "Attributes"))
    block.set("Category", category)
    block.set(_q(XML_NS, "id"), xml_id)
    return block


def build_closed_question(q: ClosedQuestion, to_url: str, message_id: str) -> bytes:
    """The XACML closed question, unsigned (whether Mitz requires XML-DSig is UNVERIFIED, §2.2).

    ``assigningAuthorityName="CIBG"`` is set on UZI identifiers only, as in the mitz.md table and NK;
    B365 also puts it on URAs. The BSN II carries no assigningAuthorityName here (NK, B365), unlike
    the open question where NLMINBIZA is mandatory.
    """
    query = etree.Element(_q(XACML_SAML_NS, "XACMLAuthzDecisionQuery"), nsmap={"q": XACML_SAML_NS})
    request = etree.SubElement(query, _q(XACML_NS, "Request"), nsmap={"x": XACML_NS, "h": HL7_NS})
    request.set("CombinedDecision", "false")
    request.set("ReturnPolicyIdList", "false")

    resource = _attributes(request, CAT_RESOURCE, "resource")
    _ii(resource, ATTR_RESOURCE_ID, BSN_OID, q.bsn)
    _cv(resource, ATTR_FACILITY_TYPE, q.holder_type, ORG_TYPE_OID)
    _ii(resource, ATTR_AUTHOR_INSTITUTION, URA_OID, q.holder_ura)

    for i, category in enumerate(q.categories):
        action = _attributes(request, CAT_ACTION, f"action{i}")
        _cv(action, ATTR_EVENT_CODE, category, DATA_CATEGORY_OID)

    subject = _attributes(request, CAT_SUBJECT, "subject")
    _cv(subject, ATTR_ROLE, q.requester_role, ROLE_OID)
    _ii(subject, ATTR_PROVIDER_ID, UZI_OID, q.requester_uzi, CIBG)
    if q.mandated_uzi is not None:
        _ii(subject, ATTR_MANDATED, UZI_OID, q.mandated_uzi, CIBG)
    _ii(subject, ATTR_PROVIDER_INSTITUTION, URA_OID, q.requester_ura)
    _cv(subject, ATTR_CONSULTING_TYPE, q.requester_type, ORG_TYPE_OID)

    environment = _attributes(request, CAT_ENVIRONMENT, "environment")
    _cv(environment, ATTR_PURPOSE, q.purpose, PURPOSE_OID)

    return to_bytes(_request_envelope(CLOSED_ACTION, message_id, to_url, query))


def _as_envelope(data: bytes | Envelope, exc: type[MitzError]) -> Envelope:
    """Bytes are parsed here; a SoapFault (VersionMismatch, or a Fault body) propagates unchanged."""
    if isinstance(data, Envelope):
        return data
    try:
        return parse_envelope(data)
    except XmlError as e:
        raise exc(str(e)) from e


def _require_action(env: Envelope, expected: str, exc: type[MitzError]) -> None:
    if env.addressing.action != expected:
        raise exc(f"unexpected wsa:Action {env.addressing.action!r}, expected {expected!r}")


class _AttributeBlock:
    """One XACML ``Attributes`` element, indexed by AttributeId; duplicates and unknowns are refused."""

    def __init__(self, block: etree._Element, allowed: frozenset[str]) -> None:
        self.values: dict[str, etree._Element] = {}
        for attr in block:
            if not isinstance(attr.tag, str):
                continue
            if attr.tag != _q(XACML_NS, "Attribute"):
                raise MitzRequestError(f"unexpected element {attr.tag} in Attributes")
            attribute_id = attr.get("AttributeId")
            if attribute_id not in allowed:
                raise MitzRequestError(f"unexpected AttributeId {attribute_id!r}")
            if attribute_id in self.values:
                raise MitzRequestError(f"AttributeId {attribute_id} appears twice")
            if attr.get("IncludeInResult") not in ("true", "false"):
                raise MitzRequestError(f"{attribute_id}: IncludeInResult must be true or false")
            values = attr.findall(_q(XACML_NS, "AttributeValue"))
            if len(values) != 1:
                raise MitzRequestError(f"{attribute_id}: exactly one AttributeValue is required")
            self.values[attribute_id] = values[0]

    def _hl7(self, attribute_id: str, data_type: str, local: str, required: bool) -> etree._Element | None:
        value = self.values.get(attribute_id)
        if value is None:
            if required:
                raise MitzRequestError(f"missing attribute {attribute_id}")
            return None
        if value.get("DataType") != data_type:
            raise MitzRequestError(f"{attribute_id}: DataType must be {data_type}")
        children = [c for c in value if isinstance(c.tag, str)]
        if len(children) != 1 or children[0].tag != _q(HL7_NS, local):
            raise MitzRequestError(f"{attribute_id}: expected one hl7 {local}")
        return children[0]

    def ii(self, attribute_id: str, root: str, required: bool = True) -> str | None:
        el = self._hl7(attribute_id, DT_II, "InstanceIdentifier", required)
        if el is None:
            return None
        if el.get("root") != root:
            raise MitzRequestError(f"{attribute_id}: root must be {root}")
        return _require_text(f"{attribute_id} extension", el.get("extension"))

    def cv(self, attribute_id: str, code_system: str) -> str:
        el = self._hl7(attribute_id, DT_CV, "CodedValue", True)
        assert el is not None  # required=True raised otherwise
        if el.get("codeSystem") != code_system:
            raise MitzRequestError(f"{attribute_id}: codeSystem must be {code_system}")
        return _require_text(f"{attribute_id} code", el.get("code"))


def parse_closed_question(data: bytes | Envelope) -> ClosedQuestion:
    """The simulator's side: strict, so the gateway's client cannot drift from the documented shape.

    Raises :class:`MitzRequestError` for anything missing or off, and lets a
    :class:`~duo_gateway.soap.envelope.SoapFault` (SOAP 1.1 → VersionMismatch) through for the caller
    to answer with.
    """
    env = _as_envelope(data, MitzRequestError)
    _require_action(env, CLOSED_ACTION, MitzRequestError)
    query = env.body
    if query is None or query.tag != _q(XACML_SAML_NS, "XACMLAuthzDecisionQuery"):
        raise MitzRequestError("Body must hold an XACMLAuthzDecisionQuery")
    requests = query.findall(_q(XACML_NS, "Request"))
    if len(requests) != 1:
        raise MitzRequestError("XACMLAuthzDecisionQuery must hold exactly one Request")
    request = requests[0]
    blocks: dict[str, list[etree._Element]] = {}
    for block in request:
        if not isinstance(block.tag, str):
            continue
        if block.tag != _q(XACML_NS, "Attributes"):
            raise MitzRequestError(f"unexpected element {block.tag} in Request")
        blocks.setdefault(block.get("Category", ""), []).append(block)
    unknown = set(blocks) - {CAT_RESOURCE, CAT_ACTION, CAT_SUBJECT, CAT_ENVIRONMENT}
    if unknown:
        raise MitzRequestError(f"unexpected Attributes categories {sorted(unknown)}")
    for cat in (CAT_RESOURCE, CAT_SUBJECT, CAT_ENVIRONMENT):
        if len(blocks.get(cat, [])) != 1:
            raise MitzRequestError(f"exactly one Attributes block of category {cat} is required")
    if not blocks.get(CAT_ACTION):
        raise MitzRequestError("at least one action (data category) is required")

    resource = _AttributeBlock(blocks[CAT_RESOURCE][0],
                               frozenset({ATTR_RESOURCE_ID, ATTR_FACILITY_TYPE, ATTR_AUTHOR_INSTITUTION}))
    subject = _AttributeBlock(blocks[CAT_SUBJECT][0], frozenset(
        {ATTR_ROLE, ATTR_PROVIDER_ID, ATTR_MANDATED, ATTR_PROVIDER_INSTITUTION, ATTR_CONSULTING_TYPE}))
    environment = _AttributeBlock(blocks[CAT_ENVIRONMENT][0], frozenset({ATTR_PURPOSE}))
    categories = tuple(_AttributeBlock(b, frozenset({ATTR_EVENT_CODE})).cv(ATTR_EVENT_CODE, DATA_CATEGORY_OID)
                       for b in blocks[CAT_ACTION])
    bsn = resource.ii(ATTR_RESOURCE_ID, BSN_OID)
    holder_ura = resource.ii(ATTR_AUTHOR_INSTITUTION, URA_OID)
    uzi = subject.ii(ATTR_PROVIDER_ID, UZI_OID)
    requester_ura = subject.ii(ATTR_PROVIDER_INSTITUTION, URA_OID)
    assert bsn is not None and holder_ura is not None and uzi is not None and requester_ura is not None
    return ClosedQuestion(
        bsn=bsn,
        holder_ura=holder_ura,
        holder_type=resource.cv(ATTR_FACILITY_TYPE, ORG_TYPE_OID),
        categories=categories,
        requester_uzi=uzi,
        requester_role=subject.cv(ATTR_ROLE, ROLE_OID),
        requester_ura=requester_ura,
        requester_type=subject.cv(ATTR_CONSULTING_TYPE, ORG_TYPE_OID),
        purpose=environment.cv(ATTR_PURPOSE, PURPOSE_OID),
        mandated_uzi=subject.ii(ATTR_MANDATED, UZI_OID, required=False),
    )


# --------------------------------------------------------------------------------------------------
# Closed answer and the fail-closed rule (mitz.md §2.3)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClosedAnswer:
    """Mitz's verdict, one entry per asked category in the order they were asked.

    ``decisions[i]`` is None when the answer as a whole was unusable; ``reason`` then says why. The
    whole answer is distrusted when any part of it is off, because a peer that garbles one Result
    cannot be trusted about the others.
    """

    decisions: tuple[Decision | None, ...]
    reason: str | None = None

    def category_permitted(self, index: int) -> bool:
        return self.reason is None and 0 <= index < len(self.decisions) and self.decisions[index] == "Permit"

    @property
    def permitted(self) -> bool:
        """True only when every asked category got a well-formed Permit."""
        return self.reason is None and bool(self.decisions) and all(d == "Permit" for d in self.decisions)


def build_closed_answer(decisions: Sequence[str], relates_to: str, message_id: str | None = None) -> bytes:
    """The simulator's answer: one Result per category, each with Status ok (mitz.md §2.3)."""
    if not decisions:
        raise ValueError("at least one decision is required")
    response = etree.Element(_q(XACML_NS, "Response"), nsmap={None: XACML_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    for decision in decisions:
        if decision not in DECISIONS:
            raise ValueError(f"not an XACML decision: {decision!r}")
        result = etree.SubElement(response, _q(XACML_NS, "Result"))
        etree.SubElement(result, _q(XACML_NS, "Decision")).text = decision
        status = etree.SubElement(result, _q(XACML_NS, "Status"))
        etree.SubElement(status, _q(XACML_NS, "StatusCode")).set("Value", STATUS_OK)
    addressing = Addressing(action=CLOSED_RESPONSE_ACTION, message_id=message_id or new_message_id(),
                            relates_to=relates_to)
    return to_bytes(build_envelope(addressing, response))


_RESULT_CHILDREN = frozenset(_q(XACML_NS, n) for n in (
    "Decision", "Status", "Obligations", "AssociatedAdvice", "Attributes", "PolicyIdentifierList"))


def _closed_decisions(data: bytes, expected_relates_to: str, n_categories: int) -> tuple[Decision, ...]:
    """Raises MitzAnswerError (or SoapFault/XmlError) on anything that is not a clean answer."""
    root = parse_xml(data)
    if root.tag == _q(SOAP11_NS, "Envelope"):
        raise MitzAnswerError("answer is a SOAP 1.1 envelope")
    env = parse_envelope(root)
    _require_action(env, CLOSED_RESPONSE_ACTION, MitzAnswerError)
    if env.addressing.relates_to != expected_relates_to:
        raise MitzAnswerError("wsa:RelatesTo does not match the question's MessageID")
    body = env.body
    if body is None or body.tag != _q(XACML_NS, "Response"):
        raise MitzAnswerError("Body must hold an XACML Response as its direct child")
    parent = body.getparent()
    if parent is not None and len([c for c in parent if isinstance(c.tag, str)]) != 1:
        raise MitzAnswerError("Body holds more than the Response")
    results = []
    for child in body:
        if not isinstance(child.tag, str):
            continue
        if child.tag != _q(XACML_NS, "Result"):
            raise MitzAnswerError(f"unexpected element {child.tag} in Response")
        results.append(child)
    if len(results) != n_categories:
        raise MitzAnswerError(f"expected {n_categories} Result(s), got {len(results)}")
    decisions: list[Decision] = []
    for i, result in enumerate(results):
        for child in result:
            if isinstance(child.tag, str) and child.tag not in _RESULT_CHILDREN:
                raise MitzAnswerError(f"Result {i}: unexpected element {child.tag}")
        decision_els = result.findall(_q(XACML_NS, "Decision"))
        if len(decision_els) != 1:
            raise MitzAnswerError(f"Result {i}: exactly one Decision is required")
        text = decision_els[0].text or ""
        # Exact match: xs:string keeps whitespace, and "Permit " is not a value XACML defines.
        if text not in DECISIONS:
            raise MitzAnswerError(f"Result {i}: unknown Decision {text[:40]!r}")
        decision: Decision = text  # type: ignore[assignment]  # checked against DECISIONS above
        status_els = result.findall(_q(XACML_NS, "Status"))
        if len(status_els) > 1:
            raise MitzAnswerError(f"Result {i}: more than one Status")
        if status_els:
            code = status_els[0].find(_q(XACML_NS, "StatusCode"))
            if code is None or not code.get("Value"):
                raise MitzAnswerError(f"Result {i}: Status without StatusCode Value")
            if decision == "Permit" and code.get("Value") != STATUS_OK:
                raise MitzAnswerError(f"Result {i}: Permit with a non-ok status")
        if decision == "Permit" and result.find(_q(XACML_NS, "Obligations")) is not None:
            # XACML: a PEP that cannot discharge an obligation must not act on the Permit.
            raise MitzAnswerError(f"Result {i}: Permit carries obligations the gateway cannot discharge")
        decisions.append(decision)
    return tuple(decisions)


def parse_closed_answer(data: bytes, expected_relates_to: str, n_categories: int) -> ClosedAnswer:
    """Never raises on peer bytes: anything but a clean, matching answer is "no consent" with a reason.

    Results are correlated with the asked categories by position; correlation through echoed
    attributes is UNVERIFIED for Mitz (mitz.md §2.3), so a count mismatch distrusts the whole answer.
    """
    if n_categories < 1:
        raise ValueError("n_categories must be at least 1")

    def refused(reason: str) -> ClosedAnswer:
        return ClosedAnswer(decisions=(None,) * n_categories, reason=reason)

    try:
        return ClosedAnswer(decisions=_closed_decisions(data, expected_relates_to, n_categories))
    except SoapFault as fault:
        return refused(f"SOAP fault {fault.code}: {fault.reason}"[:500])
    except (MitzAnswerError, XmlError) as exc:
        return refused(str(exc)[:500])
    except Exception as exc:  # fail closed even on a codec bug: a crash must never read as consent
        return refused(f"unexpected error while parsing the answer: {type(exc).__name__}")


# --------------------------------------------------------------------------------------------------
# Open question: XCPD ITI-56 with an XUA assertion (mitz.md §3)
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class OpenQuestion:
    """The requester's localisation question; the requester attributes travel in the XUA assertion."""

    bsn: str
    requester_uzi: str
    requester_role: str
    requester_ura: str
    requester_type: str
    #: The organisation URI (URL or ``urn:oid:``) that issues the assertion.
    issuer: str
    purpose: str = "TREAT"
    mandated_uzi: str | None = None

    def __post_init__(self) -> None:
        _require_bsn(self.bsn)
        for name in ("requester_uzi", "requester_role", "requester_ura", "requester_type", "issuer"):
            _require_text(name, getattr(self, name))
        _require_ura("requester_ura", self.requester_ura)
        if self.purpose not in PURPOSES:
            raise MitzRequestError("purpose must be TREAT or COC")
        if self.mandated_uzi is not None:
            _require_text("mandated_uzi", self.mandated_uzi)


def _saml_time(t: datetime) -> str:
    # Millisecond precision with Z, as B365 produces with Date.toISOString().
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.") + f"{t.astimezone(UTC).microsecond // 1000:03d}Z"


_TIME_RE = re.compile(r"^(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})$")


def _parse_time(value: str | None, what: str, exc: type[MitzError]) -> datetime:
    """xs:dateTime with a mandatory zone; fractions beyond microseconds are cut, not rejected."""
    m = _TIME_RE.match(value or "")
    if m is None:
        raise exc(f"{what} is not a dateTime with a time zone")
    frac = (m.group(2) or ".0")[1:7].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{frac}{zone}")
    except ValueError as e:
        raise exc(f"{what} is not a valid dateTime") from e


def _saml_attribute(stmt: etree._Element, name: str, hl7_local: str, xsi_type: str,
                    attrs: Sequence[tuple[str, str]]) -> None:
    attr = etree.SubElement(stmt, _q(SAML_NS, "Attribute"))
    attr.set("Name", name)
    value = etree.SubElement(attr, _q(SAML_NS, "AttributeValue"))
    # Default namespace on the hl7 child so the unprefixed xsi:type QName ("II") resolves to
    # {urn:hl7-org:v3}II, exactly as B365 writes it.
    hl7 = etree.SubElement(value, _q(HL7_NS, hl7_local), nsmap={None: HL7_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    hl7.set(_q(XSI_NS, "type"), xsi_type)
    for k, v in attrs:
        hl7.set(k, v)


def build_assertion(q: OpenQuestion, now: datetime, assertion_id: str | None = None) -> etree._Element:
    """The unsigned XUA assertion B365 sends with the open question (signing is UNVERIFIED, §3)."""
    return build_xua_assertion(issuer=q.issuer, uzi=q.requester_uzi, role=q.requester_role,
                               ura=q.requester_ura, org_type=q.requester_type, purpose=q.purpose,
                               mandated_uzi=q.mandated_uzi, now=now, assertion_id=assertion_id)


def build_xua_assertion(
    *,
    issuer: str,
    uzi: str,
    role: str,
    ura: str,
    org_type: str | None,
    purpose: str,
    now: datetime,
    audience: str = MITZ_AUDIENCE,
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
    issued = _saml_time(now)
    assertion = etree.Element(_q(SAML_NS, "Assertion"),
                              nsmap={"saml2": SAML_NS, "xsi": XSI_NS, "xs": XS_NS})
    assertion.set("ID", assertion_id or f"_{uuid.uuid4().hex}")
    assertion.set("Version", "2.0")
    assertion.set("IssueInstant", issued)
    etree.SubElement(assertion, _q(SAML_NS, "Issuer")).text = issuer
    subject = etree.SubElement(assertion, _q(SAML_NS, "Subject"))
    etree.SubElement(subject, _q(SAML_NS, "SubjectConfirmation")).set("Method", SAML_BEARER)
    conditions = etree.SubElement(assertion, _q(SAML_NS, "Conditions"))
    conditions.set("NotBefore", issued)
    conditions.set("NotOnOrAfter", _saml_time(now + validity))
    restriction = etree.SubElement(conditions, _q(SAML_NS, "AudienceRestriction"))
    etree.SubElement(restriction, _q(SAML_NS, "Audience")).text = audience
    authn = etree.SubElement(assertion, _q(SAML_NS, "AuthnStatement"))
    authn.set("AuthnInstant", issued)
    context = etree.SubElement(authn, _q(SAML_NS, "AuthnContext"))
    etree.SubElement(context, _q(SAML_NS, "AuthnContextClassRef")).text = SAML_X509
    stmt = etree.SubElement(assertion, _q(SAML_NS, "AttributeStatement"))
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


def build_open_question(q: OpenQuestion, to_url: str, message_id: str, now: datetime,
                        assertion_id: str | None = None) -> bytes:
    """XCPD PatientLocationQuery with the assertion in a mustUnderstand wsse:Security header."""
    security = etree.Element(_q(WSSE_NS, "Security"), nsmap={"wsse": WSSE_NS, "wsu": WSU_NS})
    security.set(_q(SOAP12_NS, "mustUnderstand"), "1")
    security.append(build_assertion(q, now, assertion_id))
    body = etree.Element(_q(XCPD_NS, "PatientLocationQueryRequest"), nsmap={None: XCPD_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    pid = etree.SubElement(body, _q(XCPD_NS, "RequestedPatientId"))
    pid.set("root", BSN_OID)
    pid.set("extension", q.bsn)
    pid.set("assigningAuthorityName", NLMINBIZA)
    return to_bytes(_request_envelope(OPEN_ACTION, message_id, to_url, body, security))


def _one(parent: etree._Element, path: str, what: str, exc: type[MitzError]) -> etree._Element:
    found = parent.findall(path)
    if len(found) != 1:
        raise exc(f"exactly one {what} is required, found {len(found)}")
    return found[0]


def _xsi_type_is(el: etree._Element, expected_local: str) -> bool:
    value = el.get(_q(XSI_NS, "type"))
    if value is None:
        return False
    prefix, _, local = value.rpartition(":")
    return local == expected_local and el.nsmap.get(prefix or None) == HL7_NS


def _saml_values(assertion: etree._Element) -> dict[str, etree._Element]:
    values: dict[str, etree._Element] = {}
    stmt = _one(assertion, _q(SAML_NS, "AttributeStatement"), "AttributeStatement", MitzSecurityError)
    for attr in stmt.findall(_q(SAML_NS, "Attribute")):
        name = attr.get("Name") or ""
        if name in values:
            raise MitzSecurityError(f"assertion attribute {name} appears twice")
        value = _one(attr, _q(SAML_NS, "AttributeValue"), f"AttributeValue of {name}", MitzSecurityError)
        children = [c for c in value if isinstance(c.tag, str)]
        if len(children) != 1:
            raise MitzSecurityError(f"assertion attribute {name} must hold one hl7 element")
        values[name] = children[0]
    return values


def _saml_hl7(values: Mapping[str, etree._Element], name: str, local: str, xsi_type: str,
              key: str, key_value: str, required: bool = True) -> str | None:
    el = values.get(name)
    if el is None:
        if required:
            raise MitzSecurityError(f"assertion lacks attribute {name}")
        return None
    if el.tag != _q(HL7_NS, local) or not _xsi_type_is(el, xsi_type):
        raise MitzSecurityError(f"assertion attribute {name} must be hl7 {local} of xsi:type {xsi_type}")
    if el.get(key) != key_value:
        raise MitzSecurityError(f"assertion attribute {name}: {key} must be {key_value}")
    return _require_text(name, el.get("extension" if xsi_type == "II" else "code"), MitzSecurityError)


def parse_open_question(data: bytes | Envelope, now: datetime | None = None,
                        clock_skew: timedelta = timedelta(seconds=60)) -> OpenQuestion:
    """The simulator's side. With ``now``, an assertion outside its validity window is refused."""
    env = _as_envelope(data, MitzRequestError)
    _require_action(env, OPEN_ACTION, MitzRequestError)
    security = env.header(WSSE_NS, "Security")
    if security is None:
        raise MitzSecurityError("wsse:Security header with the XUA assertion is required")
    assertion = _one(security, _q(SAML_NS, "Assertion"), "saml2:Assertion", MitzSecurityError)
    if assertion.get("Version") != "2.0" or not assertion.get("ID"):
        raise MitzSecurityError("assertion must be SAML 2.0 with an ID")
    issuer = _one(assertion, _q(SAML_NS, "Issuer"), "Issuer", MitzSecurityError).text
    confirmation = _one(assertion, f"{_q(SAML_NS, 'Subject')}/{_q(SAML_NS, 'SubjectConfirmation')}",
                        "Subject/SubjectConfirmation", MitzSecurityError)
    if confirmation.get("Method") != SAML_BEARER:
        raise MitzSecurityError("SubjectConfirmation must be bearer")
    conditions = _one(assertion, _q(SAML_NS, "Conditions"), "Conditions", MitzSecurityError)
    audiences = [a.text for a in conditions.iter(_q(SAML_NS, "Audience"))]
    if audiences != [MITZ_AUDIENCE]:
        raise MitzSecurityError("Audience must be Mitz")
    not_before = _parse_time(conditions.get("NotBefore"), "NotBefore", MitzSecurityError)
    not_after = _parse_time(conditions.get("NotOnOrAfter"), "NotOnOrAfter", MitzSecurityError)
    if not_after <= not_before:
        raise MitzSecurityError("assertion validity window is empty")
    if now is not None and not (not_before - clock_skew <= now < not_after + clock_skew):
        raise MitzSecurityError("assertion is not valid now")
    class_ref = assertion.findtext("/".join(
        _q(SAML_NS, n) for n in ("AuthnStatement", "AuthnContext", "AuthnContextClassRef")))
    if class_ref != SAML_X509:
        raise MitzSecurityError("AuthnContextClassRef must be X509")
    values = _saml_values(assertion)
    known = {ATTR_PROVIDER_ID, ATTR_MANDATED, ATTR_ROLE, ATTR_PROVIDER_INSTITUTION, ATTR_CONSULTING_TYPE,
             ATTR_PURPOSE}
    if set(values) - known:
        raise MitzSecurityError(f"unexpected assertion attributes {sorted(set(values) - known)}")
    uzi = _saml_hl7(values, ATTR_PROVIDER_ID, "id", "II", "root", UZI_OID)
    role = _saml_hl7(values, ATTR_ROLE, "Role", "CE", "codeSystem", ROLE_OID)
    ura = _saml_hl7(values, ATTR_PROVIDER_INSTITUTION, "id", "II", "root", URA_OID)
    org_type = _saml_hl7(values, ATTR_CONSULTING_TYPE, "consulting-facility-type-code", "CV", "codeSystem",
                         ORG_TYPE_OID)
    purpose = _saml_hl7(values, ATTR_PURPOSE, "PurposeOfUse", "CE", "codeSystem", PURPOSE_OID)
    mandated = _saml_hl7(values, ATTR_MANDATED, "id", "II", "root", UZI_OID, required=False)
    assert uzi is not None and role is not None and ura is not None and org_type is not None
    assert purpose is not None

    body = env.body
    if body is None or body.tag != _q(XCPD_NS, "PatientLocationQueryRequest"):
        raise MitzRequestError("Body must hold a PatientLocationQueryRequest")
    pid = _one(body, _q(XCPD_NS, "RequestedPatientId"), "RequestedPatientId", MitzRequestError)
    if pid.get("root") != BSN_OID:
        raise MitzRequestError("RequestedPatientId root must be the BSN OID")
    if pid.get("assigningAuthorityName") != NLMINBIZA:
        raise MitzRequestError("RequestedPatientId must carry assigningAuthorityName NLMINBIZA")
    return OpenQuestion(
        bsn=_require_text("RequestedPatientId extension", pid.get("extension")),
        requester_uzi=uzi,
        requester_role=role,
        requester_ura=ura,
        requester_type=org_type,
        issuer=_require_text("Issuer", issuer, MitzSecurityError),
        purpose=purpose,
        mandated_uzi=mandated,
    )


@dataclass(frozen=True, kw_only=True)
class Location:
    """Where consented data of the patient lives: the community to ask with ITI-38, and for whom."""

    #: ``urn:oid:…`` of the exchange system's gateway (XCA community).
    home_community_id: str
    #: The source system inside that community (whatever was registered as SourceSystem).
    source_id: str
    patient_root: str
    patient_extension: str
    holder_ura: str


def build_open_answer(locations: Sequence[Location], relates_to: str, message_id: str | None = None) -> bytes:
    """The simulator's answer.

    Element layout (UNVERIFIED against the VZVZ text; taken from B365's XPaths, mitz.md §3): every
    child of ``PatientLocationResponse`` is in the XCPD namespace; ``HomeCommunityId`` and
    ``SourceId`` carry text; ``CorrespondingPatientId`` and ``author-institution`` carry
    ``@root``/``@extension``. NLMINBIZA is added to a BSN-rooted CorrespondingPatientId, as on the
    question. No element for the data category is written: where Mitz puts it is UNVERIFIED.
    """
    body = etree.Element(_q(XCPD_NS, "PatientLocationQueryResponse"), nsmap={None: XCPD_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    for loc in locations:
        plr = etree.SubElement(body, _q(XCPD_NS, "PatientLocationResponse"))
        etree.SubElement(plr, _q(XCPD_NS, "HomeCommunityId")).text = loc.home_community_id
        cpid = etree.SubElement(plr, _q(XCPD_NS, "CorrespondingPatientId"))
        cpid.set("root", loc.patient_root)
        cpid.set("extension", loc.patient_extension)
        if loc.patient_root == BSN_OID:
            cpid.set("assigningAuthorityName", NLMINBIZA)
        etree.SubElement(plr, _q(XCPD_NS, "SourceId")).text = loc.source_id
        author = etree.SubElement(plr, _q(XCPD_NS, "author-institution"))
        author.set("root", URA_OID)
        author.set("extension", loc.holder_ura)
    addressing = Addressing(action=OPEN_RESPONSE_ACTION, message_id=message_id or new_message_id(),
                            relates_to=relates_to)
    return to_bytes(build_envelope(addressing, body))


def parse_open_answer(data: bytes, expected_relates_to: str) -> list[Location]:
    """Strict: one malformed location distrusts the whole answer, since it would steer ITI-38 queries.

    Raises :class:`MitzFault` for a SOAP Fault and :class:`MitzAnswerError` for anything else off;
    an empty list means "no location, or no permission" (B365).
    """
    try:
        root = parse_xml(data)
        if root.tag == _q(SOAP11_NS, "Envelope"):
            raise MitzAnswerError("answer is a SOAP 1.1 envelope")
        env = parse_envelope(root)
    except SoapFault as fault:
        raise MitzFault(fault.code, fault.reason[:300]) from fault
    except XmlError as exc:
        raise MitzAnswerError(str(exc)[:300]) from exc
    _require_action(env, OPEN_RESPONSE_ACTION, MitzAnswerError)
    if env.addressing.relates_to != expected_relates_to:
        raise MitzAnswerError("wsa:RelatesTo does not match the question's MessageID")
    body = env.body
    if body is None or body.tag != _q(XCPD_NS, "PatientLocationQueryResponse"):
        raise MitzAnswerError("Body must hold a PatientLocationQueryResponse")
    locations: list[Location] = []
    for i, plr in enumerate(c for c in body if isinstance(c.tag, str)):
        if plr.tag != _q(XCPD_NS, "PatientLocationResponse"):
            raise MitzAnswerError(f"unexpected element {plr.tag} in PatientLocationQueryResponse")
        where = f"PatientLocationResponse {i}"
        hcid = (_one(plr, _q(XCPD_NS, "HomeCommunityId"), f"{where} HomeCommunityId", MitzAnswerError).text
                or "").strip()
        if not hcid.startswith("urn:oid:") or not is_oid(bare_oid(hcid)):
            raise MitzAnswerError(f"{where}: HomeCommunityId must be urn:oid:<OID>")
        cpid = _one(plr, _q(XCPD_NS, "CorrespondingPatientId"), f"{where} CorrespondingPatientId",
                    MitzAnswerError)
        patient_root = _require_text(f"{where} CorrespondingPatientId root", cpid.get("root"),
                                     MitzAnswerError)
        patient_ext = _require_text(f"{where} CorrespondingPatientId extension", cpid.get("extension"),
                                    MitzAnswerError)
        source_id = (_one(plr, _q(XCPD_NS, "SourceId"), f"{where} SourceId", MitzAnswerError).text
                     or "").strip()
        if not is_oid(bare_oid(source_id)):
            raise MitzAnswerError(f"{where}: SourceId must be an OID")
        author = _one(plr, _q(XCPD_NS, "author-institution"), f"{where} author-institution", MitzAnswerError)
        if author.get("root") != URA_OID:
            raise MitzAnswerError(f"{where}: author-institution root must be the URA OID")
        holder_ura = _require_text(f"{where} author-institution extension", author.get("extension"),
                                   MitzAnswerError)
        _require_ura(f"{where} author-institution extension", holder_ura, MitzAnswerError)
        locations.append(Location(home_community_id=hcid, source_id=source_id, patient_root=patient_root,
                                  patient_extension=patient_ext, holder_ura=holder_ura))
    return locations


# --------------------------------------------------------------------------------------------------
# FHIR subscription (mitz.md §4)
# --------------------------------------------------------------------------------------------------

EXT_BIRTH_DATE: Final = "http://fhir.nl/StructureDefinition/Patient.birthDate"
EXT_GATEWAY: Final = "http://fhir.nl/StructureDefinition/GatewaySystem"
EXT_SOURCE: Final = "http://fhir.nl/StructureDefinition/SourceSystem"
SUBSCRIPTION_EXTENSIONS: Final = frozenset({EXT_BIRTH_DATE, EXT_GATEWAY, EXT_SOURCE})
FHIR_JSON: Final = "application/fhir+json"
FHIR_PAYLOADS: Final = frozenset({FHIR_JSON, "application/fhir+xml"})
_SUBSCRIPTION_KEYS = frozenset({"resourceType", "id", "meta", "extension", "status", "reason", "criteria",
                                "channel"})
_CHANNEL_KEYS = frozenset({"type", "endpoint", "payload"})
_CRITERIA_KEYS = ("_query", "patientid", "providerid", "providertype")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """A data holder's registration for one patient; OIDs are kept bare (no ``urn:oid:``)."""

    bsn: str
    provider_ura: str
    provider_type: str
    endpoint: str
    #: Comes back as HomeCommunityId in open answers.
    gateway_oid: str
    #: Comes back as SourceId in open answers.
    source_oid: str
    birth_date: date | None = None
    payload: str = FHIR_JSON
    status: str = "requested"
    id: str | None = None


def build_subscription(
    bsn: str,
    provider_ura: str,
    provider_type: str,
    endpoint: str,
    gateway_oid: str,
    source_oid: str,
    birth_date: date | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Subscription to POST.

    OIDs may be given bare or as ``urn:oid:``; they are written with the prefix the FHIR ``oid`` type
    requires, so callers need not care which form their config holds.
    """
    _require_bsn(bsn)
    _require_ura("provider_ura", provider_ura)
    _require_text("provider_type", provider_type)
    _require_text("endpoint", endpoint)
    for name, oid in (("gateway_oid", gateway_oid), ("source_oid", source_oid)):
        if not is_oid(bare_oid(oid)):
            raise MitzRequestError(f"{name} must be an OID")
    extension: list[dict[str, str]] = []
    if birth_date is not None:
        extension.append({"url": EXT_BIRTH_DATE, "valueDate": birth_date.isoformat()})
    extension.append({"url": EXT_GATEWAY, "valueOid": f"urn:oid:{bare_oid(gateway_oid)}"})
    extension.append({"url": EXT_SOURCE, "valueOid": f"urn:oid:{bare_oid(source_oid)}"})
    return {
        "resourceType": "Subscription",
        "extension": extension,
        "status": "requested",
        "reason": "OTV",
        "criteria": (f"Consent?_query=otv&patientid={bsn}&providerid={provider_ura}"
                     f"&providertype={provider_type}"),
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": FHIR_JSON},
    }


def _str_field(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MitzRequestError(f"{where}.{key} must be a non-empty string")
    return value


def parse_subscription(resource: Mapping[str, Any]) -> Subscription:
    """Strict, as NK's validator: only the three Mitz extensions, the documented criteria, rest-hook."""
    if not isinstance(resource, Mapping):
        raise MitzRequestError("Subscription must be a JSON object")
    if resource.get("resourceType") != "Subscription":
        raise MitzRequestError("resourceType must be Subscription")
    extra = set(resource) - _SUBSCRIPTION_KEYS
    if extra:
        raise MitzRequestError(f"unexpected Subscription elements {sorted(extra)}")
    status = _str_field(resource, "status", "Subscription")
    if status not in ("requested", "active"):
        raise MitzRequestError("status must be requested (or active when read back)")
    if resource.get("reason") != "OTV":
        raise MitzRequestError("reason must be OTV")

    criteria = _str_field(resource, "criteria", "Subscription")
    path, sep, query = criteria.partition("?")
    if path != "Consent" or not sep:
        raise MitzRequestError("criteria must be a Consent query")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    keys = [k for k, _ in pairs]
    if sorted(keys) != sorted(_CRITERIA_KEYS):
        raise MitzRequestError("criteria must hold exactly _query, patientid, providerid and providertype")
    params = dict(pairs)
    if params["_query"] != "otv":
        raise MitzRequestError("criteria _query must be otv")
    bsn = params["patientid"]
    _require_bsn(bsn)
    _require_ura("criteria providerid", params["providerid"])
    provider_type = _require_text("criteria providertype", params["providertype"])

    channel = resource.get("channel")
    if not isinstance(channel, Mapping):
        raise MitzRequestError("channel is required")
    if set(channel) - _CHANNEL_KEYS:
        raise MitzRequestError(f"unexpected channel elements {sorted(set(channel) - _CHANNEL_KEYS)}")
    if channel.get("type") != "rest-hook":
        raise MitzRequestError("channel.type must be rest-hook")
    endpoint = _str_field(channel, "endpoint", "channel")
    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc:
        raise MitzRequestError("channel.endpoint must be an http(s) URL")
    payload = _str_field(channel, "payload", "channel")
    if payload not in FHIR_PAYLOADS:
        raise MitzRequestError("channel.payload must be application/fhir+json or application/fhir+xml")

    extensions = resource.get("extension", [])
    if not isinstance(extensions, list):
        raise MitzRequestError("extension must be a list")
    found: dict[str, Mapping[str, Any]] = {}
    for ext in extensions:
        if not isinstance(ext, Mapping):
            raise MitzRequestError("extension entries must be objects")
        url = ext.get("url")
        if url not in SUBSCRIPTION_EXTENSIONS:
            raise MitzRequestError(f"extension {url!r} is not allowed")
        if url in found:
            raise MitzRequestError(f"extension {url} appears twice")
        found[url] = ext
    oids: dict[str, str] = {}
    for url in (EXT_GATEWAY, EXT_SOURCE):
        ext = found.get(url)
        if ext is None:
            raise MitzRequestError(f"extension {url} is required")
        if set(ext) != {"url", "valueOid"}:
            raise MitzRequestError(f"extension {url} must carry exactly a valueOid")
        value = ext["valueOid"]
        if not isinstance(value, str) or not value.startswith("urn:oid:") or not is_oid(bare_oid(value)):
            raise MitzRequestError(f"extension {url} valueOid must be urn:oid:<OID>")
        oids[url] = bare_oid(value)
    birth_date: date | None = None
    if EXT_BIRTH_DATE in found:
        ext = found[EXT_BIRTH_DATE]
        value = ext.get("valueDate")
        if set(ext) != {"url", "valueDate"} or not isinstance(value, str) or not _DATE_RE.match(value):
            raise MitzRequestError("birthDate extension must carry a valueDate YYYY-MM-DD")
        try:
            birth_date = date.fromisoformat(value)
        except ValueError as e:
            raise MitzRequestError("birthDate extension valueDate is not a date") from e
    sub_id = resource.get("id")
    if sub_id is not None and not isinstance(sub_id, str):
        raise MitzRequestError("id must be a string")
    return Subscription(
        bsn=bsn,
        provider_ura=params["providerid"],
        provider_type=provider_type,
        endpoint=endpoint,
        gateway_oid=oids[EXT_GATEWAY],
        source_oid=oids[EXT_SOURCE],
        birth_date=birth_date,
        payload=payload,
        status=status,
        id=sub_id,
    )


def subscription_resource(sub: Subscription) -> dict[str, Any]:
    """A stored subscription as Mitz would return it on read (with id and status)."""
    resource = build_subscription(sub.bsn, sub.provider_ura, sub.provider_type, sub.endpoint,
                                  sub.gateway_oid, sub.source_oid, sub.birth_date)
    resource["channel"]["payload"] = sub.payload
    resource["status"] = sub.status
    if sub.id is not None:
        resource = {"resourceType": "Subscription", "id": sub.id,
                    **{k: v for k, v in resource.items() if k != "resourceType"}}
    return resource


# --------------------------------------------------------------------------------------------------
# Notification: a transaction Bundle of Consent, Patient and Organization (mitz.md §4)
# --------------------------------------------------------------------------------------------------

CONSENT_NOTIFY_PROFILE: Final = "http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"
EXT_PROVIDER_CATEGORY: Final = "http://fhir.nl/StructureDefinition/OTV-ProviderCategory"
RPZAC_SYSTEM: Final = "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie"
GGC_SYSTEM: Final = "http://fhir.nl/otv/CodeSystem/gegevenscategorie"
CONSENT_SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON_SYSTEM: Final = "http://hl7.org/fhir/v3/ActReason"
BSN_SYSTEM: Final = "http://fhir.nl/fhir/NamingSystem/bsn"
URA_SYSTEM: Final = "http://fhir.nl/fhir/NamingSystem/ura"
ORG_TYPE_SYSTEM: Final = "http://nictiz.nl/fhir/NamingSystem/organization-type"

#: Every requester category of mitz.md §5, for notifications that do not distinguish them.
ALL_PROVIDER_CATEGORIES: Final[tuple[str, ...]] = (
    "RPZAC001", "RPZAC003", "RPZAC004", "RPZAC005", "RPZAC103", "RPZAC104", "RPZAC200")


@dataclass(frozen=True, kw_only=True)
class ConsentStatement:
    """One Consent entry: for these requester categories, is sharing this data category permitted."""

    provider_categories: tuple[str, ...]
    permit: bool
    category: str = "GGC002"
    purpose: str = "TREAT"


@dataclass(frozen=True, kw_only=True)
class Notification:
    """What Mitz tells a subscribed data holder about one patient's consent for that holder."""

    bsn: str
    holder_ura: str
    holder_type: str
    date_time: datetime
    statements: tuple[ConsentStatement, ...]

    def permits(self, provider_category: str, category: str = "GGC002") -> bool:
        """Fail closed: permitted only when a statement names this requester category and permits."""
        return any(s.permit and s.category == category and provider_category in s.provider_categories
                   for s in self.statements)


def _fhir_datetime(t: datetime) -> str:
    if t.tzinfo is None:
        raise ValueError("date_time must be timezone-aware")
    return t.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(resource: dict[str, Any], full_id: str, kind: str) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{full_id}", "resource": resource,
            "request": {"method": "POST", "url": kind}}


def build_notification(n: Notification, bundle_id: str | None = None) -> dict[str, Any]:
    """A transaction Bundle shaped like NK's example: Consent entries first, then Patient, Organization.

    Consent given is ``active`` with ``provision.type=permit``; no consent is ``inactive`` with no
    ``provision.type`` — exactly the two shapes of the example, nothing else.
    """
    if not n.statements:
        raise ValueError("a notification needs at least one Consent statement")
    _require_bsn(n.bsn)
    patient_id, org_id = str(uuid.uuid4()), str(uuid.uuid4())
    when = _fhir_datetime(n.date_time)
    entries: list[dict[str, Any]] = []
    for s in n.statements:
        if not s.provider_categories:
            raise ValueError("a Consent statement needs at least one requester category")
        consent_id = str(uuid.uuid4())
        provision: dict[str, Any] = {}
        if s.permit:
            provision["type"] = "permit"
        provision["actor"] = [{
            "role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": "CST"}]},
            "reference": {"reference": f"urn:uuid:{org_id}"},
        }]
        provision["purpose"] = [{"system": ACT_REASON_SYSTEM, "code": s.purpose}]
        consent = {
            "resourceType": "Consent",
            "id": consent_id,
            "meta": {"profile": [CONSENT_NOTIFY_PROFILE]},
            "extension": [
                {"url": EXT_PROVIDER_CATEGORY,
                 "valueCodeableConcept": {"coding": [{"system": RPZAC_SYSTEM, "code": code}]}}
                for code in s.provider_categories
            ],
            "status": "active" if s.permit else "inactive",
            "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": GGC_SYSTEM, "code": s.category}]}],
            "patient": {"reference": f"urn:uuid:{patient_id}"},
            "dateTime": when,
            "provision": provision,
        }
        entries.append(_entry(consent, consent_id, "Consent"))
    entries.append(_entry({"resourceType": "Patient", "id": patient_id,
                           "identifier": [{"system": BSN_SYSTEM, "value": n.bsn}]}, patient_id, "Patient"))
    entries.append(_entry({"resourceType": "Organization", "id": org_id,
                           "identifier": [{"system": URA_SYSTEM, "value": n.holder_ura}],
                           "type": [{"coding": [{"system": ORG_TYPE_SYSTEM, "code": n.holder_type}]}]},
                          org_id, "Organization"))
    return {"resourceType": "Bundle", "id": bundle_id or str(uuid.uuid4()), "type": "transaction",
            "entry": entries}


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MitzAnswerError(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MitzAnswerError(f"{what} must be a JSON array")
    return value


def _single_coding(concept: Any, system: str, what: str) -> str:
    codings = _list(_obj(concept, what).get("coding"), f"{what}.coding")
    matching = [c for c in codings if isinstance(c, Mapping) and c.get("system") == system]
    if len(matching) != 1 or not isinstance(matching[0].get("code"), str) or not matching[0]["code"]:
        raise MitzAnswerError(f"{what} must hold one coding of {system}")
    code: str = matching[0]["code"]
    return code


def _single_identifier(resource: Mapping[str, Any], system: str, what: str) -> str:
    ids = [i for i in _list(resource.get("identifier"), f"{what}.identifier")
           if isinstance(i, Mapping) and i.get("system") == system]
    if len(ids) != 1 or not isinstance(ids[0].get("value"), str) or not ids[0]["value"]:
        raise MitzAnswerError(f"{what} must hold one identifier of {system}")
    value: str = ids[0]["value"]
    return value


def _parse_consent(consent: Mapping[str, Any], patient_url: str, org_url: str, i: int) -> ConsentStatement:
    where = f"Consent {i}"
    profiles = _obj(consent.get("meta"), f"{where}.meta").get("profile")
    if not isinstance(profiles, list) or CONSENT_NOTIFY_PROFILE not in profiles:
        raise MitzAnswerError(f"{where}: profile {CONSENT_NOTIFY_PROFILE} is required")
    categories: list[str] = []
    for ext in _list(consent.get("extension"), f"{where}.extension"):
        ext = _obj(ext, f"{where}.extension")
        if ext.get("url") != EXT_PROVIDER_CATEGORY:
            raise MitzAnswerError(f"{where}: unexpected extension {ext.get('url')!r}")
        categories.append(_single_coding(ext.get("valueCodeableConcept"), RPZAC_SYSTEM, f"{where} category"))
    if not categories:
        raise MitzAnswerError(f"{where}: at least one OTV-ProviderCategory is required")
    if _single_coding(consent.get("scope"), CONSENT_SCOPE_SYSTEM, f"{where}.scope") != "patient-privacy":
        raise MitzAnswerError(f"{where}: scope must be patient-privacy")
    data_categories = _list(consent.get("category"), f"{where}.category")
    if len(data_categories) != 1:
        raise MitzAnswerError(f"{where}: exactly one gegevenscategorie is required")
    data_category = _single_coding(data_categories[0], GGC_SYSTEM, f"{where}.category")
    if _obj(consent.get("patient"), f"{where}.patient").get("reference") != patient_url:
        raise MitzAnswerError(f"{where}: patient must reference the Patient entry")
    if not isinstance(consent.get("dateTime"), str):
        raise MitzAnswerError(f"{where}: dateTime is required")
    provision = _obj(consent.get("provision"), f"{where}.provision")
    actors = _list(provision.get("actor"), f"{where}.provision.actor")
    if len(actors) != 1:
        raise MitzAnswerError(f"{where}: exactly one provision.actor is required")
    actor = _obj(actors[0], f"{where}.provision.actor")
    if _single_coding(actor.get("role"), PARTICIPATION_SYSTEM, f"{where} actor role") != "CST":
        raise MitzAnswerError(f"{where}: actor role must be CST")
    if _obj(actor.get("reference"), f"{where} actor reference").get("reference") != org_url:
        raise MitzAnswerError(f"{where}: actor must reference the Organization entry")
    purposes = [p for p in _list(provision.get("purpose"), f"{where}.provision.purpose")
                if isinstance(p, Mapping) and p.get("system") == ACT_REASON_SYSTEM]
    if len(purposes) != 1 or not isinstance(purposes[0].get("code"), str):
        raise MitzAnswerError(f"{where}: one ActReason purpose is required")
    status, ptype = consent.get("status"), provision.get("type")
    if status == "active" and ptype == "permit":
        permit = True
    elif status == "inactive" and ptype is None:
        permit = False
    else:
        # Only the two documented shapes are understood; anything else must not be read as consent.
        raise MitzAnswerError(f"{where}: status {status!r} with provision.type {ptype!r} is not understood")
    return ConsentStatement(provider_categories=tuple(categories), permit=permit, category=data_category,
                            purpose=purposes[0]["code"])


def parse_notification(bundle: Mapping[str, Any]) -> Notification:
    """Strict reading of a notification; raises :class:`MitzAnswerError` on anything undocumented.

    The notification's date is the newest Consent ``dateTime``, so a receiver can order updates.
    """
    bundle = _obj(bundle, "notification")
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise MitzAnswerError("notification must be a transaction Bundle")
    by_type: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for entry in _list(bundle.get("entry"), "Bundle.entry"):
        entry = _obj(entry, "Bundle.entry")
        full_url = entry.get("fullUrl")
        resource = _obj(entry.get("resource"), "Bundle.entry.resource")
        kind = resource.get("resourceType")
        if not isinstance(full_url, str) or kind not in ("Consent", "Patient", "Organization"):
            raise MitzAnswerError("Bundle entries must be Consent, Patient or Organization with a fullUrl")
        by_type.setdefault(kind, []).append((full_url, resource))
    for kind in ("Patient", "Organization"):
        if len(by_type.get(kind, [])) != 1:
            raise MitzAnswerError(f"notification must hold exactly one {kind}")
    if not by_type.get("Consent"):
        raise MitzAnswerError("notification holds no Consent")
    patient_url, patient = by_type["Patient"][0]
    org_url, org = by_type["Organization"][0]
    bsn = _single_identifier(patient, BSN_SYSTEM, "Patient")
    _require_bsn(bsn, MitzAnswerError)
    holder_ura = _single_identifier(org, URA_SYSTEM, "Organization")
    types = _list(org.get("type"), "Organization.type")
    if len(types) != 1:
        raise MitzAnswerError("Organization must hold one type")
    holder_type = _single_coding(types[0], ORG_TYPE_SYSTEM, "Organization.type")
    statements = tuple(_parse_consent(c, patient_url, org_url, i)
                       for i, (_, c) in enumerate(by_type["Consent"]))
    times = [_parse_time(c.get("dateTime"), "Consent.dateTime", MitzAnswerError)
             for _, c in by_type["Consent"]]
    return Notification(bsn=bsn, holder_ura=holder_ura, holder_type=holder_type, date_time=max(times),
                        statements=statements)
