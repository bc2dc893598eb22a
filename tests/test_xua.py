"""XUA: the NIST must-fault cases, independent signers, wrapping attacks, clock edges, the golden token,
and the trust that is pinned per issuer (who may sign, for whom, in which role).

Every refused case re-signs the assertion *after* planting its one defect, so the fault can only come
from that defect, and every refusal asserts both the wsse subcode and the reason. The envelopes go
through bytes and the project's hardened parser, as a peer's request would.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime as dt
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml.signer import XMLSigner

from duo_gateway import saml, xmldsig
from duo_gateway.config.access import CertificateMatch, XcaPeer
from duo_gateway.config.xua import IMAGING_ROLES, XuaConfig
from duo_gateway.mitz.codec import MitzRequestError
from duo_gateway.soap.envelope import (
    SOAP12_NS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    build_fault,
    element_bytes,
    parse_envelope,
)
from duo_gateway.soap.xml import XSI_NS, XmlError, parse_xml, to_bytes
from duo_gateway.xmldsig import DS_NS, EXC_C14N, SAML_ID, PrivateKey, TrustStore, load_signing_pair
from duo_gateway.xua import (
    AUTHZ_DECISION_REFUSED,
    Claims,
    Requester,
    issue_assertion,
    peer_trust,
    security_header,
    security_header_bytes,
    validate_assertion,
    validate_xua,
)
from tests.support.pki import CertPair, Pki, make_pki
from tests.support.xua_variants import authz_consent

FIXTURES = Path(__file__).parent / "fixtures" / "xua"
AUDIENCE = "urn:oid:2.16.528.1.1007.99.1"
ISSUER = "urn:oid:2.16.528.1.1007.99.9999"
ITI38 = "urn:ihe:iti:2007:CrossGatewayQuery"
QUERY_NS = "urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
NS = {"saml2": saml.SAML_NS, "ds": DS_NS, "wsse": saml.WSSE_NS, "wsu": saml.WSU_NS, "h": saml.HL7_NS,
      "s": SOAP12_NS}
CLAIMS = Claims(uzi="000095254", role="01.039", ura="00000666", purpose="TREAT", organisation_type="V6")
#: The tables below test the assertion alone, in a Security header without a Timestamp; the Timestamp
#: a real message must carry (``require_timestamp``, on by default) has tests of its own.
CFG = XuaConfig(required=True, audiences=[AUDIENCE], clock_skew_s=60.0, max_lifetime_s=3600.0,
                require_timestamp=False)

Signer = tuple[PrivateKey, list[x509.Certificate]]
Mutation = Callable[[etree._Element], None]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("xua-pki"), key_type="rsa")


@pytest.fixture(scope="module")
def signer(pki: Pki) -> Signer:
    return load_signing_pair(pki.client.key, pki.client.cert)


@pytest.fixture(scope="module")
def store(pki: Pki) -> TrustStore:
    """The issuer's pinned signing certificate: what ``[[clients.xca]] signing_certs`` gives."""
    return TrustStore.from_pem_files([pki.client.cert], pinned=True)


@pytest.fixture
def now() -> dt.datetime:
    # Whole seconds, so boundaries computed from the millisecond SAML times are exact. The throwaway
    # PKI is valid from five minutes ago, which bounds how far back a test may move the clock.
    return dt.datetime.now(dt.UTC).replace(microsecond=0)


def attr_value(a: etree._Element, name: str) -> etree._Element:
    found = a.findall(f"saml2:AttributeStatement/saml2:Attribute[@Name='{name}']/saml2:AttributeValue", NS)
    assert len(found) == 1
    return found[0][0]


def build(now: dt.datetime, mutate: Mutation | None = None, *, sign: Signer | None = None,
          lifetime_s: float = 600, audience: str = AUDIENCE, digest: xmldsig.DigestName = "sha256",
          claims: Claims = CLAIMS, bsn: str | None = None, assertion_id: str = "_a1") -> etree._Element:
    """An assertion in our vocabulary, with ``mutate`` applied *before* signing."""
    a = saml.build_xua_assertion(issuer=ISSUER, uzi=claims.uzi, role=claims.role, ura=claims.ura,
                                 org_type=claims.organisation_type, purpose=claims.purpose, now=now,
                                 audience=audience, validity=dt.timedelta(seconds=lifetime_s),
                                 mandated_uzi=claims.mandated_uzi, patient_bsn=bsn, assertion_id=assertion_id)
    if mutate is not None:
        mutate(a)
    if sign is not None:
        xmldsig.sign(a, a, sign[0], sign[1], digest=digest, id_attribute=SAML_ID, position=1)
    return a


def envelope(*security_children: etree._Element, extra_headers: list[etree._Element] | None = None,
             body_extra: etree._Element | None = None, security: bool = True) -> Envelope:
    """A parsed ITI-38 request with the given Security contents (copied, so callers keep theirs)."""
    headers: list[etree._Element] = []
    if security:
        sec = etree.Element(f"{{{saml.WSSE_NS}}}Security", nsmap={"wsse": saml.WSSE_NS, "wsu": saml.WSU_NS})
        sec.set(f"{{{SOAP12_NS}}}mustUnderstand", "1")
        for child in security_children:
            sec.append(copy.deepcopy(child))
        headers.append(sec)
    headers.extend(extra_headers or [])
    body = etree.Element(f"{{{QUERY_NS}}}AdhocQueryRequest", nsmap={"query": QUERY_NS})
    if body_extra is not None:
        body.append(copy.deepcopy(body_extra))
    env = build_envelope(Addressing(action=ITI38, message_id="urn:uuid:1", to="https://duo.test/xca"),
                         body, headers)
    return parse_envelope(to_bytes(env))


def wrapped(security_el: etree._Element) -> Envelope:
    body = etree.Element(f"{{{QUERY_NS}}}AdhocQueryRequest", nsmap={"query": QUERY_NS})
    env = build_envelope(Addressing(action=ITI38, message_id="urn:uuid:1"), body, [security_el])
    return parse_envelope(to_bytes(env))


def validate(env: Envelope, store: TrustStore, now: dt.datetime, cfg: XuaConfig = CFG,
             issuer: str = ISSUER) -> Requester | None:
    return validate_xua(env, cfg, issuer=issuer, trusted=store, audiences=[AUDIENCE], now=now)


def refused(env: Envelope, store: TrustStore, now: dt.datetime, subcode: str, reason: str,
            cfg: XuaConfig = CFG, issuer: str = ISSUER) -> SoapFault:
    with pytest.raises(SoapFault) as info:
        validate(env, store, now, cfg, issuer)
    fault = info.value
    assert (fault.code, fault.subcode) == ("Sender", (saml.WSSE_NS, subcode)), fault.reason
    assert re.search(reason, fault.reason), fault.reason
    return fault


def self_signed(cn: str, key: rsa.RSAPrivateKey, not_before: dt.datetime, not_after: dt.datetime,
                serial: int | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))


# --------------------------------------------------------------------------------------------------
# The happy path, both directions
# --------------------------------------------------------------------------------------------------


def test_issued_assertion_validates_into_the_requester(signer: Signer, store: TrustStore,
                                                       now: dt.datetime) -> None:
    claims = Claims(uzi="000095254", role="01.039", ura="00000666", purpose="COC", organisation_type="V6",
                    mandated_uzi="000011111")
    a = issue_assertion(claims, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now,
                        subject_bsn="900186021", assertion_id="_issued")
    with_coc = CFG.model_copy(update={"purposes": ["TREAT", "COC"]})
    requester = validate(wrapped(security_header(a, now)), store, now, with_coc)
    assert requester == Requester(
        uzi="000095254", role="01.039", ura="00000666", purpose="COC", organisation_type="V6",
        mandated_uzi="000011111", issuer=ISSUER, assertion_id="_issued", issue_instant=now,
        not_on_or_after=now + dt.timedelta(minutes=10), subject=None, patient_bsn="900186021",
        signer="CN=client")


