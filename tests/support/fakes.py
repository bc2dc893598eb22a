"""Fakes of the services' ports, for testing their decisions without sockets, simulators or PACSes.

Each fake does three things and nothing more: it records what it was asked, answers what the test
scripted, and can misbehave the way the real peer does (raise the real failure exception, answer
slowly, hang until cancelled). They check what the real port would check when that is part of the
contract the services rely on (a source refuses a Permit for another patient or hospital), so a
service that breaks the contract fails here too.

The ports faked here, and what implements them in production:

- :class:`FakeMitz`: the consent gate's ``ClosedQuestionAsker`` and the timeline's
  ``OpenQuestionAsker`` (:class:`~duo_gateway.mitz.client.MitzClient`);
- :class:`FakeSource`: :class:`~duo_gateway.sources.base.ImagingSource` (a TLB hospital's PACS);
- :class:`FakeCommunity`: the timeline's ``DocumentFinder`` (an XCA community's ITI-38 client);
- :class:`FakeFetcher`: :class:`~duo_gateway.transfer.fetch.StudyFetcher`;
- :class:`FakeDestination`: the runner's ``DestinationClients`` (C-STORE to the destination PACS);
- :class:`RecordingAuditor`: an :class:`~duo_gateway.audit.auditor.Auditor` that keeps its records
  in memory instead of writing them.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Literal

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import AuditMessage
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.consent import Permit
from duo_gateway.dicom.store_scu import StoreResult, StoreUnavailable
from duo_gateway.dicom.syntaxes import PREFERRED
from duo_gateway.mitz.client import ConsentDecision, Localization
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.mitz.xcpd import OpenQuestion
from duo_gateway.sources.base import (
    InstanceRecord,
    NotCovered,
    RetrievedInstance,
    SourceUnavailable,
    StudyRecord,
    retrieve_named_by_walk,
)
from duo_gateway.transfer.fetch import Fetched, FetchFailed, Missed
from duo_gateway.transfer.jobstore import ExpectedInstance
from duo_gateway.transfer.runner import DestinationClient
from duo_gateway.xca.initiating.finder import CommunityResponse
from duo_gateway.xua import Claims

#: What Mitz may answer to a closed question, plus how the client fails: ``error`` is the refusal
#: MitzClient makes of an outage, a timeout or garbage (it never raises); ``hang`` never answers.
ClosedScript = Literal["Permit", "Deny", "NotApplicable", "Indeterminate", "error", "hang"]


async def hang() -> None:
    """Wait until cancelled: a peer that accepted the request and never answers."""
    await asyncio.Event().wait()


def decision(script: ClosedScript, categories: int = 1) -> ConsentDecision:
    """The ConsentDecision MitzClient returns for ``script`` (see MitzClient._closed and _refuse)."""
    if script == "hang":
        raise ValueError("a hanging Mitz returns no decision")
    if script == "error":
        return ConsentDecision(False, (None,) * categories, "Mitz timed out", "error")
    return ConsentDecision(script == "Permit", (script,) * categories,
                           None if script == "Permit" else f"Mitz: {script}", "mitz")


class FakeMitz:
    """Closed questions answered per data holder (URA), open questions with a scripted localization."""

    def __init__(self, closed: Mapping[str, ClosedScript] | None = None, *, default: ClosedScript = "Permit",
                 localization: Localization | Literal["hang"] | None = None,
                 delay_s: Mapping[str, float] | None = None) -> None:
        self.closed = dict(closed or {})
        self.default: ClosedScript = default
        self.localization: Localization | Literal["hang"] = (
            localization if localization is not None else Localization(False, (), "not scripted"))
        self.delay_s = dict(delay_s or {})
        self.closed_asked: list[ClosedQuestion] = []
        self.open_asked: list[OpenQuestion] = []
        #: Questions whose asker gave up (cancelled) before an answer.
        self.abandoned: list[ClosedQuestion] = []

    def asked_about(self, holder_ura: str) -> list[ClosedQuestion]:
        return [q for q in self.closed_asked if q.holder_ura == holder_ura]

    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        self.closed_asked.append(question)
        script = self.closed.get(question.holder_ura, self.default)
        try:
            if script == "hang":
                await hang()
            await asyncio.sleep(self.delay_s.get(question.holder_ura, 0.0))
        except asyncio.CancelledError:
            self.abandoned.append(question)
            raise
        return decision(script, len(question.categories))

    async def open_question(self, question: OpenQuestion) -> Localization:
        self.open_asked.append(question)
        if self.localization == "hang":
            await hang()
            raise AssertionError("unreachable")
        return self.localization


@dataclass
class Call:
    """One call a fake received: the method and the arguments that matter for the assertions."""

    method: str
    bsn: str | None = None
    study_uid: str | None = None
    args: dict[str, object] = field(default_factory=dict)


class FakeSource:
    """A TLB hospital's PACS holding ``studies`` (and their ``instances``) of patients by BSN.

    Finds filter as a C-FIND would (patient, UIDs, study date range); every data-reading call checks
    the Permit the way DicomPacsSource does. ``fail`` makes every call raise it (an outage),
    ``hang`` makes every call wait until cancelled, ``delay_s`` answers slowly.
    """

    def __init__(self, holder_ura: str, *, studies: Iterable[StudyRecord] = (),
                 instances: Mapping[str, Sequence[InstanceRecord]] | None = None,
                 spool: Path | None = None) -> None:
        self.name = f"tlb:{holder_ura}"
        self.holder_ura = holder_ura
        self.studies = list(studies)
        self.instances = {k: list(v) for k, v in (instances or {}).items()}
        self.spool = spool
        self.fail: SourceUnavailable | None = None
        self.hang = False
        self.delay_s = 0.0
        #: Instances the PACS lists but does not deliver on retrieve.
        self.undeliverable: set[str] = set()
        self.calls: list[Call] = []
        self.cancelled = 0

    def methods(self) -> list[str]:
        return [c.method for c in self.calls]

    async def _behave(self) -> None:
        try:
            if self.hang:
                await hang()
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if self.fail is not None:
            raise self.fail

    def _check(self, permit: Permit, bsn: str) -> None:
        if not isinstance(permit, Permit) or not permit.covers(bsn, self.holder_ura):
            raise NotCovered(f"{self.name}: the Permit does not cover this patient and source")

    async def find_studies(self, permit: Permit, bsn: str, *, date_from: date | None = None,
                           date_to: date | None = None,
                           study_uids: Sequence[str] = ()) -> list[StudyRecord]:
        self.calls.append(Call("find_studies", bsn, None, {"date_from": date_from, "date_to": date_to,
                                                            "study_uids": tuple(study_uids)}))
        await self._behave()
        self._check(permit, bsn)
        low = date_from.strftime("%Y%m%d") if date_from else None
        high = date_to.strftime("%Y%m%d") if date_to else None
        return [s for s in self.studies
                if s.patient_id == bsn
                and (not study_uids or s.study_instance_uid in study_uids)
                and (low is None or (s.study_date or "") >= low)
                and (high is None or (s.study_date or "99999999") <= high)]

    async def find_instances(self, permit: Permit, bsn: str, study_uid: str, *,
                             modalities: Sequence[str] = (),
                             series: Collection[str] = (), lean: bool = False) -> list[InstanceRecord]:
        self.calls.append(Call("find_instances", bsn, study_uid, {"modalities": tuple(modalities),
                                                                   "series": tuple(sorted(series))}))
        await self._behave()
        self._check(permit, bsn)
        if not any(s.study_instance_uid == study_uid and s.patient_id == bsn for s in self.studies):
            return []
        return [i for i in self.instances.get(study_uid, []) if (not modalities or i.modality in modalities)
                and (not series or i.series_instance_uid in series)]

    async def patient_of_study(self, study_uid: str) -> str | None:
        self.calls.append(Call("patient_of_study", None, study_uid))
        await self._behave()
        return next((s.patient_id for s in self.studies if s.study_instance_uid == study_uid), None)

    def retrieve_named(self, permit: Permit, bsn: str, study_uid: str, named: Mapping[str, str], *,
                       transfer_syntaxes: Sequence[str] = PREFERRED, in_memory: bool = False,
                       ) -> AsyncGenerator[RetrievedInstance, None]:
        self.calls.append(Call("retrieve_named", bsn, study_uid, {"named": dict(named)}))
        return retrieve_named_by_walk(self, permit, bsn, study_uid, named,
                                      transfer_syntaxes=transfer_syntaxes)

    async def retrieve(self, permit: Permit, bsn: str, study_uid: str, instances: Sequence[InstanceRecord], *,
                       transfer_syntaxes: Sequence[str] = PREFERRED, in_memory: bool = False,
                       ) -> AsyncGenerator[RetrievedInstance, None]:
        self.calls.append(Call("retrieve", bsn, study_uid,
                               {"instances": tuple(i.sop_instance_uid for i in instances),
                                "transfer_syntaxes": tuple(transfer_syntaxes)}))
        await self._behave()
        self._check(permit, bsn)
        assert self.spool is not None, "a FakeSource that retrieves needs a spool directory"
        for record in instances:
            if record.sop_instance_uid in self.undeliverable:
                continue
            path = self.spool / f"{self.holder_ura}-{record.sop_instance_uid}.part10"
            data = f"instance {record.sop_instance_uid}".encode()
            path.write_bytes(data)
            yield RetrievedInstance(record, path, "1.2.840.10008.1.2.1", len(data))


class FakeCommunity:
    """An XCA community's ITI-38 client: a scripted CommunityResponse, late or never."""

    def __init__(self, response: CommunityResponse, *, delay_s: float = 0.0, hang: bool = False) -> None:
        self.response = response
        self.delay_s = delay_s
        self.hang = hang
        self.calls: list[Call] = []
        self.cancelled = 0

    async def find_documents(self, claims: Claims, bsn: str, date_from: date, date_to: date, *,
                             deadline_s: float) -> CommunityResponse:
        self.calls.append(Call("find_documents", bsn, None, {"claims": claims, "date_from": date_from,
                                                              "date_to": date_to, "deadline_s": deadline_s}))
        try:
            if self.hang:
                await hang()
            await asyncio.sleep(self.delay_s)
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        return self.response


