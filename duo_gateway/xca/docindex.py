"""Which hospital, study and instance a document uniqueId DUO announced stands for.

ITI-39 names a document by uniqueId (and repository) only, and DUO keeps no documents: a KOS is built
on demand from the study, a report is fetched from the PACS. So every uniqueId put into an ITI-38
answer is remembered here, durably (a restart between query and retrieve is ordinary), until it has
not been announced for a while.

A KOS entry is a stable document assembled on its first retrieve (``xca.metadata``), so two more facts
live here: the SHA-1 and size of each KOS once assembled (announced from then on, and the check that a
rebuilt KOS is still the same document), and per study and repository the *revision* that starts a new
generation when a rebuilt KOS is not. Both are digests and counters, not documents.

The index holds **no patient identifier**. At retrieve time the BSN is re-read from the PACS by study
UID and the consent asked again, so a stolen or leaked index file reveals which studies exist, never
whose they are. That is enforced, not just intended: every identifier field must be a dotted UID and
the URA eight digits at most, which no BSN (nine digits, no dot) can pass for.

sqlite3 in WAL mode, one connection behind a lock and every call in a worker thread, so the event loop
never waits on the disk and readers in other processes (an operator's sqlite3 shell) do not block
writers.
"""

from __future__ import annotations

import asyncio
import os
import re
import sqlite3
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Final, Literal, TypeVar

from duo_gateway.xca.codes import KOS_SOP_CLASS, STUDY_INSTANCE_UID_ID_TYPE
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.entry_ids import is_urn_uuid
from duo_gateway.xca.hl7 import Hl7FormatError, parse_reference_id

DocumentKind = Literal["kos", "report"]

DEFAULT_FILENAME: Final = "documents.sqlite3"
_SCHEMA_VERSION: Final = 2
#: Below SQLite's smallest compiled-in variable limit (999), so lookup_many works on any build.
_CHUNK: Final = 500
#: How long a writer waits for another process's lock before the call fails.
_BUSY_TIMEOUT_S: Final = 10.0

_UID = re.compile(r"^\d+(\.\d+)+$")  # leading zeros tolerated: real PACSes emit them
_URA = re.compile(r"^\d{1,8}$")
_SHA1 = re.compile(r"^[0-9a-f]{40}$")
_MIME = re.compile(r"^[a-z0-9][a-z0-9.+-]*/[a-z0-9][a-z0-9.+-]*$")
_T = TypeVar("_T")


class DocumentIndexClosed(RuntimeError):
    """The index was used after close(): a shutdown-ordering bug, not a missing document."""


