"""Durable transfer jobs: what was asked, who works on it, and which instances already arrived.

A transfer can take hours and must survive a crash of the DUO working on it, so every fact a worker
learns is written down before it moves on, and a job belongs to a worker only for a lease it keeps
renewing. When the lease lapses, another replica (or the restarted one) claims the job and resumes
it from the instance rows: only what is not ``stored`` is fetched again.

Ownership is fenced rather than trusted: every write that names an ``owner`` checks, in the same
transaction and under the job's row lock, that this owner still holds the job. A worker that was
paused past its lease and then woke up therefore gets :class:`LeaseLost` instead of overwriting the
progress of the replica that took over. Fencing compares ownership, not clocks: an owner whose lease
ran out keeps the job until somebody else actually claims it, since claim and fence take the same
lock and cannot interleave.

One data-access layer serves SQLite (one DUO, the default) and PostgreSQL (replicas sharing work,
``FOR UPDATE SKIP LOCKED``); see :mod:`duo_gateway.transfer.sql` for the little that differs.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Final, Literal, TypeVar, cast, get_args

from pydantic import SecretStr

from duo_gateway.transfer.sql import Backend, PostgresBackend, SqliteBackend, Tx

JobState = Literal["queued", "running", "completed", "partial", "failed", "cancelled"]
TERMINAL_STATES: Final[frozenset[str]] = frozenset({"completed", "partial", "failed", "cancelled"})
StudyState = Literal["pending", "running", "completed", "partial", "failed", "cancelled"]
InstanceState = Literal["pending", "stored", "failed"]

_STUDY_STATES: Final = frozenset(get_args(StudyState))
_INSTANCE_STATES: Final = frozenset(get_args(InstanceState))
#: Studies a job's end leaves open; a cancelled job closes them so nothing looks like it is pending.
_OPEN_STUDY_STATES: Final = ("pending", "running")

SQLITE_FILENAME: Final = "transfers.sqlite"

T = TypeVar("T")


class LeaseLost(Exception):
    """A write by an owner whose claim lapsed or was taken over (fencing)."""


@dataclass(frozen=True)
class NewJob:
    requester: dict[str, Any]
    destination: dict[str, Any]
    studies: tuple[str, ...]
    local_patient_id: str | None = None
    #: The configured client that submitted the job and the URA it spoke for: the job's owners.
    client: str | None = None
    client_ura: str | None = None


@dataclass(frozen=True)
class ExpectedInstance:
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str


@dataclass(frozen=True)
class InstanceRow:
    study_index: int
    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    state: InstanceState
    attempts: int
    bytes: int
    error: str | None


@dataclass(frozen=True)
class StudyProgress:
    index: int
    study_id: str
    state: StudyState
    #: None until the manifest / C-FIND is known; afterwards every instance ever listed for the study.
    instances_expected: int | None
    instances_stored: int
    instances_failed: int
    bytes: int
    detail: str | None


@dataclass(frozen=True)
class Job:
    id: str
    state: JobState
    created_at: datetime
    updated_at: datetime
    requester: dict[str, Any]
    destination: dict[str, Any]
    local_patient_id: str | None
    studies: tuple[StudyProgress, ...]
    errors: tuple[str, ...]
    cancel_requested: bool
    owner: str | None
    lease_expires_at: datetime | None
    #: +1 on every change to the job, its studies or its instances (lease renewals included), so one
    #: revision always names one snapshot: pollers compare it instead of the whole job.
    revision: int
    finished_at: datetime | None = None
    client: str | None = None
    client_ura: str | None = None

    def belongs_to(self, client: str) -> bool:
        """Whether ``client`` submitted this job; a job without a recorded client is nobody's."""
        return self.client is not None and self.client == client

    @property
    def terminal(self) -> bool:
        return self.state in TERMINAL_STATES

    @property
    def instances_expected(self) -> int | None:
        """The total a progress bar can honestly show: None while a study that is still to be
        worked on has no manifest yet; a study that ended without one (failed, cancelled) adds 0."""
        total = 0
        for study in self.studies:
            if study.instances_expected is None:
                if study.state in _OPEN_STUDY_STATES:
                    return None
                continue
            total += study.instances_expected
        return total

    @property
    def instances_stored(self) -> int:
        return sum(s.instances_stored for s in self.studies)

    @property
    def instances_failed(self) -> int:
        return sum(s.instances_failed for s in self.studies)

    @property
    def bytes(self) -> int:
        return sum(s.bytes for s in self.studies)


