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
- **Files are streamed, never decoded, on the event loop.** The association is DUO's own asyncio
  Upper Layer (:mod:`duo_gateway.dicom.ul`), plain TCP and TLS alike: the dataset goes from the file
  (at its offset after the file meta) into P-DATA-TF PDUs of the destination's maximum length, a
  block of PDUs per ``preadv`` and transport write, with the transport's flow control in between, so
  memory holds about one block whatever the instance size. pynetdicom's path cost a DUL thread that
  polls (1 ms sleeps), a thread hop per PDU and per response, and a separate, decoding path for TLS
  (docs/dicom.md §11, docs/performance.md "An asyncio DICOM data path").
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
  DUO reaches without sending anything carry ``local=True``. The conversion runs in a worker thread
  (the decoder in its helper process), off the loop; a decompression that outlasts the destination's
  idle timeout gets a new association for the converted copy.
- **Timeouts from the destination's ``timeout_s``**: connect, A-ASSOCIATE answer, a write the peer
  does not read, the C-STORE-RSP. Any of them, an abort or a cancellation aborts the association.
- **What counts as stored.** Only a Success or Warning status from the destination. 0xA7xx (out of
  resources) is ``transient`` (retry later); every other failure is ``refused`` (permanent for this
  instance). No association, a timeout or an abort raises :class:`StoreUnavailable` and the next
  store re-associates.

Parallelism (``DestinationPacs.max_associations`` > 1) is the caller's choice: run that many
StoreClients, each with its own association, and feed them from one queue. More threads per
association would not help (DIMSE without asynchronous operations is one message at a time).
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import ssl
import struct
import tempfile
import time
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Literal

import structlog
from pydicom.uid import UID
from pynetdicom.dsutils import split_dataset

from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.dicom.decode_worker import DecodeWorker
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
from duo_gateway.dicom.transcode import TranscodeError, transcode_uncompressed
from duo_gateway.dicom.ul.association import (
    DEFAULT_MAX_PDU,
    Association,
    Timeouts,
    UlError,
    UlRejected,
    UlTimeout,
    connect,
)
from duo_gateway.dicom.ul.dimse import c_store_rq
from duo_gateway.dicom.ul.pdu import PresentationContextRQ
from duo_gateway.failure import Failure, FailureKind
from duo_gateway.tls import client_context

log = structlog.get_logger(__name__)

