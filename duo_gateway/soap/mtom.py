"""MTOM/XOP packaging of SOAP 1.2 messages (W3C SOAP MTOM, XOP 1.0; ITI TF-2 Appendix V).

Java stacks are known to run out of memory or hand over 0-byte attachments when a large DICOM study is
buffered whole (xca.md §13.4). Building therefore yields the multipart body as a lazy sequence of
chunks with a precomputed length, and attachments may be files that are only read while streaming.
Parsing is lenient because peers differ: a bare ``\\n\\n`` between part headers, a missing ``start``
parameter, or plain SOAP with inline base64 instead of XOP are all accepted (xca.md §10, §13.6).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import uuid
from collections.abc import AsyncIterator, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
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
#: A multipart body with more parts than this is refused before any of them is looked at.
DEFAULT_MAX_PARTS = 10_000

_CRLF = b"\r\n"


class MtomError(XmlError):
    """A multipart/related body (or a Document inside it) that cannot be accepted."""


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

    async def astream(self) -> AsyncIterator[bytes]:
        """The same chunks for an asyncio writer: file reads run in a thread, never on the loop."""
        for seg in self._segments:
            if isinstance(seg, bytes):
                yield seg
                continue
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
    _header_safe(action, "action")
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
    boundary = boundary or f"MIMEBoundary_{uuid.uuid4().hex}"
    if not re.fullmatch(r"[0-9A-Za-z'()+_,\-./:=?]{1,70}", boundary):
        raise ValueError("invalid MIME boundary")
    root_cid = root_content_id or new_content_id()
    _header_safe(root_cid, "root Content-ID")
    xml = to_bytes(envelope_root)
    delim = b"--" + boundary.encode("ascii")
    segments: list[bytes | Attachment] = [
        delim + _CRLF
        + b"Content-Type: " + XOP_CONTENT_TYPE.encode() + b'; charset=UTF-8; type="'
        + SOAP12_CONTENT_TYPE.encode() + b'"' + _CRLF
        + b"Content-Transfer-Encoding: binary" + _CRLF
        + b"Content-ID: <" + root_cid.encode("ascii") + b">" + _CRLF + _CRLF
        + xml + _CRLF
    ]
    for att in atts:
        _header_safe(att.content_id, "Content-ID")
        _header_safe(att.content_type, "Content-Type")
        segments.append(
            delim + _CRLF
            + b"Content-Type: " + att.content_type.encode("ascii") + _CRLF
            + b"Content-Transfer-Encoding: binary" + _CRLF
            + b"Content-ID: <" + att.content_id.encode("ascii") + b">" + _CRLF + _CRLF
        )
        segments.append(att)
        segments.append(_CRLF)
    segments.append(delim + b"--" + _CRLF)
    content_type = (
        f'{MULTIPART_RELATED}; boundary="{boundary}"; type="{XOP_CONTENT_TYPE}"; '
        f'start="<{root_cid}>"; start-info="{SOAP12_CONTENT_TYPE}"; action="{action}"'
    )
    return content_type, MtomBody(segments, chunk_bytes)


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
class _Part:
    headers: Mapping[str, str]
    body: bytes


def _split_headers(raw: bytes) -> tuple[dict[str, str], bytes]:
    crlf = raw.find(b"\r\n\r\n")
    lf = raw.find(b"\n\n")
    if crlf == -1 and lf == -1:
        raise MtomError("MIME part without a header/body separator")
    if crlf != -1 and (lf == -1 or crlf <= lf):
        head, body = raw[:crlf], raw[crlf + 4 :]
    else:
        head, body = raw[:lf], raw[lf + 2 :]
    return parse_part_headers(head), body


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


#: What may follow ``--boundary`` on a delimiter line: ``--`` for the close delimiter, transport
#: padding, then the line end (or the end of the body) (RFC 2046 §5.1.1).
_DELIM_TAIL = re.compile(rb"(--)?[ \t]*(?:\r?\n|$)")


def _delimiters(body: bytes, boundary: str) -> Iterator[tuple[int, int, bool]]:
    """(start, end, is_close) of each delimiter line, found lazily with ``bytes.find``.

    Lazy so that a caller stopping at its part limit never scans (nor holds a list of) the rest of a
    hostile body made of millions of delimiters. A delimiter is only recognised at the start of the
    body or of a line; ``start`` includes the [CR]LF before it, which belongs to the delimiter, and
    the search resumes after ``end``, so a line end is never shared by two delimiters.
    """
    delim = b"--" + boundary.encode("latin-1")
    pos = 0
    while True:
        if pos == 0 and body.startswith(delim):
            start = at = 0
        else:
            nl = body.find(b"\n" + delim, pos)
            if nl == -1:
                return
            at = nl + 1
            start = nl - 1 if nl - 1 >= pos and body[nl - 1 : nl] == b"\r" else nl
        after = at + len(delim)
        if body.startswith(_CRLF, after):  # the common case, without the regex
            yield start, after + 2, False
            pos = after + 2
            continue
        tail = _DELIM_TAIL.match(body, after)
        if tail is None:
            # "--boundaryX" is content, not a delimiter: look further.
            pos = at + 1
            continue
        yield start, tail.end(), tail.group(1) is not None
        pos = tail.end()


def _split_parts(body: bytes, boundary: str, max_part_bytes: int, max_parts: int) -> list[_Part]:
    # Where the parts are first, stopping one past the limit: a body over it is refused before any
    # part is looked at and before the rest of it is scanned.
    spans: list[tuple[int, int]] = []
    previous_end: int | None = None
    closed = False
    for start, end, is_close in _delimiters(body, boundary):
        if previous_end is not None:
            if len(spans) >= max_parts:
                raise MtomError(f"more than {max_parts} MIME parts")
            spans.append((previous_end, start))
        if is_close:
            closed = True
            break  # the epilogue is ignored, as the streaming reader ignores it
        previous_end = end
    if previous_end is None and not closed:
        raise MtomError("multipart body without its boundary")
    if not closed:
        raise MtomError("multipart body without its closing delimiter")
    if not spans:
        raise MtomError("multipart body without parts")
    parts: list[_Part] = []
    for first, last in spans:
        headers, content = _split_headers(body[first:last])
        if len(content) > max_part_bytes:
            raise MtomError(f"MIME part of {len(content)} bytes exceeds the limit of {max_part_bytes}")
        parts.append(_Part(headers, content))
    return parts


def parse_mtom(
    content_type_header: str,
    body: bytes,
    max_part_bytes: int = DEFAULT_MAX_PART_BYTES,
    *,
    max_xml_bytes: int = DEFAULT_MAX_XML_BYTES,
    max_parts: int = DEFAULT_MAX_PARTS,
) -> tuple[etree._Element, dict[str, bytes]]:
    """Split an MTOM message (or plain SOAP) into the envelope root and its attachments by cid.

    The envelope is parsed with the hardened parser; attachment keys are :func:`normalise_cid` forms.
    """
    mime, params = parse_content_type(content_type_header or "")
    if mime != MULTIPART_RELATED:
        # Plain SOAP (some gateways answer MTOM requests this way): the Documents are inline base64.
        return parse_xml(body, max_bytes=max_xml_bytes), {}
    boundary = params.get("boundary")
    if not boundary:
        raise MtomError("multipart/related without a boundary")
    parts = _split_parts(body, boundary, max_part_bytes, max_parts)
    by_cid: dict[str, _Part] = {}
    for part in parts:
        cid = part.headers.get("content-id")
        if cid:
            key = normalise_cid(cid)
            if key in by_cid:
                # Ambiguous: which part an xop:Include means would depend on the reader. Refused, as
                # the streaming reader (mtom_stream) refuses it, so ITI-39 and RAD-75 agree.
                raise MtomError(f"duplicate Content-ID <{key}>")
            by_cid[key] = part
    start = params.get("start")
    if start:
        root = by_cid.get(normalise_cid(start))
        if root is None:
            raise MtomError("the start part named in Content-Type is missing")
    else:
        root = parts[0]
    encoding = root.headers.get("content-transfer-encoding", "binary").lower()
    if encoding not in ("binary", "8bit", "7bit"):
        raise MtomError(f"unsupported Content-Transfer-Encoding {encoding!r} for the root part")
    envelope = parse_xml(root.body, max_bytes=max_xml_bytes)
    attachments: dict[str, bytes] = {}
    for part in parts:
        if part is root:
            continue
        cid = part.headers.get("content-id")
        if not cid:
            continue  # unreferenceable, hence irrelevant
        attachments[normalise_cid(cid)] = _decode_part(part)
    return envelope, attachments


def _decode_part(part: _Part) -> bytes:
    encoding = part.headers.get("content-transfer-encoding", "binary").lower()
    if encoding in ("binary", "8bit", "7bit"):
        return part.body
    if encoding == "base64":
        try:
            return base64.b64decode(b"".join(part.body.split()), validate=True)
        except binascii.Error as exc:
            raise MtomError("invalid base64 in a MIME part") from exc
    raise MtomError(f"unsupported Content-Transfer-Encoding {encoding!r}")


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
            raise MtomError(f"document of {len(data)} bytes exceeds the limit of {max_bytes}")
        return data
    if any(isinstance(c.tag, str) for c in el):
        raise MtomError("Document holds unexpected child elements")
    text = "".join((el.text or "").split())
    if len(text) * 3 // 4 > max_bytes + 2:
        raise MtomError(f"inline document exceeds the limit of {max_bytes} bytes")
    try:
        return base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise MtomError("Document is neither xop:Include nor valid base64") from exc
