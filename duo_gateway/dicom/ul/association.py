"""An asyncio DICOM association (PS3.8 Upper Layer + the DIMSE messages of the bulk path), both roles.

Why not pynetdicom here: every pynetdicom association is two polling threads (its DUL reactor sleeps
1 ms whenever idle, its association reactor 1 ms every loop) plus per-PDU queue hand-offs and
pydicom-decoded command sets; a relay through it spent 24-28 ms of CPU per MB and waited in those
sleeps (docs/dicom.md §11). Here one :class:`asyncio.Protocol` feeds the sans-I/O
:class:`~duo_gateway.dicom.ul.pdu.PduReader`; the coroutine that wants the next message pulls events
from it. Nothing polls; a received PDV goes straight from the bytes asyncio read into its sink.

Rules this module keeps:

- **Datasets are never held whole.** A received C-STORE dataset streams PDV piece by PDV piece into a
  :class:`DatasetSink` (the spool's ``.part-`` file); a sent one streams from a file at an offset,
  one block of PDUs (at most :data:`SEND_BLOCK` bytes) in memory at a time, read with one ``preadv``
  and written with one ``transport.write``. Small datasets (identifiers, responses) are collected,
  bounded by ``max_small_dataset``.
- **Back-pressure both ways.** Reading pauses (``transport.pause_reading``) once more than
  :data:`READ_HIGH_WATER` bytes are fed and not consumed, i.e. while the consumer (a sink waiting for
  room in the spool, a caller not asking for the next message) lags; writes wait for the transport's
  ``resume_writing``.
- **Timeouts everywhere.** Connect, ARTIM (the A-ASSOCIATE/A-RELEASE answers), DIMSE (no event
  within it while a message is awaited) and write stalls each end the association with an A-ABORT.
  Cancellation aborts too: after a cancelled send the association's state is unknown.
- **A malformed stream gets the standard answer.** The reader's :class:`ProtocolError` and any PDU
  out of place become an A-ABORT from the service provider with the reason PS3.8 names, then the
  socket closes; the caller sees a :class:`UlError`, never the decoding exception.
- TCP_NODELAY follows :mod:`duo_gateway.dicom.nodelay` (one rule for every DICOM socket).

The acceptor (:class:`UlServer`) answers C-ECHO and hands C-STOREs to a :data:`StoreHandler`;
everything else on an accepted context is refused by abort. It serves DUO's C-MOVE destination.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Final, Protocol

import structlog

from duo_gateway.dicom.nodelay import apply_tcp_nodelay
from duo_gateway.dicom.status import SUCCESS, UNABLE_TO_PROCESS
from duo_gateway.dicom.ul import pdu
from duo_gateway.dicom.ul.dimse import (
    C_ECHO_RQ,
    C_STORE_RQ,
    Command,
    DimseError,
    c_echo_rsp,
    c_store_rsp,
    decode_command,
    encode_command,
)
from duo_gateway.dicom.ul.part10 import IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME

log = structlog.get_logger(__name__)

#: What DUO advertises as its Maximum Length Received unless configured: received PDUs are streamed,
#: never held whole, so a large value costs no memory and saves per-PDU work at both ends.
DEFAULT_MAX_PDU: Final = 1 << 20
#: The largest P-DATA-TF DUO sends, whatever the peer allows (0 = "unlimited" there).
DEFAULT_SEND_PDU: Final = 1 << 20
#: Bytes of file (PDUs with their headers) read and written per step of a dataset send.
SEND_BLOCK: Final = 1 << 20
#: Pause reading the socket past this many fed-but-unconsumed bytes.
READ_HIGH_WATER: Final = 1 << 20
#: A command set longer than this is not a command set.
MAX_COMMAND: Final = 64 * 1024
VERIFICATION: Final = "1.2.840.10008.1.1"


# -- errors ----------------------------------------------------------------------------------------


class UlError(Exception):
    """The association is unusable (already aborted and closed when raised)."""


class UlConnectError(UlError):
    """No association: connection refused or reset, TLS failure, no A-ASSOCIATE answer."""


class UlRejected(UlError):
    def __init__(self, rj: pdu.AssociateRJ) -> None:
        super().__init__(f"association rejected (result {rj.result}, source {rj.source}, reason {rj.reason})")
        self.rj = rj


class UlAborted(UlError):
    """The peer aborted, closed the connection, or broke the protocol (we then aborted)."""


class UlTimeout(UlError):
    pass


# -- configuration and records ---------------------------------------------------------------------


@dataclass(frozen=True)
class Timeouts:
    connect_s: float = 10.0
    #: ARTIM: how long an A-ASSOCIATE-RQ/AC/RJ or A-RELEASE-RP may take.
    acse_s: float = 10.0
    #: Longest silence while a DIMSE message is awaited (or between requests at an acceptor).
    dimse_s: float = 30.0
    #: Longest a write may wait for the peer to read.
    network_s: float = 30.0


@dataclass(frozen=True)
class AcceptedContext:
    context_id: int
    abstract_syntax: str
    transfer_syntax: str


@dataclass(frozen=True)
class Message:
    """A received DIMSE message other than a C-STORE-RQ its association handled itself."""

    context_id: int
    command: Command
    #: The dataset's bytes (identifiers, response data sets: small by nature), None without one.
    dataset: bytes | None


class DatasetSink(Protocol):
    """Where a received C-STORE dataset goes, piece by piece; ``finish`` returns the C-STORE status."""

    def write(self, data: memoryview) -> None:
        """Never raises: a failing sink remembers it and answers a failure status from ``finish``."""

    async def finish(self) -> int: ...

    def discard(self) -> None:
        """The dataset will not complete (abort, cancel): drop whatever was written."""


#: Called per received C-STORE-RQ: a sink for its dataset, or the status to refuse it with (its
#: dataset is then read and dropped).
StoreHandler = Callable[["Association", AcceptedContext, Command], Awaitable["DatasetSink | int"]]


# -- the wire ----------------------------------------------------------------------------------------


class _Wire(asyncio.Protocol):
    def __init__(self, assoc: Association) -> None:
        self.assoc = assoc

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            apply_tcp_nodelay(sock)
        self.assoc._connected(transport)

    def data_received(self, data: bytes) -> None:
        self.assoc._on_data(data)

    def eof_received(self) -> bool | None:
        return None

    def connection_lost(self, exc: Exception | None) -> None:
        self.assoc._on_lost()

    def pause_writing(self) -> None:
        self.assoc._writable.clear()

    def resume_writing(self) -> None:
        self.assoc._writable.set()


# -- the association ---------------------------------------------------------------------------------


class Association:
    """One association, either role. Requestors come from :func:`connect`, acceptors from :class:`UlServer`.

    One coroutine at a time receives (``receive``/``send_c_store``); sends are serialised by the caller.
    """

    def __init__(self, *, max_pdu: int = DEFAULT_MAX_PDU, send_pdu: int = DEFAULT_SEND_PDU,
                 timeouts: Timeouts = Timeouts(), max_small_dataset: int = 16 << 20) -> None:
        self.max_pdu = max_pdu
        self.send_pdu_cap = send_pdu
        self.timeouts = timeouts
        self.max_small_dataset = max_small_dataset
        self._reader = pdu.PduReader(max_pdu)
        self._transport: asyncio.Transport | None = None
        self._data = asyncio.Event()
        self._writable = asyncio.Event()
        self._writable.set()
        self._lost = False
        self._paused = False
        self.established = False
        #: The peer's Maximum Length Received (0: no limit).
        self.peer_max_pdu = 0
        self.calling_ae = ""
        self.called_ae = ""
        self.accepted: dict[int, AcceptedContext] = {}
        #: SCP/SCU role selection the acceptor returned (requestor side), by SOP class.
        self.roles: dict[str, pdu.RoleSelection] = {}
        self.store_handler: StoreHandler | None = None
        #: An acceptor answers C-ECHO-RQs inside :meth:`receive` (the Verification service).
        self.answers_echo = False
        self._next_message_id = 0

    # wire callbacks --------------------------------------------------------------------------------

    def _connected(self, transport: asyncio.Transport) -> None:
        self._transport = transport

    def _on_data(self, data: bytes) -> None:
        self._reader.feed(data)
        if self._reader.buffered > READ_HIGH_WATER and not self._paused and self._transport is not None:
            self._paused = True
            self._transport.pause_reading()
        self._data.set()

    def _on_lost(self) -> None:
        self._lost = True
        self.established = False
        self._data.set()
        self._writable.set()

    # plumbing -----------------------------------------------------------------------------------------

    @property
    def closed(self) -> bool:
        return self._lost or self._transport is None or self._transport.is_closing()

    def next_message_id(self) -> int:
        self._next_message_id = self._next_message_id % 0xFFFF + 1
        return self._next_message_id

    async def _event(self, timeout_s: float, what: str) -> pdu.Event:
        """The next reader event, waiting at most ``timeout_s`` for bytes to arrive."""
        while True:
            ev = self._reader.next_event()
            if ev is not pdu.NEED_DATA:
                assert not isinstance(ev, pdu._NeedData)
                return ev
            if self._lost:
                self._close()
                raise UlAborted(f"connection closed by the peer while waiting for {what}")
            if self._paused and self._transport is not None:
                self._paused = False
                self._transport.resume_reading()
            self._data.clear()
            try:
                async with asyncio.timeout(timeout_s):
                    await self._data.wait()
            except TimeoutError:
                self.abort()
                raise UlTimeout(f"no {what} within {timeout_s:g} s") from None

    def _write(self, data: bytes | bytearray | memoryview) -> None:
        if self._lost or self._transport is None or self._transport.is_closing():
            raise UlAborted("connection closed")
        self._transport.write(data)

    async def _drain(self) -> None:
        if self._writable.is_set():
            if self._lost:
                raise UlAborted("connection closed")
            return
        try:
            async with asyncio.timeout(self.timeouts.network_s):
                await self._writable.wait()
        except TimeoutError:
            self.abort()
            raise UlTimeout(f"peer read nothing for {self.timeouts.network_s:g} s") from None
        if self._lost:
            raise UlAborted("connection closed while sending")

    def _close(self) -> None:
        self.established = False
        if self._transport is not None and not self._transport.is_closing():
            self._transport.close()

    def abort(self, source: int = pdu.ABORT_SOURCE_USER, reason: int = pdu.REASON_NOT_SPECIFIED) -> None:
        """Send A-ABORT (best effort) and close; safe to call at any time, any number of times."""
        if self._transport is not None and not self._transport.is_closing() and not self._lost:
            with contextlib.suppress(Exception):
                self._transport.write(pdu.encode_abort(source, reason))
        self._close()

    def _protocol_abort(self, reason: int, detail: str) -> UlAborted:
        log.warning("ul_protocol_error", detail=detail, reason=reason, peer=self.calling_ae or self.called_ae)
        self.abort(pdu.ABORT_SOURCE_PROVIDER, reason)
        return UlAborted(f"protocol error: {detail}")

    @property
    def send_value_max(self) -> int:
        """Largest PDV value per P-DATA-TF we send: the peer's limit (minus the PDV item header), capped."""
        limit = self.send_pdu_cap if not self.peer_max_pdu else min(self.peer_max_pdu, self.send_pdu_cap)
        return max(limit - 6, 1)

    # sending ------------------------------------------------------------------------------------------

    async def send_command(self, context_id: int, command: Command, dataset: bytes | None = None) -> None:
        """One DIMSE message whose dataset (if any) is small and in memory."""
        encoded = encode_command(command)
        await self._send_value(context_id, True, encoded)
        if dataset is not None:
            await self._send_value(context_id, False, dataset)

    async def _send_value(self, context_id: int, command: bool, value: bytes) -> None:
        step = self.send_value_max
        view = memoryview(value)
        start = 0
        while True:
            piece = view[start:start + step]
            start += len(piece)
            last = start >= len(value)
            self._write(pdu.pdata_header(context_id, command, last, len(piece)) + piece)
            await self._drain()
            if last:
                return

    async def send_dataset_file(self, context_id: int, path: Path, offset: int) -> int:
        """Stream the file from ``offset`` to its end as the dataset; returns the bytes sent.

        Per step, as many PDUs as fit in :data:`SEND_BLOCK` are laid out in one fresh buffer (their
        headers in place), filled by one ``preadv`` and handed to the transport in one write.
        """
        step = self.send_value_max
        per_block = max(1, SEND_BLOCK // (step + pdu.PDATA_OVERHEAD))
        fd = os.open(path, os.O_RDONLY)
        try:
            length = os.fstat(fd).st_size - offset
            if length < 0:
                raise ValueError(f"{path.name} is shorter than its file meta")
            if length == 0:
                self._write(pdu.pdata_header(context_id, False, True, 0))
                await self._drain()
                return 0
            pos = offset
            left = length
            while left:
                sizes: list[int] = []
                planned = 0
                while planned < left and len(sizes) < per_block:
                    sizes.append(min(step, left - planned))
                    planned += sizes[-1]
                buf = bytearray(sum(sizes) + pdu.PDATA_OVERHEAD * len(sizes))
                view = memoryview(buf)
                targets = []
                at = 0
                sent_after = length - left
                for size in sizes:
                    sent_after += size
                    last = sent_after == length
                    buf[at:at + pdu.PDATA_OVERHEAD] = pdu.pdata_header(context_id, False, last, size)
                    targets.append(view[at + pdu.PDATA_OVERHEAD:at + pdu.PDATA_OVERHEAD + size])
                    at += pdu.PDATA_OVERHEAD + size
                want = sum(sizes)
                got = os.preadv(fd, targets, pos)
                if got != want:
                    raise ValueError(f"{path.name} shrank while it was being sent")
                pos += want
                left -= want
                self._write(buf)
                await self._drain()
            return length
        finally:
            os.close(fd)

    # receiving -----------------------------------------------------------------------------------------

    async def receive(self, timeout_s: float | None = None) -> Message | None:
        """The next DIMSE message; C-STORE-RQs go to :attr:`store_handler` and are answered here.

        None when the peer released the association (A-RELEASE-RP sent, connection closed).
        """
        timeout = self.timeouts.dimse_s if timeout_s is None else timeout_s
        command_buf = bytearray()
        command: Command | None = None
        context: AcceptedContext | None = None
        dataset: bytearray | None = None
        sink: DatasetSink | None = None
        refused: int | None = None
        try:
            while True:
                ev = await self._event(timeout, "a DIMSE message")
                if isinstance(ev, pdu.PdvData):
                    cx = self.accepted.get(ev.context_id)
                    if cx is None:
                        raise self._protocol_abort(
                            pdu.REASON_INVALID_PARAMETER, f"PDV on context {ev.context_id}, not accepted")
                    if ev.command:
                        if command is not None:
                            raise self._protocol_abort(pdu.REASON_UNEXPECTED_PARAMETER,
                                                       "command fragment while a dataset was due")
                        if context is not None and context.context_id != ev.context_id:
                            raise self._protocol_abort(pdu.REASON_INVALID_PARAMETER,
                                                       "command fragments on two presentation contexts")
                        context = cx
                        command_buf += ev.data
                        if len(command_buf) > MAX_COMMAND:
                            raise self._protocol_abort(pdu.REASON_INVALID_PARAMETER, "command set too long")
                        if not ev.last_fragment:
                            continue
                        try:
                            command = decode_command(command_buf)
                        except DimseError as exc:
                            raise self._protocol_abort(pdu.REASON_INVALID_PARAMETER, str(exc)) from None
                        if not command.has_dataset:
                            if command.command_field == C_ECHO_RQ and self.answers_echo:
                                # an acceptor's Verification service: answered in stride
                                await self.send_command(cx.context_id, c_echo_rsp(command, SUCCESS))
                                command_buf, command, context = bytearray(), None, None
                                continue
                            return Message(cx.context_id, command, None)
                        if command.command_field == C_STORE_RQ and self.store_handler is not None:
                            outcome = await self.store_handler(self, cx, command)
                            if isinstance(outcome, int):
                                refused = outcome
                            else:
                                sink = outcome
                        else:
                            dataset = bytearray()
                        continue
                    # a dataset fragment
                    if command is None or context is None or ev.context_id != context.context_id:
                        raise self._protocol_abort(pdu.REASON_UNEXPECTED_PARAMETER,
                                                   "dataset fragment without its command")
                    if sink is not None:
                        sink.write(ev.data)
                    elif dataset is not None:
                        dataset += ev.data
                        if len(dataset) > self.max_small_dataset:
                            raise self._protocol_abort(pdu.REASON_NOT_SPECIFIED,
                                                       f"dataset over {self.max_small_dataset} bytes")
                    if not ev.last_fragment:
                        continue
                    if dataset is not None:
                        return Message(context.context_id, command, bytes(dataset))
                    if sink is not None:
                        done, sink = sink, None
                        status = await done.finish()
                    else:
                        status = refused if refused is not None else UNABLE_TO_PROCESS
                    await self.send_command(context.context_id, c_store_rsp(command, status))
                    command_buf, command, context, refused = bytearray(), None, None, None
                    continue
                if isinstance(ev, pdu.ReleaseRQ):
                    if command is not None or command_buf:
                        raise self._protocol_abort(pdu.REASON_UNEXPECTED_PDU, "A-RELEASE-RQ inside a message")
                    self._write(pdu.encode_release_rp())
                    self._close()
                    return None
                self._unexpected(ev)
        except BaseException:
            if sink is not None:
                sink.discard()
            if not self.closed:
                self.abort()
            raise

    def _unexpected(self, ev: pdu.Event) -> None:
        """Raise for an event that has no place where it arrived."""
        if isinstance(ev, pdu.Abort):
            self._close()
            raise UlAborted(f"peer aborted (source {ev.source}, reason {ev.reason})")
        if isinstance(ev, pdu.ProtocolError):
            raise self._protocol_abort(ev.reason, ev.detail)
        raise self._protocol_abort(pdu.REASON_UNEXPECTED_PDU, f"unexpected {type(ev).__name__}")

    async def send_c_store_file(self, context_id: int, command: Command, path: Path, offset: int,
                                timeout_s: float | None = None) -> Command:
        """C-STORE-RQ with the file's dataset (from ``offset``); returns the C-STORE-RSP command."""
        try:
            await self.send_command(context_id, command)
            await self.send_dataset_file(context_id, path, offset)
        except BaseException:
            self.abort()
            raise
        msg = await self.receive(timeout_s)
        if msg is None:
            raise UlAborted("peer released the association instead of answering the C-STORE")
        rsp = msg.command
        if rsp.command_field != 0x8001 or rsp.message_id_responded_to != command.message_id:
            raise self._protocol_abort(pdu.REASON_UNEXPECTED_PARAMETER,
                                       f"answer 0x{rsp.command_field:04X} to C-STORE-RQ {command.message_id}")
        return rsp

    async def release(self) -> None:
        """A-RELEASE-RQ, wait (ARTIM) for the A-RELEASE-RP, close; abort if it does not come."""
        if self.closed:
            return
        try:
            self._write(pdu.encode_release_rq())
            while True:
                ev = await self._event(self.timeouts.acse_s, "A-RELEASE-RP")
                if isinstance(ev, pdu.ReleaseRP):
                    break
                if isinstance(ev, pdu.ReleaseRQ):  # release collision (PS3.8 7.2.2): requestor answers
                    self._write(pdu.encode_release_rp())
                    continue
                if isinstance(ev, pdu.PdvData):
                    continue  # a late response to something we gave up on
                self._unexpected(ev)
        except UlError:
            return
        except BaseException:
            self.abort()
            raise
        self._close()


# -- requestor -----------------------------------------------------------------------------------------


async def connect(host: str, port: int, *, calling_ae: str, called_ae: str,
                  contexts: Sequence[pdu.PresentationContextRQ],
                  roles: Iterable[pdu.RoleSelection] = (), ssl_context: ssl.SSLContext | None = None,
                  max_pdu: int = DEFAULT_MAX_PDU, send_pdu: int = DEFAULT_SEND_PDU,
                  timeouts: Timeouts = Timeouts(), store_handler: StoreHandler | None = None) -> Association:
    """Connect and negotiate; raises :class:`UlConnectError`, :class:`UlRejected` or :class:`UlError`."""
    assoc = Association(max_pdu=max_pdu, send_pdu=send_pdu, timeouts=timeouts)
    assoc.calling_ae, assoc.called_ae = calling_ae, called_ae
    assoc.store_handler = store_handler
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(timeouts.connect_s):
            await loop.create_connection(lambda: _Wire(assoc), host, port, ssl=ssl_context,
                                         server_hostname=host if ssl_context is not None else None)
    except (OSError, ssl.SSLError, TimeoutError) as exc:
        raise UlConnectError(f"no connection to {host}:{port}: {type(exc).__name__}: {exc}") from None
    rq = pdu.AssociateRQ(called_ae, calling_ae, tuple(contexts), pdu.UserInformation(
        max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME, tuple(roles)))
    try:
        assoc._write(pdu.encode_associate_rq(rq))
        ev = await assoc._event(timeouts.acse_s, "A-ASSOCIATE-AC")
    except UlError as exc:
        assoc.abort()
        raise UlConnectError(str(exc)) from None
    except BaseException:
        assoc.abort()
        raise
    if isinstance(ev, pdu.AssociateRJ):
        assoc._close()
        raise UlRejected(ev)
    if not isinstance(ev, pdu.AssociateAC):
        try:
            assoc._unexpected(ev)
        except UlError as exc:
            raise UlConnectError(str(exc)) from None
        raise UlConnectError("no A-ASSOCIATE-AC")
    proposed = {cx.context_id: cx for cx in contexts}
    for result in ev.contexts:
        asked = proposed.get(result.context_id)
        if (result.result == pdu.PC_ACCEPTANCE and asked is not None
                and result.transfer_syntax in asked.transfer_syntaxes):
            assoc.accepted[result.context_id] = AcceptedContext(result.context_id, asked.abstract_syntax,
                                                                result.transfer_syntax)
    assoc.peer_max_pdu = ev.user_info.max_pdu_length
    assoc.roles = {r.sop_class_uid: r for r in ev.user_info.roles}
    assoc.established = True
    return assoc


# -- acceptor ------------------------------------------------------------------------------------------


@dataclass
class AcceptorPolicy:
    """What an acceptor accepts: its AE title, and per abstract syntax the transfer syntaxes, best first."""

    ae_title: str
    supported: Mapping[str, Sequence[str]]
    require_called_ae: bool = True
    #: Associations served at once; one more is rejected (transient, local limit exceeded), as
    #: pynetdicom's ``maximum_associations`` did, so a flood of connections cannot exhaust the spool.
    max_associations: int = 32
    max_pdu: int = DEFAULT_MAX_PDU
    send_pdu: int = DEFAULT_SEND_PDU
    timeouts: Timeouts = field(default_factory=Timeouts)

    def negotiate(self, rq: pdu.AssociateRQ) -> pdu.AssociateRJ | tuple[pdu.PresentationContextAC, ...]:
        if rq.protocol_version & 1 == 0:
            return pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_ACSE, pdu.RJ_ACSE_PROTOCOL_VERSION)
        if rq.application_context != pdu.APPLICATION_CONTEXT:
            return pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_APP_CONTEXT)
        if self.require_called_ae and rq.called_ae.strip() != self.ae_title.strip():
            return pdu.AssociateRJ(pdu.RJ_PERMANENT, pdu.RJ_SOURCE_USER, pdu.RJ_USER_CALLED_AE)
        results = []
        for cx in rq.contexts:
            ours = self.supported.get(cx.abstract_syntax)
            if ours is None:
                results.append(pdu.PresentationContextAC(cx.context_id, pdu.PC_ABSTRACT_SYNTAX_NOT_SUPPORTED,
                                                         cx.transfer_syntaxes[0]))
                continue
            chosen = next((ts for ts in ours if ts in cx.transfer_syntaxes), None)
            if chosen is None:
                results.append(pdu.PresentationContextAC(
                    cx.context_id, pdu.PC_TRANSFER_SYNTAXES_NOT_SUPPORTED, cx.transfer_syntaxes[0]))
            else:
                results.append(pdu.PresentationContextAC(cx.context_id, pdu.PC_ACCEPTANCE, chosen))
        return tuple(results)


