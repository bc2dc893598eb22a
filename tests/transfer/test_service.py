"""TransferService without peers: what it refuses before a job exists, and what it queues."""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from duo_gateway.config.transfer import DestinationPacs, TransferConfig
from duo_gateway.consent import ConsentGate
from duo_gateway.mitz.client import ConsentDecision
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.sources.dicom_pacs import DicomPacsSource
from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.jobstore import TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.service import AdhocDestination, TransferRefused, TransferRequest, TransferService
from duo_gateway.xua import Claims
from tests.support.gateway import make_config

BSN = "999911120"
CLAIMS = Claims(uzi="000095254", role="01.015", ura="00000666", organisation_type="V6")
#: The TLB client (calling system) the test's requests come from.
CLIENT = "tlb:umc-timeline"
TLB_REF = StudyRef("tlb", "1.2.3", "urn:oid:1.2", hospital_ura="00010001")


def _seal(ids: StudyIds, ref: StudyRef = TLB_REF, *, ura: str = CLAIMS.ura, now: float | None = None) -> str:
    return ids.seal(ref, BSN, ura=ura, now=now)
HOSPITAL = {"ura": "00010001", "name": "H1", "ae_title": "H1_PACS", "host": "127.0.0.1", "port": 9,
            "repository_unique_id": "1.2.3.4"}


class _RefusingMitz:
    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        return ConsentDecision(False, (), "not in this test", "error")


class _SilentMitz:
    """Never answers: a job asking it stays running until the service stops."""

    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        await asyncio.Event().wait()
        raise AssertionError("unreachable")


class _SlowToStopMitz:
    """Never answers, and takes 3 s to give up once cancelled (like a C-STORE being aborted)."""

    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            await asyncio.sleep(3)
            raise
        raise AssertionError("unreachable")


@asynccontextmanager
async def _service(tmp_path: Path, mitz: _RefusingMitz | _SilentMitz | _SlowToStopMitz | None = None,
                   **transfers: object) -> AsyncIterator[tuple[TransferService, StudyIds]]:
    config = make_config(tmp_path, mitz_port=9, hospitals=[HOSPITAL])
    cfg = TransferConfig.model_validate({"destinations": [
        DestinationPacs(name="own-pacs", ae_title="OWN", host="127.0.0.1", port=9, uras=["00000666"]),
        DestinationPacs(name="theirs", ae_title="THEIRS", host="127.0.0.1", port=9, uras=["00000777"])],
        "workers": 1, **transfers})
    config = config.model_copy(update={"transfers": cfg})
    ids = StudyIds(os.urandom(32))
    gate = ConsentGate(mitz or _RefusingMitz(), categories=config.mitz.categories)
    service = TransferService(config, store=TransferStore.open(None, tmp_path), study_ids=ids,
                              gate=gate, sources={h.ura: DicomPacsSource(
                                  h, "DUO", tmp_path / "spool") for h in config.tlb_hospitals}, retrievers={},
                              metrics=TransferMetrics(CollectorRegistry()), auditor=None)
    await service.start()
    try:
        yield service, ids
    finally:
        await service.stop()


async def _until_running(service: TransferService, job_id: str) -> None:
    for _ in range(100):
        current = await service.get(job_id, CLIENT)
        if current is not None and current.state == "running":
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the job was never claimed")


def _request(ids: list[str], destination: str | AdhocDestination = "own-pacs") -> TransferRequest:
    return TransferRequest(study_ids=tuple(ids), destination=destination, requester=CLAIMS, client=CLIENT)


async def test_refusals_before_any_job(tmp_path: Path) -> None:
    async with _service(tmp_path) as (service, ids):
        ref = StudyRef("tlb", "1.2.3", "urn:oid:1.2", hospital_ura="00010001")
        foreign = StudyIds(os.urandom(32)).seal(ref, BSN, ura=CLAIMS.ura)
        unknown_source = _seal(ids, StudyRef("xca", "1.2.3", "urn:oid:1.9.9", "1.2", "1.2.3.4"))
        good = _seal(ids)
        cases: list[tuple[TransferRequest, str]] = [
            (_request([]), "unknown-study"),
            (_request([foreign]), "unknown-study"),
            (_request([good, unknown_source]), "unknown-study"),
            (_request([good], "nowhere"), "unknown-destination"),
            (_request([good], "theirs"), "destination-not-allowed"),
            (_request([good], AdhocDestination("X", "127.0.0.1", 104)), "destination-not-allowed"),
            # A genuine id, but issued to another organisation's timeline, or long ago.
            (_request([_seal(ids, ura="00000777")]), "unknown-study"),
            (_request([_seal(ids, now=time.time() - ids.ttl_s - 1)]), "unknown-study"),
        ]
        for request, kind in cases:
            with pytest.raises(TransferRefused) as refused:
                await service.submit(request)
            assert refused.value.kind == kind, request
        assert await service.store.claim("probe", 5) is None  # nothing was queued