class TransferStore(ABC):
    """Where transfer jobs live. Every method is a coroutine; the database work runs in threads so a
    slow disk or a busy PostgreSQL never stalls the event loop. A call whose caller is cancelled may
    still complete in its thread: each call is one transaction, so it either happened or not."""

    @classmethod
    def open(cls, url: str | SecretStr | None, storage_path: Path) -> TransferStore:
        """``None`` is SQLite in ``transfers.sqlite`` under ``storage_path``. ``sqlite:///name`` is a
        file relative to ``storage_path`` (a daemon's working directory means nothing) and
        ``sqlite:////abs/path`` an absolute one, as in SQLAlchemy. ``postgresql://``/``postgres://``
        URLs go to PostgreSQL unchanged."""
        if isinstance(url, SecretStr):
            url = url.get_secret_value()
        if url is None:
            return SqlTransferStore(SqliteBackend(Path(storage_path) / SQLITE_FILENAME))
        if url.startswith("sqlite:///"):
            path = Path(url.removeprefix("sqlite:///"))
            return SqlTransferStore(SqliteBackend(path if path.is_absolute() else Path(storage_path) / path))
        if url.startswith(("postgresql://", "postgres://")):
            return SqlTransferStore(PostgresBackend(url))
        raise ValueError("transfer store URL must start with postgresql://, postgres:// or sqlite:///")

    @abstractmethod
    async def start(self) -> None:
        """Connect and create or upgrade the schema; safe to call from several replicas at once."""

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def create(self, job: NewJob) -> Job: ...

    @abstractmethod
    async def get(self, job_id: str) -> Job | None: ...

    @abstractmethod
    async def list_for(self, client: str, *, limit: int, offset: int = 0) -> list[Job]:
        """The jobs ``client`` submitted, newest first."""

    @abstractmethod
    async def revision(self, job_id: str) -> int | None:
        """The job's revision alone: what a poller reads until it changes, then it calls get()."""

    @abstractmethod
    async def claim(self, owner: str, lease_s: float) -> Job | None:
        """The oldest job nobody works on (queued, or running with a lapsed lease), now ours.

        A lapsed job whose cancellation was asked for is cancelled here instead of handed out."""

    @abstractmethod
    async def renew(self, job_id: str, owner: str, lease_s: float) -> Job:
        """Extend the lease; the fresh Job tells the worker whether a cancel was asked for."""

    @abstractmethod
    async def release(self, job_id: str, owner: str) -> bool:
        """Give a running job back to the queue (graceful stop); False when ``owner`` did not hold it."""

    @abstractmethod
    async def request_cancel(self, job_id: str) -> Job | None:
        """None if unknown. A job nobody works on (queued, or its lease lapsed) is cancelled at once;
        a running one gets ``cancel_requested`` and its worker ends it; finished jobs stay as they are."""

    @abstractmethod
    async def set_study(self, job_id: str, owner: str, index: int, state: StudyState,
                        detail: str | None = None) -> None: ...

    @abstractmethod
    async def add_expected(self, job_id: str, owner: str, index: int,
                           instances: Sequence[ExpectedInstance]) -> None:
        """Record the study's manifest. Idempotent and additive: rows already there keep their state
        (stored stays stored), so a resumed worker may simply list the study again;
        ``instances_expected`` becomes the number of distinct instances ever listed."""

    @abstractmethod
    async def instances(self, job_id: str, index: int | None = None,
                        state: InstanceState | None = None) -> list[InstanceRow]:
        """Ordered by study, series and SOP Instance UID."""

    @abstractmethod
    async def mark_stored(self, job_id: str, owner: str, index: int, sop_instance_uid: str,
                          nbytes: int) -> bool:
        """True on the first success, False (counted once) if it was already stored.
        KeyError if the instance was never listed by add_expected."""

    @abstractmethod
    async def mark_stored_many(self, job_id: str, owner: str,
                               stored: Sequence[tuple[int, str, int]]) -> list[bool]:
        """:meth:`mark_stored` of several (study index, SOP Instance UID, bytes) in one transaction, one
        answer each in order: the group commit of relays that finished C-STOREs at the same time. All or
        none are recorded (LeaseLost, or KeyError for one never listed, writes none of them)."""

    @abstractmethod
    async def mark_failed(self, job_id: str, owner: str, index: int, sop_instance_uids: Sequence[str],
                          error: str) -> None:
        """Counts an attempt for each; a failed instance may still become stored later. A late failure
        report for an instance already stored changes nothing. KeyError if one was never listed.
        Several at once are one transaction (a source that fails mid-study fails all it still owes)."""

    @abstractmethod
    async def finish(self, job_id: str, owner: str, state: JobState, errors: Sequence[str] = ()) -> Job:
        """End the job in a terminal state, appending ``errors``; ends the lease but keeps ``owner``
        for the record. Studies still pending or running end cancelled with a cancelled job, else
        failed."""

    @abstractmethod
    async def purge(self, older_than_s: float) -> int:
        """Delete jobs that finished more than ``older_than_s`` ago; returns how many."""


