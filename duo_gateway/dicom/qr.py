"""Asyncio-facing DICOM Query/Retrieve SCU: C-FIND over thread-based pynetdicom, C-GET and C-MOVE on
DUO's asyncio Upper Layer (see below, and :mod:`duo_gateway.dicom.ul`).

pynetdicom blocks: each association is a thread plus a reactor, ``send_c_*`` are blocking generators
and event handlers run in pynetdicom's threads (docs/dicom.md §6). The event loop must never wait on
any of that, so this module keeps to three rules:

- **One single-thread executor per association.** Associate, the Q/R pump (the thread iterating the
  ``send_c_*`` generator) and release run on it, one after the other, so an association is only ever
  driven by one thread. Parallelism comes from more associations, limited per PACS by a semaphore
  (``max_associations``), never from more threads per association. Abort is the exception: it must
  interrupt a blocked pump, so it runs in a thread of its own.
- **Bounded hand-over with back-pressure.** The C-FIND pump hands results to the loop through a
  bounded :class:`asyncio.Queue` with ``run_coroutine_threadsafe(...).result(timeout)``. Received
  instances (C-GET, C-MOVE; on the event loop, see below) are first written to the spool and renamed
  into place, then queued, and only then answered 0x0000; while the consumer lags, the C-STORE waits
  (the PACS waits for our C-STORE-RSP), so at most ``window`` files (and, with ``window_bytes``, about
  that many bytes) sit spooled and unconsumed and memory stays flat.
- **Timeouts everywhere, abort on cancel.** All pynetdicom timeouts are set, every wait on a thread is
  bounded, and a consumer that stops iterating (cancel, break, error) aborts the association and
  leaves no files it did not receive behind.

Failures surface as :class:`QrError` subclasses, each with a ``label`` short enough for a metric label.

The bulk paths are not pynetdicom's: C-GET and C-MOVE associations (:class:`UlRetrieveAssociation`)
and DUO's storage SCP (the C-MOVE destination, started in daemon.py) run on DUO's asyncio Upper Layer
(:mod:`duo_gateway.dicom.ul`), where each received dataset streams PDV by PDV into its spool file
(:meth:`Spool.receive`) on the event loop; the same window, validation and "answer only once renamed
and queued" rules hold there, back-pressure reaching the socket (reads pause while the PACS's C-STORE
waits for a place in the window). C-FIND stays on pynetdicom and the rules above.

C-MOVE needs DUO's own storage SCP as destination: :class:`MoveRouter` is the piece that SCP's
C-STORE handler calls, and it routes each incoming instance to the move that asked for it (by Move
Originator Message ID, which the router allocates uniquely, falling back to the expected SOP Instance
UIDs for PACSes that leave the originator fields empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import os
import re
import secrets
import ssl
import tempfile
import threading
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal, TypeVar

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    build_role,
)
from pynetdicom.association import Association
from pynetdicom.dsutils import decode, encode
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
)

from duo_gateway.dicom.nodelay import ensure_tcp_nodelay
from duo_gateway.dicom.status import (
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SUCCESS,
    UNABLE_TO_PROCESS,
    is_pending,
    is_warning,
)
from duo_gateway.dicom.syntaxes import PREFERRED, UNCOMPRESSED_LE, syntax_class
from duo_gateway.dicom.teardown import install_fast_teardown
from duo_gateway.dicom.ul.association import (
    AcceptedContext,
    DatasetSink,
    Timeouts,
    UlError,
    UlRejected,
    UlTimeout,
)
from duo_gateway.dicom.ul.association import Association as UlAssociation
from duo_gateway.dicom.ul.association import connect as ul_connect
from duo_gateway.dicom.ul.dimse import C_GET_RSP, C_MOVE_RSP, Command, c_get_rq, c_move_rq
from duo_gateway.dicom.ul.part10 import file_meta
from duo_gateway.dicom.ul.pdu import PresentationContextRQ, RoleSelection
from duo_gateway.failure import Failure, FailureKind

log = structlog.get_logger(__name__)

# pynetdicom starts its own threads (association, reactor, SCP handlers); with this switch they
# inherit the caller's contextvars, so structlog's bound request_id follows a request into them.
# It is process-global and only ever wanted on, so it is set once, here, on import.
_config.PASS_CONTEXTVARS = True

Model = Literal["study", "patient"]

_FIND = {"study": StudyRootQueryRetrieveInformationModelFind,
         "patient": PatientRootQueryRetrieveInformationModelFind}
_GET = {"study": StudyRootQueryRetrieveInformationModelGet,
        "patient": PatientRootQueryRetrieveInformationModelGet}
_MOVE = {"study": StudyRootQueryRetrieveInformationModelMove,
         "patient": PatientRootQueryRetrieveInformationModelMove}


#: Presentation context IDs are odd numbers 1..255: at most 128 contexts in one association.
MAX_CONTEXTS = 128
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: How often blocked thread-side waits look at the cancel flag.
_POLL_S = 0.05
#: Write buffer of a spool file received on the loop: PDVs are often 16 KiB, the disk prefers more.
_SINK_BUFFER = 256 * 1024

T = TypeVar("T")


# -- errors ----------------------------------------------------------------------------------------


class QrError(Failure):
    """A Q/R operation failed; ``label`` is a short, stable label (metrics, logs), finer than ``kind``.

    Unless a subclass says otherwise the PACS was not reachable or not usable just now (no Message
    ID or presentation context left, a send that failed): ``unavailable``, worth another try.
    """

    label: ClassVar[str] = "error"

    def __init__(self, detail: str, *, kind: FailureKind = "unavailable", retryable: bool = True) -> None:
        super().__init__(kind, detail, retryable=retryable)


class AssociationRejected(QrError):
    label = "rejected"


class AssociationFailed(QrError):
    """No association: connection refused or reset, TLS failure, no answer to A-ASSOCIATE."""

    label = "connect"


class QrTimeout(QrError):
    label = "timeout"

    def __init__(self, detail: str) -> None:
        super().__init__(detail, kind="timeout")


class QrAborted(QrError):
    """The peer aborted, or sent something pynetdicom could not handle (it then aborts)."""

    label = "aborted"


class QrStatusError(QrError):
    """The peer answered with a Failure or Cancel status: asking the same again gets the same."""

    label = "status"

    def __init__(self, operation: str, status: int, detail: str = "") -> None:
        super().__init__(f"{operation} failed with status 0x{status:04X}{': ' + detail if detail else ''}",
                         kind="error", retryable=False)
        self.status = status


# -- records ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class SpooledInstance:
    """One instance received and renamed into the spool; the consumer now owns ``path``."""

    path: Path
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int
    #: The file's header (no pixel data), read once on receipt for validation.
    header: Dataset


@dataclass(frozen=True)
class RetrieveSummary:
    """The final C-GET/C-MOVE response counters (PS3.4 C.4.2/C.4.3); missing ones are None."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None


