"""SOAP 1.2 envelopes with WS-Addressing (ITI TF-2 Appendix V), pure: bytes in, typed message out."""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field

from lxml import etree

from duo_gateway.soap.xml import XML_NS, XmlError, parse_xml, qname, to_bytes

SOAP12_NS = "http://www.w3.org/2003/05/soap-envelope"
SOAP11_NS = "http://schemas.xmlsoap.org/soap/envelope/"
WSA_NS = "http://www.w3.org/2005/08/addressing"
WSA_ANONYMOUS = "http://www.w3.org/2005/08/addressing/anonymous"
SOAP12_CONTENT_TYPE = "application/soap+xml"

NSMAP = {"s": SOAP12_NS, "a": WSA_NS}


def new_message_id() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


@dataclass(frozen=True)
class Addressing:
    action: str
    message_id: str | None = None
    to: str | None = None
    relates_to: str | None = None
    reply_to: str | None = None


@dataclass
class Envelope:
    """A parsed SOAP 1.2 message; ``headers`` keeps every header block for the security layer."""

    addressing: Addressing
    body: etree._Element | None
    headers: list[etree._Element] = field(default_factory=list)

    def header(self, namespace: str, local: str) -> etree._Element | None:
        for h in self.headers:
            if h.tag == f"{{{namespace}}}{local}":
                return h
        return None


class SoapFault(Exception):
    """A fault to send back, or one received from a peer.

    ``code`` is ``Sender``/``Receiver``/``VersionMismatch``/``MustUnderstand``; ``subcode`` a QName
    as ``(namespace, local)`` such as ``wsse:InvalidSecurity``.
    """

    def __init__(
        self,
        code: str,
        reason: str,
        subcode: tuple[str, str] | None = None,
        detail: str | None = None,
    ) -> None:
        super().__init__(reason)
        self.code = code
        self.reason = reason
        self.subcode = subcode
        self.detail = detail


class EnvelopeError(XmlError):
    """The bytes are XML but not an acceptable SOAP 1.2 envelope."""


def _wsa(tag: str, text: str, must_understand: bool = False) -> etree._Element:
    el = etree.Element(f"{{{WSA_NS}}}{tag}", nsmap=NSMAP)
    if must_understand:
        el.set(f"{{{SOAP12_NS}}}mustUnderstand", "1")
    el.text = text
    return el


def build_envelope(
    addressing: Addressing,
    body: etree._Element | None,
    extra_headers: list[etree._Element] | None = None,
) -> etree._Element:
    """Build an envelope; Action and To are mustUnderstand as real IHE peers send them."""
    env = etree.Element(f"{{{SOAP12_NS}}}Envelope", nsmap=NSMAP)
    header = etree.SubElement(env, f"{{{SOAP12_NS}}}Header")
    header.append(_wsa("Action", addressing.action, must_understand=True))
    if addressing.message_id:
        header.append(_wsa("MessageID", addressing.message_id))
    if addressing.relates_to:
        header.append(_wsa("RelatesTo", addressing.relates_to))
    if addressing.reply_to:
        reply = etree.SubElement(header, f"{{{WSA_NS}}}ReplyTo")
        etree.SubElement(reply, f"{{{WSA_NS}}}Address").text = addressing.reply_to
    if addressing.to:
        header.append(_wsa("To", addressing.to, must_understand=True))
    for h in extra_headers or []:
        header.append(h)
    body_el = etree.SubElement(env, f"{{{SOAP12_NS}}}Body")
    if body is not None:
        body_el.append(body)
    return env


def serialize(envelope: etree._Element) -> bytes:
    return to_bytes(envelope)


def element_bytes(element: etree._Element) -> bytes:
    """One element as UTF-8 without an XML declaration, to go into :func:`serialize_with`."""
    return etree.tostring(element, encoding="UTF-8", xml_declaration=False)


_EMPTY_TAIL = b"</s:Header><s:Body/></s:Envelope>"


def serialize_with(addressing: Addressing, body: bytes, headers: list[bytes] | None = None) -> bytes:
    """``serialize(build_envelope(addressing, body, headers))`` for a body and header blocks that are
    already serialized (:func:`element_bytes`), without parsing or copying them.

    For a request sent to many peers: the signed assertion and the query are serialized once, only the
    addressing differs. Each part is a complete element that declares every namespace it uses, so the
    result is the same XML infoset (namespace declarations may repeat where lxml would hoist them).
    """
    raw = serialize(build_envelope(addressing, None))
    if not raw.endswith(_EMPTY_TAIL):
        raise AssertionError("unexpected envelope serialization")
    return b"".join([raw[:-len(_EMPTY_TAIL)], *(headers or []), b"</s:Header><s:Body>", body,
                     b"</s:Body></s:Envelope>"])


def _text(header: etree._Element, local: str) -> str | None:
    el = header.find(f"{{{WSA_NS}}}{local}")
    if el is None or el.text is None:
        return None
    return el.text.strip()


