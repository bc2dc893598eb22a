from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from duo_gateway.config.xca import DocumentCodes
from duo_gateway.sources.base import InstanceRecord, StudyRecord
from duo_gateway.xca.docindex import DocumentIndex, DocumentIndexClosed, IndexedDocument
from duo_gateway.xca.metadata import BASIC_TEXT_SR, kos_unique_id, report_entry, study_entry

BSN = "999911120"
URA = "00010990"
REPO = "2.999.1.7"
HOME = "urn:oid:2.999.1"
T0 = datetime(2026, 1, 5, 12, 0, tzinfo=UTC)


class Clock:
    def __init__(self) -> None:
        self.now = T0

    def __call__(self) -> datetime:
        return self.now


def kos(n: int, ura: str = URA) -> IndexedDocument:
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    return IndexedDocument(kos_unique_id(study, REPO), "kos", ura, REPO, study, None, "application/dicom")


def report(n: int) -> IndexedDocument:
    study = f"1.2.826.0.1.3680043.8.498.{n}"
    return IndexedDocument(f"{study}.9.1", "report", URA, REPO, study, f"{study}.9.1", "application/pdf")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def index(tmp_path: Path, clock: Clock) -> AsyncIterator[DocumentIndex]:
    idx = await DocumentIndex.open(tmp_path, clock=clock)
    try:
        yield idx
    finally:
        await idx.close()


async def test_record_and_lookup(index: DocumentIndex) -> None:
    await index.record([kos(1), report(1)])
    got = await index.lookup(kos(1).unique_id)
    assert got is not None
    assert (got.kind, got.hospital_ura, got.repository_unique_id, got.study_uid, got.sop_instance_uid,
            got.mime_type) == ("kos", URA, REPO, "1.2.826.0.1.3680043.8.498.1", None, "application/dicom")
    assert got.first_seen == got.last_seen == T0
    rep = await index.lookup(report(1).unique_id)
    assert rep is not None and rep.kind == "report" and rep.sop_instance_uid == report(1).unique_id
    assert rep.mime_type == "application/pdf"
    assert await index.lookup("2.25.404") is None


async def test_lookup_many_returns_only_known_ids(index: DocumentIndex) -> None:
    docs = [kos(n) for n in range(1200)]  # more than one IN-list chunk
    await index.record(docs)
    wanted = [d.unique_id for d in docs[::3]] + ["2.25.404", docs[0].unique_id]
    found = await index.lookup_many(wanted)
    assert set(found) == {d.unique_id for d in docs[::3]}
    assert all(found[k].unique_id == k for k in found)
    assert await index.lookup_many([]) == {}
    assert await index.count() == 1200


async def test_upsert_keeps_first_seen_and_moves_last_seen(index: DocumentIndex, clock: Clock) -> None:
    await index.record([kos(1)])
    clock.now = T0 + timedelta(hours=3)
    moved = IndexedDocument(kos(1).unique_id, "kos", "00010991", "2.999.1.8", kos(1).study_uid, None,
                            "application/dicom")
    await index.record([moved])
    got = await index.lookup(kos(1).unique_id)
    assert got is not None
    assert (got.first_seen, got.last_seen) == (T0, T0 + timedelta(hours=3))
    assert (got.hospital_ura, got.repository_unique_id) == ("00010991", "2.999.1.8")
    clock.now = T0  # a clock that went back never makes an entry look older than it is
    await index.record([kos(1)])
    again = await index.lookup(kos(1).unique_id)
    assert again is not None and again.last_seen == T0 + timedelta(hours=3)
    assert await index.count() == 1


async def test_seen_times_passed_in_are_ignored(index: DocumentIndex) -> None:
    old = datetime(2000, 1, 1, tzinfo=UTC)
    doc = IndexedDocument(kos(1).unique_id, "kos", URA, REPO, kos(1).study_uid, None, "application/dicom",
                          first_seen=old, last_seen=old)
    await index.record([doc])
    got = await index.lookup(doc.unique_id)
    assert got is not None and got.first_seen == got.last_seen == T0


async def test_record_is_one_transaction(index: DocumentIndex, tmp_path: Path) -> None:
    await index.record([kos(1)])
    # A row the table refuses (kind bypasses the dataclass check here) must take the batch down with it.
    bad = IndexedDocument(kos(2).unique_id, "kos", URA, REPO, kos(2).study_uid, None, "application/dicom")
    object.__setattr__(bad, "kind", "image")
    with pytest.raises(sqlite3.IntegrityError):
        await index.record([kos(3), bad])
    assert await index.lookup(kos(3).unique_id) is None
    assert await index.count() == 1


async def test_data_survives_a_restart(tmp_path: Path, clock: Clock) -> None:
    first = await DocumentIndex.open(tmp_path, clock=clock)
    await first.record([kos(1), report(2)])
    await first.close()
    await first.close()  # idempotent
    with pytest.raises(DocumentIndexClosed):
        await first.lookup(kos(1).unique_id)
    second = await DocumentIndex.open(tmp_path, clock=clock)
    try:
        assert set(await second.lookup_many([kos(1).unique_id, report(2).unique_id])) == {
            kos(1).unique_id, report(2).unique_id,
        }
    finally:
        await second.close()


