"""The XUA vocabulary on its own: what the builder writes is what the shared reader reads, and the
reader's single-value rule holds whoever calls it (the XCA door's policy is tested in test_xua.py,
the Mitz simulator's in tests/mitz/test_xcpd.py)."""

from __future__ import annotations

import copy
from datetime import UTC, datetime, timedelta

import pytest
from lxml import etree

from duo_gateway.bsn import BSN_OID, NLMINBIZA
from duo_gateway.saml import (
    ATTR_CONSULTING_TYPE,
    ATTR_MANDATED,
    ATTR_PROVIDER_ID,
    ATTR_PROVIDER_INSTITUTION,
    ATTR_PURPOSE,
    ATTR_RESOURCE_ID,
    ATTR_ROLE,
    HL7_NS,
    ORG_TYPE_OID,
    PURPOSE_OID,
    ROLE_OID,
    SAML_NS,
    URA_OID,
    UZI_OID,
    SamlError,
    build_xua_assertion,
    hl7_type,
    single_attribute_values,
)
from duo_gateway.soap.xml import XSI_NS

NOW = datetime(2026, 3, 4, 10, 15, 30, 123456, tzinfo=UTC)
ALL = frozenset({ATTR_PROVIDER_ID, ATTR_MANDATED, ATTR_ROLE, ATTR_PROVIDER_INSTITUTION, ATTR_CONSULTING_TYPE,
                 ATTR_PURPOSE, ATTR_RESOURCE_ID})
NS = {"saml2": SAML_NS}


def _assertion(**overrides: object) -> etree._Element:
    kwargs: dict[str, object] = {
        "issuer": "urn:oid:2.16.528.1.1007.99.9999", "uzi": "000095254", "role": "01.039", "ura": "00000666",
        "org_type": "V6", "purpose": "TREAT", "now": NOW, "audience": "urn:oid:2.16.528.1.1007.99.1",
        "mandated_uzi": "000012345", "patient_bsn": "900186021",
    }
    kwargs.update(overrides)
    return build_xua_assertion(**kwargs)  # type: ignore[arg-type]


def _statements(a: etree._Element) -> list[etree._Element]:
    return a.findall("saml2:AttributeStatement", NS)


def _attribute(a: etree._Element, name: str) -> etree._Element:
    (attr,) = a.findall(f"saml2:AttributeStatement/saml2:Attribute[@Name='{name}']", NS)
    return attr


def test_what_the_builder_writes_the_reader_reads_back() -> None:
    values = single_attribute_values(_statements(_assertion()), ALL)
    assert set(values) == ALL
    expected = {
        ATTR_PROVIDER_ID: ("II", "root", UZI_OID, "extension", "000095254"),
        ATTR_MANDATED: ("II", "root", UZI_OID, "extension", "000012345"),
        ATTR_ROLE: ("CE", "codeSystem", ROLE_OID, "code", "01.039"),
        ATTR_PROVIDER_INSTITUTION: ("II", "root", URA_OID, "extension", "00000666"),
        ATTR_CONSULTING_TYPE: ("CV", "codeSystem", ORG_TYPE_OID, "code", "V6"),
        ATTR_PURPOSE: ("CE", "codeSystem", PURPOSE_OID, "code", "TREAT"),
        ATTR_RESOURCE_ID: ("II", "root", BSN_OID, "extension", "900186021"),
    }
    for name, (xsi_type, system_key, system, value_key, value) in expected.items():
        el = values[name]
        assert etree.QName(el).namespace == HL7_NS
        assert (hl7_type(el), el.get(system_key), el.get(value_key)) == (xsi_type, system, value), name
    assert values[ATTR_RESOURCE_ID].get("assigningAuthorityName") == NLMINBIZA


def test_optional_attributes_are_left_out_when_not_given() -> None:
    values = single_attribute_values(
        _statements(_assertion(org_type=None, mandated_uzi=None, patient_bsn=None)), ALL)
    assert set(values) == {ATTR_PROVIDER_ID, ATTR_ROLE, ATTR_PROVIDER_INSTITUTION, ATTR_PURPOSE}


def test_the_builder_writes_utc_milliseconds_and_the_validity_it_is_given() -> None:
    a = _assertion(validity=timedelta(minutes=5))
    conditions = a.find("saml2:Conditions", NS)
    assert conditions is not None
    assert a.get("IssueInstant") == conditions.get("NotBefore") == "2026-03-04T10:15:30.123Z"
    assert conditions.get("NotOnOrAfter") == "2026-03-04T10:20:30.123Z"


