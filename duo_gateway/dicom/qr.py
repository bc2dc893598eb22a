"""Asyncio DICOM Query/Retrieve SCU: C-FIND, C-GET and C-MOVE on DUO's asyncio Upper Layer
(:mod:`duo_gateway.dicom.ul`), and the spool retrieved instances land in.

Everything runs on the event loop; the rules this module keeps:

- **One operation at a time per association.** Parallelism comes from more associations, limited
  per PACS by a semaphore (``max_associations``).
- **Bounded hand-over with back-pressure.** A received instance (C-GET sub-operation, or a C-MOVE's
  C-STORE at DUO's storage SCP) streams PDV by PDV into its spool file (:meth:`Spool.receive`), is
  renamed into place and queued, and only then answered 0x0000. A place in the window (``window``
  files, and with ``window_bytes`` about that many bytes) is taken before anything is written; while
  the consumer lags, the C-STORE waits and the association stops reading: back-pressure reaches the
  PACS through the socket, and memory and disk stay flat. C-FIND identifiers are yielded one by one
  as they are decoded; an unread association pauses its socket the same way.
- **Timeouts everywhere, abort on cancel.** Every wait has a timeout (connect, ARTIM, DIMSE), and a
  consumer that stops iterating (cancel, break, error) aborts the association and leaves no files it
  did not receive behind.

Failures surface as :class:`QrError` subclasses, each with a ``label`` short enough for a metric label.

C-MOVE needs DUO's own storage SCP as destination: :class:`MoveRouter` is the piece that SCP's
C-STORE handler calls, and it routes each incoming instance to the move that asked for it (by Move
Originator Message ID, which the router allocates uniquely, falling back to the expected SOP Instance
UIDs for PACSes that leave the originator fields empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import secrets
import ssl
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Sequence
from contextlib import aclosing, asynccontextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import read_dataset
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import (
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    build_context,
    build_role,
)
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

from duo_gateway.dicom.header import IDENTIFYING_TAGS, cut_elements, is_implicit, walkable
from duo_gateway.dicom.status import (
    NOT_AUTHORISED,
    OUT_OF_RESOURCES,
    SUCCESS,
    UNABLE_TO_PROCESS,
    is_pending,
    is_warning,
)
from duo_gateway.dicom.syntaxes import PREFERRED, UNCOMPRESSED_LE, syntax_class
from duo_gateway.dicom.ul.association import (
    AcceptedContext,
    DatasetSink,
    Message,
    Timeouts,
    UlError,
    UlRejected,
    UlTimeout,
)
from duo_gateway.dicom.ul.association import Association as UlAssociation
from duo_gateway.dicom.ul.association import connect as ul_connect
from duo_gateway.dicom.ul.dimse import (
    C_FIND_RSP,
    C_GET_RSP,
    C_MOVE_RSP,
    Command,
    c_find_rq,
    c_get_rq,
    c_move_rq,
)
from duo_gateway.dicom.ul.part10 import file_meta
from duo_gateway.dicom.ul.pdu import PresentationContextRQ, RoleSelection
from duo_gateway.failure import Failure, FailureKind

log = structlog.get_logger(__name__)

Model = Literal["study", "patient"]

_FIND = {"study": StudyRootQueryRetrieveInformationModelFind,
         "patient": PatientRootQueryRetrieveInformationModelFind}
_GET = {"study": StudyRootQueryRetrieveInformationModelGet,
        "patient": PatientRootQueryRetrieveInformationModelGet}
_MOVE = {"study": StudyRootQueryRetrieveInformationModelMove,
         "patient": PatientRootQueryRetrieveInformationModelMove}
_QR_MODELS = frozenset(str(uid) for models in (_FIND, _GET, _MOVE) for uid in models.values())


#: Presentation context IDs are odd numbers 1..255: at most 128 contexts in one association.
MAX_CONTEXTS = 128
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")
#: Backstop of a receive waiting for room in the window (the consumer's wake-up is the real signal).
_POLL_S = 0.05
#: Write buffer of a spool file received on the loop: PDVs are often 16 KiB, the disk prefers more.
_SINK_BUFFER = 256 * 1024


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
    """One instance received: renamed into the spool (``path``, which the consumer now owns), or held
    in memory (``data``, the Part 10 bytes; ``path`` None) by a spool with a :class:`MemoryBudget`."""

    path: Path | None
    sop_class_uid: str
    sop_instance_uid: str
    transfer_syntax_uid: str
    size: int
    #: The file's identifying elements (``header.IDENTIFYING_KEYWORDS``), read once on receipt for
    #: validation: a validator sees these and nothing else.
    header: Dataset
    data: bytes | None = None
    #: Bytes of the memory budget this instance holds until it is consumed.
    reserved: int = 0


@dataclass(frozen=True)
class RetrieveSummary:
    """The final C-GET/C-MOVE response counters (PS3.4 C.4.2/C.4.3); missing ones are None."""

    status: int
    completed: int | None
    failed: int | None
    warning: int | None


#: Returns None to accept a received instance, or why it is refused (it is then deleted, never queued).
Validator = Callable[[Dataset], str | None]


# -- the hand-over ---------------------------------------------------------------------------------


class _End:
    """Terminal marker of one operation, carrying its summary (or None for C-FIND)."""

    def __init__(self, summary: RetrieveSummary | None = None) -> None:
        self.summary = summary


# -- the spool -------------------------------------------------------------------------------------


class MemoryBudget:
    """Bytes of received instances all spools of the process may hold in memory at once.

    Why: a consumer that writes each instance onwards at once (RAD-75 into its HTTP answer) gains
    nothing from a file per instance but its cost (create, write, rename, reopen, read, unlink: a
    third of DUO's CPU per instance). Memory is bounded twice: each spool's byte window bounds what it
    holds, and this bounds the sum over concurrent retrieves; an instance that does not fit is
    written to a file as before (it spills mid-write if it outgrows its reservation). Loop-only.
    """

    def __init__(self, limit: int) -> None:
        if limit < 0:
            raise ValueError("limit must be >= 0")
        self.limit = limit
        self.used = 0

    def take(self, size: int) -> bool:
        if self.used + size > self.limit:
            return False
        self.used += size
        return True

    def give(self, size: int) -> None:
        self.used -= size


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
                 store_wait_s: float = 30.0, fsync: bool = False, window_bytes: int | None = None,
                 memory: MemoryBudget | None = None) -> None:
        # Everything here runs on the event loop (the receive path is dicom/ul's), so the window is
        # plain counters: no locks, no thread-safe semaphore.
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
        #: Where instances are held in memory instead of files, while it has room (None: never).
        self.memory = memory
        #: Places left in the window (files counted from the first byte written to consumption).
        self._free = window
        #: Items for the consumer: one per place in the window, plus the terminal item.
        self._queue: asyncio.Queue[object] = asyncio.Queue(window + 1)
        self._closed = False
        self._outstanding: set[Path] = set()
        #: C-STOREs between :meth:`receive` and their sink's end; ``_idle`` is set while there are none.
        self._inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self.refused = 0
        #: Bytes of the files counted against the window now; the most it ever was.
        self.bytes_held = 0
        self.high_water_bytes = 0
        #: Sizes (and memory reservations) of the items handed over and not yet consumed, oldest
        #: first (``_drain`` hands over and consumes strictly in turn, so the oldest is being consumed).
        self._handed_sizes: deque[tuple[int, int]] = deque()
        #: Set when the consumer frees a place in the window: wakes a loop-side receive waiting for one.
        self._room_event = asyncio.Event()
        #: The largest instance received on the loop so far: what the next one is expected to need.
        self._largest = 0
        #: File names: this spool's own token and a serial (mkstemp's random names cost as much as the
        #: create itself); O_EXCL still refuses a clash, with another spool in the same directory say.
        self._token = secrets.token_hex(4)
        self._serial = itertools.count()

    @property
    def closed(self) -> bool:
        return self._closed

    def _admit(self, tmp: Path | None, sop_class: str, sop_uid: str, context_syntax: str,
               head: bytes | bytearray | None = None, *, meta_length: int = 0,
               whole: bool = False, size: int | None = None, data: bytes | None = None,
               reserved: int = 0) -> tuple[int, Path | None]:
        """A completely received instance: check it is what was announced, validate, rename into
        place (a ``.part-`` file, ``tmp``) or keep (``data``, holding ``reserved`` of the memory
        budget, which passes to the queued item), queue. Returns the C-STORE status and the temporary
        path if it is still there (the caller deletes it). ``head`` is the file's first bytes as
        written (``whole``: all of it), of which ``meta_length`` are its Part 10 meta; ``size``, the
        file's, when the writer counted it."""
        header = _header_from(head, meta_length, context_syntax, whole) if head is not None else None
        if header is None:
            source: Path | BytesIO = tmp if tmp is not None else BytesIO(data or b"")
            header = dcmread(source, stop_before_pixels=True, specific_tags=list(IDENTIFYING_TAGS))
        if str(header.get("SOPInstanceUID", "")) != sop_uid:
            log.warning("qr_store_uid_mismatch", sop_instance_uid=sop_uid)
            self.refused += 1
            return UNABLE_TO_PROCESS, tmp
        reason = self._validate(header) if self._validate is not None else None
        if reason is not None:
            log.warning("qr_store_refused", sop_instance_uid=sop_uid, reason=reason)
            self.refused += 1
            return NOT_AUTHORISED, tmp
        if self.closed:
            return OUT_OF_RESOURCES, tmp
        if tmp is None:
            assert data is not None and size is not None
            item = SpooledInstance(None, sop_class, sop_uid, context_syntax, size, header, data, reserved)
            if not self._put(item):
                log.warning("qr_store_not_queued", sop_instance_uid=sop_uid, closed=self.closed)
                return OUT_OF_RESOURCES, None
            return SUCCESS, None
        final = self.directory / f"{sop_uid}.{self._token}{next(self._serial)}.dcm"
        os.replace(tmp, final)
        self._outstanding.add(final)
        meta = getattr(header, "file_meta", None)
        ts = str(meta.get("TransferSyntaxUID", "") if meta is not None else "") or context_syntax
        item = SpooledInstance(final, sop_class, sop_uid, ts, final.stat().st_size if size is None else size,
                               header)
        if not self._put(item):
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

    # the receive path (dicom/ul) ------------------------------------------------------------------

    async def receive(self, sop_class: str, sop_uid: str, transfer_syntax: str,
                      source_ae: str = "") -> SpoolSink | int:
        """Where a C-STORE received on the event loop goes: a sink writing the ``.part-`` file (Part 10
        meta first, then each PDV as it arrives), or the status to refuse it with.

        The UID must be one (it names the file), and a place in the window is taken before anything is
        written, waiting at most ``store_wait_s`` (the PACS waits for our C-STORE-RSP meanwhile, and the
        association stops reading: back-pressure down to the socket).
        """
        if self.closed:
            return OUT_OF_RESOURCES
        self._inflight += 1
        self._idle.clear()
        handed = False
        try:
            if not _UID_RE.match(sop_uid) or len(sop_uid) > 64:
                log.warning("qr_store_bad_uid")
                return UNABLE_TO_PROCESS
            if not await self._take_place():
                log.warning("qr_store_refused_window", sop_instance_uid=sop_uid, closed=self.closed)
                return OUT_OF_RESOURCES
            meta = file_meta(sop_class, sop_uid, transfer_syntax, source_ae)
            # In memory when the budget holds one more instance the size of the largest so far.
            reserve = max(self._largest, len(meta))
            if self.memory is not None and self.memory.take(reserve):
                sink = SpoolSink(self, None, None, sop_class, sop_uid, transfer_syntax, len(meta),
                                 reserved=reserve)
            else:
                try:
                    fh, tmp = self._open_part()
                except OSError as exc:
                    self._free += 1
                    log.error("qr_store_spool_failed", sop_instance_uid=sop_uid, error=type(exc).__name__)
                    return OUT_OF_RESOURCES
                sink = SpoolSink(self, fh, tmp, sop_class, sop_uid, transfer_syntax, len(meta))
            sink.write(memoryview(meta))
            handed = True
            return sink
        finally:
            if not handed:
                self._left()

    async def _take_place(self) -> bool:
        """A place in the window, awaited: woken when the consumer takes an item (``_room_event``),
        with a short timed look as backstop.

        The byte window is judged before the size is known (the dataset streams in after this): a new
        instance is let in when the largest one this spool has seen still fits, or nothing is held.
        Instances of one study are alike in size, so the high-water mark stays within the window
        unless an instance is larger than every one before it.
        """
        deadline = time.monotonic() + self.store_wait_s
        while not self.closed:
            if self._free and self._bytes_fit(self._largest):
                self._free -= 1
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            self._room_event.clear()
            try:
                await asyncio.wait_for(self._room_event.wait(), min(left, _POLL_S))
            except TimeoutError:
                pass
        return False

    def _open_part(self) -> tuple[BinaryIO, Path]:
        """A new ``.part-`` file, opened on the loop on purpose: a local create is cheaper than a hop."""
        path = self.directory / f".part-{self._token}{next(self._serial)}.dcm"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
        return open(fd, "wb", buffering=_SINK_BUFFER), path

    def _bytes_fit(self, size: int) -> bool:
        return self.window_bytes is None or not self.bytes_held or self.bytes_held + size <= self.window_bytes

    def _left(self) -> None:
        self._inflight -= 1
        if not self._inflight:
            self._idle.set()

    def _put(self, item: object) -> bool:
        """Queue an instance, or the operation's terminal item; False once closed."""
        if self.closed:
            return False
        try:
            self._queue.put_nowait(item)  # never full: one slot per place in the window, plus the end
        except asyncio.QueueFull:
            return False
        return True

    # the consumer's side ----------------------------------------------------------------------------

    async def _next(self, timeout_s: float) -> object:
        try:
            return await asyncio.wait_for(self._queue.get(), timeout_s)
        except TimeoutError:
            raise QrTimeout(f"no DIMSE progress within {timeout_s:g} s") from None

    def _handed_over(self, item: SpooledInstance) -> None:
        if item.path is not None:
            self._outstanding.discard(item.path)
        self._handed_sizes.append((item.size, item.reserved))

    def _consumed(self) -> None:
        size, reserved = self._handed_sizes.popleft() if self._handed_sizes else (0, 0)
        self._release_bytes(size)
        if reserved and self.memory is not None:
            self.memory.give(reserved)
        self._free += 1
        self._room_event.set()

    async def close(self) -> None:
        """Stop accepting, wait briefly for C-STOREs in flight, delete every file not handed over."""
        self._closed = True
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._idle.wait(), self.store_wait_s + 1)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if isinstance(item, SpooledInstance):
                if item.path is not None:
                    item.path.unlink(missing_ok=True)
                if item.reserved and self.memory is not None:
                    self.memory.give(item.reserved)
        leftovers, self._outstanding = self._outstanding, set()
        for path in leftovers:
            path.unlink(missing_ok=True)


