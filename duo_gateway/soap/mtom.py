"""MTOM/XOP packaging of SOAP 1.2 messages (W3C SOAP MTOM, XOP 1.0; ITI TF-2 Appendix V).

Java stacks are known to run out of memory or hand over 0-byte attachments when a large DICOM study is
buffered whole (xca.md §13.4). Building therefore yields the multipart body as a lazy sequence of
chunks with a precomputed length, and attachments may be files that are only read while streaming.
Parsing is lenient because peers differ: a bare ``\\n\\n`` between part headers, a missing ``start``
parameter, or plain SOAP with inline base64 instead of XOP are all accepted (xca.md §10, §13.6).

There is one parser of multipart bodies, :class:`MtomParser`, which takes bytes in any chunking and
hands out events. :func:`parse_mtom` feeds it a whole body and keeps the parts in memory; the streaming
reader (:mod:`duo_gateway.soap.mtom_stream`) feeds it each network read and spools the parts to disk.
Two readers with their own rules had drifted apart before (Content-ID duplicates, the part limit).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final
from urllib.parse import quote, unquote

from lxml import etree

from duo_gateway.soap.envelope import SOAP12_CONTENT_TYPE
from duo_gateway.soap.xml import DEFAULT_MAX_XML_BYTES, XmlError, parse_xml, to_bytes

XOP_NS = "http://www.w3.org/2004/08/xop/include"
XOP_CONTENT_TYPE = "application/xop+xml"
MULTIPART_RELATED = "multipart/related"
#: Default ceiling for one attachment: a single enhanced multi-frame CT can be a few hundred MiB.
DEFAULT_MAX_PART_BYTES = 512 * 1024 * 1024
#: Chunk size used when streaming attachments read from disk.
DEFAULT_CHUNK_BYTES = 256 * 1024
#: A multipart body with more parts than this is refused at the first part past it.
DEFAULT_MAX_PARTS = 10_000
#: One part's header block; real ones are a few hundred bytes, so this only stops a hostile peer.
MAX_HEADER_BYTES: Final = 16 * 1024
#: Preamble before the first boundary, which RFC 2046 allows but nobody sends in bulk.
MAX_PREAMBLE_BYTES: Final = 64 * 1024
#: Transport padding after a boundary (RFC 2046 §5.1.1): more than this is garbage, not padding, and
#: bounds how far a reader must look ahead to know whether ``--boundary`` was a delimiter.
MAX_PADDING_BYTES: Final = 200
#: RFC 2046 allows 70; a little slack for sloppy peers, none for absurd ones.
MAX_BOUNDARY_CHARS: Final = 200

_CRLF = b"\r\n"


class MtomError(XmlError):
    """A multipart/related body (or a Document inside it) that cannot be accepted."""


class MtomTooLarge(MtomError):
    """A part or Document over the reader's size limit: the caller can name the setting behind it."""


@dataclass(frozen=True)
class Attachment:
    """One binary part; ``data`` as a path is read lazily while the body is streamed."""

    content_id: str
    content_type: str
    data: bytes | Path

    def size(self) -> int:
        return len(self.data) if isinstance(self.data, bytes) else self.data.stat().st_size

    def chunks(self, chunk_bytes: int = DEFAULT_CHUNK_BYTES) -> Iterator[bytes]:
        if isinstance(self.data, bytes):
            yield self.data
            return
        with self.data.open("rb") as fh:
            while chunk := fh.read(chunk_bytes):
                yield chunk


def new_content_id(host: str = "duo-gateway") -> str:
    """A fresh Content-ID (without ``<>``); random so parts of concurrent messages never collide."""
    return f"{uuid.uuid4().hex}@{host}"


def xop_include(content_id: str) -> etree._Element:
    """The ``xop:Include`` that replaces base64 content; the href is URL-encoded per RFC 2392."""
    el = etree.Element(f"{{{XOP_NS}}}Include", nsmap={"xop": XOP_NS})
    el.set("href", "cid:" + _quote_cid(content_id))
    return el


