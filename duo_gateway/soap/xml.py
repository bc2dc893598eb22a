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
