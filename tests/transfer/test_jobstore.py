"""The transfer job store, against SQLite and a real PostgreSQL alike: the same behaviour from both."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from datetime import UTC, datetime
from pathlib import Path

import pytest
from pydantic import SecretStr

from duo_gateway.transfer.jobstore import (
    TERMINAL_STATES,
    ExpectedInstance,
    Job,
    LeaseLost,
    NewJob,
    SqlTransferStore,
    StudyProgress,
    TransferStore,
)
from duo_gateway.transfer.sql import PostgresBackend, SchemaTooNew, SqliteBackend
from tests.support.postgres import Postgres, run_postgres

OpenStore = Callable[[], Awaitable[TransferStore]]
SHORT_LEASE = 0.3


@pytest.fixture(scope="module")
def postgres_server() -> Iterator[Postgres]:
    with run_postgres() as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
async def open_store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[OpenStore]:
    """Opens another store on the same database each call: another replica, or the same one restarted."""
    if request.param == "postgresql":
        server: Postgres = request.getfixturevalue("postgres_server")
        url: str | None = server.create_database("store")
    else:
        url = None
    opened: list[TransferStore] = []

    async def open_one() -> TransferStore:
        store = TransferStore.open(url, tmp_path)
        await store.start()
        opened.append(store)
        return store

    yield open_one
    for store in opened:
        await store.close()


@pytest.fixture
async def store(open_store: OpenStore) -> TransferStore:
    return await open_store()


def new_job(*studies: str, patient: str | None = "P1") -> NewJob:
    return NewJob(requester={"ura": "00000666", "name": "Dr. Test"},
                  destination={"name": "pacs", "ae_title": "DEST", "host": "127.0.0.1", "port": 104},
                  studies=studies or ("study-a",), local_patient_id=patient)


def instance(n: int, series: str = "1.2.3.1") -> ExpectedInstance:
    return ExpectedInstance(sop_instance_uid=f"1.2.3.1.{n}", series_instance_uid=series,
                            sop_class_uid="1.2.840.10008.5.1.4.1.1.2")


async def claimed(store: TransferStore, owner: str = "duo-a", lease_s: float = 30.0) -> Job:
    job = await store.claim(owner, lease_s)
    assert job is not None
    return job


async def test_create_and_get(store: TransferStore) -> None:
    before = datetime.now(UTC)
    job = await store.create(new_job("s1", "s2"))
    assert job.state == "queued" and job.revision == 1 and not job.cancel_requested
    assert job.owner is None and job.lease_expires_at is None and job.finished_at is None
    assert job.created_at.tzinfo is not None and abs((job.created_at - before).total_seconds()) < 5
    assert job.requester == {"ura": "00000666", "name": "Dr. Test"}
    assert job.destination["port"] == 104 and job.local_patient_id == "P1"
    assert job.studies == (
        StudyProgress(0, "s1", "pending", None, 0, 0, 0, None),
        StudyProgress(1, "s2", "pending", None, 0, 0, 0, None),
    )
    assert job.instances_expected is None and job.instances_stored == 0 and job.bytes == 0
    assert await store.get(job.id) == job
    assert await store.revision(job.id) == 1
    assert await store.get("no-such-job") is None
    assert await store.revision("no-such-job") is None
    with pytest.raises(ValueError, match="at least one study"):
        await store.create(NewJob(requester={}, destination={}, studies=()))


async def test_claim_takes_the_oldest_queued_job_first(store: TransferStore) -> None:
    ids = [(await store.create(new_job(f"s{i}"))).id for i in range(3)]
    first = await claimed(store, "duo-a", 30)
    assert first.id == ids[0] and first.state == "running" and first.owner == "duo-a"
    assert first.lease_expires_at is not None
    assert 25 < (first.lease_expires_at - datetime.now(UTC)).total_seconds() <= 31
    assert first.revision == 2
    assert [(await claimed(store, "duo-b")).id for _ in range(2)] == ids[1:]
    assert await store.claim("duo-c", 30) is None


async def test_concurrent_replicas_never_claim_the_same_job(open_store: OpenStore) -> None:
    replicas = [await open_store(), await open_store()]
    ids = {(await replicas[0].create(new_job(f"s{i}"))).id for i in range(20)}
    results = await asyncio.gather(*(replicas[n % 2].claim(f"duo-{n}", 30) for n in range(30)))
    got = [job.id for job in results if job is not None]
    assert len(got) == len(set(got)) == 20
    assert set(got) == ids
    for job in results:
        if job is not None:
            fresh = await replicas[1].get(job.id)
            assert fresh is not None and fresh.owner == job.owner


async def test_lapsed_lease_lets_another_owner_resume_and_fences_the_old_one(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    job = await a.create(new_job("s1"))
    await claimed(a, "duo-a", 30)
    await a.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    assert await b.claim("duo-b", 30) is None  # the lease still holds
    # Shortened only now, so the check above cannot race a 0.3 s lease on a slow machine.
    await a.renew(job.id, "duo-a", SHORT_LEASE)
    await asyncio.sleep(SHORT_LEASE + 0.15)
    taken = await claimed(b, "duo-b", 30)
    assert taken.id == job.id and taken.owner == "duo-b" and taken.state == "running"

    with pytest.raises(LeaseLost):
        await a.renew(job.id, "duo-a", 30)
    with pytest.raises(LeaseLost):
        await a.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 10)
    with pytest.raises(LeaseLost):
        await a.mark_failed(job.id, "duo-a", 0, [instance(1).sop_instance_uid], "boom")
    with pytest.raises(LeaseLost):
        await a.set_study(job.id, "duo-a", 0, "failed", "late")
    with pytest.raises(LeaseLost):
        await a.add_expected(job.id, "duo-a", 0, [instance(3)])
    with pytest.raises(LeaseLost):
        await a.finish(job.id, "duo-a", "failed", ["late"])

    # None of the stale writes landed; the new owner carries on.
    assert await b.mark_stored(job.id, "duo-b", 0, instance(1).sop_instance_uid, 10)
    current = await b.get(job.id)
    assert current is not None and [s.state for s in current.studies] == ["pending"]  # not "failed"
    done = await b.finish(job.id, "duo-b", "partial", ["one instance missing"])
    assert done.state == "partial" and done.errors == ("one instance missing",)
    assert done.instances_stored == 1 and done.instances_expected == 2


async def test_an_owner_keeps_a_lapsed_lease_until_someone_takes_it(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store, "duo-a", SHORT_LEASE)
    await asyncio.sleep(SHORT_LEASE + 0.1)
    renewed = await store.renew(job.id, "duo-a", 30)
    assert renewed.owner == "duo-a" and renewed.lease_expires_at is not None
    assert await store.claim("duo-b", 30) is None


async def test_renew_extends_the_lease_and_reports_a_cancel(store: TransferStore) -> None:
    job = await store.create(new_job())
    first = await claimed(store, "duo-a", 5)
    renewed = await store.renew(job.id, "duo-a", 60)
    assert first.lease_expires_at is not None and renewed.lease_expires_at is not None
    assert renewed.lease_expires_at > first.lease_expires_at
    assert renewed.revision == first.revision + 1 and not renewed.cancel_requested
    with pytest.raises(LeaseLost):
        await store.renew(job.id, "duo-b", 60)
    with pytest.raises(LeaseLost):
        await store.renew("no-such-job", "duo-a", 60)
    await store.request_cancel(job.id)
    assert (await store.renew(job.id, "duo-a", 60)).cancel_requested


async def test_cancel_queued_running_lapsed_and_finished_jobs(store: TransferStore) -> None:
    queued = await store.create(new_job("s1", "s2"))
    cancelled = await store.request_cancel(queued.id)
    assert cancelled is not None and cancelled.state == "cancelled" and cancelled.cancel_requested
    assert cancelled.finished_at is not None
    assert [s.state for s in cancelled.studies] == ["cancelled", "cancelled"]
    assert await store.claim("duo-a", 30) is None

    running = await store.create(new_job("s1", "s2"))
    await claimed(store, "duo-a", 30)
    await store.set_study(running.id, "duo-a", 0, "completed")
    asked = await store.request_cancel(running.id)
    assert asked is not None and asked.state == "running" and asked.cancel_requested
    again = await store.request_cancel(running.id)
    assert again is not None and again.revision == asked.revision  # asking twice changes nothing
    ended = await store.finish(running.id, "duo-a", "cancelled")
    assert ended.state == "cancelled" and ended.lease_expires_at is None and ended.owner == "duo-a"
    assert [s.state for s in ended.studies] == ["completed", "cancelled"]
    unchanged = await store.request_cancel(running.id)
    assert unchanged == ended

    assert await store.request_cancel("no-such-job") is None


async def test_cancel_of_a_job_nobody_works_on_any_more_is_immediate(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store, "duo-a", SHORT_LEASE)
    await asyncio.sleep(SHORT_LEASE + 0.1)
    cancelled = await store.request_cancel(job.id)
    assert cancelled is not None and cancelled.state == "cancelled"
    with pytest.raises(LeaseLost):
        await store.renew(job.id, "duo-a", 30)


async def test_a_lapsed_job_whose_cancel_was_asked_is_cancelled_not_handed_out(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store, "duo-a", SHORT_LEASE)
    await store.request_cancel(job.id)  # the owner dies before it notices
    await asyncio.sleep(SHORT_LEASE + 0.1)
    assert await store.claim("duo-b", 30) is None
    fresh = await store.get(job.id)
    assert fresh is not None and fresh.state == "cancelled"


async def test_add_expected_is_idempotent_on_resume(open_store: OpenStore) -> None:
    a, b = await open_store(), await open_store()
    job = await a.create(new_job("s1", "s2"))
    await claimed(a, "duo-a", SHORT_LEASE)
    manifest = [instance(1), instance(2), instance(3, series="1.2.3.2")]
    await a.add_expected(job.id, "duo-a", 0, manifest)
    await a.add_expected(job.id, "duo-a", 0, manifest)  # the same worker listing twice
    assert await a.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 1000)
    await a.mark_failed(job.id, "duo-a", 0, [instance(2).sop_instance_uid], "C-STORE 0xA700")
    await asyncio.sleep(SHORT_LEASE + 0.15)  # duo-a crashes

    await claimed(b, "duo-b", 30)
    await b.add_expected(job.id, "duo-b", 0, [*manifest, instance(4)])  # one instance arrived since
    rows = {r.sop_instance_uid: r for r in await b.instances(job.id, 0)}
    assert {uid: r.state for uid, r in rows.items()} == {
        "1.2.3.1.1": "stored", "1.2.3.1.2": "failed", "1.2.3.1.3": "pending", "1.2.3.1.4": "pending"}
    assert rows["1.2.3.1.1"].bytes == 1000 and rows["1.2.3.1.2"].error == "C-STORE 0xA700"
    assert rows["1.2.3.1.3"].series_instance_uid == "1.2.3.2"
    pending = await b.instances(job.id, 0, "pending")
    assert [r.sop_instance_uid for r in pending] == ["1.2.3.1.4", "1.2.3.1.3"]  # by series, then SOP UID
    assert await b.instances(job.id, 1) == []
    assert len(await b.instances(job.id)) == 4
    assert [r.sop_instance_uid for r in await b.instances(job.id, state="stored")] == ["1.2.3.1.1"]

    fresh = await b.get(job.id)
    assert fresh is not None
    assert (fresh.studies[0].instances_expected, fresh.studies[0].instances_stored,
            fresh.studies[0].instances_failed, fresh.studies[0].bytes) == (4, 1, 1, 1000)
    assert fresh.instances_expected is None  # study 2 still has no manifest
    with pytest.raises(IndexError):
        await b.add_expected(job.id, "duo-b", 7, [instance(1)])


async def test_mark_stored_counts_once_and_failures_can_recover(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store)
    await store.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    uid1, uid2 = instance(1).sop_instance_uid, instance(2).sop_instance_uid
    assert await store.mark_stored(job.id, "duo-a", 0, uid1, 500) is True
    assert await store.mark_stored(job.id, "duo-a", 0, uid1, 500) is False
    await store.mark_failed(job.id, "duo-a", 0, [uid1], "late duplicate failure")  # stored stays stored
    await store.mark_failed(job.id, "duo-a", 0, [uid2], "timeout")
    await store.mark_failed(job.id, "duo-a", 0, [uid2], "timeout again")
    assert await store.mark_stored(job.id, "duo-a", 0, uid2, 700) is True

    rows = {r.sop_instance_uid: (r.state, r.attempts, r.bytes, r.error)
            for r in await store.instances(job.id)}
    assert rows == {uid1: ("stored", 1, 500, None), uid2: ("stored", 3, 700, None)}
    fresh = await store.get(job.id)
    assert fresh is not None
    totals = (fresh.instances_expected, fresh.instances_stored, fresh.instances_failed, fresh.bytes)
    assert totals == (2, 2, 0, 1200)
    with pytest.raises(KeyError):
        await store.mark_stored(job.id, "duo-a", 0, "9.9.9", 1)
    with pytest.raises(KeyError):
        await store.mark_failed(job.id, "duo-a", 0, ["9.9.9"], "never listed")


async def test_a_source_failing_mid_study_fails_what_it_still_owes_in_one_write(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store)
    await store.add_expected(job.id, "duo-a", 0, [instance(n) for n in range(1, 5)])
    assert await store.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 10)
    before = await store.revision(job.id)
    owed = [instance(n).sop_instance_uid for n in range(1, 5)]  # the stored one included: it stays stored
    await store.mark_failed(job.id, "duo-a", 0, owed, "community down")
    assert await store.revision(job.id) == (before or 0) + 1  # one transaction, one change
    states = {r.sop_instance_uid: r.state for r in await store.instances(job.id)}
    assert states == {owed[0]: "stored", owed[1]: "failed", owed[2]: "failed", owed[3]: "failed"}
    with pytest.raises(KeyError):  # one unknown UID and nothing of the batch is written
        await store.mark_failed(job.id, "duo-a", 0, [owed[1], "9.9.9"], "again")
    assert [r.attempts for r in await store.instances(job.id) if r.sop_instance_uid == owed[1]] == [1]
    with pytest.raises(TypeError):
        await store.mark_failed(job.id, "duo-a", 0, owed[1], "one UID, not a list")


async def test_a_group_of_stored_marks_is_one_fenced_transaction(store: TransferStore) -> None:
    """The relays' group commit: several studies' instances, one answer each, one change, all or none."""
    job = await store.create(new_job("study-a", "study-b"))
    await claimed(store)
    await store.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    await store.add_expected(job.id, "duo-a", 1, [instance(3)])
    uid1, uid2, uid3 = (instance(n).sop_instance_uid for n in (1, 2, 3))
    assert await store.mark_stored(job.id, "duo-a", 0, uid1, 5)
    before = await store.revision(job.id)
    firsts = await store.mark_stored_many(job.id, "duo-a", [(0, uid1, 5), (0, uid2, 7), (1, uid3, 11)])
    assert firsts == [False, True, True], "one answer per mark, in order; a repeat counts once"
    assert await store.revision(job.id) == (before or 0) + 1, "one transaction, one change"
    assert await store.mark_stored_many(job.id, "duo-a", [(0, uid2, 7)]) == [False]
    assert await store.revision(job.id) == (before or 0) + 1, "nothing new, no change"
    assert await store.mark_stored_many(job.id, "duo-a", []) == []
    fresh = await store.get(job.id)
    assert fresh is not None
    assert [(s.instances_stored, s.bytes) for s in fresh.studies] == [(2, 12), (1, 11)]

    await store.add_expected(job.id, "duo-a", 0, [instance(4)])
    uid4 = instance(4).sop_instance_uid
    with pytest.raises(KeyError):  # one never listed and none of the group is written
        await store.mark_stored_many(job.id, "duo-a", [(0, uid4, 1), (0, "9.9.9", 1)])
    with pytest.raises(LeaseLost):  # fenced like every write
        await store.mark_stored_many(job.id, "duo-b", [(0, uid4, 1)])
    assert [r.state for r in await store.instances(job.id) if r.sop_instance_uid == uid4] == ["pending"]


async def test_revision_moves_with_every_change(store: TransferStore) -> None:
    job = await store.create(new_job())
    seen = [job.revision]

    async def changed() -> None:
        revision = await store.revision(job.id)
        assert revision is not None and revision == seen[-1] + 1
        seen.append(revision)

    await claimed(store)
    await changed()
    await store.set_study(job.id, "duo-a", 0, "running", "fetching")
    await changed()
    await store.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    await changed()
    await store.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 1)
    await changed()
    await store.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 1)  # no change
    assert await store.revision(job.id) == seen[-1]
    await store.mark_failed(job.id, "duo-a", 0, [instance(2).sop_instance_uid], "x")
    await changed()
    await store.renew(job.id, "duo-a", 30)
    await changed()
    await store.request_cancel(job.id)
    await changed()
    await store.set_study(job.id, "duo-a", 0, "partial", "1 of 2")
    await changed()
    done = await store.finish(job.id, "duo-a", "partial")
    await changed()
    assert done.revision == seen[-1] and done.studies[0].detail == "1 of 2"


async def test_finish_validates_and_appends_errors(store: TransferStore) -> None:
    job = await store.create(new_job())
    await claimed(store)
    with pytest.raises(ValueError, match="terminal"):
        await store.finish(job.id, "duo-a", "running")
    with pytest.raises(ValueError, match="study state"):
        await store.set_study(job.id, "duo-a", 0, "stored")  # type: ignore[arg-type]
    with pytest.raises(IndexError):
        await store.set_study(job.id, "duo-a", 3, "failed")
    done = await store.finish(job.id, "duo-a", "failed", ["PACS refused the association"])
    assert done.state == "failed" and done.state in TERMINAL_STATES and done.finished_at is not None
    assert done.errors == ("PACS refused the association",)
    # Its study never started: it fails with the job instead of reading as pending forever.
    assert [s.state for s in done.studies] == ["failed"] and done.instances_expected == 0
    with pytest.raises(LeaseLost):  # finished is finished, even for its own worker
        await store.finish(job.id, "duo-a", "completed")
    assert await store.claim("duo-b", 30) is None


async def test_purge_removes_only_finished_jobs_older_than_asked(store: TransferStore) -> None:
    done = await store.create(new_job())
    await claimed(store)
    await store.add_expected(done.id, "duo-a", 0, [instance(1)])
    await store.finish(done.id, "duo-a", "completed")
    queued = await store.create(new_job())
    running = await store.create(new_job())
    await store.request_cancel(queued.id)  # cancelled: finished too
    queued2 = await store.create(new_job())
    assert (await claimed(store, "duo-b")).id == running.id

    assert await store.purge(3600) == 0
    await asyncio.sleep(0.05)
    assert await store.purge(0.01) == 2
    assert await store.get(done.id) is None and await store.get(queued.id) is None
    assert await store.instances(done.id) == []
    assert await store.get(running.id) is not None and await store.get(queued2.id) is not None


async def test_jobs_survive_a_restart(open_store: OpenStore) -> None:
    first = await open_store()
    job = await first.create(new_job("s1"))
    await claimed(first)
    await first.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    await first.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 42)
    before = await first.get(job.id)
    await first.close()

    again = await open_store()  # start() again on an existing schema is a no-op upgrade
    assert await again.get(job.id) == before
    assert [r.state for r in await again.instances(job.id)] == ["stored", "pending"]
    assert await again.mark_stored(job.id, "duo-a", 0, instance(2).sop_instance_uid, 1)  # lease still held


async def test_a_schema_from_a_newer_duo_is_refused(open_store: OpenStore) -> None:
    store = await open_store()
    assert isinstance(store, SqlTransferStore)
    with store.backend.transaction(write=True) as tx:
        assert tx.rows("SELECT version FROM transfer_schema_version ORDER BY version") == [(1,), (2,)]
        tx.run("INSERT INTO transfer_schema_version (version) VALUES (99)")
    with pytest.raises(SchemaTooNew):
        await open_store()


def test_open_picks_the_backend_from_the_url(tmp_path: Path) -> None:
    default = TransferStore.open(None, tmp_path)
    assert isinstance(default, SqlTransferStore) and isinstance(default.backend, SqliteBackend)
    assert default.backend.path == tmp_path / "transfers.sqlite"
    relative = TransferStore.open(SecretStr("sqlite:///jobs/t.db"), tmp_path)
    assert isinstance(relative, SqlTransferStore) and isinstance(relative.backend, SqliteBackend)
    assert relative.backend.path == tmp_path / "jobs" / "t.db"
    absolute = TransferStore.open("sqlite:////srv/duo/t.db", tmp_path)
    assert isinstance(absolute, SqlTransferStore) and isinstance(absolute.backend, SqliteBackend)
    assert absolute.backend.path == Path("/srv/duo/t.db")
    for url in ("postgresql://duo@127.0.0.1/duo", "postgres://duo@127.0.0.1/duo"):
        pg = TransferStore.open(url, tmp_path)
        assert isinstance(pg, SqlTransferStore) and isinstance(pg.backend, PostgresBackend)
    with pytest.raises(ValueError, match="postgresql://"):
        TransferStore.open("mysql://x", tmp_path)


def test_expected_total_ignores_studies_that_ended_without_a_manifest() -> None:
    def study(i: int, state: str, expected: int | None) -> StudyProgress:
        return StudyProgress(i, f"s{i}", state, expected, 0, 0, 0, None)  # type: ignore[arg-type]

    now = datetime.now(UTC)
    job = Job(id="j", state="running", created_at=now, updated_at=now, requester={}, destination={},
              local_patient_id=None, studies=(study(0, "completed", 3), study(1, "failed", None)),
              errors=(), cancel_requested=False, owner="duo-a", lease_expires_at=now, revision=1)
    assert job.instances_expected == 3
    waiting = Job(**{**job.__dict__, "studies": (*job.studies, study(2, "running", None))})
    assert waiting.instances_expected is None


async def test_parallel_writes_to_one_job_are_all_counted(store: TransferStore) -> None:
    """Several associations of one worker report at once; the job row lock keeps every count right."""
    job = await store.create(new_job("s1"))
    await claimed(store)
    await store.add_expected(job.id, "duo-a", 0, [instance(n) for n in range(24)])
    start = await store.revision(job.id)
    outcomes = await asyncio.gather(
        *(store.mark_stored(job.id, "duo-a", 0, instance(n % 16).sop_instance_uid, 10) for n in range(32)),
        *(store.mark_failed(job.id, "duo-a", 0, [instance(n).sop_instance_uid], "refused")
          for n in range(16, 24)))
    assert outcomes[:32].count(True) == 16
    fresh = await store.get(job.id)
    assert fresh is not None and start is not None
    assert (fresh.instances_stored, fresh.instances_failed, fresh.bytes) == (16, 8, 160)
    assert fresh.revision == start + 16 + 8


async def test_postgres_claim_skips_a_row_another_replica_is_locking(postgres_server: Postgres) -> None:
    import psycopg

    url = postgres_server.create_database("skip")
    store = TransferStore.open(url, Path("/nonexistent"))
    await store.start()
    try:
        first = await store.create(new_job("s1"))
        second = await store.create(new_job("s2"))
        with psycopg.connect(url) as other:  # a replica in the middle of claiming the oldest job
            other.execute("SELECT id FROM transfer_jobs WHERE id = %s FOR UPDATE", (first.id,))
            got = await asyncio.wait_for(store.claim("duo-a", 30), timeout=5)
            assert got is not None and got.id == second.id
            other.rollback()
        assert (await claimed(store, "duo-b")).id == first.id
    finally:
        await store.close()


async def test_the_sqlite_file_is_private(tmp_path: Path) -> None:
    store = TransferStore.open(None, tmp_path / "var")
    await store.start()
    try:
        await store.create(new_job())
        assert (tmp_path / "var" / "transfers.sqlite").stat().st_mode & 0o077 == 0
        assert (tmp_path / "var" / "transfers.sqlite-wal").stat().st_mode & 0o077 == 0
    finally:
        await store.close()


async def test_postgres_replaces_connections_the_server_dropped(postgres_server: Postgres) -> None:
    import psycopg

    url = postgres_server.create_database("drop")
    store = SqlTransferStore(PostgresBackend(url, check_idle_s=0))
    await store.start()
    try:
        job = await store.create(new_job())
        with psycopg.connect(url, autocommit=True) as admin:  # e.g. a server restart or an idle timeout
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
                          " WHERE datname = current_database() AND pid <> pg_backend_pid()")
        assert await store.get(job.id) == job
    finally:
        await store.close()


async def test_release_hands_a_running_job_back_keeping_what_was_stored(store: TransferStore) -> None:
    """A graceful stop: the job is queued again at once (no lease to wait for), stored rows stay."""
    job = await store.create(new_job())
    assert (await claimed(store, "duo-a", 60)).id == job.id
    await store.add_expected(job.id, "duo-a", 0, [instance(1), instance(2)])
    assert await store.mark_stored(job.id, "duo-a", 0, instance(1).sop_instance_uid, 10)
    assert await store.release(job.id, "duo-b") is False  # not duo-b's to give back
    assert await store.release(job.id, "duo-a") is True
    with pytest.raises(LeaseLost):
        await store.mark_stored(job.id, "duo-a", 0, instance(2).sop_instance_uid, 10)
    again = await claimed(store, "duo-b", 60)
    assert again.id == job.id and again.owner == "duo-b"
    assert [r.sop_instance_uid for r in await store.instances(job.id, 0, "stored")] == [
        instance(1).sop_instance_uid]