def _quote_cid(content_id: str) -> str:
    # RFC 2392: the cid URL is the URL-encoded addr-spec; keep the characters legal in it unescaped.
    return quote(content_id, safe="@.-_~!$&'()*+,;=:")


def normalise_cid(value: str) -> str:
    """The comparable form of an href or a Content-ID: no ``cid:``, no ``<>``, URL-decoded."""
    v = value.strip()
    if v[:4].lower() == "cid:":
        v = v[4:]
    if v.startswith("<") and v.endswith(">"):
        v = v[1:-1]
    return unquote(v.strip())


class MtomBody:
    """A multipart/related body that can be iterated (several times) or materialised.

    ``content_length`` is known up front so the HTTP layer can send ``Content-Length`` instead of
    chunked encoding, which some gateways mishandle.
    """

    def __init__(self, segments: Sequence[bytes | Attachment], chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        self._segments = list(segments)
        self._chunk_bytes = chunk_bytes

    @property
    def content_length(self) -> int:
        return sum(len(s) if isinstance(s, bytes) else s.size() for s in self._segments)

    def __iter__(self) -> Iterator[bytes]:
        for seg in self._segments:
            if isinstance(seg, bytes):
                yield seg
            else:
                yield from seg.chunks(self._chunk_bytes)

    def __bytes__(self) -> bytes:
        return b"".join(self)

    async def astream(self, on_attachment: Callable[[Attachment], None] | None = None
                      ) -> AsyncIterator[bytes]:
        """The same chunks for an asyncio writer: file reads run in a thread, never on the loop.
        ``on_attachment`` hears of each attachment just before its content goes out (an audit)."""
        for seg in self._segments:
            if isinstance(seg, bytes):
                yield seg
                continue
            if on_attachment is not None:
                on_attachment(seg)
            if isinstance(seg.data, bytes):
                yield seg.data
                continue
            fh = await asyncio.to_thread(seg.data.open, "rb")
            try:
                while chunk := await asyncio.to_thread(fh.read, self._chunk_bytes):
                    yield chunk
            finally:
                await asyncio.to_thread(fh.close)


def _header_safe(value: str, what: str) -> str:
    if any(c in value for c in "\r\n\"") or not value.isascii():
        raise ValueError(f"{what} {value!r} cannot be put in a MIME header")
    return value


def _root_head(delim: bytes, root_cid: str) -> bytes:
    return (delim + _CRLF
            + b"Content-Type: " + XOP_CONTENT_TYPE.encode() + b'; charset=UTF-8; type="'
            + SOAP12_CONTENT_TYPE.encode() + b'"' + _CRLF
            + b"Content-Transfer-Encoding: binary" + _CRLF
            + b"Content-ID: <" + root_cid.encode("ascii") + b">" + _CRLF + _CRLF)


def _part_head(delim: bytes, content_id: str, content_type: str) -> bytes:
    _header_safe(content_id, "Content-ID")
    _header_safe(content_type, "Content-Type")
    return (delim + _CRLF
            + b"Content-Type: " + content_type.encode("ascii") + _CRLF
            + b"Content-Transfer-Encoding: binary" + _CRLF
            + b"Content-ID: <" + content_id.encode("ascii") + b">" + _CRLF + _CRLF)


def _packaging(action: str, boundary: str | None, root_content_id: str | None) -> tuple[str, str, str]:
    """(boundary, root Content-ID, HTTP Content-Type) of a new MTOM message, checked."""
    _header_safe(action, "action")
    boundary = boundary or f"MIMEBoundary_{uuid.uuid4().hex}"
    if not re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary):
        raise ValueError("invalid MIME boundary")
    root_cid = root_content_id or new_content_id()
    _header_safe(root_cid, "root Content-ID")
    content_type = (
        f'{MULTIPART_RELATED}; boundary="{boundary}"; type="{XOP_CONTENT_TYPE}"; '
        f'start="<{root_cid}>"; start-info="{SOAP12_CONTENT_TYPE}"; action="{action}"'
    )
    return boundary, root_cid, content_type


