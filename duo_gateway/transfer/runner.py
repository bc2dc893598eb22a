"""One claimed transfer job, worked through: fetch each study, relay every instance, verify, finish.

The rules that make a transfer trustworthy, and where they live here:

- **An instance counts as stored only on a success (or warning) status from the destination**,
  recorded in the job store right after that status and before the next instance; a crash in between
  re-sends that one instance on resume, which a PACS treats as the same object (same SOP Instance UID).
- **Resume fetches only what is missing**: the manifest is re-read (the source may have changed,
  and a resumed job must ask Mitz again), merged idempotently with what the store already knows, and
  only instances not yet stored are asked for.
- **Transient is retried, permanent is recorded**: an association refused, a timeout, a destination
  "out of resources" or a source outage is retried with exponential backoff and full jitter; a
  refusal (no consent, an unknown study, a destination rejecting an object) is not, because
  repeating it only repeats it.
- **Completed means exactly the manifest**: the stored SOP Instance UIDs must equal the manifest's;
  otherwise the study is ``partial`` (some stored) or ``failed`` (none), with the missing listed.
- **Every write is fenced by the claim** (:class:`~duo_gateway.transfer.jobstore.LeaseLost`): a job taken
  over by another replica stops here without touching its state.
"""

from __future__ import annotations

import asyncio
import random
import ssl
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, AsyncExitStack, aclosing
from dataclasses import dataclass
from pathlib import Path
from typing import Final, Protocol

import structlog
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import Peer, Requestor
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.consent import ConsentGate
from duo_gateway.dicom.reconcile import reconcile_file
from duo_gateway.dicom.store_scu import StoreClient, StoreResult, StoreUnavailable
from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE
from duo_gateway.sources.base import ImagingSource
from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.tls import client_context
from duo_gateway.transfer.audit import audit_study
from duo_gateway.transfer.fetch import Fetched, FetchFailed, Missed, StudyFetcher
from duo_gateway.transfer.jobstore import (
    ExpectedInstance,
    InstanceRow,
    Job,
    JobState,
    StudyProgress,
    StudyState,
    TransferStore,
)
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.sources import StudySources
from duo_gateway.xca.initiating.retriever import CommunityRetriever
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

#: How many missing UIDs a study's detail names; the full list is in the instance rows.
SHOWN_MISSING: Final = 10


class DestinationClient(Protocol):
    """What the runner needs of one association towards the destination (a :class:`StoreClient`)."""

    def expect(self, pairs: Iterable[tuple[str, str]]) -> None: ...

    async def store(self, path: Path, *, sop_class_uid: str, sop_instance_uid: str,
                    transfer_syntax_uid: str) -> StoreResult: ...


#: Opens one destination client (destination, DUO's calling AE title, TLS context); the runner enters
#: it as an async context manager for the job's duration.
DestinationClients = Callable[[DestinationPacs, str, ssl.SSLContext | None],
                              AbstractAsyncContextManager[DestinationClient]]
#: The fetcher for one copy of a study (its ref, the patient's BSN, the requester); raises
#: LookupError when DUO no longer knows that copy's source.
FetcherFactory = Callable[[StudyRef, str, Claims], StudyFetcher]


def _store_client(destination: DestinationPacs, calling_ae: str,
                  tls: ssl.SSLContext | None) -> AbstractAsyncContextManager[DestinationClient]:
    return StoreClient(destination, calling_ae, tls=tls)


@dataclass(frozen=True)
class StudyOutcome:
    state: StudyState
    detail: str
    stored: int
    #: The copy the study was fetched from (None when no source could be used at all).
    ref: StudyRef | None = None