def _now() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class IndexedDocument:
    """What ITI-39 needs to find a document again. ``sop_instance_uid`` is None for a KOS, which is
    built from the whole study; a report is one instance. ``entry_uuid`` lets GetDocuments by entryUUID
    be answered too (the uuid5 it is derived from cannot be inverted).

    ``first_seen`` / ``last_seen`` are set by the index; values passed to :meth:`DocumentIndex.record`
    are ignored, so a caller cannot make an entry look fresher or older than it is. ``hash`` / ``size``
    likewise: only :meth:`DocumentIndex.record_assembly` sets them.
    """

    unique_id: str
    kind: DocumentKind
    hospital_ura: str
    repository_unique_id: str
    study_uid: str
    sop_instance_uid: str | None
    mime_type: str
    entry_uuid: str | None = None
    first_seen: datetime | None = None
    last_seen: datetime | None = None
    hash: str | None = None
    size: int | None = None

    def __post_init__(self) -> None:
        if (self.hash is None) != (self.size is None):
            raise ValueError("hash and size are recorded together")
        if self.hash is not None and self.size is not None:
            _check_assembly(self.hash, self.size)
        if self.entry_uuid is not None:
            if not is_urn_uuid(self.entry_uuid):
                raise ValueError("entry_uuid must be a urn:uuid")
            object.__setattr__(self, "entry_uuid", self.entry_uuid.lower())
        for name in ("unique_id", "repository_unique_id", "study_uid"):
            _check_uid(name, getattr(self, name))
        if self.kind == "kos":
            if self.sop_instance_uid is not None:
                raise ValueError("a KOS is built from the whole study: sop_instance_uid must be None")
        elif self.kind == "report":
            if self.sop_instance_uid is None:
                raise ValueError("a report is one instance: sop_instance_uid is required")
            _check_uid("sop_instance_uid", self.sop_instance_uid)
        else:
            raise ValueError(f"kind must be 'kos' or 'report', not {self.kind!r}")
        if not _URA.match(self.hospital_ura):
            raise ValueError("hospital_ura must be a URA (at most eight digits)")
        if not _MIME.match(self.mime_type):
            raise ValueError(f"not a MIME type: {self.mime_type!r}")

    @property
    def assembled(self) -> tuple[str, int] | None:
        """(SHA-1, size) of the KOS as first built for this uniqueId; None before that (and for reports)."""
        if self.hash is None or self.size is None:
            return None
        return self.hash, self.size

    @classmethod
    def from_entry(cls, entry: DocumentEntry) -> IndexedDocument:
        """The index row of an entry :mod:`duo_gateway.xca.metadata` built: everything ITI-39 needs is
        already on it (the study UID in referenceIdList, the hospital as the author's URA), so the
        caller cannot pair an entry with the wrong hospital or study."""
        uras = entry.author_uras
        if len(uras) != 1:
            raise ValueError("an entry DUO announces has exactly one authoring institution (URA)")
        studies = set()
        for ref in entry.reference_ids:
            try:
                value, id_type = parse_reference_id(ref)
            except Hl7FormatError:
                continue
            if id_type == STUDY_INSTANCE_UID_ID_TYPE:
                studies.add(value)
        if len(studies) != 1:
            raise ValueError("an entry DUO announces references exactly one study")
        if not entry.repository_unique_id:
            raise ValueError("an entry without repositoryUniqueId cannot be retrieved")
        is_kos = entry.format_code is not None and entry.format_code.code == KOS_SOP_CLASS
        return cls(
            unique_id=entry.unique_id,
            kind="kos" if is_kos else "report",
            hospital_ura=uras.pop(),
            repository_unique_id=entry.repository_unique_id,
            study_uid=studies.pop(),
            sop_instance_uid=None if is_kos else entry.unique_id,
            mime_type=entry.mime_type,
            entry_uuid=entry.entry_uuid,
        )


def _check_assembly(digest: str, size: int) -> None:
    if not _SHA1.match(digest):
        raise ValueError("hash must be a lower-case hex SHA-1 (the XDS hash)")
    if size < 0:
        raise ValueError("size must not be negative")


def _check_uid(name: str, value: str) -> None:
    if len(value) > 64 or not _UID.match(value):
        # Not echoed: a value that fails here may be exactly what must not be stored or logged.
        raise ValueError(f"{name} must be a DICOM UID / OID (dotted digits, at most 64 characters)")


