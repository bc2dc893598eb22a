"""The Mitz client: closed question (consent), open question (localization), fail-closed.

The codecs (:mod:`duo_gateway.mitz.xacml`, :mod:`duo_gateway.mitz.xcpd`) say what the bytes mean;
this module decides what DUO may do with them. Its one rule: the only way to get ``permitted=True`` is
a timely, well-formed Permit for every asked category from Mitz itself (or from a cache entry that
such an answer created moments ago and that no notification has invalidated since). Everything else,
including bugs, is refusal.

Caching is off by default. When switched on (``mitz.cache_ttl_s``, at most 60 s) entries are keyed by
*every* attribute of the question; a consent notification for (BSN, data holder) evicts at once and
bumps a generation counter, so an answer that was already on its way when the notification arrived
can never repopulate the cache with the old verdict. Identical concurrent questions share one call.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal
from urllib.parse import urlsplit

import structlog

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import EventOutcome, Peer, mitz_consent_question
from duo_gateway.config.mitz import MitzConfig
from duo_gateway.http.client import PeerCallError, PeerClient
from duo_gateway.mitz.codec import MitzError
from duo_gateway.mitz.xacml import ClosedQuestion, Decision, build_closed_question, parse_closed_answer
from duo_gateway.mitz.xcpd import Location, OpenQuestion, build_open_question, parse_open_answer
from duo_gateway.observability.metrics import Metrics
from duo_gateway.soap.envelope import SOAP12_CONTENT_TYPE, new_message_id

log = structlog.get_logger(__name__)

SOAP_CONTENT_TYPE = f"{SOAP12_CONTENT_TYPE}; charset=UTF-8"

#: Turns the serialized XACML request into its signed form (see duo_gateway.xmldsig).
RequestSigner = Callable[[bytes], bytes]


@dataclass(frozen=True)
class ConsentDecision:
    """The verdict for one closed question. ``reason`` says why when it is not a permit."""

    permitted: bool
    decisions: tuple[Decision | None, ...]
    reason: str | None
    source: Literal["mitz", "cache", "error"]

    @property
    def summary(self) -> str:
        """One word for logs and metrics: the decision, or "error" when Mitz gave none."""
        if self.permitted:
            return "Permit"
        known = {d for d in self.decisions if d is not None}
        if self.source == "error" or not known:
            return "error"
        return "Deny" if "Deny" in known else sorted(known - {"Permit"})[0]


@dataclass(frozen=True)
class Localization:
    """The open question's answer; ``ok=False`` means Mitz could not be asked (``reason`` says why)."""

    ok: bool
    locations: tuple[Location, ...]
    reason: str | None = None


@dataclass
class _Entry:
    expires: float
    decision: ConsentDecision


