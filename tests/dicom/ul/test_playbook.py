"""Playbooks for the asyncio Upper Layer without sockets: bytes in, events and bytes out, in any chunking.

The PDU codec and DIMSE command sets are checked against pynetdicom's encoder (an independent
implementation of the same standard), and an acceptor-side :class:`Association` is driven through a
memory transport: what it writes back (A-ASSOCIATE-AC/RJ, C-STORE-RSP, A-ABORT with its reason) is
decoded and asserted.
"""

from __future__ import annotations

import asyncio
import io
import random
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom.dimse_messages import C_FIND_RQ as PynetC_FIND_RQ
from pynetdicom.dimse_messages import C_GET_RQ as PynetC_GET_RQ
from pynetdicom.dimse_messages import C_MOVE_RQ as PynetC_MOVE_RQ
from pynetdicom.dimse_messages import C_STORE_RQ as PynetC_STORE_RQ
from pynetdicom.dimse_primitives import C_FIND, C_GET, C_MOVE, C_STORE
from pynetdicom.dsutils import encode
from pynetdicom.pdu import A_ASSOCIATE_RQ as PynetAssociateRQ
from pynetdicom.pdu_primitives import A_ASSOCIATE, MaximumLengthNotification, SCP_SCU_RoleSelectionNegotiation
from pynetdicom.presentation import build_context

from duo_gateway.dicom.status import OUT_OF_RESOURCES, SUCCESS
from duo_gateway.dicom.ul import pdu
from duo_gateway.dicom.ul.association import (
    AcceptedContext,
    AcceptorPolicy,
    Association,
    Timeouts,
    UlAborted,
    UlServer,
    _Wire,
)
from duo_gateway.dicom.ul.dimse import (
    C_ECHO_RSP,
    C_STORE_RSP,
    Command,
    DimseError,
    c_echo_rq,
    c_find_rq,
    c_get_rq,
    c_move_rq,
    c_store_rq,
    decode_command,
    encode_command,
)
from duo_gateway.dicom.ul.part10 import file_meta
from tests.support.nosockets import no_sockets  # noqa: F401

pytestmark = pytest.mark.usefixtures("no_sockets")

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"
IMPLICIT = "1.2.840.10008.1.2"


def chunkings(data: bytes, seed: int = 7) -> Iterator[list[bytes]]:
    """Whole, byte by byte, and a few random splittings."""
    yield [data]
    yield [data[i:i + 1] for i in range(len(data))]
    rng = random.Random(seed)
    for _ in range(5):
        cuts = sorted(rng.sample(range(1, len(data)), min(len(data) - 1, rng.randint(1, 12))))
        yield [data[a:b] for a, b in zip([0, *cuts], [*cuts, len(data)], strict=True)]


def read_all(chunks: list[bytes], reader: pdu.PduReader | None = None) -> list[Any]:
    reader = reader or pdu.PduReader()
    events: list[Any] = []
    for chunk in chunks:
        reader.feed(chunk)
        while (ev := reader.next_event()) is not pdu.NEED_DATA:
            events.append(ev)
    return events


def join_pdvs(events: list[Any]) -> list[tuple[int, bool, bytes, bool]]:
    """Reassemble PDV pieces into (context, command, value, last_fragment)."""
    out: list[tuple[int, bool, bytes, bool]] = []
    value = bytearray()
    for ev in events:
        if isinstance(ev, pdu.PdvData):
            value += ev.data
            if ev.ends:
                out.append((ev.context_id, ev.command, bytes(value), ev.last_fragment))
                value = bytearray()
    return out


RQ = pdu.AssociateRQ("DUO", "ORTHANC", (
    pdu.PresentationContextRQ(1, CT, (EXPLICIT, IMPLICIT)),
    pdu.PresentationContextRQ(3, "1.2.840.10008.5.1.4.1.2.2.3", (IMPLICIT,)),
), pdu.UserInformation(1 << 20, "1.2.3.4", "X_1", (pdu.RoleSelection(CT, False, True),),
                       ((0x56, b"\x00\x041.23"),)))


# -- the PDU codec --------------------------------------------------------------------------------------


