"""The streaming MTOM parser: golden bodies from build_mtom, hand-made edge cases, and a memory bound.

The source is fed in deliberately awkward chunk sizes (down to one byte), so every boundary, header
separator and base64 group ends up split across reads somewhere.
"""

from __future__ import annotations

import asyncio
import base64
import os
import tracemalloc
from collections.abc import Callable, Iterator, Sequence
from contextlib import aclosing
from pathlib import Path
from typing import Any

import pytest
from lxml import etree

from duo_gateway.soap import mtom_stream
from duo_gateway.soap.envelope import Addressing, build_envelope
from duo_gateway.soap.mtom import Attachment, MtomError, build_mtom, normalise_cid, xop_include
from duo_gateway.soap.mtom_stream import MtomStream, SpooledPart

XDSB = "urn:ihe:iti:xds-b:2007"
ACTION = "urn:ihe:rad:2011:CrossGatewayRetrieveImagingDocumentSetResponse"
BOUNDARY = "MIMEBoundary_test"
ENVELOPE = (b'<?xml version="1.0" encoding="UTF-8"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-envelope">'
            b"<s:Body><x:R xmlns:x=\"urn:x\"/></s:Body></s:Envelope>")


class ChunkedSource:
    """An ``async read(n)`` source that never returns more than the next scripted chunk size."""

    def __init__(self, data: bytes | Iterator[bytes], sizes: Sequence[int] = (65536,)) -> None:
        self._iter = iter([data]) if isinstance(data, bytes) else data
        self._buf = b""
        self._sizes = list(sizes)
        self._i = 0
        self.read_calls = 0

    async def read(self, n: int = -1) -> bytes:
        self.read_calls += 1
        size = self._sizes[self._i % len(self._sizes)]
        self._i += 1
        limit = min(n, size) if n > 0 else size
        while len(self._buf) < limit:
            nxt = next(self._iter, None)
            if nxt is None:
                break
            self._buf += nxt
        out, self._buf = self._buf[:limit], self._buf[limit:]
        return out


def _envelope(cids: Sequence[str]) -> etree._Element:
    body = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": XDSB})
    for cid in cids:
        d = etree.SubElement(etree.SubElement(body, f"{{{XDSB}}}DocumentResponse"), f"{{{XDSB}}}Document")
        d.append(xop_include(cid))
    return build_envelope(Addressing(action=ACTION, relates_to="urn:uuid:1"), body)


def _golden(payloads: dict[str, bytes]) -> tuple[str, bytes]:
    atts = [Attachment(cid, "application/dicom", data) for cid, data in payloads.items()]
    content_type, body = build_mtom(_envelope(list(payloads)), atts, ACTION, boundary=BOUNDARY)
    return content_type, bytes(body)


async def _read_all(stream: MtomStream, taken: list[SpooledPart] | None = None,
                    ) -> tuple[etree._Element, list[SpooledPart]]:
    """Envelope and parts; ``taken`` sees each part as it is handed over, even if a later one fails."""
    root = await stream.envelope()
    parts = [] if taken is None else taken
    async for part in stream.parts():
        parts.append(part)
    return root, parts


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir())


def _ct(start: str | None = None) -> str:
    extra = f'; start="<{start}>"' if start else ""
    return f'multipart/related; boundary="{BOUNDARY}"; type="application/xop+xml"{extra}'


def _part(cid: str, content: bytes, *, ctype: str = "application/dicom", encoding: str = "binary",
          sep: bytes = b"\r\n") -> bytes:
    head = sep.join([f"--{BOUNDARY}".encode(), f"Content-Type: {ctype}".encode(),
                     f"Content-Transfer-Encoding: {encoding}".encode(), f"Content-ID: <{cid}>".encode()])
    return head + sep + sep + content + sep


ROOT_CT = 'application/xop+xml; charset=UTF-8; type="application/soap+xml"'
PAYLOADS = {
    "a1@duo": b"DICM" + bytes(range(256)) * 40,
    # Content that looks like the start of a delimiter must survive intact.
    "b2@duo": b"\r\n--MIMEBoundary_tes\r\n--" + b"\r" * 3 + b"tail\r",
    "empty@duo": b"",
}


