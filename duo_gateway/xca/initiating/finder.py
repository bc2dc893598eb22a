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
- **Logs never carry the BSN**, and text a peer wrote (fault reasons, codeContexts) has it masked in
  ``detail`` too, because a peer may echo the patient id there and ``detail`` is logged upstream.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
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
from duo_gateway.soap.mtom import parse_mtom
from duo_gateway.soap.xml import INLINE_PARSE_BYTES, XmlError, to_bytes
from duo_gateway.xca.codes import (
    DICOM_UID_REGISTRY,
    Action,
    EntryStatus,
    ErrorCode,
    ResponseStatus,
    StoredQuery,
)
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.hl7 import Code, Cx, Hl7FormatError
from duo_gateway.xca.initiating.exchange import (
    PATIENT_MASK,
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
    build_adhoc_query_request,
    find_documents,
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

#: An ITI-38 answer is metadata only; anything bigger is a misbehaving peer, not a rich patient.
MAX_ANSWER_BYTES: Final = 16 * 1024 * 1024
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
    """A usable answer: what the community had, and why it said PartialSuccess or warned."""

    status: Literal["ok", "partial"]
    detail: str
    entries: tuple[DocumentEntry, ...]
    errors: tuple[RegistryError, ...]


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
        http = PeerClient(f"xca:{community.home_community_id}", community.tls, metrics,
                          max_body_bytes=MAX_ANSWER_BYTES, pool_size=community.max_concurrency)
        self._exchange = Exchange(community, signer=self.signer, http=http,
                                  late="no answer before the timeline deadline", rng=rng)

    async def close(self) -> None:
        await self._exchange.close()

    async def find_documents(self, claims: Claims, bsn: str, date_from: date, date_to: date, *,
                             deadline_s: float) -> CommunityResponse:
        """Never raises for what the community does; raises ValueError for a caller's bad input."""
        if not is_valid_bsn(bsn):
            raise ValueError("bsn is not a valid BSN")
        loop = asyncio.get_running_loop()
        started = loop.time()
        query_el = build_adhoc_query_request(
            find_documents_query(bsn, date_from, date_to, self.community.home_community_id))
        query_bytes = to_bytes(query_el)  # as audited
        query = element_bytes(query_el)  # as sent, in every attempt's envelope

        def audit(result: _Found | ExchangeFailed, _retried: bool) -> None:
            self._audit(claims, bsn, query_bytes, result)

        result, attempts = await self._exchange.run(
            lambda attempt: self._ask(attempt, query), claims=claims, bsn=bsn, deadline=started + deadline_s,
            audit=audit, retry_event="xca query retry")
        if isinstance(result, ExchangeFailed):
            status: CommunityStatus = result.kind
            entries: tuple[DocumentEntry, ...] = ()
        else:
            status, entries = result.status, result.entries
        response = CommunityResponse(
            home_community_id=self.community.home_community_id, name=self.community.name,
            status=status, entries=entries, errors=result.errors,
            detail=result.detail.replace(bsn, PATIENT_MASK), elapsed_s=loop.time() - started,
            attempts=attempts)
        log.info("xca query", community=response.home_community_id, status=response.status,
                 entries=len(response.entries), errors=[e.error_code for e in response.errors],
                 attempts=attempts, elapsed_ms=round(response.elapsed_s * 1000))
        return response

    # -- one attempt ----------------------------------------------------------------------------

    async def _ask(self, attempt: Attempt, query: bytes) -> _Found:
        answer = await self._exchange.post(attempt, action=Action.ITI38, url=self._url, body=query,
                                           operation="iti38")
        if len(answer.body) <= INLINE_ANSWER_BYTES:
            return self._interpret(answer, attempt.message_id, attempt.bsn)
        return await asyncio.to_thread(self._interpret, answer, attempt.message_id, attempt.bsn)

    def _interpret(self, answer: PeerResponse, message_id: str, bsn: str) -> _Found:
        try:
            root, _ = parse_mtom(answer.headers.get("Content-Type", ""), answer.body, MAX_ANSWER_BYTES)
            envelope = parse_envelope(root)
        except (SoapFault, XmlError, EnvelopeError, ValueError) as exc:
            raise unusable_answer(exc, answer.status) from None
        body = answer_body(envelope, answer.status, Action.ITI38_RESPONSE, message_id)
        try:
            response = parse_adhoc_query_response(body)
        except (ValueError, Hl7FormatError) as exc:
            raise ExchangeFailed("error", f"malformed answer: {exc}") from None
        return self._classify(response.status, response.entries, response.errors,
                              response.objects_missing_home(), bsn)

    def _classify(self, status: ResponseStatus, entries: list[DocumentEntry],
                  errors: tuple[RegistryError, ...], missing_home: list[str], bsn: str) -> _Found:
        community = f"{self.community.name} ({self.community.home_community_id})"
        if missing_home:
            shown = ", ".join(missing_home[:5]) + (" ..." if len(missing_home) > 5 else "")
            error = RegistryError(
                ErrorCode.MISSING_HOME_COMMUNITY_ID,
                f"responding gateway {community} returned {len(missing_home)} object(s) "
                f"without home: {shown}",
                location=self.community.home_community_id)
            raise ExchangeFailed("error", f"{ErrorCode.MISSING_HOME_COMMUNITY_ID}: {error.code_context}; "
                                 "the whole answer was discarded", errors=(error,))
        strangers = [e for e in entries if not _is_patient(e.patient_id, bsn)]
        if strangers:
            error = RegistryError(
                ErrorCode.RESULT_NOT_SINGLE_PATIENT,
                f"responding gateway {community} returned {len(strangers)} entr(y/ies) of another patient",
                location=self.community.home_community_id)
            raise ExchangeFailed("error", f"{ErrorCode.RESULT_NOT_SINGLE_PATIENT}: {error.code_context}; "
                                 "the whole answer was discarded", errors=(error,))
        listed = "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)
        if status == ResponseStatus.FAILURE:
            raise ExchangeFailed("error", f"registry Failure: {listed or 'no RegistryError given'}",
                                 retryable=is_transient(errors), errors=errors)
        if status == ResponseStatus.PARTIAL_SUCCESS:
            return _Found("partial", f"PartialSuccess, {len(entries)} entries: {listed}", tuple(entries),
                          errors)
        return _Found("ok", f"{len(entries)} entries" + (f"; warnings: {listed}" if listed else ""),
                      tuple(entries), errors)

    # -- audit ----------------------------------------------------------------------------------

    def _audit(self, claims: Claims, bsn: str, query_bytes: bytes, result: _Found | ExchangeFailed) -> None:
        if self._auditor is None:
            return
        status = result.kind if isinstance(result, ExchangeFailed) else result.status
        outcome = {"ok": EventOutcome.SUCCESS, "partial": EventOutcome.MINOR_FAILURE}.get(
            status, EventOutcome.SERIOUS_FAILURE)
        self._auditor.record(iti38_query(
            initiating=self._identity, responding=self._peer, audit_source=self._auditor.audit_source,
            query_id=StoredQuery.FIND_DOCUMENTS, query_request=query_bytes, patient_id=bsn_cx(bsn),
            home_community_id=self.community.home_community_id, outcome=outcome,
            outcome_description=None if status == "ok" else
            f"{status}: {result.detail.replace(bsn, PATIENT_MASK)}"[:1024],
            when=datetime.now(UTC), requestor=Requestor.of(claims, issuer=self.signer.issuer)))


def _is_patient(patient_id: str, bsn: str) -> bool:
    try:
        cx = Cx.parse(patient_id)
    except Hl7FormatError:
        return False
    return cx.id == bsn and cx.authority_oid == BSN_OID


__all__ = [
    "INLINE_ANSWER_BYTES", "QUERY_FORMATS", "REPORT_FORMATS",
    "CommunityClient", "CommunityResponse", "CommunityStatus", "find_documents_query", "service_window",
]
