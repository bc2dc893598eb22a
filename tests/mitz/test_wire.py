"""The Mitz codec against mitz.md, element by element, and the fail-closed rule case by case."""

from __future__ import annotations

import copy
from dataclasses import replace
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from duo_gateway.mitz import wire
from duo_gateway.mitz.wire import (
    ALL_PROVIDER_CATEGORIES,
    ClosedQuestion,
    ConsentStatement,
    Location,
    MitzAnswerError,
    MitzFault,
    MitzRequestError,
    MitzSecurityError,
    Notification,
    OpenQuestion,
    build_closed_answer,
    build_closed_question,
    build_notification,
    build_open_answer,
    build_open_question,
    build_subscription,
    parse_closed_answer,
    parse_closed_question,
    parse_notification,
    parse_open_answer,
    parse_open_question,
    parse_subscription,
)
from duo_gateway.soap.envelope import SoapFault, build_fault
from duo_gateway.soap.xml import to_bytes

FIXTURES = Path(__file__).parent / "fixtures"
NS = {
    "s": "http://www.w3.org/2003/05/soap-envelope",
    "a": "http://www.w3.org/2005/08/addressing",
    "q": "urn:oasis:names:tc:xacml:3.0:profile:saml2.0:v2:schema:protocol:wd-14",
    "x": "urn:oasis:names:tc:xacml:3.0:core:schema:wd-17",
    "h": "urn:hl7-org:v3",
    "wsse": "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
    "saml2": "urn:oasis:names:tc:SAML:2.0:assertion",
    "xsi": "http://www.w3.org/2001/XMLSchema-instance",
    "xcpd": "urn:ihe:iti:xcpd:2009",
}
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"
MU = "{http://www.w3.org/2003/05/soap-envelope}mustUnderstand"
CLOSED_URL = "https://mitz.test/tst-us/mitz/geslotenautorisatievraag/xacml3"
OPEN_URL = "https://mitz.test/tst-us/mitz/openautorisatievraag"
GOLDEN_ID = "urn:uuid:00000000-0000-4000-8000-000000000001"
MSG = "urn:uuid:11111111-2222-4333-8444-555555555555"
NOW = datetime(2026, 3, 4, 10, 15, 30, 123456, tzinfo=UTC)

#: The NK example values of mitz.md §2.2.
QUESTION = ClosedQuestion(
    bsn="900186021",
    holder_ura="00000659",
    holder_type="Z3",
    requester_uzi="000095254",
    requester_role="01.015",
    requester_ura="00000666",
    requester_type="Z3",
)
OPEN_Q = OpenQuestion(
    bsn="900186021",
    requester_uzi="000095254",
    requester_role="01.039",
    requester_ura="00000666",
    requester_type="V6",
    issuer="urn:oid:2.16.528.1.1007.99.9999",
)


def xp(el: etree._Element, path: str) -> list[Any]:
    result = el.xpath(path, namespaces=NS)
    assert isinstance(result, list)
    return result


def one(el: etree._Element, path: str) -> Any:
    found = xp(el, path)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]


# ------------------------------------------------------------------------------ closed question


def test_closed_question_headers() -> None:
    root = etree.fromstring(build_closed_question(QUESTION, CLOSED_URL, MSG))
    assert root.tag == "{http://www.w3.org/2003/05/soap-envelope}Envelope"
    header = one(root, "/s:Envelope/s:Header")
    assert [c.tag.split("}")[1] for c in header] == ["Action", "MessageID", "To", "ReplyTo"]
    action = one(header, "a:Action")
    assert action.text == "XACMLAuthorizationDecisionQueryRequest"
    assert action.get(MU) == "1"
    message_id = one(header, "a:MessageID")
    assert message_id.text == MSG
    assert message_id.get(MU) is None
    to = one(header, "a:To")
    assert to.text == CLOSED_URL
    assert to.get(MU) == "1"
    assert one(header, "a:ReplyTo/a:Address").text == "http://www.w3.org/2005/08/addressing/anonymous"
    body_children = xp(root, "/s:Envelope/s:Body/*")
    assert len(body_children) == 1
    assert body_children[0].tag == f"{{{NS['q']}}}XACMLAuthzDecisionQuery"