#: The first bytes of each received file a sink keeps in memory to read the header from: a CT or MR
#: header (Part 10 meta included) is 2-10 kB, so this covers all but headers with large private or
#: embedded data, which are read back from the file instead.
_HEAD_BYTES = 64 * 1024


def _header_from(head: bytes | bytearray, meta_length: int, transfer_syntax: str,
                 whole: bool) -> Dataset | None:
    """The identifying elements of a received file from its first bytes (Part 10 meta of
    ``meta_length`` bytes, then the dataset), or None when they do not provably hold all of them.

    Why: reading the header back from the spool file and parsing all of it with pydicom was the
    largest per-instance cost on the event loop (:mod:`duo_gateway.dicom.header`). ``whole``: the
    bytes are the entire file. The header holds the elements of ``IDENTIFYING_KEYWORDS`` only.
    """
    if not walkable(transfer_syntax):
        return None
    implicit = is_implicit(transfer_syntax)
    cut = cut_elements(memoryview(head)[meta_length:], implicit=implicit, whole=whole)
    if cut is None:
        return None
    try:
        # No file meta: the spool wrote this file's, so its syntax is the context's (_admit's fallback).
        return read_dataset(BytesIO(cut), implicit, True)
    except Exception:
        return None


class SpoolSink:
    """One C-STORE dataset being received by the asyncio UL into the spool (a ``DatasetSink``).

    Holds a window permit and counts as in flight from :meth:`Spool.receive` until :meth:`finish` or
    :meth:`discard`; the instance is only renamed into place (or kept) and queued once complete and
    valid, so the C-STORE-RSP (sent after ``finish``) still means "in place and queued".

    Without a file (``fh`` None) it collects the bytes in memory against ``reserved`` bytes of the
    spool's :class:`MemoryBudget`, taking more as they come, and spills to a ``.part-`` file when the
    budget has no more: an instance is never refused for want of memory.
    """

    def __init__(self, spool: Spool, fh: BinaryIO | None, tmp: Path | None, sop_class: str, sop_uid: str,
                 transfer_syntax: str, meta_length: int = 0, *, reserved: int = 0) -> None:
        self._spool = spool
        self._fh = fh
        self._tmp: Path | None = tmp
        #: The bytes so far while in memory; None once written to a file.
        self._chunks: list[bytes] | None = [] if fh is None else None
        self._reserved = reserved
        self._sop_class = sop_class
        self._sop_uid = sop_uid
        self._ts = transfer_syntax
        self._error: OSError | None = None
        self._done = False
        #: The file's first bytes (see :data:`_HEAD_BYTES`), to read the header from without the file;
        #: the first ``_meta_length`` of them are the Part 10 meta the spool wrote.
        self._head = bytearray()
        self._meta_length = meta_length
        #: Bytes written so far, counted against the spool's byte window as they land.
        self._written = 0

    def write(self, data: memoryview) -> None:
        if self._error is not None:
            return
        if self._chunks is not None:
            short = self._written + len(data) - self._reserved
            if short > 0 and not self._take(short):
                self._spill()
        if self._chunks is not None:
            self._chunks.append(bytes(data))  # the PDU buffer is reused: a copy
        else:
            assert self._fh is not None
            try:
                self._fh.write(data)
            except OSError as exc:
                self._error = exc
                return
            if len(self._head) < _HEAD_BYTES:
                self._head += data[:_HEAD_BYTES - len(self._head)]
        self._written += len(data)
        self._spool._hold(len(data))

    def _take(self, size: int) -> bool:
        memory = self._spool.memory
        # grow by at least a quarter, so a large instance costs a few reservations, not one per PDV
        more = max(size, self._reserved // 4)
        if memory is not None and memory.take(more):
            self._reserved += more
            return True
        return False

    def _spill(self) -> None:
        """The budget is spent: what came so far goes to a new ``.part-`` file, the rest follows."""
        chunks, self._chunks = self._chunks or [], None
        self._give_back()
        try:
            self._fh, self._tmp = self._spool._open_part()
            for chunk in chunks:
                self._fh.write(chunk)
        except OSError as exc:
            self._error = exc
            return
        joined = b"".join(chunks)
        self._head += joined[:_HEAD_BYTES]

    def _give_back(self) -> None:
        if self._reserved and self._spool.memory is not None:
            self._spool.memory.give(self._reserved)
        self._reserved = 0

    async def finish(self) -> int:
        spool = self._spool
        queued = False
        try:
            if self._chunks is not None:
                data = b"".join(self._chunks)
                self._chunks = None
                try:
                    status, _tmp = spool._admit(None, self._sop_class, self._sop_uid, self._ts, data,
                                                meta_length=self._meta_length, whole=True,
                                                size=len(data), data=data, reserved=self._reserved)
                except Exception as exc:
                    log.warning("qr_store_undecodable", sop_instance_uid=self._sop_uid,
                                error=type(exc).__name__)
                    return UNABLE_TO_PROCESS
                queued = status == SUCCESS
                if queued:
                    self._reserved = 0  # the queued item holds it now
                return status
            try:
                if self._error is None:
                    assert self._fh is not None
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
                                                 self._head,
                                                 meta_length=self._meta_length,
                                                 whole=self._written <= len(self._head), size=self._written)
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
        if self._fh is not None:
            with contextlib.suppress(OSError):
                self._fh.close()
        self._chunks = None
        self._end(False)

    def _end(self, queued: bool) -> None:
        if self._done:
            return
        self._done = True
        spool = self._spool
        spool._largest = max(spool._largest, self._written)
        self._give_back()
        if self._tmp is not None:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None
        if not queued:
            spool._release_bytes(self._written)
            spool._free += 1
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
        # Used on the event loop only (moves and the storage SCP alike): no lock.
        self._moves: dict[int, _MoveRegistration] = {}
        self._next_id = 1

    def register(self, spool: Spool, expected: Iterable[str] | None = None,
                 originators: Iterable[str] = ()) -> int:
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
        self._moves.pop(msg_id, None)

    @property
    def active(self) -> int:
        return len(self._moves)

    def route(self, move_originator_message_id: int | None, sop_uid: str) -> Spool | None:
        """The spool of the active move an incoming instance belongs to; None when it is not ours."""
        reg = self._moves.get(move_originator_message_id) if move_originator_message_id else None
        if reg is not None and reg.expected is not None and sop_uid not in reg.expected:
            reg = None
        if reg is None:
            candidates = [r for r in self._moves.values() if r.expected is not None and sop_uid in r.expected]
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
              window_bytes: int | None = None, memory: MemoryBudget | None = None) -> Spool:
        return Spool(directory, window, validate=validate, store_wait_s=self.store_wait_s,
                     window_bytes=window_bytes, memory=memory)

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
            qa = await QrAssociation.open(self, contexts, ext_neg, dimse)
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