@pytest.mark.parametrize("sizes", [(1,), (2, 3, 5), (7,), (13, 1), (4096,), (1 << 20,)])
async def test_golden_body_in_awkward_chunks(tmp_path: Path, sizes: tuple[int, ...]) -> None:
    content_type, body = _golden(PAYLOADS)
    async with MtomStream(content_type, ChunkedSource(body, sizes), tmp_path, read_bytes=4096) as stream:
        root, parts = await _read_all(stream)
    hrefs = [normalise_cid(i.get("href", "")) for i in root.iter("{http://www.w3.org/2004/08/xop/include}Include")]
    assert hrefs == list(PAYLOADS)
    assert [p.content_id for p in parts] == list(PAYLOADS)
    for part in parts:
        assert part.path.parent == tmp_path
        assert part.path.read_bytes() == PAYLOADS[part.content_id]
        assert part.size == len(PAYLOADS[part.content_id])
        assert part.content_type == "application/dicom"


async def test_boundary_split_exactly_inside_the_delimiter(tmp_path: Path) -> None:
    content_type, body = _golden({"x@duo": b"0123456789"})
    at = body.index(b"0123456789") + 10
    # Cut inside "\r\n--MIMEBoundary_test": after the CR, after "--", and in the middle of the name.
    for cut in (at + 1, at + 4, at + 10):
        chunks = iter([body[:cut], body[cut:]])
        async with MtomStream(content_type, ChunkedSource(chunks, (1 << 20,)), tmp_path) as stream:
            _, parts = await _read_all(stream)
        assert [p.path.read_bytes() for p in parts] == [b"0123456789"]


async def test_root_not_first_is_found_by_start_and_earlier_parts_are_spooled(tmp_path: Path) -> None:
    body = (b"preamble is allowed\r\n" + _part("img1@x", b"first") + _part("img2@x", b"second")
            + _part("root@x", ENVELOPE, ctype=ROOT_CT) + _part("img3@x", b"third")
            + f"--{BOUNDARY}--\r\nepilogue".encode())
    stream = MtomStream(_ct("root@x"), ChunkedSource(body, (3,)), tmp_path)
    root = await stream.envelope()
    assert etree.QName(root).localname == "Envelope"
    assert len(_files(tmp_path)) == 2  # spooled, not yet handed over
    parts = [p async for p in stream.parts()]
    await stream.aclose()
    assert [(p.content_id, p.path.read_bytes()) for p in parts] == [
        ("img1@x", b"first"), ("img2@x", b"second"), ("img3@x", b"third")]


async def test_parts_spooled_before_the_root_are_deleted_when_never_taken(tmp_path: Path) -> None:
    body = _part("img1@x", b"first") + _part("root@x", ENVELOPE, ctype=ROOT_CT) + f"--{BOUNDARY}--".encode()
    async with MtomStream(_ct("root@x"), ChunkedSource(body), tmp_path) as stream:
        await stream.envelope()
        assert len(_files(tmp_path)) == 1
    assert _files(tmp_path) == []


async def test_base64_part_and_bare_lf_separators(tmp_path: Path) -> None:
    data = os.urandom(10_000)
    encoded = b"\n".join(base64.encodebytes(data).split(b"\n"))
    body = (_part("root@x", ENVELOPE, ctype=ROOT_CT, sep=b"\n")
            + _part("b64@x", encoded, encoding="base64", sep=b"\n") + f"--{BOUNDARY}--\n".encode())
    async with MtomStream(_ct(), ChunkedSource(body, (5, 11)), tmp_path) as stream:
        _, parts = await _read_all(stream)
    assert len(parts) == 1 and parts[0].path.read_bytes() == data and parts[0].size == len(data)


async def test_invalid_base64_is_refused_and_leaves_nothing(tmp_path: Path) -> None:
    body = (_part("root@x", ENVELOPE, ctype=ROOT_CT) + _part("b64@x", b"QUJD!!==", encoding="base64")
            + f"--{BOUNDARY}--".encode())
    with pytest.raises(MtomError, match="base64"):
        async with MtomStream(_ct(), ChunkedSource(body), tmp_path) as stream:
            await _read_all(stream)
    assert _files(tmp_path) == []


@pytest.mark.parametrize("cut", [40, 700, -30, -3])
async def test_truncated_body_raises_and_removes_the_partial_file(tmp_path: Path, cut: int) -> None:
    content_type, body = _golden({"a@duo": b"x" * 5000})
    taken: list[SpooledPart] = []
    with pytest.raises(MtomError, match=r"truncated|missing|without"):
        async with MtomStream(content_type, ChunkedSource(body[:cut], (256,)), tmp_path) as stream:
            await _read_all(stream, taken)
    # Only a part that was complete before the cut was handed over (and is the consumer's to delete).
    assert _files(tmp_path) == [p.path for p in taken]
    assert all(p.path.read_bytes() == b"x" * 5000 for p in taken)