def build_mtom(
    envelope_root: etree._Element,
    attachments: Iterable[Attachment],
    action: str,
    *,
    boundary: str | None = None,
    root_content_id: str | None = None,
    chunk_bytes: int = DEFAULT_CHUNK_BYTES,
) -> tuple[str, MtomBody]:
    """Package an envelope whose ``xop:Include`` hrefs name ``attachments`` as one MTOM message.

    Every href must have an attachment and every attachment an href: a dangling reference is a bug
    in the caller that the peer would only report as an opaque "missing document".
    """
    atts = list(attachments)
    hrefs = {
        normalise_cid(inc.get("href", ""))
        for inc in envelope_root.iter(f"{{{XOP_NS}}}Include")
    }
    ids = [normalise_cid(a.content_id) for a in atts]
    if len(set(ids)) != len(ids):
        raise ValueError("duplicate attachment Content-ID")
    if hrefs != set(ids):
        raise ValueError(
            f"xop:Include hrefs and attachments differ: {sorted(hrefs ^ set(ids))}"
        )
    boundary, root_cid, content_type = _packaging(action, boundary, root_content_id)
    delim = b"--" + boundary.encode("ascii")
    segments: list[bytes | Attachment] = [_root_head(delim, root_cid) + to_bytes(envelope_root) + _CRLF]
    for att in atts:
        segments.append(_part_head(delim, att.content_id, att.content_type))
        segments.append(att)
        segments.append(_CRLF)
    segments.append(delim + b"--" + _CRLF)
    return content_type, MtomBody(segments, chunk_bytes)


def mtom_request(envelope: bytes, action: str) -> tuple[str, bytes]:
    """An already serialised (signed) envelope as a one-part MTOM message, for a request whose answer
    should come back as MTOM: a Responding Gateway answers in kind (DUO's does, as do gateways that
    inline base64 for plain SOAP callers), and an inline answer cannot be read as it arrives."""
    boundary, root_cid, content_type = _packaging(action, None, None)
    delim = b"--" + boundary.encode("ascii")
    return content_type, _root_head(delim, root_cid) + envelope + _CRLF + delim + b"--" + _CRLF


class MtomRootLast:
    """The bytes of an MTOM message written as its attachments become available, envelope last.

    For an answer whose SOAP envelope is only known at the end (RAD-75: the status and the
    RegistryErrorList depend on what the PACS delivered), but whose attachments should go out as they
    arrive. The root part is the one ``start`` names, as RFC 2387 lets any part be; it comes after the
    attachments, so its ``xop:Include`` hrefs name parts already sent. Sans-I/O: the caller writes
    :attr:`content_type` as the HTTP header, then for each attachment :meth:`part_head`, its content
    and :data:`PART_END`, and at the end :meth:`root` (which also closes the message).
    """

    PART_END: Final = _CRLF

    def __init__(self, action: str, *, boundary: str | None = None, root_content_id: str | None = None):
        self.boundary, self.root_content_id, self.content_type = _packaging(action, boundary,
                                                                             root_content_id)
        self._delim = b"--" + self.boundary.encode("ascii")
        self._sent: set[str] = set()

    def part_head(self, content_id: str, content_type: str) -> bytes:
        """The delimiter and header block opening one attachment (binary content follows)."""
        cid = normalise_cid(content_id)
        if cid in self._sent or cid == normalise_cid(self.root_content_id):
            raise ValueError("duplicate attachment Content-ID")
        self._sent.add(cid)
        return _part_head(self._delim, content_id, content_type)

    def root(self, envelope_root: etree._Element) -> bytes:
        """The root part with the serialized envelope and the close delimiter.

        Its hrefs must name attachments already written; the ones written but not named are allowed
        (a reader ignores them) but never happen in DUO, whose envelope lists every part it sent.
        """
        for include in envelope_root.iter(f"{{{XOP_NS}}}Include"):
            if normalise_cid(include.get("href", "")) not in self._sent:
                raise ValueError("xop:Include names an attachment that was not written")
        return (_root_head(self._delim, self.root_content_id) + to_bytes(envelope_root) + _CRLF
                + self._delim + b"--" + _CRLF)