def test_control_pdus_round_trip_in_any_chunking() -> None:
    ac = pdu.AssociateAC("DUO", "ORTHANC", (pdu.PresentationContextAC(1, 0, EXPLICIT),
                                            pdu.PresentationContextAC(3, 3, IMPLICIT)),
                         pdu.UserInformation(16384, "1.2.3.4", "X", (pdu.RoleSelection(CT, False, True),)))
    rj = pdu.AssociateRJ(1, 1, 7)
    expected = [RQ, ac, rj, pdu.ReleaseRQ(), pdu.ReleaseRP(), pdu.Abort(2, 6)]
    stream = (pdu.encode_associate_rq(RQ) + pdu.encode_associate_ac(ac) + pdu.encode_associate_rj(rj)
              + pdu.encode_release_rq() + pdu.encode_release_rp() + pdu.encode_abort(2, 6))
    for chunks in chunkings(stream):
        assert read_all(chunks) == expected


def test_associate_rq_decodes_as_pynetdicom_encodes_it() -> None:
    primitive = A_ASSOCIATE()
    primitive.application_context_name = pdu.APPLICATION_CONTEXT
    primitive.calling_ae_title = "PYNET"
    primitive.called_ae_title = "DUO"
    cx = build_context(CT, [EXPLICIT, IMPLICIT])
    cx.context_id = 1
    primitive.presentation_context_definition_list = [cx]
    max_len = MaximumLengthNotification()
    max_len.maximum_length_received = 65536
    role = SCP_SCU_RoleSelectionNegotiation()
    role.sop_class_uid = CT
    role.scu_role = False
    role.scp_role = True
    primitive.user_information = [max_len, role]
    theirs = PynetAssociateRQ()
    theirs.from_primitive(primitive)
    [ev] = read_all([theirs.encode()])
    assert isinstance(ev, pdu.AssociateRQ)
    assert (ev.called_ae, ev.calling_ae) == ("DUO", "PYNET")
    assert ev.contexts == (pdu.PresentationContextRQ(1, CT, (EXPLICIT, IMPLICIT)),)
    assert ev.user_info.max_pdu_length == 65536
    assert ev.user_info.roles == (pdu.RoleSelection(CT, False, True),)
    # and pynetdicom decodes ours
    mine = PynetAssociateRQ()
    mine.decode(pdu.encode_associate_rq(RQ))
    assert [str(c.abstract_syntax) for c in mine.presentation_context] == [CT, "1.2.840.10008.5.1.4.1.2.2.3"]


def test_pdata_values_are_views_of_the_fed_bytes_in_any_chunking() -> None:
    command = encode_command(c_store_rq(7, CT, "1.2.3"))
    dataset = bytes(range(256)) * 300
    stream = (pdu.encode_pdata(1, True, True, command) + pdu.encode_pdata(1, False, False, dataset[:40000])
              + pdu.pdata_header(1, False, True, len(dataset) - 40000) + dataset[40000:])
    for chunks in chunkings(stream):
        events = read_all(chunks)
        assert all(isinstance(ev, pdu.PdvData) for ev in events)
        assert join_pdvs(events) == [(1, True, command, True), (1, False, dataset[:40000], False),
                                     (1, False, dataset[40000:], True)]
    # fed whole, the dataset pieces are slices of that one bytes object: no copy was made
    events = read_all([stream])
    assert all(ev.data.obj is stream for ev in events if not ev.command)


def test_two_pdvs_in_one_pdata_and_empty_pdv() -> None:
    body = struct.pack(">IBB", 2 + 3, 1, 0x01) + b"abc" + struct.pack(">IBB", 2, 1, 0x03)
    stream = struct.pack(">BBI", 4, 0, len(body)) + body
    for chunks in chunkings(stream):
        assert join_pdvs(read_all(chunks)) == [(1, True, b"abc", False), (1, True, b"", True)]


