"""DUO as XCA Initiating Gateway: one ITI-38 FindDocuments to one community, for a TLB timeline.

What a community answers ends up on a clinician's screen next to studies from elsewhere, so every
answer is classified into one of five outcomes (:data:`CommunityStatus`) instead of being trusted or
dropped wholesale. How the request goes out (signing, connection slots, the absolute deadline,
retries, the Action/RelatesTo checks, auditing every attempt) is the community exchange policy of
:mod:`.exchange`, shared with ITI-39 and RAD-75. What is ITI-38's own, and why:

- **Whole answers are discarded when they break an Initiating Gateway rule**: an object without
  ``home`` (xca.md §5, GZ ITI38-019) or an entry for another patient. Keeping the rest would put
  documents on the timeline whose origin or patient DUO cannot vouch for.
- **A registry Failure is an error, a PartialSuccess keeps its entries** with the community's errors
  beside them, so the clinician sees both what came and what is missing.
- **Every attempt is audited** (ITI-20, xca.md §12): each one sends the BSN to the community, even
  one that ends in a 503, so each is a disclosure with its own outcome.
- **CPU work stays on the event loop unless it is big** (:data:`INLINE_ANSWER_BYTES`). Signing
  (~0.6 ms), building a request and decoding a typical answer (~1 ms for 35 kB) are Python holding
  the GIL: handing them to worker threads bought no parallelism, only hand-offs and GIL contention
  (measured with ``bench.timeline``: at 50 communities p50 fell from 1.9-2.2 to 1.5-1.6 times one
  community's when they stayed on the loop, and DUO's CPU per timeline by a fifth). Only an answer big
  enough to stall the loop for long is parsed and decoded in a worker thread.
- **An answer too big to take is asked for again by reference** (NIST 12306, 12307). Reading a
  LeafClass answer stops at the community's ``iti38_max_answer_bytes`` (default 48 MiB, ~7,000 entries
  at ~7 kB each; the refusal names the setting), and a registry with a result cap refuses with
  XDSTooManyResults; either way nothing of a patient with thousands of entries would reach the
  timeline. DUO then asks FindDocuments for ObjectRefs (~150 bytes each) and
  the entries by GetDocuments, ``iti38_batch_size`` entryUUIDs per request under the references'
  ``home``; a community configured with ``iti38_by_reference`` is asked that way from the start, so
  the oversized answer is never built just to be refused. Every request is one exchange under the
  one policy (same absolute deadline, retries, connection slots, audit). Batches run side by side as
  far as the community's slots allow and are merged in reference order into the same
  :class:`CommunityResponse` a single answer gives. A batch that fails leaves the community
  ``partial`` with what the other batches brought; a batch answered over the limit (or with
  XDSTooManyResults) is asked again as two halves. A rule broken in any batch (no ``home``, another
  patient's entry) still discards the community's whole answer: the batches are one answer, split.
- **Logs never carry the BSN**, and text a peer wrote (fault reasons, codeContexts) has it masked in
  ``detail`` too, because a peer may echo the patient id there and ``detail`` is logged upstream.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal
from urllib.parse import urlsplit

import structlog

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import EventOutcome, Peer, Requestor, iti38_query
from duo_gateway.bsn import BSN_OID, bsn_cx, is_valid_bsn
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.failure import FailureKind
from duo_gateway.http.client import PeerClient, PeerResponse
from duo_gateway.observability.metrics import Metrics
from duo_gateway.soap.envelope import EnvelopeError, SoapFault, element_bytes, parse_envelope
from duo_gateway.soap.mtom import MtomTooLarge, parse_mtom
from duo_gateway.soap.xml import INLINE_PARSE_BYTES, XmlError, to_bytes
from duo_gateway.xca.codes import (
    DICOM_UID_REGISTRY,
    Action,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
)
from duo_gateway.xca.ebrim import DocumentEntry, ObjectRef
from duo_gateway.xca.entry_ids import is_urn_uuid
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.hl7 import Code, Cx, Hl7FormatError
from duo_gateway.xca.initiating.exchange import (
    PATIENT_MASK,
    AnswerLimit,
    AnswerTooLarge,
    Attempt,
    CommunitySigner,
    Exchange,
    ExchangeFailed,
    SigningPair,
    answer_body,
    is_transient,
    unusable_answer,
)
from duo_gateway.xca.metadata import BASIC_TEXT_SR, COMPREHENSIVE_SR, ENHANCED_SR, KOS_FORMAT, PDF_FORMAT
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_request,
    find_documents,
    get_documents,
    get_documents_batches,
    parse_adhoc_query_response,
)
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

CommunityStatus = Literal["ok", "partial"] | FailureKind

#: The report formats a timeline shows beside the images: the SR classes DUO itself offers and Twiin's
#: PDF (netherlands.md §4). Together with the KOS they are one OR-list in one formatCode slot.
REPORT_FORMATS: Final = (
    Code(BASIC_TEXT_SR, DICOM_UID_REGISTRY, "Basic Text SR"),
    Code(ENHANCED_SR, DICOM_UID_REGISTRY, "Enhanced SR"),
    Code(COMPREHENSIVE_SR, DICOM_UID_REGISTRY, "Comprehensive SR"),
    PDF_FORMAT,
)
QUERY_FORMATS: Final = (KOS_FORMAT, *REPORT_FORMATS)

#: Answers up to this size are decoded on the event loop, bigger ones in a worker thread (see there).
INLINE_ANSWER_BYTES: Final = INLINE_PARSE_BYTES


@dataclass(frozen=True)
class CommunityResponse:
    """What one community contributed to one timeline, and why not more.

    ``entries`` are only the ones DUO accepted (empty for every status but ok/partial); ``errors``
    are the community's registry errors, or the one DUO raised against the answer (e.g.
    XDSMissingHomeCommunityId). ``attempts`` counts HTTP requests actually tried.
    """

    home_community_id: str
    name: str
    status: CommunityStatus
    entries: tuple[DocumentEntry, ...] = ()
    errors: tuple[RegistryError, ...] = field(default=())
    detail: str = ""
    elapsed_s: float = 0.0
    attempts: int = 0


def service_window(date_from: date, date_to: date) -> tuple[str, str]:
    """serviceStartTimeFrom/To as DTM: From inclusive, To exclusive (ITI TF-2 §3.18.4.1.2.3.6.1).

    So a timeline up to and including ``date_to`` asks for everything before the next midnight. The
    digits are local Dutch dates, matching how DUO and the sim copy study times (metadata.py).
    """
    if date_to < date_from:
        raise ValueError("date_to is before date_from")
    return date_from.strftime("%Y%m%d000000"), (date_to + timedelta(days=1)).strftime("%Y%m%d000000")


def find_documents_query(bsn: str, date_from: date, date_to: date, home: str) -> AdhocQueryRequest:
    """The one query a timeline sends: approved KOS manifests and reports of the patient in the period."""
    start, end = service_window(date_from, date_to)
    return find_documents(bsn_cx(bsn), statuses=(EntryStatus.APPROVED,), format_codes=QUERY_FORMATS,
                          service_start_from=start, service_start_to=end, home=home)


@dataclass(frozen=True)
class _Found:
    """A usable answer: what the community had, and why it said PartialSuccess or warned.

    ``refs`` are the ObjectRefs of an answer to an ObjectRef query, in answer order.
    """

    status: Literal["ok", "partial"]
    detail: str
    entries: tuple[DocumentEntry, ...]
    errors: tuple[RegistryError, ...]
    refs: tuple[ObjectRef, ...] = ()


class _Discarded(ExchangeFailed):
    """An answer that broke an Initiating Gateway rule: everything the community sent is discarded."""


#: Reads one parsed answer for the patient (the BSN is the second argument).
_Classify = Callable[[AdhocQueryResponse, str], _Found]
#: Each request of a by-reference query: the entryUUIDs asked and what came of them.
_Leaf = tuple[tuple[str, ...], _Found | ExchangeFailed]


@dataclass(frozen=True)
class _Outcome:
    """What :meth:`CommunityClient.find_documents` reports, before the timing is added."""

    status: CommunityStatus
    detail: str
    entries: tuple[DocumentEntry, ...] = ()
    errors: tuple[RegistryError, ...] = ()
    attempts: int = 0

    @classmethod
    def of(cls, result: _Found | ExchangeFailed, attempts: int) -> _Outcome:
        if isinstance(result, ExchangeFailed):
            return cls(result.kind, result.detail, errors=result.errors, attempts=attempts)
        return cls(result.status, result.detail, result.entries, result.errors, attempts)


def _asks_for_less(failed: _Found | ExchangeFailed) -> bool:
    """Whether a failed query would succeed asked for less: its answer was over the limit, or the
    registry refused it as too many results."""
    return isinstance(failed, AnswerTooLarge) or (
        isinstance(failed, ExchangeFailed) and not isinstance(failed, _Discarded)
        and any(e.error_code == ErrorCode.TOO_MANY_RESULTS for e in failed.errors))


class CommunityClient:
    """ITI-38 towards one community; one instance lives as long as the daemon (its exchange owns the
    connection slots).

    ``signing`` is DUO's XUA key and certificate (chain), e.g. from
    :func:`duo_gateway.xmldsig.load_signing_pair`; None means DUO cannot vouch for its users, so the
    community is reported as an error and never asked.
    """

    def __init__(
        self,
        community: XcaCommunity,
        *,
        home_community_id: str,
        xua: XuaConfig,
        signing: SigningPair | None,
        metrics: Metrics | None,
        auditor: Auditor | None,
        identity: Peer,
        rng: random.Random | None = None,
    ) -> None:
        self.community = community
        self._auditor = auditor
        self._identity = identity
        self._url = str(community.iti38)
        self._peer = Peer(user_id=self._url, host=urlsplit(self._url).hostname)
        #: Shared with the community's retriever (the daemon hands it over).
        self.signer = CommunitySigner(community, issuer=xua.issuer or home_community_id, signing=signing,
                                      keep=xua.reuse_assertions)
        #: An ITI-38 answer is metadata only: one over the limit is either a misbehaving peer or a
        #: patient with thousands of entries, who is then asked for by reference (module docstring).
        self._limit = answer_limit(community)
        http = PeerClient(f"xca:{community.home_community_id}", community.tls, metrics,
                          max_body_bytes=self._limit.body_bytes, pool_size=community.max_concurrency)
        self._exchange = Exchange(community, signer=self.signer, http=http,
                                  late="no answer before the timeline deadline", limit=self._limit, rng=rng)

    async def close(self) -> None:
        await self._exchange.close()

    async def find_documents(self, claims: Claims, bsn: str, date_from: date, date_to: date, *,
                             deadline_s: float) -> CommunityResponse:
        """Never raises for what the community does; raises ValueError for a caller's bad input."""
        if not is_valid_bsn(bsn):
            raise ValueError("bsn is not a valid BSN")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + deadline_s
        query = find_documents_query(bsn, date_from, date_to, self.community.home_community_id)
        if self.community.iti38_by_reference:
            outcome = await self._by_reference(claims, bsn, query, deadline, why="iti38_by_reference",
                                               attempts=0)
        else:
            result, attempts = await self._request(claims, bsn, query, deadline, self._classify)
            if _asks_for_less(result):
                assert isinstance(result, ExchangeFailed)
                log.info("xca query by reference", community=self.community.home_community_id,
                         after=result.detail)
                outcome = await self._by_reference(claims, bsn, query, deadline, attempts=attempts,
                                                   why=f"the LeafClass answer was refused: {result.detail}")
            else:
                outcome = _Outcome.of(result, attempts)
        response = CommunityResponse(
            home_community_id=self.community.home_community_id, name=self.community.name,
            status=outcome.status, entries=outcome.entries, errors=outcome.errors,
            detail=outcome.detail.replace(bsn, PATIENT_MASK), elapsed_s=loop.time() - started,
            attempts=outcome.attempts)
        log.info("xca query", community=response.home_community_id, status=response.status,
                 entries=len(response.entries), errors=[e.error_code for e in response.errors],
                 attempts=outcome.attempts, elapsed_ms=round(response.elapsed_s * 1000))
        return response

    # -- by reference: ObjectRefs, then GetDocuments in batches ---------------------------------

    async def _by_reference(self, claims: Claims, bsn: str, query: AdhocQueryRequest, deadline: float, *,
                            why: str, attempts: int) -> _Outcome:
        result, sent = await self._request(claims, bsn, replace(query, return_type=ReturnType.OBJECT_REF),
                                           deadline, self._classify)
        attempts += sent
        if isinstance(result, ExchangeFailed):
            return _Outcome(result.kind, f"asked by reference ({why}); ObjectRef query: {result.detail}",
                            errors=result.errors, attempts=attempts)
        delivered = {e.entry_uuid.lower() for e in result.entries}
        # References the answer also delivered as entries (a lenient peer) need no second asking;
        # the ones that are no entryUUID cannot be asked for at all.
        askable = [r for r in result.refs if r.id.lower() not in delivered and is_urn_uuid(r.id)]
        unaskable = sum(1 for r in result.refs if not is_urn_uuid(r.id))
        requests = get_documents_batches(askable, self.community.iti38_batch_size)
        leaves, sent = await self._fetch_all(claims, bsn, requests, deadline)
        asked = [i for req in requests for i in req.values(QueryParam.ENTRY_UUID) or ()]
        return _merge(result, leaves, asked, why=why, requests=len(requests), unaskable=unaskable,
                      attempts=attempts + sent, batch_size=self.community.iti38_batch_size,
                      home=self.community.home_community_id)

    async def _fetch_all(self, claims: Claims, bsn: str, requests: list[AdhocQueryRequest],
                         deadline: float) -> tuple[list[_Leaf], int]:
        """Every batch, side by side as the community's connection slots allow; stops at the first
        answer that broke an Initiating Gateway rule, since that discards everything anyway."""
        tasks = [asyncio.create_task(self._fetch(claims, bsn, req, deadline)) for req in requests]
        leaves: list[_Leaf] = []
        sent = 0
        try:
            for next_done in asyncio.as_completed(tasks):
                batch, n = await next_done
                leaves += batch
                sent += n
                if any(isinstance(result, _Discarded) for _, result in batch):
                    break
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        return leaves, sent

    async def _fetch(self, claims: Claims, bsn: str, request: AdhocQueryRequest,
                     deadline: float) -> tuple[list[_Leaf], int]:
        """One GetDocuments batch; over the limit, its two halves (each again, down to one entry)."""
        ids = tuple(request.values(QueryParam.ENTRY_UUID) or ())
        wanted = frozenset(i.lower() for i in ids)

        def classify(response: AdhocQueryResponse, patient: str) -> _Found:
            return self._classify(response, patient, wanted=wanted)

        result, sent = await self._request(claims, bsn, request, deadline, classify)
        if len(ids) > 1 and _asks_for_less(result):
            assert request.home is not None
            half = len(ids) // 2
            first, second = await asyncio.gather(
                self._fetch(claims, bsn, get_documents(request.home, entry_uuids=ids[:half]), deadline),
                self._fetch(claims, bsn, get_documents(request.home, entry_uuids=ids[half:]), deadline))
            return first[0] + second[0], sent + first[1] + second[1]
        return [(ids, result)], sent

    # -- one request ----------------------------------------------------------------------------

    async def _request(self, claims: Claims, bsn: str, request: AdhocQueryRequest, deadline: float,
                       classify: _Classify) -> tuple[_Found | ExchangeFailed, int]:
        """One ITI-38 request under the exchange policy: (its answer or final failure, requests sent)."""
        request_el = build_adhoc_query_request(request)
        audited = to_bytes(request_el)  # as audited
        body = element_bytes(request_el)  # as sent, in every attempt's envelope

        def audit(result: _Found | ExchangeFailed, _retried: bool) -> None:
            self._audit(claims, bsn, request.query_id, audited, result)

        return await self._exchange.run(
            lambda attempt: self._ask(attempt, body, classify), claims=claims, bsn=bsn, deadline=deadline,
            audit=audit, retry_event="xca query retry")

    async def _ask(self, attempt: Attempt, query: bytes, classify: _Classify) -> _Found:
        answer = await self._exchange.post(attempt, action=Action.ITI38, url=self._url, body=query,
                                           operation="iti38")
        if len(answer.body) <= INLINE_ANSWER_BYTES:
            return self._interpret(answer, attempt.message_id, attempt.bsn, classify)
        return await asyncio.to_thread(self._interpret, answer, attempt.message_id, attempt.bsn, classify)

    def _interpret(self, answer: PeerResponse, message_id: str, bsn: str, classify: _Classify) -> _Found:
        try:
            root, _ = parse_mtom(answer.headers.get("Content-Type", ""), answer.body, self._limit.body_bytes,
                                 max_xml_bytes=self._limit.body_bytes)
            envelope = parse_envelope(root)
        except MtomTooLarge as exc:
            raise AnswerTooLarge("error", self._limit.refusal(f"answer over the size limit ({exc})")
                                 ) from None
        except (SoapFault, XmlError, EnvelopeError, ValueError) as exc:
            raise unusable_answer(exc, answer.status) from None
        body = answer_body(envelope, answer.status, Action.ITI38_RESPONSE, message_id)
        try:
            response = parse_adhoc_query_response(body)
        except (ValueError, Hl7FormatError) as exc:
            raise ExchangeFailed("error", f"malformed answer: {exc}") from None
        return classify(response, bsn)

    def _classify(self, response: AdhocQueryResponse, bsn: str, *,
                  wanted: frozenset[str] | None = None) -> _Found:
        """The Initiating Gateway's reading of one answer; ``wanted``: the entryUUIDs a GetDocuments
        asked for (anything else in its answer makes it unusable)."""
        community = f"{self.community.name} ({self.community.home_community_id})"
        missing_home = response.objects_missing_home()
        if missing_home:
            shown = ", ".join(missing_home[:5]) + (" ..." if len(missing_home) > 5 else "")
            error = RegistryError(
                ErrorCode.MISSING_HOME_COMMUNITY_ID,
                f"responding gateway {community} returned {len(missing_home)} object(s) "
                f"without home: {shown}",
                location=self.community.home_community_id)
            raise _Discarded("error", f"{ErrorCode.MISSING_HOME_COMMUNITY_ID}: {error.code_context}; "
                             "the whole answer was discarded", errors=(error,))
        entries = response.entries
        strangers = [e for e in entries if not _is_patient(e.patient_id, bsn)]
        if strangers:
            error = RegistryError(
                ErrorCode.RESULT_NOT_SINGLE_PATIENT,
                f"responding gateway {community} returned {len(strangers)} entr(y/ies) of another patient",
                location=self.community.home_community_id)
            raise _Discarded("error", f"{ErrorCode.RESULT_NOT_SINGLE_PATIENT}: {error.code_context}; "
                             "the whole answer was discarded", errors=(error,))
        errors = response.errors
        listed = "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)
        if response.status == ResponseStatus.FAILURE:
            raise ExchangeFailed("error", f"registry Failure: {listed or 'no RegistryError given'}",
                                 retryable=is_transient(errors), errors=errors)
        if wanted is not None:
            unasked = sum(1 for e in entries if e.entry_uuid.lower() not in wanted)
            if unasked:
                raise ExchangeFailed("error", f"malformed answer: {unasked} of {len(entries)} entries "
                                     "were not asked for")
        refs = tuple(o for o in response.objects if isinstance(o, ObjectRef))
        counted = f"{len(refs)} references" if refs else f"{len(entries)} entries"
        if response.status == ResponseStatus.PARTIAL_SUCCESS:
            return _Found("partial", f"PartialSuccess, {counted}: {listed}", tuple(entries), errors, refs)
        return _Found("ok", counted + (f"; warnings: {listed}" if listed else ""), tuple(entries), errors,
                      refs)

    # -- audit ----------------------------------------------------------------------------------

    def _audit(self, claims: Claims, bsn: str, query_id: str, query_bytes: bytes,
               result: _Found | ExchangeFailed) -> None:
        if self._auditor is None:
            return
        status = result.kind if isinstance(result, ExchangeFailed) else result.status
        outcome = {"ok": EventOutcome.SUCCESS, "partial": EventOutcome.MINOR_FAILURE}.get(
            status, EventOutcome.SERIOUS_FAILURE)
        self._auditor.record(iti38_query(
            initiating=self._identity, responding=self._peer, audit_source=self._auditor.audit_source,
            query_id=query_id, query_request=query_bytes, patient_id=bsn_cx(bsn),
            home_community_id=self.community.home_community_id, outcome=outcome,
            outcome_description=None if status == "ok" else
            f"{status}: {result.detail.replace(bsn, PATIENT_MASK)}"[:1024],
            when=datetime.now(UTC), requestor=Requestor.of(claims, issuer=self.signer.issuer)))