#: Returns None to accept a received instance, or why it is refused (it is then deleted, never queued).
Validator = Callable[[Dataset], str | None]


# -- thread -> loop hand-over ------------------------------------------------------------------------


class _End:
    """Terminal marker of one operation, carrying its summary (or None for C-FIND)."""

    def __init__(self, summary: RetrieveSummary | None = None) -> None:
        self.summary = summary


class _Bridge:
    """A bounded queue fed from threads; a put waits for room (back-pressure) but never forever."""

    def __init__(self, loop: asyncio.AbstractEventLoop, maxsize: int) -> None:
        self.loop = loop
        self.queue: asyncio.Queue[object] = asyncio.Queue(maxsize)
        self.closed = threading.Event()

    def put(self, item: object, timeout_s: float) -> bool:
        """Thread side: True once ``item`` is in the queue; False when closed, timed out or no loop."""
        if self.closed.is_set():
            return False
        try:
            fut = asyncio.run_coroutine_threadsafe(self.queue.put(item), self.loop)
        except RuntimeError:  # loop closed
            return False
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fut.result(timeout=_POLL_S)
                return True
            except TimeoutError:
                if self.closed.is_set() or time.monotonic() > deadline:
                    # cancel() fails when the put completed meanwhile: the item is queued after all
                    return not fut.cancel()
            except Exception:  # cancelled, or the loop went away
                return False

    async def get(self, timeout_s: float) -> object:
        try:
            return await asyncio.wait_for(self.queue.get(), timeout_s)
        except TimeoutError:
            raise QrTimeout(f"no DIMSE progress within {timeout_s:g} s") from None

    def drain(self) -> list[object]:
        items: list[object] = []
        while True:
            try:
                items.append(self.queue.get_nowait())
            except asyncio.QueueEmpty:
                return items


# -- the spool -------------------------------------------------------------------------------------