def parse_envelope(data: bytes | etree._Element) -> Envelope:
    """Parse a SOAP 1.2 envelope. A SOAP 1.1 envelope raises a VersionMismatch fault to answer with."""
    root = parse_xml(data) if isinstance(data, bytes) else data
    if root.tag == f"{{{SOAP11_NS}}}Envelope":
        raise SoapFault("VersionMismatch", "SOAP 1.1 is not supported; use SOAP 1.2")
    if root.tag != f"{{{SOAP12_NS}}}Envelope":
        raise EnvelopeError(f"not a SOAP 1.2 envelope: root element {root.tag}")
    header = root.find(f"{{{SOAP12_NS}}}Header")
    body = root.find(f"{{{SOAP12_NS}}}Body")
    if body is None:
        raise EnvelopeError("SOAP envelope without Body")
    headers = [h for h in header if isinstance(h.tag, str)] if header is not None else []
    action = _text(header, "Action") if header is not None else None
    reply_to = None
    if header is not None:
        rt = header.find(f"{{{WSA_NS}}}ReplyTo/{{{WSA_NS}}}Address")
        reply_to = rt.text.strip() if rt is not None and rt.text else None
    addressing = Addressing(
        action=action or "",
        message_id=_text(header, "MessageID") if header is not None else None,
        to=_text(header, "To") if header is not None else None,
        relates_to=_text(header, "RelatesTo") if header is not None else None,
        reply_to=reply_to,
    )
    children = [c for c in body if isinstance(c.tag, str)]
    payload = children[0] if children else None
    if payload is not None and payload.tag == f"{{{SOAP12_NS}}}Fault":
        raise _parse_fault(payload)
    return Envelope(addressing=addressing, body=payload, headers=headers)


def _parse_fault(fault: etree._Element) -> SoapFault:
    ns = {"s": SOAP12_NS}
    code = fault.findtext("s:Code/s:Value", namespaces=ns) or "Receiver"
    code = code.split(":")[-1]
    reason = fault.findtext("s:Reason/s:Text", namespaces=ns) or ""
    sub_el = fault.find("s:Code/s:Subcode/s:Value", namespaces=ns)
    subcode = None
    if sub_el is not None and sub_el.text:
        prefix, _, local = sub_el.text.strip().rpartition(":")
        subcode = (sub_el.nsmap.get(prefix or None, "") or "", local)
    detail_el = fault.find("s:Detail", namespaces=ns)
    detail = "".join(str(t) for t in detail_el.itertext()).strip() if detail_el is not None else None
    return SoapFault(code, reason.strip(), subcode, detail or None)


def build_fault(fault: SoapFault, relates_to: str | None = None) -> etree._Element:
    """A SOAP 1.2 fault envelope; answered with HTTP 500 (Receiver) or 400 (Sender) by the transport."""
    body = etree.Element(f"{{{SOAP12_NS}}}Fault", nsmap=NSMAP)
    code = etree.SubElement(body, f"{{{SOAP12_NS}}}Code")
    etree.SubElement(code, f"{{{SOAP12_NS}}}Value").text = f"s:{fault.code}"
    if fault.subcode:
        ns, local = fault.subcode
        sub = etree.SubElement(code, f"{{{SOAP12_NS}}}Subcode")
        # The subcode is a QName in text content, which lxml cannot see: reuse the prefix already
        # bound to the namespace (lxml would drop a second declaration), else declare one here.
        prefix = next((p for p, uri in sub.nsmap.items() if uri == ns and p), None)
        if prefix is None:
            prefix = "f"
            value = etree.SubElement(sub, f"{{{SOAP12_NS}}}Value", nsmap={prefix: ns})
        else:
            value = etree.SubElement(sub, f"{{{SOAP12_NS}}}Value")
        value.text = f"{prefix}:{local}"
    reason = etree.SubElement(body, f"{{{SOAP12_NS}}}Reason")
    text = etree.SubElement(reason, f"{{{SOAP12_NS}}}Text")
    text.set(qname(XML_NS, "lang"), "en")
    text.text = fault.reason
    if fault.detail:
        etree.SubElement(body, f"{{{SOAP12_NS}}}Detail").text = fault.detail
    addressing = Addressing(
        action="http://www.w3.org/2005/08/addressing/soap/fault",
        message_id=new_message_id(),
        relates_to=relates_to,
    )
    envelope = build_envelope(addressing, body)
    if fault.code == "VersionMismatch":
        # SOAP 1.2 §5.4.7: tell the sender which envelope version is understood.
        header = envelope.find(f"{{{SOAP12_NS}}}Header")
        assert header is not None
        upgrade = etree.SubElement(header, f"{{{SOAP12_NS}}}Upgrade")
        supported = etree.SubElement(upgrade, f"{{{SOAP12_NS}}}SupportedEnvelope")
        supported.set("qname", "s:Envelope")
    return envelope


def fault_http_status(fault: SoapFault) -> int:
    """SOAP 1.2 Part 2 §7.5.1.2: only a Sender fault is the client's error (400); VersionMismatch,
    MustUnderstand and Receiver faults are answered with 500."""
    return 400 if fault.code == "Sender" else 500