#: What one fetch pass does with one instance: ``deliver`` it, ``skip`` it silently (the runner must
#: notice it never came), yield the given Missed, or raise the given FetchFailed at that point.
FetchStep = Literal["deliver", "skip"] | Missed | FetchFailed


class FakeFetcher:
    """A study's source for the transfer runner, spooling small files into ``spool``.

    ``manifests`` is consumed one per :meth:`manifest` call (the last one repeats): a list of
    instances, or a FetchFailed to raise. ``passes`` scripts each :meth:`fetch` call the same way
    (the last repeats; none means deliver everything asked); instances not named in a pass are
    delivered. ``hang_after`` makes a fetch hang (until cancelled) after that many deliveries.
    """

    def __init__(self, source: str, spool: Path, manifests: Sequence[list[ExpectedInstance] | FetchFailed],
                 passes: Sequence[Mapping[str, FetchStep] | FetchFailed] = (),
                 *, hang_after: int | None = None, with_header: bool = True) -> None:
        self.source = source
        self._spool = spool
        self._manifests = list(manifests)
        self._passes = list(passes)
        self.hang_after = hang_after
        self.with_header = with_header
        self.manifest_calls = 0
        self.fetch_calls: list[list[str]] = []
        self.delivered: list[Path] = []
        self.closed = 0

    async def manifest(self) -> list[ExpectedInstance]:
        step = self._manifests[min(self.manifest_calls, len(self._manifests) - 1)]
        self.manifest_calls += 1
        await asyncio.sleep(0)
        if isinstance(step, FetchFailed):
            raise step
        return list(step)

    async def fetch(self, wanted: Sequence[ExpectedInstance], *,
                    in_memory: bool = False) -> AsyncGenerator[Fetched | Missed, None]:
        n = len(self.fetch_calls)
        self.fetch_calls.append([w.sop_instance_uid for w in wanted])
        script = self._passes[min(n, len(self._passes) - 1)] if self._passes else {}
        try:
            if isinstance(script, FetchFailed):
                raise script
            sent = 0
            for w in wanted:
                step = script.get(w.sop_instance_uid, "deliver")
                if isinstance(step, FetchFailed):
                    raise step
                if isinstance(step, Missed):
                    yield step
                    continue
                if step == "skip":
                    continue
                if self.hang_after is not None and sent >= self.hang_after:
                    await hang()
                path = self._spool / f"{self.source.replace(':', '_')}-{w.sop_instance_uid}-{n}.dcm"
                data = f"instance {w.sop_instance_uid}".encode()
                path.write_bytes(data)
                self.delivered.append(path)
                sent += 1
                yield Fetched(w.sop_instance_uid, path, len(data),
                              sop_class_uid=w.sop_class_uid if self.with_header else None,
                              transfer_syntax_uid="1.2.840.10008.1.2.1" if self.with_header else None)
        finally:
            self.closed += 1


