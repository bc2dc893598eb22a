"""Sans-I/O PS3.8 Upper Layer PDU codec: bytes in, typed PDUs out, and the encoders back.

Why a codec of our own rather than pynetdicom's ``pdu`` classes: the bulk of every transfer is
P-DATA-TF, and pynetdicom decodes each PDU into objects holding copies of its PDV values. Here a
P-DATA-TF is never materialised: :class:`PduReader` hands out its PDV values as ``memoryview``
slices of the very ``bytes`` objects it was fed (:class:`PdvData`, possibly in several pieces when a
value spans reads), so a received dataset goes from the socket buffer to its spool file without a
copy. Only the small fixed headers (6 bytes) that straddle two reads are copied.

It is pull-based in the h11 style: :meth:`PduReader.feed` any chunking of the stream, then call
:meth:`PduReader.next_event` until it returns :data:`NEED_DATA`. Pulling lets the caller stop between
events (e.g. while it waits for room in the spool) without the reader consuming more than it handed
out. A malformed or oversized PDU never raises: it becomes a :class:`ProtocolError` event carrying the
A-ABORT source/reason to send (PS3.8 9.3.8), after which the reader yields nothing more.

The negotiation PDUs (A-ASSOCIATE-RQ/AC/RJ) are small and rare; they are decoded whole once complete
and bounded by ``max_control_pdu``.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

# PDU types (PS3.8 9.3.1)
A_ASSOCIATE_RQ: Final = 0x01
A_ASSOCIATE_AC: Final = 0x02
A_ASSOCIATE_RJ: Final = 0x03
P_DATA_TF: Final = 0x04
A_RELEASE_RQ: Final = 0x05
A_RELEASE_RP: Final = 0x06
A_ABORT: Final = 0x07

#: The DICOM application context name (PS3.7 A.2.1).
APPLICATION_CONTEXT: Final = "1.2.840.10008.3.1.1.1"

# A-ABORT sources and service-provider reasons (PS3.8 9.3.8, table 9-26)
ABORT_SOURCE_USER: Final = 0
ABORT_SOURCE_PROVIDER: Final = 2
REASON_NOT_SPECIFIED: Final = 0
REASON_UNRECOGNIZED_PDU: Final = 1
REASON_UNEXPECTED_PDU: Final = 2
REASON_UNRECOGNIZED_PARAMETER: Final = 4
REASON_UNEXPECTED_PARAMETER: Final = 5
REASON_INVALID_PARAMETER: Final = 6

# A-ASSOCIATE-RJ (PS3.8 9.3.4)
RJ_PERMANENT: Final = 1
RJ_TRANSIENT: Final = 2
RJ_SOURCE_USER: Final = 1
RJ_SOURCE_ACSE: Final = 2
RJ_SOURCE_PRESENTATION: Final = 3
RJ_USER_NO_REASON: Final = 1
RJ_USER_APP_CONTEXT: Final = 2
RJ_USER_CALLING_AE: Final = 3
RJ_USER_CALLED_AE: Final = 7
RJ_ACSE_PROTOCOL_VERSION: Final = 2
RJ_PRESENTATION_CONGESTION: Final = 1
RJ_PRESENTATION_LIMIT: Final = 2

# Presentation context results (PS3.8 9.3.3.2)
PC_ACCEPTANCE: Final = 0
PC_USER_REJECTION: Final = 1
PC_NO_REASON: Final = 2
PC_ABSTRACT_SYNTAX_NOT_SUPPORTED: Final = 3
PC_TRANSFER_SYNTAXES_NOT_SUPPORTED: Final = 4

#: Bytes of PDU header (type, reserved, length) plus one PDV item header (length, context, control).
PDATA_OVERHEAD: Final = 12

_PDU_HEADER = struct.Struct(">BBI")
_PDV_HEADER = struct.Struct(">IBB")
_ITEM_HEADER = struct.Struct(">BBH")


# -- typed PDUs --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RoleSelection:
    """SCP/SCU Role Selection sub-item (PS3.7 D.3.3.4): which roles the requestor proposes/acceptor grants."""

    sop_class_uid: str
    scu: bool
    scp: bool


@dataclass(frozen=True)
class PresentationContextRQ:
    context_id: int
    abstract_syntax: str
    transfer_syntaxes: tuple[str, ...]


@dataclass(frozen=True)
class PresentationContextAC:
    context_id: int
    result: int
    transfer_syntax: str


@dataclass(frozen=True)
class UserInformation:
    #: 0 means "no limit" (PS3.8 D.1).
    max_pdu_length: int = 0
    implementation_class_uid: str = ""
    implementation_version_name: str = ""
    roles: tuple[RoleSelection, ...] = ()
    #: Sub-items this codec does not interpret (type, value), passed through untouched.
    other: tuple[tuple[int, bytes], ...] = ()


@dataclass(frozen=True)
class AssociateRQ:
    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextRQ, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateAC:
    called_ae: str
    calling_ae: str
    contexts: tuple[PresentationContextAC, ...]
    user_info: UserInformation = field(default_factory=UserInformation)
    application_context: str = APPLICATION_CONTEXT
    protocol_version: int = 1


@dataclass(frozen=True)
class AssociateRJ:
    result: int
    source: int
    reason: int


@dataclass(frozen=True)
class ReleaseRQ:
    pass


@dataclass(frozen=True)
class ReleaseRP:
    pass


@dataclass(frozen=True)
class Abort:
    source: int
    reason: int


@dataclass(frozen=True)
class PdvData:
    """A piece of one PDV's value. ``data`` is a view of fed bytes, valid as long as the caller keeps it.

    A PDV value may arrive in several pieces; ``ends`` marks the piece that ends the PDV, and
    ``last_fragment`` (only ever set with ``ends``) the message control header's last-fragment bit:
    the command set or dataset is complete.
    """

    context_id: int
    command: bool
    data: memoryview
    ends: bool
    last_fragment: bool


@dataclass(frozen=True)
class ProtocolError:
    """The stream is malformed: send A-ABORT(source, reason) and close. The reader is dead afterwards."""

    reason: int
    detail: str
    source: int = ABORT_SOURCE_PROVIDER


class _NeedData:
    def __repr__(self) -> str:
        return "NEED_DATA"


NEED_DATA: Final = _NeedData()

Pdu = AssociateRQ | AssociateAC | AssociateRJ | ReleaseRQ | ReleaseRP | Abort
Event = Pdu | PdvData | ProtocolError


class _Malformed(Exception):
    def __init__(self, reason: int, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


# -- the reader --------------------------------------------------------------------------------------


class PduReader:
    """Incremental PDU reader. ``max_pdata_length`` is the Maximum Length we advertised (0: no limit)."""

    def __init__(self, max_pdata_length: int = 0, max_control_pdu: int = 1 << 20) -> None:
        self.max_pdata_length = max_pdata_length
        self.max_control_pdu = max_control_pdu
        self._chunks: list[bytes] = []
        self._pos = 0  # offset into self._chunks[0]
        self._buffered = 0
        self._dead = False
        # P-DATA-TF state: bytes left in the current PDU, and in the current PDV value
        self._pdu_left = 0
        self._pdv_left = 0
        self._pdv_context = 0
        self._pdv_control = 0

    @property
    def buffered(self) -> int:
        """Bytes fed and not yet handed out: what the caller's back-pressure should watch."""
        return self._buffered

    @property
    def dead(self) -> bool:
        return self._dead

    def feed(self, data: bytes) -> None:
        """Add received bytes. ``bytes`` (immutable) so the views handed out stay valid."""
        if data and not self._dead:
            self._chunks.append(data)
            self._buffered += len(data)

    def next_event(self) -> Event | _NeedData:
        if self._dead:
            return NEED_DATA
        try:
            return self._next()
        except _Malformed as exc:
            self._dead = True
            self._chunks.clear()
            self._buffered = 0
            return ProtocolError(exc.reason, exc.detail)

    # internals ------------------------------------------------------------------------------------

    def _take(self, n: int) -> bytes:
        """Exactly ``n`` buffered bytes (caller checked ``_buffered >= n``); copies only across chunks."""
        first = self._chunks[0]
        end = self._pos + n
        if end <= len(first):
            out = first[self._pos:end]
            self._advance(n)
            return out
        parts = bytearray()
        while len(parts) < n:
            chunk = self._chunks[0]
            piece = chunk[self._pos:self._pos + n - len(parts)]
            parts += piece
            self._advance(len(piece))
        return bytes(parts)

    def _advance(self, n: int) -> None:
        self._pos += n
        self._buffered -= n
        while self._chunks and self._pos >= len(self._chunks[0]):
            self._pos -= len(self._chunks[0])
            self._chunks.pop(0)

    def _next(self) -> Event | _NeedData:
        if self._pdu_left:
            return self._next_pdv()
        if self._buffered < 6:
            return NEED_DATA
        head = self._peek(6)
        pdu_type, _, length = _PDU_HEADER.unpack(head)
        if pdu_type == P_DATA_TF:
            if self.max_pdata_length and length > self.max_pdata_length:
                raise _Malformed(REASON_INVALID_PARAMETER, f"P-DATA-TF of {length} bytes exceeds our "
                                 f"maximum of {self.max_pdata_length}")
            if length < 6:
                raise _Malformed(REASON_INVALID_PARAMETER, f"P-DATA-TF of {length} bytes holds no PDV")
            self._advance(6)
            self._pdu_left = length
            return self._next_pdv()
        if pdu_type not in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC, A_ASSOCIATE_RJ, A_RELEASE_RQ, A_RELEASE_RP,
                            A_ABORT):
            raise _Malformed(REASON_UNRECOGNIZED_PDU, f"unknown PDU type 0x{pdu_type:02X}")
        if length > self.max_control_pdu:
            raise _Malformed(REASON_INVALID_PARAMETER,
                             f"PDU type 0x{pdu_type:02X} of {length} bytes exceeds {self.max_control_pdu}")
        if self._buffered < 6 + length:
            return NEED_DATA
        self._advance(6)
        body = self._take(length) if length else b""
        return _decode_control(pdu_type, body)

    def _peek(self, n: int) -> bytes:
        first = self._chunks[0]
        if self._pos + n <= len(first):
            return first[self._pos:self._pos + n]
        out = bytearray()
        pos = self._pos
        for chunk in self._chunks:
            out += chunk[pos:pos + n - len(out)]
            pos = 0
            if len(out) >= n:
                break
        return bytes(out)

    def _next_pdv(self) -> Event | _NeedData:
        if not self._pdv_left:
            if self._pdu_left < 6:
                raise _Malformed(REASON_INVALID_PARAMETER,
                                 f"{self._pdu_left} stray bytes at the end of a P-DATA-TF")
            if self._buffered < 6:
                return NEED_DATA
            item_length, context_id, control = _PDV_HEADER.unpack(self._take(6))
            self._pdu_left -= 6
            if item_length < 2:
                raise _Malformed(REASON_INVALID_PARAMETER, f"PDV item length {item_length} < 2")
            if item_length - 2 > self._pdu_left:
                raise _Malformed(REASON_INVALID_PARAMETER, "PDV item runs past the end of its P-DATA-TF")
            if context_id % 2 == 0:
                raise _Malformed(REASON_INVALID_PARAMETER, f"even presentation context ID {context_id}")
            if control & 0xFC:
                raise _Malformed(REASON_INVALID_PARAMETER,
                                 f"reserved bits set in PDV control 0x{control:02X}")
            self._pdv_left = item_length - 2
            self._pdv_context = context_id
            self._pdv_control = control
            if self._pdv_left == 0:
                return self._pdv_piece(memoryview(b""))
        if not self._buffered:
            return NEED_DATA
        first = self._chunks[0]
        n = min(self._pdv_left, len(first) - self._pos)
        view = memoryview(first)[self._pos:self._pos + n]
        self._advance(n)
        self._pdv_left -= n
        self._pdu_left -= n
        return self._pdv_piece(view)

    def _pdv_piece(self, view: memoryview) -> PdvData:
        ends = self._pdv_left == 0
        control = self._pdv_control
        return PdvData(self._pdv_context, bool(control & 0x01), view, ends, ends and bool(control & 0x02))