@pytest.mark.parametrize(("stream", "reason"), [
    (b"\x09\x00" + struct.pack(">I", 4) + bytes(4), pdu.REASON_UNRECOGNIZED_PDU),
    (pdu.pdata_header(1, False, True, 2000) + bytes(2000), pdu.REASON_INVALID_PARAMETER),  # over our max
    (struct.pack(">BBI", 4, 0, 8) + struct.pack(">IBB", 9, 1, 0) + b"ab", pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 4, 0, 6) + struct.pack(">IBB", 1, 1, 0), pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 4, 0, 7) + struct.pack(">IBB", 2, 1, 0) + b"x", pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 4, 0, 6) + struct.pack(">IBB", 2, 2, 0), pdu.REASON_INVALID_PARAMETER),  # even ID
    (struct.pack(">BBI", 4, 0, 6) + struct.pack(">IBB", 2, 1, 0x10), pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 4, 0, 2) + b"\x00\x00", pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 5, 0, 3) + bytes(3), pdu.REASON_INVALID_PARAMETER),
    (struct.pack(">BBI", 1, 0, 10) + bytes(10), pdu.REASON_INVALID_PARAMETER),  # truncated A-ASSOCIATE-RQ
    (struct.pack(">BBI", 1, 0, 5000) + bytes(5000), pdu.REASON_INVALID_PARAMETER),  # over the control limit
    (pdu.encode_associate_rq(RQ)[:-20] + pdu.encode_associate_rq(RQ)[-10:], pdu.REASON_INVALID_PARAMETER),
])
def test_malformed_pdus_become_protocol_errors_never_exceptions(stream: bytes, reason: int) -> None:
    for chunks in chunkings(stream):
        # a corrupted length may leave the PDU incomplete: complete it with padding
        reader = pdu.PduReader(max_pdata_length=1024, max_control_pdu=4096)
        events = read_all([*chunks, bytes(64)], reader)
        errors = [ev for ev in events if isinstance(ev, pdu.ProtocolError)]
        assert len(errors) == 1 and errors[0].reason == reason and errors[0].source == 2, events
        assert isinstance(events[-1], pdu.ProtocolError)
        assert reader.dead
        reader.feed(pdu.encode_release_rq())
        assert reader.next_event() is pdu.NEED_DATA


# -- DIMSE command sets --------------------------------------------------------------------------------


def _pynet_c_store(move_originator: bool) -> bytes:
    req = C_STORE()
    req.MessageID = 12
    req.Priority = 2
    req.AffectedSOPClassUID = CT
    req.AffectedSOPInstanceUID = "1.2.840.99.1"
    if move_originator:
        req.MoveOriginatorApplicationEntityTitle = "MOVER"
        req.MoveOriginatorMessageID = 513
    msg = PynetC_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001
    msg._set_command_group_length()
    encoded = encode(msg.command_set, True, True)
    assert encoded is not None
    return encoded


@pytest.mark.parametrize("move_originator", [False, True])
def test_command_set_decodes_as_pynetdicom_encodes_it(move_originator: bool) -> None:
    cmd = decode_command(_pynet_c_store(move_originator))
    assert (cmd.command_field, cmd.message_id, cmd.priority) == (0x0001, 12, 2)
    assert (cmd.affected_sop_class_uid, cmd.affected_sop_instance_uid) == (CT, "1.2.840.99.1")
    assert cmd.has_dataset
    if move_originator:
        assert (cmd.move_originator_ae, cmd.move_originator_message_id) == ("MOVER", 513)
    else:
        assert cmd.move_originator_message_id is None


def test_command_set_encodes_as_pynetdicom_would() -> None:
    ours = encode_command(c_store_rq(12, CT, "1.2.840.99.1", move_originator_ae="MOVER",
                                     move_originator_message_id=513, priority=2))
    assert ours == _pynet_c_store(True)
    # and every typed field survives a round trip
    cmd = Command(0x8010, message_id_responded_to=3, affected_sop_class_uid="1.2", status=0xFF00, remaining=4,
                  completed=5, failed=6, warning=7, error_comment="odd", other={0x0901: b"\x10\x00\x20\x00"})
    assert decode_command(encode_command(cmd)) == cmd


def test_query_retrieve_requests_encode_as_pynetdicom_would() -> None:
    """C-FIND, C-GET and C-MOVE requests, as the Q/R SCU sends them (dicom/qr.py)."""
    find_model, get_model, move_model = ("1.2.840.10008.5.1.4.1.2.2.1", "1.2.840.10008.5.1.4.1.2.2.3",
                                         "1.2.840.10008.5.1.4.1.2.2.2")
    for ours, primitive, message in (
            (c_find_rq(7, find_model), C_FIND(), PynetC_FIND_RQ()),
            (c_get_rq(8, get_model), C_GET(), PynetC_GET_RQ()),
            (c_move_rq(9, move_model, "DUO_SCP"), C_MOVE(), PynetC_MOVE_RQ())):
        primitive.MessageID = ours.message_id
        primitive.Priority = 0
        primitive.AffectedSOPClassUID = ours.affected_sop_class_uid
        if ours.move_destination is not None:
            primitive.MoveDestination = ours.move_destination
        message.primitive_to_message(primitive)
        message.command_set.CommandDataSetType = 0x0001
        message._set_command_group_length()
        assert encode_command(ours) == encode(message.command_set, True, True), type(message).__name__


