"""Streaming MTOM/XOP parser: a multipart/related answer read chunk by chunk into spool files.

:func:`duo_gateway.soap.mtom.parse_mtom` needs the whole body in memory, which is fine for queries and
one KOS but not for RAD-75: a series batch can be gigabytes, and Java stacks are known to fall over
exactly there (xca.md §13.4). This parser holds at most one read chunk plus one boundary's length of
lookahead in memory, whatever the size of the message:

- the **root part** (the SOAP envelope) is buffered, but only up to ``max_xml_bytes``, and parsed
  with the hardened parser of :mod:`duo_gateway.soap.xml`;
- every **attachment** is written to its own file in ``spool_dir`` as it arrives and handed over
  (:class:`SpooledPart`) only once it is complete on disk, so a consumer can start storing the first
  image while later ones are still on the wire;
- a root part that is **not first** (RFC 2387 allows it via ``start``) is handled by spooling the
  parts before it and handing them over after the envelope;
- ``Content-Transfer-Encoding: base64`` is decoded on the fly (some stacks send it despite MTOM);
- anything else that is not an MTOM message (no boundary, a truncated body, a part or a header block
  over its limit, too many parts, duplicate Content-IDs) raises :class:`MtomError` with a reason.

A plain SOAP answer (not multipart) is accepted too, as :func:`parse_mtom` does: its envelope is
bounded by ``max_xml_bytes`` and there are no parts (the documents are inline base64).

Ownership of spool files: a :class:`SpooledPart` yielded by :meth:`MtomStream.parts` belongs to the
consumer, who deletes it. Everything else (a partly written part, parts spooled before the root that
were never handed over) is deleted by :meth:`MtomStream.aclose`, which the ``async with`` form calls.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import re
import uuid
from collections import deque
from collections.abc import AsyncGenerator
from dataclasses import dataclass
from io import BufferedWriter
from pathlib import Path
from types import TracebackType
from typing import Final, Protocol

from lxml import etree

from duo_gateway.soap.mtom import (
    DEFAULT_MAX_PART_BYTES,
    DEFAULT_MAX_PARTS,
    MULTIPART_RELATED,
    MtomError,
    normalise_cid,
    parse_content_type,
    parse_part_headers,
)
from duo_gateway.soap.xml import DEFAULT_MAX_XML_BYTES, INLINE_PARSE_BYTES, XmlError, parse_xml

#: Bytes asked of the source per read; together with the boundary lookahead, the memory ceiling.
DEFAULT_READ_BYTES: Final = 256 * 1024
#: One part's header block; real ones are a few hundred bytes, so this only stops a hostile peer.
MAX_HEADER_BYTES: Final = 16 * 1024
#: Preamble before the first boundary, which RFC 2046 allows but nobody sends in bulk.
MAX_PREAMBLE_BYTES: Final = 64 * 1024

#: Parts read between two hand-backs to the event loop: a body of thousands of tiny parts that is
#: already buffered would otherwise be parsed in one go, whatever else waits (~10 µs a part).
_PARTS_PER_TURN: Final = 64

_BINARY_ENCODINGS: Final = frozenset({"binary", "8bit", "7bit"})
_WS: Final = re.compile(rb"\s+")


class ByteSource(Protocol):
    """What the parser reads from: :class:`aiohttp.StreamReader` or anything with the same ``read``.

    ``read(n)`` returns at most ``n`` bytes and ``b""`` only at the end of the body.
    """

    async def read(self, n: int = -1) -> bytes: ...


@dataclass(frozen=True)
class SpooledPart:
    """One attachment, complete on disk. ``content_id`` is the :func:`normalise_cid` form."""

    content_id: str
    content_type: str
    path: Path
    size: int


@dataclass(frozen=True)
class _Root:
    element: etree._Element


class _Base64Decoder:
    """Incremental base64: whitespace dropped, only whole 4-character groups decoded per call."""

    def __init__(self) -> None:
        self._carry = b""
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        text = self._carry + _WS.sub(b"", data)
        cut = len(text) - len(text) % 4
        self._carry = text[cut:]
        return self._decode(text[:cut])

    def finish(self) -> bytes:
        if self._carry:
            raise MtomError("truncated base64 in a MIME part")
        return b""

    def _decode(self, text: bytes) -> bytes:
        if not text:
            return b""
        if self._ended:
            raise MtomError("invalid base64 in a MIME part: data after the padding")
        try:
            out = base64.b64decode(text, validate=True)
        except binascii.Error as exc:
            raise MtomError("invalid base64 in a MIME part") from exc
        if text.endswith(b"="):
            self._ended = True
        return out


class _PartSink:
    """Where the content of the part being read goes: memory (root), a spool file, or nowhere."""

    def __init__(self, headers: dict[str, str], *, is_root: bool, spool_dir: Path, max_bytes: int) -> None:
        self.headers = headers
        self.is_root = is_root
        self.content_id = normalise_cid(headers.get("content-id", ""))
        self.content_type = headers.get("content-type", "application/octet-stream")
        encoding = headers.get("content-transfer-encoding", "binary").strip().lower()
        if encoding == "base64" and not is_root:
            self._decoder: _Base64Decoder | None = _Base64Decoder()
        elif encoding in _BINARY_ENCODINGS:
            self._decoder = None
        else:
            where = "the root part" if is_root else "a MIME part"
            raise MtomError(f"unsupported Content-Transfer-Encoding {encoding!r} for {where}")
        self._max = max_bytes
        self.size = 0
        self.memory: list[bytes] = []
        self.path: Path | None = None
        self._fh: BufferedWriter | None = None
        # An attachment nobody can reference (no Content-ID) is read past, never stored.
        self._discard = not is_root and not self.content_id
        if not is_root and not self._discard:
            self.path = spool_dir / f"mtom-{uuid.uuid4().hex}.part"

    async def write(self, data: bytes) -> None:
        if self._decoder is not None:
            data = self._decoder.feed(data)
        await self._store(data)

    async def _store(self, data: bytes) -> None:
        if not data:
            return
        self.size += len(data)
        if self.size > self._max:
            what = "root part (SOAP envelope)" if self.is_root else "MIME part"
            raise MtomError(f"{what} exceeds the limit of {self._max} bytes")
        if self.is_root:
            self.memory.append(data)
        elif not self._discard:
            assert self.path is not None
            if self._fh is None:
                self._fh = await asyncio.to_thread(self.path.open, "xb")
            await asyncio.to_thread(self._fh.write, data)

    async def finish(self) -> None:
        if self._decoder is not None:
            await self._store(self._decoder.finish())
        if self._fh is not None:
            fh, self._fh = self._fh, None
            await asyncio.to_thread(fh.close)
        elif self.path is not None:
            # An empty attachment is still an attachment: the caller decides whether 0 bytes is usable.
            await asyncio.to_thread(self.path.touch, exist_ok=False)

    async def discard(self) -> None:
        """Drop a part that will never be completed (error, cancellation)."""
        fh, self._fh = self._fh, None
        if fh is not None:
            await asyncio.to_thread(fh.close)
        if self.path is not None:
            await asyncio.to_thread(self.path.unlink, missing_ok=True)


class MtomStream:
    """One MTOM (or plain SOAP) answer read from ``source`` as it arrives.

    Call :meth:`envelope` first, then iterate :meth:`parts`; close with :meth:`aclose` (or use
    ``async with``) so an abandoned stream leaves no spool files behind. Not reusable.
    """

    def __init__(
        self,
        content_type_header: str,
        source: ByteSource,
        spool_dir: Path,
        *,
        read_bytes: int = DEFAULT_READ_BYTES,
        max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
        max_parts: int = DEFAULT_MAX_PARTS,
        max_xml_bytes: int = DEFAULT_MAX_XML_BYTES,
    ) -> None:
        if read_bytes < 1:
            raise ValueError("read_bytes must be positive")
        self._source = source
        self._spool = spool_dir
        self._read_bytes = read_bytes
        self._max_part = max_part_bytes
        self._max_parts = max_parts
        self._max_xml = max_xml_bytes
        mime, params = parse_content_type(content_type_header or "")
        self._multipart = mime == MULTIPART_RELATED
        self._boundary = b""
        self._start: str | None = None
        if self._multipart:
            boundary = params.get("boundary", "")
            if not boundary or len(boundary) > 200:
                raise MtomError("multipart/related without a usable boundary")
            self._boundary = boundary.encode("latin-1", errors="replace")
            self._start = normalise_cid(params["start"]) if params.get("start") else None
        self._events: AsyncGenerator[_Root | SpooledPart, None] | None = None
        self._pending: deque[SpooledPart] = deque()
        self._envelope: etree._Element | None = None
        self._closed = False
        #: Size of the SOAP envelope (the root part, or the whole plain answer) once it was read: a
        #: caller decoding it further knows whether that belongs off the event loop too.
        self.envelope_bytes = 0

    async def __aenter__(self) -> MtomStream:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # -- public ----------------------------------------------------------------------------------

    async def envelope(self) -> etree._Element:
        """The root element of the SOAP envelope; parts before it are spooled and kept for :meth:`parts`."""
        if self._envelope is not None:
            return self._envelope
        if self._closed:
            raise MtomError("the stream is closed")
        if not self._multipart:
            self._envelope = await self._parse_root(await self._read_plain())
            return self._envelope
        events = self._event_iter()
        async for event in events:
            if isinstance(event, _Root):
                self._envelope = event.element
                return event.element
            self._pending.append(event)
        raise MtomError("the start part named in Content-Type is missing" if self._start
                        else "multipart body without parts")

    async def parts(self) -> AsyncGenerator[SpooledPart, None]:
        """Every attachment with a Content-ID, in wire order (those before the root first)."""
        await self.envelope()
        while self._pending:
            yield self._pending.popleft()
        if not self._multipart:
            return
        async for event in self._event_iter():
            if isinstance(event, _Root):  # pragma: no cover - only one root is ever reported
                raise MtomError("a second root part")
            yield event

    async def aclose(self) -> None:
        """Stop reading and delete every spool file that was not handed over."""
        self._closed = True
        if self._events is not None:
            events, self._events = self._events, None
            await events.aclose()
        while self._pending:
            part = self._pending.popleft()
            await asyncio.to_thread(part.path.unlink, missing_ok=True)

    # -- reading ---------------------------------------------------------------------------------

    async def _read_plain(self) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while chunk := await self._source.read(self._read_bytes):
            size += len(chunk)
            if size > self._max_xml:
                raise MtomError(f"SOAP answer exceeds the limit of {self._max_xml} bytes")
            chunks.append(chunk)
        return b"".join(chunks)

    async def _parse_root(self, data: bytes) -> etree._Element:
        self.envelope_bytes = len(data)
        if len(data) <= INLINE_PARSE_BYTES:
            return parse_xml(data, max_bytes=self._max_xml)
        return await asyncio.to_thread(parse_xml, data, max_bytes=self._max_xml)

    def _event_iter(self) -> AsyncGenerator[_Root | SpooledPart, None]:
        if self._events is None:
            self._events = self._scan()
        return self._events

    async def _scan(self) -> AsyncGenerator[_Root | SpooledPart, None]:
        """The multipart state machine: preamble, then (headers, content, delimiter) per part."""
        reader = _Buffer(self._source, self._read_bytes)
        dash = b"--" + self._boundary
        # The first delimiter may open the body or follow a (bounded) preamble line.
        at = await reader.find_first(dash, MAX_PREAMBLE_BYTES)
        reader.consume(at + len(dash))
        count = 0
        seen: set[str] = set()
        root_found = False
        delim = b"\n" + dash
        while True:
            if await self._after_delimiter(reader):
                break
            count += 1
            if count > self._max_parts:
                raise MtomError(f"more than {self._max_parts} MIME parts")
            if count % _PARTS_PER_TURN == 0:
                # Reads of an already buffered body do not suspend: let the loop serve others.
                await asyncio.sleep(0)
            headers = await _read_headers(reader)
            cid = normalise_cid(headers.get("content-id", ""))
            is_root = not root_found and (cid == self._start if self._start else count == 1)
            if cid:
                if cid in seen:
                    raise MtomError(f"duplicate Content-ID <{cid}>")
                seen.add(cid)
            sink = _PartSink(headers, is_root=is_root, spool_dir=self._spool,
                             max_bytes=self._max_xml if is_root else self._max_part)
            try:
                await _copy_content(reader, delim, sink)
                await sink.finish()
            except BaseException:
                await sink.discard()
                raise
            if is_root:
                root_found = True
                try:
                    element = await self._parse_root(b"".join(sink.memory))
                except MtomError:
                    raise
                except XmlError as exc:
                    raise MtomError(f"root part: {exc}") from exc
                yield _Root(element)
            elif sink.path is not None:
                # From here on the part belongs to whoever receives it: envelope() keeps it in
                # _pending (deleted by aclose), parts() hands it to the consumer.
                yield SpooledPart(cid, sink.content_type, sink.path, sink.size)
        if not root_found:
            raise MtomError("the start part named in Content-Type is missing" if self._start
                            else "multipart body without parts")

    async def _after_delimiter(self, reader: _Buffer) -> bool:
        """After ``--boundary``: True for the close delimiter, else the line end before the headers."""
        await reader.fill(2)
        if reader.startswith(b"--"):
            return True  # the epilogue is ignored, and not even read
        if reader.eof and len(reader) < 2:
            raise MtomError("multipart body truncated after a boundary")
        # Transport padding (RFC 2046 §5.1.1), then CRLF or a bare LF.
        while True:
            await reader.fill(1)
            if not len(reader):
                raise MtomError("multipart body truncated after a boundary")
            first = reader.peek(0, 1)
            if first in (b" ", b"\t", b"\r"):
                reader.consume(1)
                if reader.consumed_padding(200):
                    raise MtomError("garbage after a MIME boundary")
                continue
            if first == b"\n":
                reader.consume(1)
                reader.reset_padding()
                return False
            raise MtomError("garbage after a MIME boundary")


class _Buffer:
    """A bounded lookahead over the source; it never holds much more than one read.

    Consuming moves an offset instead of copying the rest of the buffer: a body of thousands of tiny
    parts would otherwise copy the whole read buffer once per part (quadratic work on the loop).
    """

    def __init__(self, source: ByteSource, read_bytes: int) -> None:
        self._source = source
        self._read_bytes = read_bytes
        self._buf = b""
        self._pos = 0
        self.eof = False
        self._padding = 0

    def __len__(self) -> int:
        return len(self._buf) - self._pos

    def startswith(self, prefix: bytes) -> bool:
        return self._buf.startswith(prefix, self._pos)

    def find(self, sub: bytes, end: int | None = None) -> int:
        """Offset of ``sub`` from the current position (-1 if absent), ending by ``end`` if given."""
        stop = len(self._buf) if end is None else self._pos + end
        at = self._buf.find(sub, self._pos, stop)
        return at if at == -1 else at - self._pos

    def peek(self, start: int, stop: int) -> bytes:
        return self._buf[self._pos + start : self._pos + stop]

    async def more(self) -> bool:
        if self.eof:
            return False
        chunk = await self._source.read(self._read_bytes)
        if not chunk:
            self.eof = True
            return False
        self._buf = self._buf[self._pos :] + chunk
        self._pos = 0
        return True

    async def fill(self, n: int) -> None:
        while len(self) < n and await self.more():
            pass

    def consume(self, n: int) -> bytes:
        taken = self._buf[self._pos : self._pos + n]
        self._pos += len(taken)
        return taken

    def consumed_padding(self, limit: int) -> bool:
        self._padding += 1
        return self._padding > limit

    def reset_padding(self) -> None:
        self._padding = 0

    async def find_first(self, dash: bytes, limit: int) -> int:
        """Offset of the first delimiter at the body's start or a line's start, within ``limit``."""
        while True:
            if self.startswith(dash):
                return 0
            at = self.find(b"\n" + dash)
            if at != -1:
                return at + 1
            if len(self) > limit:
                raise MtomError("multipart body without its boundary")
            if not await self.more():
                raise MtomError("multipart body without its boundary")


async def _read_headers(reader: _Buffer) -> dict[str, str]:
    while True:
        if reader.startswith(b"\r\n"):
            reader.consume(2)
            return {}
        if reader.startswith(b"\n"):
            reader.consume(1)
            return {}
        crlf = reader.find(b"\r\n\r\n", MAX_HEADER_BYTES + 4)
        # Only a bare LF blank line before the CRLF one matters: no need to scan past it.
        lf = reader.find(b"\n\n", crlf + 2 if crlf != -1 else MAX_HEADER_BYTES + 2)
        if crlf != -1 and (lf == -1 or crlf <= lf):
            return parse_part_headers(reader.consume(crlf + 4)[:crlf])
        if lf != -1:
            return parse_part_headers(reader.consume(lf + 2)[:lf])
        if len(reader) > MAX_HEADER_BYTES:
            raise MtomError(f"MIME part headers exceed {MAX_HEADER_BYTES} bytes")
        if not await reader.more():
            raise MtomError("multipart body truncated in a part's headers")


async def _copy_content(reader: _Buffer, delim: bytes, sink: _PartSink) -> None:
    """Move the part's content into ``sink`` up to the next ``[CR]LF--boundary``, which is consumed.

    Everything except the last ``len(delim)`` bytes can be flushed when no delimiter is in the
    buffer, because a delimiter starting earlier would have been found: that bounds memory.
    """
    keep = len(delim)
    while True:
        at = reader.find(delim)
        if at != -1:
            content = reader.consume(at)
            reader.consume(len(delim))
            if content.endswith(b"\r"):
                content = content[:-1]
            await sink.write(content)
            return
        if len(reader) > keep:
            flush = len(reader) - keep
            # A trailing CR may belong to the delimiter's CRLF: keep it back as well.
            if reader.peek(flush - 1, flush) == b"\r":
                flush -= 1
            if flush > 0:
                await sink.write(reader.consume(flush))
        if not await reader.more():
            raise MtomError("multipart body truncated: no closing delimiter")


async def remove_quietly(path: Path) -> None:
    """Delete a spool file, ignoring that it is already gone (for consumers' cleanup paths)."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(path.unlink, missing_ok=True)


__all__ = [
    "DEFAULT_READ_BYTES", "MAX_HEADER_BYTES", "ByteSource", "MtomError", "MtomStream", "SpooledPart",
    "remove_quietly",
]
