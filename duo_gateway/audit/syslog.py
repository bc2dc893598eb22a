"""Syslog framing of audit records, byte for byte as IHE ATNA repositories expect it (pure, no I/O).

RFC 5424 message: ``<85>1 TIMESTAMP HOST APP PROCID IHE+RFC-3881 - `` + UTF-8 BOM + XML, which is what
IPF sends (PRI 85 = facility authpriv (10) * 8 + severity notice (5)). RFC 5425 carries it over TLS with
octet counting: ``"<byte length> <message>"``. The parsers exist for tests, the simulator's audit
repository and tooling that reads the local audit file back.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime

#: authpriv.notice: audit records are security information, kept apart from ordinary syslog.
PRI_AUTHPRIV_NOTICE = 85
#: MSGID that tells the repository the payload is an RFC 3881 / DICOM audit message.
MSGID_IHE = "IHE+RFC-3881"
BOM = b"\xef\xbb\xbf"
NILVALUE = "-"

#: A frame larger than this is refused by the parser: no audit record comes near it, so a bigger
#: length prefix means the stream is corrupt or hostile.
DEFAULT_MAX_FRAME = 4 * 1024 * 1024

# RFC 5424 §6: header fields are PRINTUSASCII (33..126), each with its own maximum length.
_MAX_HOSTNAME, _MAX_APP_NAME, _MAX_PROCID, _MAX_MSGID = 255, 48, 128, 32
_NOT_PRINTUSASCII = re.compile(r"[^!-~]")


class SyslogError(ValueError):
    """Bytes that are not a well-formed RFC 5424 message or RFC 5425 frame stream."""


def header_field(value: str, max_len: int) -> str:
    """Make ``value`` a legal header field: non-printable characters would split the header."""
    cleaned = _NOT_PRINTUSASCII.sub("_", value)[:max_len]
    return cleaned or NILVALUE


def format_timestamp(when: datetime) -> str:
    """RFC 3339 in UTC with milliseconds, as RFC 5424 §6.2.3 allows (``2024-05-01T12:00:00.000Z``)."""
    if when.tzinfo is None or when.utcoffset() is None:
        raise ValueError("syslog timestamps must be timezone-aware")
    return when.astimezone(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def format_message(
    xml: bytes,
    *,
    timestamp: datetime,
    hostname: str,
    app_name: str,
    procid: str | int,
    msgid: str = MSGID_IHE,
    pri: int = PRI_AUTHPRIV_NOTICE,
) -> bytes:
    """One RFC 5424 message with no structured data and the XML, BOM-prefixed, as its MSG."""
    if not 0 <= pri <= 191:
        raise ValueError("PRI must be 0..191")
    header = " ".join((
        f"<{pri}>1",
        format_timestamp(timestamp),
        header_field(hostname, _MAX_HOSTNAME),
        header_field(app_name, _MAX_APP_NAME),
        header_field(str(procid), _MAX_PROCID),
        header_field(msgid, _MAX_MSGID),
        NILVALUE,
    ))
    return header.encode("ascii") + b" " + BOM + xml


def frame(message: bytes) -> bytes:
    """RFC 5425 octet counting: the length is in bytes, so multibyte UTF-8 counts per byte."""
    return b"%d " % len(message) + message


class FrameDecoder:
    """Incremental RFC 5425 octet-counting decoder for a byte stream that arrives in arbitrary chunks."""

    def __init__(self, max_frame: int = DEFAULT_MAX_FRAME) -> None:
        self._buffer = bytearray()
        self._max_frame = max_frame
        self._max_digits = len(str(max_frame))

    @property
    def buffered(self) -> int:
        """Bytes of an incomplete frame still waiting for the rest of the stream."""
        return len(self._buffer)

    def feed(self, data: bytes) -> list[bytes]:
        """Add bytes, return every frame now complete; raise ``SyslogError`` on a corrupt stream."""
        self._buffer += data
        frames: list[bytes] = []
        while True:
            space = self._buffer.find(b" ", 0, self._max_digits + 1)
            if space < 0:
                head = bytes(self._buffer)
                if not head or (len(head) <= self._max_digits and head.isdigit() and head[:1] != b"0"):
                    return frames
                raise SyslogError("frame does not start with an octet count")
            digits = bytes(self._buffer[:space])
            if not digits.isdigit() or digits.startswith(b"0"):
                raise SyslogError("frame does not start with an octet count")
            length = int(digits)
            if length > self._max_frame:
                raise SyslogError(f"frame of {length} bytes exceeds the limit of {self._max_frame}")
            end = space + 1 + length
            if len(self._buffer) < end:
                return frames
            frames.append(bytes(self._buffer[space + 1 : end]))
            del self._buffer[:end]


def parse_frames(data: bytes, *, max_frame: int = DEFAULT_MAX_FRAME) -> list[bytes]:
    """Every frame of a complete stream; a truncated last frame is an error, never silently dropped."""
    decoder = FrameDecoder(max_frame)
    frames = decoder.feed(data)
    if decoder.buffered:
        raise SyslogError(f"stream ends inside a frame ({decoder.buffered} bytes left)")
    return frames


@dataclass(frozen=True, slots=True)
class SyslogMessage:
    pri: int
    version: int
    timestamp: str
    hostname: str
    app_name: str
    procid: str
    msgid: str
    structured_data: str
    #: MSG without the BOM; ``has_bom`` says whether it was there (RFC 5424 §6.4: then it is UTF-8).
    msg: bytes
    has_bom: bool


_HEADER = re.compile(rb"<(\d{1,3})>([1-9]\d{0,2}) ([!-~]+) ([!-~]+) ([!-~]+) ([!-~]+) ([!-~]+) ")


def _structured_data_end(data: bytes, start: int) -> int:
    """Index just past STRUCTURED-DATA: ``-`` or ``[...]`` elements, where ``\\]`` inside values escapes."""
    if data[start : start + 1] == b"-":
        return start + 1
    i = start
    while data[i : i + 1] == b"[":
        i += 1
        in_value = False
        while True:
            if i >= len(data):
                raise SyslogError("unterminated STRUCTURED-DATA")
            c = data[i : i + 1]
            if in_value and c == b"\\":
                i += 2
                continue
            if c == b'"':
                in_value = not in_value
            elif c == b"]" and not in_value:
                i += 1
                break
            i += 1
    if i == start:
        raise SyslogError("STRUCTURED-DATA must be '-' or start with '['")
    return i


def parse_message(data: bytes) -> SyslogMessage:
    """Split an RFC 5424 message into its header fields and MSG."""
    match = _HEADER.match(data)
    if match is None:
        raise SyslogError("not an RFC 5424 header")
    pri = int(match.group(1))
    if pri > 191:
        raise SyslogError("PRI out of range")
    sd_start = match.end()
    sd_end = _structured_data_end(data, sd_start)
    rest = data[sd_end:]
    if rest and not rest.startswith(b" "):
        raise SyslogError("STRUCTURED-DATA must be followed by a space or the end of the message")
    msg = rest[1:]
    has_bom = msg.startswith(BOM)
    fields = [g.decode("ascii") for g in match.groups()[2:]]
    return SyslogMessage(
        pri=pri,
        version=int(match.group(2)),
        timestamp=fields[0],
        hostname=fields[1],
        app_name=fields[2],
        procid=fields[3],
        msgid=fields[4],
        structured_data=data[sd_start:sd_end].decode("utf-8"),
        msg=msg[len(BOM):] if has_bom else msg,
        has_bom=has_bom,
    )
