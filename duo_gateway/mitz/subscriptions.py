"""Mitz subscriptions for the TLB hospitals DUO represents, and the job that keeps them complete.

Mitz only localises a data holder for a patient, and only notifies about consent changes, once that
holder has subscribed for the patient (mitz.md §1 step 1, §4). TLB hospitals have no Mitz connector
of their own; DUO is their exchange system, so DUO subscribes on their behalf: one Subscription per
(patient, hospital), with DUO's home community as GatewaySystem and the hospital as SourceSystem, so
the open question sends XCA requesters to DUO and DUO to the right PACS.

Which patients? Those a hospital has imaging for: :meth:`SubscriptionManager.sync_hospital` asks each
PACS (Study Root C-FIND, STUDY level) for studies since a date and subscribes every valid BSN found.
It asks through the hospital's :class:`~duo_gateway.sources.dicom_pacs.DicomPacsSource`, the object
that answers XCA and timeline queries, so the sync shares its association limit, deadline and metrics
and reads the BSN by the same rule (:mod:`duo_gateway.bsn`): a study is never one patient's for the
sync and somebody else's, or nobody's, for a query.

**Memory.** Subscribing is idempotent at Mitz (202 for an existing one), but a POST per patient per
sync would hammer Mitz and disclose the BSN again each time. So what has been registered is kept in a
small sqlite3 file under ``storage.path``; a patient is posted again only when what DUO *would* post
changes (hospital type, source system, gateway, notify URL).

**No BSN at rest.** The store keys patients by HMAC-SHA256 of the BSN under a random key kept in a
separate file (mode 0600). "Was (patient, hospital) registered?" is all the store must answer, and a
keyed hash answers it; a copy of the database alone (a backup, a support ticket) then reveals no BSN,
and because BSNs are few (~10⁸ valid values) an unkeyed hash would not have protected them. The price:
the store cannot list subscribed BSNs, so a changed notify URL is re-registered only for patients the
sync finds again. Losing the key file only resets the memory (detected, logged; Mitz answers 202).

**Incremental sync.** The first sync of a hospital looks ``subscription_lookback_days`` back; later
ones start at the date the last fully successful sync ran (that day again, so studies made later that
day are not missed; the store absorbs the overlap). A sync with any failed registration does not
advance the date, so the failed patients are found, and posted, again next time. Studies that enter a
PACS with an old StudyDate (imported priors) are only found by a sync whose window covers that date.

**Audit.** A subscription discloses a BSN to Mitz, so each POST is recorded: DCM 110110 "Patient
Record" with action Create, because the request creates a patient-specific record at Mitz (the
Subscription); 110112 Query would be wrong, nothing is asked. The EventTypeCode ``MITZ-SUB`` in the
project's "DUO Transactions" system says which record. A POST answered 202 is recorded the same way:
DUO did ask Mitz to create it. Registrations the store already knows are not posted and not audited.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import os
import secrets
import socket
import sqlite3
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Final, Literal, Protocol
from urllib.parse import urlsplit

import structlog

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    EVENT_PATIENT_RECORD,
    MITZ_CODE_SYSTEM,
    ROLE_DESTINATION,
    ROLE_SOURCE,
    AuditMessage,
    AuditSourceIdentification,
    Code,
    EventAction,
    EventIdentification,
    EventOutcome,
    ObjectRole,
    ObjectType,
    ParticipantObjectDetail,
    ParticipantObjectIdentification,
    Peer,
    active_participant,
    patient_object,
)
from duo_gateway.bsn import bsn_cx, is_valid_bsn
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.peers import TlbHospital
from duo_gateway.http.client import PeerCallError, PeerClient, PeerResponse
from duo_gateway.mitz.codec import MitzRequestError, bare_oid
from duo_gateway.mitz.fhir import FHIR_JSON, build_subscription
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sources.base import SourceUnavailable

log = structlog.get_logger(__name__)

MITZ_SUBSCRIPTION: Final = Code("MITZ-SUB", MITZ_CODE_SYSTEM, "Mitz Abonnement")

STORE_DIR: Final = "mitz"
STORE_FILE: Final = "subscriptions.sqlite3"
KEY_FILE: Final = "subscriptions.key"
_KEY_CHECK_INPUT: Final = b"duo-gateway mitz subscription store"

#: Subscription answers are a small Subscription resource or an OperationOutcome.
_MAX_ANSWER_BYTES: Final = 1024 * 1024

#: mitz.md §4 error table, worded for an operator reading the log.
_HTTP_REASONS: Final[dict[int, str]] = {
    400: "invalid FHIR",
    401: "not authorised",
    403: "forbidden",
    404: "not found",
    422: "business rule",
    429: "throttled, retry later",
}

OutcomeStatus = Literal["created", "exists", "known", "failed", "disabled"]


@dataclass(frozen=True)
class SubscriptionOutcome:
    """What :meth:`SubscriptionManager.ensure` did for one (patient, hospital).

    ``created`` (201) and ``exists`` (202) were posted now; ``known`` was registered before and not
    posted; ``failed`` is not remembered, so the next sync tries again; ``disabled`` means no
    notify URL is configured.
    """

    status: OutcomeStatus
    subscription_id: str | None = None
    reason: str | None = None
    http_status: int | None = None
    #: Mitz throttled (429): posting more now only makes it worse.
    throttled: bool = False

    @property
    def registered(self) -> bool:
        return self.status in ("created", "exists", "known")


@dataclass
class SyncReport:
    """One hospital's sync; ``ok`` means the PACS answered and every patient found is registered."""

    hospital_ura: str
    since: date
    ok: bool = False
    reason: str | None = None
    studies: int = 0
    #: Distinct valid BSNs found.
    patients: int = 0
    #: Studies naming no valid BSN where the hospital keeps it, or two (duo_gateway.bsn.bsn_of).
    invalid: int = 0
    created: int = 0
    exists: int = 0
    known: int = 0
    failed: int = 0
    #: Patients not tried because Mitz throttled or the job was stopped.
    deferred: int = 0
    failures: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Target:
    """Everything that goes into a Subscription except the BSN: if any of it changes, post again."""

    provider_ura: str
    provider_type: str
    source_oid: str
    gateway_oid: str
    endpoint: str