class MitzClient:
    def __init__(self, config: MitzConfig, *, gateway: Peer, auditor: Auditor | None = None,
                 metrics: Metrics | None = None, signer: RequestSigner | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._cfg = config
        self._gateway = gateway
        self._auditor = auditor
        self._metrics = metrics
        self._signer = signer
        self._clock = clock
        self._http = PeerClient("mitz", config.tls, metrics, max_body_bytes=4 * 1024 * 1024)
        self._cache: dict[ClosedQuestion, _Entry] = {}
        self._generation: dict[tuple[str, str], int] = {}
        self._inflight: dict[tuple[ClosedQuestion, int], asyncio.Task[ConsentDecision]] = {}
        host = urlsplit(str(config.closed_url)).hostname or "mitz"
        self._mitz_peer = Peer(user_id=str(config.closed_url), host=host)

    async def close(self) -> None:
        for task in list(self._inflight.values()):
            task.cancel()
        await self._http.close()

    # -- closed question -----------------------------------------------------------------------
    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        """Never raises for anything Mitz or the network does; a bug inside also ends in refusal."""
        try:
            return await self._closed(question)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.exception("mitz closed question failed unexpectedly")
            return self._refuse(question, f"internal error: {type(exc).__name__}")

    async def _closed(self, question: ClosedQuestion) -> ConsentDecision:
        key = (question.bsn, question.holder_ura)
        generation = self._generation.get(key, 0)
        entry = self._cache.get(question)
        if entry is not None:
            if entry.expires > self._clock():
                cached = ConsentDecision(entry.decision.permitted, entry.decision.decisions,
                                         entry.decision.reason, "cache")
                self._account(question, cached, request=None, message_id="cache")
                return cached
            del self._cache[question]
        flight_key = (question, generation)
        task = self._inflight.get(flight_key)
        if task is None:
            task = asyncio.create_task(self._ask(question, generation))
            self._inflight[flight_key] = task
            task.add_done_callback(lambda _t: self._inflight.pop(flight_key, None))
        # shield: one caller giving up must not cancel the answer the others are waiting for
        return await asyncio.shield(task)

    async def _ask(self, question: ClosedQuestion, generation: int) -> ConsentDecision:
        message_id = new_message_id()
        url = str(self._cfg.closed_url)
        request = build_closed_question(question, url, message_id)
        if self._signer is not None:
            request = self._signer(request)
        decision: ConsentDecision
        try:
            resp = await self._http.post(url, request, operation="closed-question",
                                         timeout_s=self._cfg.timeout_s, content_type=SOAP_CONTENT_TYPE)
        except PeerCallError as exc:
            decision = ConsentDecision(False, (None,) * len(question.categories), f"Mitz {exc}", "error")
        else:
            answer = parse_closed_answer(resp.body, message_id, len(question.categories))
            if not 200 <= resp.status < 300:
                why = f"HTTP {resp.status}" + (f": {answer.reason}" if answer.reason else "")
                decision = ConsentDecision(False, (None,) * len(question.categories), why, "error")
            elif answer.reason is not None:
                decision = ConsentDecision(False, answer.decisions, answer.reason, "error")
            else:
                permitted = answer.permitted
                reason = None if permitted else "Mitz decision: " + ", ".join(
                    f"{c}={d}" for c, d in zip(question.categories, answer.decisions, strict=True))
                decision = ConsentDecision(permitted, answer.decisions, reason, "mitz")
                self._store(question, generation, decision)
        self._account(question, decision, request=request, message_id=message_id)
        return decision

    def _store(self, question: ClosedQuestion, generation: int, decision: ConsentDecision) -> None:
        ttl = self._cfg.cache_ttl_s
        if ttl <= 0:
            return
        if self._generation.get((question.bsn, question.holder_ura), 0) != generation:
            return  # consent changed while this answer was on its way: it is already stale
        self._cache[question] = _Entry(self._clock() + ttl, decision)

    def consent_changed(self, bsn: str, holder_ura: str) -> None:
        """A Mitz notification (or withdrawal) for this patient and data holder: forget at once."""
        key = (bsn, holder_ura)
        self._generation[key] = self._generation.get(key, 0) + 1
        stale = [q for q in self._cache if (q.bsn, q.holder_ura) == key]
        for q in stale:
            del self._cache[q]
        log.info("mitz consent changed: cache evicted", holder_ura=holder_ura, evicted=len(stale))

    def _refuse(self, question: ClosedQuestion, reason: str) -> ConsentDecision:
        decision = ConsentDecision(False, (None,) * len(question.categories), reason, "error")
        self._account(question, decision, request=None, message_id="none")
        return decision

    def _account(self, question: ClosedQuestion, decision: ConsentDecision, *, request: bytes | None,
                 message_id: str) -> None:
        """Operational log (no BSN), metric, and the audit record of the question and its decision."""
        log.info("mitz closed question", holder_ura=question.holder_ura, requester_ura=question.requester_ura,
                 decision=decision.summary, source=decision.source, reason=decision.reason)
        if self._metrics is not None:
            self._metrics.mitz_decisions.labels(decision.summary, decision.source).inc()
        if self._auditor is not None:
            result = ",".join(d or "none" for d in decision.decisions)
            if decision.source == "cache":
                result += " (cached)"
            self._auditor.record(mitz_consent_question(
                question="closed", gateway=self._gateway, mitz=self._mitz_peer,
                audit_source=self._auditor.audit_source, bsn=question.bsn, request_id=message_id,
                request=request, result=result,
                outcome=EventOutcome.SUCCESS if decision.source != "error" else EventOutcome.SERIOUS_FAILURE,
                outcome_description=decision.reason if decision.source == "error" else None))

    # -- open question -------------------------------------------------------------------------
    async def open_question(self, question: OpenQuestion) -> Localization:
        """Where consented data of the patient lives. Failure is ``ok=False``, never an exception."""
        message_id = new_message_id()
        url = str(self._cfg.open_url)
        request = build_open_question(question, url, message_id, datetime.now(UTC))
        try:
            resp = await self._http.post(url, request, operation="open-question",
                                         timeout_s=self._cfg.timeout_s, content_type=SOAP_CONTENT_TYPE)
            if not 200 <= resp.status < 300:
                try:
                    parse_open_answer(resp.body, message_id)
                    detail = ""
                except MitzError as exc:
                    detail = f": {exc}"
                result = Localization(False, (), f"HTTP {resp.status}{detail}")
            else:
                result = Localization(True, tuple(parse_open_answer(resp.body, message_id)))
        except PeerCallError as exc:
            result = Localization(False, (), f"Mitz {exc}")
        except MitzError as exc:
            result = Localization(False, (), str(exc))
        except Exception as exc:  # a codec bug must surface as "not localized", not crash the timeline
            log.exception("mitz open question failed unexpectedly")
            result = Localization(False, (), f"internal error: {type(exc).__name__}")
        label = "error" if not result.ok else ("found" if result.locations else "empty")
        log.info("mitz open question", requester_ura=question.requester_ura, result=label,
                 locations=len(result.locations), reason=result.reason)
        if self._metrics is not None:
            self._metrics.mitz_localizations.labels(label).inc()
        if self._auditor is not None:
            self._auditor.record(mitz_consent_question(
                question="open", gateway=self._gateway, mitz=Peer(user_id=url, host=urlsplit(url).hostname),
                audit_source=self._auditor.audit_source, bsn=question.bsn, request_id=message_id,
                request=request, result=str(len(result.locations)) if result.ok else None,
                outcome=EventOutcome.SUCCESS if result.ok else EventOutcome.SERIOUS_FAILURE,
                outcome_description=result.reason))
        return result