class Spool:
    """Where one retrieve lands: a directory, a window of unconsumed files, and a validator.

    Created on the event loop (it binds to it) and shared by the C-GETs/C-MOVEs of one retrieve, so
    the window bounds the whole retrieve, not each sub-request. A file counts against the window from
    the moment a C-STORE starts writing it until the consumer asks for the next item, so "at most
    ``window`` files in the spool" holds for anything the spool wrote, consumed or not.

    ``window_bytes`` bounds the same files by size as well: a count alone lets a study of large
    enhanced multi-frame objects fill the disk, and a consumer that keeps each instance until it is
    written onwards (RAD-75 streams each into the HTTP answer) holds the spool to that many bytes.
    A C-STORE whose instance does not fit waits for room like one over the count; an instance larger
    than the whole window is let in alone (when nothing else is spooled), or it could never pass.
    ``high_water_bytes`` is the most the window held at once, for the metric that proves the bound.
    """

    def __init__(self, directory: Path, window: int, *, validate: Validator | None = None,
                 store_wait_s: float = 30.0, fsync: bool = False, window_bytes: int | None = None) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        if window_bytes is not None and window_bytes < 1:
            raise ValueError("window_bytes must be >= 1")
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.window = window
        self.window_bytes = window_bytes
        #: How long a C-STORE may wait for the consumer before it is refused (0xA700). Keep it below
        #: the PACS's own DIMSE timeout, or the PACS aborts first.
        self.store_wait_s = store_wait_s
        #: The spool is transient (a crash loses the retrieve anyway), so fsync before the ACK is off
        #: by default; a renamed-into-place file is complete either way.
        self.fsync = fsync
        self._validate = validate
        self._permits = threading.Semaphore(window)
        self._bridge = _Bridge(asyncio.get_running_loop(), window + 1)
        self._lock = threading.Lock()
        self._outstanding: set[Path] = set()
        self._inflight = 0
        self.refused = 0
        #: Bytes of the files counted against the window now; the most it ever was.
        self.bytes_held = 0
        self.high_water_bytes = 0
        #: Sizes of the items handed over and not yet consumed, oldest first (``_drain`` hands over
        #: and consumes strictly in turn, so the oldest is the one being consumed).
        self._handed_sizes: deque[int] = deque()
        #: Set when the consumer frees a place in the window: wakes a loop-side receive waiting for one.
        self._room_event = asyncio.Event()
        #: The largest instance received on the loop so far: what the next one is expected to need.
        self._largest = 0

    @property
    def closed(self) -> bool:
        return self._bridge.closed.is_set()

    def _admit(self, tmp: Path, sop_class: str, sop_uid: str, context_syntax: str,
               put: Callable[[SpooledInstance], bool]) -> tuple[int, Path | None]:
        """A completely written ``.part-`` file: check it is what was announced, validate, rename into
        place, queue. Returns the C-STORE status and the temporary path if it is still there (the
        caller deletes it)."""
        header = dcmread(tmp, stop_before_pixels=True)
        if str(header.get("SOPInstanceUID", "")) != sop_uid:
            log.warning("qr_store_uid_mismatch", sop_instance_uid=sop_uid)
            self.refused += 1
            return UNABLE_TO_PROCESS, tmp
        reason = self._validate(header) if self._validate is not None else None
        if reason is not None:
            log.warning("qr_store_refused", sop_instance_uid=sop_uid, reason=reason)
            self.refused += 1
            return NOT_AUTHORISED, tmp
        final = self.directory / f"{sop_uid}.{secrets.token_hex(4)}.dcm"
        with self._lock:
            if self.closed:
                return OUT_OF_RESOURCES, tmp
            os.replace(tmp, final)
            self._outstanding.add(final)
        meta = getattr(header, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or context_syntax
        item = SpooledInstance(final, sop_class, sop_uid, ts, final.stat().st_size, header)
        if not put(item):
            with self._lock:
                self._outstanding.discard(final)
            final.unlink(missing_ok=True)
            log.warning("qr_store_not_queued", sop_instance_uid=sop_uid, closed=self.closed)
            return OUT_OF_RESOURCES, None
        return SUCCESS, None

    def _hold(self, size: int) -> None:
        self.bytes_held += size
        self.high_water_bytes = max(self.high_water_bytes, self.bytes_held)

    def _release_bytes(self, size: int) -> None:
        self.bytes_held -= size

    # loop side: the asyncio Upper Layer's receive path (dicom/ul) ------------------------------------

    async def receive(self, sop_class: str, sop_uid: str, transfer_syntax: str,
                      source_ae: str = "") -> SpoolSink | int:
        """Where a C-STORE received on the event loop goes: a sink writing the ``.part-`` file (Part 10
        meta first, then each PDV as it arrives), or the status to refuse it with.

        The same rules as :meth:`store`: the UID must be one (it names the file), a place in the window
        is taken before anything is written, waiting at most ``store_wait_s`` (the PACS waits for our
        C-STORE-RSP meanwhile, and the association stops reading: back-pressure down to the socket).
        """
        with self._lock:
            if self.closed:
                return OUT_OF_RESOURCES
            self._inflight += 1
        handed = False
        try:
            if not _UID_RE.match(sop_uid) or len(sop_uid) > 64:
                log.warning("qr_store_bad_uid")
                return UNABLE_TO_PROCESS
            if not await self._acquire_on_loop():
                log.warning("qr_store_refused_window", sop_instance_uid=sop_uid, closed=self.closed)
                return OUT_OF_RESOURCES
            try:
                fh, tmp = _open_part(self.directory)
            except OSError as exc:
                self._permits.release()
                log.error("qr_store_spool_failed", sop_instance_uid=sop_uid, error=type(exc).__name__)
                return OUT_OF_RESOURCES
            sink = SpoolSink(self, fh, tmp, sop_class, sop_uid, transfer_syntax)
            sink.write(memoryview(file_meta(sop_class, sop_uid, transfer_syntax, source_ae)))
            handed = True
            return sink
        finally:
            if not handed:
                self._left()

    async def _acquire_on_loop(self) -> bool:
        """The window permit, awaited on the loop: woken when the consumer takes an item
        (``_room_event``), with a short timed look as backstop.

        The byte window is judged before the size is known (the dataset streams in after this): a new
        instance is let in when the largest one this spool has seen still fits, or nothing is held.
        Instances of one study are alike in size, so the high-water mark stays within the window
        unless an instance is larger than every one before it.
        """
        deadline = time.monotonic() + self.store_wait_s
        while not self.closed:
            if self._permits.acquire(blocking=False):
                if self.closed:
                    self._permits.release()
                    return False
                if self._bytes_fit(self._largest):
                    return True
                self._permits.release()
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._room_event.clear()
            try:
                await asyncio.wait_for(self._room_event.wait(), min(left, _POLL_S))
            except TimeoutError:
                pass
        return False

    def _bytes_fit(self, size: int) -> bool:
        return self.window_bytes is None or not self.bytes_held or self.bytes_held + size <= self.window_bytes

    def _left(self) -> None:
        with self._lock:
            self._inflight -= 1

    def _put_on_loop(self, item: SpooledInstance) -> bool:
        if self.closed:
            return False
        try:
            self._bridge.queue.put_nowait(item)  # never full: one slot per permit, plus the end marker
        except asyncio.QueueFull:
            return False
        return True

    # loop side ------------------------------------------------------------------------------------

    async def _next(self, timeout_s: float) -> object:
        return await self._bridge.get(timeout_s)

    def _handed_over(self, item: SpooledInstance) -> None:
        with self._lock:
            self._outstanding.discard(item.path)
            self._handed_sizes.append(item.size)

    def _consumed(self) -> None:
        with self._lock:
            size = self._handed_sizes.popleft() if self._handed_sizes else 0
        self._release_bytes(size)
        self._permits.release()
        self._room_event.set()

    async def close(self) -> None:
        """Stop accepting, wait briefly for C-STOREs in flight, delete every file not handed over."""
        with self._lock:
            self._bridge.closed.set()
        deadline = time.monotonic() + self.store_wait_s + 1
        while True:
            with self._lock:
                busy = self._inflight
            if not busy or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.01)
        for item in self._bridge.drain():
            if isinstance(item, SpooledInstance):
                item.path.unlink(missing_ok=True)
        with self._lock:
            leftovers, self._outstanding = self._outstanding, set()
        for path in leftovers:
            path.unlink(missing_ok=True)


def _open_part(directory: Path) -> tuple[BinaryIO, Path]:
    """A new ``.part-`` file, opened on the loop on purpose: a local create is cheaper than a hop."""
    fd, name = tempfile.mkstemp(dir=directory, prefix=".part-", suffix=".dcm")
    return open(fd, "wb", buffering=_SINK_BUFFER), Path(name)