@pytest.mark.parametrize("bad", [
    b"\x00\x00\x00\x01\x04\x00",  # truncated element header
    struct.pack("<HHI", 8, 0x10, 2) + b"ab",  # outside group 0000
    struct.pack("<HHI", 0, 0x100, 4) + bytes(4),  # US of 4 bytes
    struct.pack("<HHI", 0, 0x110, 8) + bytes(2),  # runs past the end
    struct.pack("<HHI", 0, 0x110, 2) + bytes(2),  # no Command Field
])
def test_bad_command_sets_raise_dimse_error(bad: bytes) -> None:
    with pytest.raises(DimseError):
        decode_command(bad)


def test_file_meta_makes_a_readable_part10_file(tmp_path: Path) -> None:
    ds = Dataset()
    ds.SOPClassUID = CT
    ds.SOPInstanceUID = "1.2.840.99.2"
    ds.PatientName = "Test^Name"
    body = encode(ds, False, True)
    assert body is not None
    path = tmp_path / "x.dcm"
    path.write_bytes(file_meta(CT, "1.2.840.99.2", EXPLICIT, "SENDER") + body)
    read = dcmread(path)
    assert read.file_meta.TransferSyntaxUID == EXPLICIT
    assert read.file_meta.MediaStorageSOPInstanceUID == "1.2.840.99.2"
    assert read.file_meta.SourceApplicationEntityTitle == "SENDER"
    assert read.PatientName == "Test^Name"


# -- an acceptor association over a memory transport ----------------------------------------------------


class MemoryTransport(asyncio.Transport):
    def __init__(self) -> None:
        super().__init__()
        self.out = bytearray()
        self.closing = False
        self.paused = False

    def write(self, data: Any) -> None:
        self.out += data

    def close(self) -> None:
        self.closing = True

    def is_closing(self) -> bool:
        return self.closing

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return default


class FileSink:
    def __init__(self, status: int = SUCCESS) -> None:
        self.buf = io.BytesIO()
        self.status = status
        self.discarded = False

    def write(self, data: memoryview) -> None:
        self.buf.write(data)

    async def finish(self) -> int:
        return self.status

    def discard(self) -> None:
        self.discarded = True


class Acceptor:
    """A UlServer's per-connection path, wired to a memory transport."""

    def __init__(self, refuse: int | None = None) -> None:
        self.sinks: list[FileSink] = []
        self.commands: list[Command] = []

        async def handler(assoc: Association, cx: Any, cmd: Command) -> FileSink | int:
            self.commands.append(cmd)
            if refuse is not None:
                return refuse
            sink = FileSink()
            self.sinks.append(sink)
            return sink

        supported = {CT: [EXPLICIT, IMPLICIT], "1.2.840.10008.1.1": [IMPLICIT]}
        self.server = UlServer(AcceptorPolicy("DUO", supported, max_pdu=4096,
                                              timeouts=Timeouts(acse_s=2, dimse_s=2)), handler)
        self.wire = self.server._protocol()
        self.transport = MemoryTransport()
        self.wire.connection_made(self.transport)

    async def feed(self, chunks: list[bytes]) -> None:
        for chunk in chunks:
            self.wire.data_received(chunk)
            await asyncio.sleep(0)
        for _ in range(20):
            await asyncio.sleep(0)

    def answers(self) -> list[Any]:
        return read_all([bytes(self.transport.out)])


def store_stream(dataset: bytes, *, msg_id: int = 1, pdu_value: int = 1000,
                 sop_uid: str = "1.2.3.4") -> bytes:
    out = pdu.encode_pdata(1, True, True, encode_command(c_store_rq(msg_id, CT, sop_uid)))
    for start in range(0, len(dataset), pdu_value):
        piece = dataset[start:start + pdu_value]
        out += pdu.encode_pdata(1, False, start + pdu_value >= len(dataset), piece)
    return out


