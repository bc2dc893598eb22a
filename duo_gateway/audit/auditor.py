"""The ``Auditor``: the one object every transaction hands its ATNA audit record to.

Auditing must never cost a transaction its latency or its success, so ``record()`` only puts the
message on an in-memory queue and returns; serialization, the file append, the fsyncs and the outbox
writes all happen in a worker thread, and the network in a background task. A record is durable once
that worker has written it (at most ``linger_s``, 0.1 s by default, plus the write later); ``stop()``
flushes the memory queue first, without lingering.

Why linger: a timeline asking 50 communities records 50 ITI-38 disclosures within a few tens of
milliseconds. Written as they come, that is several batches, each a thread hand-off and two fsyncs,
and their serialization (Python, holding the GIL) competes with the event loop that is still
decoding the other communities' answers. Coalesced, it is one batch after the burst. A full batch is
never held back, so lingering does not limit throughput.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import threading
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import structlog

from duo_gateway.audit.messages import AuditMessage, AuditSourceIdentification, to_xml
from duo_gateway.audit.sink import DiskQueue, FileSink, SyslogSender, describe_error
from duo_gateway.audit.syslog import format_message
from duo_gateway.config.audit import DEFAULT_APP_NAME, AuditConfig

log = structlog.get_logger(__name__)

_Item = tuple[AuditMessage, datetime]
#: Records serialized and written per worker-thread round trip (one fsync each for file and outbox).
_WRITE_BATCH = 256


class Auditor:
    """Durable, non-blocking audit trail: ``record()`` from anywhere, ``start()``/``stop()`` by the daemon.

    Relative paths in ``config`` are resolved against ``storage_dir``. ``max_pending`` bounds the
    in-memory queue for when the disk stalls: beyond it records are dropped and counted, because the
    alternative, blocking transactions, is worse; ``health()`` makes any drop visible.
    """

    def __init__(self, config: AuditConfig, *, storage_dir: Path, max_pending: int = 10_000,
                 hostname: str | None = None, linger_s: float = 0.1) -> None:
        self.config = config
        self.audit_source = AuditSourceIdentification(source_id=config.source_id,
                                                      enterprise_site_id=config.enterprise_site_id)
        self._hostname = hostname if hostname is not None else socket.gethostname()
        self._procid = os.getpid()
        self._app_name = config.syslog.app_name if config.syslog is not None else DEFAULT_APP_NAME
        self._file = FileSink(self._resolve(storage_dir, config.file)) if config.file is not None else None
        self._outbox: DiskQueue | None = None
        self._sender: SyslogSender | None = None
        if config.syslog is not None:
            self._outbox = DiskQueue(self._resolve(storage_dir, config.syslog.queue_dir))
            self._sender = SyslogSender(config.syslog)
        self._max_pending = max_pending
        self._linger_s = linger_s
        #: Set by stop(): whatever is queued is written now, not after the linger.
        self._flush_now = asyncio.Event()
        #: Set when a full batch is waiting: the worker's current linger ends at once.
        self._batch_full = asyncio.Event()
        self._queue: asyncio.Queue[_Item | None] = asyncio.Queue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._accepting = True
        self._intake_task: asyncio.Task[None] | None = None
        self._sender_task: asyncio.Task[None] | None = None
        # Counters; the worker thread writes some of them, health() only reads.
        self._counts_lock = threading.Lock()
        self.dropped = 0
        self.rejected = 0
        self.file_written = 0
        self.file_failed = 0
        self.outbox_failed = 0
        self.last_error: str | None = None

    @staticmethod
    def _resolve(base: Path, path: Path) -> Path:
        return path if path.is_absolute() else base / path

    # --- the transaction-facing side ----------------------------------------------------------------

    def record(self, message: AuditMessage) -> None:
        """Queue ``message`` for the audit trail. Never blocks, never raises; callable from any thread
        (pynetdicom runs its handlers in threads)."""
        try:
            item = (message, datetime.now(UTC))
            loop = self._loop
            if loop is not None:
                try:
                    running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    running = None
                if running is not loop:
                    loop.call_soon_threadsafe(self._enqueue, item)
                    return
            self._enqueue(item)
        except Exception as exc:
            # e.g. the loop is already closed at interpreter shutdown.
            self._count_drop(exc.__class__.__name__)

    def _enqueue(self, item: _Item) -> None:
        if not self._accepting:
            self._count_drop("auditor stopped")
        elif self._queue.qsize() >= self._max_pending:
            self._count_drop("memory queue full")
        else:
            self._queue.put_nowait(item)
            if self._queue.qsize() >= _WRITE_BATCH - 1:
                # With the one the worker holds, a full batch: it stops lingering and writes now.
                self._batch_full.set()

    def _count_drop(self, reason: str) -> None:
        with self._counts_lock:
            self.dropped += 1
            self.last_error = f"record dropped: {reason}"
        log.error("audit_record_dropped", reason=reason)

    # --- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the sinks (raising if that fails: a gateway that cannot audit must not run) and start
        the workers; records left in the outbox by a previous run are sent before new ones."""
        self._loop = asyncio.get_running_loop()
        self._flush_now.clear()
        if self._file is not None:
            await asyncio.to_thread(self._file.open)
        if self._outbox is not None and self._sender is not None:
            leftovers = await asyncio.to_thread(self._outbox.open)
            if leftovers:
                log.info("audit_outbox_resumed", queued=len(leftovers))
            self._sender.enqueue(leftovers)
            self._sender_task = asyncio.create_task(self._sender.run(), name="audit-syslog")
        if self._file is None and self._sender is None:
            log.warning("audit_trail_disabled", reason="neither file nor syslog configured")
        self._intake_task = asyncio.create_task(self._intake(), name="audit-intake")

    # One budget shared by two phases (disk, then repository): a caller's asyncio.timeout cannot split it.
    async def stop(self, timeout: float = 5.0) -> None:  # noqa: ASYNC109
        """Write every queued record to disk, give the repository until ``timeout`` to take the
        outbox, and leave the rest there for the next start."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        self._accepting = False
        self._flush_now.set()
        self._batch_full.set()
        if self._intake_task is not None:
            self._queue.put_nowait(None)
            await self._finish(self._intake_task, deadline)
            if self._intake_task.cancelled():
                for _ in range(self._queue.qsize()):
                    self._count_drop("stop timed out before the record reached disk")
        if self._sender is not None and self._sender_task is not None:
            self._sender.request_drain()
            await self._finish(self._sender_task, deadline)
            if self._sender.queued:
                log.info("audit_outbox_left_for_next_start", queued=self._sender.queued)
        if self._file is not None:
            await asyncio.to_thread(self._file.close)
        self._intake_task = self._sender_task = None

    @staticmethod
    async def _finish(task: asyncio.Task[None], deadline: float) -> None:
        remaining = max(deadline - asyncio.get_running_loop().time(), 0.0)
        try:
            async with asyncio.timeout(remaining):
                await asyncio.shield(task)
        except TimeoutError:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        except Exception as exc:
            log.error("audit_worker_failed", error=exc.__class__.__name__)

    def health(self) -> dict[str, object]:
        """For /readyz. ``ok`` is false once a record was lost (dropped, unserializable, or not
        written); an unreachable repository alone is not a loss, the outbox holds the records."""
        with self._counts_lock:
            losses = self.dropped + self.rejected + self.file_failed + self.outbox_failed
            status: dict[str, object] = {
                "ok": self._intake_task is not None and not self._intake_task.done() and losses == 0,
                "pending_in_memory": self._queue.qsize(),
                "dropped": self.dropped,
                "rejected": self.rejected,
                "file_written": self.file_written,
                "file_failed": self.file_failed,
                "outbox_failed": self.outbox_failed,
                "last_error": self.last_error,
            }
        if self._sender is not None:
            status.update(
                syslog_connected=self._sender.connected,
                syslog_queued=self._sender.queued,
                syslog_sent=self._sender.sent,
                syslog_frames_written=self._sender.frames_written,
                syslog_last_error=self._sender.last_error,
            )
        return status

    # --- the worker side ---------------------------------------------------------------------------

    async def _intake(self) -> None:
        while True:
            first = await self._queue.get()
            if first is not None and self._linger_s > 0 and self._queue.qsize() < _WRITE_BATCH - 1:
                if not self._flush_now.is_set():
                    self._batch_full.clear()
                with contextlib.suppress(TimeoutError):
                    # stop() sets this too (and _flush_now), so a stop never waits for a linger.
                    await asyncio.wait_for(self._batch_full.wait(), self._linger_s)
            items: list[_Item] = []
            stop = first is None
            if first is not None:
                items.append(first)
            while not stop and len(items) < _WRITE_BATCH and not self._queue.empty():
                nxt = self._queue.get_nowait()
                if nxt is None:
                    stop = True
                else:
                    items.append(nxt)
            if items:
                paths = await asyncio.to_thread(self._persist, items)
                if self._sender is not None and paths:
                    self._sender.enqueue(paths)
            if stop:
                return

    def _persist(self, items: Sequence[_Item]) -> list[Path]:
        """Worker thread: serialize, append to the file, write the outbox. Each sink fails alone."""
        messages: list[bytes] = []
        for message, when in items:
            try:
                messages.append(format_message(to_xml(message), timestamp=when, hostname=self._hostname,
                                               app_name=self._app_name, procid=self._procid))
            except Exception as exc:
                # Only the type: the text of a serialization error may quote record content.
                self._count_loss("rejected", 1, exc.__class__.__name__, "serialize")
        if self._file is not None and messages:
            try:
                self._file.append(messages)
                with self._counts_lock:
                    self.file_written += len(messages)
            except OSError as exc:
                self._count_loss("file_failed", len(messages), describe_error(exc), "file")
        paths: list[Path] = []
        if self._outbox is not None and messages:
            for i, payload in enumerate(messages):
                try:
                    paths.append(self._outbox.put(payload))
                except OSError as exc:
                    self._count_loss("outbox_failed", len(messages) - i, describe_error(exc), "outbox")
                    break
            try:
                self._outbox.sync()
            except OSError as exc:
                # The records are written; only their survival of a power loss is in doubt.
                log.error("audit_outbox_sync_failed", error=exc.__class__.__name__)
        return paths

    def _count_loss(self, counter: str, n: int, error: str, sink: str) -> None:
        with self._counts_lock:
            setattr(self, counter, getattr(self, counter) + n)
            self.last_error = f"{sink}: {error}"
        log.error("audit_sink_failed", sink=sink, records=n, error=error)
