"""The shared XML helpers: one xs:dateTime rule for every codec that reads or writes a timestamp."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from duo_gateway.soap.xml import XmlError, format_datetime, parse_datetime, qname

CET = timezone(timedelta(hours=1))


def test_qname_is_clark_notation() -> None:
    assert qname("urn:x", "Local") == "{urn:x}Local"


@pytest.mark.parametrize(
    "text,expected",
    [
        ("2026-03-04T10:15:30Z", datetime(2026, 3, 4, 10, 15, 30, tzinfo=UTC)),
        ("2026-03-04T10:15:30.123Z", datetime(2026, 3, 4, 10, 15, 30, 123000, tzinfo=UTC)),
        # Beyond microseconds is cut, not rounded and not refused (.NET writes seven digits).
        ("2026-03-04T10:15:30.1234567Z", datetime(2026, 3, 4, 10, 15, 30, 123456, tzinfo=UTC)),
        ("2026-03-04T11:15:30+01:00", datetime(2026, 3, 4, 11, 15, 30, tzinfo=CET)),
    ],
)
def test_parse_datetime_reads_a_zoned_xs_datetime(text: str, expected: datetime) -> None:
    parsed = parse_datetime(text, "Created")
    assert parsed == expected
    assert parsed.utcoffset() == expected.utcoffset()


@pytest.mark.parametrize(
    "text",
    [None, "", "2026-03-04T10:15:30", "2026-03-04 10:15:30Z", "2026-03-04T10:15:30Z\n",
     " 2026-03-04T10:15:30Z", "2026-03-04"],
)
def test_parse_datetime_refuses_anything_without_a_zone_or_off_the_pattern(text: str | None) -> None:
    with pytest.raises(XmlError, match=r"^NotOnOrAfter is missing or not an xs:dateTime with a time zone$"):
        parse_datetime(text, "NotOnOrAfter")


def test_parse_datetime_refuses_an_impossible_date() -> None:
    with pytest.raises(XmlError, match=r"^IssueInstant is not a valid date and time$"):
        parse_datetime("2026-02-30T10:15:30Z", "IssueInstant")


def test_format_datetime_is_utc_milliseconds_with_z() -> None:
    t = datetime(2026, 3, 4, 11, 15, 30, 123999, tzinfo=CET)
    assert format_datetime(t) == "2026-03-04T10:15:30.123Z"
    assert format_datetime(datetime(2026, 3, 4, 10, 15, 30, tzinfo=UTC)) == "2026-03-04T10:15:30.000Z"


def test_format_datetime_is_what_parse_datetime_reads() -> None:
    t = datetime(2026, 3, 4, 10, 15, 30, 123000, tzinfo=UTC)
    assert parse_datetime(format_datetime(t), "t") == t


def test_format_datetime_refuses_a_naive_time() -> None:
    with pytest.raises(ValueError, match="timezone-aware"):
        format_datetime(datetime(2026, 3, 4, 10, 15, 30))