@pytest.mark.parametrize("overrides,message", [
    ({"now": datetime(2026, 3, 4, 10, 15, 30)}, "timezone-aware"),
    ({"validity": timedelta(0)}, "validity must be positive"),
])
def test_the_builder_refuses_times_it_cannot_state(overrides: dict[str, object], message: str) -> None:
    with pytest.raises(ValueError, match=message):
        _assertion(**overrides)


def test_a_second_attribute_of_a_name_asked_for_is_refused() -> None:
    a = _assertion()
    role = _attribute(a, ATTR_ROLE)
    role.addnext(copy.deepcopy(role))
    with pytest.raises(SamlError, match="subject:role appears 2 times; it must be single-valued"):
        single_attribute_values(_statements(a), ALL)


def test_a_second_attribute_statement_does_not_hide_a_second_value() -> None:
    a = _assertion()
    extra = etree.SubElement(a, f"{{{SAML_NS}}}AttributeStatement")
    extra.append(copy.deepcopy(_attribute(a, ATTR_PURPOSE)))
    with pytest.raises(SamlError, match="purposeofuse appears 2 times"):
        single_attribute_values(_statements(a), ALL)


def test_a_second_value_is_refused() -> None:
    a = _assertion()
    value = _attribute(a, ATTR_PURPOSE).find("saml2:AttributeValue", NS)
    assert value is not None
    value.addnext(copy.deepcopy(value))
    with pytest.raises(SamlError, match="purposeofuse must have exactly one AttributeValue, found 2"):
        single_attribute_values(_statements(a), ALL)


@pytest.mark.parametrize("replacement", ["plain text", "other-namespace element"])
def test_a_value_that_is_not_one_typed_hl7_element_is_refused(replacement: str) -> None:
    a = _assertion()
    value = _attribute(a, ATTR_ROLE).find("saml2:AttributeValue", NS)
    assert value is not None
    for child in list(value):
        value.remove(child)
    if replacement == "plain text":
        value.text = "01.039"
    else:
        etree.SubElement(value, "{urn:not-hl7}Role")
    with pytest.raises(SamlError, match="subject:role must hold one typed hl7 element"):
        single_attribute_values(_statements(a), ALL)


def test_names_not_asked_for_are_left_to_the_caller() -> None:
    """Even duplicated: whether an unknown attribute is tolerated is the caller's policy."""
    a = _assertion()
    (stmt,) = _statements(a)
    for _ in range(2):
        other = etree.SubElement(stmt, f"{{{SAML_NS}}}Attribute",
                                 Name="urn:oasis:names:tc:xspa:1.0:subject:subject-id")
        etree.SubElement(other, f"{{{SAML_NS}}}AttributeValue").text = "Dr. Jansen"
    values = single_attribute_values([stmt], {ATTR_ROLE})
    assert list(values) == [ATTR_ROLE]


def test_only_direct_children_are_read() -> None:
    """A nested copy (e.g. smuggled into an Advice) can never be the attribute acted on."""
    a = _assertion(patient_bsn=None)
    (stmt,) = _statements(a)
    wrapper = etree.SubElement(stmt, f"{{{SAML_NS}}}Advice")
    wrapper.append(copy.deepcopy(_attribute(a, ATTR_ROLE)))
    values = single_attribute_values([stmt], ALL)
    assert values[ATTR_ROLE].getparent() is _attribute(a, ATTR_ROLE)[0]


def test_names_are_compared_without_surrounding_whitespace() -> None:
    a = _assertion()
    _attribute(a, ATTR_ROLE).set("Name", f" {ATTR_ROLE}\n")
    assert ATTR_ROLE in single_attribute_values(_statements(a), ALL)


@pytest.mark.parametrize("nsmap,value,expected", [
    ({None: HL7_NS}, "II", "II"),
    ({"hl7": HL7_NS}, "hl7:CE", "CE"),
    ({"hl7": HL7_NS}, " hl7:CV ", "CV"),
    ({"other": "urn:other"}, "other:II", None),
    ({None: HL7_NS}, None, None),
    ({"hl7": HL7_NS}, "undeclared:II", None),
])
def test_hl7_type_resolves_the_prefix_through_the_element(
        nsmap: dict[str | None, str], value: str | None, expected: str | None) -> None:
    el = etree.Element(f"{{{HL7_NS}}}id", nsmap=nsmap)  # type: ignore[arg-type]  # lxml-stubs lack None
    if value is not None:
        el.set(f"{{{XSI_NS}}}type", value)
    assert hl7_type(el) == expected
