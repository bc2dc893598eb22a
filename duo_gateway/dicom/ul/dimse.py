"""DIMSE command sets (PS3.7 E.1: group 0000, Implicit VR Little Endian) by hand, sans-I/O.

Why not pydicom: a command set is a dozen fixed elements, and decoding one through pydicom (dataset,
element objects, UID validation) was ~15% of the relay's GIL time (docs/dicom.md §11). Here a command
is a flat :class:`Command` record, encoded with ``struct`` and decoded in one pass over its bytes.
Only the elements of the messages DUO exchanges on its bulk path are typed (C-STORE, C-GET, C-MOVE,
C-FIND, C-ECHO, C-CANCEL); any other element of a received command is kept raw in ``other`` and
never breaks the decode.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from typing import Final

# Command Field values (PS3.7 E.1)
C_STORE_RQ: Final = 0x0001
C_STORE_RSP: Final = 0x8001
C_GET_RQ: Final = 0x0010
C_GET_RSP: Final = 0x8010
C_FIND_RQ: Final = 0x0020
C_FIND_RSP: Final = 0x8020
C_MOVE_RQ: Final = 0x0021
C_MOVE_RSP: Final = 0x8021
C_ECHO_RQ: Final = 0x0030
C_ECHO_RSP: Final = 0x8030
C_CANCEL_RQ: Final = 0x0FFF

#: Command Data Set Type: "no dataset follows"; any other value means one does.
NO_DATASET: Final = 0x0101
HAS_DATASET: Final = 0x0001

PRIORITY_MEDIUM: Final = 0x0000

_US = {0x0100: "command_field", 0x0110: "message_id", 0x0120: "message_id_responded_to",
       0x0700: "priority", 0x0800: "data_set_type", 0x0900: "status", 0x0903: "error_id",
       0x1020: "remaining", 0x1021: "completed", 0x1022: "failed", 0x1023: "warning",
       0x1031: "move_originator_message_id"}
_UI = {0x0002: "affected_sop_class_uid", 0x0003: "requested_sop_class_uid",
       0x1000: "affected_sop_instance_uid", 0x1001: "requested_sop_instance_uid"}
_TEXT = {0x0600: "move_destination", 0x0902: "error_comment", 0x1030: "move_originator_ae"}
#: Element number -> (attribute, kind), for the encoder in tag order.
_FIELDS: Final = sorted([*((e, (n, "US")) for e, n in _US.items()), *((e, (n, "UI")) for e, n in _UI.items()),
                         *((e, (n, "TX")) for e, n in _TEXT.items())])
_BY_ELEMENT: Final = dict(_FIELDS)

_ELEMENT = struct.Struct("<HHI")
_U16 = struct.Struct("<H")
_U32 = struct.Struct("<I")


class DimseError(ValueError):
    """A command set that cannot be decoded (truncated, wrong group, bad value length)."""


@dataclass
class Command:
    """One DIMSE command set; None means the element is absent."""

    command_field: int
    message_id: int | None = None
    message_id_responded_to: int | None = None
    affected_sop_class_uid: str | None = None
    requested_sop_class_uid: str | None = None
    affected_sop_instance_uid: str | None = None
    requested_sop_instance_uid: str | None = None
    priority: int | None = None
    data_set_type: int = NO_DATASET
    status: int | None = None
    error_comment: str | None = None
    error_id: int | None = None
    move_destination: str | None = None
    move_originator_ae: str | None = None
    move_originator_message_id: int | None = None
    remaining: int | None = None
    completed: int | None = None
    failed: int | None = None
    warning: int | None = None
    #: Elements this codec does not type: element number -> raw value.
    other: dict[int, bytes] = field(default_factory=dict)

    @property
    def has_dataset(self) -> bool:
        return self.data_set_type != NO_DATASET


def _pad(raw: bytes, pad: bytes) -> bytes:
    return raw + pad if len(raw) % 2 else raw


def encode_command(cmd: Command) -> bytes:
    """The command set's bytes, (0000,0000) Command Group Length first."""
    body = bytearray()
    for element, (name, kind) in _FIELDS:
        value = getattr(cmd, name)
        if value is None:
            continue
        if kind == "US":
            raw = _U16.pack(int(value))
        elif kind == "UI":
            raw = _pad(str(value).encode("ascii"), b"\0")
        else:
            raw = _pad(str(value).encode("ascii"), b" ")
        body += _ELEMENT.pack(0, element, len(raw)) + raw
    for element, raw in sorted(cmd.other.items()):
        if element in _BY_ELEMENT or element == 0:
            continue
        body += _ELEMENT.pack(0, element, len(raw)) + raw
    return _ELEMENT.pack(0, 0, 4) + _U32.pack(len(body)) + bytes(body)