# -- decoding the control PDUs ------------------------------------------------------------------------


def _ae(raw: bytes) -> str:
    return raw.decode("ascii", "replace").strip(" \0")


def _uid(raw: bytes) -> str:
    text = raw.rstrip(b"\0 ").decode("ascii", "replace")
    if len(text) > 64:
        raise _Malformed(REASON_INVALID_PARAMETER, "UID longer than 64 characters")
    return text


def _items(body: bytes, start: int) -> list[tuple[int, bytes]]:
    items: list[tuple[int, bytes]] = []
    pos = start
    while pos < len(body):
        if pos + 4 > len(body):
            raise _Malformed(REASON_INVALID_PARAMETER, "truncated item header")
        item_type, _, length = _ITEM_HEADER.unpack_from(body, pos)
        pos += 4
        if pos + length > len(body):
            raise _Malformed(REASON_INVALID_PARAMETER, f"item 0x{item_type:02X} runs past its PDU")
        items.append((item_type, body[pos:pos + length]))
        pos += length
    return items


def _decode_user_info(value: bytes) -> UserInformation:
    max_len = 0
    impl_uid = impl_version = ""
    roles: list[RoleSelection] = []
    other: list[tuple[int, bytes]] = []
    for sub_type, sub in _items(value, 0):
        if sub_type == 0x51:
            if len(sub) != 4:
                raise _Malformed(REASON_INVALID_PARAMETER, "maximum length sub-item is not 4 bytes")
            max_len = struct.unpack(">I", sub)[0]
        elif sub_type == 0x52:
            impl_uid = _uid(sub)
        elif sub_type == 0x55:
            impl_version = _ae(sub)
        elif sub_type == 0x54:
            if len(sub) < 4:
                raise _Malformed(REASON_INVALID_PARAMETER, "truncated role selection sub-item")
            uid_len = struct.unpack(">H", sub[:2])[0]
            if 2 + uid_len + 2 != len(sub):
                raise _Malformed(REASON_INVALID_PARAMETER, "role selection sub-item length mismatch")
            roles.append(RoleSelection(_uid(sub[2:2 + uid_len]), bool(sub[2 + uid_len]),
                                       bool(sub[3 + uid_len])))
        else:
            other.append((sub_type, sub))
    return UserInformation(max_len, impl_uid, impl_version, tuple(roles), tuple(other))


