"""The two database backends of the transfer store, reduced to what differs between them.

The store's queries are written once, in a neutral SQL with ``?`` placeholders; a backend only
supplies a transaction, its clock and the few clauses SQLite and PostgreSQL spell differently. Keeping
the difference this small is what lets one set of tests vouch for both.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

#: Bumped by appending to ``_MIGRATIONS``; never edit an applied step.
SCHEMA_VERSION: Final = 2


@dataclass(frozen=True)
class Dialect:
    name: str
    #: Row lock for a writer: everything touching one job first takes this lock on the job row, so
    #: the fence check and the write it guards can never interleave with a claim by another replica.
    lock_for_update: str
    #: A claim passes over rows another replica is claiming right now instead of queueing behind it.
    lock_skip_locked: str
    #: First statement of a read transaction, so the job and its derived counts are one snapshot.
    begin_read: str | None
    #: The one column type that differs: an ever-increasing key that orders jobs by arrival.
    serial_pk: str

    def convert(self, sql: str) -> str:
        return sql.replace("?", "%s") if self.name == "postgresql" else sql


SQLITE: Final = Dialect(
    name="sqlite",
    lock_for_update="",  # BEGIN IMMEDIATE already made this transaction the only writer
    lock_skip_locked="",
    begin_read=None,  # a WAL read transaction is already a snapshot
    serial_pk="INTEGER PRIMARY KEY AUTOINCREMENT",
)
POSTGRESQL: Final = Dialect(
    name="postgresql",
    lock_for_update=" FOR UPDATE",
    lock_skip_locked=" FOR UPDATE SKIP LOCKED",
    begin_read="SET TRANSACTION ISOLATION LEVEL REPEATABLE READ, READ ONLY",
    serial_pk="BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY",
)


# Times are seconds since the epoch (DOUBLE PRECISION) in both databases: the same arithmetic and
# comparisons everywhere, and no timezone conversions that SQLite would not do for us. Flags are
# INTEGER 0/1 for the same reason. Study and instance counts are not stored: they are derived from
# the instance rows, so they can never disagree with them.
_MIGRATIONS: Final[tuple[tuple[str, ...], ...]] = (
    (
        """CREATE TABLE transfer_jobs (
            seq {serial_pk},
            id TEXT NOT NULL UNIQUE,
            state TEXT NOT NULL,
            created_at DOUBLE PRECISION NOT NULL,
            updated_at DOUBLE PRECISION NOT NULL,
            finished_at DOUBLE PRECISION,
            requester TEXT NOT NULL,
            destination TEXT NOT NULL,
            local_patient_id TEXT,
            errors TEXT NOT NULL,
            cancel_requested INTEGER NOT NULL DEFAULT 0,
            owner TEXT,
            lease_expires_at DOUBLE PRECISION,
            revision BIGINT NOT NULL
        )""",
        "CREATE INDEX transfer_jobs_state_seq ON transfer_jobs (state, seq)",
        """CREATE TABLE transfer_studies (
            job_id TEXT NOT NULL REFERENCES transfer_jobs (id) ON DELETE CASCADE,
            idx INTEGER NOT NULL,
            study_id TEXT NOT NULL,
            state TEXT NOT NULL,
            instances_expected INTEGER,
            detail TEXT,
            PRIMARY KEY (job_id, idx)
        )""",
        """CREATE TABLE transfer_instances (
            job_id TEXT NOT NULL,
            study_idx INTEGER NOT NULL,
            sop_instance_uid TEXT NOT NULL,
            series_instance_uid TEXT NOT NULL,
            sop_class_uid TEXT NOT NULL,
            state TEXT NOT NULL,
            attempts INTEGER NOT NULL DEFAULT 0,
            bytes BIGINT NOT NULL DEFAULT 0,
            error TEXT,
            PRIMARY KEY (job_id, study_idx, sop_instance_uid),
            FOREIGN KEY (job_id, study_idx) REFERENCES transfer_studies (job_id, idx) ON DELETE CASCADE
        )""",
    ),
    # 2: a job belongs to the calling system (its configured client name) and the URA it spoke for;
    # only that client sees, watches or cancels it. Jobs from before have no owner: nobody's.
    (
        "ALTER TABLE transfer_jobs ADD COLUMN client TEXT",
        "ALTER TABLE transfer_jobs ADD COLUMN client_ura TEXT",
        "CREATE INDEX transfer_jobs_client_seq ON transfer_jobs (client, seq)",
    ),
)


class SchemaTooNew(RuntimeError):
    """The database was upgraded by a newer DUO; writing with an older schema could corrupt it."""


class Tx:
    """One open transaction: neutral SQL in, plain tuples out."""

    def __init__(self, cursor: Any, dialect: Dialect, clock: Callable[[Tx], float]) -> None:
        self._cur = cursor
        self.dialect = dialect
        self._clock = clock
        self._now: float | None = None

    @property
    def now(self) -> float:
        """One instant per transaction, so every timestamp written together is equal."""
        if self._now is None:
            self._now = float(self._clock(self))
        return self._now

    def run(self, sql: str, params: Sequence[Any] = ()) -> int:
        self._cur.execute(self.dialect.convert(sql), tuple(params))
        return int(self._cur.rowcount)

    def many(self, sql: str, rows: Sequence[Sequence[Any]]) -> None:
        if rows:
            self._cur.executemany(self.dialect.convert(sql), [tuple(r) for r in rows])

    def rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        self._cur.execute(self.dialect.convert(sql), tuple(params))
        return [tuple(r) for r in self._cur.fetchall()]

    def one(self, sql: str, params: Sequence[Any] = ()) -> tuple[Any, ...] | None:
        self._cur.execute(self.dialect.convert(sql), tuple(params))
        row = self._cur.fetchone()
        return None if row is None else tuple(row)


class Backend(ABC):
    """Blocking connections; the store calls it from worker threads, never on the event loop."""

    dialect: Dialect

    @abstractmethod
    def open(self) -> None: ...

    @abstractmethod
    def close(self) -> None: ...

    @abstractmethod
    def transaction(self, *, write: bool) -> contextlib.AbstractContextManager[Tx]: ...

    @abstractmethod
    def _schema_lock(self, tx: Tx) -> None:
        """Serialise schema upgrades between replicas starting at the same moment."""

    def migrate(self) -> None:
        with self.transaction(write=True) as tx:
            self._schema_lock(tx)
            tx.run("CREATE TABLE IF NOT EXISTS transfer_schema_version (version INTEGER NOT NULL)")
            row = tx.one("SELECT MAX(version) FROM transfer_schema_version")
            current = int(row[0]) if row and row[0] is not None else 0
            if current > SCHEMA_VERSION:
                raise SchemaTooNew(
                    f"transfer store schema is version {current}, this DUO knows up to {SCHEMA_VERSION}")
            for version in range(current + 1, SCHEMA_VERSION + 1):
                for statement in _MIGRATIONS[version - 1]:
                    tx.run(statement.format(serial_pk=self.dialect.serial_pk))
                tx.run("INSERT INTO transfer_schema_version (version) VALUES (?)", (version,))


class SqliteBackend(Backend):
    """One connection behind a lock: SQLite has a single writer anyway, and one connection keeps
    the WAL checkpointing and busy handling simple. Other processes on the same file (a second DUO
    on one host, or the tests' second "replica") are serialised by BEGIN IMMEDIATE + busy_timeout."""

    dialect = SQLITE

    def __init__(self, path: Path, *, busy_timeout_ms: int = 10_000) -> None:
        self.path = path
        self._busy_timeout_ms = busy_timeout_ms
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()

    def open(self) -> None:
        if self._conn is not None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # Jobs name patients and requesters: owner-only, like the spool. SQLite gives the -wal and
        # -shm files the database file's mode, so creating the file first is enough.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False,
                               timeout=self._busy_timeout_ms / 1000)
        conn.execute(f"PRAGMA busy_timeout = {int(self._busy_timeout_ms)}")
        conn.execute("PRAGMA journal_mode = WAL")
        # WAL + NORMAL: a power loss may drop the last commits but never corrupts the file; a job
        # that loses its last "stored" marks merely re-sends those instances on resume.
        conn.execute("PRAGMA synchronous = NORMAL")
        conn.execute("PRAGMA foreign_keys = ON")
        self._conn = conn

    def close(self) -> None:
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        with self._lock:
            conn = self._conn
            if conn is None:
                raise RuntimeError("transfer store is not started")
            # IMMEDIATE takes the write lock up front: a deferred transaction that upgrades to a
            # writer later fails at once with SQLITE_BUSY instead of waiting its turn.
            conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield Tx(conn.cursor(), self.dialect, lambda _tx: time.time())
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            try:
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) leaves the shared connection inside the
                # transaction: end it, or every later BEGIN fails and the store stays broken.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

    def _schema_lock(self, tx: Tx) -> None:
        """BEGIN IMMEDIATE is the lock."""