StoreOutcome = Literal["stored", "warning", "refused", "transient"]



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
                 tls: ssl.SSLContext | None = None, max_pdu: int = DEFAULT_MAX_PDU) -> None:
        self.destination = destination
        self.calling_ae = calling_ae
        self.timeout_s = destination.timeout_s
        self.max_pdu = max_pdu
        self._tls = tls if tls is not None else (
            client_context(destination.tls) if destination.tls is not None else None)
        #: SOP class -> transfer syntaxes seen, most recently used class last.
        self._wanted: OrderedDict[str, list[str]] = OrderedDict()
        self._conn: _Conn | None = None
        self._lock = asyncio.Lock()
        #: Associations opened so far (re-associations included): for tests, logs and metrics.
        self.associations = 0
        #: Instances decompressed for this destination so far (every other one went out as stored).
        self.decompressed = 0
        #: The codecs' helper process, started on the first instance that needs decompressing.
        self._decoder: DecodeWorker | None = None

    async def __aenter__(self) -> StoreClient:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close(abort=exc is not None)

    async def close(self, *, abort: bool = False) -> None:
        """Release the association (abort it when ``abort``), and stop the decoder helper."""
        conn, self._conn = self._conn, None
        try:
            if conn is not None:
                if abort:
                    conn.assoc.abort()
                else:
                    await conn.assoc.release()
        finally:
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
        parsed again here beyond its file meta length. Cancelled mid-store, the association is
        aborted (the C-STORE may or may not have reached the PACS), so the next store starts clean.
        """
        async with self._lock:
            try:
                return await self._store(path, str(sop_class_uid), str(sop_instance_uid),
                                         str(transfer_syntax_uid))
            except BaseException:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.assoc.abort()
                raise

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

    async def _store(self, path: Path, sop: str, sop_uid: str, ts: str) -> StoreResult:
        key = (sop, ts)
        self._note(sop, ts)
        conn = self._conn
        if conn is not None and conn.assoc.closed:
            self._conn = conn = None
        if conn is None or (key not in conn.accepted and key not in conn.proposed):
            if conn is not None:
                log.info("store_reassociate", destination=self.destination.name, sop_class=sop,
                         transfer_syntax=ts)
                self._conn = None
                await conn.assoc.release()
            conn = await self._open(key)
            if conn is None:
                return StoreResult(sop_uid, SOP_CLASS_NOT_SUPPORTED, "refused",
                                   f"{self._name} accepts no presentation context for SOP class {sop} "
                                   f"({UID(ts).name}): association refused every proposed context",
                                   local=True)
            self._conn = conn
        cx = conn.accepted.get(key)
        if cx is not None:
            return await self._send(conn, path, cx, sop, sop_uid)
        return await self._convert_and_send(conn, path, sop, sop_uid, ts)

    async def _convert_and_send(self, conn: _Conn, path: Path, sop: str, sop_uid: str,
                                ts: str) -> StoreResult:
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
        tmp = await asyncio.to_thread(_temp_beside, path)
        try:
            started = time.monotonic()
            try:
                if kind == "uncompressed":
                    await asyncio.to_thread(transcode_uncompressed, path, tmp, UID(target))
                else:
                    if self._decoder is None:
                        self._decoder = DecodeWorker()
                    await asyncio.to_thread(self._decoder.decompress, path, tmp, target)
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
            if conn.assoc.closed:
                # A long decompression can outlast the destination's idle timeout: the converted copy
                # goes out on a new association instead of being decoded again on a retry.
                log.info("store_reassociate", destination=self.destination.name, sop_class=sop,
                         transfer_syntax=target)
                self._conn = None
                reopened = await self._open((sop, target))
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
            result = await self._send(conn, tmp, cx, sop, sop_uid)
            return dataclasses.replace(result, detail=f"{result.detail} (sent as {UID(target).name}, "
                                                      f"converted from {UID(ts).name})")
        finally:
            tmp.unlink(missing_ok=True)

    async def _open(self, must: tuple[str, str]) -> _Conn | None:
        """Associate; None when the destination accepted the association but none of its contexts."""
        pairs = self._contexts(must)
        contexts = [PresentationContextRQ(2 * i + 1, sop, (ts,)) for i, (sop, ts) in enumerate(pairs)]
        d = self.destination
        timeouts = Timeouts(connect_s=self.timeout_s, acse_s=self.timeout_s, dimse_s=self.timeout_s,
                            network_s=self.timeout_s)
        try:
            assoc = await connect(d.host, d.port, calling_ae=self.calling_ae, called_ae=d.ae_title,
                                  contexts=contexts, ssl_context=self._tls, max_pdu=self.max_pdu,
                                  send_pdu=self.max_pdu, timeouts=timeouts)
        except UlRejected:
            raise StoreUnavailable(f"association rejected by {self._name}", label="rejected") from None
        except UlError as exc:
            raise StoreUnavailable(f"no association with {self._name}: {exc}", label="connect") from None
        self.associations += 1
        accepted = {(cx.abstract_syntax, cx.transfer_syntax): cx.context_id for cx in assoc.accepted.values()}
        if not accepted:
            log.warning("store_no_context", destination=d.name, sop_class=must[0])
            await assoc.release()
            return None
        log.info("store_associated", destination=d.name, proposed=len(pairs), accepted=len(accepted),
                 peer_max_pdu=assoc.peer_max_pdu)
        return _Conn(assoc, frozenset(pairs), accepted)

    async def _send(self, conn: _Conn, path: Path, context_id: int, sop: str, sop_uid: str) -> StoreResult:
        assoc = conn.assoc
        command = c_store_rq(assoc.next_message_id(), sop, sop_uid)
        try:
            offset = _dataset_offset(path)
            rsp = await assoc.send_c_store_file(context_id, command, path, offset)
        except UlTimeout as exc:
            self._drop(conn)
            raise StoreUnavailable(f"C-STORE to {self._name}: {exc}", label="timeout") from None
        except UlError as exc:
            self._drop(conn)
            raise StoreUnavailable(f"association with {self._name} lost during C-STORE: {exc}",
                                   label="aborted") from None
        except (OSError, ValueError) as exc:
            # A local file problem mid-send leaves a half-sent message: the association is unusable.
            # Sending the same file again would fail the same way, so it is not worth a retry.
            self._drop(conn)
            raise StoreUnavailable(f"could not send {path.name}: {exc}", label="aborted",
                                   retryable=False) from exc
        if rsp.status is None:
            self._drop(conn)
            raise StoreUnavailable(f"C-STORE-RSP from {self._name} without a status", label="aborted")
        status = rsp.status
        outcome = classify(status)
        detail = _detail(status, outcome, rsp.error_comment or "")
        if outcome != "stored":
            log.warning("store_status", sop_instance_uid=sop_uid, status=f"0x{status:04X}", outcome=outcome)
        return StoreResult(sop_uid, status, outcome, detail)

    def _drop(self, conn: _Conn) -> None:
        if self._conn is conn:
            self._conn = None
        conn.assoc.abort()


def _temp_beside(path: Path) -> Path:
    fd, name = tempfile.mkstemp(dir=path.parent, prefix=".convert-", suffix=".dcm")
    os.close(fd)
    return Path(name)


def _dataset_offset(path: Path) -> int:
    """Where the dataset starts: from (0002,0000) when present (fast), else by parsing the meta."""
    with open(path, "rb") as fh:
        head = fh.read(144)
    if len(head) == 144 and head[128:132] == b"DICM" and head[132:138] == b"\x02\x00\x00\x00UL":
        return 144 + int(struct.unpack("<I", head[140:144])[0])
    return int(split_dataset(path)[1])