class SpoolSink:
    """One C-STORE dataset being received by the asyncio UL into the spool (a ``DatasetSink``).

    Holds a window permit and counts as in flight from :meth:`Spool.receive` until :meth:`finish` or
    :meth:`discard`; the file is only renamed into place and queued once complete and valid, so the
    C-STORE-RSP (sent after ``finish``) still means "in place and queued".
    """

    def __init__(self, spool: Spool, fh: BinaryIO, tmp: Path, sop_class: str, sop_uid: str,
                 transfer_syntax: str) -> None:
        self._spool = spool
        self._fh = fh
        self._tmp: Path | None = tmp
        self._sop_class = sop_class
        self._sop_uid = sop_uid
        self._ts = transfer_syntax
        self._error: OSError | None = None
        self._done = False
        #: Bytes written so far, counted against the spool's byte window as they land.
        self._written = 0

    def write(self, data: memoryview) -> None:
        if self._error is None:
            try:
                self._fh.write(data)
            except OSError as exc:
                self._error = exc
            else:
                self._written += len(data)
                self._spool._hold(len(data))

    async def finish(self) -> int:
        spool = self._spool
        queued = False
        try:
            try:
                if self._error is None:
                    if spool.fsync:
                        self._fh.flush()
                        # a disk flush takes milliseconds to seconds: never on the loop
                        await asyncio.to_thread(os.fsync, self._fh.fileno())
                self._fh.close()
            except OSError as exc:
                self._error = self._error or exc
            if self._error is not None:
                log.error("qr_store_spool_failed", sop_instance_uid=self._sop_uid,
                          error=type(self._error).__name__)
                return OUT_OF_RESOURCES
            assert self._tmp is not None
            try:
                status, self._tmp = spool._admit(self._tmp, self._sop_class, self._sop_uid, self._ts,
                                                 spool._put_on_loop)
            except OSError as exc:
                log.error("qr_store_spool_failed", sop_instance_uid=self._sop_uid, error=type(exc).__name__)
                return OUT_OF_RESOURCES
            except Exception as exc:
                log.warning("qr_store_undecodable", sop_instance_uid=self._sop_uid, error=type(exc).__name__)
                return UNABLE_TO_PROCESS
            queued = status == SUCCESS
            return status
        finally:
            self._end(queued)

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self._fh.close()
        self._end(False)

    def _end(self, queued: bool) -> None:
        if self._done:
            return
        self._done = True
        spool = self._spool
        spool._largest = max(spool._largest, self._written)
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if not queued:
            spool._release_bytes(self._written)
            spool._permits.release()
        spool._left()


# -- C-MOVE routing --------------------------------------------------------------------------------


@dataclass
class _MoveRegistration:
    spool: Spool
    expected: frozenset[str] | None
    originators: frozenset[str]