async def test_acceptor_playbook_store_echo_release_in_any_chunking() -> None:
    dataset = bytes(random.Random(1).randbytes(10_000))
    rq = pdu.AssociateRQ("DUO", "PACS", (pdu.PresentationContextRQ(1, CT, (IMPLICIT, EXPLICIT)),
                                         pdu.PresentationContextRQ(3, "1.2.840.10008.1.1", (IMPLICIT,)),
                                         pdu.PresentationContextRQ(5, "1.2.9.9", (IMPLICIT,))),
                         pdu.UserInformation(2048))
    echo = pdu.encode_pdata(3, True, True, encode_command(c_echo_rq(2)))
    stream = (pdu.encode_associate_rq(rq) + store_stream(dataset) + echo
              + store_stream(dataset[:10], msg_id=3) + pdu.encode_release_rq())
    for chunks in list(chunkings(stream))[::3]:
        acc = Acceptor()
        await acc.feed(chunks)
        answers = acc.answers()
        ac = answers[0]
        assert isinstance(ac, pdu.AssociateAC)
        assert [(c.context_id, c.result, c.transfer_syntax) for c in ac.contexts] == [
            (1, 0, EXPLICIT), (3, 0, IMPLICIT), (5, pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED, IMPLICIT)]
        assert ac.user_info.max_pdu_length == 4096
        responses = [decode_command(value) for _, _, value, _ in join_pdvs(answers[1:])]
        assert [(r.command_field, r.message_id_responded_to, r.status) for r in responses] == [
            (C_STORE_RSP, 1, SUCCESS), (C_ECHO_RSP, 2, SUCCESS), (C_STORE_RSP, 3, SUCCESS)]
        assert responses[0].affected_sop_instance_uid == "1.2.3.4"
        assert isinstance(answers[-1], pdu.ReleaseRP) and acc.transport.closing
        assert [s.buf.getvalue() for s in acc.sinks] == [dataset, dataset[:10]]
        await acc.server.close()


async def test_acceptor_refusal_reads_and_drops_the_dataset() -> None:
    acc = Acceptor(refuse=OUT_OF_RESOURCES)
    rq = pdu.AssociateRQ("DUO", "PACS", (pdu.PresentationContextRQ(1, CT, (EXPLICIT,)),))
    await acc.feed([pdu.encode_associate_rq(rq) + store_stream(bytes(5000)) + pdu.encode_release_rq()])
    answers = acc.answers()
    [(_, _, value, _)] = join_pdvs(answers)
    assert decode_command(value).status == OUT_OF_RESOURCES
    assert isinstance(answers[-1], pdu.ReleaseRP)
    await acc.server.close()


@pytest.mark.parametrize(("after_ac", "reason"), [
    (b"\x0a\x00\x00\x00\x00\x04" + bytes(4), pdu.REASON_UNRECOGNIZED_PDU),
    (pdu.encode_pdata(7, True, True, b"x"), pdu.REASON_INVALID_PARAMETER),  # context never accepted
    (pdu.encode_pdata(1, False, True, b"data before its command"), pdu.REASON_UNEXPECTED_PARAMETER),
    (pdu.encode_pdata(1, True, True, b"\x00\x00\x01\x00"), pdu.REASON_INVALID_PARAMETER),  # bad command set
    (pdu.encode_pdata(1, True, True, encode_command(c_get_rq(1, CT)))
     + pdu.encode_pdata(1, False, True, b"q"), pdu.REASON_UNEXPECTED_PARAMETER),  # no C-GET service here
    (pdu.encode_associate_rq(RQ), pdu.REASON_UNEXPECTED_PDU),
    (pdu.pdata_header(1, False, False, 5000) + bytes(5000), pdu.REASON_INVALID_PARAMETER),  # over our 4096
])
async def test_acceptor_aborts_malformed_or_unexpected_input(after_ac: bytes, reason: int) -> None:
    acc = Acceptor()
    rq = pdu.AssociateRQ("DUO", "PACS", (pdu.PresentationContextRQ(1, CT, (EXPLICIT,)),))
    await acc.feed([pdu.encode_associate_rq(rq) + store_stream(b"ok") + after_ac])
    answers = acc.answers()
    assert isinstance(answers[0], pdu.AssociateAC)
    assert answers[-1] == pdu.Abort(pdu.ABORT_SOURCE_PROVIDER, reason)
    assert acc.transport.closing
    assert not acc.server._associations  # the task ended; nothing escaped
    await acc.server.close()