class _GroupCommit:
    """The "stored" records of one job's relays, written as a group commit.

    Each relay still waits for its own record before it takes the next instance, so the durability
    rule of the module docstring holds unchanged: at most the one instance in flight per association
    is re-sent after a crash. What is shared is the transaction: while one is being written, the
    records that other relays finish meanwhile queue up and go together in the next one, so with N
    associations a store pays up to N times fewer thread hops, fences and commits. A lone relay (or a
    slow source) writes one record per transaction, exactly as before.
    """

    def __init__(self, store: TransferStore, job_id: str, owner: str) -> None:
        self._store = store
        self._job_id = job_id
        self._owner = owner
        self._queued: list[tuple[tuple[int, str, int], asyncio.Future[bool]]] = []
        self._writer: asyncio.Task[None] | None = None

    async def stored(self, index: int, sop_instance_uid: str, nbytes: int) -> bool:
        """:meth:`TransferStore.mark_stored`, committed with whatever else is waiting."""
        done: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._queued.append(((index, sop_instance_uid, nbytes), done))
        if self._writer is None:
            self._writer = asyncio.create_task(self._write(), name=f"stored-{self._job_id}")
        # Shielded: a relay cancelled while its record is written must not cancel the others' write.
        return await asyncio.shield(done)

    async def _write(self) -> None:
        try:
            while self._queued:
                group, self._queued = self._queued, []
                try:
                    firsts = await self._store.mark_stored_many(self._job_id, self._owner,
                                                                [mark for mark, _ in group])
                except Exception as exc:  # LeaseLost above all: every relay of the job must stop
                    for _, done in group:
                        if not done.done():
                            done.set_exception(exc)
                            done.exception()  # retrieved: a waiter cancelled meanwhile never reads it
                    continue
                except BaseException:
                    for _, done in group:
                        done.cancel()
                    raise
                for (_, done), first in zip(group, firsts, strict=True):
                    if not done.done():
                        done.set_result(first)
        finally:
            self._writer = None
            for _, done in self._queued:  # only left when the writer itself was cancelled
                done.cancel()
            self._queued = []


class _Relay:
    """Reconcile (when asked) and C-STORE one fetched instance, with retries for transient failures."""

    def __init__(self, runner: JobRunner, job: Job, index: int, client: DestinationClient,
                 issuer: str | None, bsn: str, marks: _GroupCommit) -> None:
        self._r = runner
        self._marks = marks
        self._issuer = issuer
        self._bsn = bsn
        self._job = job
        self._index = index
        self._client = client

    async def __call__(self, item: Fetched) -> bool:
        """True when the failure (if any) was transient, so another pass may still store it."""
        job, cfg = self._job, self._r.cfg.transfers
        paths = [item.file()]
        try:
            sop_uid, sop_class, syntax = item.sop_instance_uid, item.sop_class_uid, item.transfer_syntax_uid
            path = item.file()
            try:
                if sop_class is None or syntax is None:
                    meta = await asyncio.to_thread(read_file_meta_info, path)
                    sop_uid = str(meta.get("MediaStorageSOPInstanceUID", ""))
                    sop_class = str(meta.get("MediaStorageSOPClassUID", ""))
                    syntax = str(meta.get("TransferSyntaxUID", ""))
                if sop_uid != item.sop_instance_uid or not sop_class or not syntax:
                    await self._failed(item, "the source sent an object that is not the instance asked for")
                    return True
                if job.local_patient_id:
                    original, path = path, path.with_name(path.name + ".reconciled")
                    paths.append(path)
                    await asyncio.to_thread(reconcile_file, original, path,
                                            local_patient_id=job.local_patient_id, issuer=self._issuer,
                                            bsn=self._bsn)
            except (InvalidDicomError, ValueError, OSError) as exc:
                # This object is unusable; the others of the study are not affected by it. A new
                # fetch may bring an intact copy, so another pass may try it again.
                await self._failed(item, f"the source's object could not be read: {exc}")
                return True
            for attempt in range(cfg.retries + 1):
                last = attempt == cfg.retries
                try:
                    result = await self._client.store(path, sop_class_uid=sop_class, sop_instance_uid=sop_uid,
                                                      transfer_syntax_uid=syntax)
                except StoreUnavailable as exc:
                    if last or not exc.retryable:
                        await self._failed(item, f"destination unavailable: {exc.detail}")
                        return exc.retryable
                    await self._r.backoff(attempt)
                    continue
                if result.outcome in ("stored", "warning"):
                    first = await self._marks.stored(self._index, sop_uid, item.size)
                    if first:
                        self._r.metrics.instances.labels("stored").inc()
                        self._r.metrics.bytes.inc(item.size)
                    self._r.changed()
                    return False
                if result.outcome == "transient" and not last:
                    await self._r.backoff(attempt)
                    continue
                # A verdict DUO reached itself (lossy data the destination declines, a stream that will
                # not decode) is not the destination's answer: no status code of its to quote.
                await self._failed(item, f"not sent: {result.detail}" if result.local
                                   else f"destination: {result.detail} (status 0x{result.status:04X})")
                return result.outcome == "transient"
            return True  # pragma: no cover - the loop always returns
        finally:
            for p in paths:
                p.unlink(missing_ok=True)

    async def _failed(self, item: Fetched, detail: str) -> None:
        self._r.metrics.instances.labels("failed").inc()
        await self._r.store.mark_failed(self._job.id, self._r.owner, self._index, [item.sop_instance_uid],
                                        detail)
        self._r.changed()