class MoveRouter:
    """Routes C-STOREs arriving at DUO's storage SCP to the C-MOVE that caused them.

    The daemon's storage SCP (the asyncio UL acceptor) calls :meth:`ul_store` for each C-STORE-RQ.
    A move registers before sending its C-MOVE-RQ and gets a Message ID
    unique among active moves; PACSes copy it into Move Originator Message ID, so that is the key.
    The Move Originator AE Title is not required to match: pynetdicom-based PACSes put their own AE
    title there. PACSes that send no originator fields are matched by expected SOP Instance UID,
    which only works when exactly one active move expects it.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._moves: dict[int, _MoveRegistration] = {}
        self._next_id = 1

    def register(self, spool: Spool, expected: Iterable[str] | None = None,
                 originators: Iterable[str] = ()) -> int:
        with self._lock:
            for _ in range(65535):
                msg_id = self._next_id
                self._next_id = self._next_id % 65535 + 1
                if msg_id not in self._moves:
                    self._moves[msg_id] = _MoveRegistration(
                        spool, frozenset(expected) if expected is not None else None,
                        frozenset(a.strip() for a in originators))
                    return msg_id
        raise QrError("65535 C-MOVEs in flight: no Message ID left")

    def unregister(self, msg_id: int) -> None:
        with self._lock:
            self._moves.pop(msg_id, None)

    @property
    def active(self) -> int:
        with self._lock:
            return len(self._moves)

    def route(self, move_originator_message_id: int | None, sop_uid: str) -> Spool | None:
        """The spool of the active move an incoming instance belongs to; None when it is not ours."""
        with self._lock:
            reg = self._moves.get(move_originator_message_id) if move_originator_message_id else None
            if reg is not None and reg.expected is not None and sop_uid not in reg.expected:
                reg = None
            if reg is None:
                candidates = [r for r in self._moves.values()
                              if r.expected is not None and sop_uid in r.expected]
                reg = candidates[0] if len(candidates) == 1 else None
        return reg.spool if reg is not None else None

    async def ul_store(self, assoc: UlAssociation, context: AcceptedContext,
                       command: Command) -> DatasetSink | int:
        """The asyncio acceptor's store handler (:class:`~duo_gateway.dicom.ul.association.UlServer`):
        the same routing, then :meth:`Spool.receive`; anything not ours is refused (0x0124)."""
        sop_uid = command.affected_sop_instance_uid or ""
        spool = self.route(command.move_originator_message_id, sop_uid)
        if spool is None:
            log.warning("qr_move_unsolicited_store", calling_ae=assoc.calling_ae)
            return NOT_AUTHORISED
        return await spool.receive(command.affected_sop_class_uid or "", sop_uid, context.transfer_syntax,
                                   assoc.calling_ae)


# -- presentation contexts ---------------------------------------------------------------------------


def storage_contexts(sop_classes: Iterable[str], budget: int = MAX_CONTEXTS - 1,
                     syntaxes: Sequence[str] = PREFERRED) -> list[PresentationContext]:
    """Storage contexts for receiving ``sop_classes`` (C-GET SCP role) in ``syntaxes``, within ``budget``.

    ``syntaxes`` is what the caller can use, best first (a RAD-75 request's list, or every syntax DUO
    carries); a listed uncompressed little-endian syntax brings the other one along, since DUO converts
    between them itself. One context per (class, syntax), proposed in that order, while the budget allows
    it for every class: offered several syntaxes in one context, the acceptor picks its own favourite and
    re-encodes, so a file the PACS could send as stored would be decompressed (or fail, at a PACS without
    the decoder). Past that budget the lossy syntaxes go first (a PACS never needs one to send what it
    stores losslessly); past that, one context per class offering the remaining syntaxes in order: still
    every class, but the PACS chooses the encoding, among acceptable ones.
    """
    classes = list(dict.fromkeys(str(c) for c in sop_classes))
    if not classes:
        raise ValueError("no SOP classes to retrieve")
    if len(classes) > budget:
        raise QrError(f"{len(classes)} SOP classes exceed the {budget} presentation contexts left")
    wanted = list(dict.fromkeys(str(ts) for ts in syntaxes))
    if any(ts in UNCOMPRESSED_LE for ts in wanted):
        wanted.extend(ts for ts in UNCOMPRESSED_LE if ts not in wanted)
    if not wanted:
        raise ValueError("no transfer syntaxes to receive in")
    kept = [ts for ts in wanted if syntax_class(ts) != "lossy"] or wanted
    for tier in (wanted, kept):
        if len(classes) * len(tier) <= budget:
            return [build_context(sop, ts) for sop in classes for ts in tier]
    return [build_context(sop, kept) for sop in classes]


def receiving_syntaxes() -> dict[str, list[str]]:
    """:func:`receiving_contexts` for the asyncio acceptor: SOP class -> its syntaxes, ours first."""
    return {str(cx.abstract_syntax): [str(ts) for ts in cx.transfer_syntax] for cx in receiving_contexts()}


def receiving_contexts() -> list[PresentationContext]:
    """Supported contexts for DUO's storage SCP (C-MOVE destination) that keep files as stored.

    A pynetdicom acceptor picks the first of *its own* syntaxes that the sender offers, and the
    stock list starts with Implicit VR: an Explicit VR file would be re-encoded on the way in.
    Listing Explicit VR first (then everything else) keeps what PACSes usually store untouched.
    """
    preferred = [ExplicitVRLittleEndian,
                 *(ts for ts in ALL_TRANSFER_SYNTAXES if ts != ExplicitVRLittleEndian)]
    contexts = []
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        contexts.append(build_context(cx.abstract_syntax, preferred))
    return contexts


# -- the client ------------------------------------------------------------------------------------


class QrClient:
    """Q/R SCU towards one PACS; at most ``max_associations`` open to it at a time.

    Create it on the event loop that uses it (the concurrency limit is an asyncio primitive).
    """

    def __init__(self, calling_ae: str, host: str, port: int, called_ae: str, *, timeout_s: float = 10.0,
                 tls: ssl.SSLContext | None = None, max_associations: int = 4,
                 store_wait_s: float | None = None, move_idle_s: float | None = None) -> None:
        self.calling_ae = calling_ae
        self.host = host
        self.port = port
        self.called_ae = called_ae
        self.timeout_s = timeout_s
        self.tls = tls
        #: How long a received instance may wait for the consumer (see :attr:`Spool.store_wait_s`).
        self.store_wait_s = store_wait_s if store_wait_s is not None else timeout_s
        #: Longest silence on a C-MOVE association: C-MOVE-RSPs pause while our SCP waits for the
        #: consumer, so this must exceed the store wait.
        self.move_idle_s = move_idle_s if move_idle_s is not None else timeout_s + self.store_wait_s
        self._slots = asyncio.Semaphore(max_associations)

    def spool(self, directory: Path, window: int, validate: Validator | None = None, *,
              window_bytes: int | None = None) -> Spool:
        return Spool(directory, window, validate=validate, store_wait_s=self.store_wait_s,
                     window_bytes=window_bytes)

    @asynccontextmanager
    async def associate(self, *, find: bool = True, get_sop_classes: Sequence[str] = (),
                        move: bool = False, model: Model = "study",
                        dimse_timeout_s: float | None = None,
                        transfer_syntaxes: Sequence[str] = PREFERRED) -> AsyncIterator[QrAssociation]:
        """An association for several operations in a row (e.g. SERIES then IMAGE C-FINDs).

        ``get_sop_classes`` adds the C-GET model and storage contexts with SCP role selection, in
        ``transfer_syntaxes`` (see :func:`storage_contexts`).
        Leaving the block releases it; an exception or cancellation inside aborts it instead.
        """
        contexts: list[PresentationContext] = []
        if find:
            contexts.append(build_context(_FIND[model]))
        if move:
            contexts.append(build_context(_MOVE[model]))
        ext_neg = []
        if get_sop_classes:
            contexts.append(build_context(_GET[model]))
            contexts.extend(storage_contexts(get_sop_classes, MAX_CONTEXTS - len(contexts),
                                             transfer_syntaxes))
            ext_neg = [build_role(sop, scp_role=True) for sop in dict.fromkeys(get_sop_classes)]
        dimse = dimse_timeout_s if dimse_timeout_s is not None else self.timeout_s
        async with self._slots:
            if get_sop_classes or move:
                if find or (get_sop_classes and move):
                    raise ValueError("a retrieve association carries C-GET or C-MOVE only")
                models = _GET.values() if get_sop_classes else _MOVE.values()
                qa: QrAssociation = await UlRetrieveAssociation.open(self, contexts, ext_neg, dimse, models)
            else:
                qa = await QrAssociation._open(self, contexts, dimse)
            try:
                yield qa
            except QrStatusError:
                await qa._release()  # the PACS said no; the association itself is fine
                raise
            except BaseException:
                await qa._abort()
                raise
            else:
                await qa._release()

    # one-shot conveniences ---------------------------------------------------------------------

    async def find(self, query: Dataset, model: Model = "study") -> AsyncGenerator[Dataset, None]:
        """Stream the matches of one C-FIND, on an association of its own."""
        async with self.associate(model=model) as qa, aclosing(qa.find(query, model)) as stream:
            async for identifier in stream:
                yield identifier

    async def find_all(self, query: Dataset, model: Model = "study") -> list[Dataset]:
        return [identifier async for identifier in self.find(query, model)]

    async def get(self, query: Dataset, spool: Spool, sop_classes: Sequence[str],
                  model: Model = "study",
                  transfer_syntaxes: Sequence[str] = PREFERRED) -> AsyncGenerator[SpooledInstance, None]:
        """C-GET on an association of its own; instances stream as they land in ``spool``.

        Like every streaming method here this is an async generator: consume it inside
        ``contextlib.aclosing`` so that leaving the loop early (an exception, a cancellation while
        the loop body awaits) aborts the association and empties the spool at once rather than
        whenever the generator is garbage-collected. Cancellation while awaiting the next item
        cleans up at once either way.
        """
        try:
            async with (self.associate(find=False, get_sop_classes=sop_classes, model=model,
                                       transfer_syntaxes=transfer_syntaxes) as qa,
                        aclosing(qa.get(query, spool, model)) as stream):
                async for item in stream:
                    yield item
        finally:
            await spool.close()

    async def move(self, query: Dataset, destination_ae: str, router: MoveRouter, spool: Spool,
                   expected: Iterable[str] | None = None,
                   model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """C-MOVE to DUO's own storage SCP (``destination_ae``, which must route through ``router``)."""
        try:
            async with (self.associate(find=False, move=True, model=model,
                                       dimse_timeout_s=self.move_idle_s) as qa,
                        aclosing(qa.move(query, destination_ae, router, spool, expected, model)) as stream):
                async for item in stream:
                    yield item
        finally:
            await spool.close()