def _decode_associate(pdu_type: int, body: bytes) -> AssociateRQ | AssociateAC:
    if len(body) < 68:
        raise _Malformed(REASON_INVALID_PARAMETER, "A-ASSOCIATE PDU shorter than its fixed fields")
    version = struct.unpack(">H", body[:2])[0]
    called, calling = _ae(body[4:20]), _ae(body[20:36])
    app_context = ""
    rq_contexts: list[PresentationContextRQ] = []
    ac_contexts: list[PresentationContextAC] = []
    user_info: UserInformation | None = None
    for item_type, value in _items(body, 68):
        if item_type == 0x10:
            app_context = _uid(value)
        elif item_type == 0x20 and pdu_type == A_ASSOCIATE_RQ:
            if len(value) < 4:
                raise _Malformed(REASON_INVALID_PARAMETER, "truncated presentation context item")
            abstract = ""
            syntaxes: list[str] = []
            for sub_type, sub in _items(value, 4):
                if sub_type == 0x30:
                    abstract = _uid(sub)
                elif sub_type == 0x40:
                    syntaxes.append(_uid(sub))
                else:
                    raise _Malformed(REASON_UNEXPECTED_PARAMETER,
                                     f"sub-item 0x{sub_type:02X} in a presentation context")
            if not abstract or not syntaxes:
                raise _Malformed(REASON_INVALID_PARAMETER,
                                 "presentation context without abstract or transfer syntax")
            rq_contexts.append(PresentationContextRQ(value[0], abstract, tuple(syntaxes)))
        elif item_type == 0x21 and pdu_type == A_ASSOCIATE_AC:
            if len(value) < 4:
                raise _Malformed(REASON_INVALID_PARAMETER, "truncated presentation context item")
            syntax = ""
            for sub_type, sub in _items(value, 4):
                if sub_type == 0x40:
                    syntax = _uid(sub)
            ac_contexts.append(PresentationContextAC(value[0], value[2], syntax))
        elif item_type == 0x50:
            user_info = _decode_user_info(value)
        else:
            raise _Malformed(REASON_UNEXPECTED_PARAMETER, f"item 0x{item_type:02X} in an A-ASSOCIATE PDU")
    if not app_context:
        raise _Malformed(REASON_INVALID_PARAMETER, "A-ASSOCIATE PDU without application context")
    if user_info is None:
        raise _Malformed(REASON_INVALID_PARAMETER, "A-ASSOCIATE PDU without user information")
    if pdu_type == A_ASSOCIATE_RQ:
        return AssociateRQ(called, calling, tuple(rq_contexts), user_info, app_context, version)
    return AssociateAC(called, calling, tuple(ac_contexts), user_info, app_context, version)