def _merge(refs: _Found, leaves: list[_Leaf], asked: list[str], *, why: str, requests: int, unaskable: int,
           attempts: int, batch_size: int, home: str) -> _Outcome:
    """One community's answer from its ObjectRef answer and its GetDocuments batches (``leaves``, in
    the order they completed; ``asked``: the entryUUIDs in reference order).

    Entries come in reference order (those the ObjectRef answer delivered itself first), whatever
    order the batches came back in. An entry no longer Approved (deprecated between the two queries)
    is left out, as FindDocuments asked for Approved only. Failed batches make the community
    ``partial``, with the community's registry errors or, where it gave none, one RegistryError of
    DUO's per kind of failure (XDSUnavailableCommunity for no answer, as xca.md §9 reports an
    unreachable responder); the community is only reported failed when nothing came at all.
    """
    for _, result in leaves:
        if isinstance(result, _Discarded):
            return _Outcome("error", f"asked by reference ({why}); GetDocuments: {result.detail}",
                            errors=result.errors, attempts=attempts)
    found: dict[str, DocumentEntry] = {}
    errors = list(refs.errors)
    partial = refs.status == "partial" or unaskable > 0
    #: (kind, detail) of failed batches -> [requests, entries, whether the community named errors]
    failures: dict[tuple[FailureKind, str], list[int]] = {}
    first_failure: ExchangeFailed | None = None
    warnings: list[str] = []
    stale = 0
    for ids, result in leaves:
        if isinstance(result, ExchangeFailed):
            first_failure = first_failure or result
            group = failures.setdefault((result.kind, result.detail), [0, 0, 0])
            group[0] += 1
            group[1] += len(ids)
            group[2] |= bool(result.errors)
            errors += result.errors
            continue
        if result.status == "partial":
            partial = True
            warnings.append(result.detail)
        errors += result.errors
        for entry in result.entries:
            if entry.status != EntryStatus.APPROVED:
                stale += 1
            else:
                found[entry.entry_uuid.lower()] = entry
    for (kind, text), (n_requests, n_entries, named) in failures.items():
        if not named:
            code = ErrorCode.REGISTRY_ERROR if kind == "error" else ErrorCode.UNAVAILABLE_COMMUNITY
            errors.append(RegistryError(
                code, f"{n_entries} entries in {n_requests} GetDocuments requests not fetched: {text}",
                location=home))
    entries = [*refs.entries, *(found[i.lower()] for i in asked if i.lower() in found)]
    failed_ids = sum(group[1] for group in failures.values())
    missing = len(asked) - len(found) - stale - failed_ids
    detail = (f"asked by reference ({why}): {refs.detail}, {len(found) + stale} entries in {requests} "
              f"GetDocuments requests of up to {batch_size}")
    if failures:
        failed = sum(group[0] for group in failures.values())
        detail += (f"; {failed} GetDocuments requests failed, {failed_ids} entries not fetched: "
                   + "; ".join(f"{kind}: {text}" for (kind, text) in failures))
    if unaskable:
        detail += f"; {unaskable} references were no entryUUID and could not be asked for"
    if missing > 0:
        partial = True
        detail += f"; {missing} referenced entries did not come back"
    if stale:
        detail += f"; {stale} entries no longer Approved left out"
    if warnings:
        detail += "; " + "; ".join(warnings)
    if first_failure is not None and not entries:
        return _Outcome(first_failure.kind, detail, errors=tuple(errors), attempts=attempts)
    status: CommunityStatus = "partial" if partial or failures else "ok"
    return _Outcome(status, detail, tuple(entries), tuple(errors), attempts)


def answer_limit(community: XcaCommunity) -> AnswerLimit:
    """The community's ITI-38 answer limit: the HTTP body, envelope included, is what is bounded."""
    return AnswerLimit("iti38_max_answer_bytes", community.iti38_max_answer_bytes,
                       community.iti38_max_answer_bytes)


def _is_patient(patient_id: str, bsn: str) -> bool:
    try:
        cx = Cx.parse(patient_id)
    except Hl7FormatError:
        return False
    return cx.id == bsn and cx.authority_oid == BSN_OID


__all__ = [
    "INLINE_ANSWER_BYTES", "QUERY_FORMATS", "REPORT_FORMATS",
    "CommunityClient", "CommunityResponse", "CommunityStatus", "answer_limit", "find_documents_query",
    "service_window",
]