def _run_in(executor: ThreadPoolExecutor, fn: Callable[[], T]) -> Future[T]:
    """Submit with the caller's contextvars (run_in_executor would drop them)."""
    ctx = contextvars.copy_context()
    return executor.submit(ctx.run, fn)


class QrAssociation:
    """One established association; operations run one at a time, each pumped on its executor."""

    def __init__(self, client: QrClient, assoc: Association, executor: ThreadPoolExecutor) -> None:
        self._client = client
        self._assoc = assoc
        self._executor = executor
        self._busy = False
        self._broken = False

    @classmethod
    async def _open(cls, client: QrClient, contexts: list[PresentationContext],
                    dimse_timeout_s: float) -> QrAssociation:
        ensure_tcp_nodelay()
        install_fast_teardown()
        ae = AE(ae_title=client.calling_ae)
        ae.acse_timeout = client.timeout_s
        ae.network_timeout = client.timeout_s
        ae.connection_timeout = client.timeout_s
        ae.dimse_timeout = dimse_timeout_s
        executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"qr-{client.called_ae.strip()}")
        tls_args = (client.tls, client.host) if client.tls is not None else None
        fut = _run_in(executor, partial(ae.associate, client.host, client.port, contexts=contexts,
                                        ae_title=client.called_ae, tls_args=tls_args))
        try:
            assoc = await asyncio.wait_for(asyncio.wrap_future(fut), client.timeout_s * 3 + 1)
        except BaseException:
            # Cancelled (or stuck) while associating: whatever comes of it must not stay open.
            executor.submit(_abort_when_done, fut)
            executor.shutdown(wait=False)
            raise
        if not assoc.is_established:
            executor.shutdown(wait=False)
            if assoc.is_rejected:
                raise AssociationRejected(f"association rejected by {client.called_ae}")
            # pynetdicom reports a refused connection as "aborted" too: either way nothing was said
            raise AssociationFailed(f"no association with {client.called_ae} at {client.host}:{client.port}")
        return cls(client, assoc, executor)

    async def _release(self) -> None:
        if self._broken:
            await self._abort()
            return
        try:
            await asyncio.wait_for(asyncio.wrap_future(_run_in(self._executor, self._assoc.release)),
                                   self._client.timeout_s + 1)
        except TimeoutError:
            await self._abort()
        finally:
            self._executor.shutdown(wait=False)

    async def _abort(self) -> None:
        """Abort from a thread of its own: the executor's thread may be blocked in the pump."""
        self._broken = True
        try:
            await asyncio.wait_for(asyncio.to_thread(self._assoc.abort), self._client.timeout_s + 1)
        except Exception as exc:  # nothing more we can do; the socket dies with the thread
            log.warning("qr_abort_failed", error=type(exc).__name__)
        finally:
            _wake_pump(self._assoc)
            self._executor.shutdown(wait=False)

    def _idle_s(self) -> float:
        dimse = self._assoc.dimse_timeout
        return (float(dimse) if dimse is not None else self._client.timeout_s) + 5

    # C-FIND -------------------------------------------------------------------------------------

    async def find(self, query: Dataset, model: Model = "study") -> AsyncGenerator[Dataset, None]:
        """Matches as the PACS sends them; raises a :class:`QrError` on failure."""
        self._start()
        bridge = _Bridge(asyncio.get_running_loop(), 64)
        pump = _run_in(self._executor, partial(self._pump_find, query, _FIND[model], bridge))
        finished = False
        try:
            while True:
                item = await bridge.get(self._idle_s())
                if isinstance(item, _End):
                    finished = True
                    return
                if isinstance(item, QrError):
                    finished = True
                    self._broken = self._broken or not self._assoc.is_established
                    raise item
                assert isinstance(item, Dataset)
                yield item
        finally:
            self._busy = False
            if not finished:
                bridge.closed.set()
                await self._abort()
            await _join(pump, self._idle_s() if finished else 1.0)

    def _pump_find(self, query: Dataset, model: UID, bridge: _Bridge) -> None:
        wait = self._idle_s()
        try:
            started = time.monotonic()
            for status, identifier in self._assoc.send_c_find(query, model):
                if bridge.closed.is_set():
                    return
                code = status.get("Status")
                if code is None:
                    bridge.put(self._no_response("C-FIND", started), wait)
                    return
                if is_pending(code):
                    started = time.monotonic()
                    if identifier is not None and not bridge.put(identifier, wait):
                        return
                elif code == SUCCESS:
                    bridge.put(_End(), wait)
                    return
                else:
                    bridge.put(QrStatusError("C-FIND", int(code), _error_comment(status)), wait)
                    return
            bridge.put(QrAborted("C-FIND ended without a final status"), wait)
        except Exception as exc:
            bridge.put(_as_qr_error("C-FIND", exc), wait)

    # C-GET --------------------------------------------------------------------------------------

    async def get(self, query: Dataset, spool: Spool,
                  model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """C-GET runs on :class:`UlRetrieveAssociation` (``associate(get_sop_classes=...)``), not here."""
        raise QrError("C-GET needs an association opened with get_sop_classes")
        yield  # pragma: no cover - makes this an async generator like its override

    # C-MOVE -------------------------------------------------------------------------------------

    async def move(self, query: Dataset, destination_ae: str, router: MoveRouter, spool: Spool,
                   expected: Iterable[str] | None = None,
                   model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """C-MOVE runs on :class:`UlRetrieveAssociation` (``associate(move=True)``), not here."""
        raise QrError("C-MOVE needs an association opened with move=True")
        yield  # pragma: no cover - makes this an async generator like its override

    async def _drain(self, spool: Spool) -> AsyncGenerator[SpooledInstance, None]:
        finished = False
        try:
            while True:
                item = await spool._next(self._idle_s() + spool.store_wait_s)
                if isinstance(item, SpooledInstance):
                    spool._handed_over(item)
                    try:
                        yield item
                    finally:
                        spool._consumed()
                    continue
                finished = True
                if isinstance(item, QrError):
                    self._broken = self._broken or not self._established()
                    raise item
                assert isinstance(item, _End)
                return
        finally:
            self._busy = False
            if not finished:
                # Cancelled, broken off or timed out: refuse further C-STOREs and let the ones in
                # flight answer first (a C-STORE-RSP after the abort upsets pynetdicom's state
                # machine), then stop the PACS mid-stream.
                await spool.close()
                await self._abort()

    # shared -------------------------------------------------------------------------------------

    def _start(self) -> None:
        if self._busy:
            raise RuntimeError("one operation at a time per association")
        if self._broken or not self._established():
            raise QrAborted("association no longer established")
        self._busy = True

    def _established(self) -> bool:
        return bool(self._assoc.is_established)

    def _no_response(self, operation: str, since: float) -> QrError:
        """pynetdicom yields an empty status both on DIMSE timeout and on abort: tell them apart."""
        self._broken = True
        dimse = self._assoc.dimse_timeout
        if dimse is not None and time.monotonic() - since >= float(dimse) * 0.9:
            return QrTimeout(f"no {operation} response within {float(dimse):g} s")
        return QrAborted(f"association aborted during {operation}")


class UlRetrieveAssociation(QrAssociation):
    """A C-GET or C-MOVE association on DUO's asyncio Upper Layer (:mod:`duo_gateway.dicom.ul`).

    Why: these are the bulk paths. A C-GET's instances arrive as C-STORE sub-operations on this very
    association; here each one streams PDV by PDV into the spool (:meth:`Spool.receive`) on the event
    loop, where pynetdicom would take every PDU through its polling DUL thread and a thread hand-off.
    A C-MOVE's instances arrive at DUO's storage SCP (same receive path); this association only
    carries the request and its pending responses, but on pynetdicom it kept two polling threads
    busy for the whole retrieve. The rules stay those of the module: the window bounds the spool and,
    through the sub-operation's unanswered C-STORE and paused socket reads, the PACS; every wait has
    a timeout; a consumer that stops iterating aborts the association. C-FIND stays on pynetdicom.
    """

    def __init__(self, client: QrClient, ul: UlAssociation, model_context: int,
                 dimse_timeout_s: float) -> None:
        self._client = client
        self._ul = ul
        self._model_context = model_context
        self._dimse_s = dimse_timeout_s
        self._spool: Spool | None = None
        self._busy = False
        self._broken = False
        ul.store_handler = self._on_store

    @classmethod
    async def open(cls, client: QrClient, contexts: list[PresentationContext], ext_neg: list[Any],
                   dimse_timeout_s: float, models: Iterable[UID]) -> UlRetrieveAssociation:
        proposed = [PresentationContextRQ(2 * i + 1, str(cx.abstract_syntax),
                                          tuple(str(ts) for ts in cx.transfer_syntax))
                    for i, cx in enumerate(contexts)]
        roles = [RoleSelection(str(role.sop_class_uid), False, True) for role in ext_neg]
        timeouts = Timeouts(connect_s=client.timeout_s, acse_s=client.timeout_s, dimse_s=dimse_timeout_s,
                            network_s=client.timeout_s)
        try:
            ul = await ul_connect(client.host, client.port, calling_ae=client.calling_ae,
                                  called_ae=client.called_ae, contexts=proposed, roles=roles,
                                  ssl_context=client.tls, timeouts=timeouts)
        except UlRejected:
            raise AssociationRejected(f"association rejected by {client.called_ae}") from None
        except UlError as exc:
            raise AssociationFailed(f"no association with {client.called_ae} at {client.host}:{client.port}: "
                                    f"{exc}") from None
        wanted = {str(m) for m in models}
        model_context = next((cx.context_id for cx in ul.accepted.values() if cx.abstract_syntax in wanted),
                             None)
        if model_context is None:
            await ul.release()
            raise QrError(f"{client.called_ae} accepted no C-GET/C-MOVE presentation context")
        return cls(client, ul, model_context, dimse_timeout_s)

    def _established(self) -> bool:
        return not self._ul.closed

    def _idle_s(self) -> float:
        return self._dimse_s + 5

    async def _release(self) -> None:
        if self._broken:
            await self._abort()
            return
        await self._ul.release()

    async def _abort(self) -> None:
        self._broken = True
        self._ul.abort()

    async def _on_store(self, assoc: UlAssociation, context: AcceptedContext,
                        command: Command) -> DatasetSink | int:
        spool = self._spool
        if spool is None:
            return NOT_AUTHORISED  # a C-STORE outside any C-GET of ours
        return await spool.receive(command.affected_sop_class_uid or "",
                                   command.affected_sop_instance_uid or "", context.transfer_syntax,
                                   self._client.called_ae)

    async def find(self, query: Dataset, model: Model = "study") -> AsyncGenerator[Dataset, None]:
        raise QrError("C-FIND on a retrieve association")
        yield  # pragma: no cover - makes this an async generator like the method it overrides

    async def get(self, query: Dataset, spool: Spool,
                  model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """One C-GET; instances land in ``spool`` (the caller closes it). Raises :class:`QrStatusError`
        on a Failure/Cancel final status, after yielding what did arrive."""
        self._start()
        self._spool = spool
        request = c_get_rq(self._ul.next_message_id(), str(_GET[model]))
        try:
            async with aclosing(self._retrieve("C-GET", query, spool, request, C_GET_RSP)) as stream:
                async for item in stream:
                    yield item
        finally:
            self._spool = None

    async def move(self, query: Dataset, destination_ae: str, router: MoveRouter, spool: Spool,
                   expected: Iterable[str] | None = None,
                   model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """One C-MOVE to ``destination_ae``; DUO's SCP hands the instances over through ``router``,
        which allocated the Message ID the PACS echoes as Move Originator Message ID."""
        self._start()
        msg_id = router.register(spool, expected, originators=(self._client.calling_ae,
                                                               self._client.called_ae))
        request = c_move_rq(msg_id, str(_MOVE[model]), destination_ae)
        try:
            async with aclosing(self._retrieve("C-MOVE", query, spool, request, C_MOVE_RSP)) as stream:
                async for item in stream:
                    yield item
        finally:
            router.unregister(msg_id)

    async def _retrieve(self, operation: str, query: Dataset, spool: Spool, request: Command,
                        response_field: int) -> AsyncGenerator[SpooledInstance, None]:
        pump = asyncio.create_task(self._pump(operation, query, spool, request, response_field))
        try:
            async with aclosing(self._drain(spool)) as stream:
                async for item in stream:
                    yield item
        finally:
            if not pump.done():
                self._ul.abort()
                pump.cancel()
            with contextlib.suppress(BaseException):
                await pump

    async def _pump(self, operation: str, query: Dataset, spool: Spool, request: Command,
                    response_field: int) -> None:
        """Send the request, then receive until its final response (a C-GET's C-STOREs in between go
        to the spool inside ``receive``); the outcome goes to the spool's queue as the terminal item."""
        outcome: object
        try:
            cx = self._ul.accepted[self._model_context]
            identifier = encode(query, cx.transfer_syntax == str(ImplicitVRLittleEndian), True)
            if identifier is None:
                raise QrError(f"{operation} identifier could not be encoded")
            msg_id = request.message_id
            await self._ul.send_command(cx.context_id, request, identifier)
            while True:
                msg = await self._ul.receive(self._dimse_s)
                if msg is None:
                    outcome = QrAborted(f"the PACS released the association during {operation}")
                    break
                rsp = msg.command
                if rsp.command_field != response_field or rsp.message_id_responded_to != msg_id:
                    self._ul.abort()
                    outcome = QrAborted(f"unexpected DIMSE message 0x{rsp.command_field:04X} "
                                        f"during {operation}")
                    break
                code = rsp.status if rsp.status is not None else UNABLE_TO_PROCESS
                if is_pending(code):
                    continue
                summary = RetrieveSummary(code, rsp.completed, rsp.failed, rsp.warning)
                if code == SUCCESS or is_warning(code):
                    if code != SUCCESS:
                        log.warning("qr_retrieve_warning", operation=operation, status=f"0x{code:04X}",
                                    failed=summary.failed, completed=summary.completed)
                    outcome = _End(summary)
                else:
                    outcome = QrStatusError(operation, code, _failed_uids(_identifier(msg.dataset, cx)))
                break
        except UlTimeout:
            self._broken = True
            outcome = QrTimeout(f"no {operation} response within {self._dimse_s:g} s")
        except UlError as exc:
            self._broken = True
            outcome = QrAborted(f"association aborted during {operation}: {exc}")
        except QrError as exc:
            outcome = exc
        if not spool.closed:
            with contextlib.suppress(asyncio.QueueFull):
                spool._bridge.queue.put_nowait(outcome)


def _identifier(data: bytes | None, cx: AcceptedContext) -> Dataset | None:
    """A response's identifier (e.g. the Failed SOP Instance UID List); None when absent or unreadable."""
    if not data:
        return None
    try:
        return decode(BytesIO(data), cx.transfer_syntax == str(ImplicitVRLittleEndian), True)
    except Exception:
        return None


def _wake_pump(assoc: Association) -> None:
    """Unblock a pump waiting in ``dimse.get_msg`` after an abort, which pynetdicom does not do: the
    pump would otherwise sit until the DIMSE timeout. ``(None, None)`` is exactly what get_msg returns
    on timeout or abort, so the pump ends through its ordinary no-response path. Private pynetdicom
    API (3.0.x, pinned like nodelay.py); without ``msg_queue`` the pump just waits for the timeout."""
    queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
    if queue is not None:
        queue.put((None, None))


def _abort_when_done(fut: Future[Association]) -> None:
    try:
        assoc = fut.result()
    except Exception:
        return
    if assoc.is_established:
        assoc.abort()


async def _join(fut: Future[None], timeout_s: float) -> None:
    """Wait for a pump to finish (it does once the association ends), but never forever."""
    try:
        await asyncio.wait_for(asyncio.shield(asyncio.wrap_future(fut)), timeout_s)
    except TimeoutError:
        log.warning("qr_pump_still_running")
    except Exception as exc:
        log.warning("qr_pump_failed", error=type(exc).__name__)


def _as_qr_error(operation: str, exc: Exception) -> QrError:
    if isinstance(exc, QrError):
        return exc
    if isinstance(exc, ValueError | RuntimeError):  # no accepted context, unencodable identifier
        return QrError(f"{operation} could not be sent: {exc}")
    return QrError(f"{operation} failed: {type(exc).__name__}")


def _error_comment(status: Dataset) -> str:
    return str(status.get("ErrorComment", "") or "")


def _failed_uids(identifier: Dataset | None) -> str:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ""
    value = identifier.FailedSOPInstanceUIDList
    count = 1 if isinstance(value, str) else len(value)
    return f"{count} failed SOP instance(s)"
