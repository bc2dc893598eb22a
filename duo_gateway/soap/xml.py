"""Hardened XML parsing shared by every codec.

Peers are untrusted: a DTD, an entity or a network fetch inside a SOAP body is an attack surface (XXE,
billion laughs), so one parser configuration is used everywhere and nothing else may call
``etree.fromstring`` on peer bytes.
"""

from __future__ import annotations

from lxml import etree

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