class UlServer:
    """An asyncio DICOM acceptor: C-ECHO, and C-STOREs into ``store_handler``; one task per association."""

    def __init__(self, policy: AcceptorPolicy, store_handler: StoreHandler,
                 ssl_context: ssl.SSLContext | None = None) -> None:
        self.policy = policy
        self.store_handler = store_handler
        self.ssl_context = ssl_context
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._associations: set[Association] = set()

    async def start(self, host: str, port: int) -> None:
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(self._protocol, host, port, ssl=self.ssl_context,
                                                reuse_address=True)

    @property
    def port(self) -> int:
        assert self._server is not None and self._server.sockets, "server not started"
        return int(self._server.sockets[0].getsockname()[1])

    def _protocol(self) -> _Wire:
        p = self.policy
        assoc = Association(max_pdu=p.max_pdu, send_pdu=p.send_pdu, timeouts=p.timeouts)
        assoc.store_handler = self.store_handler
        assoc.answers_echo = VERIFICATION in p.supported
        wire = _Wire(assoc)
        task = asyncio.get_running_loop().create_task(self._serve(assoc))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return wire

    async def _serve(self, assoc: Association) -> None:
        self._associations.add(assoc)
        try:
            await self._run(assoc)
        except UlError as exc:
            log.info("ul_association_ended", reason=str(exc), calling_ae=assoc.calling_ae)
        except asyncio.CancelledError:
            assoc.abort()
            raise
        except Exception as exc:  # never let one association take the acceptor down
            log.error("ul_association_failed", error=type(exc).__name__, detail=str(exc)[:200],
                      calling_ae=assoc.calling_ae)
            assoc.abort(pdu.ABORT_SOURCE_PROVIDER, pdu.REASON_NOT_SPECIFIED)
        finally:
            self._associations.discard(assoc)

    async def _run(self, assoc: Association) -> None:
        ev = await assoc._event(self.policy.timeouts.acse_s, "A-ASSOCIATE-RQ")
        if not isinstance(ev, pdu.AssociateRQ):
            assoc._unexpected(ev)
            return
        assoc.calling_ae, assoc.called_ae = ev.calling_ae, ev.called_ae
        outcome = self.policy.negotiate(ev)
        busy = len(self._associations) > self.policy.max_associations
        if busy and not isinstance(outcome, pdu.AssociateRJ):
            outcome = pdu.AssociateRJ(pdu.RJ_TRANSIENT, pdu.RJ_SOURCE_PRESENTATION, pdu.RJ_PRESENTATION_LIMIT)
        if isinstance(outcome, pdu.AssociateRJ):
            log.warning("ul_association_rejected", calling_ae=ev.calling_ae, called_ae=ev.called_ae,
                        reason=outcome.reason)
            assoc._write(pdu.encode_associate_rj(outcome))
            assoc._close()
            return
        by_id = {cx.context_id: cx for cx in ev.contexts}
        for result in outcome:
            if result.result == pdu.PC_ACCEPTANCE:
                assoc.accepted[result.context_id] = AcceptedContext(
                    result.context_id, by_id[result.context_id].abstract_syntax, result.transfer_syntax)
        assoc.peer_max_pdu = ev.user_info.max_pdu_length
        assoc._write(pdu.encode_associate_ac(pdu.AssociateAC(
            ev.called_ae, ev.calling_ae, outcome, pdu.UserInformation(
                self.policy.max_pdu, IMPLEMENTATION_CLASS_UID, IMPLEMENTATION_VERSION_NAME))))
        assoc.established = True
        while True:
            msg = await assoc.receive()
            if msg is None:
                return
            # Anything but C-STORE and C-ECHO (handled inside receive) has no service here.
            raise assoc._protocol_abort(pdu.REASON_UNEXPECTED_PARAMETER,
                                        f"no service for command 0x{msg.command.command_field:04X}")

    async def close(self) -> None:
        """Stop listening and abort the associations still open."""
        if self._server is not None:
            self._server.close()
        for assoc in list(self._associations):
            assoc.abort()
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None


def verification_supported() -> dict[str, list[str]]:
    return {VERIFICATION: ["1.2.840.10008.1.2.1", "1.2.840.10008.1.2"]}


__all__ = [
    "DEFAULT_MAX_PDU", "DEFAULT_SEND_PDU", "AcceptedContext", "AcceptorPolicy", "Association", "DatasetSink",
    "Message", "StoreHandler", "Timeouts", "UlAborted", "UlConnectError", "UlError", "UlRejected", "UlServer",
    "UlTimeout", "connect", "verification_supported",
]