II, CV = "urn:hl7-org:v3#II", "urn:hl7-org:v3#CV"
EXPECTED_BLOCKS: list[tuple[str, str, list[tuple[str, str, dict[str, str]]]]] = [
    (
        "urn:oasis:names:tc:xacml:3.0:attribute-category:resource",
        "resource",
        [
            (
                "urn:oasis:names:tc:xacml:2.0:resource:resource-id",
                II,
                {"root": "2.16.840.1.113883.2.4.6.3", "extension": "900186021"},
            ),
            (
                "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code",
                CV,
                {"code": "Z3", "codeSystem": "2.16.840.1.113883.2.4.15.1060"},
            ),
            (
                "urn:ihe:iti:appc:2016:author-institution:id",
                II,
                {"root": "2.16.528.1.1007.3.3", "extension": "00000659"},
            ),
        ],
    ),
    (
        "urn:oasis:names:tc:xacml:3.0:attribute-category:action",
        "action0",
        [
            (
                "urn:ihe:iti:appc:2016:document-entry:event-code",
                CV,
                {"code": "GGC002", "codeSystem": "2.16.840.1.113883.2.4.3.111.5.10.1"},
            ),
        ],
    ),
    (
        "urn:oasis:names:tc:xacml:1.0:subject-category:access-subject",
        "subject",
        [
            (
                "urn:oasis:names:tc:xacml:2.0:subject:role",
                CV,
                {"code": "01.015", "codeSystem": "2.16.840.1.113883.2.4.15.111"},
            ),
            (
                "urn:ihe:iti:xua:2017:subject:provider-identifier",
                II,
                {"root": "2.16.528.1.1007.3.1", "extension": "000095254", "assigningAuthorityName": "CIBG"},
            ),
            (
                "urn:nl:otv:names:tc:1.0:subject:provider-institution",
                II,
                {"root": "2.16.528.1.1007.3.3", "extension": "00000666"},
            ),
            (
                "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code",
                CV,
                {"code": "Z3", "codeSystem": "2.16.840.1.113883.2.4.15.1060"},
            ),
        ],
    ),
    (
        "urn:oasis:names:tc:xacml:3.0:attribute-category:environment",
        "environment",
        [
            (
                "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
                CV,
                {"code": "TREAT", "codeSystem": "2.16.840.1.113883.1.11.20448"},
            ),
        ],
    ),
]


def _assert_blocks(
    request: etree._Element, expected: list[tuple[str, str, list[tuple[str, str, dict[str, str]]]]]
) -> None:
    blocks = xp(request, "x:Attributes")
    assert len(blocks) == len(expected)
    assert len(request) == len(expected), "nothing but Attributes inside Request"
    for block, (category, xml_id, attributes) in zip(blocks, expected, strict=True):
        assert dict(block.attrib) == {"Category": category, XML_ID: xml_id}
        attrs = xp(block, "x:Attribute")
        assert len(block) == len(attrs) == len(attributes), xml_id
        for attr, (attribute_id, data_type, hl7_attrs) in zip(attrs, attributes, strict=True):
            assert dict(attr.attrib) == {"AttributeId": attribute_id, "IncludeInResult": "false"}
            value = one(attr, "x:AttributeValue")
            assert len(attr) == 1
            assert dict(value.attrib) == {"DataType": data_type}
            assert len(value) == 1
            hl7 = value[0]
            local = "InstanceIdentifier" if data_type == II else "CodedValue"
            assert hl7.tag == f"{{urn:hl7-org:v3}}{local}", attribute_id
            assert dict(hl7.attrib) == hl7_attrs, attribute_id