def _decode_control(pdu_type: int, body: bytes) -> Pdu:
    if pdu_type in (A_ASSOCIATE_RQ, A_ASSOCIATE_AC):
        return _decode_associate(pdu_type, body)
    if len(body) != 4:
        raise _Malformed(REASON_INVALID_PARAMETER,
                         f"PDU type 0x{pdu_type:02X} must be 4 bytes, not {len(body)}")
    if pdu_type == A_ASSOCIATE_RJ:
        return AssociateRJ(body[1], body[2], body[3])
    if pdu_type == A_RELEASE_RQ:
        return ReleaseRQ()
    if pdu_type == A_RELEASE_RP:
        return ReleaseRP()
    return Abort(body[2], body[3])


# -- encoders ------------------------------------------------------------------------------------------


def _pdu(pdu_type: int, body: bytes) -> bytes:
    return _PDU_HEADER.pack(pdu_type, 0, len(body)) + body


def _item(item_type: int, value: bytes) -> bytes:
    if len(value) > 0xFFFF:
        raise ValueError(f"item 0x{item_type:02X} of {len(value)} bytes does not fit")
    return _ITEM_HEADER.pack(item_type, 0, len(value)) + value


def _ae_field(title: str) -> bytes:
    raw = title.encode("ascii")
    if len(raw) > 16:
        raise ValueError(f"AE title {title!r} longer than 16 characters")
    return raw.ljust(16, b" ")