# -- parsing -------------------------------------------------------------------------------------

_PARAM = re.compile(r';\s*([!#$%&\'*+.^_`|~0-9A-Za-z-]+)\s*=\s*("(?:[^"\\]|\\.)*"|[^;\s]*)\s*')


def parse_content_type(header: str) -> tuple[str, dict[str, str]]:
    """Media type (lower case) and parameters (keys lower case, values unquoted) of a header value."""
    mime, _, rest = header.partition(";")
    params: dict[str, str] = {}
    for m in _PARAM.finditer(";" + rest):
        value = m.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        params[m.group(1).lower()] = value
    return mime.strip().lower(), params


@dataclass(frozen=True)
class MultipartRelated:
    """What reading a ``multipart/related`` body needs from its Content-Type header."""

    boundary: bytes
    #: The :func:`normalise_cid` form of the ``start`` parameter; without it the first part is the root.
    start: str | None


def multipart_related(content_type_header: str) -> MultipartRelated | None:
    """The multipart parameters, or None for any other media type (plain SOAP, inline base64).

    Shared by the whole-body and the streaming reader so that both accept the same headers.
    """
    mime, params = parse_content_type(content_type_header or "")
    if mime != MULTIPART_RELATED:
        return None
    boundary = params.get("boundary", "")
    if not boundary or len(boundary) > MAX_BOUNDARY_CHARS:
        raise MtomError("multipart/related without a usable boundary")
    start = params.get("start")
    return MultipartRelated(boundary.encode("latin-1", errors="replace"),
                            normalise_cid(start) if start else None)


def parse_part_headers(head: bytes) -> dict[str, str]:
    """A MIME part's header block: names lower-cased, folded lines joined (RFC 5322 §2.2.3)."""
    headers: dict[str, str] = {}
    for line in head.decode("latin-1").replace("\r\n", "\n").split("\n"):
        if not line.strip():
            continue
        if line[0] in " \t" and headers:
            last = next(reversed(headers))
            headers[last] += " " + line.strip()
            continue
        name, sep, value = line.partition(":")
        if not sep or not name.strip():
            raise MtomError("malformed MIME part header")
        headers[name.strip().lower()] = value.strip()
    return headers


# Events are not frozen: a frozen dataclass costs ~3 µs more per instance, which a body of thousands
# of tiny parts pays thousands of times. Consumers read them and never change them.


@dataclass(slots=True)
class PartStart:
    """A part's header block was read and accepted; its content follows as :class:`PartData`."""

    headers: Mapping[str, str]
    #: The :func:`normalise_cid` form, ``""`` for a part without a Content-ID (nobody can refer to it).
    content_id: str
    content_type: str
    #: The SOAP envelope: the part named by ``start``, or the first part without ``start``.
    is_root: bool


@dataclass(slots=True)
class PartData:
    """Content of the current part, transfer-decoded; a part's data may come in any number of these."""

    data: bytes


@dataclass(slots=True)
class PartEnd:
    """The current part is complete (its delimiter was seen and its base64, if any, was whole)."""


@dataclass(slots=True)
class MessageEnd:
    """The close delimiter: the message is complete and valid; the epilogue is never read."""


class NeedData:
    """Returned by :meth:`MtomParser.next_event` when it cannot go on without more bytes."""

    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = NeedData()
_PART_END: Final = PartEnd()
_MESSAGE_END: Final = MessageEnd()

MtomEvent = PartStart | PartData | PartEnd | MessageEnd

_BINARY_ENCODINGS: Final = frozenset({"binary", "8bit", "7bit"})
_WS: Final = re.compile(rb"\s+")
_PADDING: Final = re.compile(rb"[ \t]*")
_LF: Final = 0x0A
_CR: Final = 0x0D
#: What :meth:`MtomParser._tail` says of ``--boundaryX``: content (or, in the preamble, garbage).
_NOT_A_DELIMITER: Final = (-1, False)