def decode_command(data: bytes | bytearray | memoryview) -> Command:
    view = memoryview(data)
    pos = 0
    values: dict[str, object] = {}
    other: dict[int, bytes] = {}
    end = len(view)
    while pos < end:
        if pos + 8 > end:
            raise DimseError("truncated element header in command set")
        group, element, length = _ELEMENT.unpack_from(view, pos)
        pos += 8
        if group != 0:
            raise DimseError(f"element ({group:04X},{element:04X}) outside group 0000 in a command set")
        if length == 0xFFFFFFFF or pos + length > end:
            raise DimseError(f"element (0000,{element:04X}) runs past the command set")
        raw = bytes(view[pos:pos + length])
        pos += length
        known = _BY_ELEMENT.get(element)
        if known is None:
            if element:
                other[element] = raw
            continue
        name, kind = known
        if kind == "US":
            if length != 2:
                raise DimseError(f"(0000,{element:04X}) US of {length} bytes")
            values[name] = _U16.unpack(raw)[0]
        else:
            values[name] = raw.decode("ascii", "replace").rstrip("\0 ").lstrip(" ")
    if "command_field" not in values:
        raise DimseError("command set without (0000,0100) Command Field")
    command = Command(**values)  # type: ignore[arg-type]
    command.other = other
    return command


# -- the messages DUO sends --------------------------------------------------------------------------


def c_store_rq(message_id: int, sop_class_uid: str, sop_instance_uid: str, *,
               move_originator_ae: str | None = None, move_originator_message_id: int | None = None,
               priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_STORE_RQ, message_id=message_id, affected_sop_class_uid=sop_class_uid,
                   affected_sop_instance_uid=sop_instance_uid, priority=priority, data_set_type=HAS_DATASET,
                   move_originator_ae=move_originator_ae,
                   move_originator_message_id=move_originator_message_id)


def c_store_rsp(request: Command, status: int, error_comment: str | None = None) -> Command:
    return Command(C_STORE_RSP, message_id_responded_to=request.message_id,
                   affected_sop_class_uid=request.affected_sop_class_uid,
                   affected_sop_instance_uid=request.affected_sop_instance_uid, status=status,
                   error_comment=error_comment)


def c_echo_rq(message_id: int, sop_class_uid: str = "1.2.840.10008.1.1") -> Command:
    return Command(C_ECHO_RQ, message_id=message_id, affected_sop_class_uid=sop_class_uid)


def c_echo_rsp(request: Command, status: int) -> Command:
    return Command(C_ECHO_RSP, message_id_responded_to=request.message_id,
                   affected_sop_class_uid=request.affected_sop_class_uid or "1.2.840.10008.1.1",
                   status=status)


def c_get_rq(message_id: int, sop_class_uid: str, priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_GET_RQ, message_id=message_id, affected_sop_class_uid=sop_class_uid, priority=priority,
                   data_set_type=HAS_DATASET)


def c_find_rq(message_id: int, sop_class_uid: str, priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_FIND_RQ, message_id=message_id, affected_sop_class_uid=sop_class_uid, priority=priority,
                   data_set_type=HAS_DATASET)


def c_move_rq(message_id: int, sop_class_uid: str, destination: str,
              priority: int = PRIORITY_MEDIUM) -> Command:
    return Command(C_MOVE_RQ, message_id=message_id, affected_sop_class_uid=sop_class_uid, priority=priority,
                   move_destination=destination, data_set_type=HAS_DATASET)


def c_cancel_rq(message_id: int) -> Command:
    return Command(C_CANCEL_RQ, message_id_responded_to=message_id)


__all__ = [
    "C_CANCEL_RQ", "C_ECHO_RQ", "C_ECHO_RSP", "C_FIND_RQ", "C_FIND_RSP", "C_GET_RQ", "C_GET_RSP", "C_MOVE_RQ",
    "C_MOVE_RSP", "C_STORE_RQ", "C_STORE_RSP", "HAS_DATASET", "NO_DATASET", "Command", "DimseError",
    "c_cancel_rq", "c_echo_rq", "c_echo_rsp", "c_find_rq", "c_get_rq", "c_move_rq", "c_store_rq",
    "c_store_rsp", "decode_command", "encode_command",
]