class PostgresBackend(Backend):
    """A few blocking psycopg connections handed to worker threads; the clock is the server's, so
    replicas with skewed clocks still agree on when a lease lapses."""

    dialect = POSTGRESQL
    _SCHEMA_LOCK_KEY: Final = 0x6475_6F74  # "duot": pg_advisory_xact_lock key for migrations

    def __init__(self, url: str, *, pool_size: int = 4, connect_timeout_s: float = 10.0,
                 check_idle_s: float = 30.0) -> None:
        self._url = url
        self._connect_timeout_s = connect_timeout_s
        self._check_idle_s = check_idle_s
        #: (connection, when it was last returned): most recently used last.
        self._idle: list[tuple[Any, float]] = []
        self._slots = threading.BoundedSemaphore(pool_size)
        self._lock = threading.Lock()
        self._closed = True

    def open(self) -> None:
        self._closed = False
        # Fail at start, with the server's own message, rather than on the first job.
        with self.transaction(write=False) as tx:
            tx.one("SELECT 1")

    def close(self) -> None:
        with self._lock:
            self._closed = True
            idle, self._idle = self._idle, []
        for conn, _ in idle:
            conn.close()

    def _connect(self) -> Any:
        import psycopg  # only a PostgreSQL deployment needs the driver loaded

        return psycopg.connect(self._url, autocommit=True, application_name="duo-gateway",
                               connect_timeout=max(1, int(self._connect_timeout_s)))

    @contextlib.contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        if self._closed:
            raise RuntimeError("transfer store is not started")
        self._slots.acquire()
        conn: Any = None
        try:
            with self._lock:
                conn, since = self._idle.pop() if self._idle else (None, 0.0)
            if conn is not None and time.monotonic() - since >= self._check_idle_s and not _alive(conn):
                # The server restarted or a proxy dropped the idle connection: better a fresh one now
                # than a failed job step. Checked outside any transaction, so nothing can be lost.
                conn.close()
                conn = None
            if conn is None:
                conn = self._connect()
            with conn.transaction(), conn.cursor() as cur:
                if not write and self.dialect.begin_read:
                    cur.execute(self.dialect.begin_read)
                yield Tx(cur, self.dialect, _server_clock)
        finally:
            if conn is not None:
                reusable = not (conn.closed or conn.broken)
                with self._lock:
                    if reusable and not self._closed:
                        self._idle.append((conn, time.monotonic()))
                        conn = None
                if conn is not None:
                    conn.close()
            self._slots.release()

    def _schema_lock(self, tx: Tx) -> None:
        # CREATE TABLE IF NOT EXISTS is not safe against a concurrent CREATE in PostgreSQL.
        tx.one("SELECT pg_advisory_xact_lock(?)", (self._SCHEMA_LOCK_KEY,))


def _alive(conn: Any) -> bool:
    import psycopg

    try:
        conn.execute("SELECT 1")
    except psycopg.Error:
        return False
    return True


def _server_clock(tx: Tx) -> float:
    row = tx.one("SELECT CAST(EXTRACT(EPOCH FROM clock_timestamp()) AS DOUBLE PRECISION)")
    assert row is not None
    return float(row[0])
