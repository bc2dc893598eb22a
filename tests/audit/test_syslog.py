"""RFC 5424 header bytes and RFC 5425 octet counting, exactly as IHE repositories parse them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from duo_gateway.audit.syslog import (
    BOM,
    FrameDecoder,
    SyslogError,
    format_message,
    frame,
    parse_frames,
    parse_message,
)

WHEN = datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC)


def test_header_bytes_are_exactly_what_ipf_sends() -> None:
    msg = format_message(b"<AuditMessage/>", timestamp=WHEN, hostname="gw1.example.nl",
                         app_name="duo-gateway", procid=4242)
    assert msg == (b"<85>1 2024-05-01T12:00:00.123Z gw1.example.nl duo-gateway 4242 IHE+RFC-3881 - "
                   b"\xef\xbb\xbf<AuditMessage/>")


def test_timestamp_is_normalised_to_utc_and_must_be_aware() -> None:
    cest = datetime(2024, 5, 1, 14, 0, 0, tzinfo=timezone(timedelta(hours=2)))
    msg = format_message(b"x", timestamp=cest, hostname="h", app_name="a", procid=1)
    assert msg.startswith(b"<85>1 2024-05-01T12:00:00.000Z h a 1 ")
    with pytest.raises(ValueError, match="timezone"):
        format_message(b"x", timestamp=datetime(2024, 5, 1), hostname="h", app_name="a", procid=1)


def test_header_fields_cannot_be_split_or_overlong() -> None:
    """A space or non-ASCII byte in a header field would shift every later field for the parser."""
    msg = format_message(b"x", timestamp=WHEN, hostname="my host\u00e9", app_name="a" * 60, procid="")
    parsed = parse_message(msg)
    assert parsed.hostname == "my_host_"
    assert parsed.app_name == "a" * 48
    assert parsed.procid == "-"


def test_octet_count_is_in_bytes_not_characters() -> None:
    message = "<a>Ë€𝄞</a>".encode()  # 2 + 3 + 4 byte characters
    assert len(message) == 16
    assert frame(message) == b"16 " + message
    full = format_message(message, timestamp=WHEN, hostname="h", app_name="a", procid=1)
    header = b"<85>1 2024-05-01T12:00:00.123Z h a 1 IHE+RFC-3881 - "
    assert frame(full) == b"%d " % (len(header) + 3 + 16) + header + BOM + message
    assert len(full.decode("utf-8")) < len(full)  # counting characters would cut the frame short


def test_parse_round_trip() -> None:
    xml = '<?xml version="1.0" encoding="UTF-8"?><AuditMessage><x>Jansen-Ëlsbeth</x></AuditMessage>'.encode()
    msg = format_message(xml, timestamp=WHEN, hostname="10.0.0.5", app_name="duo-gateway", procid=77)
    parsed = parse_message(msg)
    assert (parsed.pri, parsed.version, parsed.timestamp) == (85, 1, "2024-05-01T12:00:00.123Z")
    assert (parsed.hostname, parsed.app_name, parsed.procid, parsed.msgid) == (
        "10.0.0.5", "duo-gateway", "77", "IHE+RFC-3881")
    assert parsed.structured_data == "-"
    assert parsed.has_bom and parsed.msg == xml


def test_parse_structured_data_with_escapes() -> None:
    raw = b'<13>1 - host app - ID47 [ex@1 a="x\\]y" b="[q]"][ex@2 c="d"] ' + BOM + b"hello"
    parsed = parse_message(raw)
    assert parsed.structured_data == '[ex@1 a="x\\]y" b="[q]"][ex@2 c="d"]'
    assert parsed.msg == b"hello"
    assert parse_message(b"<13>1 - host app - ID47 -").msg == b""


@pytest.mark.parametrize("raw", [b"85>1 - h a - m - x", b"<85>1 - h a - m", b"<192>1 - h a - m - x",
                                 b'<85>1 - h a - m [x a="b" y'])
def test_parse_rejects_malformed_messages(raw: bytes) -> None:
    with pytest.raises(SyslogError):
        parse_message(raw)


def test_frames_survive_arbitrary_chunking() -> None:
    messages = [b"first", "zwei-\u00eb".encode(), b"x" * 1234]
    stream = b"".join(frame(m) for m in messages)
    decoder = FrameDecoder()
    got: list[bytes] = []
    for i in range(len(stream)):
        got += decoder.feed(stream[i : i + 1])
    assert got == messages
    assert decoder.buffered == 0
    assert parse_frames(stream) == messages


@pytest.mark.parametrize("stream", [b"05 hello", b"x5 hello", b"-1 a", b"12345678901 x", b" 5 hello"])
def test_corrupt_streams_are_refused(stream: bytes) -> None:
    with pytest.raises(SyslogError):
        parse_frames(stream)


def test_oversized_and_truncated_frames_are_refused() -> None:
    with pytest.raises(SyslogError, match="exceeds"):
        FrameDecoder(max_frame=10).feed(b"11 ")
    with pytest.raises(SyslogError, match="ends inside a frame"):
        parse_frames(frame(b"complete") + b"9 partial")
    # An incomplete count is not yet an error: the rest of it may be in the next chunk.
    decoder = FrameDecoder()
    assert decoder.feed(b"1") == []
    assert decoder.feed(b"0 0123456789") == [b"0123456789"]
