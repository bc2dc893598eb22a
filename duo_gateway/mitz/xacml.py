"""The Mitz closed question (XACML 3.0 over SOAP 1.2): "may this requester see this patient's data?"

Asked by a data holder before every disclosure (mitz.md §2), so the answer side is the security
gate: :func:`parse_closed_answer` fails closed without raising. The subject attributes reuse the XUA
vocabulary of :mod:`duo_gateway.saml`, because the question copies what the requester's token says
(netherlands.md §3); only the resource, action and environment wording is XACML's own.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal, get_args

from lxml import etree

from duo_gateway.bsn import BSN_OID
from duo_gateway.mitz.codec import (
    MitzAnswerError,
    MitzRequestError,
    as_envelope,
    request_envelope,
    require_action,
    require_bsn,
    require_text,
    require_ura,
)
from duo_gateway.saml import (
    ATTR_CONSULTING_TYPE,
    ATTR_MANDATED,
    ATTR_PROVIDER_ID,
    ATTR_PROVIDER_INSTITUTION,
    ATTR_PURPOSE,
    ATTR_RESOURCE_ID,
    ATTR_ROLE,
    CIBG,
    HL7_NS,
    ORG_TYPE_OID,
    PURPOSE_OID,
    PURPOSES,
    ROLE_OID,
    URA_OID,
    UZI_OID,
)
from duo_gateway.soap.envelope import (
    SOAP11_NS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    new_message_id,
    parse_envelope,
)
from duo_gateway.soap.xml import XML_NS, XmlError, parse_xml, qname, to_bytes

XACML_SAML_NS: Final = "urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14"
XACML_NS: Final = "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17"

#: Literally this, not a URI: both open implementations send it (mitz.md §2.1).
CLOSED_ACTION: Final = "XACMLAuthorizationDecisionQueryRequest"
CLOSED_RESPONSE_ACTION: Final = (
    "http://schemas.otv.nl/toestemmingsregister/XACMLAuthzDecisionQuery/"
    "IGeslotenAutorisatievraagService/XACMLAuthzDecisionQueryResponse"
)

CLOSED_PATH: Final = "geslotenautorisatievraag/xacml3"

DATA_CATEGORY_OID: Final = "2.16.840.1.113883.2.4.3.111.5.10.1"

CAT_RESOURCE: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:resource"
CAT_ACTION: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:action"
CAT_SUBJECT: Final = "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject"
CAT_ENVIRONMENT: Final = "urn:oasis:names:tc:xacml:3.0:attribute-category:environment"

ATTR_FACILITY_TYPE: Final = "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code"
ATTR_AUTHOR_INSTITUTION: Final = "urn:ihe:iti:appc:2016:author-institution:id"
ATTR_EVENT_CODE: Final = "urn:ihe:iti:appc:2016:document-entry:event-code"

DT_II: Final = "urn:hl7-org:v3#II"
DT_CV: Final = "urn:hl7-org:v3#CV"
STATUS_OK: Final = "urn:oasis:names:tc:xacml:1.0:status:ok"

#: B365 sends ``false``, NK ``true``; Mitz's expectation is UNVERIFIED. ``false`` is chosen because
#: Results are correlated to categories by position, not by echoed attributes (see parse_closed_answer).
INCLUDE_IN_RESULT: Final = "false"

Decision = Literal["Permit", "Deny", "NotApplicable", "Indeterminate"]
DECISIONS: Final[frozenset[str]] = frozenset(get_args(Decision))


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
        require_bsn(self.bsn)
        for name in ("holder_ura", "holder_type", "requester_uzi", "requester_role", "requester_ura",
                     "requester_type"):
            require_text(name, getattr(self, name))
        require_ura("holder_ura", self.holder_ura)
        require_ura("requester_ura", self.requester_ura)
        if not isinstance(self.categories, tuple) or not self.categories:
            raise MitzRequestError("at least one data category is required (as a tuple)")
        for category in self.categories:
            require_text("category", category)
        if self.purpose not in PURPOSES:
            raise MitzRequestError("purpose must be TREAT or COC")
        if self.mandated_uzi is not None:
            require_text("mandated_uzi", self.mandated_uzi)


def _xacml_attribute(
    parent: etree._Element,
    attribute_id: str,
    data_type: str,
    hl7_local: str,
    hl7_attrs: Sequence[tuple[str, str]],
) -> None:
    attr = etree.SubElement(parent, qname(XACML_NS, "Attribute"))
    attr.set("AttributeId", attribute_id)
    attr.set("IncludeInResult", INCLUDE_IN_RESULT)
    value = etree.SubElement(attr, qname(XACML_NS, "AttributeValue"))
    value.set("DataType", data_type)
    hl7 = etree.SubElement(value, qname(HL7_NS, hl7_local))
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
    block = etree.SubElement(request, qname(XACML_NS, "Attributes"))
    block.set("Category", category)
    block.set(qname(XML_NS, "id"), xml_id)
    return block


def build_closed_question(q: ClosedQuestion, to_url: str, message_id: str) -> bytes:
    """The XACML closed question, unsigned (whether Mitz requires XML-DSig is UNVERIFIED, §2.2).

    ``assigningAuthorityName="CIBG"`` is set on UZI identifiers only, as in the mitz.md table and NK;
    B365 also puts it on URAs. The BSN II carries no assigningAuthorityName here (NK, B365), unlike
    the open question where NLMINBIZA is mandatory.
    """
    query = etree.Element(qname(XACML_SAML_NS, "XACMLAuthzDecisionQuery"), nsmap={"q": XACML_SAML_NS})
    request = etree.SubElement(query, qname(XACML_NS, "Request"), nsmap={"x": XACML_NS, "h": HL7_NS})
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

    return to_bytes(request_envelope(CLOSED_ACTION, message_id, to_url, query))


class _AttributeBlock:
    """One XACML ``Attributes`` element, indexed by AttributeId; duplicates and unknowns are refused."""

    def __init__(self, block: etree._Element, allowed: frozenset[str]) -> None:
        self.values: dict[str, etree._Element] = {}
        for attr in block:
            if not isinstance(attr.tag, str):
                continue
            if attr.tag != qname(XACML_NS, "Attribute"):
                raise MitzRequestError(f"unexpected element {attr.tag} in Attributes")
            attribute_id = attr.get("AttributeId")
            if attribute_id not in allowed:
                raise MitzRequestError(f"unexpected AttributeId {attribute_id!r}")
            if attribute_id in self.values:
                raise MitzRequestError(f"AttributeId {attribute_id} appears twice")
            if attr.get("IncludeInResult") not in ("true", "false"):
                raise MitzRequestError(f"{attribute_id}: IncludeInResult must be true or false")
            values = attr.findall(qname(XACML_NS, "AttributeValue"))
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
        if len(children) != 1 or children[0].tag != qname(HL7_NS, local):
            raise MitzRequestError(f"{attribute_id}: expected one hl7 {local}")
        return children[0]

    def ii(self, attribute_id: str, root: str, required: bool = True) -> str | None:
        el = self._hl7(attribute_id, DT_II, "InstanceIdentifier", required)
        if el is None:
            return None
        if el.get("root") != root:
            raise MitzRequestError(f"{attribute_id}: root must be {root}")
        return require_text(f"{attribute_id} extension", el.get("extension"))

    def cv(self, attribute_id: str, code_system: str) -> str:
        el = self._hl7(attribute_id, DT_CV, "CodedValue", True)
        assert el is not None  # required=True raised otherwise
        if el.get("codeSystem") != code_system:
            raise MitzRequestError(f"{attribute_id}: codeSystem must be {code_system}")
        return require_text(f"{attribute_id} code", el.get("code"))


def parse_closed_question(data: bytes | Envelope) -> ClosedQuestion:
    """The simulator's side: strict, so the gateway's client cannot drift from the documented shape.

    Raises :class:`MitzRequestError` for anything missing or off, and lets a
    :class:`~duo_gateway.soap.envelope.SoapFault` (SOAP 1.1 → VersionMismatch) through for the caller
    to answer with.
    """
    env = as_envelope(data, MitzRequestError)
    require_action(env, CLOSED_ACTION, MitzRequestError)
    query = env.body
    if query is None or query.tag != qname(XACML_SAML_NS, "XACMLAuthzDecisionQuery"):
        raise MitzRequestError("Body must hold an XACMLAuthzDecisionQuery")
    requests = query.findall(qname(XACML_NS, "Request"))
    if len(requests) != 1:
        raise MitzRequestError("XACMLAuthzDecisionQuery must hold exactly one Request")
    request = requests[0]
    blocks: dict[str, list[etree._Element]] = {}
    for block in request:
        if not isinstance(block.tag, str):
            continue
        if block.tag != qname(XACML_NS, "Attributes"):
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
    response = etree.Element(qname(XACML_NS, "Response"), nsmap={None: XACML_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    for decision in decisions:
        if decision not in DECISIONS:
            raise ValueError(f"not an XACML decision: {decision!r}")
        result = etree.SubElement(response, qname(XACML_NS, "Result"))
        etree.SubElement(result, qname(XACML_NS, "Decision")).text = decision
        status = etree.SubElement(result, qname(XACML_NS, "Status"))
        etree.SubElement(status, qname(XACML_NS, "StatusCode")).set("Value", STATUS_OK)
    addressing = Addressing(action=CLOSED_RESPONSE_ACTION, message_id=message_id or new_message_id(),
                            relates_to=relates_to)
    return to_bytes(build_envelope(addressing, response))


_RESULT_CHILDREN = frozenset(qname(XACML_NS, n) for n in (
    "Decision", "Status", "Obligations", "AssociatedAdvice", "Attributes", "PolicyIdentifierList"))


def _closed_decisions(data: bytes, expected_relates_to: str, n_categories: int) -> tuple[Decision, ...]:
    """Raises MitzAnswerError (or SoapFault/XmlError) on anything that is not a clean answer."""
    root = parse_xml(data)
    if root.tag == qname(SOAP11_NS, "Envelope"):
        raise MitzAnswerError("answer is a SOAP 1.1 envelope")
    env = parse_envelope(root)
    require_action(env, CLOSED_RESPONSE_ACTION, MitzAnswerError)
    if env.addressing.relates_to != expected_relates_to:
        raise MitzAnswerError("wsa:RelatesTo does not match the question's MessageID")
    body = env.body
    if body is None or body.tag != qname(XACML_NS, "Response"):
        raise MitzAnswerError("Body must hold an XACML Response as its direct child")
    parent = body.getparent()
    if parent is not None and len([c for c in parent if isinstance(c.tag, str)]) != 1:
        raise MitzAnswerError("Body holds more than the Response")
    results = []
    for child in body:
        if not isinstance(child.tag, str):
            continue
        if child.tag != qname(XACML_NS, "Result"):
            raise MitzAnswerError(f"unexpected element {child.tag} in Response")
        results.append(child)
    if len(results) != n_categories:
        raise MitzAnswerError(f"expected {n_categories} Result(s), got {len(results)}")
    decisions: list[Decision] = []
    for i, result in enumerate(results):
        for child in result:
            if isinstance(child.tag, str) and child.tag not in _RESULT_CHILDREN:
                raise MitzAnswerError(f"Result {i}: unexpected element {child.tag}")
        decision_els = result.findall(qname(XACML_NS, "Decision"))
        if len(decision_els) != 1:
            raise MitzAnswerError(f"Result {i}: exactly one Decision is required")
        text = decision_els[0].text or ""
        # Exact match: xs:string keeps whitespace, and "Permit " is not a value XACML defines.
        if text not in DECISIONS:
            raise MitzAnswerError(f"Result {i}: unknown Decision {text[:40]!r}")
        decision: Decision = text  # type: ignore[assignment]  # checked against DECISIONS above
        status_els = result.findall(qname(XACML_NS, "Status"))
        if len(status_els) > 1:
            raise MitzAnswerError(f"Result {i}: more than one Status")
        if status_els:
            code = status_els[0].find(qname(XACML_NS, "StatusCode"))
            if code is None or not code.get("Value"):
                raise MitzAnswerError(f"Result {i}: Status without StatusCode Value")
            if decision == "Permit" and code.get("Value") != STATUS_OK:
                raise MitzAnswerError(f"Result {i}: Permit with a non-ok status")
        if decision == "Permit" and result.find(qname(XACML_NS, "Obligations")) is not None:
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
