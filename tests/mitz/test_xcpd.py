"""The Mitz open question codec (XCPD with its XUA assertion) against mitz.md §3, element by element."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree

from duo_gateway.mitz.codec import MitzAnswerError, MitzFault, MitzRequestError, MitzSecurityError
from duo_gateway.mitz.xcpd import (
    Location,
    OpenQuestion,
    build_open_answer,
    build_open_question,
    parse_open_answer,
    parse_open_question,
)
from duo_gateway.soap.envelope import SoapFault, build_fault
from duo_gateway.soap.xml import to_bytes
from tests.mitz.soap_support import BILLION_LAUGHS, MSG, MU, NS, one, xp

OPEN_URL = "https://mitz.test/tst-us/mitz/openautorisatievraag"
NOW = datetime(2026, 3, 4, 10, 15, 30, 123456, tzinfo=UTC)
OPEN_Q = OpenQuestion(
    bsn="900186021",
    requester_uzi="000095254",
    requester_role="01.039",
    requester_ura="00000666",
    requester_type="V6",
    issuer="urn:oid:2.16.528.1.1007.99.9999",
)


# ------------------------------------------------------------------------------ open question


def test_open_question_headers_and_body() -> None:
    root = etree.fromstring(build_open_question(OPEN_Q, OPEN_URL, MSG, NOW, assertion_id="_abc"))
    header = one(root, "/s:Envelope/s:Header")
    assert [c.tag.split("}")[1] for c in header] == ["Action", "MessageID", "To", "ReplyTo", "Security"]
    assert one(header, "a:Action").text == "urn:ihe:iti:2009:PatientLocationQuery"
    assert one(header, "a:Action").get(MU) == "1"
    assert one(header, "a:MessageID").text == MSG
    assert one(header, "a:To").text == OPEN_URL
    assert one(header, "a:To").get(MU) == "1"
    assert one(header, "a:ReplyTo/a:Address").text == "http://www.w3.org/2005/08/addressing/anonymous"
    assert one(header, "wsse:Security").get(MU) == "1"
    pid = one(root, "/s:Envelope/s:Body/xcpd:PatientLocationQueryRequest/xcpd:RequestedPatientId")
    assert dict(pid.attrib) == {
        "root": "2.16.840.1.113883.2.4.6.3",
        "extension": "900186021",
        "assigningAuthorityName": "NLMINBIZA",
    }


def test_open_question_assertion_parts() -> None:
    root = etree.fromstring(build_open_question(OPEN_Q, OPEN_URL, MSG, NOW, assertion_id="_abc"))
    assertion = one(root, "/s:Envelope/s:Header/wsse:Security/saml2:Assertion")
    assert dict(assertion.attrib) == {
        "ID": "_abc",
        "Version": "2.0",
        "IssueInstant": "2026-03-04T10:15:30.123Z",
    }
    assert [c.tag.split("}")[1] for c in assertion] == [
        "Issuer",
        "Subject",
        "Conditions",
        "AuthnStatement",
        "AttributeStatement",
    ]
    assert one(assertion, "saml2:Issuer").text == "urn:oid:2.16.528.1.1007.99.9999"
    subject = one(assertion, "saml2:Subject")
    assert len(subject) == 1
    assert dict(one(subject, "saml2:SubjectConfirmation").attrib) == {
        "Method": "urn:oasis:names:tc:SAML:2.0:cm:bearer"
    }
    conditions = one(assertion, "saml2:Conditions")
    assert dict(conditions.attrib) == {
        "NotBefore": "2026-03-04T10:15:30.123Z",
        "NotOnOrAfter": "2026-03-04T10:25:30.123Z",
    }
    assert (
        one(conditions, "saml2:AudienceRestriction/saml2:Audience").text
        == "urn:oid:2.16.840.1.113883.2.4.3.111.2.1"
    )
    authn = one(assertion, "saml2:AuthnStatement")
    assert authn.get("AuthnInstant") == "2026-03-04T10:15:30.123Z"
    assert (
        one(authn, "saml2:AuthnContext/saml2:AuthnContextClassRef").text
        == "urn:oasis:names:tc:SAML:2.0:ac:classes:X509"
    )
    assert not xp(assertion, ".//*[local-name()='Signature']"), "unsigned, as B365 sends it"

    expected = [
        (
            "urn:ihe:iti:xua:2017:subject:provider-identifier",
            "id",
            "II",
            {"root": "2.16.528.1.1007.3.1", "extension": "000095254", "assigningAuthorityName": "CIBG"},
        ),
        (
            "urn:oasis:names:tc:xacml:2.0:subject:role",
            "Role",
            "CE",
            {"code": "01.039", "codeSystem": "2.16.840.1.113883.2.4.15.111", "codeSystemName": "RoleCodeNL"},
        ),
        (
            "urn:nl:otv:names:tc:1.0:subject:provider-institution",
            "id",
            "II",
            {"root": "2.16.528.1.1007.3.3", "extension": "00000666"},
        ),
        (
            "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code",
            "consulting-facility-type-code",
            "CV",
            {"code": "V6", "codeSystem": "2.16.840.1.113883.2.4.15.1060"},
        ),
        (
            "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
            "PurposeOfUse",
            "CE",
            {"code": "TREAT", "codeSystem": "2.16.840.1.113883.1.11.20448"},
        ),
    ]
    attrs = xp(assertion, "saml2:AttributeStatement/saml2:Attribute")
    assert len(attrs) == len(expected)
    xsi_type = f"{{{NS['xsi']}}}type"
    for attr, (name, local, hl7_type, hl7_attrs) in zip(attrs, expected, strict=True):
        assert dict(attr.attrib) == {"Name": name}
        value = one(attr, "saml2:AttributeValue")
        assert len(value) == 1
        hl7 = value[0]
        assert hl7.tag == f"{{urn:hl7-org:v3}}{local}", name
        # xsi:type is a QName: it must resolve to the hl7 type, not just read like one.
        prefix, _, type_local = hl7.get(xsi_type).rpartition(":")
        assert (hl7.nsmap.get(prefix or None), type_local) == ("urn:hl7-org:v3", hl7_type), name
        assert {k: v for k, v in hl7.attrib.items() if k != xsi_type} == hl7_attrs, name


def test_open_question_mandated_attribute() -> None:
    q = replace(OPEN_Q, **{"mandated_uzi": "000012345"})
    root = etree.fromstring(build_open_question(q, OPEN_URL, MSG, NOW))
    mandated = one(
        root, "//saml2:Attribute[@Name='urn:nl:otv:names:tc:1.0:subject:mandated']/saml2:AttributeValue/h:id"
    )
    assert mandated.get("root") == "2.16.528.1.1007.3.1"
    assert mandated.get("extension") == "000012345"
    assert mandated.get("assigningAuthorityName") == "CIBG"
    assert parse_open_question(build_open_question(q, OPEN_URL, MSG, NOW)) == q


def test_open_question_round_trip_and_validity_window() -> None:
    data = build_open_question(OPEN_Q, OPEN_URL, MSG, NOW)
    assert parse_open_question(data, now=NOW + timedelta(minutes=9)) == OPEN_Q
    with pytest.raises(MitzSecurityError):
        parse_open_question(data, now=NOW + timedelta(minutes=12))
    with pytest.raises(MitzSecurityError):
        parse_open_question(data, now=NOW - timedelta(minutes=5))


def test_open_question_requires_naive_free_time() -> None:
    with pytest.raises(ValueError):
        build_open_question(OPEN_Q, OPEN_URL, MSG, datetime(2026, 1, 1))


@pytest.mark.parametrize(
    "xpath,attr,value,error",
    [
        ("//wsse:Security", None, None, MitzSecurityError),
        ("//saml2:Audience", "text", "urn:oid:1.2.3", MitzSecurityError),
        (
            "//saml2:SubjectConfirmation",
            "Method",
            "urn:oasis:names:tc:SAML:2.0:cm:holder-of-key",
            MitzSecurityError,
        ),
        (
            "//saml2:Attribute[@Name='urn:nl:otv:names:tc:1.0:subject:provider-institution']",
            None,
            None,
            MitzSecurityError,
        ),
        (
            "//saml2:Attribute[@Name='urn:oasis:names:tc:xacml:2.0:subject:role']/saml2:AttributeValue/h:Role",
            "{http://www.w3.org/2001/XMLSchema-instance}type",
            "CV",
            MitzSecurityError,
        ),
        ("//xcpd:RequestedPatientId", "assigningAuthorityName", "CIBG", MitzRequestError),
        ("//xcpd:RequestedPatientId", "extension", "123456789", MitzRequestError),
    ],
)
def test_parse_open_question_is_strict(
    xpath: str, attr: str | None, value: str | None, error: type[Exception]
) -> None:
    root = etree.fromstring(build_open_question(OPEN_Q, OPEN_URL, MSG, NOW))
    el = one(root, xpath)
    if attr is None:
        el.getparent().remove(el)
    elif attr == "text":
        el.text = value
    else:
        el.set(attr, value)
    with pytest.raises(error):
        parse_open_question(to_bytes(root))


# ------------------------------------------------------------------------------ open answer

LOCATIONS = [
    Location(
        home_community_id="urn:oid:2.16.528.1.1007.99.20001",
        source_id="2.16.528.1.1007.99.20001.1",
        patient_root="2.16.840.1.113883.2.4.6.3",
        patient_extension="900186021",
        holder_ura="00020011",
    ),
    Location(
        home_community_id="urn:oid:2.16.528.1.1007.99.30000",
        source_id="urn:oid:2.16.528.1.1007.99.10001.1",
        patient_root="2.16.840.1.113883.2.4.6.3",
        patient_extension="900186021",
        holder_ura="00010001",
    ),
]


def test_open_answer_shape() -> None:
    root = etree.fromstring(build_open_answer(LOCATIONS[:1], relates_to=MSG))
    assert one(root, "/s:Envelope/s:Header/a:Action").text == "urn:ihe:iti:2009:PatientLocationQueryResponse"
    assert one(root, "/s:Envelope/s:Header/a:RelatesTo").text == MSG
    plr = one(root, "/s:Envelope/s:Body/xcpd:PatientLocationQueryResponse/xcpd:PatientLocationResponse")
    assert [c.tag.split("}")[1] for c in plr] == [
        "HomeCommunityId",
        "CorrespondingPatientId",
        "SourceId",
        "author-institution",
    ]
    assert one(plr, "xcpd:HomeCommunityId").text == "urn:oid:2.16.528.1.1007.99.20001"
    assert dict(one(plr, "xcpd:CorrespondingPatientId").attrib) == {
        "root": "2.16.840.1.113883.2.4.6.3",
        "extension": "900186021",
        "assigningAuthorityName": "NLMINBIZA",
    }
    assert one(plr, "xcpd:SourceId").text == "2.16.528.1.1007.99.20001.1"
    assert dict(one(plr, "xcpd:author-institution").attrib) == {
        "root": "2.16.528.1.1007.3.3",
        "extension": "00020011",
    }


@pytest.mark.parametrize("locations", [[], LOCATIONS[:1], LOCATIONS])
def test_open_answer_round_trip(locations: list[Location]) -> None:
    assert parse_open_answer(build_open_answer(locations, MSG), MSG) == locations


def test_open_answer_fault_is_a_typed_fault() -> None:
    with pytest.raises(MitzFault) as exc_info:
        parse_open_answer(to_bytes(build_fault(SoapFault("Receiver", "down"), relates_to=MSG)), MSG)
    assert exc_info.value.code == "Receiver"


@pytest.mark.parametrize(
    "mutate",
    [
        "relates_to",
        "action",
        "truncate",
        "garbage",
        "author_root",
        "no_author",
        "hcid_not_oid",
        "no_source",
        "billion_laughs",
    ],
)
def test_open_answer_refuses_anything_off(mutate: str) -> None:
    data = build_open_answer(LOCATIONS, MSG)
    if mutate == "relates_to":
        data = build_open_answer(LOCATIONS, "urn:uuid:other")
    elif mutate == "action":
        data = data.replace(b"PatientLocationQueryResponse</a:Action>", b"PatientLocationQuery</a:Action>")
    elif mutate == "truncate":
        data = data[: len(data) // 2]
    elif mutate == "garbage":
        data = b"\x89PNG not soap"
    elif mutate == "billion_laughs":
        data = BILLION_LAUGHS
    else:
        xpath, attr, value = {
            "author_root": ("(//xcpd:author-institution)[2]", "root", "2.16.528.1.1007.3.1"),
            "no_author": ("(//xcpd:author-institution)[1]", None, None),
            "hcid_not_oid": ("(//xcpd:HomeCommunityId)[1]", "text", "community-noord"),
            "no_source": ("(//xcpd:SourceId)[2]", None, None),
        }[mutate]
        root = etree.fromstring(data)
        el = one(root, xpath)
        if attr is None:
            el.getparent().remove(el)
        elif attr == "text":
            el.text = value
        else:
            el.set(attr, value)
        data = to_bytes(root)
    with pytest.raises(MitzAnswerError):
        parse_open_answer(data, MSG)