def test_issued_assertion_has_the_twiin_shape(signer: Signer, now: dt.datetime) -> None:
    a = issue_assertion(CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now)
    children = [etree.QName(c).localname for c in a]
    # Signature right after Issuer, as the SAML schema orders it.
    assert children == ["Issuer", "Signature", "Subject", "Conditions", "AuthnStatement",
                        "AttributeStatement"]
    assert a.findtext("saml2:Conditions/saml2:AudienceRestriction/saml2:Audience", namespaces=NS) == AUDIENCE
    conditions = a.find("saml2:Conditions", NS)
    assert conditions is not None
    ten_minutes_on = (now + dt.timedelta(minutes=10)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert (conditions.get("NotBefore"), conditions.get("NotOnOrAfter")) == (
        now.strftime("%Y-%m-%dT%H:%M:%S.000Z"), ten_minutes_on)
    confirmation = a.find("saml2:Subject/saml2:SubjectConfirmation", NS)
    assert confirmation is not None and confirmation.get("Method") == saml.SAML_BEARER
    ura = attr_value(a, saml.ATTR_PROVIDER_INSTITUTION)
    assert {k: ura.get(k) for k in ura.keys()} == {
        f"{{{XSI_NS}}}type": "II", "root": saml.URA_OID, "extension": "00000666"}


def test_a_peer_s_assertion_for_several_audiences_is_accepted_by_each_of_them_only(
        signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """Another gateway may name several audiences in one restriction (SAML core §2.5.1.4: any of
    them). DUO never issues one (a bearer token naming several gateways is replayable between them),
    so it is built here the way such a peer would."""
    others = ["urn:oid:2.16.528.1.1007.99.20002", "urn:oid:2.16.528.1.1007.99.20003"]
    a = saml.build_xua_assertion(
        issuer=ISSUER, uzi=CLAIMS.uzi, role=CLAIMS.role, ura=CLAIMS.ura, org_type=CLAIMS.organisation_type,
        purpose=CLAIMS.purpose, now=now, audience=AUDIENCE, validity=dt.timedelta(minutes=10))
    (restriction,) = a.findall("saml2:Conditions/saml2:AudienceRestriction", NS)
    for extra in others:
        etree.SubElement(restriction, f"{{{saml.SAML_NS}}}Audience").text = extra
    xmldsig.sign(a, a, signer[0], signer[1], id_attribute=SAML_ID, position=1)
    env = envelope(a)
    for audience in (AUDIENCE, *others):
        requester = validate_xua(env, CFG, issuer=ISSUER, trusted=store, audiences=[audience], now=now)
        assert requester is not None and requester.uzi == CLAIMS.uzi
    with pytest.raises(SoapFault, match="is not accepted by this gateway") as refused_elsewhere:
        validate_xua(env, CFG, issuer=ISSUER, trusted=store, audiences=["urn:oid:2.16.528.1.1007.99.20004"],
                     now=now)
    assert refused_elsewhere.value.subcode == (saml.WSSE_NS, "FailedAuthentication")
    for empty in ("", " "):
        with pytest.raises(ValueError, match="audience"):
            issue_assertion(CLAIMS, issuer=ISSUER, audience=empty, key=signer[0], cert=signer[1], now=now)


def test_security_header_shape_and_the_callers_assertion_stays_put(signer: Signer, now: dt.datetime) -> None:
    a = issue_assertion(CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now)
    holder = etree.Element("holder")
    holder.append(a)
    sec = security_header(a, now, ttl_s=120)
    assert a.getparent() is holder
    assert sec.get(f"{{{SOAP12_NS}}}mustUnderstand") == "1"
    assert sec.findtext("wsu:Timestamp/wsu:Created", namespaces=NS) == now.strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert sec.findtext("wsu:Timestamp/wsu:Expires", namespaces=NS) == (
        now + dt.timedelta(minutes=2)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
    assert [etree.QName(c).localname for c in sec] == ["Timestamp", "Assertion"]


def test_security_header_bytes_splice_a_kept_assertion_into_what_lxml_would_build(
        signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """A reused assertion is kept as bytes; spliced into a new Security header it must be the header
    lxml builds, canonically, and still verify at a receiver."""
    a = issue_assertion(CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now)
    spliced = security_header_bytes(element_bytes(a), now, ttl_s=120)

    def c14n(el: etree._Element) -> bytes:
        return etree.tostring(el, method="c14n", exclusive=True)

    assert c14n(etree.fromstring(spliced)) == c14n(security_header(a, now, ttl_s=120))
    requester = validate(wrapped(etree.fromstring(spliced)), store, now)
    assert requester is not None and requester.uzi == CLAIMS.uzi
    with pytest.raises(ValueError, match="timezone"):
        security_header_bytes(element_bytes(a), now.replace(tzinfo=None))


def test_claims_are_checked_before_anything_is_issued(signer: Signer, now: dt.datetime) -> None:
    with pytest.raises(ValueError, match="URA"):
        Claims(uzi="000095254", role="01.039", ura="666", purpose="TREAT")
    with pytest.raises(ValueError, match="purposeofuse"):
        Claims(uzi="000095254", role="01.039", ura="00000666", purpose="OPERATIONS")
    with pytest.raises(ValueError, match="11-proef"):
        issue_assertion(CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now,
                        subject_bsn="123456789")


def test_requester_becomes_the_mitz_closed_question(signer: Signer, store: TrustStore,
                                                    now: dt.datetime) -> None:
    no_type = Claims(uzi="000095254", role="01.039", ura="00000666")
    requester = validate(envelope(build(now, sign=signer, claims=no_type)), store, now)
    assert requester is not None and requester.organisation_type is None
    q = requester.closed_question(bsn="900186021", holder_ura="00000659", holder_type="V6",
                                  categories=("GGC002",), requester_type="V4")
    assert (q.requester_uzi, q.requester_role, q.requester_ura, q.requester_type, q.purpose) == (
        "000095254", "01.039", "00000666", "V4", "TREAT")
    with pytest.raises(MitzRequestError, match="requester_type"):
        requester.closed_question(bsn="900186021", holder_ura="00000659", holder_type="V6",
                                  categories=("GGC002",))
    typed = validate(envelope(build(now, sign=signer)), store, now)
    assert typed is not None
    assert typed.closed_question(bsn="900186021", holder_ura="00000659", holder_type="V6",
                                 categories=("GGC002",), requester_type="V4").requester_type == "V6"


# --------------------------------------------------------------------------------------------------
# NIST must-fault cases (xca.md §11) and their Gazelle interpretations
# --------------------------------------------------------------------------------------------------


def _drop(path: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = a.find(path, NS)
        assert el is not None, path
        parent = el.getparent()
        assert parent is not None
        parent.remove(el)
    return mutate


def _set(path: str, attribute: str, value: str | None) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = a if path == "." else a.find(path, NS)
        assert el is not None, path
        if value is None:
            del el.attrib[attribute]
        else:
            el.set(attribute, value)
    return mutate


def _duplicate(path: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = a.find(path, NS)
        assert el is not None, path
        el.addnext(copy.deepcopy(el))
    return mutate


def _text(path: str, value: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = a.find(path, NS)
        assert el is not None, path
        el.text = value
    return mutate


def _plain(path: str, value: str) -> Mutation:
    """An untyped xs:string value instead of the hl7 element."""
    def mutate(a: etree._Element) -> None:
        el = a.find(path, NS)
        assert el is not None, path
        for child in list(el):
            el.remove(child)
        el.text = value
    return mutate


def _add(path: str, local: str) -> Mutation:
    def mutate(a: etree._Element) -> None:
        el = a.find(path, NS)
        assert el is not None, path
        etree.SubElement(el, f"{{{saml.SAML_NS}}}{local}")
    return mutate


def _attr(name: str) -> str:
    return f"saml2:AttributeStatement/saml2:Attribute[@Name='{name}']"


def _hl7(name: str) -> str:
    return f"{_attr(name)}/saml2:AttributeValue/*"


CLASS_REF = "saml2:AuthnStatement/saml2:AuthnContext/saml2:AuthnContextClassRef"
NOT_SIGNED = "the assertion is not signed"

CASES: list[tuple[str, Mutation, str, str]] = [
    # _invalidauthnstatement
    ("no-authn-statement", _drop("saml2:AuthnStatement"), "InvalidSecurityToken",
     "exactly one AuthnStatement, found 0"),
    ("two-authn-statements", _duplicate("saml2:AuthnStatement"), "InvalidSecurityToken",
     "exactly one AuthnStatement, found 2"),
    ("no-authn-instant", _set("saml2:AuthnStatement", "AuthnInstant", None), "InvalidSecurityToken",
     "AuthnInstant is missing"),
    ("no-class-ref", _drop(CLASS_REF), "InvalidSecurityToken", "exactly one AuthnContextClassRef"),
    ("invalid-class-ref", _text(CLASS_REF, "urn:oasis:names:tc:SAML:2.0:ac:classes:Invalid"),
     "FailedAuthentication", "authentication class .*:Invalid is not accepted"),
    # _secondauthncontext: literally a second context, and Gazelle's reading (InternetProtocol)
    ("second-authn-context", _duplicate("saml2:AuthnStatement/saml2:AuthnContext"), "InvalidSecurityToken",
     "AuthnStatement must hold exactly one AuthnContext, found 2"),
    ("second-class-ref", _duplicate(CLASS_REF), "InvalidSecurityToken", "exactly one AuthnContextClassRef"),
    ("internet-protocol-class", _text(CLASS_REF, "urn:oasis:names:tc:SAML:2.0:ac:classes:InternetProtocol"),
     "FailedAuthentication", "InternetProtocol is not accepted"),
    # _secondrole
    ("second-role-attribute", _duplicate(_attr(saml.ATTR_ROLE)), "InvalidSecurityToken",
     "subject:role appears 2 times"),
    ("second-role-value", _duplicate(f"{_attr(saml.ATTR_ROLE)}/saml2:AttributeValue"), "InvalidSecurityToken",
     "subject:role must have exactly one AttributeValue, found 2"),
    ("role-outside-rolecodenl", _set(_hl7(saml.ATTR_ROLE), "codeSystem", "2.16.840.1.113883.6.96"),
     "FailedAuthentication", "subject:role must use code system 2.16.840.1.113883.2.4.15.111"),
    # _secondpurposeofuse
    ("second-purpose-attribute", _duplicate(_attr(saml.ATTR_PURPOSE)), "InvalidSecurityToken",
     "purposeofuse appears 2 times"),
    ("second-purpose-value", _duplicate(f"{_attr(saml.ATTR_PURPOSE)}/saml2:AttributeValue"),
     "InvalidSecurityToken", "purposeofuse must have exactly one AttributeValue"),
    ("purpose-not-for-mitz", _set(_hl7(saml.ATTR_PURPOSE), "code", "PUBLICHEALTH"), "FailedAuthentication",
     "purposeofuse 'PUBLICHEALTH' is not accepted"),
    # the other single-valued attributes
    ("second-uzi", _duplicate(_attr(saml.ATTR_PROVIDER_ID)), "InvalidSecurityToken",
     "provider-identifier appears 2 times"),
    ("second-ura", _duplicate(_attr(saml.ATTR_PROVIDER_INSTITUTION)), "InvalidSecurityToken",
     "provider-institution appears 2 times"),
    ("second-org-type", _duplicate(_attr(saml.ATTR_CONSULTING_TYPE)), "InvalidSecurityToken",
     "facility-type-code appears 2 times"),
    # required attributes
    ("no-uzi", _drop(_attr(saml.ATTR_PROVIDER_ID)), "InvalidSecurityToken",
     "lacks required attribute.*provider-identifier"),
    ("no-role", _drop(_attr(saml.ATTR_ROLE)), "InvalidSecurityToken",
     "lacks required attribute.*subject:role"),
    ("no-ura", _drop(_attr(saml.ATTR_PROVIDER_INSTITUTION)), "InvalidSecurityToken",
     "lacks required attribute.*provider-institution"),
    ("no-purpose", _drop(_attr(saml.ATTR_PURPOSE)), "InvalidSecurityToken",
     "lacks required attribute.*purposeofuse"),
    # malformed values
    ("ura-seven-digits", _set(_hl7(saml.ATTR_PROVIDER_INSTITUTION), "extension", "0000666"),
     "InvalidSecurityToken", r"URA\) must be eight digits"),
    ("ura-letters", _set(_hl7(saml.ATTR_PROVIDER_INSTITUTION), "extension", "0000066a"),
     "InvalidSecurityToken", r"URA\) must be eight digits"),
    ("ura-trailing-newline", _set(_hl7(saml.ATTR_PROVIDER_INSTITUTION), "extension", "00000666\n"),
     "InvalidSecurityToken", r"URA\) must be eight digits"),
    ("uzi-not-digits", _set(_hl7(saml.ATTR_PROVIDER_ID), "extension", "UZI-95254"), "InvalidSecurityToken",
     r"UZI\) must be digits"),
    ("uzi-arabic-indic-digits", _set(_hl7(saml.ATTR_PROVIDER_ID), "extension", "٠٩٥٢٥٤"),
     "InvalidSecurityToken", r"UZI\) must be digits"),
    ("uzi-wrong-root", _set(_hl7(saml.ATTR_PROVIDER_ID), "root", saml.URA_OID), "InvalidSecurityToken",
     "provider-identifier must have root 2.16.528.1.1007.3.1"),
    ("uzi-untyped", _set(_hl7(saml.ATTR_PROVIDER_ID), f"{{{XSI_NS}}}type", None), "InvalidSecurityToken",
     "provider-identifier must be an hl7 II"),
    ("role-empty", _set(_hl7(saml.ATTR_ROLE), "code", ""), "InvalidSecurityToken", "role code must be"),
    ("purpose-plain-string", _plain(f"{_attr(saml.ATTR_PURPOSE)}/saml2:AttributeValue", "TREAT"),
     "InvalidSecurityToken", "purposeofuse must hold one typed hl7 element"),
    # assertion basics
    ("version-1.9", _set(".", "Version", "1.9"), "InvalidSecurityToken", "Version must be 2.0, not '1.9'"),
    ("bad-issue-instant", _set(".", "IssueInstant", "testIssueInstant"), "InvalidSecurityToken",
     "IssueInstant is missing or not an xs:dateTime"),
    ("late-issue-instant", _set(".", "IssueInstant", "2117-06-16T14:03:18.064Z"), "InvalidSecurityToken",
     "issued in the future"),
    ("no-issuer", _drop("saml2:Issuer"), "InvalidSecurityToken", "exactly one Issuer, found 0"),
    ("no-subject", _drop("saml2:Subject"), "InvalidSecurityToken", "exactly one Subject, found 0"),
    ("sender-vouches", _set("saml2:Subject/saml2:SubjectConfirmation", "Method",
                            "urn:oasis:names:tc:SAML:2.0:cm:sender-vouches"),
     "InvalidSecurityToken", "bearer or holder-of-key SubjectConfirmation"),
    ("no-audience-restriction", _drop("saml2:Conditions/saml2:AudienceRestriction"), "FailedAuthentication",
     "no AudienceRestriction"),
    ("one-time-use", _add("saml2:Conditions", "OneTimeUse"), "InvalidSecurityToken",
     "condition OneTimeUse is not supported"),
    ("no-not-on-or-after", _set("saml2:Conditions", "NotOnOrAfter", None), "InvalidSecurityToken",
     "NotOnOrAfter is missing"),
    ("inverted-window", _set("saml2:Conditions", "NotBefore", "2999-01-01T00:00:00Z"), "InvalidSecurityToken",
     "NotOnOrAfter is not after NotBefore"),
]


@pytest.mark.parametrize(("mutate", "subcode", "reason"), [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_defect_is_refused(mutate: Mutation, subcode: str, reason: str, signer: Signer, store: TrustStore,
                           now: dt.datetime) -> None:
    refused(envelope(build(now, mutate, sign=signer)), store, now, subcode, reason)


def test_fault_goes_on_the_wire_as_soap12_sender_with_the_wsse_subcode(store: TrustStore,
                                                                       now: dt.datetime) -> None:
    """The shape of xca.md §11, as the peer (or NIST's tool) parses it back."""
    fault = refused(envelope(build(now)), store, now, "InvalidSecurityToken", NOT_SIGNED)
    wire_bytes = to_bytes(build_fault(fault, relates_to="urn:uuid:1"))
    root = parse_xml(wire_bytes)
    assert root.findtext("s:Body/s:Fault/s:Code/s:Value", namespaces=NS) == "s:Sender"
    with pytest.raises(SoapFault) as info:
        parse_envelope(wire_bytes)
    assert (info.value.code, info.value.subcode) == ("Sender", (saml.WSSE_NS, "InvalidSecurityToken"))
    assert info.value.reason == fault.reason


def test_positive_control_for_the_defect_table(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """The unmutated assertion passes; so each case above fails because of its own defect only."""
    assert validate(envelope(build(now, sign=signer)), store, now) is not None


def test_nist_expired(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    issued = now - dt.timedelta(minutes=4)
    env = envelope(build(issued, sign=signer, lifetime_s=60))
    refused(env, store, now, "MessageExpired", "the assertion expired at")


def test_nist_notyetvalid(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    env = envelope(build(now + dt.timedelta(minutes=10), sign=signer))
    refused(env, store, now, "InvalidSecurityToken", "is not valid before")


def test_nist_unsigned(store: TrustStore, now: dt.datetime) -> None:
    refused(envelope(build(now)), store, now, "InvalidSecurityToken", NOT_SIGNED)


def test_nist_unknownaudience(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    env = envelope(build(now, sign=signer, audience="http://ihe.unknown.xua/X-ServiceProvider-IHE-Unknown"))
    refused(env, store, now, "FailedAuthentication",
            "audience http://ihe.unknown.xua/X-ServiceProvider-IHE-Unknown is not accepted")


def test_every_audience_restriction_must_be_met(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    def second_restriction(a: etree._Element) -> None:
        conditions = a.find("saml2:Conditions", NS)
        assert conditions is not None
        extra = etree.SubElement(conditions, f"{{{saml.SAML_NS}}}AudienceRestriction")
        etree.SubElement(extra, f"{{{saml.SAML_NS}}}Audience").text = "urn:oid:1.2.3.elsewhere"
    refused(envelope(build(now, second_restriction, sign=signer)), store, now, "FailedAuthentication",
            "urn:oid:1.2.3.elsewhere is not accepted")


def test_lifetime_longer_than_configured_is_refused(signer: Signer, store: TrustStore,
                                                    now: dt.datetime) -> None:
    env = envelope(build(now, sign=signer, lifetime_s=3601))
    refused(env, store, now, "InvalidSecurityToken", "valid for 3601 s, longer than the accepted 3600 s")
    assert validate(envelope(build(now, sign=signer, lifetime_s=3600)), store, now) is not None


def test_invalid_bsn_in_resource_id_is_refused_without_echoing_it(signer: Signer, store: TrustStore,
                                                                  now: dt.datetime) -> None:
    env = envelope(build(now, _set(_hl7(saml.ATTR_RESOURCE_ID), "extension", "123456789"), sign=signer,
                         bsn="900186021"))
    fault = refused(env, store, now, "InvalidSecurityToken", "resource-id is not a valid BSN")
    assert "123456789" not in fault.reason


def test_unknown_attributes_are_ignored(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """International peers add XSPA attributes (subject-id, organization); they decide nothing here."""
    def xspa(a: etree._Element) -> None:
        stmt = a.find("saml2:AttributeStatement", NS)
        assert stmt is not None
        for _ in range(2):
            attr = etree.SubElement(stmt, f"{{{saml.SAML_NS}}}Attribute",
                                    Name="urn:oasis:names:tc:xspa:1.0:subject:subject-id")
            etree.SubElement(attr, f"{{{saml.SAML_NS}}}AttributeValue").text = "Dr. Jansen"
    assert validate(envelope(build(now, xspa, sign=signer)), store, now) is not None


# --------------------------------------------------------------------------------------------------
# Signatures: ours, signxml's, xmlsec1's; tampering; trust
# --------------------------------------------------------------------------------------------------


def test_tampering_after_signing_fails_the_check(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    a = build(now, sign=signer)
    attr_value(a, saml.ATTR_PROVIDER_INSTITUTION).set("extension", "00000999")
    refused(envelope(a), store, now, "FailedCheck", "DigestValue does not match")


def test_untrusted_signer_fails_authentication(pki: Pki, store: TrustStore, now: dt.datetime) -> None:
    rogue = load_signing_pair(pki.rogue_client.key, pki.rogue_client.cert)
    refused(envelope(build(now, sign=rogue)), store, now, "FailedAuthentication",
            "CN=rogue-client is not trusted")


def test_expired_signing_certificate_fails_authentication(now: dt.datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed("old-peer", key, now - dt.timedelta(days=30), now - dt.timedelta(days=1))
    refused(envelope(build(now, sign=(key, [cert]))), TrustStore((cert,), pinned=True), now,
            "FailedAuthentication", "signing certificate CN=old-peer expired at")


def test_two_signatures_are_refused(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    a = build(now, sign=signer)
    sig = a.find("ds:Signature", NS)
    assert sig is not None
    sig.addnext(copy.deepcopy(sig))
    refused(envelope(a), store, now, "InvalidSecurityToken", "carries 2 signatures")


def test_sha1_only_when_allowed(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    env = envelope(build(now, sign=signer, digest="sha1"))
    refused(env, store, now, "FailedCheck", "uses sha1, which is not allowed")
    assert validate(env, store, now, CFG.model_copy(update={"allow_sha1": True})) is not None


class _Sha1XMLSigner(XMLSigner):
    """signxml refuses SHA-1 by default; overriding its check is the documented escape hatch."""

    def check_deprecated_methods(self) -> None:
        return None


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_signxml_signed_assertion_validates(digest: str, signer: Signer, store: TrustStore,
                                            now: dt.datetime) -> None:
    cls = _Sha1XMLSigner if digest == "sha1" else XMLSigner
    signed = cls(signature_algorithm=f"rsa-{digest}", digest_algorithm=digest, c14n_algorithm=EXC_C14N).sign(
        build(now), key=signer[0], cert=[signer[1][0]], id_attribute="ID")
    # signxml appends the signature as the last child; position is not what makes it valid.
    assert etree.QName(signed[-1]).localname == "Signature"
    cfg = CFG.model_copy(update={"allow_sha1": digest == "sha1"})
    requester = validate(envelope(signed), store, now, cfg)
    assert requester is not None and requester.uzi == CLAIMS.uzi and requester.signer == "CN=client"


XMLSEC_TEMPLATE = """<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#">
  <ds:SignedInfo>
    <ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
    <ds:SignatureMethod Algorithm="http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"/>
    <ds:Reference URI="#{id}">
      <ds:Transforms>
        <ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>
        <ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#"/>
      </ds:Transforms>
      <ds:DigestMethod Algorithm="http://www.w3.org/2001/04/xmlenc#sha256"/>
      <ds:DigestValue/>
    </ds:Reference>
  </ds:SignedInfo>
  <ds:SignatureValue/>
  <ds:KeyInfo><ds:X509Data><ds:X509Certificate/></ds:X509Data></ds:KeyInfo>
</ds:Signature>"""


@pytest.fixture(scope="session")
def xmlsec1() -> str:
    path = shutil.which("xmlsec1")
    if path is None:
        msg = "xmlsec1 CLI not found (Debian package xmlsec1): the independent-signer checks did NOT run"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def xmlsec1_sign(xmlsec1: str, a: etree._Element, pki: Pki, tmp_path: Path) -> bytes:
    template = tmp_path / "template.xml"
    template.write_bytes(to_bytes(a))
    out = tmp_path / "signed.xml"
    result = subprocess.run([xmlsec1, "--sign", "--privkey-pem", f"{pki.client.key},{pki.client.cert}",
                             "--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion",
                             "--output", str(out), str(template)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return out.read_bytes()


def test_xmlsec1_signed_assertion_validates(signer: Signer, pki: Pki, store: TrustStore, xmlsec1: str,
                                            tmp_path: Path, now: dt.datetime) -> None:
    a = build(now)
    etree.indent(a)  # pretty-printed, as most peers' output is
    template = parse_xml(XMLSEC_TEMPLATE.format(id=a.get("ID")).encode())
    template.tail = "\n  "
    a.insert(1, template)
    signed = parse_xml(xmlsec1_sign(xmlsec1, a, pki, tmp_path))
    assert signed.findtext(".//ds:DigestValue", namespaces=NS), "xmlsec1 did not fill the template"
    requester = validate(envelope(signed), store, now)
    assert requester is not None and requester.ura == CLAIMS.ura
    # Control: the same xmlsec1 output with one attribute changed must not pass.
    attr_value(signed, saml.ATTR_PROVIDER_INSTITUTION).set("extension", "00000999")
    refused(envelope(signed), store, now, "FailedCheck", "DigestValue does not match")


def test_our_assertion_in_a_security_header_verifies_with_xmlsec1(
        signer: Signer, pki: Pki, xmlsec1: str, tmp_path: Path, now: dt.datetime) -> None:
    a = issue_assertion(CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=signer[0], cert=signer[1], now=now)
    body = etree.Element(f"{{{QUERY_NS}}}AdhocQueryRequest")
    path = tmp_path / "request.xml"
    path.write_bytes(to_bytes(build_envelope(Addressing(action=ITI38), body, [security_header(a, now)])))
    result = subprocess.run([xmlsec1, "--verify", "--trusted-pem", str(pki.ca_cert), "--id-attr:ID",
                             "urn:oasis:names:tc:SAML:2.0:assertion:Assertion", str(path)],
                            capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr


# --------------------------------------------------------------------------------------------------
# Signature wrapping: the assertion read must be the assertion signed
# --------------------------------------------------------------------------------------------------


def _forged(original: etree._Element, ura: str = "00000999", keep_id: bool = False) -> etree._Element:
    forged = copy.deepcopy(original)
    sig = forged.find("ds:Signature", NS)
    if sig is not None:
        forged.remove(sig)
    attr_value(forged, saml.ATTR_PROVIDER_INSTITUTION).set("extension", ura)
    if not keep_id:
        forged.set("ID", "_forged")
    return forged


@pytest.mark.parametrize("forged_first", [True, False], ids=["forged-before", "forged-after"])
def test_second_unsigned_assertion_next_to_the_signed_one(forged_first: bool, signer: Signer,
                                                          store: TrustStore, now: dt.datetime) -> None:
    signed = build(now, sign=signer)
    pair = (_forged(signed), signed) if forged_first else (signed, _forged(signed))
    refused(envelope(*pair), store, now, "InvalidSecurity", "exactly one saml2:Assertion, found 2")


@pytest.mark.parametrize("where", ["body", "other-header"])
def test_signed_assertion_moved_out_of_security(where: str, signer: Signer, store: TrustStore,
                                                now: dt.datetime) -> None:
    """The genuine token elsewhere in the message vouches for nothing inside Security."""
    signed = build(now, sign=signer)
    other = etree.Element("{urn:example:x}Extra")
    other.append(copy.deepcopy(signed))
    body_extra = other if where == "body" else None
    headers = [other] if where == "other-header" else None

    def with_forgery(forged: etree._Element) -> Envelope:
        return envelope(forged, body_extra=body_extra, extra_headers=headers)

    # Unsigned forgery with a fresh ID: refused as unsigned.
    refused(with_forgery(_forged(signed)), store, now, "InvalidSecurityToken", NOT_SIGNED)
    genuine_sig = signed.find("ds:Signature", NS)
    assert genuine_sig is not None
    # Forgery carrying the genuine signature and ID: the ID now occurs twice in the message.
    same_id = _forged(signed, keep_id=True)
    same_id.insert(1, copy.deepcopy(genuine_sig))
    refused(with_forgery(same_id), store, now, "FailedCheck", "is carried by 2 elements")
    # ... and with its own ID, the genuine signature points at the element outside Security.
    renamed = _forged(signed)
    renamed.insert(1, copy.deepcopy(genuine_sig))
    refused(with_forgery(renamed), store, now, "FailedCheck", "does not point at the expected element")
    # Control: the genuine assertion itself, in Security, with the same decoy placement, passes.
    decoy = etree.Element("{urn:example:x}Extra")
    requester = validate(envelope(signed, body_extra=decoy if where == "body" else None,
                                  extra_headers=[decoy] if where == "other-header" else None), store, now)
    assert requester is not None and requester.ura == CLAIMS.ura


def test_signed_assertion_hidden_in_advice(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    signed = build(now, sign=signer)
    outer = _forged(signed)
    etree.SubElement(outer, f"{{{saml.SAML_NS}}}Advice").append(copy.deepcopy(signed))
    refused(envelope(outer), store, now, "InvalidSecurity", "exactly one saml2:Assertion, found 2")


def test_two_security_headers_are_refused(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    sec = security_header(build(now, sign=signer), now)
    env = parse_envelope(to_bytes(build_envelope(Addressing(action=ITI38), None, [sec, copy.deepcopy(sec)])))
    refused(env, store, now, "InvalidSecurity", "2 wsse:Security headers")


def test_encrypted_assertion_is_refused(store: TrustStore, now: dt.datetime) -> None:
    refused(envelope(etree.Element(f"{{{saml.SAML_NS}}}EncryptedAssertion")), store, now,
            "InvalidSecurityToken", "encrypted assertions are not supported")


def test_dtd_and_entities_never_reach_the_validator(signer: Signer, now: dt.datetime) -> None:
    data = to_bytes(build_envelope(Addressing(action=ITI38), None, [security_header(build(now, sign=signer),
                                                                                    now)]))
    body = data.split(b"?>", 1)[1]
    assert f">{ISSUER}<".encode() in body
    body = body.replace(f">{ISSUER}<".encode(), b">&issuer;<")
    evil = f'<?xml version="1.0"?><!DOCTYPE s:Envelope [<!ENTITY issuer "{ISSUER}">]>'.encode() + body
    with pytest.raises(XmlError, match="DTD"):
        parse_envelope(evil)


# --------------------------------------------------------------------------------------------------
# Clock edges
# --------------------------------------------------------------------------------------------------


def test_expiry_is_exactly_at_not_on_or_after(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    env = envelope(build(now, sign=signer, lifetime_s=120))
    not_after = now + dt.timedelta(seconds=120)
    strict = CFG.model_copy(update={"clock_skew_s": 0.0})
    assert validate(env, store, not_after - dt.timedelta(milliseconds=1), strict) is not None
    refused(env, store, not_after, "MessageExpired", "expired at", strict)
    # With the default skew of 60 s, the token lives one skew longer, and not a millisecond more.
    assert validate(env, store, not_after + dt.timedelta(seconds=59, milliseconds=999), CFG) is not None
    refused(env, store, not_after + dt.timedelta(seconds=60), "MessageExpired", "expired at", CFG)


def test_not_before_with_skew(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    env = envelope(build(now, sign=signer))
    assert validate(env, store, now - dt.timedelta(seconds=60), CFG) is not None
    refused(env, store, now - dt.timedelta(seconds=60, milliseconds=1), "InvalidSecurityToken",
            "not valid before", CFG)


def test_naive_clock_is_a_programming_error(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        validate(envelope(build(now, sign=signer)), store, now.replace(tzinfo=None))


# --------------------------------------------------------------------------------------------------
# wsu:Timestamp
# --------------------------------------------------------------------------------------------------


def _timestamp(created: str | None, expires: str | None) -> etree._Element:
    stamp = etree.Element(f"{{{saml.WSU_NS}}}Timestamp")
    if created is not None:
        etree.SubElement(stamp, f"{{{saml.WSU_NS}}}Created").text = created
    if expires is not None:
        etree.SubElement(stamp, f"{{{saml.WSU_NS}}}Expires").text = expires
    return stamp


def _iso(t: dt.datetime) -> str:
    return t.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize(("created", "expires", "subcode", "reason"), [
    (-600, -120, "MessageExpired", "the message expired at"),
    (120, 400, "InvalidSecurity", "created in the future"),
    (0, 0, "InvalidSecurity", "Expires is not after Created"),
    (None, -61, "MessageExpired", "the message expired at"),
])
def test_timestamp_refusals(created: int | None, expires: int | None, subcode: str, reason: str,
                            signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    stamp = _timestamp(None if created is None else _iso(now + dt.timedelta(seconds=created)),
                       None if expires is None else _iso(now + dt.timedelta(seconds=expires)))
    refused(envelope(stamp, build(now, sign=signer)), store, now, subcode, reason)


def test_timestamp_malformed_or_doubled(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    a = build(now, sign=signer)
    refused(envelope(_timestamp("yesterday", None), a), store, now, "InvalidSecurity",
            "wsu:Timestamp/Created is missing or not an xs:dateTime")
    ok = _timestamp(_iso(now), _iso(now + dt.timedelta(minutes=5)))
    refused(envelope(ok, ok, a), store, now, "InvalidSecurity", "2 wsu:Timestamp elements")
    assert validate(envelope(ok, a), store, now) is not None


# --------------------------------------------------------------------------------------------------
# required / not required
# --------------------------------------------------------------------------------------------------


def test_required_without_header_or_assertion(store: TrustStore, now: dt.datetime) -> None:
    refused(envelope(security=False), store, now, "InvalidSecurity", "no wsse:Security header")
    refused(envelope(), store, now, "InvalidSecurity", "wsse:Security holds none")


def test_not_required_and_absent_is_anonymous(store: TrustStore, now: dt.datetime) -> None:
    optional = CFG.model_copy(update={"required": False})
    assert validate(envelope(security=False), store, now, optional) is None
    assert validate(envelope(_timestamp(_iso(now), None)), store, now, optional) is None


def test_not_required_but_present_is_still_checked(signer: Signer, store: TrustStore,
                                                   now: dt.datetime) -> None:
    optional = CFG.model_copy(update={"required": False})
    refused(envelope(build(now)), store, now, "InvalidSecurityToken", NOT_SIGNED, optional)
    refused(envelope(_timestamp(None, _iso(now - dt.timedelta(hours=1)))), store, now, "MessageExpired",
            "message expired", optional)
    assert validate(envelope(build(now, sign=signer)), store, now, optional) is not None


def test_peer_trust_pins_the_peers_signing_certificates_and_refuses_a_ca(pki: Pki) -> None:
    peer = XcaPeer(name="peer", certificate=CertificateMatch(absent=True), home_community_id="urn:oid:1.2.3",
                   issuer=ISSUER, signing_certs=[pki.client.cert])
    loaded = peer_trust(peer)
    assert loaded.pinned
    assert [c.subject.rfc4514_string() for c in loaded.certificates] == ["CN=client"]
    with pytest.raises(ValueError, match="CN=duo-test-ca is a CA certificate"):
        peer_trust(peer.model_copy(update={"signing_certs": [pki.ca_cert]}))


# --------------------------------------------------------------------------------------------------
# Trust pinned per issuer: who may sign, under which Issuer, in which role, for which patient
# --------------------------------------------------------------------------------------------------

OTHER_ISSUER = "urn:oid:6.6.6"


def issued_by_ca(pki: Pki, cn: str, usage: x509.KeyUsage | None = None, *, ca: bool = False) -> Signer:
    """A certificate the test CA issues, as it issues every TLS certificate of the network."""
    assert pki.ca_key is not None
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    ca_cert = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    builder = (x509.CertificateBuilder()
               .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
               .issuer_name(ca_cert.subject).public_key(key.public_key())
               .serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True))
    if usage is not None:
        builder = builder.add_extension(usage, critical=True)
    return key, [builder.sign(ca_key, hashes.SHA256())]


def _usage(*, digital_signature: bool, non_repudiation: bool) -> x509.KeyUsage:
    return x509.KeyUsage(digital_signature=digital_signature, content_commitment=non_repudiation,
                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                         key_cert_sign=False, crl_sign=False, encipher_only=False, decipher_only=False)


def _signed_with(pki_pair: CertPair) -> Signer:
    return load_signing_pair(pki_pair.key, pki_pair.cert)


def test_another_issuer_on_this_peers_connection_is_refused(pki: Pki, signer: Signer, store: TrustStore,
                                                           now: dt.datetime) -> None:
    """The attack of issue 11: a trusted peer's own key, signing under another Issuer (urn:oid:6.6.6)."""
    def other_issuer(a: etree._Element) -> None:
        issuer = a.find("saml2:Issuer", NS)
        assert issuer is not None
        issuer.text = OTHER_ISSUER

    refused(envelope(build(now, other_issuer, sign=signer)), store, now, "FailedAuthentication",
            r"assertion issuer 'urn:oid:6\.6\.6' is not the issuer of the calling peer")
    # The same assertion is refused on the connection of the peer that *is* urn:oid:6.6.6, too: the
    # signer is not pinned for that issuer (here: its store holds another certificate).
    other_store = TrustStore.from_pem_files([pki.server.cert], pinned=True)
    refused(envelope(build(now, other_issuer, sign=signer)), other_store, now, "FailedAuthentication",
            "CN=client is not trusted", issuer=OTHER_ISSUER)


@pytest.mark.parametrize("who", ["duo-server", "ca-issued", "ca-key", "rogue"])
def test_only_a_pinned_certificate_signs_for_the_issuer(who: str, pki: Pki, store: TrustStore,
                                                        now: dt.datetime) -> None:
    """A valid chain to the network's CA is not enough: DUO's own TLS key, any certificate the CA
    issued, the CA key itself and a foreign CA's certificate all sign nothing for this issuer."""
    signers: dict[str, tuple[Signer, str]] = {
        "duo-server": (_signed_with(pki.server),
                       r"CN=server is not trusted \(not one of the certificates pinned"),
        "ca-issued": (issued_by_ca(pki, "another-system"), "CN=another-system is not trusted"),
        "ca-key": (load_signing_pair(pki.ca_key or Path(), pki.ca_cert), "a CA certificate never signs"),
        "rogue": (_signed_with(pki.rogue_client), "CN=rogue-client is not trusted"),
    }
    signer, reason = signers[who]
    refused(envelope(build(now, sign=signer)), store, now, "FailedAuthentication", reason)


def test_a_pinned_store_refuses_ca_certificates(pki: Pki) -> None:
    with pytest.raises(ValueError, match="CN=duo-test-ca is a CA certificate"):
        TrustStore.from_pem_files([pki.ca_cert], pinned=True)
    # cA=true without keyCertSign is still a CA to a pinned store.
    _key, (half_ca,) = issued_by_ca(pki, "half-ca", _usage(digital_signature=True, non_repudiation=False),
                                   ca=True)
    with pytest.raises(ValueError, match="CN=half-ca is a CA certificate"):
        TrustStore((half_ca,), pinned=True)
    # The same certificates are fine in a CA-mode store (the Mitz request signature's kind of trust).
    assert TrustStore.from_pem_files([pki.ca_cert]).certificates


def test_pinned_signer_needs_digital_signature_in_its_key_usage(pki: Pki, now: dt.datetime) -> None:
    nr_only = issued_by_ca(pki, "nr-only", _usage(digital_signature=False, non_repudiation=True))
    refused(envelope(build(now, sign=nr_only)), TrustStore((nr_only[1][0],), pinned=True), now,
            "FailedAuthentication", "CN=nr-only has a KeyUsage without digitalSignature")
    ds = issued_by_ca(pki, "ds", _usage(digital_signature=True, non_repudiation=False))
    assert validate(envelope(build(now, sign=ds)), TrustStore((ds[1][0],), pinned=True), now) is not None


def test_a_second_pinned_certificate_signs_too(pki: Pki, signer: Signer, now: dt.datetime) -> None:
    """Key rollover: an issuer may have two pinned certificates at once, each accepted."""
    ds = issued_by_ca(pki, "next-key", _usage(digital_signature=True, non_repudiation=False))
    both = TrustStore((signer[1][0], ds[1][0]), pinned=True)
    assert validate(envelope(build(now, sign=signer)), both, now) is not None
    assert validate(envelope(build(now, sign=ds)), both, now) is not None


@pytest.mark.parametrize("role", ["99.999", "X", "01.013"])
def test_a_role_outside_the_allow_list_is_refused(role: str, signer: Signer, store: TrustStore,
                                                  now: dt.datetime) -> None:
    claims = Claims(uzi="000095254", role=role, ura="00000666", purpose="TREAT", organisation_type="V6")
    refused(envelope(build(now, sign=signer, claims=claims)), store, now, "FailedAuthentication",
            f"role '{re.escape(role)}' may not consult imaging here")
    allowed = CFG.model_copy(update={"roles": [*IMAGING_ROLES, role]})
    assert validate(envelope(build(now, sign=signer, claims=claims)), store, now, allowed) is not None


@pytest.mark.parametrize("role", IMAGING_ROLES)
def test_every_default_role_is_accepted(role: str, signer: Signer, store: TrustStore,
                                       now: dt.datetime) -> None:
    claims = Claims(uzi="000095254", role=role, ura="00000666", purpose="TREAT", organisation_type="V6")
    requester = validate(envelope(build(now, sign=signer, claims=claims)), store, now)
    assert requester is not None and requester.role == role


def test_default_roles_are_the_imaging_professionals_of_mitz_md() -> None:
    assert XuaConfig().roles == ["01.000", "01.010", "01.015", "01.039", "97.000"]
    assert XuaConfig().purposes == ["TREAT"]


def test_purpose_allow_list(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    coc = Claims(uzi="000095254", role="01.039", ura="00000666", purpose="COC", organisation_type="V6")
    refused(envelope(build(now, sign=signer, claims=coc)), store, now, "FailedAuthentication",
            r"purposeofuse 'COC' is not accepted \(only TREAT\)")
    both = CFG.model_copy(update={"purposes": ["TREAT", "COC"]})
    assert validate(envelope(build(now, sign=signer, claims=coc)), store, now, both) is not None
    with pytest.raises(ValueError, match=r"unknown purpose.*EMERGENCY"):
        XuaConfig(purposes=["TREAT", "EMERGENCY"])


def test_a_long_role_code_is_not_copied_whole_into_the_fault(signer: Signer, store: TrustStore,
                                                             now: dt.datetime) -> None:
    claims = Claims(uzi="000095254", role="R" * 5000, ura="00000666", purpose="TREAT", organisation_type="V6")
    fault = refused(envelope(build(now, sign=signer, claims=claims)), store, now, "FailedAuthentication",
                    "may not consult imaging")
    assert len(fault.reason) < 120


def test_timestamp_is_required_by_default(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    default = XuaConfig(audiences=[AUDIENCE])
    assert default.require_timestamp
    a = build(now, sign=signer)
    refused(envelope(a), store, now, "InvalidSecurity", "must hold a wsu:Timestamp", default)
    refused(envelope(_timestamp(None, _iso(now + dt.timedelta(minutes=5))), a), store, now,
            "InvalidSecurity", "wsu:Timestamp must hold Created", default)
    assert validate(envelope(_timestamp(_iso(now), None), a), store, now, default) is not None
    assert validate(wrapped(security_header(a, now)), store, now, default) is not None


def test_requester_concerns_only_the_patient_it_names(signer: Signer, store: TrustStore,
                                                      now: dt.datetime) -> None:
    named = validate(envelope(build(now, sign=signer, bsn="900186021")), store, now)
    assert named is not None
    assert named.concerns("900186021") and not named.concerns("999911120")
    anyone = validate(envelope(build(now, sign=signer)), store, now)
    assert anyone is not None and anyone.patient_bsn is None and anyone.concerns("999911120")


def test_a_bare_assertion_validates_on_its_own(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """What a TLB client sends in an ``Authorization: SAML`` header: the assertion is its document's root."""
    a = parse_xml(to_bytes(build(now, sign=signer, bsn="900186021")))
    requester = validate_assertion(a, CFG, issuer=ISSUER, trusted=store, audiences=[AUDIENCE], now=now)
    assert (requester.issuer, requester.patient_bsn, requester.signer) == (ISSUER, "900186021", "CN=client")
    with pytest.raises(SoapFault, match="is not the issuer of the calling peer"):
        validate_assertion(a, CFG, issuer=OTHER_ISSUER, trusted=store, audiences=[AUDIENCE], now=now)


def test_a_bare_assertion_may_not_carry_another_one(signer: Signer, store: TrustStore,
                                                    now: dt.datetime) -> None:
    inner = build(now, sign=signer, assertion_id="_inner")

    def advice(a: etree._Element) -> None:
        conditions = a.find("saml2:Conditions", NS)
        assert conditions is not None
        holder = etree.Element(f"{{{saml.SAML_NS}}}Advice")
        holder.append(copy.deepcopy(inner))
        conditions.addnext(holder)

    outer = parse_xml(to_bytes(build(now, advice, sign=signer)))
    with pytest.raises(SoapFault, match="holds another assertion") as info:
        validate_assertion(outer, CFG, issuer=ISSUER, trusted=store, audiences=[AUDIENCE], now=now)
    assert info.value.subcode == (saml.WSSE_NS, "InvalidSecurity")


# --------------------------------------------------------------------------------------------------
# Authorization decisions (NIST _withauthzconsent): authentic, read, never acted on
# --------------------------------------------------------------------------------------------------

EVIDENCE = "saml2:AuthzDecisionStatement/saml2:Evidence/saml2:Assertion"


@pytest.mark.parametrize("decision", ["Permit", "Deny", "Indeterminate"])
def test_an_authorization_decision_is_authentic_but_refuses_the_request(
        decision: str, signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """Whatever the caller's issuer decided, the consent question stays Mitz's: the assertion is
    accepted as authentication (the evidence assertion in its place is no wrapping) and the request
    refused, naming the decision and nothing of the evidence."""
    env = envelope(build(now, authz_consent(decision, "https://duo.test/xca"), sign=signer))
    requester = validate(env, store, now)
    assert requester is not None and requester.ura == CLAIMS.ura
    assert requester.authz_decisions == (saml.AuthzDecision(decision, "https://duo.test/xca"),)
    refusal = requester.authorization_refusal()
    assert refusal == f"{AUTHZ_DECISION_REFUSED} (Decision {decision})"
    assert "2222" not in refusal and "AccessConsentPolicy" not in refusal


def test_without_an_authorization_decision_there_is_no_refusal(signer: Signer, store: TrustStore,
                                                                now: dt.datetime) -> None:
    requester = validate(envelope(build(now, sign=signer)), store, now)
    assert requester is not None and requester.authz_decisions == ()
    assert requester.authorization_refusal() is None


def _statement(decision: str | None, resource: str | None, action: bool) -> Mutation:
    def mutate(a: etree._Element) -> None:
        statement = etree.SubElement(a, f"{{{saml.SAML_NS}}}AuthzDecisionStatement")
        if decision is not None:
            statement.set("Decision", decision)
        if resource is not None:
            statement.set("Resource", resource)
        if action:
            etree.SubElement(statement, f"{{{saml.SAML_NS}}}Action").text = "Execute"
    return mutate


@pytest.mark.parametrize(("mutate", "reason"), [
    (_statement("Maybe", "urn:x", True), "Decision must be one of Deny, Indeterminate, Permit"),
    (_statement(None, "urn:x", True), "Decision must be one of"),
    (_statement("Permit", None, True), "must name its Resource"),
    (_statement("Permit", "urn:x", False), "must hold at least one Action"),
], ids=["unknown-decision", "no-decision", "no-resource", "no-action"])
def test_an_unreadable_authorization_decision_is_a_malformed_token(
        mutate: Mutation, reason: str, signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """Never taken for "no decision": a statement DUO cannot read refuses the assertion itself."""
    refused(envelope(build(now, mutate, sign=signer)), store, now, "InvalidSecurityToken", reason)


def test_the_evidence_is_signed_with_the_assertion(signer: Signer, store: TrustStore,
                                                   now: dt.datetime) -> None:
    signed = build(now, authz_consent(), sign=signer)
    evidence = signed.find(EVIDENCE, NS)
    assert evidence is not None
    evidence.set("ID", "_other-evidence")
    refused(envelope(signed), store, now, "FailedCheck", "DigestValue does not match")


def test_the_genuine_assertion_hidden_as_evidence_vouches_for_nothing(signer: Signer, store: TrustStore,
                                                                      now: dt.datetime) -> None:
    """Wrapping through the one tolerated nesting: the outer assertion is what must be signed."""
    genuine = build(now, sign=signer)

    def hide_genuine(a: etree._Element) -> None:
        authz_consent()(a)
        evidence = a.find(EVIDENCE, NS)
        assert evidence is not None
        holder = evidence.getparent()
        assert holder is not None
        holder.replace(evidence, copy.deepcopy(genuine))

    forged = build(now, hide_genuine, claims=dataclasses.replace(CLAIMS, ura="00000999"),
                   assertion_id="_forged")
    refused(envelope(forged), store, now, "InvalidSecurityToken", NOT_SIGNED)
    genuine_sig = genuine.find("ds:Signature", NS)
    assert genuine_sig is not None
    forged.insert(1, copy.deepcopy(genuine_sig))
    refused(envelope(forged), store, now, "FailedCheck", "does not point at the expected element")


@pytest.mark.parametrize("where", ["advice-in-evidence", "evidence-of-evidence", "beside-evidence"])
def test_only_evidence_itself_may_be_nested(where: str, signer: Signer, store: TrustStore,
                                            now: dt.datetime) -> None:
    """Exactly ``AuthzDecisionStatement/Evidence/Assertion``: any other nested assertion is refused."""
    inner = build(now, assertion_id="_deeper")

    def plant(a: etree._Element) -> None:
        authz_consent()(a)
        evidence = a.find(EVIDENCE, NS)
        assert evidence is not None
        if where == "advice-in-evidence":
            evidence.append(etree.Element(f"{{{saml.SAML_NS}}}Advice"))
            evidence[-1].append(copy.deepcopy(inner))
        elif where == "evidence-of-evidence":
            authz_consent()(evidence)
        else:
            statement = evidence.getparent()
            assert statement is not None
            statement.addnext(copy.deepcopy(inner))

    env = envelope(build(now, plant, sign=signer))
    refused(env, store, now, "InvalidSecurity", "exactly one saml2:Assertion|holds another assertion")
    bare = parse_xml(to_bytes(build(now, plant, sign=signer)))
    with pytest.raises(SoapFault, match="holds another assertion"):
        validate_assertion(bare, CFG, issuer=ISSUER, trusted=store, audiences=[AUDIENCE], now=now)


def test_trusted_certs_is_gone_from_the_xua_config(pki: Pki) -> None:
    """Its trust was global (any issuer, CA-issued signers): a config still naming it must not start
    believing that it is in force."""
    with pytest.raises(ValueError, match="trusted_certs"):
        XuaConfig.model_validate({"trusted_certs": [str(pki.ca_cert)]})



# --------------------------------------------------------------------------------------------------
# Golden fixture: fixed clock, fixed id, RSA PKCS#1 v1.5 is deterministic
# --------------------------------------------------------------------------------------------------

GOLDEN_KEY = FIXTURES / "golden-key.pem"
GOLDEN_CERT = FIXTURES / "golden-cert.pem"
GOLDEN_ASSERTION = FIXTURES / "assertion-signed.xml"
GOLDEN_NOW = dt.datetime(2026, 3, 4, 10, 15, 30, tzinfo=dt.UTC)
GOLDEN_CLAIMS = Claims(uzi="000095254", role="01.039", ura="00000666", purpose="TREAT",
                       organisation_type="V6", mandated_uzi="000011111")


def golden_bytes() -> bytes:
    key, chain = load_signing_pair(GOLDEN_KEY, GOLDEN_CERT)
    return to_bytes(issue_assertion(GOLDEN_CLAIMS, issuer=ISSUER, audience=AUDIENCE, key=key, cert=chain,
                                    now=GOLDEN_NOW, subject_bsn="900186021", assertion_id="_golden-xua"))


def test_golden_assertion_is_byte_stable() -> None:
    assert golden_bytes() == GOLDEN_ASSERTION.read_bytes(), (
        "issued assertion bytes changed; if intended, regenerate with "
        "`python -m tests.test_xua --regenerate-golden`")


def test_golden_assertion_validates_at_its_clock() -> None:
    store = TrustStore.from_pem_files([GOLDEN_CERT], pinned=True)
    a = parse_xml(GOLDEN_ASSERTION.read_bytes())
    env = wrapped(security_header(a, GOLDEN_NOW))
    requester = validate(env, store, GOLDEN_NOW + dt.timedelta(minutes=5))
    assert requester is not None
    assert (requester.assertion_id, requester.mandated_uzi, requester.patient_bsn, requester.signer) == (
        "_golden-xua", "000011111", "900186021", "CN=duo-xua-golden")
    # Without the header's own 5-minute Timestamp, the assertion's 10 minutes (+ skew) are what count.
    bare = envelope(a)
    assert validate(bare, store, GOLDEN_NOW + dt.timedelta(minutes=10, seconds=59)) is not None
    refused(bare, store, GOLDEN_NOW + dt.timedelta(minutes=11), "MessageExpired",
            r"the assertion expired at 2026-03-04T10:25:30\+00:00")


def _regenerate_golden() -> None:
    """Write a fresh test-only key, a long-lived self-signed certificate and the expected bytes."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed("duo-xua-golden", key, dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                       dt.datetime(2045, 1, 1, tzinfo=dt.UTC), serial=20260304)
    GOLDEN_KEY.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    GOLDEN_CERT.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    GOLDEN_ASSERTION.write_bytes(golden_bytes())


if __name__ == "__main__":
    if "--regenerate-golden" not in sys.argv:
        sys.exit("usage: python -m tests.test_xua --regenerate-golden  (test-only key, never a real one)")
    _regenerate_golden()