class _Base64Decoder:
    """Incremental base64: whitespace dropped, only whole 4-character groups decoded per call."""

    def __init__(self) -> None:
        self._carry = b""
        self._ended = False

    def feed(self, data: bytes) -> bytes:
        text = self._carry + _WS.sub(b"", data)
        cut = len(text) - len(text) % 4
        self._carry = text[cut:]
        if not cut:
            return b""
        if self._ended:
            raise MtomError("invalid base64 in a MIME part: data after the padding")
        try:
            out = base64.b64decode(text[:cut], validate=True)
        except binascii.Error as exc:
            raise MtomError("invalid base64 in a MIME part") from exc
        if text.endswith(b"=", 0, cut):
            self._ended = True
        return out

    def finish(self) -> None:
        if self._carry:
            raise MtomError("truncated base64 in a MIME part")


class MtomParser:
    """The one reader of a multipart/related (MTOM/XOP) body: sans-I/O, fed bytes in any chunking.

    Every rule and every limit about the body's structure lives here, once, so that the whole-body
    reader (:func:`parse_mtom`: one :meth:`feed` of the body) and the streaming one
    (:class:`~duo_gateway.soap.mtom_stream.MtomStream`: one feed per network read) cannot disagree
    about a peer's message; how the bytes arrive never changes the events or the error. Call
    :meth:`feed` (and :meth:`end` at the end of the body), then :meth:`next_event` until it returns
    :data:`NEED_DATA`. Memory holds one fed chunk plus a boundary's length of lookahead, and the
    body is never scanned past the point where it is refused.

    Delimiters (RFC 2046 §5.1.1): ``--boundary`` opening the body or a line, then ``--`` for the
    close delimiter, transport padding (spaces, tabs) and a [CR]LF or the end of the body. The
    [CR]LF before it belongs to the delimiter, and the LF that ends a part's header block may be it
    (a part without content). ``--boundaryX`` inside a part is content; in the preamble it is a
    broken delimiter. A part's header block ends at its first blank line (CRLF or bare LF).
    """

    def __init__(
        self,
        content_type: MultipartRelated,
        *,
        max_parts: int = DEFAULT_MAX_PARTS,
        max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
        max_root_bytes: int = DEFAULT_MAX_XML_BYTES,
    ) -> None:
        self._dash = b"--" + content_type.boundary
        self._delim = b"\n" + self._dash
        self._start = content_type.start
        self._max_parts = max_parts
        self._max_part = max_part_bytes
        self._max_root = max_root_bytes
        self._buf = b""
        self._pos = 0  # what is before it was handed out (or skipped)
        self._scan = 0  # where the next search resumes: nothing complete was found before it
        self._base = 0  # body offset of _buf[0], for the preamble limit
        self._eof = False
        #: The state: the method that makes the next move, False when it needs more bytes first.
        self._step: Callable[[], bool] = self._preamble
        self._events: deque[MtomEvent] = deque()
        self._error: MtomError | None = None
        self._parts = 0
        self._seen: set[str] = set()
        self._root_found = False
        # The part being read.
        self._is_root = False
        self._limit = 0
        self._size = 0
        self._decoder: _Base64Decoder | None = None
        self._lf_before = False  # the header block's last LF may open the next delimiter

    # -- public ----------------------------------------------------------------------------------

    def feed(self, data: bytes) -> None:
        """More of the body; after :meth:`end` there is none. The epilogue is dropped unread."""
        if self._eof:
            raise RuntimeError("MtomParser.feed after end()")
        if not data or self._step == self._done:
            return
        pos = self._pos
        if pos == len(self._buf):
            self._buf = data  # nothing kept back: no copy (a whole body is fed as it is)
        else:
            self._buf = self._buf[pos:] + data
        self._base += pos
        self._scan = max(0, self._scan - pos)
        self._pos = 0

    def end(self) -> None:
        """The body is complete: from now on a missing delimiter is an error, not a wait."""
        self._eof = True

    def next_event(self) -> MtomEvent | NeedData:
        """The next event, or :data:`NEED_DATA` (never after :meth:`end`).

        A body that cannot be accepted raises :class:`MtomError`, and again on every later call, but
        only once the events before the fault are out: a part completed by the delimiter that opens
        one part too many is still handed over, whether or not both came in the same chunk.
        """
        events = self._events
        if not events and self._error is None:
            try:
                while self._step() and not events:
                    pass
            except MtomError as exc:
                self._error = exc
                self._buf = b""
        if events:
            return events.popleft()
        if self._error is not None:
            raise self._error
        return NEED_DATA

    # -- the state machine -----------------------------------------------------------------------

    def _done(self) -> bool:
        self._events.append(_MESSAGE_END)  # asked again
        return True

    def _preamble(self) -> bool:
        buf, dash, delim = self._buf, self._dash, self._delim
        n = len(buf)
        if self._base == 0 and self._pos == 0 and buf.startswith(dash[:n]):
            if n < len(dash) and not self._eof:
                return False  # maybe the body opens with the delimiter: wait and see
            at = 0 if n >= len(dash) else -1
        else:
            at = -1
        if at == -1:
            # The first delimiter's "--" must start within MAX_PREAMBLE_BYTES of the body.
            stop = MAX_PREAMBLE_BYTES - 1 + len(delim) - self._base
            found = buf.find(delim, self._scan, stop)
            if found == -1:
                if n >= stop or self._eof:
                    raise MtomError("multipart body without its boundary")
                # Only a possible start of the delimiter is kept; the preamble is dropped.
                self._pos = self._scan = max(self._pos, n - len(delim) + 1)
                return False
            at = found + 1
            self._scan = found
        tail = self._tail(at + len(dash))
        if tail is None:
            return False
        if tail is _NOT_A_DELIMITER:
            raise MtomError("garbage after a MIME boundary")
        self._after_delimiter(tail)
        return True

    def _headers(self) -> bool:
        buf, pos = self._buf, self._pos
        n = len(buf)
        if pos >= n:
            if self._eof:
                raise MtomError("multipart body truncated after a boundary")
            return False
        first = buf[pos]
        if first == _LF:
            head, end = b"", pos + 1
        elif first == _CR and n - pos >= 2 and buf[pos + 1] == _LF:
            head, end = b"", pos + 2
        elif first == _CR and n - pos < 2 and not self._eof:
            return False
        else:
            # Resume where the last look ended: a separator found now ends past what was there.
            crlf = buf.find(b"\r\n\r\n", max(pos, self._scan - 3), pos + MAX_HEADER_BYTES + 4)
            lf = buf.find(b"\n\n", max(pos, self._scan - 1),
                          crlf + 2 if crlf != -1 else pos + MAX_HEADER_BYTES + 2)
            if crlf != -1 and (lf == -1 or crlf <= lf):
                head, end = buf[pos:crlf], crlf + 4
            elif lf != -1:
                head, end = buf[pos:lf], lf + 2
            elif n - pos >= MAX_HEADER_BYTES + 4:
                raise MtomError(f"MIME part headers exceed {MAX_HEADER_BYTES} bytes")
            elif self._eof:
                raise MtomError("multipart body truncated in a part's headers")
            else:
                self._scan = n
                return False
        self._start_part(parse_part_headers(head) if head else {})
        self._pos = self._scan = end
        self._lf_before = True
        self._step = self._content
        return True

    def _start_part(self, headers: dict[str, str]) -> None:
        raw_cid = headers.get("content-id") if headers else None
        cid = normalise_cid(raw_cid) if raw_cid else ""
        is_root = not self._root_found and (
            cid == self._start if self._start is not None else self._parts == 1)
        if cid:
            if cid in self._seen:
                # Ambiguous: which part an xop:Include means would depend on the reader.
                raise MtomError(f"duplicate Content-ID <{cid}>")
            self._seen.add(cid)
        encoding = headers.get("content-transfer-encoding", "binary").strip().lower() if headers else "binary"
        if encoding == "base64" and not is_root:
            self._decoder = _Base64Decoder()
        elif encoding in _BINARY_ENCODINGS:
            self._decoder = None
        else:
            where = "the root part" if is_root else "a MIME part"
            raise MtomError(f"unsupported Content-Transfer-Encoding {encoding!r} for {where}")
        self._is_root = is_root
        self._root_found = self._root_found or is_root
        self._limit = self._max_root if is_root else self._max_part
        self._size = 0
        self._events.append(PartStart(headers, cid, headers.get("content-type", "application/octet-stream"),
                                      is_root))

    def _content(self) -> bool:
        buf, pos, dash, delim = self._buf, self._pos, self._dash, self._delim
        n = len(buf)
        if self._lf_before:
            # The delimiter may open with the LF that ended the header block: no content at all.
            if n - pos < len(dash) and dash.startswith(buf[pos:]) and not self._eof:
                return False
            if buf.startswith(dash, pos):
                tail = self._tail(pos + len(dash))
                if tail is None:
                    return False
                if tail is not _NOT_A_DELIMITER:
                    self._end_part(pos, tail)
                    return True
            self._lf_before = False
        at = buf.find(delim, max(pos, self._scan))
        while at != -1:
            content_end = at - 1 if at > pos and buf[at - 1] == _CR else at
            after = at + len(delim)
            tail = (after + 2, False) if buf.startswith(b"\r\n", after) else self._tail(after)
            if tail is None:
                self._emit(content_end)
                self._scan = at
                return bool(self._events)
            if tail is not _NOT_A_DELIMITER:
                self._end_part(content_end, tail)
                return True
            at = buf.find(delim, at + 1)
        if self._eof:
            raise MtomError("multipart body truncated: no closing delimiter")
        # No delimiter starts before the last len(delim) - 1 bytes, nor at a CR just before them.
        keep = n - len(delim) + 1
        if keep > pos and buf[keep - 1] == _CR:
            keep -= 1
        self._emit(keep)
        self._scan = max(self._pos, n - len(delim) + 1)
        return bool(self._events)

    def _tail(self, at: int) -> tuple[int, bool] | None:
        """After ``--boundary`` at ``at``: (where the delimiter line ends, whether it is the close
        delimiter), :data:`_NOT_A_DELIMITER`, or None until more bytes tell."""
        buf, eof = self._buf, self._eof
        if buf.startswith(b"\r\n", at):  # the common case first
            return at + 2, False
        n = len(buf)
        close = buf.startswith(b"--", at)
        if close:
            at += 2
        elif n - at == 1 and buf[at] == 0x2D and not eof:
            return None  # "-": maybe the close delimiter
        if buf.startswith(b"\r\n", at):  # the common case, without the regex
            end = at + 2
        else:
            pad = _PADDING.match(buf, at, at + MAX_PADDING_BYTES + 1)
            i = pad.end() if pad is not None else at
            if i - at > MAX_PADDING_BYTES:
                raise MtomError("garbage after a MIME boundary")
            if i == n:
                if not eof:
                    return None
                end = n
            elif buf[i] == _LF:
                end = i + 1
            elif buf[i] == _CR and i + 1 < n:
                if buf[i + 1] != _LF:
                    return _NOT_A_DELIMITER
                end = i + 2
            elif buf[i] == _CR and not eof:
                return None
            else:
                return _NOT_A_DELIMITER
        return end, close

    def _emit(self, stop: int) -> None:
        """Hand out the current part's content up to ``stop``, transfer-decoded and size-checked."""
        pos = self._pos
        if stop <= pos:
            return
        data = self._buf[pos:stop]
        self._pos = stop
        if self._decoder is not None:
            data = self._decoder.feed(data)
            if not data:
                return
        self._size += len(data)
        if self._size > self._limit:
            what = "root part (SOAP envelope)" if self._is_root else "MIME part"
            raise MtomTooLarge(f"{what} exceeds the limit of {self._limit} bytes")
        self._events.append(PartData(data))

    def _end_part(self, content_end: int, tail: tuple[int, bool]) -> None:
        self._emit(content_end)
        if self._decoder is not None:
            self._decoder.finish()
        self._events.append(_PART_END)
        self._lf_before = False
        self._after_delimiter(tail)

    def _after_delimiter(self, tail: tuple[int, bool]) -> None:
        end, close = tail
        if close:
            if not self._parts:
                raise MtomError("multipart body without parts")
            if not self._root_found:
                raise MtomError("the start part named in Content-Type is missing")
            self._step = self._done
            self._buf, self._pos, self._scan = b"", 0, 0
            self._events.append(_MESSAGE_END)
            return
        self._parts += 1
        if self._parts > self._max_parts:
            raise MtomError(f"more than {self._max_parts} MIME parts")
        self._pos = self._scan = end
        self._step = self._headers