#: What the destination answers to one C-STORE: a StoreResult outcome, StoreUnavailable raised, or
#: ``hang`` (no response until cancelled).
StoreStep = Literal["stored", "warning", "transient", "refused", "hang"] | StoreUnavailable

_STATUS = {"stored": 0x0000, "warning": 0xB000, "transient": 0xA700, "refused": 0xC000}


class FakeDestination:
    """The destination PACS: every association the runner opens records into the same lists.

    ``script`` gives per SOP Instance UID the answers to successive C-STOREs of it (the last
    repeats); an instance not scripted is stored. ``before_store`` runs before each answer (e.g. to
    let another replica take the job over mid-transfer).
    """

    def __init__(self, script: Mapping[str, Sequence[StoreStep]] | None = None,
                 before_store: Callable[[str], object] | None = None) -> None:
        self.script = {k: list(v) for k, v in (script or {}).items()}
        self.before_store = before_store
        self.attempts: list[str] = []
        #: SOP Instance UIDs the destination now holds (stored or stored with a warning).
        self.held: list[str] = []
        self.expected: list[tuple[str, str]] = []
        self.opened = 0
        self.closed = 0
        self.files_seen: list[Path] = []
        self.destination: DestinationPacs | None = None

    def __call__(self, destination: DestinationPacs, calling_ae: str,
                 tls: object) -> contextlib.AbstractAsyncContextManager[DestinationClient]:
        self.destination = destination
        return self._client()

    @contextlib.asynccontextmanager
    async def _client(self) -> AsyncIterator[DestinationClient]:
        self.opened += 1
        try:
            yield _DestinationAssociation(self)
        finally:
            self.closed += 1

    async def answer(self, path: Path, sop_class_uid: str, sop_instance_uid: str) -> StoreResult:
        n = self.attempts.count(sop_instance_uid)
        self.attempts.append(sop_instance_uid)
        self.files_seen.append(path)
        assert await asyncio.to_thread(path.exists), "the runner must hand over a file it has not deleted yet"
        if self.before_store is not None:
            result = self.before_store(sop_instance_uid)
            if asyncio.iscoroutine(result):
                await result
        steps = self.script.get(sop_instance_uid, ["stored"])
        step = steps[min(n, len(steps) - 1)]
        if isinstance(step, StoreUnavailable):
            raise step
        if step == "hang":
            await hang()
            raise AssertionError("unreachable")
        if step in ("stored", "warning"):
            self.held.append(sop_instance_uid)
        return StoreResult(sop_instance_uid, _STATUS[step], step, step)