def _encode_user_info(info: UserInformation) -> bytes:
    parts = [_item(0x51, struct.pack(">I", info.max_pdu_length))]
    if info.implementation_class_uid:
        parts.append(_item(0x52, info.implementation_class_uid.encode("ascii")))
    for role in info.roles:
        uid = role.sop_class_uid.encode("ascii")
        parts.append(_item(0x54, struct.pack(">H", len(uid)) + uid + bytes((role.scu, role.scp))))
    if info.implementation_version_name:
        parts.append(_item(0x55, info.implementation_version_name.encode("ascii")))
    parts.extend(_item(t, v) for t, v in info.other)
    return _item(0x50, b"".join(parts))


def _fixed(version: int, called: str, calling: str) -> bytes:
    return struct.pack(">HH", version, 0) + _ae_field(called) + _ae_field(calling) + bytes(32)


def encode_associate_rq(rq: AssociateRQ) -> bytes:
    parts = [_fixed(rq.protocol_version, rq.called_ae, rq.calling_ae),
             _item(0x10, rq.application_context.encode("ascii"))]
    for cx in rq.contexts:
        subs = _item(0x30, cx.abstract_syntax.encode("ascii")) + b"".join(
            _item(0x40, ts.encode("ascii")) for ts in cx.transfer_syntaxes)
        parts.append(_item(0x20, bytes((cx.context_id, 0, 0, 0)) + subs))
    parts.append(_encode_user_info(rq.user_info))
    return _pdu(A_ASSOCIATE_RQ, b"".join(parts))


def encode_associate_ac(ac: AssociateAC) -> bytes:
    parts = [_fixed(ac.protocol_version, ac.called_ae, ac.calling_ae),
             _item(0x10, ac.application_context.encode("ascii"))]
    for cx in ac.contexts:
        parts.append(_item(0x21, bytes((cx.context_id, 0, cx.result, 0))
                           + _item(0x40, cx.transfer_syntax.encode("ascii"))))
    parts.append(_encode_user_info(ac.user_info))
    return _pdu(A_ASSOCIATE_AC, b"".join(parts))


def encode_associate_rj(rj: AssociateRJ) -> bytes:
    return _pdu(A_ASSOCIATE_RJ, bytes((0, rj.result, rj.source, rj.reason)))


def encode_release_rq() -> bytes:
    return _pdu(A_RELEASE_RQ, bytes(4))


def encode_release_rp() -> bytes:
    return _pdu(A_RELEASE_RP, bytes(4))


def encode_abort(source: int = ABORT_SOURCE_USER, reason: int = REASON_NOT_SPECIFIED) -> bytes:
    return _pdu(A_ABORT, bytes((0, 0, source, reason)))


def pdata_header(context_id: int, command: bool, last: bool, value_length: int) -> bytes:
    """The 12 bytes before a P-DATA-TF's single PDV value: write them, then the value itself."""
    control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
    return _PDU_HEADER.pack(P_DATA_TF, 0, value_length + 6) + _PDV_HEADER.pack(
        value_length + 2, context_id, control)


def encode_pdata(context_id: int, command: bool, last: bool, value: bytes | memoryview) -> bytes:
    return pdata_header(context_id, command, last, len(value)) + bytes(value)


__all__ = [
    "ABORT_SOURCE_PROVIDER",
    "ABORT_SOURCE_USER",
    "APPLICATION_CONTEXT",
    "A_ABORT",
    "A_ASSOCIATE_AC",
    "A_ASSOCIATE_RJ",
    "A_ASSOCIATE_RQ",
    "A_RELEASE_RP",
    "A_RELEASE_RQ",
    "NEED_DATA",
    "PDATA_OVERHEAD",
    "P_DATA_TF",
    "Abort",
    "AssociateAC",
    "AssociateRJ",
    "AssociateRQ",
    "Event",
    "Pdu",
    "PduReader",
    "PdvData",
    "PresentationContextAC",
    "PresentationContextRQ",
    "ProtocolError",
    "ReleaseRP",
    "ReleaseRQ",
    "RoleSelection",
    "UserInformation",
    "encode_abort",
    "encode_associate_ac",
    "encode_associate_rj",
    "encode_associate_rq",
    "encode_pdata",
    "encode_release_rp",
    "encode_release_rq",
    "pdata_header",
]