class QrAssociation:
    """One established association on DUO's asyncio Upper Layer (:mod:`duo_gateway.dicom.ul`); one
    operation at a time, any of C-FIND, C-GET and C-MOVE the association negotiated.

    Why not pynetdicom: its associations are two polling threads each plus a thread hand-off per
    message. C-GET instances arrive as C-STORE sub-operations on this very association and stream PDV
    by PDV into the spool (:meth:`Spool.receive`) on the event loop; a C-MOVE's arrive at DUO's storage
    SCP (same receive path), this association carrying only the request and its pending responses; a
    C-FIND's identifiers are decoded as they come, where pynetdicom's path cost a RAD-75 answer 2.5x
    DCMTK findscu's time for the same IMAGE-level query (docs/performance.md). The module's rules hold:
    the window bounds the spool and, through the sub-operation's unanswered C-STORE and paused socket
    reads, the PACS; every wait has a timeout; a consumer that stops iterating aborts the association.
    """

    def __init__(self, client: QrClient, ul: UlAssociation, dimse_timeout_s: float) -> None:
        self._client = client
        self._ul = ul
        self._dimse_s = dimse_timeout_s
        self._spool: Spool | None = None
        self._busy = False
        self._broken = False
        ul.store_handler = self._on_store

    @classmethod
    async def open(cls, client: QrClient, contexts: list[PresentationContext], ext_neg: list[Any],
                   dimse_timeout_s: float) -> QrAssociation:
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
        if not any(cx.abstract_syntax in _QR_MODELS for cx in ul.accepted.values()):
            await ul.release()
            raise QrError(f"{client.called_ae} accepted none of the Query/Retrieve presentation contexts")
        return cls(client, ul, dimse_timeout_s)

    def _context(self, operation: str, model: UID) -> AcceptedContext:
        for cx in self._ul.accepted.values():
            if cx.abstract_syntax == str(model):
                return cx
        raise QrError(f"{self._client.called_ae} accepted no {operation} context for {model.name}")

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

    def _start(self) -> None:
        if self._busy:
            raise RuntimeError("one operation at a time per association")
        if self._broken or not self._established():
            raise QrAborted("association no longer established")
        self._busy = True

    async def _send(self, operation: str, cx: AcceptedContext, request: Command, query: Dataset) -> None:
        identifier = encode(query, cx.transfer_syntax == str(ImplicitVRLittleEndian), True)
        if identifier is None:
            raise QrError(f"{operation} identifier could not be encoded", kind="error", retryable=False)
        await self._ul.send_command(cx.context_id, request, identifier)

    async def _response(self, operation: str, request: Command, response_field: int) -> Message:
        """The next response to ``request``; anything else (or the peer releasing) ends the association."""
        msg = await self._ul.receive(self._dimse_s)
        if msg is None:
            self._broken = True
            raise QrAborted(f"the PACS released the association during {operation}")
        rsp = msg.command
        if rsp.command_field != response_field or rsp.message_id_responded_to != request.message_id:
            await self._abort()
            raise QrAborted(f"unexpected DIMSE message 0x{rsp.command_field:04X} during {operation}")
        return msg

    def _failed(self, operation: str, exc: UlError) -> QrError:
        """The one mapping of an Upper Layer failure mid-operation to a :class:`QrError`."""
        self._broken = True
        if isinstance(exc, UlTimeout):
            return QrTimeout(f"no {operation} response within {self._dimse_s:g} s")
        return QrAborted(f"association aborted during {operation}: {exc}")

    # C-FIND -------------------------------------------------------------------------------------

    async def find(self, query: Dataset, model: Model = "study") -> AsyncGenerator[Dataset, None]:
        """Matches as the PACS sends them; raises a :class:`QrError` on failure. A consumer that stops
        early aborts the association (the PACS stops at once; C-CANCEL would leave it to the PACS)."""
        cx = self._context("C-FIND", _FIND[model])
        self._start()
        finished = False
        try:
            request = c_find_rq(self._ul.next_message_id(), str(_FIND[model]))
            try:
                await self._send("C-FIND", cx, request, query)
                while True:
                    msg = await self._response("C-FIND", request, C_FIND_RSP)
                    code = msg.command.status if msg.command.status is not None else UNABLE_TO_PROCESS
                    if is_pending(code):
                        if msg.dataset:
                            yield _decode_identifier("C-FIND", msg.dataset, cx)
                        continue
                    finished = True
                    if code != SUCCESS:
                        raise QrStatusError("C-FIND", code, msg.command.error_comment or "")
                    return
            except UlError as exc:
                raise self._failed("C-FIND", exc) from None
        finally:
            self._busy = False
            if not finished:
                await self._abort()

    # C-GET and C-MOVE ---------------------------------------------------------------------------

    async def _on_store(self, assoc: UlAssociation, context: AcceptedContext,
                        command: Command) -> DatasetSink | int:
        spool = self._spool
        if spool is None:
            return NOT_AUTHORISED  # a C-STORE outside any C-GET of ours
        return await spool.receive(command.affected_sop_class_uid or "",
                                   command.affected_sop_instance_uid or "", context.transfer_syntax,
                                   self._client.called_ae)

    async def get(self, query: Dataset, spool: Spool,
                  model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """One C-GET; instances land in ``spool`` (the caller closes it). Raises :class:`QrStatusError`
        on a Failure/Cancel final status, after yielding what did arrive."""
        cx = self._context("C-GET", _GET[model])
        self._start()
        self._spool = spool
        try:
            request = c_get_rq(self._ul.next_message_id(), str(_GET[model]))
            async with aclosing(self._retrieve("C-GET", cx, query, spool, request, C_GET_RSP)) as stream:
                async for item in stream:
                    yield item
        finally:
            self._spool = None
            self._busy = False

    async def move(self, query: Dataset, destination_ae: str, router: MoveRouter, spool: Spool,
                   expected: Iterable[str] | None = None,
                   model: Model = "study") -> AsyncGenerator[SpooledInstance, None]:
        """One C-MOVE to ``destination_ae``; DUO's SCP hands the instances over through ``router``,
        which allocated the Message ID the PACS echoes as Move Originator Message ID."""
        cx = self._context("C-MOVE", _MOVE[model])
        self._start()
        try:
            msg_id = router.register(spool, expected, originators=(self._client.calling_ae,
                                                                   self._client.called_ae))
            try:
                request = c_move_rq(msg_id, str(_MOVE[model]), destination_ae)
                moved = self._retrieve("C-MOVE", cx, query, spool, request, C_MOVE_RSP)
                async with aclosing(moved) as stream:
                    async for item in stream:
                        yield item
            finally:
                router.unregister(msg_id)
        finally:
            self._busy = False

    async def _retrieve(self, operation: str, cx: AcceptedContext, query: Dataset, spool: Spool,
                        request: Command, response_field: int) -> AsyncGenerator[SpooledInstance, None]:
        pump = asyncio.create_task(self._pump(operation, cx, query, spool, request, response_field))
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

    async def _pump(self, operation: str, cx: AcceptedContext, query: Dataset, spool: Spool,
                    request: Command, response_field: int) -> None:
        """Send the request, then receive until its final response (a C-GET's C-STOREs in between go
        to the spool inside ``receive``); the outcome goes to the spool's queue as the terminal item."""
        outcome: object
        try:
            await self._send(operation, cx, request, query)
            while True:
                msg = await self._response(operation, request, response_field)
                rsp = msg.command
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
        except UlError as exc:
            outcome = self._failed(operation, exc)
        except QrError as exc:
            outcome = exc
        spool._put(outcome)

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
            if not finished:
                # Cancelled, broken off or timed out: refuse further C-STOREs and let the ones in
                # flight answer first, then stop the PACS mid-stream.
                await spool.close()
                await self._abort()


def _decode_identifier(operation: str, data: bytes, cx: AcceptedContext) -> Dataset:
    try:
        return decode(BytesIO(data), cx.transfer_syntax == str(ImplicitVRLittleEndian), True)
    except Exception as exc:
        raise QrError(f"{operation} answer with an undecodable identifier: {type(exc).__name__}",
                      kind="error", retryable=False) from None


def _identifier(data: bytes | None, cx: AcceptedContext) -> Dataset | None:
    """A response's identifier (e.g. the Failed SOP Instance UID List); None when absent or unreadable."""
    if not data:
        return None
    try:
        return _decode_identifier("response", data, cx)
    except QrError:
        return None


def _failed_uids(identifier: Dataset | None) -> str:
    if identifier is None or "FailedSOPInstanceUIDList" not in identifier:
        return ""
    value = identifier.FailedSOPInstanceUIDList
    count = 1 if isinstance(value, str) else len(value)
    return f"{count} failed SOP instance(s)"