class JobRunner:
    """Runs claimed jobs for one DUO process (``owner``); one instance shared by its workers."""

    def __init__(self, cfg: DuoConfig, *, store: TransferStore, owner: str, study_ids: StudyIds,
                 gate: ConsentGate, sources: Mapping[str, ImagingSource],
                 retrievers: Mapping[str, CommunityRetriever], metrics: TransferMetrics,
                 changed: Callable[[], None], auditor: Auditor | None, identity: Peer,
                 rng: random.Random | None = None, destination_clients: DestinationClients = _store_client,
                 fetchers: FetcherFactory | None = None) -> None:
        """``destination_clients`` and ``fetchers`` are the runner's two I/O ports (C-STORE out, study
        in); by default a :class:`StoreClient` per association and the TLB/XCA fetchers built from
        ``sources``/``retrievers``. Tests pass fakes to drive the transfer rules without sockets."""
        self.cfg = cfg
        self.store = store
        self.owner = owner
        self.metrics = metrics
        self.changed = changed
        self._ids = study_ids
        self._gate = gate
        #: Which configured hospital or community serves a reference, and its fetcher.
        self.study_sources = StudySources(cfg, gate=gate, sources=sources, retrievers=retrievers)
        self._auditor = auditor
        self._identity = identity
        self._rng = rng or random.SystemRandom()
        self._destination_clients = destination_clients
        self._make_fetcher: FetcherFactory = fetchers or self.study_sources.fetcher

    async def backoff(self, attempt: int) -> None:
        cfg = self.cfg.transfers
        await asyncio.sleep(self._rng.uniform(0, cfg.retry_backoff_s * 2 ** attempt))

    def destination(self, spec: Mapping[str, object], owner_ura: str | None = None) -> DestinationPacs:
        """The job's destination, re-read from the current configuration when it is a named one, so an
        operator's correction (new port, TLS) applies to resumed jobs too. An ad-hoc one belongs to the
        organisation that typed it (``owner_ura`` for a job queued before that was recorded)."""
        name = spec.get("name")
        if spec.get("adhoc"):
            fields = {k: spec[k] for k in ("name", "ae_title", "host", "port", "uras") if k in spec}
            if "uras" not in fields and owner_ura is not None:
                fields["uras"] = [owner_ura]
            return DestinationPacs.model_validate(fields)
        for dest in self.cfg.transfers.destinations:
            if dest.name == name:
                return dest
        raise LookupError(f"destination {name!r} is no longer configured")

    async def run(self, job: Job) -> Job:
        """Work the job to a final state; raises LeaseLost (fencing) or CancelledError unchanged."""
        started = time.perf_counter()
        claims = Claims(**job.requester)
        try:
            destination = self.destination(job.destination, job.client_ura)
        except LookupError as exc:
            return await self._finish(job, "failed", [str(exc)])
        log.info("transfer_started", job=job.id, studies=len(job.studies), destination=destination.name,
                 resumed=any(s.state != "pending" for s in job.studies))
        outcomes: list[StudyOutcome | None] = []
        async with AsyncExitStack() as stack:
            # One client per association the destination allows: while one waits for its C-STORE
            # response (or the job store), another sends, so per-instance round trips overlap.
            ae = self.cfg.listeners.dicom.ae_title
            # One TLS context for all of them, built off the loop (it reads the CA bundle and keys).
            tls = (await asyncio.to_thread(client_context, destination.tls)
                   if destination.tls is not None else None)
            clients = [await stack.enter_async_context(self._destination_clients(destination, ae, tls))
                       for _ in range(destination.max_associations)]
            for study in job.studies:
                if study.state == "completed":
                    outcomes.append(None)
                    continue
                try:
                    outcome = await self._study(job, study, claims, clients, destination)
                except BaseException:
                    await self._audit_interrupted(job, study, destination)
                    raise
                outcomes.append(outcome)
                self._audit(job, study, outcome, destination)
        fresh = await self.store.get(job.id)
        assert fresh is not None
        states = [s.state for s in fresh.studies]
        errors = [f"study {s.index + 1}: {s.detail}" for s in fresh.studies
                  if s.state != "completed" and s.detail]
        if all(s == "completed" for s in states):
            final: JobState = "completed"
        elif fresh.instances_stored > 0 or "completed" in states or "partial" in states:
            final = "partial"
        else:
            final = "failed"
        seconds = time.perf_counter() - started
        # This run's bytes only: a resumed job already had some stored (by an earlier run or replica).
        moved = fresh.bytes - job.bytes
        if seconds > 0 and moved:
            self.metrics.throughput.observe(moved / seconds)
        log.info("transfer_finished", job=job.id, state=final, stored=fresh.instances_stored,
                 failed=fresh.instances_failed, seconds=round(seconds, 3))
        return await self._finish(job, final, errors)

    async def _finish(self, job: Job, state: JobState, errors: list[str]) -> Job:
        done = await self.store.finish(job.id, self.owner, state, errors)
        self.metrics.jobs.labels(state).inc()
        self.changed()
        return done

    def _audit(self, job: Job, study: StudyProgress, outcome: StudyOutcome,
               destination: DestinationPacs) -> None:
        if self._auditor is None:
            return
        try:
            sealed = self._ids.open(study.study_id)
        except ValueError:
            return  # an id that never opened fetched nothing and disclosed nothing
        ref = outcome.ref or sealed.ref
        hospital = next((h for h in self.cfg.tlb_hospitals if h.ura == ref.hospital_ura), None) \
            if ref.kind == "tlb" else None
        audit_study(self._auditor, gateway=self._identity, bsn=sealed.bsn, study_uid=ref.study_uid,
                    state=outcome.state, detail=outcome.detail, destination=destination, hospital=hospital,
                    stored=outcome.stored, requestor=Requestor.of(Claims(**job.requester), issuer=job.client),
                    stored_as=job.local_patient_id)

    async def _audit_interrupted(self, job: Job, study: StudyProgress, destination: DestinationPacs) -> None:
        """A study left mid-way (cancelled, claim lost, crashed) may already have disclosed instances
        to the destination, and a cancelled job never resumes: record what got there now."""
        try:
            fresh = await self.store.get(job.id)
        except Exception:
            log.exception("transfer_audit_read_failed", job=job.id)
            return
        progress = fresh.studies[study.index] if fresh is not None else study
        self._audit(job, study, StudyOutcome("cancelled", "interrupted before the study finished",
                                             progress.instances_stored), destination)

    def check_study(self, study_id: str, ura: str) -> str:
        """The study's instance UID; raises ValueError for an id DUO did not issue (StudyIdRefused for
        one issued to another organisation or expired), LookupError when DUO knows none of its sources."""
        problems: list[str] = []
        sealed = self._ids.open(study_id)
        sealed.check_use(ura)
        for ref in sealed.refs:
            try:
                self.study_sources.check(ref)
                return ref.study_uid
            except LookupError as exc:
                problems.append(str(exc))
        raise LookupError("; ".join(problems))

    def _fetchers(self, refs: Sequence[StudyRef], bsn: str,
                  claims: Claims) -> tuple[list[tuple[StudyRef, StudyFetcher]], list[str]]:
        """A fetcher for every copy DUO still knows the source of, in the timeline's order (TLB
        first), and why the others cannot be used."""
        fetchers: list[tuple[StudyRef, StudyFetcher]] = []
        skipped: list[str] = []
        for ref in refs:
            try:
                fetchers.append((ref, self._make_fetcher(ref, bsn, claims)))
            except LookupError as exc:
                skipped.append(str(exc))
        return fetchers, skipped

    async def _study(self, job: Job, study: StudyProgress, claims: Claims, clients: list[DestinationClient],
                     destination: DestinationPacs) -> StudyOutcome:
        index = study.index
        try:
            sealed = self._ids.open(study.study_id)
        except ValueError as exc:
            return await self._set(job, index, "failed", str(exc), source="unknown")
        candidates, reasons = self._fetchers(sealed.refs, sealed.bsn, claims)
        await self.store.set_study(job.id, self.owner, index, "running")
        self.changed()

        # The first copy whose source gives a manifest is the one fetched; the others are fallbacks
        # for a source that is down, refuses, or has no consent, never mixed within one study.
        chosen: tuple[StudyRef, StudyFetcher, list[ExpectedInstance]] | None = None
        for ref, candidate in candidates:
            manifest = await self._manifest(job, index, candidate)
            if isinstance(manifest, str):
                reasons.append(manifest)
                log.info("transfer_source_unusable", job=job.id, study=index, source=candidate.source)
                continue
            chosen = (ref, candidate, manifest)
            break
        if chosen is None:
            return await self._set(job, index, "failed", "; ".join(reasons) or "no source", source="none")
        ref, fetcher, expected = chosen
        await self.store.add_expected(job.id, self.owner, index, expected)
        self.changed()
        # One association proposing every SOP class of the study, instead of re-associating mid-study.
        pairs = [(sop_class, ts) for sop_class in {e.sop_class_uid for e in expected}
                 for ts in UNCOMPRESSED_LE]
        for client in clients:
            client.expect(pairs)
        marks = _GroupCommit(self.store, job.id, self.owner)
        relays = [_Relay(self, job, index, client, destination.patient_id_issuer, sealed.bsn, marks)
                  for client in clients]
        cfg = self.cfg.transfers
        listed = {e.sop_instance_uid for e in expected}
        for attempt in range(cfg.retries + 1):
            # Only what this source's manifest lists can be asked of it (a resume may follow a fallback).
            pending = [ExpectedInstance(r.sop_instance_uid, r.series_instance_uid, r.sop_class_uid)
                       for r in await self.store.instances(job.id, index)
                       if r.state != "stored" and r.sop_instance_uid in listed]
            if not pending:
                break
            transient = await self._pass(job, index, fetcher, pending, relays)
            if not transient or attempt == cfg.retries:
                break
            log.info("transfer_study_retry", job=job.id, study=index, pending=len(pending),
                     attempt=attempt + 1)
            await self.backoff(attempt)
        return await self._verify(job, index, expected, fetcher.source, ref)

    async def _manifest(self, job: Job, index: int, fetcher: StudyFetcher) -> list[ExpectedInstance] | str:
        """The source's manifest, retried while its failures are transient; else why not."""
        cfg = self.cfg.transfers
        for attempt in range(cfg.retries + 1):
            try:
                return await fetcher.manifest()
            except FetchFailed as exc:
                if not exc.retryable or attempt == cfg.retries:
                    return exc.detail
                log.info("transfer_manifest_retry", job=job.id, study=index, attempt=attempt + 1)
                await self.backoff(attempt)
        raise AssertionError("unreachable")  # pragma: no cover

    async def _pass(self, job: Job, index: int, fetcher: StudyFetcher, pending: list[ExpectedInstance],
                    relays: list[_Relay]) -> bool:
        """One fetch of everything pending; True when something failed in a way worth another pass.

        The source is read here while ``relays`` (one per destination association) store what
        arrived; the queue between them is small, so the source waits for the destination rather
        than filling the spool. A relay that fails (e.g. the claim was lost) drains and deletes
        what is still queued, so the fetch never blocks on a dead consumer; the error is raised
        once all have stopped.
        """
        queue: asyncio.Queue[Fetched | None] = asyncio.Queue(maxsize=self.cfg.transfers.window)
        transient = False
        failure: BaseException | None = None

        async def consume(relay: _Relay) -> None:
            nonlocal transient, failure
            while (item := await queue.get()) is not None:
                if failure is not None:
                    item.file().unlink(missing_ok=True)
                    continue
                try:
                    # Not ``transient |= await relay(item)``: that reads ``transient`` before the await
                    # and writes it back after, erasing a retryable Missed the fetch loop recorded
                    # meanwhile (the study then ended partial without its retry pass).
                    again = await relay(item)
                    transient = transient or again
                except Exception as exc:
                    failure = failure or exc

        consumers = [asyncio.create_task(consume(r), name=f"relay-{job.id}-{n}")
                     for n, r in enumerate(relays)]
        try:
            async with aclosing(fetcher.fetch(pending)) as stream:
                async for item in stream:
                    if failure is not None:
                        break
                    if isinstance(item, Missed):
                        self.metrics.instances.labels("failed").inc()
                        await self.store.mark_failed(job.id, self.owner, index, [item.sop_instance_uid],
                                                     item.detail)
                        self.changed()
                        transient |= item.retryable
                    else:
                        await queue.put(item)
        except FetchFailed as exc:
            # Instances already stored by a relay stay stored: a late failure does not undo a success.
            await self.store.mark_failed(job.id, self.owner, index, [w.sop_instance_uid for w in pending],
                                         exc.detail)
            self.changed()
            transient |= exc.retryable
        except BaseException:
            # Cancelled (or worse): stop storing now; spooled files still queued are deleted.
            for task in consumers:
                task.cancel()
            await asyncio.gather(*consumers, return_exceptions=True)
            while not queue.empty():
                if (left := queue.get_nowait()) is not None:
                    left.file().unlink(missing_ok=True)
            raise
        for _ in consumers:
            await queue.put(None)
        done = await asyncio.gather(*consumers, return_exceptions=True)
        for outcome in done:
            if isinstance(outcome, BaseException):
                raise outcome
        if failure is not None:
            raise failure
        return transient

    async def _verify(self, job: Job, index: int, expected: list[ExpectedInstance], source: str,
                      ref: StudyRef) -> StudyOutcome:
        rows = await self.store.instances(job.id, index)
        stored = {r.sop_instance_uid for r in rows if r.state == "stored"}
        wanted = {e.sop_instance_uid for e in expected}
        missing = sorted(wanted - stored)
        if not missing:
            return await self._set(job, index, "completed", f"{len(stored)} instances stored and verified "
                                   "against the manifest", source=source, stored=len(stored),
                                   expected=len(wanted), ref=ref)
        missing_set = set(missing)
        reasons = _reasons([r for r in rows if r.sop_instance_uid in missing_set])
        shown = ", ".join(missing[:SHOWN_MISSING]) + (" ..." if len(missing) > SHOWN_MISSING else "")
        state: StudyState = "partial" if stored & wanted else "failed"
        return await self._set(job, index, state, f"{len(missing)} of {len(wanted)} instances missing "
                               f"({reasons}): {shown}", source=source, stored=len(stored & wanted),
                               expected=len(wanted), ref=ref)

    async def _set(self, job: Job, index: int, state: StudyState, detail: str, *, source: str,
                   stored: int = 0, expected: int = 0,
                   ref: StudyRef | None = None) -> StudyOutcome:
        await self.store.set_study(job.id, self.owner, index, state, detail)
        self.changed()
        log.info("transfer_study", job=job.id, study=index, state=state, source=source, stored=stored,
                 expected=expected)
        return StudyOutcome(state, detail, stored, ref)


def _reasons(rows: list[InstanceRow]) -> str:
    """The distinct last errors of the missing instances, most frequent first."""
    counts: dict[str, int] = {}
    for r in rows:
        counts[r.error or "not delivered"] = counts.get(r.error or "not delivered", 0) + 1
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])
    return "; ".join(f"{n}× {text}" for text, n in ranked[:3])


__all__ = ["DestinationClient", "DestinationClients", "FetcherFactory", "JobRunner", "StudyOutcome"]