_DDL: Final = (
    """CREATE TABLE IF NOT EXISTS documents (
        unique_id TEXT PRIMARY KEY,
        entry_uuid TEXT,
        kind TEXT NOT NULL CHECK (kind IN ('kos', 'report')),
        hospital_ura TEXT NOT NULL,
        repository_unique_id TEXT NOT NULL,
        study_uid TEXT NOT NULL,
        sop_instance_uid TEXT,
        mime_type TEXT NOT NULL,
        first_seen REAL NOT NULL,
        last_seen REAL NOT NULL,
        hash TEXT,
        size INTEGER
    ) WITHOUT ROWID""",
    "CREATE INDEX IF NOT EXISTS documents_last_seen ON documents (last_seen)",
    "CREATE INDEX IF NOT EXISTS documents_entry_uuid ON documents (entry_uuid)",
    # Never pruned: a revision that went back to 0 would give a changed study the uniqueId (and so
    # the recorded hash) of an earlier state. A row exists only for a study whose KOS once changed.
    """CREATE TABLE IF NOT EXISTS revisions (
        study_uid TEXT NOT NULL,
        repository_unique_id TEXT NOT NULL,
        revision INTEGER NOT NULL CHECK (revision > 0),
        PRIMARY KEY (study_uid, repository_unique_id)
    ) WITHOUT ROWID""",
)
#: Schema 1 (no KOS assembly records, no revisions) to 2, applied before _DDL.
_MIGRATE_1: Final = (
    "ALTER TABLE documents ADD COLUMN hash TEXT",
    "ALTER TABLE documents ADD COLUMN size INTEGER",
)
_WRITTEN: Final = (
    "unique_id, kind, hospital_ura, repository_unique_id, study_uid, sop_instance_uid, mime_type, "
    "entry_uuid, first_seen, last_seen"
)
_COLUMNS: Final = f"{_WRITTEN}, hash, size"
# hash and size are not written here: an entry announced again keeps what its assembly recorded.
_UPSERT: Final = (
    f"INSERT INTO documents ({_WRITTEN}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?) "  # noqa: S608
    "ON CONFLICT (unique_id) DO UPDATE SET kind = excluded.kind, hospital_ura = excluded.hospital_ura, "
    "entry_uuid = coalesce(excluded.entry_uuid, documents.entry_uuid), "
    "repository_unique_id = excluded.repository_unique_id, study_uid = excluded.study_uid, "
    "sop_instance_uid = excluded.sop_instance_uid, mime_type = excluded.mime_type, "
    "last_seen = max(documents.last_seen, excluded.last_seen)"
)

_Row = tuple[str, str, str, str, str, str | None, str, str | None, float, float, str | None, int | None]


def _from_row(row: _Row) -> IndexedDocument:
    unique_id, kind, ura, repo, study, sop, mime, entry_uuid, first, last, digest, size = row
    if kind not in ("kos", "report"):
        raise sqlite3.DatabaseError(f"corrupt document index row for {unique_id}")
    return IndexedDocument(
        unique_id, "kos" if kind == "kos" else "report", ura, repo, study, sop, mime, entry_uuid,
        datetime.fromtimestamp(first, UTC), datetime.fromtimestamp(last, UTC), digest, size,
    )


