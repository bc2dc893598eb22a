"""What the Mitz SOAP codec tests share: XPath with the prefixes of mitz.md's examples, hostile XML."""

from __future__ import annotations

from typing import Any

from lxml import etree

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
MU = "{http://www.w3.org/2003/05/soap-envelope}mustUnderstand"
MSG = "urn:uuid:11111111-2222-4333-8444-555555555555"
BILLION_LAUGHS = b"""<?xml version="1.0"?>
<!DOCTYPE lolz [<!ENTITY lol "lol"><!ENTITY lol2 "&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;&lol;">
<!ENTITY lol3 "&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;&lol2;">]>
<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>&lol3;</s:Body></s:Envelope>"""


def xp(el: etree._Element, path: str) -> list[Any]:
    result = el.xpath(path, namespaces=NS)
    assert isinstance(result, list)
    return result


def one(el: etree._Element, path: str) -> Any:
    found = xp(el, path)
    assert len(found) == 1, f"{path}: {len(found)} matches"
    return found[0]

