"""The Mitz closed question codec against mitz.md §2, element by element, and the fail-closed rule
case by case."""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from duo_gateway.mitz.codec import MitzRequestError
from duo_gateway.mitz.xacml import (
    CLOSED_RESPONSE_ACTION,
    ClosedQuestion,
    build_closed_answer,
    build_closed_question,
    parse_closed_answer,
    parse_closed_question,
)
from duo_gateway.soap.envelope import SoapFault, build_fault
from duo_gateway.soap.xml import to_bytes
from tests.mitz.soap_support import BILLION_LAUGHS, MSG, MU, NS, one, xp

FIXTURES = Path(__file__).parent / "fixtures"
XML_ID = "{http://www.w3.org/XML/1998/namespace}id"
CLOSED_URL = "https://mitz.test/tst-us/mitz/geslotenautorisatievraag/xacml3"
GOLDEN_ID = "urn:uuid:00000000-0000-4000-8000-000000000001"

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
    assert one(root, "/s:Envelope/s:Header/a:Action").text == CLOSED_RESPONSE_ACTION
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


def _answer_with(xml_body: str, action: str = CLOSED_RESPONSE_ACTION, relates_to: str = MSG) -> bytes:
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

