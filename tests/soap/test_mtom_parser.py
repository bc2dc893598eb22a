"""One multipart parser, any chunking: the same bodies through MtomParser, parse_mtom and MtomStream.

Every body is fed whole, one byte at a time, and in random splits (fixed seeds), and must give the same
events to the core, the same envelope and attachments (or the same error) to the whole-body reader,
and the same to the streaming reader. The bodies are chosen where readers used to disagree: padding,
preamble and epilogue, near-delimiters inside content, truncation, and every limit.
"""

from __future__ import annotations

import base64
import random
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from duo_gateway.soap.mtom import (
    MAX_HEADER_BYTES,
    MAX_PADDING_BYTES,
    MAX_PREAMBLE_BYTES,
    NEED_DATA,
    MessageEnd,
    MtomError,
    MtomParser,
    PartData,
    PartEnd,
    PartStart,
    multipart_related,
    parse_mtom,
)
from duo_gateway.soap.mtom_stream import MtomStream
from duo_gateway.soap.xml import XmlError

B = "b1"
ENVELOPE = (b'<s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope"><s:Body>'
            b'<x:R xmlns:x="urn:x"/></s:Body></s:Envelope>')


def _ct(start: str | None = None) -> str:
    return f'multipart/related; boundary="{B}"; type="application/xop+xml"' + (
        f'; start="<{start}>"' if start else "")


def _part(cid: str | None, content: bytes, *, extra: str = "", sep: bytes = b"\r\n") -> bytes:
    head = f"--{B}".encode() + sep
    if cid is not None:
        head += f"Content-ID: <{cid}>".encode() + sep
    if extra:
        head += extra.encode() + sep
    return head + sep + content + sep


