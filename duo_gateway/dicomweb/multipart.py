"""multipart/related bodies (RFC 2387, RFC 2046 §5.1) and Accept negotiation (RFC 9110 §12.5.1, PS3.18 8.7).

Why a writer that hands out the pieces instead of building a body: a WADO-RS study can be gigabytes,
and the data plane sends each instance as it arrives from the source. So the writer only makes the
framing (a part's head, its end, the close delimiter) and the caller interleaves the content.

The boundary is random (a uuid4's 122 bits) and not checked against the content, which this writer
never sees: the instances come from a source that never learns the boundary (it is made per answer,
sent only to the client), so a part cannot be crafted to contain it, and by chance the odds are about
one in 2**122 per position: checking would mean scanning gigabytes for nothing.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import ClassVar, Final

#: PS3.18 8.7.3.5.2: instances asked for without a transfer-syntax parameter come in this one.
EXPLICIT_VR_LITTLE_ENDIAN: Final = "1.2.840.10008.1.2.1"

_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_QUOTED = r'"(?:[^"\\\r\n]|\\[^\r\n])*"'
_MEDIA_TYPE = re.compile(f"({_TCHARS})/({_TCHARS})")
_PARAMETER = re.compile(rf"\s*({_TCHARS})\s*=\s*({_TCHARS}|{_QUOTED})\s*")
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_QVALUE = re.compile(r"0(\.\d{0,3})?|1(\.0{0,3})?")
_UID = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")


class MultipartRelated:
    """Writes a multipart/related body part by part (streaming: the caller sends each piece as made).

    A body is ``part_head()``, the part's bytes, ``PART_END``, repeated per part, then ``end()``.
    RFC 2046 wants at least one part: an answer with nothing to send is a 204/404, not an empty body.
    """

    PART_END: ClassVar[bytes] = b"\r\n"

    def __init__(self, type_: str, *, boundary: str | None = None,
                 transfer_syntax: str | None = None) -> None:
        if not _MEDIA_TYPE.fullmatch(type_):
            raise ValueError(f"not a media type: {type_!r}")
        if boundary is None:
            boundary = uuid.uuid4().hex
        elif not _BOUNDARY.fullmatch(boundary):
            raise ValueError(f"not an RFC 2046 boundary: {boundary!r}")
        if transfer_syntax is not None and not _UID.fullmatch(transfer_syntax):
            raise ValueError(f"not a transfer syntax UID: {transfer_syntax!r}")
        self.type = type_
        self.boundary = boundary
        self.transfer_syntax = transfer_syntax
        syntax = "" if transfer_syntax is None else f"; transfer-syntax={transfer_syntax}"
        quoted = boundary if re.fullmatch(_TCHARS, boundary) else f'"{boundary}"'
        self.content_type: str = f'multipart/related; type="{type_}"{syntax}; boundary={quoted}'
        self._part_type = f"{type_}{syntax}"
        self._delimiter = f"--{boundary}\r\n".encode("ascii")

    def part_head(self, content_type: str | None = None, *, location: str | None = None) -> bytes:
        """The delimiter and headers opening a part; its Content-Type is the body's type (and transfer
        syntax) unless given. ``location`` becomes Content-Location (the URL of a bulk data part)."""
        headers = [f"Content-Type: {content_type or self._part_type}"]
        if location is not None:
            headers.append(f"Content-Location: {location}")
        for header in headers:
            if "\r" in header or "\n" in header:
                raise ValueError("a part header cannot span lines")
        return self._delimiter + "\r\n".join(headers).encode("ascii") + b"\r\n\r\n"

    def end(self) -> bytes:
        """The close delimiter, after the last part's ``PART_END``."""
        return f"--{self.boundary}--\r\n".encode("ascii")


@dataclass(frozen=True)
class Acceptable:
    media_type: str             # "application/dicom", "application/octet-stream", "image/jpeg", "*/*", ...
    transfer_syntax: str | None # from the transfer-syntax parameter; "*" kept as "*"
    multipart: bool             # came as multipart/related; type="..."
    q: float


class NotAcceptable(ValueError):
    """Nothing the client accepts can be sent (406), or its Accept header cannot be read."""