async def test_oversized_part_is_refused_while_streaming(tmp_path: Path) -> None:
    content_type, body = _golden({"a@duo": b"x" * 100_000})
    source = ChunkedSource(body, (1000,))
    with pytest.raises(MtomError, match="exceeds the limit of 50000"):
        async with MtomStream(content_type, source, tmp_path, read_bytes=1000, max_part_bytes=50_000) as s:
            await _read_all(s)
    assert source.read_calls < 60  # stopped at the limit, not after reading everything
    assert _files(tmp_path) == []


async def test_oversized_root_and_headers_and_too_many_parts(tmp_path: Path) -> None:
    content_type, body = _golden({"a@duo": b"x"})
    with pytest.raises(MtomError, match="root part"):
        async with MtomStream(content_type, ChunkedSource(body), tmp_path, max_xml_bytes=100) as s:
            await s.envelope()
    huge_header = f"--{BOUNDARY}\r\nX-Pad: ".encode() + b"a" * 20_000 + b"\r\n\r\nbody\r\n"
    with pytest.raises(MtomError, match="headers exceed"):
        async with MtomStream(_ct(), ChunkedSource(huge_header), tmp_path) as s:
            await s.envelope()
    many = {f"p{i}@duo": b"x" for i in range(5)}
    content_type, body = _golden(many)
    taken: list[SpooledPart] = []
    with pytest.raises(MtomError, match="more than 3 MIME parts"):
        async with MtomStream(content_type, ChunkedSource(body), tmp_path, max_parts=3) as s:
            await _read_all(s, taken)
    assert len(taken) == 2 and _files(tmp_path) == sorted(p.path for p in taken)


@pytest.mark.parametrize(("content_type", "body", "match"), [
    (_ct(), b"<html>502 Bad Gateway</html>", "without its boundary"),
    ("multipart/related", b"--x\r\n\r\n", "boundary"),
    (_ct(), f"--{BOUNDARY}garbage\r\n".encode(), "garbage after a MIME boundary"),
    (_ct(), f"--{BOUNDARY}\r\nno colon here\r\n\r\nx\r\n--{BOUNDARY}--".encode(),
     "malformed MIME part header"),
    (_ct(), f"--{BOUNDARY}--\r\n".encode(), "without parts"),
    (_ct("nope@x"), _part("root@x", ENVELOPE) + f"--{BOUNDARY}--".encode(), "start part"),
    (_ct(), _part("root@x", b"<not xml") + f"--{BOUNDARY}--".encode(), "malformed XML"),
    (_ct(), _part("root@x", ENVELOPE) + _part("a@x", b"1") + _part("a@x", b"2") + f"--{BOUNDARY}--".encode(),
     "duplicate Content-ID"),
    (_ct(), _part("root@x", ENVELOPE) + _part("a@x", b"1", encoding="quoted-printable")
     + f"--{BOUNDARY}--".encode(), "Content-Transfer-Encoding"),
])
async def test_garbage_is_a_clear_mtom_error(tmp_path: Path, content_type: str, body: bytes,
                                             match: str) -> None:
    taken: list[SpooledPart] = []
    with pytest.raises(MtomError, match=match):
        async with MtomStream(content_type, ChunkedSource(body, (7,)), tmp_path) as stream:
            await _read_all(stream, taken)
    # Parts handed over before the error are the consumer's; nothing else is left behind.
    assert _files(tmp_path) == sorted(p.path for p in taken)


async def test_plain_soap_answer_has_an_envelope_and_no_parts(tmp_path: Path) -> None:
    plain = "application/soap+xml; charset=UTF-8"
    async with MtomStream(plain, ChunkedSource(ENVELOPE, (9,)), tmp_path) as s:
        root, parts = await _read_all(s)
    assert etree.QName(root).localname == "Envelope" and parts == []
    with pytest.raises(MtomError, match="exceeds"):
        async with MtomStream(plain, ChunkedSource(ENVELOPE), tmp_path, max_xml_bytes=10) as s:
            await s.envelope()