class DocumentIndex:
    """Durable uniqueId -> document location map; safe to share between concurrent tasks."""

    def __init__(self, conn: sqlite3.Connection, path: Path, clock: Callable[[], datetime]) -> None:
        self._conn: sqlite3.Connection | None = conn
        self._lock = threading.Lock()
        self._clock = clock
        self.path = path

    @classmethod
    async def open(cls, directory: Path, *, filename: str = DEFAULT_FILENAME,
                   clock: Callable[[], datetime] = _now) -> DocumentIndex:
        """Open (creating if needed) the index file in ``directory``; existing entries survive."""
        path = directory / filename
        conn = await asyncio.to_thread(_connect, path)
        return cls(conn, path, clock)

    async def __aenter__(self) -> DocumentIndex:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def record(self, entries: Iterable[IndexedDocument]) -> None:
        """Upsert what one ITI-38 answer announced, in one transaction: all of it or none.

        first_seen stays what it was; last_seen becomes now (never earlier, if clocks disagree).
        """
        seen = self._clock().timestamp()
        rows = [
            (e.unique_id, e.kind, e.hospital_ura, e.repository_unique_id, e.study_uid, e.sop_instance_uid,
             e.mime_type, e.entry_uuid, seen, seen)
            for e in entries
        ]
        if not rows:
            return

        def run(conn: sqlite3.Connection) -> None:
            with conn:
                conn.executemany(_UPSERT, rows)

        await self._run(run)

    async def record_entries(self, entries: Iterable[DocumentEntry]) -> None:
        """:meth:`record` for the entries of an ITI-38 answer, as :meth:`IndexedDocument.from_entry`
        reads them; one bad entry fails the whole call before anything is written."""
        await self.record([IndexedDocument.from_entry(e) for e in entries])

    async def lookup(self, unique_id: str) -> IndexedDocument | None:
        found = await self.lookup_many([unique_id])
        return found.get(unique_id)

    async def lookup_many(self, unique_ids: Iterable[str]) -> dict[str, IndexedDocument]:
        """The known ones among ``unique_ids``; unknown ids are simply absent from the result."""
        wanted = list(dict.fromkeys(unique_ids))
        if not wanted:
            return {}

        def run(conn: sqlite3.Connection) -> dict[str, IndexedDocument]:
            out: dict[str, IndexedDocument] = {}
            for start in range(0, len(wanted), _CHUNK):
                chunk = wanted[start:start + _CHUNK]
                marks = ", ".join("?" * len(chunk))
                cursor = conn.execute(
                    f"SELECT {_COLUMNS} FROM documents WHERE unique_id IN ({marks})",  # noqa: S608
                    chunk,
                )
                for row in cursor.fetchall():
                    doc = _from_row(row)
                    out[doc.unique_id] = doc
            return out

        return await self._run(run)

    async def lookup_entry_uuid(self, entry_uuid: str) -> IndexedDocument | None:
        """For GetDocuments by ``$XDSDocumentEntryEntryUUID``; case-insensitive, as UUIDs are."""
        key = entry_uuid.strip().lower()

        def run(conn: sqlite3.Connection) -> IndexedDocument | None:
            row = conn.execute(
                f"SELECT {_COLUMNS} FROM documents WHERE entry_uuid = ? LIMIT 1",  # noqa: S608
                (key,),
            ).fetchone()
            return _from_row(row) if row is not None else None

        return await self._run(run)

    async def record_assembly(self, unique_id: str, digest: str, size: int) -> tuple[str, int] | None:
        """Record the SHA-1 and size of a KOS just built for ``unique_id``, unless already recorded.

        Returns what is recorded now: ours when this was the first assembly, the earlier one otherwise
        (first writer wins, so two concurrent first retrieves agree on one document); None when the
        uniqueId is not in the index (pruned meanwhile: nothing to keep the hash with).
        """
        _check_uid("unique_id", unique_id)
        _check_assembly(digest, size)

        def run(conn: sqlite3.Connection) -> tuple[str, int] | None:
            with conn:
                conn.execute("UPDATE documents SET hash = ?, size = ? WHERE unique_id = ? AND hash IS NULL",
                             (digest, size, unique_id))
                row = conn.execute("SELECT hash, size FROM documents WHERE unique_id = ?",
                                   (unique_id,)).fetchone()
            if row is None or row[0] is None:
                return None
            return str(row[0]), int(row[1])

        return await self._run(run)

    async def revisions(self, studies: Iterable[tuple[str, str]]) -> dict[tuple[str, str], int]:
        """The revision of each (study UID, repositoryUniqueId); those never revised are absent (0)."""
        wanted = list(dict.fromkeys(studies))
        for study_uid, repository in wanted:
            _check_uid("study_uid", study_uid)
            _check_uid("repository_unique_id", repository)
        if not wanted:
            return {}

        def run(conn: sqlite3.Connection) -> dict[tuple[str, str], int]:
            out: dict[tuple[str, str], int] = {}
            for start in range(0, len(wanted), _CHUNK // 2):
                chunk = wanted[start:start + _CHUNK // 2]
                where = " OR ".join("(study_uid = ? AND repository_unique_id = ?)" for _ in chunk)
                cursor = conn.execute(
                    f"SELECT study_uid, repository_unique_id, revision FROM revisions WHERE {where}",  # noqa: S608
                    [v for pair in chunk for v in pair],
                )
                for study_uid, repository, revision in cursor.fetchall():
                    out[(study_uid, repository)] = int(revision)
            return out

        return await self._run(run)

    async def bump_revision(self, study_uid: str, repository_unique_id: str, seen: int) -> int:
        """Start a new generation of a study's KOS, if nobody did since ``seen`` was read; returns the
        revision now in force (``seen + 1`` either way when two callers noticed the same change)."""
        _check_uid("study_uid", study_uid)
        _check_uid("repository_unique_id", repository_unique_id)
        if seen < 0:
            raise ValueError("a revision is never negative")

        def run(conn: sqlite3.Connection) -> int:
            with conn:
                conn.execute(
                    "INSERT INTO revisions (study_uid, repository_unique_id, revision) VALUES (?, ?, ?) "
                    "ON CONFLICT (study_uid, repository_unique_id) DO UPDATE SET revision = ? "
                    "WHERE revisions.revision = ?",
                    (study_uid, repository_unique_id, seen + 1, seen + 1, seen),
                )
                (revision,) = conn.execute(
                    "SELECT revision FROM revisions WHERE study_uid = ? AND repository_unique_id = ?",
                    (study_uid, repository_unique_id),
                ).fetchone()
            return int(revision)

        return await self._run(run)

    async def prune(self, older_than: timedelta) -> int:
        """Forget entries not announced within ``older_than``; returns how many went.

        A consumer holding such an entry gets XDSDocumentUniqueIdError on retrieve and must query again,
        which also re-asks consent: that is the point of forgetting.
        """
        if older_than < timedelta(0):
            raise ValueError("older_than must not be negative")
        cutoff = (self._clock() - older_than).timestamp()

        def run(conn: sqlite3.Connection) -> int:
            with conn:
                return conn.execute("DELETE FROM documents WHERE last_seen < ?", (cutoff,)).rowcount

        return await self._run(run)

    async def count(self) -> int:
        def run(conn: sqlite3.Connection) -> int:
            (n,) = conn.execute("SELECT count(*) FROM documents").fetchone()
            return int(n)

        return await self._run(run)

    async def close(self) -> None:
        """Idempotent; waits for a call in flight. SQLite folds the WAL into the main file when the last
        connection closes, so a clean shutdown leaves one file."""

        def run() -> None:
            with self._lock:
                conn, self._conn = self._conn, None
                if conn is not None:
                    conn.close()

        await asyncio.to_thread(run)

    async def _run(self, fn: Callable[[sqlite3.Connection], _T]) -> _T:
        def locked() -> _T:
            with self._lock:
                if self._conn is None:
                    raise DocumentIndexClosed("the document index is closed")
                return fn(self._conn)

        return await asyncio.to_thread(locked)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    if not path.exists():
        # Owner-only: no patient data, but it maps studies to hospitals; nobody else needs it.
        fd = os.open(path, os.O_CREAT | os.O_WRONLY, 0o600)
        os.close(fd)
    conn = sqlite3.connect(path, timeout=_BUSY_TIMEOUT_S, check_same_thread=False, isolation_level="DEFERRED")
    try:
        (mode,) = conn.execute("PRAGMA journal_mode=WAL").fetchone()
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"cannot put the document index in WAL mode (got {mode})")
        # NORMAL is durable across process crashes in WAL mode; only a power loss may drop the
        # last commits, which costs a consumer a re-query, not data.
        conn.execute("PRAGMA synchronous=NORMAL")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        if version > _SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"{path} has document index schema {version}; this version knows {_SCHEMA_VERSION}"
            )
        with conn:
            if version == 1:
                for ddl in _MIGRATE_1:
                    conn.execute(ddl)
            for ddl in _DDL:
                conn.execute(ddl)
            conn.execute(f"PRAGMA user_version={_SCHEMA_VERSION}")
    except BaseException:
        conn.close()
        raise
    return conn