class _DestinationAssociation:
    def __init__(self, pacs: FakeDestination) -> None:
        self._pacs = pacs

    def expect(self, pairs: Iterable[tuple[str, str]]) -> None:
        self._pacs.expected.extend(pairs)

    async def store(self, path: Path, *, sop_class_uid: str, sop_instance_uid: str,
                    transfer_syntax_uid: str) -> StoreResult:
        return await self._pacs.answer(path, sop_class_uid, sop_instance_uid)


class RecordingAuditor(Auditor):
    """An Auditor whose ``record`` keeps the messages in ``records`` instead of queueing them for
    disk and syslog; its audit source and everything the services read of it are the real ones."""

    def __init__(self, storage_dir: Path) -> None:
        super().__init__(AuditConfig(file=None), storage_dir=storage_dir)
        self.records: list[AuditMessage] = []

    def record(self, message: AuditMessage) -> None:
        self.records.append(message)


# -- configuration and requesters for unit tests of the services ----------------------------------

HOME = "urn:oid:2.16.528.1.1007.99.1"
#: Two valid BSNs (11-proef): the patient of the tests and somebody else.
BSN = "999990007"
OTHER_BSN = "999990019"
#: The requesting professional and organisation.
CLAIMS = Claims(uzi="000095254", role="01.039", ura="00000666", organisation_type="V6", purpose="TREAT")


def hospital(n: int) -> dict[str, object]:
    """TLB hospital ``n`` as a config entry; its PACS address is never dialled by these tests."""
    return {"ura": f"0001000{n}", "name": f"Ziekenhuis {n}", "ae_title": f"PACS{n}", "host": "192.0.2.1",
            "port": 104, "repository_unique_id": f"2.16.528.1.1007.99.1000{n}.1"}


def community(n: int, *, uras: Sequence[str] = (), **extra: object) -> dict[str, object]:
    """XCA community ``n`` as a config entry (TEST-NET addresses: never dialled here)."""
    return {"home_community_id": f"urn:oid:2.16.528.1.1007.99.2000{n}", "name": f"Community {n}",
            "iti38": "http://192.0.2.2/iti38", "iti39": "http://192.0.2.2/iti39",
            "uras": list(uras), **extra}


def unit_config(tmp_path: Path, *, hospitals: Sequence[int] = (1, 2),
                communities: Sequence[dict[str, object]] = (), **sections: dict[str, object]) -> DuoConfig:
    """A DuoConfig for driving a service object directly: no listener is started from it."""
    mitz = "http://192.0.2.3"
    raw: dict[str, object] = {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO"},
        "listeners": {"http": {"host": "127.0.0.1", "port": 0}, "dicom": {"host": "127.0.0.1", "port": 0}},
        "tlb_hospitals": [hospital(n) for n in hospitals],
        "xca_communities": list(communities),
        "mitz": {"closed_url": f"{mitz}/closed", "open_url": f"{mitz}/open",
                 "subscriptions_url": f"{mitz}/sub"},
        "storage": {"path": str(tmp_path / "storage")},
        **sections,
    }
    return parse_config(raw, base_dir=tmp_path, source="unit-test", env={})