# --------------------------------------------------------------------------------------------------
# The durable memory
# --------------------------------------------------------------------------------------------------


class SubscriptionStore:
    """sqlite3 file plus key file; every method blocks, so async callers use ``asyncio.to_thread``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._db_path = directory / STORE_FILE
        self._key_path = directory / KEY_FILE
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None
        self._key = b""

    def open(self) -> None:
        with self._lock:
            if self._db is not None:
                return
            self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)
            self._key = self._load_key()
            db = sqlite3.connect(self._db_path, check_same_thread=False, isolation_level=None, timeout=10)
            try:
                db.executescript("""
                    CREATE TABLE IF NOT EXISTS meta (name TEXT PRIMARY KEY, value TEXT NOT NULL);
                    CREATE TABLE IF NOT EXISTS subscriptions (
                        patient TEXT NOT NULL,
                        provider_ura TEXT NOT NULL,
                        provider_type TEXT NOT NULL,
                        source_oid TEXT NOT NULL,
                        gateway_oid TEXT NOT NULL,
                        endpoint TEXT NOT NULL,
                        subscription_id TEXT,
                        http_status INTEGER NOT NULL,
                        registered_at TEXT NOT NULL,
                        PRIMARY KEY (patient, provider_ura, provider_type, source_oid, gateway_oid, endpoint)
                    );
                    CREATE TABLE IF NOT EXISTS sync_state (
                        provider_ura TEXT PRIMARY KEY,
                        last_sync TEXT NOT NULL
                    );
                """)
                check = hmac.new(self._key, _KEY_CHECK_INPUT, hashlib.sha256).hexdigest()
                row = db.execute("SELECT value FROM meta WHERE name = 'key_check'").fetchone()
                if row is not None and row[0] != check:
                    # Rows hashed under another key can never match again; keeping them only misleads.
                    log.warning("mitz_subscription_store_reset", reason="key file changed or lost")
                    db.execute("DELETE FROM subscriptions")
                db.execute("INSERT OR REPLACE INTO meta (name, value) VALUES ('key_check', ?)", (check,))
            except BaseException:
                db.close()
                raise
            self._db = db

    def _load_key(self) -> bytes:
        try:
            fd = os.open(self._key_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            key = self._key_path.read_bytes()
            if len(key) < 32:
                raise ValueError(f"{self._key_path} holds no usable key") from None
            return key
        key = secrets.token_bytes(32)
        with os.fdopen(fd, "wb") as fh:
            fh.write(key)
            fh.flush()
            os.fsync(fh.fileno())
        return key

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None

    def _conn(self) -> sqlite3.Connection:
        if self._db is None:
            raise RuntimeError("subscription store is not open")
        return self._db

    def patient_key(self, bsn: str) -> str:
        return hmac.new(self._key, bsn.encode("ascii"), hashlib.sha256).hexdigest()

    def lookup(self, bsn: str, target: _Target) -> str | None:
        """The remembered subscription id ('' when Mitz gave none), or None when not registered."""
        with self._lock:
            row = self._conn().execute(
                "SELECT subscription_id FROM subscriptions WHERE patient = ? AND provider_ura = ? AND "
                "provider_type = ? AND source_oid = ? AND gateway_oid = ? AND endpoint = ?",
                (self.patient_key(bsn), target.provider_ura, target.provider_type, target.source_oid,
                 target.gateway_oid, target.endpoint)).fetchone()
        if row is None:
            return None
        return str(row[0] or "")

    def remember(self, bsn: str, target: _Target, subscription_id: str | None, http_status: int) -> None:
        with self._lock:
            self._conn().execute(
                "INSERT OR REPLACE INTO subscriptions (patient, provider_ura, provider_type, source_oid, "
                "gateway_oid, endpoint, subscription_id, http_status, registered_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (self.patient_key(bsn), target.provider_ura, target.provider_type, target.source_oid,
                 target.gateway_oid, target.endpoint, subscription_id, http_status,
                 datetime.now(UTC).isoformat(timespec="seconds")))

    def count(self, provider_ura: str | None = None) -> int:
        with self._lock:
            if provider_ura is None:
                row = self._conn().execute("SELECT COUNT(*) FROM subscriptions").fetchone()
            else:
                row = self._conn().execute("SELECT COUNT(*) FROM subscriptions WHERE provider_ura = ?",
                                           (provider_ura,)).fetchone()
        return int(row[0])

    def last_sync(self, provider_ura: str) -> date | None:
        with self._lock:
            row = self._conn().execute("SELECT last_sync FROM sync_state WHERE provider_ura = ?",
                                       (provider_ura,)).fetchone()
        return date.fromisoformat(row[0]) if row is not None else None

    def set_last_sync(self, provider_ura: str, day: date) -> None:
        with self._lock:
            self._conn().execute("INSERT OR REPLACE INTO sync_state (provider_ura, last_sync) VALUES (?, ?)",
                                 (provider_ura, day.isoformat()))


# --------------------------------------------------------------------------------------------------
# PACS side: which patients does a hospital have imaging for
# --------------------------------------------------------------------------------------------------


class HospitalPacs(Protocol):
    """What the sync needs of a TLB hospital's PACS; the daemon passes each hospital's
    :class:`~duo_gateway.sources.dicom_pacs.DicomPacsSource`, tests may pass a fake.

    A Protocol of its own rather than part of ImagingSource: listing every patient with imaging is
    a TLB-hospital concern of the sync, not something a front door may ask a source.
    """

    async def study_patients_since(self, since: date) -> list[str | None]:
        """The BSN of each study dated ``since`` or later (None where a study names none, or two);
        raises SourceUnavailable when the PACS cannot answer."""
        ...


# --------------------------------------------------------------------------------------------------
# The manager
# --------------------------------------------------------------------------------------------------


def subscription_id_from(response: PeerResponse) -> str | None:
    """Mitz puts the id in ``Location`` (B365); ``…/Subscription/{id}[/_history/{v}]`` or a bare id.
    The body's ``id`` is the fallback, for a Mitz that echoes the resource without the header."""
    location = response.headers.get("Location", "").strip()
    if location:
        parts = [p for p in urlsplit(location).path.split("/") if p]
        if "_history" in parts:
            parts = parts[: parts.index("_history")]
        if "Subscription" in parts and parts.index("Subscription") + 1 < len(parts):
            return parts[parts.index("Subscription") + 1]
        if parts:
            return parts[-1]
    try:
        body = json.loads(response.body)
    except (ValueError, UnicodeDecodeError):
        return None
    value = body.get("id") if isinstance(body, dict) else None
    return value if isinstance(value, str) and value else None