async def test_acceptor_discards_a_partial_dataset_when_the_peer_aborts() -> None:
    acc = Acceptor()
    rq = pdu.AssociateRQ("DUO", "PACS", (pdu.PresentationContextRQ(1, CT, (EXPLICIT,)),))
    command_length = len(encode_command(c_store_rq(1, CT, "1.2.3.4")))
    first_two_pdus = store_stream(bytes(3000))[:12 + command_length + 12 + 1000]
    await acc.feed([pdu.encode_associate_rq(rq) + first_two_pdus + pdu.encode_abort(0, 0)])
    assert acc.sinks and acc.sinks[0].discarded
    assert acc.transport.closing
    await acc.server.close()


@pytest.mark.parametrize(("rq", "reason"), [
    (pdu.AssociateRQ("SOMEONE", "PACS", (pdu.PresentationContextRQ(1, CT, (EXPLICIT,)),)),
     pdu.RJ_USER_CALLED_AE),
    (pdu.AssociateRQ("DUO", "PACS", (), application_context="1.2.3"), pdu.RJ_USER_APP_CONTEXT),
])
async def test_acceptor_rejects_with_the_standard_reason(rq: pdu.AssociateRQ, reason: int) -> None:
    acc = Acceptor()
    await acc.feed([pdu.encode_associate_rq(rq)])
    [rj] = acc.answers()
    assert isinstance(rj, pdu.AssociateRJ) and rj.reason == reason and rj.result == pdu.RJ_PERMANENT
    await acc.server.close()


async def test_acceptor_rejects_past_its_association_limit() -> None:
    acc = Acceptor()
    acc.server.policy.max_associations = 1
    rq = pdu.AssociateRQ("DUO", "PACS", (pdu.PresentationContextRQ(1, CT, (EXPLICIT,)),))
    await acc.feed([pdu.encode_associate_rq(rq)])
    second = acc.server._protocol()
    transport = MemoryTransport()
    second.connection_made(transport)
    second.data_received(pdu.encode_associate_rq(rq))
    for _ in range(20):
        await asyncio.sleep(0)
    assert isinstance(acc.answers()[0], pdu.AssociateAC)
    assert read_all([bytes(transport.out)]) == [
        pdu.AssociateRJ(pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_LIMIT)]
    assert transport.closing
    await acc.server.close()


async def test_acceptor_artim_aborts_a_silent_peer() -> None:
    acc = Acceptor()
    acc.server.policy.timeouts = Timeouts(acse_s=0.05)
    acc2 = acc.server._protocol()  # a new connection picks the policy up
    transport = MemoryTransport()
    acc2.connection_made(transport)
    await asyncio.sleep(0.3)
    assert transport.closing
    assert read_all([bytes(transport.out)]) == [pdu.Abort(0, 0)]
    await acc.server.close()


async def test_backpressure_pauses_reading_while_nobody_consumes() -> None:
    assoc = Association(max_pdu=0)
    transport = MemoryTransport()
    wire = _Wire(assoc)
    wire.connection_made(transport)
    big = pdu.encode_pdata(1, False, False, bytes(600_000))
    wire.data_received(big)
    assert not transport.paused
    wire.data_received(big)
    assert transport.paused  # over READ_HIGH_WATER unconsumed
    assoc.accepted[1] = AcceptedContext(1, CT, EXPLICIT)
    with pytest.raises(UlAborted):  # a dataset with no command: consumed, then refused by abort
        await assoc.receive(1)
    assert transport.closing


@pytest.mark.parametrize(("peer_max", "length"), [(2048, 10_000), (0, 3_000_000), (2048, 0), (4096, 4090)])
async def test_a_file_goes_in_pdus_of_the_peers_maximum(tmp_path: Path, peer_max: int, length: int) -> None:
    data = random.Random(length).randbytes(length)
    path = tmp_path / "f.dcm"
    path.write_bytes(b"META" * 5 + data)
    assoc = Association(send_pdu=1 << 20)
    transport = MemoryTransport()
    _Wire(assoc).connection_made(transport)
    assoc.peer_max_pdu = peer_max
    assert await assoc.send_dataset_file(3, path, 20) == length
    sizes = []
    out = bytes(transport.out)
    pos = 0
    while pos < len(out):
        _, _, size = struct.unpack_from(">BBI", out, pos)
        sizes.append(size)
        pos += 6 + size
    assert max(sizes) <= (peer_max or 1 << 20)
    pdvs = join_pdvs(read_all([out]))
    assert b"".join(v for _, _, v, _ in pdvs) == data
    assert [last for *_, last in pdvs] == [False] * (len(pdvs) - 1) + [True]
    assert all(cx == 3 and not command for cx, command, _, _ in pdvs)
