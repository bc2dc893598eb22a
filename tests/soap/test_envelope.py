from __future__ import annotations

import pytest
from lxml import etree

from duo_gateway.soap.envelope import (
    SOAP11_NS,
    SOAP12_NS,
    WSA_ANONYMOUS,
    WSA_NS,
    Addressing,
    EnvelopeError,
    SoapFault,
    build_envelope,
    build_fault,
    fault_http_status,
    parse_envelope,
    serialize,
)
from duo_gateway.soap.xml import XmlError, parse_xml

NS = {"s": SOAP12_NS, "a": WSA_NS}


def test_envelope_round_trip_with_must_understand_headers() -> None:
    body = etree.Element("{urn:x}Ping")
    env = build_envelope(Addressing(action="urn:x:Ping", message_id="urn:uuid:1", to="http://peer/x",
                                    reply_to=WSA_ANONYMOUS), body)
    data = serialize(env)
    root = parse_xml(data)
    assert root.xpath("s:Header/a:Action/@s:mustUnderstand", namespaces=NS) == ["1"]
    assert root.xpath("s:Header/a:To/@s:mustUnderstand", namespaces=NS) == ["1"]
    assert root.xpath("s:Header/a:ReplyTo/a:Address/text()", namespaces=NS) == [WSA_ANONYMOUS]
    parsed = parse_envelope(data)
    assert parsed.addressing == Addressing("urn:x:Ping", "urn:uuid:1", "http://peer/x", None, WSA_ANONYMOUS)
    assert parsed.body is not None and parsed.body.tag == "{urn:x}Ping"


def test_any_prefixes_are_accepted() -> None:
    data = (f'<E:Envelope xmlns:E="{SOAP12_NS}" xmlns:w="{WSA_NS}"><E:Header><w:Action>urn:a</w:Action>'
            f'<w:RelatesTo> urn:uuid:9 </w:RelatesTo></E:Header><E:Body><p xmlns="urn:p"/></E:Body>'
            f'</E:Envelope>').encode()
    parsed = parse_envelope(data)
    assert parsed.addressing.action == "urn:a"
    assert parsed.addressing.relates_to == "urn:uuid:9"


def test_soap11_gets_version_mismatch() -> None:
    data = f'<e:Envelope xmlns:e="{SOAP11_NS}"><e:Body/></e:Envelope>'.encode()
    with pytest.raises(SoapFault) as info:
        parse_envelope(data)
    assert info.value.code == "VersionMismatch"
    fault = serialize(build_fault(info.value))
    assert parse_xml(fault).xpath("s:Header/s:Upgrade/s:SupportedEnvelope/@qname", namespaces=NS) == \
        ["s:Envelope"]


@pytest.mark.parametrize("data", [
    b"<notsoap/>",
    f'<s:Envelope xmlns:s="{SOAP12_NS}"><s:Header/></s:Envelope>'.encode(),
])
def test_non_envelopes_are_refused(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        parse_envelope(data)


@pytest.mark.parametrize("data", [
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY a "aaaa"><!ENTITY b "&a;&a;&a;">]><x>&b;</x>',
    b'<?xml version="1.0"?><!DOCTYPE x SYSTEM "http://127.0.0.1:9/evil.dtd"><x/>',
    b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e SYSTEM "file:///etc/passwd">]><x>&e;</x>',
    b"<x><unclosed></x>",
])
def test_hardened_parser_refuses_dtds_entities_and_garbage(data: bytes) -> None:
    with pytest.raises(XmlError):
        parse_xml(data)


def test_size_limit() -> None:
    with pytest.raises(XmlError, match="exceeds"):
        parse_xml(b"<x>" + b"a" * 100 + b"</x>", max_bytes=50)


@pytest.mark.parametrize(("subcode", "expected_prefix"), [
    ((WSA_NS, "ActionNotSupported"), "a"),          # namespace already in scope: reuse its prefix
    (("http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd",
      "InvalidSecurity"), "f"),
])
def test_fault_subcode_qname_resolves(subcode: tuple[str, str], expected_prefix: str) -> None:
    data = serialize(build_fault(SoapFault("Sender", "no", subcode, detail="why"), relates_to="urn:uuid:7"))
    value = parse_xml(data).xpath("//s:Subcode/s:Value", namespaces=NS)[0]
    assert value.text == f"{expected_prefix}:{subcode[1]}"
    with pytest.raises(SoapFault) as info:
        parse_envelope(data)
    assert info.value.subcode == subcode
    assert (info.value.code, info.value.reason, info.value.detail) == ("Sender", "no", "why")
    assert fault_http_status(info.value) == 400
    assert fault_http_status(SoapFault("Receiver", "x")) == 500