def parse_mtom(
    content_type_header: str,
    body: bytes,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    *,
    max_xml_bytes: int = DEFAULT_MAX_XML_BYTES,
    max_parts: int = DEFAULT_MAX_PARTS,
) -> tuple[etree._Element, dict[str, bytes]]:
    """Split an MTOM message (or plain SOAP) into the envelope root and its attachments by cid.

    The body is fed to :class:`MtomParser` in one piece, so it is accepted or refused exactly as the
    streaming reader would; only then is the envelope parsed, with the hardened parser. Attachment
    keys are :func:`normalise_cid` forms; parts without a Content-ID are dropped (unreferenceable).
    """
    related = multipart_related(content_type_header)
    if related is None:
        # Plain SOAP (some gateways answer MTOM requests this way): the Documents are inline base64.
        return parse_xml(body, max_bytes=max_xml_bytes), {}
    parser = MtomParser(related, max_parts=max_parts, max_part_bytes=max_part_bytes,
                        max_root_bytes=min(max_part_bytes, max_xml_bytes))
    parser.feed(body)
    parser.end()
    root: bytes | None = None
    attachments: dict[str, bytes] = {}
    part: PartStart | None = None
    chunks: list[bytes] = []
    while isinstance(event := parser.next_event(), PartStart | PartData | PartEnd):
        if isinstance(event, PartData):
            chunks.append(event.data)
        elif isinstance(event, PartStart):
            part, chunks = event, []
        elif isinstance(event, PartEnd) and part is not None:
            if part.is_root:
                root = b"".join(chunks)
            elif part.content_id:
                attachments[part.content_id] = b"".join(chunks)
    # After end() the parser ends with MessageEnd, its root part seen, or raises: never NEED_DATA.
    assert isinstance(event, MessageEnd) and root is not None
    return parse_xml(root, max_bytes=max_xml_bytes), attachments


def resolve_document(
    el: etree._Element,
    parts: Mapping[str, bytes],
    *,
    max_bytes: int = DEFAULT_MAX_PART_BYTES,
) -> bytes:
    """The bytes of an ``xdsb:Document``: an ``xop:Include`` into ``parts``, or inline base64."""
    include = el.find(f"{{{XOP_NS}}}Include")
    if include is not None:
        href = include.get("href")
        if not href:
            raise MtomError("xop:Include without href")
        data = parts.get(normalise_cid(href))
        if data is None:
            raise MtomError("xop:Include names a part that is not in the message")
        if len(data) > max_bytes:
            raise MtomTooLarge(f"document of {len(data)} bytes exceeds the limit of {max_bytes}")
        return data
    if any(isinstance(c.tag, str) for c in el):
        raise MtomError("Document holds unexpected child elements")
    text = "".join((el.text or "").split())
    if len(text) * 3 // 4 > max_bytes + 2:
        raise MtomTooLarge(f"inline document exceeds the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise MtomError("Document is neither xop:Include nor valid base64") from exc