def test_closed_question_body_attribute_by_attribute() -> None:
    root = etree.fromstring(build_closed_question(QUESTION, CLOSED_URL, MSG))
    query = one(root, "/s:Envelope/s:Body/q:XACMLAuthzDecisionQuery")
    assert len(query) == 1
    request = one(query, "x:Request")
    assert dict(request.attrib) == {"CombinedDecision": "false", "ReturnPolicyIdList": "false"}
    _assert_blocks(request, EXPECTED_BLOCKS)


def test_closed_question_with_mandated_and_two_categories() -> None:
    q = replace(
        QUESTION, **{"categories": ("GGC002", "GGC013"), "mandated_uzi": "000012345", "purpose": "COC"}
    )
    request = one(
        etree.fromstring(build_closed_question(q, CLOSED_URL, MSG)),
        "/s:Envelope/s:Body/q:XACMLAuthzDecisionQuery/x:Request",
    )
    expected = copy.deepcopy(EXPECTED_BLOCKS)
    expected.insert(
        2,
        (
            "urn:oasis:names:tc:xacml:3.0:attribute-category:action",
            "action1",
            [
                (
                    "urn:ihe:iti:appc:2016:document-entry:event-code",
                    CV,
                    {"code": "GGC013", "codeSystem": "2.16.840.1.113883.2.4.3.111.5.10.1"},
                )
            ],
        ),
    )
    # mandated sits right after the responsible professional's UZI, as in the mitz.md table.
    expected[3][2].insert(
        2,
        (
            "urn:nl:otv:names:tc:1.0:subject:mandated",
            II,
            {"root": "2.16.528.1.1007.3.1", "extension": "000012345", "assigningAuthorityName": "CIBG"},
        ),
    )
    expected[4][2][0][2]["code"] = "COC"
    _assert_blocks(request, expected)


def test_closed_question_golden_bytes() -> None:
    built = build_closed_question(
        QUESTION, "https://tst-api.mijn-mitz.nl/tst-us/mitz/geslotenautorisatievraag/xacml3", GOLDEN_ID
    )
    assert built == (FIXTURES / "closed_question.xml").read_bytes()


@pytest.mark.parametrize(
    "q",
    [
        QUESTION,
        replace(QUESTION, **{"categories": ("GGC002", "GGC012", "GGC013"), "mandated_uzi": "000012345"}),
    ],
)
def test_closed_question_round_trip(q: ClosedQuestion) -> None:
    assert parse_closed_question(build_closed_question(q, CLOSED_URL, MSG)) == q


@pytest.mark.parametrize(
    "field,value",
    [
        ("bsn", "900186022"),
        ("bsn", "90018602"),
        ("bsn", "000000000"),
        ("holder_ura", ""),
        ("holder_type", " "),
        ("requester_uzi", ""),
        ("requester_role", ""),
        ("requester_ura", "abc"),
        ("requester_type", ""),
        ("categories", ()),
        ("purpose", "HMARKT"),
        ("mandated_uzi", ""),
    ],
)
def test_closed_question_refuses_incomplete_input(field: str, value: object) -> None:
    with pytest.raises(MitzRequestError) as exc_info:
        replace(QUESTION, **{field: value})
    assert "900186022" not in str(exc_info.value)


def _mutated(data: bytes, xpath: str, mutate: str = "remove", attr: str = "", value: str = "") -> bytes:
    root = etree.fromstring(data)
    for el in xp(root, xpath):
        if mutate == "remove":
            el.getparent().remove(el)
        else:
            el.set(attr, value)
    return to_bytes(root)


REQUIRED_ATTRIBUTE_IDS = [
    "urn:oasis:names:tc:xacml:2.0:resource:resource-id",
    "urn:ihe:iti:appc:2016:document-entry:healthcare-facility-type-code",
    "urn:ihe:iti:appc:2016:author-institution:id",
    "urn:ihe:iti:appc:2016:document-entry:event-code",
    "urn:oasis:names:tc:xacml:2.0:subject:role",
    "urn:ihe:iti:xua:2017:subject:provider-identifier",
    "urn:nl:otv:names:tc:1.0:subject:provider-institution",
    "urn:nl:otv:names:tc:1.0:subject:consulting-healthcare-facility-type-code",
    "urn:oasis:names:tc:xspa:1.0:subject:purposeofuse",
]