async def test_wal_mode_and_owner_only_file(index: DocumentIndex) -> None:
    with sqlite3.connect(index.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert index.path.stat().st_mode & 0o077 == 0


async def test_concurrent_records_and_lookups(tmp_path: Path, clock: Clock) -> None:
    # Two instances on one file, as two gateway workers would be, plus many tasks on each.
    a = await DocumentIndex.open(tmp_path, clock=clock)
    b = await DocumentIndex.open(tmp_path, clock=clock)
    try:
        async def writer(idx: DocumentIndex, n: int) -> None:
            await idx.record([kos(n * 10 + k) for k in range(10)])

        async def reader(idx: DocumentIndex, n: int) -> int:
            return len(await idx.lookup_many([kos(n * 10 + k).unique_id for k in range(10)]))

        results = await asyncio.gather(
            *(writer(a if n % 2 else b, n) for n in range(50)),
            *(reader(b if n % 2 else a, n) for n in range(50)),
        )
        assert all(r is None or 0 <= r <= 10 for r in results)
        assert await a.count() == 500
        found = await b.lookup_many([kos(n).unique_id for n in range(500)])
        assert len(found) == 500
    finally:
        await asyncio.gather(a.close(), b.close())


async def test_prune_forgets_what_was_not_seen_lately(index: DocumentIndex, clock: Clock) -> None:
    await index.record([kos(1), kos(2)])
    clock.now = T0 + timedelta(days=20)
    await index.record([kos(2), kos(3)])
    clock.now = T0 + timedelta(days=31)
    assert await index.prune(timedelta(days=30)) == 1
    assert await index.lookup(kos(1).unique_id) is None
    assert set(await index.lookup_many([kos(2).unique_id, kos(3).unique_id])) == {
        kos(2).unique_id, kos(3).unique_id,
    }
    assert await index.prune(timedelta(days=30)) == 0
    with pytest.raises(ValueError):
        await index.prune(timedelta(days=-1))


async def test_entries_from_the_metadata_mapping(index: DocumentIndex) -> None:
    study = StudyRecord("1.2.826.0.1.3680043.8.498.77", BSN, "20240301", "093015", description="CT thorax",
                        modalities=("CT", "SR"))
    sr = InstanceRecord(study.study_instance_uid, "1.2.826.0.1.3680043.8.498.77.9", BASIC_TEXT_SR,
                        "1.2.826.0.1.3680043.8.498.77.9.1")
    where = {"bsn": BSN, "hospital_ura": URA, "hospital_name": "Ziekenhuis", "repository_unique_id": REPO,
             "home": HOME}
    kos_e = study_entry(study, codes=DocumentCodes(), **where)
    rep_e = report_entry(sr, study, codes=DocumentCodes(), **where)
    await index.record_entries([kos_e, rep_e])
    got_kos = await index.lookup(kos_e.unique_id)
    got_rep = await index.lookup(rep_e.unique_id)
    assert got_kos is not None and got_rep is not None
    assert (got_kos.kind, got_kos.study_uid, got_kos.sop_instance_uid, got_kos.hospital_ura) == (
        "kos", study.study_instance_uid, None, URA,
    )
    assert (got_rep.kind, got_rep.study_uid, got_rep.sop_instance_uid, got_rep.mime_type) == (
        "report", study.study_instance_uid, sr.sop_instance_uid, "application/dicom",
    )
    by_uuid = await index.lookup_entry_uuid(kos_e.entry_uuid.upper().replace("URN:UUID:", "urn:uuid:"))
    assert by_uuid is not None and by_uuid.unique_id == kos_e.unique_id
    assert await index.lookup_entry_uuid("urn:uuid:00000000-0000-0000-0000-000000000000") is None


async def test_the_file_holds_no_bsn(index: DocumentIndex, tmp_path: Path) -> None:
    study = StudyRecord("1.2.826.0.1.3680043.8.498.78", BSN, "20240301", modalities=("CT",))
    entry = study_entry(study, bsn=BSN, hospital_ura=URA, hospital_name="Ziekenhuis",
                        repository_unique_id=REPO, home=HOME, codes=DocumentCodes())
    assert BSN in entry.patient_id  # the entry carries it; the index must not
    await index.record_entries([entry])
    await index.record([kos(n) for n in range(100)])
    await index.close()  # folds the WAL back in, so every byte is in the files below
    contents = _files(tmp_path)
    assert contents and sum(map(len, contents.values())) > 0
    for name, data in contents.items():
        assert BSN.encode() not in data, name


def _files(directory: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in directory.iterdir()}


@pytest.mark.parametrize(
    "field",
    ["unique_id", "study_uid", "repository_unique_id", "hospital_ura", "sop_instance_uid"],
)
def test_a_bsn_cannot_be_stored_in_any_field(field: str) -> None:
    values = {"unique_id": "2.25.1", "kind": "report", "hospital_ura": URA, "repository_unique_id": REPO,
              "study_uid": "1.2.3", "sop_instance_uid": "1.2.3.4", "mime_type": "application/dicom"}
    IndexedDocument(**values)  # type: ignore[arg-type]
    values[field] = BSN
    with pytest.raises(ValueError) as exc:
        IndexedDocument(**values)  # type: ignore[arg-type]
    assert BSN not in str(exc.value)


def test_indexed_document_shape_rules() -> None:
    with pytest.raises(ValueError):
        IndexedDocument("2.25.1", "kos", URA, REPO, "1.2.3", "1.2.3.4", "application/dicom")
    with pytest.raises(ValueError):
        IndexedDocument("2.25.1", "report", URA, REPO, "1.2.3", None, "application/dicom")
    with pytest.raises(ValueError):
        IndexedDocument("2.25.1", "kos", URA, REPO, "1.2.3", None, "dicom")
    with pytest.raises(ValueError):
        IndexedDocument("2.25.1", "kos", URA, REPO, "1.2.3", None, "application/dicom", entry_uuid="x")