class SqlTransferStore(TransferStore):
    """The one implementation, over either backend."""

    def __init__(self, backend: Backend) -> None:
        self._db = backend
        self._d = backend.dialect

    @property
    def backend(self) -> Backend:
        return self._db

    # --- plumbing -------------------------------------------------------------------------------

    def _in_tx(self, write: bool, fn: Callable[[Tx], T]) -> T:
        with self._db.transaction(write=write) as tx:
            return fn(tx)

    async def _write(self, fn: Callable[[Tx], T]) -> T:
        return await asyncio.to_thread(self._in_tx, True, fn)

    async def _read(self, fn: Callable[[Tx], T]) -> T:
        return await asyncio.to_thread(self._in_tx, False, fn)

    def _fence(self, tx: Tx, job_id: str, owner: str) -> None:
        # Only constant dialect clauses are ever interpolated into SQL; values go as parameters.
        row = tx.one(f"SELECT owner, state FROM transfer_jobs WHERE id = ?{self._d.lock_for_update}",  # noqa: S608
                     (job_id,))
        if row is None:
            raise LeaseLost(f"transfer job {job_id} no longer exists")
        if row[1] != "running" or row[0] != owner:
            raise LeaseLost(f"transfer job {job_id} is {row[1]} and held by {row[0]!r}, not {owner!r}")

    @staticmethod
    def _bump(tx: Tx, job_id: str) -> None:
        tx.run("UPDATE transfer_jobs SET revision = revision + 1, updated_at = ? WHERE id = ?",
               (tx.now, job_id))

    @staticmethod
    def _check_study(tx: Tx, job_id: str, index: int) -> None:
        if tx.one("SELECT 1 FROM transfer_studies WHERE job_id = ? AND idx = ?", (job_id, index)) is None:
            raise IndexError(f"transfer job {job_id} has no study {index}")

    @staticmethod
    def _load(tx: Tx, job_id: str) -> Job | None:
        row = tx.one(
            "SELECT id, state, created_at, updated_at, requester, destination, local_patient_id, errors,"
            " cancel_requested, owner, lease_expires_at, revision, finished_at, client, client_ura"
            " FROM transfer_jobs WHERE id = ?", (job_id,))
        if row is None:
            return None
        studies = tx.rows(
            "SELECT s.idx, s.study_id, s.state, s.instances_expected, s.detail,"
            " COALESCE(SUM(CASE WHEN i.state = 'stored' THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN i.state = 'failed' THEN 1 ELSE 0 END), 0),"
            " COALESCE(SUM(CASE WHEN i.state = 'stored' THEN i.bytes ELSE 0 END), 0)"
            " FROM transfer_studies s LEFT JOIN transfer_instances i"
            " ON i.job_id = s.job_id AND i.study_idx = s.idx"
            " WHERE s.job_id = ?"
            " GROUP BY s.idx, s.study_id, s.state, s.instances_expected, s.detail ORDER BY s.idx",
            (job_id,))
        return Job(
            id=row[0], state=cast(JobState, row[1]),
            created_at=_dt(row[2]), updated_at=_dt(row[3]),
            requester=json.loads(row[4]), destination=json.loads(row[5]), local_patient_id=row[6],
            studies=tuple(
                StudyProgress(index=int(s[0]), study_id=s[1], state=cast(StudyState, s[2]),
                              instances_expected=None if s[3] is None else int(s[3]),
                              instances_stored=int(s[5]), instances_failed=int(s[6]), bytes=int(s[7]),
                              detail=s[4])
                for s in studies),
            errors=tuple(json.loads(row[7])), cancel_requested=bool(row[8]), owner=row[9],
            lease_expires_at=None if row[10] is None else _dt(row[10]), revision=int(row[11]),
            finished_at=None if row[12] is None else _dt(row[12]), client=row[13], client_ura=row[14],
        )

    def _must_load(self, tx: Tx, job_id: str) -> Job:
        job = self._load(tx, job_id)
        if job is None:  # pragma: no cover - callers hold the row lock, so it cannot vanish
            raise LeaseLost(f"transfer job {job_id} no longer exists")
        return job

    def _end(self, tx: Tx, job_id: str, state: str, errors: Sequence[str] | None = None) -> None:
        if errors is None:
            tx.run("UPDATE transfer_jobs SET state = ?, finished_at = ?, lease_expires_at = NULL,"
                   " updated_at = ?, revision = revision + 1 WHERE id = ?",
                   (state, tx.now, tx.now, job_id))
        else:
            tx.run("UPDATE transfer_jobs SET state = ?, errors = ?, finished_at = ?, lease_expires_at = NULL,"
                   " updated_at = ?, revision = revision + 1 WHERE id = ?",
                   (state, json.dumps(list(errors)), tx.now, tx.now, job_id))
        # A finished job has no open study: a job that failed as a whole (destination gone, a crash)
        # fails its unfinished studies too, else they would read as pending forever.
        tx.run("UPDATE transfer_studies SET state = ? WHERE job_id = ? AND state IN (?, ?)",
               ("cancelled" if state == "cancelled" else "failed", job_id, *_OPEN_STUDY_STATES))

    # --- lifecycle ------------------------------------------------------------------------------

    async def start(self) -> None:
        def run() -> None:
            self._db.open()
            try:
                self._db.migrate()
            except BaseException:
                self._db.close()
                raise

        await asyncio.to_thread(run)

    async def close(self) -> None:
        await asyncio.to_thread(self._db.close)

    # --- jobs -----------------------------------------------------------------------------------

    async def create(self, job: NewJob) -> Job:
        if not job.studies:
            raise ValueError("a transfer job needs at least one study")
        job_id = str(uuid.uuid4())
        requester, destination = json.dumps(job.requester), json.dumps(job.destination)

        def run(tx: Tx) -> Job:
            tx.run("INSERT INTO transfer_jobs (id, state, created_at, updated_at, requester, destination,"
                   " local_patient_id, errors, cancel_requested, revision, client, client_ura)"
                   " VALUES (?, 'queued', ?, ?, ?, ?, ?, '[]', 0, 1, ?, ?)",
                   (job_id, tx.now, tx.now, requester, destination, job.local_patient_id, job.client,
                    job.client_ura))
            tx.many("INSERT INTO transfer_studies (job_id, idx, study_id, state) VALUES (?, ?, ?, 'pending')",
                    [(job_id, i, study) for i, study in enumerate(job.studies)])
            return self._must_load(tx, job_id)

        return await self._write(run)

    async def get(self, job_id: str) -> Job | None:
        return await self._read(lambda tx: self._load(tx, job_id))

    async def list_for(self, client: str, *, limit: int, offset: int = 0) -> list[Job]:
        if limit < 1 or offset < 0:
            raise ValueError("limit must be positive and offset not negative")

        def run(tx: Tx) -> list[Job]:
            ids = tx.rows("SELECT id FROM transfer_jobs WHERE client = ? ORDER BY seq DESC LIMIT ? OFFSET ?",
                          (client, limit, offset))
            return [job for (job_id,) in ids if (job := self._load(tx, job_id)) is not None]

        return await self._read(run)

    async def revision(self, job_id: str) -> int | None:
        def run(tx: Tx) -> int | None:
            row = tx.one("SELECT revision FROM transfer_jobs WHERE id = ?", (job_id,))
            return None if row is None else int(row[0])

        return await self._read(run)

    async def claim(self, owner: str, lease_s: float) -> Job | None:
        _positive(lease_s)

        def run(tx: Tx) -> Job | None:
            while True:
                row = tx.one(
                    "SELECT id, cancel_requested FROM transfer_jobs"  # noqa: S608
                    " WHERE state = 'queued' OR (state = 'running' AND lease_expires_at < ?)"
                    f" ORDER BY seq LIMIT 1{self._d.lock_skip_locked}", (tx.now,))
                if row is None:
                    return None
                job_id = str(row[0])
                if row[1]:
                    self._end(tx, job_id, "cancelled")
                    continue
                tx.run("UPDATE transfer_jobs SET state = 'running', owner = ?, lease_expires_at = ?,"
                       " updated_at = ?, revision = revision + 1 WHERE id = ?",
                       (owner, tx.now + lease_s, tx.now, job_id))
                return self._must_load(tx, job_id)

        return await self._write(run)

    async def renew(self, job_id: str, owner: str, lease_s: float) -> Job:
        _positive(lease_s)

        def run(tx: Tx) -> Job:
            self._fence(tx, job_id, owner)
            tx.run("UPDATE transfer_jobs SET lease_expires_at = ?, updated_at = ?, revision = revision + 1"
                   " WHERE id = ?", (tx.now + lease_s, tx.now, job_id))
            return self._must_load(tx, job_id)

        return await self._write(run)

    async def release(self, job_id: str, owner: str) -> bool:
        """Hand a running job back to the queue (a graceful stop): another replica, or this one after
        a restart, resumes it at once instead of waiting for the lease to lapse. False when ``owner``
        no longer held it (nothing changed)."""

        def run(tx: Tx) -> bool:
            try:
                self._fence(tx, job_id, owner)
            except LeaseLost:
                return False
            tx.run("UPDATE transfer_jobs SET state = 'queued', owner = NULL, lease_expires_at = NULL,"
                   " updated_at = ?, revision = revision + 1 WHERE id = ?", (tx.now, job_id))
            return True

        return await self._write(run)

    async def request_cancel(self, job_id: str) -> Job | None:
        def run(tx: Tx) -> Job | None:
            row = tx.one("SELECT state, cancel_requested, lease_expires_at FROM transfer_jobs"  # noqa: S608
                         f" WHERE id = ?{self._d.lock_for_update}", (job_id,))
            if row is None:
                return None
            state, requested, lease = row
            if state in TERMINAL_STATES:
                pass
            elif state == "queued" or lease is None or float(lease) < tx.now:
                # Nobody is (known to be) working on it: waiting for a worker to notice would mean
                # waiting for a claim that only exists to cancel it.
                tx.run("UPDATE transfer_jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
                self._end(tx, job_id, "cancelled")
            elif not requested:
                tx.run("UPDATE transfer_jobs SET cancel_requested = 1, updated_at = ?,"
                       " revision = revision + 1 WHERE id = ?", (tx.now, job_id))
            return self._load(tx, job_id)

        return await self._write(run)

    async def finish(self, job_id: str, owner: str, state: JobState, errors: Sequence[str] = ()) -> Job:
        if state not in TERMINAL_STATES:
            raise ValueError(f"finish needs a terminal state, not {state!r}")
        new_errors = [str(e) for e in errors]

        def run(tx: Tx) -> Job:
            self._fence(tx, job_id, owner)
            row = tx.one("SELECT errors FROM transfer_jobs WHERE id = ?", (job_id,))
            assert row is not None
            self._end(tx, job_id, state, [*json.loads(row[0]), *new_errors])
            return self._must_load(tx, job_id)

        return await self._write(run)

    async def purge(self, older_than_s: float) -> int:
        def run(tx: Tx) -> int:
            # Studies and instances go with their job (ON DELETE CASCADE).
            return tx.run("DELETE FROM transfer_jobs WHERE state IN (?, ?, ?, ?) AND finished_at < ?",
                          (*sorted(TERMINAL_STATES), tx.now - older_than_s))

        return await self._write(run)

    # --- studies and instances ------------------------------------------------------------------

    async def set_study(self, job_id: str, owner: str, index: int, state: StudyState,
                        detail: str | None = None) -> None:
        if state not in _STUDY_STATES:
            raise ValueError(f"unknown study state {state!r}")

        def run(tx: Tx) -> None:
            self._fence(tx, job_id, owner)
            if not tx.run("UPDATE transfer_studies SET state = ?, detail = ? WHERE job_id = ? AND idx = ?",
                          (state, detail, job_id, index)):
                raise IndexError(f"transfer job {job_id} has no study {index}")
            self._bump(tx, job_id)

        await self._write(run)

    async def add_expected(self, job_id: str, owner: str, index: int,
                           instances: Sequence[ExpectedInstance]) -> None:
        rows = [(job_id, index, i.sop_instance_uid, i.series_instance_uid, i.sop_class_uid)
                for i in instances]

        def run(tx: Tx) -> None:
            self._fence(tx, job_id, owner)
            self._check_study(tx, job_id, index)
            tx.many("INSERT INTO transfer_instances"
                    " (job_id, study_idx, sop_instance_uid, series_instance_uid, sop_class_uid, state)"
                    " VALUES (?, ?, ?, ?, ?, 'pending')"
                    " ON CONFLICT (job_id, study_idx, sop_instance_uid) DO NOTHING", rows)
            tx.run("UPDATE transfer_studies SET instances_expected = (SELECT COUNT(*) FROM transfer_instances"
                   " WHERE job_id = ? AND study_idx = ?) WHERE job_id = ? AND idx = ?",
                   (job_id, index, job_id, index))
            self._bump(tx, job_id)

        await self._write(run)

    async def instances(self, job_id: str, index: int | None = None,
                        state: InstanceState | None = None) -> list[InstanceRow]:
        if state is not None and state not in _INSTANCE_STATES:
            raise ValueError(f"unknown instance state {state!r}")
        sql = ("SELECT study_idx, sop_instance_uid, series_instance_uid, sop_class_uid, state, attempts,"
               " bytes, error FROM transfer_instances WHERE job_id = ?")
        params: list[Any] = [job_id]
        if index is not None:
            sql += " AND study_idx = ?"
            params.append(index)
        if state is not None:
            sql += " AND state = ?"
            params.append(state)
        sql += " ORDER BY study_idx, series_instance_uid, sop_instance_uid"

        def run(tx: Tx) -> list[InstanceRow]:
            return [InstanceRow(study_index=int(r[0]), sop_instance_uid=r[1], series_instance_uid=r[2],
                                sop_class_uid=r[3], state=cast(InstanceState, r[4]), attempts=int(r[5]),
                                bytes=int(r[6]), error=r[7])
                    for r in tx.rows(sql, params)]

        return await self._read(run)

    @staticmethod
    def _instance_exists(tx: Tx, job_id: str, index: int, sop_instance_uid: str) -> None:
        if tx.one("SELECT 1 FROM transfer_instances"
                  " WHERE job_id = ? AND study_idx = ? AND sop_instance_uid = ?",
                  (job_id, index, sop_instance_uid)) is None:
            raise KeyError(f"transfer job {job_id} study {index} never listed instance {sop_instance_uid}")

    async def mark_stored(self, job_id: str, owner: str, index: int, sop_instance_uid: str,
                          nbytes: int) -> bool:
        (first,) = await self.mark_stored_many(job_id, owner, [(index, sop_instance_uid, nbytes)])
        return first

    async def mark_stored_many(self, job_id: str, owner: str,
                               stored: Sequence[tuple[int, str, int]]) -> list[bool]:
        marks = [(int(index), str(uid), int(nbytes)) for index, uid, nbytes in stored]
        if not marks:
            return []

        def run(tx: Tx) -> list[bool]:
            # One fence, one revision bump, one commit for the whole group: what a transaction costs
            # (the thread hop, BEGIN IMMEDIATE, the fence's row lock, COMMIT) is paid once per group.
            self._fence(tx, job_id, owner)
            firsts = []
            for index, uid, nbytes in marks:
                first = bool(tx.run("UPDATE transfer_instances SET state = 'stored', bytes = ?, error = NULL,"
                                    " attempts = attempts + 1 WHERE job_id = ? AND study_idx = ?"
                                    " AND sop_instance_uid = ? AND state <> 'stored'",
                                    (nbytes, job_id, index, uid)))
                if not first:
                    self._instance_exists(tx, job_id, index, uid)
                firsts.append(first)
            if any(firsts):
                self._bump(tx, job_id)
            return firsts

        return await self._write(run)

    async def mark_failed(self, job_id: str, owner: str, index: int, sop_instance_uids: Sequence[str],
                          error: str) -> None:
        if isinstance(sop_instance_uids, str):  # a str is a Sequence[str] too: one uid per character
            raise TypeError("sop_instance_uids is a sequence of UIDs, not one UID")

        def run(tx: Tx) -> None:
            self._fence(tx, job_id, owner)
            changed = False
            for uid in sop_instance_uids:
                if tx.run("UPDATE transfer_instances SET state = 'failed', error = ?,"
                          " attempts = attempts + 1 WHERE job_id = ? AND study_idx = ?"
                          " AND sop_instance_uid = ? AND state <> 'stored'", (error, job_id, index, uid)):
                    changed = True
                else:
                    self._instance_exists(tx, job_id, index, uid)
            if changed:
                self._bump(tx, job_id)

        await self._write(run)


def _dt(epoch: Any) -> datetime:
    return datetime.fromtimestamp(float(epoch), UTC)


def _positive(lease_s: float) -> None:
    if not lease_s > 0:
        raise ValueError(f"lease_s must be positive, not {lease_s!r}")