async def test_a_queued_job_runs_and_ends_with_a_reason(tmp_path: Path) -> None:
    """Mitz cannot be reached here: the study fails with that reason, the job ends failed."""
    async with _service(tmp_path, retries=0) as (service, ids):
        ref = StudyRef("tlb", "1.2.3", "urn:oid:1.2", hospital_ura="00010001")
        good, again = ids.seal(ref, BSN, ura=CLAIMS.ura), ids.seal(ref, BSN, ura=CLAIMS.ura)
        assert good != again  # a fresh nonce per id
        job = await service.submit(_request([good, again, good]))
        assert len(job.studies) == 1  # the same study twice is one study, whichever timeline it came from
        seen = [j async for j in service.watch(job.id, CLIENT)]
        assert seen[-1].state == "failed"
        assert "consent could not be established" in (seen[-1].studies[0].detail or "")
        assert [j.revision for j in seen] == sorted({j.revision for j in seen})


async def test_a_watcher_reads_a_burst_of_changes_as_a_few_snapshots(tmp_path: Path) -> None:
    """A relay changes its job once per instance; a watcher must not reload the whole job per change."""
    async with _service(tmp_path, _SilentMitz()) as (service, ids):
        good = _seal(ids)
        job = await service.submit(_request([good]))
        await _until_running(service, job.id)
        seen: list[int] = []

        async def watch() -> None:
            async for snapshot in service.watch(job.id, CLIENT):
                seen.append(snapshot.revision)

        watcher = asyncio.create_task(watch())
        await asyncio.sleep(0.05)
        started = asyncio.get_running_loop().time()
        for _ in range(200):  # 200 changes, each announced, as a relay storing 200 instances does
            last = await service.store.renew(job.id, service.owner, 30)
            service._poke()
        burst_s = asyncio.get_running_loop().time() - started
        for _ in range(100):
            if seen and seen[-1] == last.revision:
                break
            await asyncio.sleep(0.02)
        watcher.cancel()
        assert seen[-1] == last.revision  # the latest state is always delivered
        # At most one read per WATCH_MIN_INTERVAL_S (0.2 s) during the burst, plus the first and last.
        assert len(seen) <= burst_s / 0.2 + 3, (len(seen), burst_s)


async def test_adhoc_destinations_when_allowed(tmp_path: Path) -> None:
    async with _service(tmp_path, allow_adhoc_destinations=True) as (service, ids):
        good = _seal(ids)
        job = await service.submit(_request([good], AdhocDestination("OTHER PACS", "127.0.0.1", 11112)))
        assert job.destination["adhoc"] is True and job.destination["ae_title"] == "OTHER PACS"
        assert service.runner.destination(job.destination).port == 11112
        cancelled = await service.cancel(job.id, CLIENT)
        assert cancelled is not None and cancelled.cancel_requested


async def test_a_graceful_stop_hands_running_jobs_back_to_the_queue(tmp_path: Path) -> None:
    async with _service(tmp_path, _SilentMitz()) as (service, ids):
        good = _seal(ids)
        job = await service.submit(_request([good]))
        await _until_running(service, job.id)
    # _service stopped it: the job is queued again, no owner, ready for the next worker.
    store = TransferStore.open(None, tmp_path)
    await store.start()
    try:
        after = await store.get(job.id)
        assert after is not None and after.state == "queued" and after.lease_expires_at is None
    finally:
        await store.close()


async def test_a_stop_waits_for_slow_jobs_only_as_long_as_it_is_given(tmp_path: Path) -> None:
    async with _service(tmp_path, _SlowToStopMitz()) as (service, ids):
        good = _seal(ids)
        job = await service.submit(_request([good]))
        await _until_running(service, job.id)
        started = asyncio.get_running_loop().time()
        await service.stop(timeout_s=0.3)
        assert asyncio.get_running_loop().time() - started < 2.0  # not the job's 3 s
    store = TransferStore.open(None, tmp_path)
    await store.start()
    try:
        after = await store.get(job.id)
        assert after is not None and after.state == "queued"  # handed back all the same
    finally:
        await store.close()


async def test_a_job_is_its_submitting_clients_alone(tmp_path: Path) -> None:
    async with _service(tmp_path, _SilentMitz()) as (service, ids):
        first = await service.submit(_request([_seal(ids)]))
        second = await service.submit(_request([_seal(ids)]))
        other = "tlb:another-hospital"
        assert await service.get(first.id, other) is None
        assert await service.cancel(first.id, other) is None
        assert [j async for j in service.watch(first.id, other)] == []
        assert await service.list_jobs(other, limit=10) == []
        current = await service.get(first.id, CLIENT)
        assert current is not None and not current.cancel_requested  # the foreign cancel did nothing
        assert current.client == CLIENT and current.client_ura == CLAIMS.ura
        listed = await service.list_jobs(CLIENT, limit=10)
        assert [j.id for j in listed] == [second.id, first.id]  # newest first
        assert [j.id for j in await service.list_jobs(CLIENT, limit=1, offset=1)] == [first.id]


async def test_the_refusal_of_a_foreign_or_expired_id_says_which(tmp_path: Path) -> None:
    async with _service(tmp_path) as (service, ids):
        with pytest.raises(TransferRefused, match="another organisation"):
            await service.submit(_request([_seal(ids, ura="00000777")]))
        with pytest.raises(TransferRefused, match="expired"):
            await service.submit(_request([_seal(ids, now=time.time() - ids.ttl_s - 1)]))
