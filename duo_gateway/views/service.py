"""Views: the chosen studies of one patient, shown over DICOMweb to the client that asked, for a while.

A view is made from timeline study ids, like a transfer, and under the same rules: each id must have
been issued to the requester's organisation and not have expired; each TLB source is asked Mitz's
closed question afresh (a Permit per data holder; no Permit, no view, and the refusal names the
source); an XCA community decides for itself on the XUA assertion DUO sends. Making the view is the
disclosure, so that is when it is audited: who asked (professional, organisation, purpose, the
client system), for which patient, which studies from where, and until when.

Its DICOMweb root is a capability: 32 random bytes, usable only by the client that made the view
(mTLS identity), only until it expires, is deleted, or Mitz notifies a consent change for its
patient at one of its sources. Views live in memory: a restart ends them (a view is minutes long; the
viewer asks for a new one).
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import shutil
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal

import structlog

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    EventOutcome,
    Peer,
    Requestor,
    StudyTransfer,
    dicom_instances_transferred,
)
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.views import ViewsConfig
from duo_gateway.dicom.decode_worker import SharedDecodeWorker
from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.fetch import ConsentRefused, FetchFailed
from duo_gateway.transfer.sources import StudySources
from duo_gateway.views.cache import ViewCache
from duo_gateway.views.feed import StudyFeed
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

RefusalKind = Literal["invalid-study", "no-consent", "source-unavailable", "too-many"]


class ViewRefused(Exception):
    """The view is not made; ``kind`` says why (the API maps it to a status), ``detail`` to whom."""

    def __init__(self, kind: RefusalKind, detail: str, *, source: str | None = None) -> None:
        super().__init__(detail)
        self.kind = kind
        self.detail = detail
        self.source = source


@dataclass
class View:
    id: str
    #: The DICOMweb root's secret path segment.
    token: str
    client: str
    requester: Claims
    bsn: str
    feeds: dict[str, StudyFeed]
    expires_at: float
    #: (hospital URA or community id) of each source: a Mitz notification for the patient at one of
    #: the hospitals closes the view.
    holders: frozenset[str] = field(default_factory=frozenset)
    closed: str | None = None

    @property
    def expired(self) -> bool:
        return time.time() >= self.expires_at

    def expires_iso(self) -> str:
        return datetime.fromtimestamp(self.expires_at, UTC).isoformat().replace("+00:00", "Z")


class ViewService:
    def __init__(self, cfg: ViewsConfig, *, study_ids: StudyIds, sources: StudySources, root: Path,
                 auditor: Auditor | None, identity: Peer) -> None:
        self.cfg = cfg
        self._ids = study_ids
        self._sources = sources
        self._root = root
        self.cache = ViewCache(root, int(cfg.cache_bytes))
        self._auditor = auditor
        self._identity = identity
        self._views: dict[str, View] = {}
        self._by_token: dict[str, View] = {}
        self._sweeper: asyncio.Task[None] | None = None
        #: Decodes a lossless instance a viewer asked for uncompressed (dicom/convert), in a helper
        #: process started on first use.
        self.decoder = SharedDecodeWorker()
        self._cleaning: set[asyncio.Task[None]] = set()

    # -- lifecycle ---------------------------------------------------------------------------
    async def start(self) -> None:
        # Anything under the root was left by a process that ended: patient data nobody can reach.
        await asyncio.to_thread(shutil.rmtree, self._root, True)
        self._root.mkdir(parents=True, exist_ok=True)
        self._sweeper = asyncio.create_task(self._sweep())

    async def stop(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
        for view in list(self._views.values()):
            await self._close(view, "DUO stopped")
        if self._cleaning:
            await asyncio.gather(*self._cleaning, return_exceptions=True)
        await asyncio.to_thread(self.decoder.close)

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(min(10.0, self.cfg.ttl_s / 4))
            for view in [v for v in self._views.values() if v.expired]:
                await self._close(view, "expired")

    # -- making, finding, ending -------------------------------------------------------------
    async def create(self, *, client: str, requester: Claims, study_ids: Sequence[str]) -> View:
        if not study_ids:
            raise ViewRefused("invalid-study", "name at least one study")
        if len(study_ids) > self.cfg.max_studies:
            raise ViewRefused("too-many", f"a view holds at most {self.cfg.max_studies} studies")
        if sum(1 for v in self._views.values() if v.client == client) >= self.cfg.max_views_per_client:
            raise ViewRefused("too-many", f"client {client} has {self.cfg.max_views_per_client} open views; "
                              "delete one first")
        sealed_studies = []
        for n, study_id in enumerate(study_ids):
            try:
                sealed = self._ids.open(study_id)
                sealed.check_use(requester.ura)
            except ValueError as exc:  # not DUO's id, or (StudyIdRefused) another organisation's or expired
                raise ViewRefused("invalid-study", f"studies[{n}]: {exc}") from None
            sealed_studies.append((study_id, sealed))
        patients = {sealed.bsn for _id, sealed in sealed_studies}
        if len(patients) != 1:
            raise ViewRefused("invalid-study", "a view shows the studies of one patient")
        bsn = patients.pop()
        view_id = str(uuid.uuid4())
        feeds: dict[str, StudyFeed] = {}
        holders: set[str] = set()
        try:
            for study_id, sealed in sealed_studies:
                if sealed.ref.study_uid in feeds:
                    continue  # the same study from two timelines
                feed, holder = await self._feed(view_id, study_id, sealed.refs, bsn, requester)
                feeds[sealed.ref.study_uid] = feed
                holders.add(holder)
        except BaseException:
            for feed in feeds.values():  # none started yet: nothing fetched, but their directories go
                await feed.close()
            raise
        view = View(id=view_id, token=secrets.token_urlsafe(32), client=client, requester=requester, bsn=bsn,
                    feeds=feeds, expires_at=time.time() + self.cfg.ttl_s, holders=frozenset(holders))
        self._views[view.id] = view
        self._by_token[view.token] = view
        for feed in feeds.values():
            feed.start()
        self._audit(view)
        log.info("view_created", view=view.id, studies=len(feeds),
                 sources=sorted(f.source for f in feeds.values()), requester_ura=requester.ura, client=client)
        return view

    async def _feed(self, view_id: str, study_id: str, refs: Sequence[StudyRef], bsn: str,
                    requester: Claims) -> tuple[StudyFeed, str]:
        """The first source (in the timeline's order) that gives a manifest: consent is asked there."""
        reasons: list[str] = []
        denied: list[str] = []
        for ref in refs:
            try:
                fetcher = self._sources.fetcher(ref, bsn, requester, lean=True)
            except LookupError as exc:
                reasons.append(str(exc))
                continue
            try:
                manifest = await fetcher.manifest()
            except ConsentRefused as exc:
                reasons.append(f"{fetcher.source}: {exc.detail}")
                denied.append(fetcher.source)
                continue
            except FetchFailed as exc:
                reasons.append(f"{fetcher.source}: {exc.detail}")
                continue
            holder = ref.hospital_ura if ref.kind == "tlb" and ref.hospital_ura else ref.home_community_id
            feed = StudyFeed(study_id=study_id, study_uid=ref.study_uid, source=fetcher.source,
                             fetcher=fetcher, manifest=manifest, cache=self.cache,
                             directory=self._root / view_id / ref.study_uid, wait_s=self.cfg.instance_wait_s)
            return feed, holder
        if denied:
            raise ViewRefused("no-consent", "; ".join(reasons), source=denied[0])
        raise ViewRefused("source-unavailable", "; ".join(reasons) or "no source", source=None)

    def by_token(self, token: str, client: str) -> View | None:
        """The open view whose root this is, for the client that made it; None for anyone else."""
        view = self._by_token.get(token)
        if view is None or view.closed is not None or view.client != client:
            return None
        if view.expired:
            return None
        return view

    def get(self, view_id: str, client: str) -> View | None:
        view = self._views.get(view_id)
        return view if view is not None and view.client == client else None

    async def delete(self, view_id: str, client: str) -> bool:
        view = self.get(view_id, client)
        if view is None:
            return False
        await self._close(view, "deleted")
        return True

    def consent_changed(self, bsn: str, holder_ura: str) -> int:
        """Mitz notified a consent change for the patient at a hospital: every view of that patient
        with a source there is unusable at once (before Mitz gets its answer); its files go next. A
        new view asks Mitz afresh."""
        hit = [v for v in self._views.values() if v.bsn == bsn and holder_ura in v.holders]
        for view in hit:
            self._end(view, "consent changed at Mitz")
            task = asyncio.create_task(self._clean(view))
            self._cleaning.add(task)
            task.add_done_callback(self._cleaning.discard)
        return len(hit)

    def _end(self, view: View, why: str) -> bool:
        """Unusable from now on; False when it already was."""
        if view.closed is not None:
            return False
        view.closed = why
        self._views.pop(view.id, None)
        self._by_token.pop(view.token, None)
        log.info("view_closed", view=view.id, reason=why)
        return True

    async def _clean(self, view: View) -> None:
        for feed in view.feeds.values():
            await feed.close()
        await asyncio.to_thread(shutil.rmtree, self._root / view.id, True)

    async def _close(self, view: View, why: str) -> None:
        if self._end(view, why):
            await self._clean(view)

    # -- audit -------------------------------------------------------------------------------
    def _audit(self, view: View) -> None:
        if self._auditor is None:
            return
        viewer = Peer(user_id=view.client, host=view.client)
        studies = tuple(StudyTransfer(uid) for uid in view.feeds)
        self._auditor.record(dicom_instances_transferred(
            side="source", source=self._identity, destination=viewer, requestor="destination",
            audit_source=self._auditor.audit_source, studies=studies, patient_id=bsn_cx(view.bsn),
            outcome=EventOutcome.SUCCESS,
            outcome_description=f"view {view.id}: shown over DICOMweb until {view.expires_iso()}",
            on_behalf_of=Requestor.of(view.requester, issuer=view.client)))