@pytest.mark.parametrize("attribute_id", REQUIRED_ATTRIBUTE_IDS)
def test_parse_closed_question_refuses_missing_attribute(attribute_id: str) -> None:
    data = _mutated(
        build_closed_question(QUESTION, CLOSED_URL, MSG), f"//x:Attribute[@AttributeId='{attribute_id}']"
    )
    with pytest.raises(MitzRequestError):
        parse_closed_question(data)


@pytest.mark.parametrize(
    "xpath,attr,value",
    [
        ("//h:InstanceIdentifier[@extension='900186021']", "extension", "900186022"),  # fails 11-proef
        ("//h:InstanceIdentifier[@extension='900186021']", "root", "2.16.840.1.113883.2.4.6.1"),
        ("//h:InstanceIdentifier[@extension='00000659']", "root", "2.16.528.1.1007.3.1"),
        ("//h:CodedValue[@code='GGC002']", "codeSystem", "1.2.3"),
        ("//x:AttributeValue[h:CodedValue/@code='01.015']", "DataType", II),
        ("//x:Attributes[@xml:id='environment']", "Category", "urn:example:other"),
        (
            "//x:Attribute[@AttributeId='urn:oasis:names:tc:xspa:1.0:subject:purposeofuse']",
            "IncludeInResult",
            "no",
        ),
        ("//h:CodedValue[@code='TREAT']", "code", "MARKETING"),
        ("//a:Action", "ignored", ""),
    ],
)
def test_parse_closed_question_refuses_wrong_values(xpath: str, attr: str, value: str) -> None:
    data = _mutated(build_closed_question(QUESTION, CLOSED_URL, MSG), xpath, "set", attr, value)
    if xpath == "//a:Action":
        data = data.replace(
            b">XACMLAuthorizationDecisionQueryRequest<", b">urn:ihe:iti:2009:PatientLocationQuery<"
        )
    with pytest.raises(MitzRequestError):
        parse_closed_question(data)


def test_parse_closed_question_soap11_is_a_version_mismatch() -> None:
    data = build_closed_question(QUESTION, CLOSED_URL, MSG).replace(
        b"http://www.w3.org/2003/05/soap-envelope", b"http://schemas.xmlsoap.org/soap/envelope/"
    )
    with pytest.raises(SoapFault) as exc_info:
        parse_closed_question(data)
    assert exc_info.value.code == "VersionMismatch"


# ------------------------------------------------------------------------------ closed answer


def test_closed_answer_shape() -> None:
    root = etree.fromstring(build_closed_answer(["Permit", "Deny"], relates_to=MSG, message_id="urn:uuid:r"))
    assert one(root, "/s:Envelope/s:Header/a:Action").text == wire.CLOSED_RESPONSE_ACTION
    assert one(root, "/s:Envelope/s:Header/a:RelatesTo").text == MSG
    results = xp(root, "/s:Envelope/s:Body/x:Response/x:Result")
    assert [one(r, "x:Decision").text for r in results] == ["Permit", "Deny"]
    for r in results:
        assert one(r, "x:Status/x:StatusCode").get("Value") == "urn:oasis:names:tc:xacml:1.0:status:ok"


def test_closed_answer_permit_is_the_only_yes() -> None:
    answer = parse_closed_answer(build_closed_answer(["Permit"], MSG), MSG, 1)
    assert answer.permitted
    assert answer.category_permitted(0)
    assert answer.reason is None
    assert answer.decisions == ("Permit",)


