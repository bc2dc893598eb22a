"""Asyncio-facing C-STORE SCU: relays spooled Part 10 files into a destination PACS, one by one.

A transfer relays a study instance by instance as each lands in the spool; the destination is the
requester's own PACS (:class:`~duo_gateway.config.transfer.DestinationPacs`). Decisions and why:

- **One association for many instances.** An association per instance costs a TCP + A-ASSOCIATE
  round trip each and is 3-30x slower (pynetdicom #639/#701, docs/dicom.md §8). The association is
  opened lazily on the first store and kept until the ``async with`` block ends.
- **Presentation contexts grow with what arrives.** We do not know a study's SOP classes and
  transfer syntaxes up front (they arrive one by one), so the client proposes one context per
  (SOP class, transfer syntax) seen so far, plus Explicit and Implicit VR Little Endian for each
  class (a fallback for conversion). One context per syntax, because a file is only sent unchanged
  when the acceptor picks exactly its syntax (offered several in one context, acceptors pick their
  own favourite). When an instance needs a pair the open association never proposed, it is released
  and re-associated with the larger set (at most 128 contexts; the least recently used SOP classes
  drop out first). :meth:`StoreClient.expect` pre-declares pairs to avoid those re-associations.
- **Files are streamed, never decoded.** pynetdicom's ``send_c_store(path)`` either decodes the whole
  dataset (x3 memory, slower) or, with the process-global ``STORE_SEND_CHUNKED_DATASET``, streams it
  through its DUL thread, which moves one PDU per reactor iteration, sleeps 1 ms whenever its queue
  runs dry and queues *every* PDU of an instance up front (a 500 MB instance would sit in memory).
  :func:`_send_file` keeps pynetdicom for association, reactor and response handling (3.0 internals,
  pinned like nodelay.py) but writes the P-DATA-TF PDUs straight to the socket from the sending
  thread: one PDU in memory at a time, and to DCMTK storescp about 2x the instances/s of pynetdicom's
  own chunked send in one quick run (110-137 vs 50-75 MB/s for 0.5 MB CTs on a loaded 2-core VM).
  Not over TLS: an SSL connection must not be written by one thread while another reads it, so TLS
  destinations get pynetdicom's own ``send_c_store`` (whole instance decoded; instances are small).
- **Sent as stored whenever the destination takes it; converted only where no pixel value changes.**
  A compressed file whose syntax the destination accepted goes out untouched (streamed, never
  decoded). When the destination declines the file's syntax, what happens is decided by its class
  (:mod:`~duo_gateway.dicom.syntaxes`, the one home of that rule): uncompressed little endian is
  transcoded to the other one (header re-encoded, pixel data copied in chunks, see reconcile.py);
  lossless compressed data is decompressed into an uncompressed little-endian syntax the destination
  accepted (:mod:`~duo_gateway.dicom.transcode`, frame by frame, in the helper process of
  :mod:`~duo_gateway.dicom.decode_worker` so a codec that crashes or hangs costs only that instance);
  lossy data is never decompressed or re-encoded, and is ``refused`` with that reason. A stream that
  will not decode is ``refused`` too (0xC000, "cannot understand"), for that instance alone. Verdicts
  DUO reaches without sending anything carry ``local=True``. The conversion happens in the store's
  executor hop, off the loop; a decompression that outlasts the destination's idle timeout gets a new
  association for the converted copy.
- **Threads, not the loop.** pynetdicom blocks, so every association operation runs on one
  single-thread executor per client (an association is only ever driven by one thread); abort runs on
  a thread of its own so it can interrupt a blocked send. Each :meth:`StoreClient.store` is one
  executor hop: (re)association, optional conversion and the C-STORE all happen in it.
- **What counts as stored.** Only a Success or Warning status from the destination. 0xA7xx (out of
  resources) is ``transient`` (retry later); every other failure is ``refused`` (permanent for this
  instance). No association, a timeout or an abort raises :class:`StoreUnavailable` and the next
  store re-associates.

Parallelism (``DestinationPacs.max_associations`` > 1) is the caller's choice: run that many
StoreClients, each with its own association, and feed them from one queue. More threads per
association would not help (pynetdicom serialises an association), and on 2 cores the GIL caps the
gain (docs/dicom.md §2: four associations did not beat one).
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
import os
import select
import socket
import ssl
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import pynetdicom
import structlog
from pydicom.dataset import Dataset
from pydicom.uid import UID
from pynetdicom import AE, build_context
from pynetdicom.association import Association
from pynetdicom.dimse_messages import C_STORE_RQ
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.dsutils import encode, split_dataset
from pynetdicom.presentation import PresentationContext

from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.dicom.decode_worker import DecodeWorker
from duo_gateway.dicom.nodelay import SUPPORTED_PYNETDICOM, ensure_tcp_nodelay
from duo_gateway.dicom.qr import MAX_CONTEXTS
from duo_gateway.dicom.status import (
    OUT_OF_RESOURCES,
    SOP_CLASS_NOT_SUPPORTED,
    STORE_WARNINGS,
    SUCCESS,
    UNABLE_TO_PROCESS,
    is_identifier_mismatch,
    is_out_of_resources,
    is_unable_to_process,
    is_warning,
)
from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE, syntax_class
from duo_gateway.dicom.teardown import install_fast_teardown
from duo_gateway.dicom.transcode import TranscodeError, transcode_uncompressed
from duo_gateway.failure import Failure, FailureKind
from duo_gateway.tls import client_context

log = structlog.get_logger(__name__)

StoreOutcome = Literal["stored", "warning", "refused", "transient"]

#: PDU size we send when the peer allows "unlimited" (or more): memory holds one PDU at a time.
_MAX_SEND_PDU = 1 << 20
#: DUL poll interval while a C-STORE-RSP is awaited (pynetdicom's idle default is 1 ms).
_RESPONSE_POLL_S = 0.0001


@dataclass(frozen=True)
class StoreResult:
    sop_instance_uid: str
    status: int
    outcome: StoreOutcome
    detail: str
    #: DUO's own verdict, reached without sending the instance (no context, lossy, undecodable, a local
    #: resource): ``status`` is then DUO's choice of code, not the destination's answer.
    local: bool = False

    @property
    def stored(self) -> bool:
        """The destination has the instance (Success or Warning)."""
        return self.outcome in ("stored", "warning")


class StoreUnavailable(Failure):
    """No usable association: refused, rejected, aborted, timed out, network error.

    Transient from the caller's point of view (``retryable``): the instance was not stored and the
    next :meth:`StoreClient.store` opens a new association. ``label`` is a short metric label, finer
    than ``kind``: a ``timeout`` label is a ``timeout``, every other one an ``unavailable``
    destination, unless the failure is DUO's own and would repeat (then ``error``, not retryable).
    """

    def __init__(self, detail: str, *, label: str = "aborted", retryable: bool = True) -> None:
        kind: FailureKind = "error" if not retryable else "timeout" if label == "timeout" else "unavailable"
        super().__init__(kind, detail, retryable=retryable)
        self.label = label


def classify(status: int) -> StoreOutcome:
    """PS3.4 B.2.3 / PS3.7 C: Success, Warning (0xB000/0xB006/0xB007, any 0xBxxx), Out of resources
    (0xA7xx: the destination may take it later), and every other status a permanent refusal."""
    if status == SUCCESS:
        return "stored"
    if is_warning(status):
        return "warning"
    if is_out_of_resources(status):
        return "transient"
    return "refused"


def _detail(status: int, outcome: StoreOutcome, comment: str) -> str:
    if outcome == "stored":
        text = "stored"
    elif outcome == "warning":
        text = f"stored with warning 0x{status:04X} ({STORE_WARNINGS.get(status, 'warning')})"
    elif outcome == "transient":
        text = f"destination out of resources (0x{status:04X}); retry later"
    elif is_identifier_mismatch(status):
        text = f"refused: data set does not match SOP class (0x{status:04X})"
    elif is_unable_to_process(status):
        text = f"refused: cannot understand (0x{status:04X})"
    else:
        text = f"refused with status 0x{status:04X}"
    return f"{text}: {comment}" if comment else text


# -- the client ------------------------------------------------------------------------------------


@dataclass
class _Conn:
    assoc: Association
    proposed: frozenset[tuple[str, str]]
    #: (SOP class, transfer syntax) -> accepted presentation context ID.
    accepted: dict[tuple[str, str], int]


class StoreClient:
    """C-STORE SCU towards one destination PACS over one (re-)negotiated association.

    Use as ``async with StoreClient(dest, calling_ae) as client: await client.store(...)``. Stores are
    serialised (one association, one operation at a time); create it on the loop that uses it.
    """

    def __init__(self, destination: DestinationPacs, calling_ae: str, *,
                 tls: ssl.SSLContext | None = None) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout_s = destination.timeout_s
        self._tls = tls if tls is not None else (
            client_context(destination.tls) if destination.tls is not None else None)
        #: SOP class -> transfer syntaxes seen, most recently used class last.
        self._wanted: OrderedDict[str, list[str]] = OrderedDict()
        self._conn: _Conn | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._lock = asyncio.Lock()
        self._msg_id = 0
        self._ae: AE | None = None
        #: Associations opened so far (re-associations included): for tests, logs and metrics.
        self.associations = 0
        #: Instances decompressed for this destination so far (every other one went out as stored).
        self.decompressed = 0
        #: time.monotonic() of the last sign of life of the store in flight (set from the thread).
        self._progress = 0.0
        #: The codecs' helper process, started on the first instance that needs decompressing.
        self._decoder: DecodeWorker | None = None

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(abort=exc is not None)

    async def close(self, *, abort: bool = False) -> None:
        """Release the association (abort it when ``abort``), and stop the worker thread."""
        conn, self._conn = self._conn, None
        executor, self._executor = self._executor, None
        try:
            if conn is not None and conn.assoc.is_established:
                if abort or executor is None:
                    await self._abort_assoc(conn.assoc)
                else:
                    try:
                        await asyncio.wait_for(asyncio.wrap_future(executor.submit(conn.assoc.release)),
                                               self.timeout_s + 1)
                    except (TimeoutError, Exception):
                        await self._abort_assoc(conn.assoc)
        finally:
            if executor is not None:
                executor.shutdown(wait=False)
            decoder, self._decoder = self._decoder, None
            if decoder is not None:
                await asyncio.to_thread(decoder.close)

    def expect(self, pairs: Iterable[tuple[str, str]]) -> None:
        """Pre-declare (SOP class, transfer syntax) pairs, e.g. from a C-FIND or a KOS, so the first
        association proposes them all and no re-association is needed mid-study."""
        for sop, ts in pairs:
            self._note(str(sop), str(ts), touch=False)

    async def store(self, path: Path, *, sop_class_uid: str, sop_instance_uid: str,
                    transfer_syntax_uid: str) -> StoreResult:
        """C-STORE one Part 10 file; returns the destination's verdict or raises StoreUnavailable.

        The UIDs come from the caller (who read them when the file was spooled): the file is not
        parsed again here beyond its file meta length.
        """
        async with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=1, thread_name_prefix=f"store-{self.destination.ae_title.strip()}")
            ctx = contextvars.copy_context()
            fut = self._executor.submit(ctx.run, self._store_sync, path, str(sop_class_uid),
                                        str(sop_instance_uid), str(transfer_syntax_uid))
            # pynetdicom's own timeouts (connect, ACSE, DIMSE) and the send stall check fire well
            # before this; it is the backstop for a thread that hangs anyway. Measured from the last
            # PDU written, so a big instance on a slow link is not cut off while it moves.
            budget = self.timeout_s * 4 + 5
            self._progress = time.monotonic()
            waiting = asyncio.shield(asyncio.wrap_future(fut))
            try:
                while True:
                    left = self._progress + budget - time.monotonic()
                    if left <= 0:
                        raise TimeoutError
                    done, _ = await asyncio.wait([waiting], timeout=left)
                    if done:
                        return waiting.result()
            except TimeoutError:
                await self._drop_conn()
                raise StoreUnavailable(f"no C-STORE progress towards {self._name} within {budget:g} s",
                                       label="timeout") from None
            except asyncio.CancelledError:
                # The C-STORE may or may not have reached the PACS: abort, so that the next store
                # starts on a clean association and the caller retries this instance.
                await self._drop_conn()
                raise

    # thread side ----------------------------------------------------------------------------------

    @property
    def _name(self) -> str:
        d = self.destination
        return f"{d.ae_title} at {d.host}:{d.port}"

    def _note(self, sop: str, ts: str, *, touch: bool = True) -> None:
        tss = self._wanted.get(sop)
        if tss is None:
            self._wanted[sop] = [ts]
        elif ts not in tss:
            tss.append(ts)
        if touch:
            self._wanted.move_to_end(sop)

    def _contexts(self, must: tuple[str, str]) -> list[tuple[str, str]]:
        """Pairs to propose: ``must`` first, then the most recently used classes, within 128."""
        pairs: list[tuple[str, str]] = [must]
        for sop in [must[0], *reversed(self._wanted)]:
            for ts in [*self._wanted.get(sop, []), *UNCOMPRESSED_LE]:
                if (sop, ts) not in pairs and len(pairs) < MAX_CONTEXTS:
                    pairs.append((sop, ts))
        return pairs

    def _store_sync(self, path: Path, sop: str, sop_uid: str, ts: str) -> StoreResult:
        key = (sop, ts)
        self._note(sop, ts)
        conn = self._conn
        if conn is not None and not conn.assoc.is_established:
            self._conn = conn = None
        if conn is None or (key not in conn.accepted and key not in conn.proposed):
            if conn is not None:
                log.info("store_reassociate", destination=self.destination.name, sop_class=sop,
                         transfer_syntax=ts)
                self._release_sync(conn)
                self._conn = None
            conn = self._open_sync(key)
            if conn is None:
                return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                                   f"{self._name} accepts no presentation context for SOP class {sop} "
                                   f"({UID(ts).name}): association refused every proposed context",
                                   local=True)
            self._conn = conn
        cx = conn.accepted.get(key)
        if cx is not None:
            return self._send_sync(conn, path, None, cx, sop, sop_uid)
        return self._convert_and_send(conn, path, sop, sop_uid, ts)

    def _convert_and_send(self, conn: _Conn, path: Path, sop: str, sop_uid: str, ts: str) -> StoreResult:
        """The destination declined ``ts`` for this class: send a converted copy where that changes no
        pixel value, else refuse the instance with the reason."""
        if not any(s == sop for s, _ in conn.accepted):
            return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                               f"{self._name} does not accept SOP class {sop}", local=True)
        kind = syntax_class(ts)
        accepted = ", ".join(UID(t).name for s, t in conn.accepted if s == sop)
        declined = f"{self._name} does not accept {UID(ts).name} for SOP class {sop} (accepts {accepted})"
        target = next((t for t in UNCOMPRESSED_LE if t != ts and (sop, t) in conn.accepted), None)
        if kind == "lossy":
            log.warning("store_lossy_declined", sop_instance_uid=sop_uid, transfer_syntax=UID(ts).name)
            return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                               f"{declined}; {UID(ts).name} is lossy, and DUO neither decompresses nor "
                               "re-encodes lossy pixel data", local=True)
        if target is None or (kind == "uncompressed" and ts not in UNCOMPRESSED_LE):
            return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                               f"{declined}; DUO converts lossless data into Explicit or Implicit VR Little "
                               "Endian only", local=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".convert-", suffix=".dcm")
        os.close(fd)
        tmp = Path(tmp_name)
        try:
            started = time.monotonic()
            try:
                if kind == "uncompressed":
                    transcode_uncompressed(path, tmp, UID(target))
                else:
                    if self._decoder is None:
                        self._decoder = DecodeWorker()
                    self._decoder.decompress(path, tmp, target, progress=self._touch)
                    self.decompressed += 1
            except TranscodeError as exc:
                # This instance's data (or its decoder) failed: its own verdict, not the job's.
                log.warning("store_decompress_failed", sop_instance_uid=sop_uid, source=UID(ts).name,
                            reason=exc.reason)
                status = UNABLE_TO_PROCESS if exc.reason == "corrupt" else SOP_CLASS_NOT_SUPPORTED
                return StoreResult(sop_uid, status, "refused",
                                   f"{declined}; DUO could not decompress it: {exc.detail}", local=True)
            except OSError as exc:
                # The spool or the decoder helper, not the instance: worth another attempt later.
                log.warning("store_convert_unavailable", sop_instance_uid=sop_uid, error=type(exc).__name__)
                return StoreResult(sop_uid, OUT_OF_RESOURCES, "transient",
                                   f"could not convert to {UID(target).name}: {exc}", local=True)
            except (ValueError, struct.error) as exc:
                # This instance cannot be converted (truncated, malformed): its own verdict, not the job's.
                return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                                   f"could not convert to {UID(target).name}: {exc}", local=True)
            log.info("store_converted", sop_instance_uid=sop_uid, source=UID(ts).name,
                     target=UID(target).name, seconds=round(time.monotonic() - started, 3))
            self._touch()
            if not conn.assoc.is_established:
                # A long decompression can outlast the destination's idle timeout: the converted copy
                # goes out on a new association instead of being decoded again on a retry.
                log.info("store_reassociate", destination=self.destination.name, sop_class=sop,
                         transfer_syntax=target)
                self._conn = None
                reopened = self._open_sync((sop, target))
                if reopened is None:
                    return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                                       f"{self._name} accepts no presentation context for SOP class {sop} "
                                       "any more", local=True)
                self._conn = conn = reopened
            cx = conn.accepted.get((sop, target))
            if cx is None:
                return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                                   f"{self._name} no longer accepts {UID(target).name} for SOP class {sop}",
                                   local=True)
            result = self._send_sync(conn, tmp, None, cx, sop, sop_uid)
            return dataclasses.replace(result, detail=f"{result.detail} (sent as {UID(target).name}, "
                                                      f"converted from {UID(ts).name})")
        finally:
            tmp.unlink(missing_ok=True)

    def _open_sync(self, must: tuple[str, str]) -> _Conn | None:
        """Associate; None when the destination accepted the association but none of its contexts."""
        ensure_tcp_nodelay()
        install_fast_teardown()
        _check_pynetdicom()
        if self._ae is None:
            ae = AE(ae_title=self.calling_ae)
            ae.acse_timeout = self.timeout_s
            ae.network_timeout = self.timeout_s
            ae.connection_timeout = self.timeout_s
            ae.dimse_timeout = self.timeout_s
            self._ae = ae
        pairs = self._contexts(must)
        contexts: list[PresentationContext] = [build_context(sop, ts) for sop, ts in pairs]
        d = self.destination
        tls_args = (self._tls, d.host) if self._tls is not None else None
        try:
            assoc = self._ae.associate(d.host, d.port, contexts=contexts, ae_title=d.ae_title,
                                       tls_args=tls_args)
        except (OSError, ssl.SSLError) as exc:
            raise StoreUnavailable(f"no association with {self._name}: {type(exc).__name__}: {exc}",
                                   label="connect") from None
        self.associations += 1
        if not assoc.is_established:
            if assoc.is_rejected:
                raise StoreUnavailable(f"association rejected by {self._name}", label="rejected")
            if assoc.rejected_contexts and not assoc.accepted_contexts:
                log.warning("store_no_context", destination=d.name, sop_class=must[0])
                return None
            # pynetdicom reports a refused connection and a timeout as "aborted" too
            raise StoreUnavailable(f"no association with {self._name} (refused, timed out or aborted)",
                                   label="connect")
        accepted = {(str(cx.abstract_syntax), str(cx.transfer_syntax[0])): int(cx.context_id or 0)
                    for cx in assoc.accepted_contexts}
        log.info("store_associated", destination=d.name, proposed=len(pairs), accepted=len(accepted))
        return _Conn(assoc, frozenset(pairs), accepted)

    def _send_sync(self, conn: _Conn, path: Path, offset: int | None, context_id: int, sop: str,
                   sop_uid: str) -> StoreResult:
        self._msg_id = self._msg_id % 65535 + 1
        started = time.monotonic()
        sock = conn.assoc.dul.socket.socket if conn.assoc.dul.socket is not None else None
        try:
            if isinstance(sock, ssl.SSLSocket):
                # OpenSSL forbids driving one SSL connection from two threads at once, and the DUL
                # thread keeps reading it: over TLS, pynetdicom sends (its own thread does the writes).
                # No per-PDU progress from pynetdicom here: its own DIMSE/network timeouts guard the
                # send, and the backstop counts from its start rather than from the last store.
                self._touch()
                status_ds = conn.assoc.send_c_store(path, msg_id=self._msg_id)
            else:
                status_ds = _send_file(conn.assoc, path, offset, context_id, sop, sop_uid, self._msg_id,
                                       self.timeout_s, self._touch)
        except _SendStalled as exc:
            self._abort_sync(conn)
            raise StoreUnavailable(f"C-STORE to {self._name} stalled: {exc}", label="timeout") from None
        except (OSError, ValueError) as exc:
            # A local file problem mid-send leaves a half-sent message: the association is unusable.
            # Sending the same file again would fail the same way, so it is not worth a retry.
            self._abort_sync(conn)
            raise StoreUnavailable(f"could not send {path.name}: {exc}", label="aborted",
                                   retryable=False) from exc
        code = status_ds.get("Status")
        if code is None:
            self._abort_sync(conn)
            dimse = float(conn.assoc.dimse_timeout or self.timeout_s)
            if time.monotonic() - started >= dimse * 0.9:
                raise StoreUnavailable(f"no C-STORE response from {self._name} within {dimse:g} s",
                                       label="timeout")
            raise StoreUnavailable(f"association with {self._name} lost during C-STORE", label="aborted")
        status = int(code)
        outcome = classify(status)
        detail = _detail(status, outcome, str(status_ds.get("ErrorComment", "") or ""))
        if outcome != "stored":
            log.warning("store_status", sop_instance_uid=sop_uid, status=f"0x{status:04X}", outcome=outcome)
        return StoreResult(sop_uid, status, outcome, detail)

    def _touch(self) -> None:
        self._progress = time.monotonic()

    def _release_sync(self, conn: _Conn) -> None:
        if conn.assoc.is_established:
            conn.assoc.release()
        if conn.assoc.is_established:
            conn.assoc.abort()

    def _abort_sync(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
        if conn.assoc.is_established:
            conn.assoc.abort()

    # loop side ------------------------------------------------------------------------------------

    async def _drop_conn(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None:
            await self._abort_assoc(conn.assoc)

    async def _abort_assoc(self, assoc: Association) -> None:
        """Abort from a thread of its own (the executor may be blocked in a send), then wake the
        sender waiting for a response, which pynetdicom does not do on abort (see qr._wake_pump)."""
        try:
            await asyncio.wait_for(asyncio.to_thread(assoc.abort), self.timeout_s + 1)
        except Exception as exc:
            log.warning("store_abort_failed", error=type(exc).__name__)
        finally:
            queue = getattr(getattr(assoc, "dimse", None), "msg_queue", None)
            if queue is not None:
                queue.put((None, None))


# -- the send path (pynetdicom 3.0 internals) -------------------------------------------------------


class _SendStalled(Exception):
    """The peer stopped reading: the socket was not writable within the timeout."""


class _PeerGone(Exception):
    """Writing to the association's socket failed: the connection is gone."""


