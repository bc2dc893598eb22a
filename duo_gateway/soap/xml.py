"""The XML helpers every codec shares: the hardened parser, qualified names, xs:dateTime.

Peers are untrusted: a DTD, an entity or a network fetch inside a SOAP body is an attack surface (XXE,
billion laughs), so one parser configuration is used everywhere and nothing else may call
``etree.fromstring`` on peer bytes. The xs:dateTime reader and writer live here for the same reason:
SAML, WS-Security, XCPD and FHIR timestamps are all read by one rule (a zone is mandatory, fractions
beyond microseconds are cut), so no codec can be laxer than another about when something expires.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Final

from lxml import etree

XML_NS: Final = "http://www.w3.org/XML/1998/namespace"
XSI_NS: Final = "http://www.w3.org/2001/XMLSchema-instance"
XS_NS: Final = "http://www.w3.org/2001/XMLSchema"

#: Hard ceiling for a single XML document (a SOAP envelope without its MTOM attachments).
DEFAULT_MAX_XML_BYTES = 16 * 1024 * 1024
#: Peer documents up to this size are parsed (and decoded) on the event loop, where a worker-thread
#: hand-off would cost more than it saves (~1 ms per 35 kB); bigger ones go to a thread, so one large
#: answer cannot stall every other request the gateway serves (~15 ms at this size).
INLINE_PARSE_BYTES = 512 * 1024


class XmlError(ValueError):
    """Peer bytes are not acceptable XML (malformed, too large, or using forbidden features)."""


def _parser() -> etree.XMLParser:
    return etree.XMLParser(
        resolve_entities=False,
        no_network=True,
        dtd_validation=False,
        load_dtd=False,
        huge_tree=False,
        remove_comments=True,
        remove_pis=True,
    )


def parse_xml(data: bytes, *, max_bytes: int = DEFAULT_MAX_XML_BYTES) -> etree._Element:
    """Parse untrusted bytes, refusing DTDs outright rather than merely not expanding them."""
    if len(data) > max_bytes:
        raise XmlError(f"XML document of {len(data)} bytes exceeds the limit of {max_bytes}")
    try:
        root = etree.fromstring(data, parser=_parser())
    except etree.XMLSyntaxError as exc:
        raise XmlError(f"malformed XML: {exc}") from exc
    docinfo = root.getroottree().docinfo
    # lxml-stubs lack DocInfo.doctype; it exists at run time (the serialised DOCTYPE line).
    if getattr(docinfo, "doctype", "") or docinfo.internalDTD is not None:
        raise XmlError("DTDs are not allowed")
    return root


def to_bytes(element: etree._Element) -> bytes:
    return etree.tostring(element, xml_declaration=True, encoding="UTF-8")


# Writing XML as text. A codec that emits thousands of elements per answer (an ITI-38 answer of a
# hundred entries is ~8,000 elements and ~6,000 attributes) spends most of its time in lxml's per-call
# cost of making them (~1 µs each), not in anything XML needs; writing the same markup as text is
# about a third of that. These two functions are the only escaping such text may use: they write
# exactly what libxml2 writes for the same value (so text-built and tree-built output are
# byte-identical, which tests/soap/test_xml_text.py holds them to), and they refuse what lxml refuses
# to put into a tree (characters outside XML 1.0's Char, lone surrogates), so no value can make
# DUO's output ill-formed or inject markup.

#: A character XML 1.0 cannot carry (its ``Char`` production), lone surrogates included.
_NOT_XML_CHAR = "[^\t\n\r\x20-\ud7ff\ue000-\ufffd\U00010000-\U0010ffff]"
_ATTRIBUTE_SPECIAL = re.compile(f'[&<>"\t\n\r]|{_NOT_XML_CHAR}')
_TEXT_SPECIAL = re.compile(f"[&<>\r]|{_NOT_XML_CHAR}")
_NOT_XML = re.compile(_NOT_XML_CHAR)


def _refuse_non_xml(value: str) -> None:
    if _NOT_XML.search(value) is not None:
        # The value itself is not echoed: it may be patient data.
        raise XmlError("a value holds a character XML cannot carry (a control character or a lone surrogate)")


def escape_attribute(value: str) -> str:
    """``value`` as it goes between double quotes, escaped as libxml2 escapes an attribute."""
    if _ATTRIBUTE_SPECIAL.search(value) is None:
        return value
    _refuse_non_xml(value)
    return (value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace('"', "&quot;")
            .replace("\t", "&#9;").replace("\n", "&#10;").replace("\r", "&#13;"))


def escape_text(value: str) -> str:
    """``value`` as element content, escaped as libxml2 escapes a text node."""
    if _TEXT_SPECIAL.search(value) is None:
        return value
    _refuse_non_xml(value)
    return value.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;").replace("\r", "&#13;")


def _own_parser() -> etree.XMLParser:
    # For markup this process wrote itself (never peer bytes): no size limits, which are there against
    # hostile input, and an answer of thousands of entries is legitimately large.
    return etree.XMLParser(resolve_entities=False, no_network=True, load_dtd=False, huge_tree=True)


def parse_own(data: bytes) -> etree._Element:
    """A tree of XML text DUO itself wrote (with :func:`escape_attribute` and :func:`escape_text`)."""
    return etree.fromstring(data, parser=_own_parser())


def qname(ns: str, local: str) -> str:
    """Clark notation (``{ns}local``), the form lxml uses for tags and attribute names."""
    return f"{{{ns}}}{local}"


_DATETIME = re.compile(r"(\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2})(\.\d+)?(Z|[+-]\d{2}:\d{2})")


def parse_datetime(value: str | None, what: str) -> datetime:
    """xs:dateTime with a mandatory zone; fractions beyond microseconds are cut, not refused.

    A time without a zone is refused because every caller compares it with "now" to decide whether
    something is still valid, and a guessed zone would move that decision by hours. ``fullmatch`` so a
    trailing newline is not silently accepted. Raises :class:`XmlError` naming ``what``, for the
    caller to turn into its own refusal.
    """
    m = _DATETIME.fullmatch(value or "")
    if m is None:
        raise XmlError(f"{what} is missing or not an xs:dateTime with a time zone")
    fraction = (m.group(2) or ".0")[1:7].ljust(6, "0")
    zone = "+00:00" if m.group(3) == "Z" else m.group(3)
    try:
        return datetime.fromisoformat(f"{m.group(1)}.{fraction}{zone}")
    except ValueError:
        raise XmlError(f"{what} is not a valid date and time") from None


def format_datetime(t: datetime) -> str:
    """UTC with millisecond precision and ``Z``, as B365 writes (``Date.toISOString()``).

    One form for every timestamp DUO writes (SAML, wsu:Timestamp, FHIR, the DICOM audit message's
    EventDateTime), so what it sends is always what it would itself accept, and sorts as text.
    """
    if t.tzinfo is None or t.utcoffset() is None:
        raise ValueError("the time must be timezone-aware")
    utc = t.astimezone(UTC)
    return utc.strftime("%Y-%m-%dT%H:%M:%S.") + f"{utc.microsecond // 1000:03d}Z"