@pytest.mark.parametrize("decision", ["Deny", "NotApplicable", "Indeterminate"])
def test_closed_answer_other_decisions_are_no(decision: str) -> None:
    answer = parse_closed_answer(build_closed_answer([decision], MSG), MSG, 1)
    assert not answer.permitted
    assert not answer.category_permitted(0)
    assert answer.decisions == (decision,)
    assert answer.reason is None  # well-formed: the decision itself is the reason


def test_closed_answer_judges_each_category() -> None:
    answer = parse_closed_answer(build_closed_answer(["Permit", "Deny"], MSG), MSG, 2)
    assert answer.category_permitted(0)
    assert not answer.category_permitted(1)
    assert not answer.category_permitted(2)
    assert not answer.permitted


def _answer_with(xml_body: str, action: str = wire.CLOSED_RESPONSE_ACTION, relates_to: str = MSG) -> bytes:
    return (
        '<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope" '
        'xmlns:a="http://www.w3.org/2005/08/addressing"><s:Header>'
        f'<a:Action s:mustUnderstand="1">{action}</a:Action><a:RelatesTo>{relates_to}</a:RelatesTo>'
        f"</s:Header><s:Body>{xml_body}</s:Body></s:Envelope>"
    ).encode()


def _result(decision: str, status: str = "urn:oasis:names:tc:xacml:1.0:status:ok", extra: str = "") -> str:
    return (
        f"<Result><Decision>{decision}</Decision>{extra}"
        f'<Status><StatusCode Value="{status}"/></Status></Result>'
    )


def _response(*results: str) -> str:
    return f'<Response xmlns="urn:oasis:names:tc:xacml:3.0:core:schema:wd-17">{"".join(results)}</Response>'


BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&lol3;</s:Body></s:Envelope>"""
XXE = _answer_with(_response(_result("&xxe;"))).replace(
    b"<s:Envelope", b'<!DOCTYPE s:Envelope [<!ENTITY xxe SYSTEM "file:///etc/passwd">]><s:Envelope', 1
)

FAIL_CLOSED_CASES: dict[str, tuple[bytes, int, str]] = {
    "soap fault": (to_bytes(build_fault(SoapFault("Receiver", "database down"), relates_to=MSG)), 1, "fault"),
    "wrong action": (
        _answer_with(_response(_result("Permit")), action="urn:ihe:iti:2009:PatientLocationQueryResponse"),
        1,
        "Action",
    ),
    "wrong relates_to": (
        _answer_with(_response(_result("Permit")), relates_to="urn:uuid:someone-else"),
        1,
        "RelatesTo",
    ),
    "no relates_to": (
        build_closed_answer(["Permit"], MSG).replace(b"a:RelatesTo", b"a:Other"),
        1,
        "RelatesTo",
    ),
    "missing result": (_answer_with(_response(_result("Permit"))), 2, "Result"),
    "no result": (_answer_with(_response()), 1, "Result"),
    "extra result": (_answer_with(_response(_result("Permit"), _result("Permit"))), 1, "Result"),
    "lower-case decision": (_answer_with(_response(_result("permit"))), 1, "Decision"),
    "padded decision": (_answer_with(_response(_result(" Permit"))), 1, "Decision"),
    "two decisions": (
        _answer_with(_response("<Result><Decision>Permit</Decision><Decision>Permit</Decision></Result>")),
        1,
        "Decision",
    ),
    "permit not ok": (
        _answer_with(_response(_result("Permit", "urn:oasis:names:tc:xacml:1.0:status:processing-error"))),
        1,
        "status",
    ),
    "permit with obligations": (
        _answer_with(_response(_result("Permit", extra="<Obligations/>"))),
        1,
        "obligations",
    ),
    "response not direct child": (
        _answer_with(f"<wrapper>{_response(_result('Permit'))}</wrapper>"),
        1,
        "Response",
    ),
    "response wrong namespace": (
        _answer_with("<Response><Result><Decision>Permit</Decision></Result></Response>"),
        1,
        "Response",
    ),
    "soap 1.1": (
        _answer_with(_response(_result("Permit"))).replace(
            b"http://www.w3.org/2003/05/soap-envelope", b"http://schemas.xmlsoap.org/soap/envelope/"
        ),
        1,
        "1.1",
    ),
    "truncated": (build_closed_answer(["Permit"], MSG)[:200], 1, "malformed"),
    "garbage": (b"\x00\xff<<<not xml", 1, "malformed"),
    "empty": (b"", 1, "malformed"),
    "html error page": (b"<html><body>502 Bad Gateway</body></html>", 1, "SOAP"),
    "billion laughs": (BILLION_LAUGHS, 1, "DTD"),
    "xxe": (XXE, 1, "DTD"),
}


@pytest.mark.parametrize("case", list(FAIL_CLOSED_CASES))
def test_closed_answer_fails_closed(case: str) -> None:
    data, n, reason_fragment = FAIL_CLOSED_CASES[case]
    answer = parse_closed_answer(data, MSG, n)
    assert not answer.permitted
    assert not any(answer.category_permitted(i) for i in range(n))
    assert answer.decisions == (None,) * n
    assert answer.reason is not None
    assert reason_fragment.lower() in answer.reason.lower(), answer.reason


def test_closed_answer_control_case_for_hand_built_answers() -> None:
    """The hand-built envelope of the failure cases is accepted when nothing is wrong with it, so
    each failure case above fails for its own mutation, not for the scaffolding."""
    assert parse_closed_answer(_answer_with(_response(_result("Permit"))), MSG, 1).permitted


def test_build_closed_answer_refuses_unknown_decision() -> None:
    with pytest.raises(ValueError):
        build_closed_answer(["Maybe"], MSG)


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


# ------------------------------------------------------------------------------ subscription


def test_subscription_json_shape() -> None:
    sub = build_subscription(
        "900186021",
        "00000659",
        "V6",
        "https://gw.example/mitz/notify",
        gateway_oid="urn:oid:2.16.840.1.113883.2.4.6.6.1",
        source_oid="2.16.840.1.113883.2.4.6.6.90000017",
        birth_date=date(1958, 11, 2),
    )
    assert sub == {
        "resourceType": "Subscription",
        "extension": [
            {"url": "http://fhir.nl/StructureDefinition/Patient.birthDate", "valueDate": "1958-11-02"},
            {
                "url": "http://fhir.nl/StructureDefinition/GatewaySystem",
                "valueOid": "urn:oid:2.16.840.1.113883.2.4.6.6.1",
            },
            {
                "url": "http://fhir.nl/StructureDefinition/SourceSystem",
                "valueOid": "urn:oid:2.16.840.1.113883.2.4.6.6.90000017",
            },
        ],
        "status": "requested",
        "reason": "OTV",
        "criteria": "Consent?_query=otv&patientid=900186021&providerid=00000659&providertype=V6",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://gw.example/mitz/notify",
            "payload": "application/fhir+json",
        },
    }
    assert "id" not in sub
    parsed = parse_subscription(sub)
    assert (parsed.bsn, parsed.provider_ura, parsed.provider_type, parsed.endpoint) == (
        "900186021",
        "00000659",
        "V6",
        "https://gw.example/mitz/notify",
    )
    assert (parsed.gateway_oid, parsed.source_oid, parsed.birth_date) == (
        "2.16.840.1.113883.2.4.6.6.1",
        "2.16.840.1.113883.2.4.6.6.90000017",
        date(1958, 11, 2),
    )


def test_subscription_without_birth_date_has_two_extensions() -> None:
    sub = build_subscription("900186021", "00000659", "V6", "https://gw/n", "1.2.3", "1.2.3.1")
    assert [e["url"] for e in sub["extension"]] == [
        "http://fhir.nl/StructureDefinition/GatewaySystem",
        "http://fhir.nl/StructureDefinition/SourceSystem",
    ]
    assert parse_subscription(sub).birth_date is None


def _sub() -> dict[str, Any]:
    return build_subscription("900186021", "00000659", "V6", "https://gw/n", "1.2.3", "1.2.3.1")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["extension"].append({"url": "http://example.org/other", "valueString": "x"}),
        lambda s: s["extension"].append(dict(s["extension"][0])),
        lambda s: s["extension"].pop(0),
        lambda s: s["extension"][1].update(valueOid="1.2.3.1"),
        lambda s: s.update(criteria="Consent?_query=otv&patientid=900186021&providerid=00000659"),
        lambda s: s.update(
            criteria="Consent?_query=otv&patientid=900186022&providerid=00000659&providertype=V6"
        ),
        lambda s: s.update(
            criteria="Patient?_query=otv&patientid=900186021&providerid=00000659&providertype=V6"
        ),
        lambda s: s.update(criteria=s["criteria"] + "&extra=1"),
        lambda s: s.update(reason="other"),
        lambda s: s.update(status="off"),
        lambda s: s["channel"].update(type="websocket"),
        lambda s: s["channel"].update(payload="text/plain"),
        lambda s: s["channel"].update(endpoint="ftp://x/"),
        lambda s: s.update(contained=[]),
        lambda s: s.update(resourceType="Consent"),
    ],
)
def test_parse_subscription_is_strict(mutate: Any) -> None:
    sub = _sub()
    parse_subscription(sub)  # the unmutated control is accepted
    mutate(sub)
    with pytest.raises(MitzRequestError):
        parse_subscription(sub)


# ------------------------------------------------------------------------------ notification

NOTIFICATION = Notification(
    bsn="900186021",
    holder_ura="00000659",
    holder_type="V6",
    date_time=datetime(2026, 3, 4, 10, 15, 30, tzinfo=UTC),
    statements=(
        ConsentStatement(provider_categories=("RPZAC005",), permit=True),
        ConsentStatement(provider_categories=("RPZAC001", "RPZAC104"), permit=False),
    ),
)


def test_notification_shape() -> None:
    bundle = build_notification(NOTIFICATION, bundle_id="b1")
    assert (bundle["resourceType"], bundle["id"], bundle["type"]) == ("Bundle", "b1", "transaction")
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Consent", "Consent", "Patient", "Organization"]
    for e in bundle["entry"]:
        assert e["fullUrl"] == f"urn:uuid:{e['resource']['id']}"
        assert e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]}
    patient_url, org_url = bundle["entry"][2]["fullUrl"], bundle["entry"][3]["fullUrl"]
    given, refused = bundle["entry"][0]["resource"], bundle["entry"][1]["resource"]
    assert given["meta"] == {"profile": ["http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"]}
    assert given["extension"] == [
        {
            "url": "http://fhir.nl/StructureDefinition/OTV-ProviderCategory",
            "valueCodeableConcept": {
                "coding": [
                    {
                        "system": "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie",
                        "code": "RPZAC005",
                    }
                ]
            },
        }
    ]
    assert given["status"] == "active"
    assert given["scope"] == {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
        ]
    }
    assert given["category"] == [
        {"coding": [{"system": "http://fhir.nl/otv/CodeSystem/gegevenscategorie", "code": "GGC002"}]}
    ]
    assert given["patient"] == {"reference": patient_url}
    assert given["dateTime"] == "2026-03-04T10:15:30.000Z"
    assert given["provision"] == {
        "type": "permit",
        "actor": [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "CST",
                        }
                    ]
                },
                "reference": {"reference": org_url},
            }
        ],
        "purpose": [{"system": "http://hl7.org/fhir/v3/ActReason", "code": "TREAT"}],
    }
    assert refused["status"] == "inactive"
    assert "type" not in refused["provision"]
    assert len(refused["extension"]) == 2
    assert bundle["entry"][2]["resource"]["identifier"] == [
        {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "900186021"}
    ]
    org = bundle["entry"][3]["resource"]
    assert org["identifier"] == [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00000659"}]
    assert org["type"] == [
        {"coding": [{"system": "http://nictiz.nl/fhir/NamingSystem/organization-type", "code": "V6"}]}
    ]


def test_notification_round_trip() -> None:
    parsed = parse_notification(build_notification(NOTIFICATION))
    assert parsed == NOTIFICATION
    assert parsed.permits("RPZAC005")
    assert not parsed.permits("RPZAC104")
    assert not parsed.permits("RPZAC005", category="GGC013")
    revoked = replace(
        NOTIFICATION,
        **{"statements": (ConsentStatement(provider_categories=ALL_PROVIDER_CATEGORIES, permit=False),)},
    )
    assert not any(
        parse_notification(build_notification(revoked)).permits(c) for c in ALL_PROVIDER_CATEGORIES
    )


def test_parse_notification_reads_a_hand_written_mitz_style_bundle() -> None:
    """Independent of the builder: extra coding fields (version, display), text, 7-digit fractions."""
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "c1",
        "meta": {"profile": ["http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">toestemming</div>'},
        "extension": [
            {
                "url": "http://fhir.nl/StructureDefinition/OTV-ProviderCategory",
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie",
                            "version": "3960100",
                            "code": "RPZAC104",
                            "display": "Ziekenhuizen",
                        }
                    ]
                },
            }
        ],
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "version": "3960100",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://fhir.nl/otv/CodeSystem/gegevenscategorie",
                        "code": "GGC002",
                        "display": "Behandelgegevens",
                    }
                ]
            }
        ],
        "patient": {"reference": "urn:uuid:p"},
        "dateTime": "2024-11-18T10:51:16.8967927Z",
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "CST",
                            }
                        ]
                    },
                    "reference": {"reference": "urn:uuid:o"},
                }
            ],
            "purpose": [{"system": "http://hl7.org/fhir/v3/ActReason", "code": "TREAT"}],
        },
    }
    bundle = {
        "resourceType": "Bundle",
        "id": "b",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:c1", "resource": consent},
            {
                "fullUrl": "urn:uuid:p",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p",
                    "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "900186021"}],
                },
            },
            {
                "fullUrl": "urn:uuid:o",
                "resource": {
                    "resourceType": "Organization",
                    "id": "o",
                    "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00000659"}],
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://nictiz.nl/fhir/NamingSystem/organization-type",
                                    "code": "Z3",
                                }
                            ]
                        }
                    ],
                },
            },
        ],
    }
    parsed = parse_notification(bundle)
    assert (parsed.bsn, parsed.holder_ura, parsed.holder_type) == ("900186021", "00000659", "Z3")
    assert parsed.date_time == datetime(2024, 11, 18, 10, 51, 16, 896792, tzinfo=UTC)
    assert parsed.permits("RPZAC104")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b["entry"][0]["resource"]["provision"].pop("type"),  # active without permit
        lambda b: b["entry"][1]["resource"]["provision"].update(type="permit"),  # inactive with permit
        lambda b: b["entry"][0]["resource"].update(status="proposed"),
        lambda b: b["entry"][0]["resource"].update(patient={"reference": "urn:uuid:someone-else"}),
        lambda b: b["entry"][0]["resource"]["provision"]["actor"][0]["role"]["coding"][0].update(code="PRCP"),
        lambda b: b["entry"][0]["resource"]["extension"].append(
            {"url": "http://example.org/x", "valueString": "y"}
        ),
        lambda b: b["entry"][0]["resource"].update(meta={"profile": []}),
        lambda b: b.update(type="batch"),
        lambda b: b["entry"].pop(2),  # no Patient
        lambda b: b["entry"][2]["resource"]["identifier"][0].update(value="900186022"),
    ],
)
def test_parse_notification_is_strict(mutate: Any) -> None:
    bundle = build_notification(NOTIFICATION)
    parse_notification(bundle)  # control
    mutate(bundle)
    with pytest.raises(MitzAnswerError):
        parse_notification(bundle)
