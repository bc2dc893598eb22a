"""The Mitz open question (XCPD ITI-56 PatientLocationQuery): "where does this patient's data live?"

A requester asks it with its XUA assertion in ``wsse:Security`` (mitz.md §3); the answer steers which
communities DUO asks with ITI-38, so it is read strictly and one malformed location distrusts all.
The assertion itself is built and read with the shared vocabulary of :mod:`duo_gateway.saml`; what is
Mitz's own here is the audience, the bearer/X509 profile the simulator insists on, and the XCPD body.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Final

from lxml import etree

from duo_gateway.bsn import BSN_OID, NLMINBIZA
from duo_gateway.mitz.codec import (
    MitzAnswerError,
    MitzError,
    MitzFault,
    MitzRequestError,
    MitzSecurityError,
    as_envelope,
    bare_oid,
    is_oid,
    parse_time,
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
    ATTR_ROLE,
    HL7_NS,
    ORG_TYPE_OID,
    PURPOSE_OID,
    PURPOSES,
    ROLE_OID,
    SAML_BEARER,
    SAML_NS,
    SAML_X509,
    URA_OID,
    UZI_OID,
    WSSE_NS,
    WSU_NS,
    SamlError,
    build_xua_assertion,
    hl7_type,
    single_attribute_values,
)
from duo_gateway.soap.envelope import (
    SOAP11_NS,
    SOAP12_NS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    new_message_id,
    parse_envelope,
)
from duo_gateway.soap.xml import XmlError, parse_xml, qname, to_bytes

XCPD_NS: Final = "urn:ihe:iti:xcpd:2009"
OPEN_ACTION: Final = "urn:ihe:iti:2009:PatientLocationQuery"
OPEN_RESPONSE_ACTION: Final = "urn:ihe:iti:2009:PatientLocationQueryResponse"
OPEN_PATH: Final = "openautorisatievraag"
#: The Audience of the assertion sent with the open question.
MITZ_AUDIENCE: Final = "urn:oid:2.16.840.1.113883.2.4.3.111.2.1"

#: The attributes an open question's assertion may carry; the simulator refuses any other.
_KNOWN_ATTRIBUTES: Final = frozenset({ATTR_PROVIDER_ID, ATTR_MANDATED, ATTR_ROLE, ATTR_PROVIDER_INSTITUTION,
                                      ATTR_CONSULTING_TYPE, ATTR_PURPOSE})


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
        require_bsn(self.bsn)
        for name in ("requester_uzi", "requester_role", "requester_ura", "requester_type", "issuer"):
            require_text(name, getattr(self, name))
        require_ura("requester_ura", self.requester_ura)
        if self.purpose not in PURPOSES:
            raise MitzRequestError("purpose must be TREAT or COC")
        if self.mandated_uzi is not None:
            require_text("mandated_uzi", self.mandated_uzi)


def build_assertion(q: OpenQuestion, now: datetime, assertion_id: str | None = None) -> etree._Element:
    """The unsigned XUA assertion B365 sends with the open question (signing is UNVERIFIED, §3)."""
    return build_xua_assertion(issuer=q.issuer, uzi=q.requester_uzi, role=q.requester_role,
                               ura=q.requester_ura, org_type=q.requester_type, purpose=q.purpose,
                               mandated_uzi=q.mandated_uzi, now=now, audience=MITZ_AUDIENCE,
                               assertion_id=assertion_id)


def build_open_question(q: OpenQuestion, to_url: str, message_id: str, now: datetime,
                        assertion_id: str | None = None) -> bytes:
    """XCPD PatientLocationQuery with the assertion in a mustUnderstand wsse:Security header."""
    security = etree.Element(qname(WSSE_NS, "Security"), nsmap={"wsse": WSSE_NS, "wsu": WSU_NS})
    security.set(qname(SOAP12_NS, "mustUnderstand"), "1")
    security.append(build_assertion(q, now, assertion_id))
    body = etree.Element(qname(XCPD_NS, "PatientLocationQueryRequest"), nsmap={None: XCPD_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    pid = etree.SubElement(body, qname(XCPD_NS, "RequestedPatientId"))
    pid.set("root", BSN_OID)
    pid.set("extension", q.bsn)
    pid.set("assigningAuthorityName", NLMINBIZA)
    return to_bytes(request_envelope(OPEN_ACTION, message_id, to_url, body, security))


def _one(parent: etree._Element, path: str, what: str, exc: type[MitzError]) -> etree._Element:
    found = parent.findall(path)
    if len(found) != 1:
        raise exc(f"exactly one {what} is required, found {len(found)}")
    return found[0]


def _saml_hl7(values: Mapping[str, etree._Element], name: str, local: str, xsi_type: str,
              key: str, key_value: str, required: bool = True) -> str | None:
    el = values.get(name)
    if el is None:
        if required:
            raise MitzSecurityError(f"assertion lacks attribute {name}")
        return None
    if el.tag != qname(HL7_NS, local) or hl7_type(el) != xsi_type:
        raise MitzSecurityError(f"assertion attribute {name} must be hl7 {local} of xsi:type {xsi_type}")
    if el.get(key) != key_value:
        raise MitzSecurityError(f"assertion attribute {name}: {key} must be {key_value}")
    return require_text(name, el.get("extension" if xsi_type == "II" else "code"), MitzSecurityError)


def parse_open_question(data: bytes | Envelope, now: datetime | None = None,
                        clock_skew: timedelta = timedelta(seconds=60)) -> OpenQuestion:
    """The simulator's side. With ``now``, an assertion outside its validity window is refused."""
    env = as_envelope(data, MitzRequestError)
    require_action(env, OPEN_ACTION, MitzRequestError)
    security = env.header(WSSE_NS, "Security")
    if security is None:
        raise MitzSecurityError("wsse:Security header with the XUA assertion is required")
    assertion = _one(security, qname(SAML_NS, "Assertion"), "saml2:Assertion", MitzSecurityError)
    if assertion.get("Version") != "2.0" or not assertion.get("ID"):
        raise MitzSecurityError("assertion must be SAML 2.0 with an ID")
    issuer = _one(assertion, qname(SAML_NS, "Issuer"), "Issuer", MitzSecurityError).text
    confirmation = _one(assertion, f"{qname(SAML_NS, 'Subject')}/{qname(SAML_NS, 'SubjectConfirmation')}",
                        "Subject/SubjectConfirmation", MitzSecurityError)
    if confirmation.get("Method") != SAML_BEARER:
        raise MitzSecurityError("SubjectConfirmation must be bearer")
    conditions = _one(assertion, qname(SAML_NS, "Conditions"), "Conditions", MitzSecurityError)
    audiences = [a.text for a in conditions.iter(qname(SAML_NS, "Audience"))]
    if audiences != [MITZ_AUDIENCE]:
        raise MitzSecurityError("Audience must be Mitz")
    not_before = parse_time(conditions.get("NotBefore"), "NotBefore", MitzSecurityError)
    not_after = parse_time(conditions.get("NotOnOrAfter"), "NotOnOrAfter", MitzSecurityError)
    if not_after <= not_before:
        raise MitzSecurityError("assertion validity window is empty")
    if now is not None and not (not_before - clock_skew <= now < not_after + clock_skew):
        raise MitzSecurityError("assertion is not valid now")
    class_ref = assertion.findtext("/".join(
        qname(SAML_NS, n) for n in ("AuthnStatement", "AuthnContext", "AuthnContextClassRef")))
    if class_ref != SAML_X509:
        raise MitzSecurityError("AuthnContextClassRef must be X509")
    stmt = _one(assertion, qname(SAML_NS, "AttributeStatement"), "AttributeStatement", MitzSecurityError)
    names = {attr.get("Name") or "" for attr in stmt.findall(qname(SAML_NS, "Attribute"))}
    if names - _KNOWN_ATTRIBUTES:
        raise MitzSecurityError(f"unexpected assertion attributes {sorted(names - _KNOWN_ATTRIBUTES)}")
    try:
        values = single_attribute_values([stmt], _KNOWN_ATTRIBUTES)
    except SamlError as exc:
        raise MitzSecurityError(str(exc)) from exc
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
    if body is None or body.tag != qname(XCPD_NS, "PatientLocationQueryRequest"):
        raise MitzRequestError("Body must hold a PatientLocationQueryRequest")
    pid = _one(body, qname(XCPD_NS, "RequestedPatientId"), "RequestedPatientId", MitzRequestError)
    if pid.get("root") != BSN_OID:
        raise MitzRequestError("RequestedPatientId root must be the BSN OID")
    if pid.get("assigningAuthorityName") != NLMINBIZA:
        raise MitzRequestError("RequestedPatientId must carry assigningAuthorityName NLMINBIZA")
    return OpenQuestion(
        bsn=require_text("RequestedPatientId extension", pid.get("extension")),
        requester_uzi=uzi,
        requester_role=role,
        requester_ura=ura,
        requester_type=org_type,
        issuer=require_text("Issuer", issuer, MitzSecurityError),
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
    body = etree.Element(qname(XCPD_NS, "PatientLocationQueryResponse"), nsmap={None: XCPD_NS})  # type: ignore[dict-item]  # lxml-stubs lack None
    for loc in locations:
        plr = etree.SubElement(body, qname(XCPD_NS, "PatientLocationResponse"))
        etree.SubElement(plr, qname(XCPD_NS, "HomeCommunityId")).text = loc.home_community_id
        cpid = etree.SubElement(plr, qname(XCPD_NS, "CorrespondingPatientId"))
        cpid.set("root", loc.patient_root)
        cpid.set("extension", loc.patient_extension)
        if loc.patient_root == BSN_OID:
            cpid.set("assigningAuthorityName", NLMINBIZA)
        etree.SubElement(plr, qname(XCPD_NS, "SourceId")).text = loc.source_id
        author = etree.SubElement(plr, qname(XCPD_NS, "author-institution"))
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
        if root.tag == qname(SOAP11_NS, "Envelope"):
            raise MitzAnswerError("answer is a SOAP 1.1 envelope")
        env = parse_envelope(root)
    except SoapFault as fault:
        raise MitzFault(fault.code, fault.reason[:300]) from fault
    except XmlError as exc:
        raise MitzAnswerError(str(exc)[:300]) from exc
    require_action(env, OPEN_RESPONSE_ACTION, MitzAnswerError)
    if env.addressing.relates_to != expected_relates_to:
        raise MitzAnswerError("wsa:RelatesTo does not match the question's MessageID")
    body = env.body
    if body is None or body.tag != qname(XCPD_NS, "PatientLocationQueryResponse"):
        raise MitzAnswerError("Body must hold a PatientLocationQueryResponse")
    locations: list[Location] = []
    for i, plr in enumerate(c for c in body if isinstance(c.tag, str)):
        if plr.tag != qname(XCPD_NS, "PatientLocationResponse"):
            raise MitzAnswerError(f"unexpected element {plr.tag} in PatientLocationQueryResponse")
        where = f"PatientLocationResponse {i}"
        hcid = (_one(plr, qname(XCPD_NS, "HomeCommunityId"), f"{where} HomeCommunityId", MitzAnswerError).text
                or "").strip()
        if not hcid.startswith("urn:oid:") or not is_oid(bare_oid(hcid)):
            raise MitzAnswerError(f"{where}: HomeCommunityId must be urn:oid:<OID>")
        cpid = _one(plr, qname(XCPD_NS, "CorrespondingPatientId"), f"{where} CorrespondingPatientId",
                    MitzAnswerError)
        patient_root = require_text(f"{where} CorrespondingPatientId root", cpid.get("root"),
                                     MitzAnswerError)
        patient_ext = require_text(f"{where} CorrespondingPatientId extension", cpid.get("extension"),
                                    MitzAnswerError)
        source_id = (_one(plr, qname(XCPD_NS, "SourceId"), f"{where} SourceId", MitzAnswerError).text
                     or "").strip()
        if not is_oid(bare_oid(source_id)):
            raise MitzAnswerError(f"{where}: SourceId must be an OID")
        author = _one(plr, qname(XCPD_NS, "author-institution"), f"{where} author-institution",
                      MitzAnswerError)
        if author.get("root") != URA_OID:
            raise MitzAnswerError(f"{where}: author-institution root must be the URA OID")
        holder_ura = require_text(f"{where} author-institution extension", author.get("extension"),
                                   MitzAnswerError)
        require_ura(f"{where} author-institution extension", holder_ura, MitzAnswerError)
        locations.append(Location(home_community_id=hcid, source_id=source_id, patient_root=patient_root,
                                  patient_extension=patient_ext, holder_ura=holder_ura))
    return locations