def _check_pynetdicom() -> None:
    version = str(getattr(pynetdicom, "__version__", ""))
    if not version.startswith(SUPPORTED_PYNETDICOM):
        raise RuntimeError(f"duo_gateway.dicom.store_scu drives pynetdicom {SUPPORTED_PYNETDICOM}x "
                           f"internals, found {version}: re-verify _send_file against "
                           "Association.send_c_store")


def _dataset_offset(path: Path) -> int:
    """Where the dataset starts: from (0002,0000) when present (fast), else by parsing the meta."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) == 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        return 144 + int(struct.unpack("<I", head[140:144])[0])
    return int(split_dataset(path)[1])


def _send_file(assoc: Association, path: Path, offset: int | None, context_id: int, sop_class: str,
               sop_uid: str, msg_id: int, stall_s: float,
               progress: Callable[[], None] | None = None) -> Dataset:
    """``Association.send_c_store`` for a file, written straight to the association's socket.

    Mirrors pynetdicom 3.0.4's send_c_store (pause the association reactor so it does not take our
    response; wait for the C-STORE-RSP through the DIMSE provider) but writes the P-DATA-TF PDUs
    itself, from this thread, instead of queueing each one for the DUL thread. pynetdicom's DUL moves
    one PDU per reactor iteration and sleeps 1 ms whenever its queue runs dry, which capped a relay
    at ~100 instances/s; it also queues *all* PDUs of an instance up front (a 500 MB instance would
    sit in memory). Writing directly is safe because P-DATA does not change the DUL state machine
    (DT-2 stays in Sta6), the reactor is paused, and nothing else writes while we do: the DUL only
    writes what is queued to it (A-RELEASE/A-ABORT, which only come after this returns or when the
    association is being torn down anyway). It keeps reading the socket, so a peer's A-ABORT is seen.
    Memory: one PDU (the peer's max PDU length, at most 1 MiB) at a time.
    """
    if offset is None:
        offset = _dataset_offset(path)
    req = C_STORE()
    req.MessageID = msg_id
    req.Priority = 2
    req.AffectedSOPClassUID = sop_class
    req.AffectedSOPInstanceUID = sop_uid
    msg = C_STORE_RQ()
    msg.primitive_to_message(req)
    msg.command_set.CommandDataSetType = 0x0001
    msg._set_command_group_length()
    command = encode(msg.command_set, True, True)
    if command is None:
        raise ValueError("could not encode the C-STORE-RQ command set")
    pdu_max = int(assoc.dimse.maximum_pdu_size or 0)
    if pdu_max <= 0 or pdu_max > _MAX_SEND_PDU:
        pdu_max = _MAX_SEND_PDU
    fragment = pdu_max - 6  # PDV item: 4-byte length, context ID, control header, data
    sock = assoc.dul.socket.socket if assoc.dul.socket is not None else None
    if sock is None:
        return Dataset()
    assoc._reactor_checkpoint.clear()
    try:
        while not assoc._is_paused:
            if not assoc.is_established:
                return Dataset()
            time.sleep(0.0001)
        try:
            _write_fragments(sock, context_id, command, fragment, True, stall_s, progress)
            with open(path, "rb") as fh:
                length = fh.seek(0, os.SEEK_END) - offset
                fh.seek(offset)
                left = length
                while True:
                    data = fh.read(min(fragment, left))
                    if len(data) != min(fragment, left):
                        raise ValueError(f"{path} shrank while it was being sent")
                    left -= len(data)
                    _write_pdu(sock, context_id, 0x02 if left == 0 else 0x00, data, stall_s)
                    if progress is not None:
                        progress()
                    if left == 0:
                        break
        except _PeerGone as exc:
            # The peer went away mid-send (or we aborted); the DUL notices and ends the association.
            log.warning("store_send_failed", error=str(exc))
            return Dataset()
        # The DUL polls its socket and sleeps 1 ms when idle: poll faster while the response is due
        # (it is in a few ms), then go back to idling cheaply between instances.
        dul = assoc.dul
        idle_delay = dul._run_loop_delay
        dul._run_loop_delay = _RESPONSE_POLL_S
        try:
            _, rsp = assoc.dimse.get_msg(block=True)
        finally:
            dul._run_loop_delay = idle_delay
    finally:
        assoc._reactor_checkpoint.set()
    if rsp is None:
        assoc._handle_no_response()
        return Dataset()
    return assoc._check_received_status(rsp)


def _write_fragments(sock: socket.socket, context_id: int, data: bytes, fragment: int, command: bool,
                     stall_s: float, progress: Callable[[], None] | None) -> None:
    view = memoryview(data)
    for start in range(0, max(len(data), 1), fragment):
        last = start + fragment >= len(data)
        control = (0x01 if command else 0x00) | (0x02 if last else 0x00)
        _write_pdu(sock, context_id, control, view[start:start + fragment], stall_s)
        if progress is not None:
            progress()


def _write_pdu(sock: socket.socket, context_id: int, control: int, data: bytes | memoryview,
               stall_s: float) -> None:
    """One P-DATA-TF PDU with one PDV item (PS3.8 9.3.5): type 0x04, length, then the item."""
    size = len(data)
    header = struct.pack(">BBIIBB", 0x04, 0x00, size + 6, size + 2, context_id, control)
    try:
        _, writable, _ = select.select([], [sock], [], stall_s)
        if not writable:
            raise _SendStalled(f"peer read nothing for {stall_s:g} s")
        sock.sendall(header + bytes(data))
    except (OSError, ValueError) as exc:
        # reset, broken pipe, or the socket closed under us by an abort (EBADF / fileno -1)
        raise _PeerGone(f"{type(exc).__name__}: {exc}") from None
