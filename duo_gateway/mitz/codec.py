"""What the three Mitz codecs share: the error types, the value checks and the SOAP request envelope.

The Mitz wire formats are pure codecs, bytes or JSON in, frozen typed messages out, no I/O, one module
per format (:mod:`.xacml` closed question, :mod:`.xcpd` open question, :mod:`.fhir` subscriptions and
notifications). Each serves both sides (the gateway's client and the simulator), so whatever the
gateway sends is, by construction, what the simulator accepts, and every wire detail lives next to
the reference it came from (``docs/mitz.md``).

Two parsing policies, on purpose:

* **Closed answers fail closed without raising.** A consent check is a security gate, so
  :func:`~duo_gateway.mitz.xacml.parse_closed_answer` turns *anything* unexpected into "not permitted"
  with a ``reason``; a caller cannot forget an ``except`` and let a bug become a disclosure.
* **Everything else raises a typed** :class:`MitzError`: an open answer or a request that is off
  must be reported, and the caller (client or simulator) maps it to its own error shape.

Choices where ``mitz.md`` marks the wire as UNVERIFIED are documented at the constant or function
that makes them.
"""

from __future__ import annotations

import re
from datetime import datetime

from lxml import etree

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.soap.envelope import NSMAP, SOAP12_NS, WSA_ANONYMOUS, WSA_NS, Envelope, parse_envelope
from duo_gateway.soap.xml import XmlError, parse_datetime, qname

_OID_RE = re.compile(r"^[0-2](\.(0|[1-9][0-9]*))+$")
_URA_RE = re.compile(r"^[0-9]{1,8}$")


# --------------------------------------------------------------------------------------------------
# Errors
# --------------------------------------------------------------------------------------------------


class MitzError(Exception):
    """Base of every Mitz codec error; messages never contain a BSN, so they are safe to log."""


class MitzRequestError(MitzError, ValueError):
    """A question is incomplete or malformed: the client must not ask it, the simulator refuses it."""


class MitzSecurityError(MitzRequestError):
    """The XUA assertion of an open question is missing or unacceptable (wsse:InvalidSecurity)."""


class MitzAnswerError(MitzError):
    """An answer from Mitz cannot be trusted (malformed, wrong action, not ours)."""


class MitzFault(MitzAnswerError):
    """Mitz answered with a SOAP Fault; kept apart so the client can tell "refused" from "garbage"."""

    def __init__(self, code: str, reason: str) -> None:
        super().__init__(f"Mitz SOAP fault {code}: {reason}")
        self.code = code
        self.reason = reason


# --------------------------------------------------------------------------------------------------
# Small validators shared by both directions and all three formats
# --------------------------------------------------------------------------------------------------


def require_bsn(bsn: str, exc: type[MitzError] = MitzRequestError) -> None:
    # The value itself stays out of the message: errors end up in logs and faults.
    if not is_valid_bsn(bsn):
        raise exc("BSN is not nine digits passing the 11-proef")


def require_text(name: str, value: str | None, exc: type[MitzError] = MitzRequestError) -> str:
    """Whitespace is not a value: NK refuses to ask Mitz with any input missing (mitz.md §2.3)."""
    if value is None or not value.strip():
        raise exc(f"{name} is required")
    return value


def require_ura(name: str, value: str, exc: type[MitzError] = MitzRequestError) -> None:
    """The Mitz codecs' URA rule (up to eight digits); the XUA door is stricter (exactly eight)."""
    if not _URA_RE.match(value):
        raise exc(f"{name} must be a URA (up to eight digits)")


def bare_oid(value: str) -> str:
    """``urn:oid:1.2.3`` or ``1.2.3`` → ``1.2.3``; FHIR ``oid`` values carry the prefix, HL7v3 roots don't."""
    return value[len("urn:oid:") :] if value.startswith("urn:oid:") else value


def is_oid(value: str) -> bool:
    """A bare dotted OID without leading zeros, as the HL7v3 ``root`` and FHIR ``oid`` types require."""
    return bool(_OID_RE.match(value))


def parse_time(value: str | None, what: str, exc: type[MitzError]) -> datetime:
    """:func:`~duo_gateway.soap.xml.parse_datetime`, refusing with the caller's Mitz error type."""
    try:
        return parse_datetime(value, what)
    except XmlError as e:
        raise exc(str(e)) from None


# --------------------------------------------------------------------------------------------------
# The SOAP 1.2 envelope of the closed and the open question (mitz.md §2.4, §3)
# --------------------------------------------------------------------------------------------------


def request_envelope(
    action: str,
    message_id: str,
    to_url: str,
    body: etree._Element,
    security: etree._Element | None = None,
) -> etree._Element:
    """Headers in the order of the mitz.md §2.4 skeleton (Action, MessageID, To, ReplyTo)."""
    env = etree.Element(qname(SOAP12_NS, "Envelope"), nsmap=NSMAP)
    header = etree.SubElement(env, qname(SOAP12_NS, "Header"))
    action_el = etree.SubElement(header, qname(WSA_NS, "Action"))
    action_el.set(qname(SOAP12_NS, "mustUnderstand"), "1")
    action_el.text = action
    etree.SubElement(header, qname(WSA_NS, "MessageID")).text = message_id
    to_el = etree.SubElement(header, qname(WSA_NS, "To"))
    to_el.set(qname(SOAP12_NS, "mustUnderstand"), "1")
    to_el.text = to_url
    reply = etree.SubElement(header, qname(WSA_NS, "ReplyTo"))
    etree.SubElement(reply, qname(WSA_NS, "Address")).text = WSA_ANONYMOUS
    if security is not None:
        header.append(security)
    etree.SubElement(env, qname(SOAP12_NS, "Body")).append(body)
    return env


def as_envelope(data: bytes | Envelope, exc: type[MitzError]) -> Envelope:
    """Bytes are parsed here; a SoapFault (VersionMismatch, or a Fault body) propagates unchanged."""
    if isinstance(data, Envelope):
        return data
    try:
        return parse_envelope(data)
    except XmlError as e:
        raise exc(str(e)) from e


def require_action(env: Envelope, expected: str, exc: type[MitzError]) -> None:
    if env.addressing.action != expected:
        raise exc(f"unexpected wsa:Action {env.addressing.action!r}, expected {expected!r}")

