"""escape_attribute / escape_text: XML written as text must be what lxml writes, and refuse what lxml
refuses, or a text-built answer could be ill-formed, carry injected markup, or differ from a tree's."""

from __future__ import annotations

import random

import pytest
from lxml import etree

from duo_gateway.soap.xml import XmlError, escape_attribute, escape_text, parse_own

#: What escaping has to get right, plus ordinary text (ASCII, accented, astral) around it.
_ALPHABET = ["&", "<", ">", '"', "'", "\t", "\n", "\r", "]]>", "&amp;", " ", "a", "Z", "0", "é", "€",
             "😀", "\x7f", "\x85", "\u2028", "\ud7ff", "\ue000", "\ufffd", "&#10;", "/>", "=\""]
#: Characters lxml will not put into a tree (outside XML 1.0 Char), and a lone surrogate.
_REFUSED = ["\x00", "\x01", "\x08", "\x0b", "\x0c", "\x1f", "\ufffe", "\uffff", "\ud800", "\udfff"]


def _lxml_bytes(value: str) -> bytes:
    el = etree.Element("a")
    el.set("v", value)
    el.text = value
    return etree.tostring(el, encoding="UTF-8", xml_declaration=False)


def test_escaping_writes_exactly_what_lxml_writes_and_round_trips() -> None:
    rng = random.Random(14)
    for _ in range(3000):
        value = "".join(rng.choice(_ALPHABET) for _ in range(rng.randint(0, 12)))
        written = f'<a v="{escape_attribute(value)}">{escape_text(value)}</a>'.encode()
        if value:  # lxml writes <a v=""/> for an empty text; an empty element is not this test's point
            assert written == _lxml_bytes(value), repr(value)
        parsed = parse_own(written)
        assert parsed.get("v") == value
        assert (parsed.text or "") == value
        assert len(parsed) == 0  # nothing injected


@pytest.mark.parametrize("bad", _REFUSED)
def test_what_lxml_refuses_is_refused_without_echoing_the_value(bad: str) -> None:
    with pytest.raises((ValueError, UnicodeEncodeError)):
        _lxml_bytes("x" + bad)
    for escape in (escape_attribute, escape_text):
        with pytest.raises(XmlError) as exc:
            escape(f"BSN 999911120{bad}")
        assert "999911120" not in str(exc.value)


def test_clean_values_come_back_as_they_are() -> None:
    value = "2.25.71598217374864651526277468631560586670^^^^urn:ihe:iti:xds:2016:studyInstanceUID"
    assert escape_attribute(value) is value
    assert escape_text(value) is value
