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

The multipart rules themselves (delimiters, headers, limits, transfer encodings, which part is the
root) are :class:`duo_gateway.soap.mtom.MtomParser`'s, the same object :func:`parse_mtom` feeds a whole
body to: this module only reads the source into it and spools what it hands out.

A plain SOAP answer (not multipart) is accepted too, as :func:`parse_mtom` does: its envelope is
bounded by ``max_xml_bytes`` and there are no parts (the documents are inline base64).

Ownership of spool files: a :class:`SpooledPart` yielded by :meth:`MtomStream.parts` belongs to the
consumer, who deletes it. Everything else (a partly written part, parts spooled before the root that
were never handed over) is deleted by :meth:`MtomStream.aclose`, which the ``async with`` form calls.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    MessageEnd,
    MtomError,
    MtomParser,
    NeedData,
    PartData,
    PartEnd,
    PartStart,
    multipart_related,
)
from duo_gateway.soap.xml import DEFAULT_MAX_XML_BYTES, INLINE_PARSE_BYTES, XmlError, parse_xml

#: Bytes asked of the source per read; together with the boundary lookahead, the memory ceiling.
DEFAULT_READ_BYTES: Final = 256 * 1024

#: Parts read between two hand-backs to the event loop: a body of thousands of tiny parts that is
#: already buffered would otherwise be parsed in one go, whatever else waits (~10 µs a part).
_PARTS_PER_TURN: Final = 64


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


class _PartSink:
    """Where the content of the part being read goes: memory (root), a spool file, or nowhere."""

    def __init__(self, part: PartStart, spool_dir: Path) -> None:
        self.part = part
        self.size = 0
        self.memory: list[bytes] = []
        self.path: Path | None = None
        self._fh: BufferedWriter | None = None
        # An attachment nobody can reference (no Content-ID) is read past, never stored.
        if not part.is_root and part.content_id:
            self.path = spool_dir / f"mtom-{uuid.uuid4().hex}.part"

    async def write(self, data: bytes) -> None:
        self.size += len(data)
        if self.part.is_root:
            self.memory.append(data)
        elif self.path is not None:
            if self._fh is None:
                self._fh = await asyncio.to_thread(self.path.open, "xb")
            await asyncio.to_thread(self._fh.write, data)

    async def finish(self) -> None:
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
        self._max_xml = max_xml_bytes
        related = multipart_related(content_type_header)
        self._multipart = related is not None
        self._start = related.start if related is not None else None
        self._parser = None if related is None else MtomParser(
            related, max_parts=max_parts, max_part_bytes=max_part_bytes,
            max_root_bytes=min(max_part_bytes, max_xml_bytes))
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
        """Read the source into the parser and act on its events: spool, parse the root, hand over."""
        parser = self._parser
        assert parser is not None  # only multipart answers are scanned
        sink: _PartSink | None = None
        count = 0
        try:
            while True:
                event = parser.next_event()
                if isinstance(event, PartData):
                    assert sink is not None
                    await sink.write(event.data)
                elif isinstance(event, NeedData):
                    chunk = await self._source.read(self._read_bytes)
                    if chunk:
                        parser.feed(chunk)
                    else:
                        parser.end()
                elif isinstance(event, PartStart):
                    count += 1
                    if count % _PARTS_PER_TURN == 0:
                        # Reads of an already buffered body do not suspend: let the loop serve others.
                        await asyncio.sleep(0)
                    sink = _PartSink(event, self._spool)
                elif isinstance(event, PartEnd):
                    assert sink is not None
                    await sink.finish()
                    done, sink = sink, None
                    if done.part.is_root:
                        try:
                            element = await self._parse_root(b"".join(done.memory))
                        except MtomError:
                            raise
                        except XmlError as exc:
                            raise MtomError(f"root part: {exc}") from exc
                        yield _Root(element)
                    elif done.path is not None:
                        # From here on the part belongs to whoever receives it: envelope() keeps it
                        # in _pending (deleted by aclose), parts() hands it to the consumer.
                        yield SpooledPart(done.part.content_id, done.part.content_type, done.path, done.size)
                else:
                    assert isinstance(event, MessageEnd)
                    return
        except BaseException:
            if sink is not None:
                await sink.discard()
            raise


async def remove_quietly(path: Path) -> None:
    """Delete a spool file, ignoring that it is already gone (for consumers' cleanup paths)."""
    with contextlib.suppress(OSError):
        await asyncio.to_thread(path.unlink, missing_ok=True)


__all__ = ["DEFAULT_READ_BYTES", "ByteSource", "MtomStream", "SpooledPart", "remove_quietly"]
