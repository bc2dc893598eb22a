"""Where audit records go: an append-only file, a durable on-disk outbox, and syslog over TLS.

The file and outbox classes are blocking by design and are only ever called through
``asyncio.to_thread`` by the ``Auditor``: an fsync can take tens of milliseconds and must never stall
the event loop that serves transactions. ``SyslogSender`` is the one asyncio component.

Delivery to the repository is at-least-once. RFC 5425 has no acknowledgement, so a record leaves the
outbox only when (a) it was written and drained to the TLS socket, (b) the kernel reports every sent
byte acknowledged by the peer's TCP (Linux ``SIOCOUTQ``), and (c) the connection then stayed up for
``confirm_grace_s`` without the peer closing or resetting it. A peer that drops the connection with
records in flight gets those records again on the next connection, possibly as duplicates; none is
lost. What a repository loses after its TCP stack acknowledged and the grace period passed (it
crashed before storing) cannot be known without an application-level acknowledgement.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
import re
import ssl
import struct
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import structlog

from duo_gateway.audit.syslog import frame
from duo_gateway.config.audit import SyslogConfig
from duo_gateway.tls import client_context

log = structlog.get_logger(__name__)

#: Records read from the outbox and written to the socket per drain.
_SEND_BATCH = 64
#: How often to re-check an unacknowledged send queue while records wait for confirmation.
_ACK_POLL_S = 0.05


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        written = os.write(fd, view)
        view = view[written:]


def _fsync_dir(directory: Path) -> None:
    """Make a rename or a create inside ``directory`` survive a power loss."""
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


# --- local audit file ------------------------------------------------------------------------------


def encode_file_record(message: bytes) -> bytes:
    """One file record: the RFC 5425 frame of the syslog message, then a newline.

    The octet count makes every record recoverable byte for byte, whatever the XML contains (text
    content may hold newlines, so "one XML per line" would not be). The newline is only there so
    ``tail`` and ``less`` stay usable; the same bytes minus newlines can be replayed to a repository.
    """
    return frame(message) + b"\n"


@dataclass(frozen=True, slots=True)
class FileRecords:
    records: list[bytes]
    #: Spans that could not be parsed, e.g. a record torn by a crash mid-write.
    damaged: int


_RECORD_HEAD = re.compile(rb"([1-9][0-9]{0,9}) ")


def parse_file_records(data: bytes) -> FileRecords:
    """Read an audit file back; after a damaged span, resynchronise on the next line start."""
    records: list[bytes] = []
    damaged = 0
    i = 0
    while i < len(data):
        match = _RECORD_HEAD.match(data, i)
        if match is not None:
            end = match.end() + int(match.group(1))
            if data[end : end + 1] == b"\n":
                records.append(data[match.end() : end])
                i = end + 1
                continue
        damaged += 1
        newline = data.find(b"\n", i)
        if newline < 0:
            break
        i = newline + 1
    return FileRecords(records, damaged)


class FileSink:
    """The append-only local audit log (blocking; call through ``asyncio.to_thread``)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None
        # Serialises append and close: stop() may time out while an append still runs in a thread.
        self._lock = threading.Lock()

    def open(self) -> None:
        """Open for appending; a torn last record (crash mid-write) is closed off with a newline."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            if os.fstat(fd).st_size:
                with self.path.open("rb") as existing:
                    existing.seek(-1, os.SEEK_END)
                    torn = existing.read(1) != b"\n"
                if torn:
                    log.warning("audit_file_torn_tail_repaired", path=str(self.path))
                    _write_all(fd, b"\n")
                    os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        with self._lock:
            self._fd = fd

    def append(self, messages: Sequence[bytes]) -> None:
        """Append and fsync: once this returns, the records survive a crash or power loss."""
        data = b"".join(encode_file_record(m) for m in messages)
        with self._lock:
            if self._fd is None:
                raise OSError("audit file is not open")
            _write_all(self._fd, data)
            os.fsync(self._fd)

    def close(self) -> None:
        with self._lock:
            if self._fd is not None:
                os.close(self._fd)
                self._fd = None


# --- durable outbox --------------------------------------------------------------------------------


class DiskQueue:
    """The syslog outbox: one file per record, named by a zero-padded sequence number so that the
    directory listing is the send order, also after a restart (blocking; call through a thread)."""

    SUFFIX = ".rec"
    _NAME = re.compile(r"^[0-9]{20}\.rec$")

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._next_seq = 0

    def open(self) -> list[Path]:
        """Prepare the directory and return the records a previous run left unsent, oldest first.

        A ``.tmp`` file is a write that never completed its rename; its record was never reported
        stored, so it is removed rather than sent half-written.
        """
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
        for leftover in self.directory.glob("*.tmp"):
            leftover.unlink(missing_ok=True)
        pending = sorted(p for p in self.directory.iterdir() if self._NAME.match(p.name))
        self._next_seq = int(pending[-1].stem) + 1 if pending else 0
        return pending

    def put(self, payload: bytes) -> Path:
        """Write one record atomically (temp file, fsync, rename); call ``sync`` after a batch."""
        final = self.directory / f"{self._next_seq:020d}{self.SUFFIX}"
        self._next_seq += 1
        tmp = final.with_suffix(".tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            _write_all(fd, payload)
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, final)
        return final

    def sync(self) -> None:
        """Persist the renames of the batch just written (one directory fsync per batch)."""
        _fsync_dir(self.directory)

    @staticmethod
    def read_many(paths: Sequence[Path]) -> list[bytes | None]:
        """``None`` for a record that vanished (removed by an operator): it is skipped, not fatal."""
        out: list[bytes | None] = []
        for path in paths:
            try:
                out.append(path.read_bytes())
            except FileNotFoundError:
                out.append(None)
        return out

    @staticmethod
    def delete_many(paths: Iterable[Path]) -> None:
        for path in paths:
            path.unlink(missing_ok=True)


# --- syslog over TLS -------------------------------------------------------------------------------


def _unacked_bytes(writer: asyncio.StreamWriter) -> int:
    """Bytes in the kernel send queue not yet acknowledged by the peer (Linux ``SIOCOUTQ``).

    Elsewhere this reports 0 and confirmation rests on the grace period alone.
    """
    sock = writer.get_extra_info("socket")
    if sock is None or sys.platform != "linux":
        return 0
    import fcntl
    import termios

    try:
        raw = fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0")
    except OSError:
        return 0
    return int(struct.unpack("i", raw)[0])


def describe_error(exc: BaseException) -> str:
    """An error for health and logs: type and text, never record content (exceptions carry none)."""
    text = str(exc) or exc.__class__.__name__
    return f"{exc.__class__.__name__}: {text}"


class SyslogSender:
    """Sends the outbox to the Audit Record Repository in order, reconnecting with backoff.

    ``enqueue`` is called with records already durable in the outbox; the sender removes a file only
    once the record is confirmed (see the module docstring).
    """

    def __init__(self, cfg: SyslogConfig) -> None:
        self._cfg = cfg
        self._ssl: ssl.SSLContext | None = client_context(cfg.tls) if cfg.tls is not None else None
        self._pending: deque[Path] = deque()
        self._wake = asyncio.Event()
        self._halt = asyncio.Event()
        self.connected = False
        self.sent = 0
        self.frames_written = 0
        self.last_error: str | None = None

    @property
    def queued(self) -> int:
        """Records in the outbox not yet confirmed, in flight ones included."""
        return len(self._pending)

    def enqueue(self, paths: Iterable[Path]) -> None:
        self._pending.extend(paths)
        self._wake.set()

    def request_drain(self) -> None:
        """Finish: send and confirm what is queued if the peer is reachable, then return from ``run``."""
        self._halt.set()
        self._wake.set()

    def _error(self, exc: BaseException | str, during: str) -> None:
        self.last_error = exc if isinstance(exc, str) else describe_error(exc)
        log.warning("audit_syslog_error", during=during, error=self.last_error, queued=self.queued,
                    host=self._cfg.host, port=self._cfg.port)

    async def _wait(self, event: asyncio.Event, seconds: float | None) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await event.wait()

    async def run(self) -> None:
        delay = self._cfg.reconnect_initial_s
        while True:
            if not self._pending:
                if self._halt.is_set():
                    return
                await self._wait(self._wake, None)
                self._wake.clear()
                continue
            try:
                async with asyncio.timeout(self._cfg.connect_timeout_s):
                    reader, writer = await asyncio.open_connection(
                        self._cfg.host, self._cfg.port, ssl=self._ssl,
                        ssl_handshake_timeout=self._cfg.connect_timeout_s if self._ssl else None)
            except (OSError, TimeoutError) as exc:
                self._error(exc, "connect")
                if self._halt.is_set():
                    return
                # Only a stop request cuts the backoff short: new records must not trigger a storm.
                await self._wait(self._halt, delay)
                delay = min(delay * 2, self._cfg.reconnect_max_s)
                continue
            log.info("audit_syslog_connected", host=self._cfg.host, port=self._cfg.port, queued=self.queued)
            confirmed = await self._session(reader, writer)
            # Stopping: a peer that took nothing on this connection will not on the next one either.
            if self._halt.is_set() and (not self._pending or not confirmed):
                return
            if confirmed:
                delay = self._cfg.reconnect_initial_s
            elif self._pending:
                await self._wait(self._halt, delay)
                delay = min(delay * 2, self._cfg.reconnect_max_s)

    async def _watch(self, reader: asyncio.StreamReader, broken: asyncio.Event) -> None:
        """Notice the peer going away promptly: a repository never sends, so EOF or an error is it."""
        try:
            while await reader.read(4096):
                pass
            self._error("peer closed the connection", "receive")
        except (OSError, EOFError) as exc:
            self._error(exc, "receive")
        broken.set()
        self._wake.set()

    async def _session(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> int:
        """Send and confirm over one connection; returns how many records it confirmed."""
        self.connected = True
        broken = asyncio.Event()
        watcher = asyncio.create_task(self._watch(reader, broken))
        # Send times (monotonic) of the records in flight, i.e. of self._pending[0:len(inflight)].
        inflight: deque[float] = deque()
        confirmed = 0
        try:
            while not broken.is_set():
                if len(inflight) < len(self._pending):
                    batch = list(itertools.islice(self._pending, len(inflight), len(inflight) + _SEND_BATCH))
                    payloads = await asyncio.to_thread(DiskQueue.read_many, batch)
                    for payload in payloads:
                        if payload is not None:
                            writer.write(frame(payload))
                    async with asyncio.timeout(self._cfg.send_timeout_s):
                        await writer.drain()
                    inflight.extend(itertools.repeat(time.monotonic(), len(batch)))
                    self.frames_written += sum(p is not None for p in payloads)
                confirmed += await self._confirm(writer, inflight, broken)
                overdue = self._cfg.confirm_grace_s + self._cfg.send_timeout_s
                if inflight and time.monotonic() - inflight[0] > overdue:
                    raise TimeoutError("repository did not acknowledge within send_timeout_s")
                if len(inflight) < len(self._pending):
                    continue
                if not self._pending and self._halt.is_set():
                    break
                timeout: float | None = None
                if inflight:
                    timeout = max(inflight[0] + self._cfg.confirm_grace_s - time.monotonic(), _ACK_POLL_S)
                await self._wait(self._wake, timeout)
                self._wake.clear()
        except (OSError, RuntimeError) as exc:
            # OSError includes TimeoutError; RuntimeError: asyncio refuses to write to a closing transport.
            self._error(exc, "send")
        finally:
            self.connected = False
            watcher.cancel()
            await self._close(writer)
        return confirmed

    async def _confirm(self, writer: asyncio.StreamWriter, inflight: deque[float],
                       broken: asyncio.Event) -> int:
        """Remove from the outbox the in-flight records that count as delivered."""
        horizon = time.monotonic() - self._cfg.confirm_grace_s
        due = 0
        for sent_at in inflight:
            if sent_at > horizon:
                break
            due += 1
        if not due or broken.is_set():
            return 0
        if writer.transport.get_write_buffer_size() or _unacked_bytes(writer):
            return 0
        done = [self._pending.popleft() for _ in range(due)]
        for _ in range(due):
            inflight.popleft()
        self.sent += due
        try:
            await asyncio.to_thread(DiskQueue.delete_many, done)
        except OSError as exc:
            # The records were delivered; left on disk they are only re-sent after a restart.
            self._error(exc, "delete")
        return due

    @staticmethod
    async def _close(writer: asyncio.StreamWriter) -> None:
        writer.close()
        try:
            async with asyncio.timeout(1.0):
                await writer.wait_closed()
        except (OSError, TimeoutError):
            writer.transport.abort()
