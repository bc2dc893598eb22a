"""A study in a TLB hospital's PACS: Mitz closed question first, then C-FIND, then C-GET/C-MOVE.

The Permit is asked once per fetcher (one per study per job attempt) and never cached beyond it: a
transfer that resumes after a crash asks Mitz again, so a consent withdrawn in between is honoured.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing

from duo_gateway.config.peers import TlbHospital
from duo_gateway.consent import ConsentGate, Permit, Refusal
from duo_gateway.sources.base import ImagingSource, InstanceRecord, SourceUnavailable
from duo_gateway.transfer.fetch import ConsentRefused, Fetched, FetchFailed, Missed
from duo_gateway.transfer.jobstore import ExpectedInstance
from duo_gateway.xua import Claims


class TlbStudyFetcher:
    def __init__(self, *, hospital: TlbHospital, source: ImagingSource, gate: ConsentGate, claims: Claims,
                 bsn: str, study_uid: str, lean: bool = False) -> None:
        self.source = f"tlb:{hospital.ura}"
        self._hospital = hospital
        self._pacs = source
        self._gate = gate
        self._claims = claims
        self._bsn = bsn
        self._study_uid = study_uid
        #: A manifest of identities only (ImagingSource.find_instances(lean=True)): for views.
        self._lean = lean
        self._permit: Permit | None = None
        self._records: dict[str, InstanceRecord] = {}

    async def _consent(self) -> Permit:
        if self._permit is None:
            verdict = await self._gate.check(self._gate.for_hospital(self._claims, self._bsn, self._hospital))
            if isinstance(verdict, Refusal):
                if verdict.denied:
                    raise ConsentRefused("error", f"no consent: Mitz {verdict.summary}", retryable=False)
                # A Mitz outage may pass; an incomplete question (no decision at all) will not.
                retryable = verdict.decision is not None
                raise ConsentRefused("unavailable" if retryable else "error",
                                     f"consent could not be established: {verdict.reason}",
                                     retryable=retryable)
            self._permit = verdict
        return self._permit

    async def manifest(self) -> list[ExpectedInstance]:
        permit = await self._consent()
        try:
            records = await self._pacs.find_instances(permit, self._bsn, self._study_uid, lean=self._lean)
        except SourceUnavailable as exc:
            raise FetchFailed(exc.kind, f"{self.source}: {exc.detail}", retryable=exc.retryable) from exc
        if not records:
            raise FetchFailed("error", f"{self.source} holds no instances of this study for this patient",
                              retryable=False)
        self._records = {r.sop_instance_uid: r for r in records}
        return [ExpectedInstance(r.sop_instance_uid, r.series_instance_uid, r.sop_class_uid) for r in records]

    async def fetch(self, wanted: Sequence[ExpectedInstance], *,
                    in_memory: bool = False) -> AsyncGenerator[Fetched | Missed, None]:
        permit = await self._consent()
        # ``wanted`` comes from this fetcher's own manifest, so every record is known.
        records = [self._records[w.sop_instance_uid] for w in wanted]
        arrived: set[str] = set()
        try:
            async with aclosing(self._pacs.retrieve(permit, self._bsn, self._study_uid, records,
                                                    in_memory=in_memory)) as stream:
                async for item in stream:
                    arrived.add(item.record.sop_instance_uid)
                    # The spool checked the header (instance asked, this study, this patient).
                    yield Fetched(item.record.sop_instance_uid, item.path, item.size,
                                  item.record.sop_class_uid, item.transfer_syntax_uid, item.data)
        except SourceUnavailable as exc:
            if not arrived:
                raise FetchFailed(exc.kind, f"{self.source}: {exc.detail}", retryable=exc.retryable) from exc
            detail, retryable = f"{self.source}: {exc.detail}", True
        else:
            detail, retryable = f"{self.source} did not deliver it", True
        for w in wanted:
            if w.sop_instance_uid not in arrived:
                yield Missed(w.sop_instance_uid, detail, retryable)


__all__ = ["TlbStudyFetcher"]