ROOT = _part("root@x", ENVELOPE)
CLOSE = f"--{B}--\r\n".encode()
#: 4 MiB of bare delimiters with empty header blocks (as tests/xca/test_responding_dos.py floods).
B64 = "Content-Transfer-Encoding: base64"
FLOOD = f"--{B}\r\n\r\n\r\n\r\n".encode() * (4 * 1024 * 1024 // 12)


@dataclass(frozen=True)
class Case:
    name: str
    body: bytes
    start: str | None = None
    max_parts: int = 100
    max_part_bytes: int = 1 << 20


CASES = [
    Case("golden", ROOT + _part("a@x", bytes(range(256)) * 8) + _part("e@x", b"") + CLOSE),
    Case("bare LF everywhere", _part("root@x", ENVELOPE, sep=b"\n") + _part("a@x", b"A\n\nB", sep=b"\n")
         + f"--{B}--\n".encode()),
    Case("transport padding",
         f"--{B} \t \r\nContent-ID: <root@x>\r\n\r\n".encode() + ENVELOPE
         + f"\r\n--{B}\t\nContent-ID: <a@x>\r\n\r\nA\r\n--{B}--  \t\r\n".encode()),
    Case("preamble and epilogue",
         b"This is a MIME message; in the middle of a line --b1 is no delimiter.\r\n" + ROOT
         + _part("a@x", b"A") + CLOSE + f"epilogue\r\n--{B}\r\nContent-ID: <z@x>\r\n\r\nnever read".encode()),
    Case("close delimiter at the very end", ROOT + _part("a@x", b"A") + f"--{B}--".encode()),
    Case("near-delimiters in content", ROOT + _part("a@x",
         b"x--b1\r\n--b1x\r\n--b1-\r\n--b1\rX\r\n--b\r\n--b1--x\r\n- -b1\r\n\r\r\n--b1X\r") + CLOSE),
    Case("content ending in CR and a bare-LF delimiter", ROOT + f"--{B}\r\nContent-ID: <a@x>\r\n\r\n".encode()
         + b"A\r\r\n--b1\nContent-ID: <b@x>\r\n\r\nB\n" + CLOSE),
    Case("empty header block", ROOT + f"--{B}\r\n\r\nanonymous\r\n".encode() + _part("a@x", b"A") + CLOSE),
    Case("header block right before the delimiter",
         ROOT + f"--{B}\r\nContent-ID: <a@x>\r\n\r\n--{B}\r\n\r\n".encode()
         + f"--{B}\r\nContent-ID: <b@x>\r\n\r\nB\r\n".encode() + CLOSE),
    Case("folded headers and header/body with LF LF",
         ROOT + f"--{B}\r\nContent-ID:\r\n <a@x>\r\nContent-Type: application/dicom\n\nA\r\n".encode()
         + CLOSE),
    Case("root not first, named by start", _part("a@x", b"A") + ROOT + _part("b@x", b"B") + CLOSE,
         start="root@x"),
    Case("base64 part", ROOT + _part("a@x", base64.encodebytes(bytes(range(256)) * 3), extra=B64) + CLOSE),
    Case("invalid base64", ROOT + _part("a@x", b"QUJD!!==", extra=B64) + CLOSE),
    Case("truncated base64", ROOT + _part("a@x", b"QUJDR", extra=B64) + CLOSE),
    Case("base64 root", _part("root@x", base64.b64encode(ENVELOPE), extra=B64) + CLOSE),
    Case("unknown encoding", ROOT + _part(None, b"x", extra="Content-Transfer-Encoding: quoted-printable")
         + CLOSE),
    Case("duplicate Content-ID", ROOT + _part("a@x", b"1") + _part("a@x", b"2") + CLOSE),
    Case("start part missing", ROOT + _part("a@x", b"A") + CLOSE, start="nope@x"),
    Case("no parts", b"preamble\r\n" + CLOSE),
    Case("no boundary at all", b"<html>502 Bad Gateway</html>"),
    Case("broken first delimiter", f"--{B}garbage\r\n".encode() + ROOT + CLOSE),
    Case("too much padding", f"--{B}".encode() + b" " * (MAX_PADDING_BYTES + 1) + b"\r\n" + ROOT[6:] + CLOSE),
    Case("preamble over the limit", b"x" * MAX_PREAMBLE_BYTES + b"\r\n" + ROOT + CLOSE),
    Case("preamble at the limit", b"x" * (MAX_PREAMBLE_BYTES - 2) + b"\r\n" + ROOT + CLOSE),
    Case("missing close delimiter", ROOT + _part("a@x", b"A")),
    Case("truncated inside the content", ROOT + _part("a@x", b"A" * 100)[:-40]),
    Case("truncated after a delimiter", ROOT + f"--{B}".encode()),
    Case("truncated in the headers", ROOT + f"--{B}\r\nContent-ID: <a".encode()),
    Case("malformed header", ROOT + f"--{B}\r\nno colon here\r\n\r\nx\r\n".encode() + CLOSE),
    Case("oversized headers", ROOT + f"--{B}\r\nX-Pad: ".encode() + b"a" * MAX_HEADER_BYTES + b"\r\n\r\nx\r\n"
         + CLOSE),
    Case("headers at the limit", ROOT + f"--{B}\r\nContent-ID: <a@x>\r\nX: ".encode()
         + b"a" * (MAX_HEADER_BYTES - 24) + b"\r\n\r\nA\r\n" + CLOSE),
    Case("too many parts", ROOT + b"".join(_part(f"p{i}@x", b"P") for i in range(5)) + CLOSE, max_parts=3),
    Case("exactly max parts", ROOT + b"".join(_part(f"p{i}@x", b"P") for i in range(2)) + CLOSE, max_parts=3),
    Case("oversized part", ROOT + _part("a@x", b"y" * 2001) + CLOSE, max_part_bytes=2000),
    Case("part at the size limit", ROOT + _part("a@x", b"y" * 2000) + CLOSE, max_part_bytes=2000),
    Case("oversized root", ROOT + CLOSE, max_part_bytes=len(ENVELOPE) - 1),
    Case("delimiter flood", FLOOD, start="root@x", max_parts=8),
    Case("malformed XML root", _part("root@x", b"<not xml") + CLOSE),
]


def _chunkings(body: bytes) -> Iterator[tuple[str, list[bytes]]]:
    yield "whole", [body]
    # One byte at a time (the flood is refused within its first parts, so its first bytes will do).
    yield "bytes", [body[i : i + 1] for i in range(len(body) if body is not FLOOD else 200_000)]
    for seed in (1, 2, 3):
        rng = random.Random(seed)
        cuts = sorted(rng.sample(range(1, len(body)), min(len(body) - 1, 40)))
        yield f"random-{seed}", [body[a:b] for a, b in zip([0, *cuts], [*cuts, len(body)], strict=True)]


Outcome = tuple[str, Any]


def _core(case: Case, chunks: Sequence[bytes]) -> Outcome:
    """The core's events with each part's data joined (how a part is cut into PartData may vary)."""
    related = multipart_related(_ct(case.start))
    assert related is not None
    parser = MtomParser(related, max_parts=case.max_parts, max_part_bytes=case.max_part_bytes,
                        max_root_bytes=min(case.max_part_bytes, 1 << 20))
    parts: list[tuple[str, bool, str, bytes]] = []
    data: list[bytes] = []
    start: PartStart | None = None
    feed = iter(chunks)
    ended = False
    try:
        while True:
            event = parser.next_event()
            if event is NEED_DATA:
                chunk = next(feed, None)
                if chunk is None:
                    assert not ended, "NEED_DATA after end()"
                    ended = True
                    parser.end()
                else:
                    parser.feed(chunk)
            elif isinstance(event, PartStart):
                start, data = event, []
            elif isinstance(event, PartData):
                assert event.data, "no empty PartData"
                data.append(event.data)
            elif isinstance(event, PartEnd):
                assert start is not None
                parts.append((start.content_id, start.is_root, start.content_type, b"".join(data)))
            else:
                assert isinstance(event, MessageEnd)
                return "ok", parts
    except MtomError as exc:
        with pytest.raises(MtomError, match="^" + re.escape(str(exc)) + "$"):  # again, on any later call
            parser.next_event()
        return "error", (str(exc), parts)


def _whole(case: Case) -> Outcome:
    try:
        root, attachments = parse_mtom(_ct(case.start), case.body, case.max_part_bytes,
                                       max_parts=case.max_parts, max_xml_bytes=1 << 20)
    except XmlError as exc:  # MtomError included
        return "error", str(exc)
    return "ok", (etree.tostring(root), list(attachments.items()))


class _Chunks:
    def __init__(self, chunks: Sequence[bytes]) -> None:
        self._chunks = iter(chunks)

    async def read(self, n: int = -1) -> bytes:
        return next(self._chunks, b"")


def _spool_files(spool: Path) -> list[Path]:
    return list(spool.iterdir())


async def _stream(case: Case, chunks: Sequence[bytes], spool: Path) -> Outcome:
    taken: list[tuple[str, bytes]] = []
    try:
        async with MtomStream(_ct(case.start), _Chunks(chunks), spool, max_parts=case.max_parts,
                              max_part_bytes=case.max_part_bytes, max_xml_bytes=1 << 20) as stream:
            root = await stream.envelope()
            async for part in stream.parts():
                taken.append((part.content_id, part.path.read_bytes()))
                part.path.unlink()
    except MtomError as exc:
        # The stream parses the envelope when the root part ends; parse_mtom once the body is split.
        return "error", str(exc).removeprefix("root part: ")
    finally:
        assert _spool_files(spool) == [], "the stream left spool files behind"
    return "ok", (etree.tostring(root), taken)


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
async def test_every_chunking_gives_the_same_parts_or_error(case: Case, tmp_path: Path) -> None:
    whole = _whole(case)
    reference = _core(case, [case.body])
    for name, chunks in _chunkings(case.body):
        assert _core(case, chunks) == reference, name
        assert await _stream(case, chunks, tmp_path) == whole, name
    # The core and parse_mtom agree too: the same attachments (by cid, root and anonymous parts
    # aside), or the same structural error.
    if whole[0] == "ok":
        assert reference[0] == "ok"
        attachments = [(cid, data) for cid, is_root, _, data in reference[1] if cid and not is_root]
        assert whole[1][1] == attachments
    elif reference[0] == "error":
        assert whole[1] == reference[1][0]


EXPECTED = {
    "golden": "ok", "bare LF everywhere": "ok", "transport padding": "ok", "preamble and epilogue": "ok",
    "close delimiter at the very end": "ok", "near-delimiters in content": "ok",
    "content ending in CR and a bare-LF delimiter": "ok", "empty header block": "ok",
    "header block right before the delimiter": "ok", "folded headers and header/body with LF LF": "ok",
    "root not first, named by start": "ok", "base64 part": "ok",
    "invalid base64": "invalid base64 in a MIME part", "truncated base64": "truncated base64 in a MIME part",
    "base64 root": "unsupported Content-Transfer-Encoding 'base64' for the root part",
    "unknown encoding": "unsupported Content-Transfer-Encoding 'quoted-printable' for a MIME part",
    "duplicate Content-ID": "duplicate Content-ID <a@x>",
    "start part missing": "the start part named in Content-Type is missing",
    "no parts": "multipart body without parts", "no boundary at all": "multipart body without its boundary",
    "broken first delimiter": "garbage after a MIME boundary",
    "too much padding": "garbage after a MIME boundary",
    "preamble over the limit": "multipart body without its boundary", "preamble at the limit": "ok",
    "missing close delimiter": "multipart body truncated: no closing delimiter",
    "truncated inside the content": "multipart body truncated: no closing delimiter",
    "truncated after a delimiter": "multipart body truncated after a boundary",
    "truncated in the headers": "multipart body truncated in a part's headers",
    "malformed header": "malformed MIME part header",
    "oversized headers": f"MIME part headers exceed {MAX_HEADER_BYTES} bytes", "headers at the limit": "ok",
    "too many parts": "more than 3 MIME parts", "exactly max parts": "ok",
    "oversized part": "MIME part exceeds the limit of 2000 bytes", "part at the size limit": "ok",
    "oversized root": f"root part (SOAP envelope) exceeds the limit of {len(ENVELOPE) - 1} bytes",
    "delimiter flood": "more than 8 MIME parts", "malformed XML root": "malformed XML",
}


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_body_is_accepted_or_refused_for_its_own_reason(case: Case) -> None:
    """What the readers agree on is also right: valid bodies pass, each broken one for its reason."""
    outcome, detail = _whole(case)
    expected = EXPECTED[case.name]
    if expected == "ok":
        assert outcome == "ok", detail
    else:
        assert outcome == "error" and str(detail).startswith(expected), detail


def test_content_that_almost_delimits_is_kept_byte_for_byte() -> None:
    case = next(c for c in CASES if c.name == "near-delimiters in content")
    _, attachments = parse_mtom(_ct(), case.body)
    assert attachments == {
        "a@x": b"x--b1\r\n--b1x\r\n--b1-\r\n--b1\rX\r\n--b\r\n--b1--x\r\n- -b1\r\n\r\r\n--b1X\r"}
    case = next(c for c in CASES if c.name == "header block right before the delimiter")
    assert parse_mtom(_ct(), case.body)[1] == {"a@x": b"", "b@x": b"B"}


def test_the_flood_is_refused_within_its_first_parts_not_after_scanning_it() -> None:
    related = multipart_related(_ct("root@x"))
    assert related is not None
    parser = MtomParser(related, max_parts=8)
    parser.feed(FLOOD)
    events = 0
    with pytest.raises(MtomError, match="more than 8 MIME parts"):
        while not isinstance(parser.next_event(), MessageEnd):
            events += 1
    assert events == 8 * 3  # PartStart, PartData, PartEnd of each part allowed, then the refusal


def test_after_the_close_delimiter_more_bytes_are_ignored_and_the_end_repeats() -> None:
    related = multipart_related(_ct())
    assert related is not None
    parser = MtomParser(related)
    parser.feed(ROOT + CLOSE)
    events = []
    while not isinstance(event := parser.next_event(), MessageEnd):
        events.append(type(event))
    assert events == [PartStart, PartData, PartEnd]
    parser.feed(b"--b1\r\nnot a part at all")
    assert isinstance(parser.next_event(), MessageEnd)
    parser.end()
    assert isinstance(parser.next_event(), MessageEnd)
    with pytest.raises(RuntimeError):
        parser.feed(b"x")


@pytest.mark.parametrize("header", ["multipart/related", 'multipart/related; boundary=""',
                                    "multipart/related; boundary=" + "x" * 201])
def test_an_unusable_boundary_is_refused_by_both_readers(header: str, tmp_path: Path) -> None:
    with pytest.raises(MtomError, match="multipart/related without a usable boundary"):
        parse_mtom(header, ROOT + CLOSE)
    with pytest.raises(MtomError, match="multipart/related without a usable boundary"):
        MtomStream(header, _Chunks([ROOT + CLOSE]), tmp_path)
    assert multipart_related("application/soap+xml; boundary=b1") is None