def _issue_code(body: bytes) -> str | None:
    """The OperationOutcome issue code, never its diagnostics: free text from Mitz may quote the BSN."""
    try:
        outcome = json.loads(body)
        code = outcome["issue"][0]["code"]
    except (ValueError, UnicodeDecodeError, KeyError, IndexError, TypeError):
        return None
    return code if isinstance(code, str) and code.replace("-", "").isalnum() else None


def _retry_after(response: PeerResponse) -> str:
    value = response.headers.get("Retry-After", "").strip()
    return f" (Retry-After {value})" if value.isdigit() else ""


class SubscriptionManager:
    """Registers Mitz subscriptions for DUO's TLB hospitals and remembers them across restarts.

    ``pacses`` maps each hospital's URA to its PACS: the same source objects the daemon answers
    queries with, so the sync is bounded by the same association limit and deadlines, observed by
    the same metrics, and reads the BSN by the same rule. A hospital without one fails its sync.
    ``today`` is injectable because the sync window is a date computation that tests must pin.
    ``gateway`` names DUO in audit records; it defaults to the home community id on this host.
    """

    def __init__(self, config: DuoConfig, *, pacses: Mapping[str, HospitalPacs],
                 auditor: Auditor | None = None, metrics: Metrics | None = None,
                 gateway: Peer | None = None, http: PeerClient | None = None,
                 today: Callable[[], date] = date.today, store_dir: Path | None = None) -> None:
        self._config = config
        self._pacses = pacses
        self._mitz = config.mitz
        self._auditor = auditor
        self._today = today
        self._http = http if http is not None else PeerClient("mitz", config.mitz.tls, metrics,
                                                              max_body_bytes=_MAX_ANSWER_BYTES)
        self._own_http = http is None
        self._gateway = gateway or Peer(user_id=config.gateway.home_community_id, host=socket.gethostname(),
                                        alternative_user_id=str(os.getpid()), user_name=config.gateway.name)
        url = str(config.mitz.subscriptions_url)
        self._url = url
        self._mitz_peer = Peer(user_id=url, host=urlsplit(url).hostname)
        self.store = SubscriptionStore(store_dir or config.storage.path / STORE_DIR)
        self._open_lock = asyncio.Lock()
        self._opened = False
        self._inflight: dict[tuple[str, _Target], asyncio.Task[SubscriptionOutcome]] = {}
        self._stop: asyncio.Event | None = None

    @property
    def enabled(self) -> bool:
        return self._mitz.notify_url is not None

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Open the store now, so an unwritable storage path stops the daemon at start, not later."""
        async with self._open_lock:
            if not self._opened:
                await asyncio.to_thread(self.store.open)
                self._opened = True

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        for task in list(self._inflight.values()):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if self._own_http:
            await self._http.close()
        async with self._open_lock:
            if self._opened:
                await asyncio.to_thread(self.store.close)
                self._opened = False

    # -- one patient ---------------------------------------------------------------------------

    def _target(self, hospital: TlbHospital) -> _Target:
        assert self._mitz.notify_url is not None
        return _Target(provider_ura=hospital.ura, provider_type=hospital.organisation_type,
                       source_oid=bare_oid(hospital.source_id),
                       gateway_oid=bare_oid(self._config.gateway.home_community_id),
                       endpoint=str(self._mitz.notify_url))

    async def ensure(self, bsn: str, hospital: TlbHospital) -> SubscriptionOutcome:
        """Make sure Mitz has a subscription for ``bsn`` at ``hospital``; never raises for Mitz trouble.

        Concurrent calls for the same pair share one POST (and its outcome), so a sync and an
        on-demand call racing each other cannot register twice.
        """
        if self._mitz.notify_url is None:
            return SubscriptionOutcome("disabled", reason="mitz.notify_url is not configured")
        if not is_valid_bsn(bsn):
            return SubscriptionOutcome("failed", reason="not a valid BSN")
        await self.start()
        key = (bsn, self._target(hospital))
        task = self._inflight.get(key)
        if task is None:
            task = asyncio.create_task(self._ensure(bsn, hospital, key[1]), name="mitz-subscribe")
            self._inflight[key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(key, None))
        # Shielded: one caller giving up must not cancel the POST the others are waiting for.
        return await asyncio.shield(task)

    async def _ensure(self, bsn: str, hospital: TlbHospital, target: _Target) -> SubscriptionOutcome:
        known = await asyncio.to_thread(self.store.lookup, bsn, target)
        if known is not None:
            return SubscriptionOutcome("known", subscription_id=known or None)
        outcome = await self._post(bsn, hospital, target)
        if outcome.registered:
            try:
                await asyncio.to_thread(self.store.remember, bsn, target, outcome.subscription_id,
                                        outcome.http_status or 0)
            except (OSError, sqlite3.Error) as exc:
                # Mitz has it; forgetting only means a 202 next time, so this is not a failure.
                log.error("mitz_subscription_store_failed", hospital_ura=hospital.ura,
                          error=type(exc).__name__)
        log.info("mitz_subscription", hospital_ura=hospital.ura, status=outcome.status,
                 subscription_id=outcome.subscription_id, http_status=outcome.http_status,
                 reason=outcome.reason)
        return outcome

    async def _post(self, bsn: str, hospital: TlbHospital, target: _Target) -> SubscriptionOutcome:
        try:
            resource = build_subscription(bsn, target.provider_ura, target.provider_type, target.endpoint,
                                          target.gateway_oid, target.source_oid)
        except MitzRequestError as exc:
            # Config that passed validation but not the codec (e.g. a URA or OID shape): no POST.
            return SubscriptionOutcome("failed", reason=f"cannot build Subscription: {exc}")
        body = json.dumps(resource, separators=(",", ":")).encode()
        try:
            response = await self._http.post(self._url, body, operation="subscription",
                                             timeout_s=self._mitz.timeout_s, content_type=FHIR_JSON)
        except PeerCallError as exc:
            outcome = SubscriptionOutcome("failed", reason=f"Mitz unreachable ({exc.kind}: {exc.detail})")
            self._audit(bsn, hospital, target, outcome, EventOutcome.SERIOUS_FAILURE, body)
            return outcome
        status = response.status
        if status in (201, 202):
            outcome = SubscriptionOutcome("created" if status == 201 else "exists",
                                          subscription_id=subscription_id_from(response), http_status=status)
            if outcome.subscription_id is None:
                log.warning("mitz_subscription_without_id", hospital_ura=hospital.ura, http_status=status)
            self._audit(bsn, hospital, target, outcome, EventOutcome.SUCCESS, body)
            return outcome
        meaning = _HTTP_REASONS.get(status) or ("Mitz error" if status >= 500 else "unexpected answer")
        code = _issue_code(response.body)
        reason = f"HTTP {status} {meaning}" + (f" [{code}]" if code else "")
        if status == 429:
            reason += _retry_after(response)
        outcome = SubscriptionOutcome("failed", reason=reason, http_status=status, throttled=status == 429)
        self._audit(bsn, hospital, target, outcome,
                    EventOutcome.MINOR_FAILURE if status < 500 else EventOutcome.SERIOUS_FAILURE, body)
        return outcome

    def _audit(self, bsn: str, hospital: TlbHospital, target: _Target, outcome: SubscriptionOutcome,
               result: EventOutcome, request: bytes) -> None:
        if self._auditor is None:
            return
        self._auditor.record(subscription_audit(
            gateway=self._gateway, mitz=self._mitz_peer, audit_source=self._auditor.audit_source, bsn=bsn,
            hospital=hospital, source_oid=target.source_oid, request=request, outcome=outcome,
            result=result))

    # -- one hospital --------------------------------------------------------------------------

    async def next_since(self, hospital: TlbHospital) -> date:
        """Where the next sync of ``hospital`` starts: the last successful sync's day, else lookback."""
        await self.start()
        last = await asyncio.to_thread(self.store.last_sync, hospital.ura)
        if last is not None:
            return last
        return self._today() - timedelta(days=self._mitz.subscription_lookback_days)

    async def _find_bsns(self, hospital: TlbHospital, since: date, report: SyncReport) -> list[str]:
        pacs = self._pacses.get(hospital.ura)
        if pacs is None:
            raise SourceUnavailable(f"tlb:{hospital.ura}", "no PACS source wired for this hospital")
        patients = await pacs.study_patients_since(since)
        report.studies = len(patients)
        found: dict[str, None] = {}  # ordered set: PACS order, oldest study first
        for bsn in patients:
            if bsn is None:
                report.invalid += 1
            else:
                found[bsn] = None
        report.patients = len(found)
        return list(found)

    async def sync_hospital(self, hospital: TlbHospital, since: date) -> SyncReport:
        """Subscribe every patient with a study at ``hospital`` since ``since``; never raises for a
        PACS or Mitz problem, the report says what went wrong."""
        report = SyncReport(hospital_ura=hospital.ura, since=since)
        if not self.enabled:
            report.reason = "subscriptions disabled (no mitz.notify_url)"
            return report
        await self.start()
        started_on = self._today()
        with structlog.contextvars.bound_contextvars(request_id=f"mitz-sync-{uuid.uuid4()}"):
            try:
                bsns = await self._find_bsns(hospital, since, report)
            except SourceUnavailable as exc:
                # Down, slow, refusing or broken: the PACS is unavailable for this round.
                report.reason = f"PACS C-FIND failed: {exc}"
                log.warning("mitz_sync_failed", hospital_ura=hospital.ura, since=since.isoformat(),
                            reason=report.reason)
                return report
            await self._register_all(hospital, bsns, report)
            report.ok = report.failed == 0 and report.deferred == 0
            if report.ok:
                await asyncio.to_thread(self.store.set_last_sync, hospital.ura, started_on)
            elif report.reason is None:
                report.reason = f"{report.failed} failed, {report.deferred} deferred"
            log.info("mitz_sync", hospital_ura=hospital.ura, since=since.isoformat(), ok=report.ok,
                     studies=report.studies, patients=report.patients, invalid=report.invalid,
                     created=report.created, exists=report.exists, known=report.known, failed=report.failed,
                     deferred=report.deferred, reason=report.reason)
        return report

    async def _register_all(self, hospital: TlbHospital, bsns: Iterable[str], report: SyncReport) -> None:
        pending = list(bsns)
        for i, bsn in enumerate(pending):
            if self._stop is not None and self._stop.is_set():
                report.deferred += len(pending) - i
                report.reason = "stopped"
                return
            outcome = await self.ensure(bsn, hospital)
            if outcome.status == "created":
                report.created += 1
            elif outcome.status == "exists":
                report.exists += 1
            elif outcome.status == "known":
                report.known += 1
            else:
                report.failed += 1
                if outcome.reason and outcome.reason not in report.failures:
                    report.failures.append(outcome.reason)
                if outcome.throttled:
                    # Every further POST would be refused too; the rest waits for the next sync.
                    report.deferred += len(pending) - i - 1
                    report.reason = f"Mitz throttled: {outcome.reason}"
                    return

    # -- the job -------------------------------------------------------------------------------

    async def sync_all(self) -> list[SyncReport]:
        """One round over every hospital, each from its own ``next_since``; one failing leaves the
        others untouched."""
        reports = []
        for hospital in self._config.tlb_hospitals:
            if self._stop is not None and self._stop.is_set():
                break
            try:
                since = await self.next_since(hospital)
                reports.append(await self.sync_hospital(hospital, since))
            except Exception as exc:
                # A bug or a broken store must cost one hospital one round, never the job.
                log.exception("mitz_sync_crashed", hospital_ura=hospital.ura)
                reports.append(SyncReport(hospital_ura=hospital.ura, since=self._today(),
                                          reason=f"internal error: {type(exc).__name__}"))
        return reports

    async def run(self, stop: asyncio.Event) -> None:
        """Sync at once, then every ``subscription_sync_interval_s`` until ``stop`` is set.

        Returns at once when the interval is 0 or subscriptions are disabled. Setting ``stop`` ends
        the job after the patient being registered; cancelling the task works too.
        """
        interval = self._mitz.subscription_sync_interval_s
        if interval <= 0 or not self.enabled:
            log.info("mitz_sync_disabled", interval_s=interval, notify_url_set=self.enabled)
            return
        self._stop = stop
        try:
            while not stop.is_set():
                await self.sync_all()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), timeout=interval)
        finally:
            self._stop = None


