"""Transfers as the TLB API sees them: submit, read, cancel, watch; and the workers that run them.

Jobs live in the :class:`~duo_gateway.transfer.jobstore.TransferStore`, never only in this process:
the API answers 202 as soon as the job is stored, any replica's worker may claim it, and a watcher
(server-sent events) reads progress from the store, so it works whichever replica runs the job. The
local runner pokes watchers on every change so progress shows without waiting for the poll.

A submitted study id is opened (unsealed) at once: an id DUO did not issue, or for a source DUO no
longer knows, is the caller's error and answered as such, not discovered later by a worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import os
import re
import socket
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import Peer
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.consent import ConsentGate
from duo_gateway.sources.base import ImagingSource
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.jobstore import Job, LeaseLost, NewJob, TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.runner import JobRunner
from duo_gateway.xca.initiating.retriever import CommunityRetriever
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

#: How often an idle worker looks for queued work (a submit here wakes it at once).
CLAIM_POLL_S: Final = 1.0
#: How often a watcher re-reads a job it has not been poked about (another replica runs it).
WATCH_POLL_S: Final = 0.5
#: At most one re-read per watcher this often: a relay changes the job once per instance, and a
#: watcher reading the whole job on each of 10k changes would cost the store 10k full loads.
WATCH_MIN_INTERVAL_S: Final = 0.2

RefusalKind = Literal["unknown-study", "unknown-destination", "destination-not-allowed"]


class TransferRefused(Exception):
    """A request DUO will not queue; ``kind`` picks the API problem, ``detail`` says what to fix."""

    def __init__(self, kind: RefusalKind, detail: str) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail


@dataclass(frozen=True)
class AdhocDestination:
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class TransferRequest:
    study_ids: tuple[str, ...]
    destination: str | AdhocDestination
    requester: Claims
    local_patient_id: str | None = None
    #: The configured client (TLB system) submitting it: the job's owner.
    client: str | None = None


class TransferService:
    def __init__(self, cfg: DuoConfig, *, store: TransferStore, study_ids: StudyIds, gate: ConsentGate,
                 sources: Mapping[str, ImagingSource], retrievers: Mapping[str, CommunityRetriever],
                 metrics: TransferMetrics, auditor: Auditor | None, identity: Peer | None = None,
                 owner: str | None = None) -> None:
        self.cfg = cfg
        self.store = store
        self._metrics = metrics
        #: Unique per process, readable in the store: which replica holds a job.
        self.owner = owner or f"{socket.gethostname()}:{os.getpid()}:{os.urandom(4).hex()}"
        #: Set (and replaced) on every change of any job here: watchers wait on the one they saw.
        self._changed = asyncio.Event()
        self._wake = asyncio.Event()
        self._stopping = False
        self._opened = False
        self._workers: list[asyncio.Task[None]] = []
        self._running: dict[str, asyncio.Task[Job]] = {}
        self._cancel_asked: set[str] = set()
        self.runner = JobRunner(cfg, store=store, owner=self.owner, study_ids=study_ids, gate=gate,
                                sources=sources, retrievers=retrievers, metrics=metrics,
                                changed=self._poke, auditor=auditor,
                                identity=identity or Peer(user_id=cfg.listeners.dicom.ae_title))

    # -- lifecycle -----------------------------------------------------------------------------
    async def open(self) -> None:
        """Open (and migrate) the job store: before the API listens, so no request meets a closed store."""
        if not self._opened:
            await self.store.start()
            self._opened = True

    async def start(self) -> None:
        """Start the workers: after DUO's own AE listens, since a resumed job may C-MOVE to it at once."""
        await self.open()
        self._workers = [asyncio.create_task(self._worker(n), name=f"transfer-worker-{n}")
                         for n in range(self.cfg.transfers.workers)]
        self._workers.append(asyncio.create_task(self._purger(), name="transfer-purge"))

    def end_watches(self) -> None:
        """Ends every event stream at its next wake-up, so an HTTP shutdown does not wait for jobs."""
        self._stopping = True
        self._poke()

    async def stop(self, timeout_s: float | None = None) -> None:
        """Stop working and hand unfinished jobs back to the queue, keeping what they stored, so a
        replica (or this one, restarted) resumes them at once rather than after the lease.

        ``timeout_s`` bounds the wait for cancelled jobs (a C-STORE being aborted can take the
        destination's timeout): one still unwinding after it is released all the same, and its
        late writes are refused by the store's fencing."""
        self._stopping = True
        self._wake.set()
        held = list(self._running)
        tasks = [*self._running.values(), *self._workers]
        for task in tasks:
            task.cancel()
        if tasks:
            _, slow = await asyncio.wait(tasks, timeout=timeout_s)
            if slow:
                log.warning("transfer_stop_timeout", still_unwinding=len(slow), timeout_s=timeout_s)
        for job_id in held:
            try:
                if await self.store.release(job_id, self.owner):
                    log.info("transfer_released", job=job_id)
            except Exception:
                # The lease lapses on its own; releasing only makes the resume sooner.
                log.exception("transfer_release_failed", job=job_id)
        await self.store.close()

    # -- API -----------------------------------------------------------------------------------
    async def submit(self, request: TransferRequest) -> Job:
        if not request.study_ids:
            raise TransferRefused("unknown-study", "name at least one study")
        by_uid: dict[str, str] = {}
        for n, study_id in enumerate(request.study_ids):
            try:
                study_uid = self.runner.check_study(study_id, request.requester.ura)
            except (LookupError, ValueError) as exc:
                raise TransferRefused("unknown-study", f"studies[{n}]: {exc}") from None
            # Ids carry a fresh nonce each time: the same study from two timelines is one study.
            by_uid.setdefault(study_uid, study_id)
        destination = self._destination(request.destination, request.requester)
        spec: dict[str, object] = {"name": destination.name, "ae_title": destination.ae_title,
                                   "host": destination.host, "port": destination.port}
        if isinstance(request.destination, AdhocDestination):
            spec |= {"adhoc": True, "uras": list(destination.uras)}
        claims = request.requester
        job = await self.store.create(NewJob(
            requester=dataclasses.asdict(claims), destination=spec, studies=tuple(by_uid.values()),
            local_patient_id=request.local_patient_id, client=request.client, client_ura=claims.ura))
        self._metrics.submitted.inc()
        log.info("transfer_submitted", job=job.id, studies=len(job.studies), destination=destination.name,
                 requester_ura=claims.ura)
        self._wake.set()
        return job

    async def get(self, job_id: str, client: str) -> Job | None:
        """The job, if ``client`` submitted it: to anyone else it does not exist."""
        job = await self.store.get(job_id)
        return job if job is not None and job.belongs_to(client) else None

    async def list_jobs(self, client: str, *, limit: int, offset: int = 0) -> list[Job]:
        return await self.store.list_for(client, limit=limit, offset=offset)

    async def cancel(self, job_id: str, client: str) -> Job | None:
        if await self.get(job_id, client) is None:
            return None
        job = await self.store.request_cancel(job_id)
        if job is not None:
            task = self._running.get(job_id)
            if task is not None:
                self._cancel_asked.add(job_id)
                task.cancel()
            self._poke()
        return job

    async def watch(self, job_id: str, client: str) -> AsyncIterator[Job]:
        """Every change of the job (by revision), ending with its final state; nothing for a job
        ``client`` did not submit."""
        if await self.get(job_id, client) is None:
            return
        seen = -1
        while True:
            changed = self._changed  # taken before reading: a change while reading still wakes us
            revision = await self.store.revision(job_id)
            if revision is None:
                return
            if revision != seen:
                job = await self.store.get(job_id)
                if job is None:
                    return
                seen = job.revision
                yield job
                if job.terminal:
                    return
            if self._stopping:
                return  # the job goes on elsewhere; a client reconnects to whichever replica serves it
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(changed.wait(), WATCH_POLL_S)
            if not self._stopping:
                await asyncio.sleep(WATCH_MIN_INTERVAL_S)  # let a burst of changes become one read

    # -- internals -----------------------------------------------------------------------------
    def _destination(self, wanted: str | AdhocDestination, claims: Claims) -> DestinationPacs:
        cfg = self.cfg.transfers
        if isinstance(wanted, AdhocDestination):
            if not cfg.allow_adhoc_destinations:
                raise TransferRefused("destination-not-allowed", "ad-hoc destinations are not allowed here; "
                                      "name a configured destination")
            # The name only labels the job (status, logs, audit); keep it within the names' alphabet.
            label = f"adhoc_{wanted.ae_title.strip()}_{wanted.host}_{wanted.port}"
            # An address the requester typed belongs to the requester's own organisation.
            return DestinationPacs(name=re.sub(r"[^A-Za-z0-9_.-]", "_", label)[:64], ae_title=wanted.ae_title,
                                   host=wanted.host, port=wanted.port, uras=[claims.ura])
        dest = next((d for d in cfg.destinations if d.name == wanted), None)
        if dest is None:
            raise TransferRefused("unknown-destination", f"no destination named {wanted!r} is configured")
        if claims.ura not in dest.uras:
            raise TransferRefused("destination-not-allowed",
                                  f"organisation {claims.ura} may not send to {wanted!r}")
        return dest

    def _poke(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    async def _worker(self, n: int) -> None:
        while not self._stopping:
            # Cleared before claiming, not after: a submit that lands in between still wakes a worker.
            self._wake.clear()
            try:
                job = await self.store.claim(self.owner, self.cfg.transfers.lease_s)
            except Exception:
                log.exception("transfer_claim_failed", worker=n)
                job = None
            if job is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), CLAIM_POLL_S)
                continue
            if job.id in self._running:
                # Our own claim lapsed (renewals failed for a while) and this worker took it again:
                # the runner already on it keeps it, and the claim just made is the renewal it missed.
                log.warning("transfer_reclaimed_own_job", job=job.id)
                continue
            try:
                await self._work(job)
            except asyncio.CancelledError:
                raise
            except Exception:
                # A worker must outlive any one job (e.g. the store failing while it ends a job).
                log.exception("transfer_worker_error", worker=n, job=job.id)

    async def _work(self, job: Job) -> None:
        task = asyncio.create_task(self.runner.run(job), name=f"transfer-{job.id}")
        self._running[job.id] = task
        self._metrics.running.inc()
        heartbeat = asyncio.create_task(self._heartbeat(job.id, task))
        try:
            await task
        except asyncio.CancelledError:
            if job.id in self._cancel_asked:
                with contextlib.suppress(LeaseLost):
                    await self.store.finish(job.id, self.owner, "cancelled", ["cancelled by the requester"])
                    self._metrics.jobs.labels("cancelled").inc()
                    log.info("transfer_cancelled", job=job.id)
            elif self._stopping:
                raise
            else:
                log.warning("transfer_stopped_claim_lost", job=job.id)
        except LeaseLost:
            log.warning("transfer_lease_lost", job=job.id)
        except Exception:
            log.exception("transfer_job_crashed", job=job.id)
            with contextlib.suppress(Exception):
                await self.store.finish(job.id, self.owner, "failed", ["internal error; see the gateway log"])
        finally:
            heartbeat.cancel()
            self._running.pop(job.id, None)
            self._cancel_asked.discard(job.id)
            self._metrics.running.dec()
            self._poke()

    async def _heartbeat(self, job_id: str, task: asyncio.Task[Job]) -> None:
        """Keeps the claim alive; stops the job when it was cancelled elsewhere or the claim was lost."""
        period = self.cfg.transfers.lease_s / 3
        while not task.done():
            await asyncio.sleep(period)
            try:
                job = await self.store.renew(job_id, self.owner, self.cfg.transfers.lease_s)
            except LeaseLost:
                task.cancel()
                return
            except Exception:
                log.exception("transfer_renew_failed", job=job_id)
                continue
            if job.cancel_requested:
                self._cancel_asked.add(job_id)
                task.cancel()
                return

    async def _purger(self) -> None:
        while not self._stopping:
            try:
                purged = await self.store.purge(self.cfg.transfers.keep_finished_s)
                if purged:
                    log.info("transfer_jobs_purged", count=purged)
            except Exception:
                log.exception("transfer_purge_failed")
            await asyncio.sleep(3600)


__all__ = ["AdhocDestination", "TransferRefused", "TransferRequest", "TransferService"]