def parse_accept(header: str | None) -> list[Acceptable]:
    """The media ranges of an Accept header, best first: by q-value, then the more specific before the
    wildcards, then in the client's order. Ranges with q=0 are left out (RFC 9110: not acceptable).

    ``multipart/related`` (or ``multipart/*``) without a ``type`` parameter gives ``*/*`` with
    ``multipart`` set: any multipart answer. None or an empty header gives [] (the resource's default
    applies); a malformed one, or one whose every range has q=0, raises NotAcceptable.
    """
    if header is None or not header.strip():
        return []
    ranges: list[tuple[int, Acceptable]] = []
    refused = 0
    for element in _split(header, ","):
        if not element.strip():
            continue  # RFC 9110 §5.6.1: empty list elements are allowed and ignored
        acceptable = _media_range(element)
        if acceptable.q == 0:
            refused += 1
        else:
            ranges.append((_wildcards(acceptable.media_type), acceptable))
    if refused and not ranges:
        raise NotAcceptable("the Accept header accepts nothing")
    return [acceptable for _, acceptable in sorted(ranges, key=lambda r: (-r[1].q, r[0]))]


def choose_transfer_syntax(accepted: Sequence[Acceptable], stored: str, *,
                           convertible: Callable[[str, str], bool],
                           unnamed: str = EXPLICIT_VR_LITTLE_ENDIAN) -> str:
    """The transfer syntax to send an instance stored in ``stored`` in, for a WADO-RS retrieve of
    instances (multipart/related; type="application/dicom"), following PS3.18 8.7.3: a range without
    transfer-syntax means ``unnamed`` (the standard's Explicit VR Little Endian; ``"*"`` for a server
    whose contract is "as stored"), ``*`` means as stored, any other must be the stored syntax or one
    ``convertible(stored, wanted)`` allows. The first acceptable range that can be met wins; no Accept
    header at all (``accepted`` empty) is the default range. NotAcceptable (406) when no range can be
    met."""
    candidates = list(accepted) or [Acceptable("application/dicom", None, multipart=True, q=1.0)]
    for acceptable in candidates:
        if not covers_dicom_parts(acceptable):
            continue
        wanted = acceptable.transfer_syntax or unnamed
        if wanted == "*" or wanted == stored:
            return stored
        if convertible(stored, wanted):
            return wanted
    raise NotAcceptable(f"no acceptable transfer syntax for an instance stored as {stored}")


def covers_dicom_parts(acceptable: Acceptable) -> bool:
    """Whether the range admits multipart/related; type="application/dicom"."""
    if acceptable.multipart:
        return acceptable.media_type in ("application/dicom", "application/*", "*/*")
    return acceptable.media_type == "*/*"


def _wildcards(media_type: str) -> int:
    """0 for type/subtype, 1 for type/*, 2 for */*: the order of preference among equal q-values."""
    return media_type.count("*")


def _media_range(element: str) -> Acceptable:
    head, *parameters = _split(element, ";")
    found = _MEDIA_TYPE.fullmatch(head.strip())
    if found is None:
        raise NotAcceptable(f"not a media range: {head.strip()!r}")
    media_type = found.group(0).lower()
    if media_type.startswith("*/") and media_type != "*/*":
        raise NotAcceptable(f"not a media range: {media_type!r}")
    values: dict[str, str] = {}
    for parameter in parameters:
        if not parameter.strip():
            continue  # RFC 9110 §5.6.6 allows empty parameters
        pair = _PARAMETER.fullmatch(parameter)
        if pair is None:
            raise NotAcceptable(f"malformed parameter {parameter.strip()!r} in {element.strip()!r}")
        name, value = pair.group(1).lower(), pair.group(2)
        if value.startswith('"'):
            value = re.sub(r"\\(.)", r"\1", value[1:-1])
        if name in values:
            raise NotAcceptable(f"parameter {name} given twice in {element.strip()!r}")
        values[name] = value
    q = values.get("q", "1")
    if not _QVALUE.fullmatch(q):
        raise NotAcceptable(f"not a q-value: {q!r}")
    multipart = media_type in ("multipart/related", "multipart/*")
    if multipart:
        inner = values.get("type", "*/*").lower()
        if not _MEDIA_TYPE.fullmatch(inner):
            raise NotAcceptable(f"multipart type is not a media type: {inner!r}")
        media_type = inner
    syntax = values.get("transfer-syntax")
    if syntax is not None and syntax != "*" and not _UID.fullmatch(syntax):
        raise NotAcceptable(f"not a transfer syntax UID: {syntax!r}")
    return Acceptable(media_type=media_type, transfer_syntax=syntax, multipart=multipart, q=float(q))


def _split(text: str, separator: str) -> list[str]:
    """``text`` cut at ``separator`` outside quoted strings (a quoted parameter may hold , and ;)."""
    pieces: list[str] = []
    start, quoted, escaped = 0, False, False
    for index, char in enumerate(text):
        if escaped:
            escaped = False
        elif quoted and char == "\\":
            escaped = True
        elif char == '"':
            quoted = not quoted
        elif char == separator and not quoted:
            pieces.append(text[start:index])
            start = index + 1
    if quoted:
        raise NotAcceptable("unterminated quoted string in the Accept header")
    pieces.append(text[start:])
    return pieces