async def test_a_big_envelope_is_parsed_off_the_event_loop(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Above INLINE_PARSE_BYTES the root is parsed in a worker thread (and its size is reported, so
    the caller can decode it further off the loop too); below, inline. Same result either way."""
    handed_off: list[str] = []
    to_thread = asyncio.to_thread

    async def spy(func: Callable[..., Any], /, *args: Any, **kwargs: Any) -> Any:
        handed_off.append(getattr(func, "__name__", ""))
        return await to_thread(func, *args, **kwargs)

    monkeypatch.setattr(asyncio, "to_thread", spy)
    content_type, body = _golden(PAYLOADS)
    for limit, expected in ((1 << 20, []), (10, ["parse_xml"])):
        monkeypatch.setattr(mtom_stream, "INLINE_PARSE_BYTES", limit)
        handed_off.clear()
        async with MtomStream(content_type, ChunkedSource(body), tmp_path) as stream:
            root = await stream.envelope()
            assert [h for h in handed_off if h == "parse_xml"] == expected
            assert stream.envelope_bytes > 10
            assert etree.QName(root).localname == "Envelope"
        plain = "application/soap+xml; charset=UTF-8"
        handed_off.clear()
        async with MtomStream(plain, ChunkedSource(ENVELOPE), tmp_path) as stream:
            await stream.envelope()
            assert stream.envelope_bytes == len(ENVELOPE) and handed_off == expected


async def test_a_part_without_content_id_is_read_past(tmp_path: Path) -> None:
    anonymous = f"--{BOUNDARY}\r\nContent-Type: text/plain\r\n\r\nnobody can refer to me\r\n".encode()
    body = (_part("root@x", ENVELOPE, ctype=ROOT_CT) + anonymous + _part("a@x", b"A")
            + f"--{BOUNDARY}--".encode())
    async with MtomStream(_ct(), ChunkedSource(body, (4,)), tmp_path) as stream:
        _, parts = await _read_all(stream)
    assert [(p.content_id, p.path.read_bytes()) for p in parts] == [("a@x", b"A")]


async def test_consumer_stopping_early_leaves_only_the_parts_it_took(tmp_path: Path) -> None:
    content_type, body = _golden({f"p{i}@duo": b"y" * 3000 for i in range(4)})
    async with MtomStream(content_type, ChunkedSource(body, (100,)), tmp_path, read_bytes=100) as stream:
        await stream.envelope()
        async with aclosing(stream.parts()) as parts:
            taken = await anext(parts)
    assert _files(tmp_path) == [taken.path]


def _big_body(parts: int, part_bytes: int, chunk: int) -> tuple[str, Iterator[bytes]]:
    """A synthetic MTOM body generated lazily, so the test itself holds no more than one chunk."""
    envelope = etree.tostring(_envelope([f"p{i}@big" for i in range(parts)]))
    block = os.urandom(chunk)

    def gen() -> Iterator[bytes]:
        yield _part("root@big", envelope, ctype=ROOT_CT)
        for i in range(parts):
            yield (f"--{BOUNDARY}\r\nContent-Type: application/dicom\r\n"
                   f"Content-ID: <p{i}@big>\r\n\r\n").encode()
            for _ in range(part_bytes // chunk):
                yield block
            yield b"\r\n"
        yield f"--{BOUNDARY}--\r\n".encode()

    return _ct("root@big"), gen()


async def test_memory_does_not_grow_with_the_body(tmp_path: Path) -> None:
    parts, part_bytes = 4, 16 * 1024 * 1024  # 64 MiB in total
    content_type, chunks = _big_body(parts, part_bytes, 64 * 1024)
    source = ChunkedSource(chunks, (64 * 1024,))
    tracemalloc.start()
    try:
        sizes = []
        async with MtomStream(content_type, source, tmp_path, read_bytes=64 * 1024) as stream:
            await stream.envelope()
            async for part in stream.parts():
                sizes.append(part.size)
                part.path.unlink()  # the consumer's job, as the transfer service does after C-STORE
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert sizes == [part_bytes] * parts
    assert peak < 2 * 1024 * 1024, f"peak {peak} bytes for a {parts * part_bytes} byte body"


async def test_a_buffered_delimiter_flood_does_not_hold_the_event_loop(tmp_path: Path) -> None:
    """A body already in memory never suspends the reader, so the parser hands the loop back itself;
    and consuming a part no longer copies the rest of the read buffer (that was quadratic)."""
    flood = f"--{BOUNDARY}\r\nX-A: b\r\n\r\n\r\n".encode() * 20_000
    loop = asyncio.get_running_loop()
    longest = 0.0
    last = loop.time()

    async def ticker() -> None:
        nonlocal longest, last
        while True:
            await asyncio.sleep(0)
            now = loop.time()
            longest, last = max(longest, now - last), now

    ticks = asyncio.create_task(ticker())
    await asyncio.sleep(0)
    try:
        with pytest.raises(MtomError, match="more than 10000 MIME parts"):
            async with MtomStream(_ct("root@x"), ChunkedSource(flood, (1 << 20,)), tmp_path) as s:
                await s.envelope()
        longest = max(longest, loop.time() - last)  # a parse that never yielded is one long gap
    finally:
        ticks.cancel()
    assert longest < 0.05, f"the event loop was held {longest * 1000:.0f} ms"
    assert _files(tmp_path) == []
