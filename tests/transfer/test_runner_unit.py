"""JobRunner's transfer rules, against a fake study source and a fake destination PACS, on the real job
store (SQLite in tmp_path): no DICOM association, no simulator, no Orthanc.

The end-to-end and durability tests show the rules hold through real PACSes; these show each rule
on its own, in milliseconds: an instance counts once the destination said so, a resume asks only
for what is not stored, transient failures are retried and permanent ones are not, a copy that
cannot be used falls back to the next, a lost claim stops the runner without touching the job,
cancellation leaves no spooled file behind, and the job's final state follows from its studies.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from duo_gateway.audit.messages import EventOutcome, Peer
from duo_gateway.consent import ConsentGate
from duo_gateway.dicom.store_scu import StoreUnavailable
from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.fetch import FetchFailed, Missed, StudyFetcher
from duo_gateway.transfer.jobstore import ExpectedInstance, Job, LeaseLost, NewJob, TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.runner import JobRunner
from duo_gateway.xua import Claims
from tests.support.fakes import (
    BSN,
    CLAIMS,
    HOME,
    FakeDestination,
    FakeFetcher,
    FakeMitz,
    FetchStep,
    RecordingAuditor,
    StoreStep,
    hospital,
    unit_config,
)
from tests.support.nosockets import no_sockets  # noqa: F401 - the fixture, used by name below

pytestmark = pytest.mark.usefixtures("no_sockets")

OWNER, OTHER_OWNER = "duo-a:1", "duo-b:2"
H1 = str(hospital(1)["ura"])
C1 = "urn:oid:2.16.528.1.1007.99.20001"
CT = "1.2.840.10008.5.1.4.1.1.2"
S1, S2 = "1.2.7.1", "1.2.7.2"
TLB_REF = StudyRef("tlb", S1, HOME, repository_unique_id=str(hospital(1)["repository_unique_id"]),
                   hospital_ura=H1)
XCA_REF = StudyRef("xca", S1, C1, repository_unique_id="2.16.528.1.1007.99.20001.1",
                   document_unique_id="1.2.7.1.99")


def manifest(study_uid: str = S1, n: int = 3) -> list[ExpectedInstance]:
    return [ExpectedInstance(f"{study_uid}.1.{i}", f"{study_uid}.1", CT) for i in range(1, n + 1)]


UIDS = [e.sop_instance_uid for e in manifest()]


@dataclass
class Rig:
    tmp_path: Path
    store: TransferStore
    ids: StudyIds
    destination: FakeDestination
    auditor: RecordingAuditor
    spool: Path
    fetchers: dict[tuple[str, str], FakeFetcher]
    asked: list[tuple[StudyRef, str, Claims]]

    def fetcher(self, ref: StudyRef, *manifests: list[ExpectedInstance] | FetchFailed,
                passes: Sequence[dict[str, FetchStep] | FetchFailed] = (), **kw: Any) -> FakeFetcher:
        fake = FakeFetcher(f"{ref.kind}:{ref.hospital_ura or ref.home_community_id}", self.spool,
                           list(manifests) or [manifest(ref.study_uid)], passes, **kw)
        self.fetchers[(ref.kind, ref.study_uid)] = fake
        return fake

    def make_fetcher(self, ref: StudyRef, bsn: str, claims: Claims) -> StudyFetcher:
        self.asked.append((ref, bsn, claims))
        try:
            return self.fetchers[(ref.kind, ref.study_uid)]
        except KeyError:
            raise LookupError(f"{ref.kind} source of {ref.study_uid} is not configured") from None

    def runner(self, owner: str = OWNER, *, retries: int = 2, associations: int = 1) -> JobRunner:
        config = unit_config(self.tmp_path, transfers={
            "destinations": [{"name": "home-pacs", "ae_title": "HOMEPACS", "host": "192.0.2.5", "port": 104,
                              "uras": [CLAIMS.ura], "max_associations": associations}],
            "retries": retries, "retry_backoff_s": 0.001})
        gate = ConsentGate(FakeMitz(default="Deny"), categories=config.mitz.categories)
        return JobRunner(config, store=self.store, owner=owner, study_ids=self.ids,
                         gate=gate, sources={}, retrievers={},
                         metrics=TransferMetrics(CollectorRegistry()), changed=lambda: None,
                         auditor=self.auditor, identity=Peer(user_id="DUO"), rng=random.Random(7),
                         destination_clients=self.destination, fetchers=self.make_fetcher)

    async def job(self, *refs: Sequence[StudyRef], owner: str = OWNER) -> Job:
        """A job for one study per ``refs`` entry (its copies, primary first), claimed by ``owner``."""
        ids = tuple(self.ids.seal(list(copies), BSN, ura=CLAIMS.ura) for copies in refs)
        await self.store.create(NewJob(requester=dataclasses.asdict(CLAIMS),
                                       destination={"name": "home-pacs"}, studies=ids, client="tlb-viewer",
                                       client_ura=CLAIMS.ura))
        claimed = await self.store.claim(owner, 30.0)
        assert claimed is not None
        return claimed

    async def spooled(self) -> list[Path]:
        return await asyncio.to_thread(lambda: sorted(self.spool.iterdir()))


@pytest.fixture
async def rig(tmp_path: Path) -> AsyncIterator[Rig]:
    store = TransferStore.open(None, tmp_path)
    await store.start()
    spool = tmp_path / "spool"
    spool.mkdir()
    try:
        yield Rig(tmp_path, store, StudyIds(os.urandom(32)), FakeDestination(), RecordingAuditor(tmp_path),
                  spool, {}, [])
    finally:
        await store.close()


def scripted(rig: Rig, script: dict[str, Sequence[StoreStep]],
             before: Callable[[str], object] | None = None) -> None:
    rig.destination.script = {k: list(v) for k, v in script.items()}
    rig.destination.before_store = before


async def test_every_instance_is_fetched_stored_and_verified(rig: Rig) -> None:
    fetcher = rig.fetcher(TLB_REF)
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert done.state == "completed"
    assert done.studies[0].state == "completed" and done.studies[0].instances_stored == 3
    assert sorted(rig.destination.held) == UIDS
    assert fetcher.fetch_calls == [UIDS]
    assert (CT, "1.2.840.10008.1.2.1") in rig.destination.expected, "SOP classes declared up front"
    assert await rig.spooled() == [], "every relayed file is deleted"
    assert rig.asked == [(TLB_REF, BSN, CLAIMS)]
    # A TLB source: its PACS to DUO, and DUO to the destination, both on the requester's behalf.
    assert [r.event.outcome for r in rig.auditor.records] == [EventOutcome.SUCCESS] * 2
    assert any(p.user_id == "HOMEPACS" for p in rig.auditor.records[1].participants)
    assert all(any(p.user_id.startswith(CLAIMS.uzi) for p in r.participants) for r in rig.auditor.records)


async def test_parallel_relays_share_commits_but_none_sends_on_before_its_record(rig: Rig) -> None:
    """The group commit: relays whose C-STOREs end together are recorded in one transaction, and still
    no relay starts another instance before its last one is recorded (at most one unrecorded instance
    per association: what a crash may re-send)."""
    uids = [e.sop_instance_uid for e in manifest(n=9)]
    rig.fetcher(TLB_REF, manifest(n=9))
    sent: list[str] = []
    recorded: list[str] = []
    groups: list[int] = []
    write = rig.store.mark_stored_many

    async def before(uid: str) -> None:
        assert len(sent) - len(recorded) < 3, "a relay sent on before its last instance was recorded"
        sent.append(uid)

    async def recording(job_id: str, owner: str, stored: Sequence[tuple[int, str, int]]) -> list[bool]:
        if not groups:  # hold the first write until the other two relays have their records queued
            for _ in range(1000):
                if len(rig.destination.held) >= 3:
                    break
                await asyncio.sleep(0)
        groups.append(len(stored))
        firsts = await write(job_id, owner, stored)
        recorded.extend(uid for _, uid, _ in stored)
        return firsts

    scripted(rig, {}, before=before)
    rig.store.mark_stored_many = recording  # type: ignore[method-assign]
    done = await rig.runner(associations=3).run(await rig.job([TLB_REF]))

    assert done.state == "completed" and done.instances_stored == 9
    assert sorted(rig.destination.held) == sorted(uids) and sorted(recorded) == sorted(uids)
    assert sum(groups) == 9 and max(groups) > 1 and len(groups) < 9, groups
    assert rig.destination.opened == 3
    assert await rig.spooled() == []


async def test_a_resume_fetches_only_what_is_not_stored_and_asks_the_source_again(rig: Rig) -> None:
    fetcher = rig.fetcher(TLB_REF)
    third_sent = asyncio.Event()
    scripted(rig, {UIDS[2]: ["hang", "stored"]},
             before=lambda uid: third_sent.set() if uid == UIDS[2] else None)
    job = await rig.job([TLB_REF])
    first = asyncio.create_task(rig.runner().run(job))
    await asyncio.wait_for(third_sent.wait(), 1.0)
    first.cancel()  # the process stops mid-C-STORE
    with pytest.raises(asyncio.CancelledError):
        await first
    assert await rig.spooled() == [], "a cancelled pass leaves no patient data in the spool"
    # What already reached the destination is audited now: a cancelled job may never resume.
    assert rig.auditor.records and all(r.event.outcome == EventOutcome.SERIOUS_FAILURE
                                       for r in rig.auditor.records)
    assert await rig.store.release(job.id, OWNER)

    resumed = await rig.store.claim(OTHER_OWNER, 30.0)
    assert resumed is not None and resumed.instances_stored == 2
    done = await rig.runner(OTHER_OWNER).run(resumed)

    assert done.state == "completed"
    assert fetcher.manifest_calls == 2, "a resumed job reads the manifest (and so asks consent) again"
    assert fetcher.fetch_calls == [UIDS, [UIDS[2]]]
    assert rig.destination.held.count(UIDS[0]) == 1 and rig.destination.held.count(UIDS[2]) == 1


async def test_transient_destination_failures_are_retried_and_a_refusal_is_not(rig: Rig) -> None:
    rig.fetcher(TLB_REF)
    scripted(rig, {UIDS[0]: [StoreUnavailable("association aborted"), "stored"],
                   UIDS[1]: ["refused"],
                   UIDS[2]: ["transient", "transient", "warning"]})
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert rig.destination.attempts.count(UIDS[0]) == 2
    assert rig.destination.attempts.count(UIDS[1]) == 1, "repeating a refusal only repeats it"
    assert rig.destination.attempts.count(UIDS[2]) == 3
    assert done.state == "partial"
    [study] = done.studies
    assert study.state == "partial" and study.instances_stored == 2
    assert study.detail is not None and UIDS[1] in study.detail and "0xC000" in study.detail


async def test_a_destination_that_stays_down_fails_the_instances_after_the_retries(rig: Rig) -> None:
    rig.fetcher(TLB_REF)
    scripted(rig, {uid: [StoreUnavailable("connection refused")] for uid in UIDS})
    done = await rig.runner(retries=1).run(await rig.job([TLB_REF]))

    assert done.state == "failed"
    # Per pass: the first try and one retry; then one more pass of the study for the transient failure.
    assert all(rig.destination.attempts.count(uid) == 4 for uid in UIDS)
    assert done.studies[0].detail is not None and "destination unavailable" in done.studies[0].detail


async def test_a_non_retryable_store_failure_is_not_retried(rig: Rig) -> None:
    rig.fetcher(TLB_REF)
    scripted(rig, {UIDS[0]: [StoreUnavailable("TLS certificate rejected", retryable=False)]})
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert rig.destination.attempts.count(UIDS[0]) == 1
    assert done.state == "partial"


async def test_a_transient_manifest_failure_is_retried(rig: Rig) -> None:
    fetcher = rig.fetcher(TLB_REF, FetchFailed("unavailable", "Mitz unreachable", retryable=True), manifest())
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert fetcher.manifest_calls == 2
    assert done.state == "completed"


async def test_no_consent_fails_the_study_at_once_and_nothing_is_fetched(rig: Rig) -> None:
    fetcher = rig.fetcher(TLB_REF, FetchFailed("error", "no consent: Mitz Deny", retryable=False))
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert fetcher.manifest_calls == 1
    assert fetcher.fetch_calls == []
    assert rig.destination.attempts == []
    assert done.state == "failed"
    assert done.studies[0].detail is not None and "no consent" in done.studies[0].detail


async def test_an_unusable_copy_falls_back_to_the_next_one(rig: Rig) -> None:
    tlb = rig.fetcher(TLB_REF, FetchFailed("error", "no consent: Mitz Deny", retryable=False))
    xca = rig.fetcher(XCA_REF)
    done = await rig.runner().run(await rig.job([TLB_REF, XCA_REF]))

    assert done.state == "completed"
    assert tlb.fetch_calls == [], "copies are never mixed within one study"
    assert xca.fetch_calls == [UIDS]


async def test_instances_the_source_missed_are_retried_only_when_transient(rig: Rig) -> None:
    fetcher = rig.fetcher(TLB_REF, passes=[
        {UIDS[0]: Missed(UIDS[0], "C-GET sub-operation failed", retryable=True),
         UIDS[1]: Missed(UIDS[1], "instance deleted at the source", retryable=False)},
        {UIDS[1]: Missed(UIDS[1], "instance deleted at the source", retryable=False)}])
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert fetcher.fetch_calls[:2] == [UIDS, [UIDS[0], UIDS[1]]]
    assert sorted(rig.destination.held) == [UIDS[0], UIDS[2]]
    [study] = done.studies
    assert done.state == "partial" and study.state == "partial"
    assert study.detail is not None and UIDS[1] in study.detail and "deleted at the source" in study.detail
    rows = {r.sop_instance_uid: r for r in await rig.store.instances(done.id, 0)}
    assert rows[UIDS[1]].state == "failed" and rows[UIDS[0]].state == "stored"


async def test_a_transient_miss_while_an_instance_is_being_stored_still_gets_its_retry_pass(rig: Rig) -> None:
    """The relay used to write ``transient |= await relay(item)``: the value read before its C-STORE
    overwrote the retryable Missed the fetch recorded meanwhile, and the study ended partial without
    its retry pass (an XCA community that dropped one RAD-75 mid-study, seen in the durability test)."""
    async def slow_first(uid: str) -> None:
        if uid == UIDS[0]:
            await asyncio.sleep(0.1)

    scripted(rig, {}, before=slow_first)
    fetcher = rig.fetcher(TLB_REF, passes=[
        {UIDS[1]: Missed(UIDS[1], "connection lost", retryable=True)}, {}])
    done = await rig.runner().run(await rig.job([TLB_REF]))

    assert fetcher.fetch_calls[:2] == [UIDS, [UIDS[1]]]
    assert done.state == "completed", done.studies
    assert sorted(rig.destination.held) == sorted(UIDS)


async def test_an_instance_the_source_silently_left_out_is_named_missing(rig: Rig) -> None:
    rig.fetcher(TLB_REF, passes=[{UIDS[2]: "skip"}])
    done = await rig.runner(retries=0).run(await rig.job([TLB_REF]))

    assert done.state == "partial"
    assert done.studies[0].detail is not None and UIDS[2] in done.studies[0].detail


async def test_a_lost_claim_stops_the_runner_without_touching_the_job(rig: Rig) -> None:
    rig.fetcher(TLB_REF)
    job = await rig.job([TLB_REF])

    async def taken_over(uid: str) -> None:
        if uid == UIDS[1]:  # our lease lapsed while this C-STORE ran, and another replica claimed it
            assert await rig.store.release(job.id, OWNER)
            assert await rig.store.claim(OTHER_OWNER, 30.0) is not None

    scripted(rig, {}, before=taken_over)
    with pytest.raises(LeaseLost):
        await rig.runner().run(job)

    after = await rig.store.get(job.id)
    assert after is not None
    assert after.owner == OTHER_OWNER and after.state == "running"
    assert after.instances_stored == 1, "nothing after the takeover was written by the old owner"
    assert await rig.spooled() == []


async def test_a_study_whose_sources_are_all_unknown_fails_and_the_job_is_partial(rig: Rig) -> None:
    rig.fetcher(TLB_REF)
    unknown = StudyRef("tlb", S2, HOME, hospital_ura="00019999")
    done = await rig.runner().run(await rig.job([TLB_REF], [unknown]))

    assert [s.state for s in done.studies] == ["completed", "failed"]
    assert done.studies[1].detail is not None and "not configured" in done.studies[1].detail
    assert done.state == "partial"
    assert done.errors and "study 2" in done.errors[0]


async def test_a_job_with_nothing_stored_is_failed(rig: Rig) -> None:
    unknown = StudyRef("tlb", S2, HOME, hospital_ura="00019999")
    done = await rig.runner().run(await rig.job([unknown]))

    assert done.state == "failed"
    assert rig.destination.attempts == []