# --------------------------------------------------------------------------------------------------
# Audit record
# --------------------------------------------------------------------------------------------------


def subscription_audit(*, gateway: Peer, mitz: Peer, audit_source: AuditSourceIdentification, bsn: str,
                       hospital: TlbHospital, source_oid: str, request: bytes,
                       outcome: SubscriptionOutcome, result: EventOutcome,
                       when: datetime | None = None) -> AuditMessage:
    """DCM 110110 Patient Record, Create: DUO (source, requestor) asks Mitz (destination) to create a
    Subscription for the patient on behalf of ``hospital``. The posted resource is the query-like
    payload of the Subscription object, so the record shows exactly what was disclosed."""
    details = [
        ParticipantObjectDetail.text("providerid", hospital.ura),
        ParticipantObjectDetail.text("providertype", hospital.organisation_type),
        ParticipantObjectDetail.text("SourceSystem", source_oid),
        ParticipantObjectDetail.text("MitzResult", outcome.status),
    ]
    if outcome.http_status is not None:
        details.append(ParticipantObjectDetail.text("HTTPStatus", str(outcome.http_status)))
    subscription = ParticipantObjectIdentification(
        object_id=outcome.subscription_id or "unassigned",
        type_code=ObjectType.SYSTEM_OBJECT,
        type_code_role=ObjectRole.RESOURCE,
        id_type_code=MITZ_SUBSCRIPTION,
        query=request,
        details=tuple(details),
    )
    event = EventIdentification(EVENT_PATIENT_RECORD, EventAction.CREATE, when or datetime.now(UTC), result,
                                (MITZ_SUBSCRIPTION,), outcome.reason)
    participants = (
        active_participant(gateway, requestor=True, role=ROLE_SOURCE),
        active_participant(mitz, requestor=False, role=ROLE_DESTINATION),
    )
    return AuditMessage(event=event, participants=participants, source=audit_source,
                        objects=(subscription, patient_object(bsn_cx(bsn))))


__all__ = [
    "MITZ_SUBSCRIPTION",
    "HospitalPacs",
    "SubscriptionManager",
    "SubscriptionOutcome",
    "SubscriptionStore",
    "SyncReport",
    "subscription_audit",
]
