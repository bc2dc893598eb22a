"""DUO as XCA Initiating Gateway: one ITI-38 FindDocuments to one community, for a TLB timeline.

What a community answers ends up on a clinician's screen next to studies from elsewhere, so every
answer is classified into one of five outcomes (:data:`CommunityStatus`) instead of being trusted or
dropped wholesale. The choices that matter, and why:

- **Never unsigned.** Without DUO's XUA signing pair the community is not asked at all: an unsigned
  request would be refused anyway (xca.md §11), and sending the BSN for nothing is a disclosure.
- **Retries only where repeating can help** (xca.md §13.5): a refused or reset connection, HTTP
  502/503/504, and a timeout of the community's own per-attempt limit while the caller's deadline
  still has room. A SOAP Fault, a registry Failure or a malformed answer would come back the same
  way, so they are final. Backoff is exponential with full jitter, so many timelines that failed
  together do not all come back at the same instant.
- **The caller's deadline is absolute.** Waiting for a connection slot, every attempt and every
  backoff sleep fit inside ``deadline_s``; a slow community costs its own budget and no more.
- **One semaphore per community, shared by every timeline** (``max_concurrency``): the community's
  capacity is a property of the community, not of one request.
- **Whole answers are discarded when they break an Initiating Gateway rule**: an object without
  ``home`` (xca.md §5, GZ ITI38-019) or an entry for another patient. Keeping the rest would put
  documents on the timeline whose origin or patient DUO cannot vouch for.
- **Every attempt is audited** (ITI-20, xca.md §12): each one sends the BSN to the community, even
  one that ends in a 503, so each is a disclosure with its own outcome.
- **One assertion per community.** The assertion is a bearer token: one naming several communities
  could be replayed by any of them at the others for its lifetime, under DUO's requester, so each
  names only its own community.
- **Signed assertions are reused, Timestamps never** (``xua.reuse_assertions``, :class:`CommunitySigner`,
  shared with the community's ITI-39/RAD-75 retriever): a clinician who
  opens a patient's timeline usually asks again within minutes (another period, a refresh), and at
  50 communities the signatures were a third of a timeline's CPU. Each client keeps the assertions
  it signed, by requester and patient, until :data:`REUSE_MARGIN` before they expire. That gives
  nothing away: the assertion names only this community, which already received it and could
  replay it for its lifetime anyway. Every message still gets a fresh ``wsu:Timestamp``, since
  WS-Security receivers may refuse a message Timestamp they have seen before.
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
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from typing import Final, Literal
from urllib.parse import urlsplit

import structlog
from cryptography import x509

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import EventOutcome, Peer, Requestor, iti38_query
from duo_gateway.bsn import BSN_OID, bsn_cx, is_valid_bsn
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.http.client import PeerCallError, PeerClient, PeerResponse, classify_call_error
from duo_gateway.observability.metrics import Metrics
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_ANONYMOUS,
    Addressing,
    EnvelopeError,
    SoapFault,
    element_bytes,
    new_message_id,
    parse_envelope,
    serialize_with,
)
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
from duo_gateway.xca.metadata import BASIC_TEXT_SR, COMPREHENSIVE_SR, ENHANCED_SR, KOS_FORMAT, PDF_FORMAT
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    build_adhoc_query_request,
    find_documents,
    parse_adhoc_query_response,
)
from duo_gateway.xmldsig import PrivateKey
from duo_gateway.xua import Claims, issue_assertion, security_header_bytes

log = structlog.get_logger(__name__)

CommunityStatus = Literal["ok", "partial", "timeout", "unavailable", "error"]
SigningPair = tuple[PrivateKey, x509.Certificate | Sequence[x509.Certificate]]

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
#: A retry with less time than this left cannot get an answer through and only adds load.
MIN_ATTEMPT_S: Final = 0.1
_CONTENT_TYPE: Final = f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38}"'
#: HTTP answers that mean "not now": worth a retry.
TRANSIENT_HTTP: Final = frozenset({502, 503, 504})
#: What stands for the BSN in text a peer wrote, before it is shown or logged.
PATIENT_MASK: Final = "[patient]"
#: How long DUO's XUA assertions live (Twiin's 10 minutes, netherlands.md §3).
ASSERTION_LIFETIME_S: Final = 600.0
#: An assertion closer than this to its end is not used any more: a fresh one is signed instead.
REUSE_MARGIN: Final = timedelta(seconds=60)
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


@dataclass(frozen=True)
class _Attempt:
    status: CommunityStatus
    detail: str
    retryable: bool = False
    entries: tuple[DocumentEntry, ...] = ()
    errors: tuple[RegistryError, ...] = ()
    #: Whether a request went out (and so disclosed the BSN): only those are audited.
    sent: bool = True


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


class CommunitySigner:
    """DUO's XUA assertions for one community: signed for it alone, kept for reuse (module docstring).

    Shared by everything DUO sends that community (ITI-38 here, ITI-39 and RAD-75 in
    :mod:`~duo_gateway.xca.initiating.retrieve`). Use it on the event loop only.
    """

    def __init__(self, community: XcaCommunity, *, issuer: str, signing: SigningPair | None,
                 keep: int) -> None:
        self._community = community
        self._issuer = issuer
        self._signing = signing
        self._keep_max = keep
        #: Signed assertions (serialized) by (requester, BSN): (assertion, NotOnOrAfter), least recently
        #: used first.
        self._assertions: OrderedDict[tuple[Claims, str], tuple[bytes, datetime]] = OrderedDict()

    @property
    def issuer(self) -> str:
        """The Issuer of DUO's assertions: who vouches for the requester in DUO's audit records."""
        return self._issuer

    @property
    def can_sign(self) -> bool:
        """False without DUO's signing pair: nothing may then be sent, since unsigned is refused anyway."""
        return self._signing is not None

    def security(self, claims: Claims, bsn: str) -> bytes:
        """A ``wsse:Security`` header with a new Timestamp and this requester's assertion about this
        patient: the kept one while it has more than :data:`REUSE_MARGIN` left, else a fresh one.
        Raises ValueError when none can be issued (no signing pair, claims or BSN refused)."""
        now = datetime.now(UTC)
        assertion = self._reusable(claims, bsn, now)
        if assertion is None:
            assertion, expires = self._sign(claims, bsn, now)
            self._keep(claims, bsn, assertion, expires)
        return security_header_bytes(assertion, now)

    def _sign(self, claims: Claims, bsn: str, now: datetime) -> tuple[bytes, datetime]:
        if self._signing is None:
            raise ValueError("DUO has no XUA signing key and certificate")
        key, cert = self._signing
        assertion = issue_assertion(claims, issuer=self._issuer, audience=self._community.home_community_id,
                                    key=key, cert=cert, now=now, lifetime_s=ASSERTION_LIFETIME_S,
                                    digest=self._community.signature_algorithm, subject_bsn=bsn)
        return element_bytes(assertion), now + timedelta(seconds=ASSERTION_LIFETIME_S)

    def _keep(self, claims: Claims, bsn: str, assertion: bytes, expires: datetime) -> None:
        if self._keep_max == 0:
            return
        self._assertions[(claims, bsn)] = (assertion, expires)
        self._assertions.move_to_end((claims, bsn))
        while len(self._assertions) > self._keep_max:
            self._assertions.popitem(last=False)

    def _reusable(self, claims: Claims, bsn: str, now: datetime) -> bytes | None:
        kept = self._assertions.get((claims, bsn))
        if kept is None:
            return None
        if now + REUSE_MARGIN >= kept[1]:
            del self._assertions[(claims, bsn)]
            return None
        self._assertions.move_to_end((claims, bsn))
        return kept[0]


class CommunityClient:
    """ITI-38 towards one community; one instance lives as long as the daemon (it owns the semaphore).

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
        self._http = PeerClient(f"xca:{community.home_community_id}", community.tls, metrics,
                                max_body_bytes=MAX_ANSWER_BYTES, pool_size=community.max_concurrency)
        self._slots = asyncio.Semaphore(community.max_concurrency)
        self._rng = rng or random.SystemRandom()
        #: Shared with the community's retriever (the daemon hands it over).
        self.signer = CommunitySigner(community, issuer=xua.issuer or home_community_id, signing=signing,
                                      keep=xua.reuse_assertions)

    async def close(self) -> None:
        await self._http.close()

    async def find_documents(self, claims: Claims, bsn: str, date_from: date, date_to: date, *,
                             deadline_s: float) -> CommunityResponse:
        """Never raises for what the community does; raises ValueError for a caller's bad input."""
        if not is_valid_bsn(bsn):
            raise ValueError("bsn is not a valid BSN")
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + deadline_s
        query_el = build_adhoc_query_request(
            find_documents_query(bsn, date_from, date_to, self.community.home_community_id))
        query_bytes = to_bytes(query_el)  # as audited
        query = element_bytes(query_el)  # as sent, in every attempt's envelope

        attempts = 0
        result: _Attempt
        while True:
            result = await self._attempt(claims, bsn, query, query_bytes, deadline)
            if result.sent:
                attempts += 1
                self._audit(claims, bsn, query_bytes, result)
            if not result.retryable or attempts > self.community.retries:
                break
            backoff = self._rng.uniform(0, self.community.retry_backoff_s * 2 ** (attempts - 1))
            if deadline - loop.time() - backoff < MIN_ATTEMPT_S:
                break
            log.info("xca query retry", community=self.community.home_community_id, attempt=attempts,
                     after=result.status, backoff_ms=round(backoff * 1000))
            await asyncio.sleep(backoff)

        response = CommunityResponse(
            home_community_id=self.community.home_community_id, name=self.community.name,
            status=result.status, entries=result.entries, errors=result.errors,
            detail=result.detail.replace(bsn, PATIENT_MASK), elapsed_s=loop.time() - started,
            attempts=attempts)
        log.info("xca query", community=response.home_community_id, status=response.status,
                 entries=len(response.entries), errors=[e.error_code for e in response.errors],
                 attempts=attempts, elapsed_ms=round(response.elapsed_s * 1000))
        return response

    # -- one attempt ----------------------------------------------------------------------------

    async def _attempt(self, claims: Claims, bsn: str, query: bytes, query_bytes: bytes,
                       deadline: float) -> _Attempt:
        if not self.signer.can_sign:
            return _Attempt("error", "DUO has no XUA signing key and certificate (xua.signing_key_file): "
                            "the community was not asked, since an unsigned request must not be sent",
                            sent=False)
        loop = asyncio.get_running_loop()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return _Attempt("timeout", "the deadline passed before the community could be asked", sent=False)
        try:
            async with asyncio.timeout(remaining):
                await self._slots.acquire()
        except TimeoutError:
            return _Attempt("timeout", f"all {self.community.max_concurrency} connections to the community "
                            "stayed busy until the deadline", sent=False)
        try:
            budget = min(self.community.timeout_s, deadline - loop.time())
            if budget <= 0:
                return _Attempt("timeout", "the deadline passed before the community could be asked",
                                sent=False)
            message_id = new_message_id()
            try:
                payload = self._request(claims, bsn, query, message_id)
            except ValueError as exc:
                return _Attempt("error", f"could not issue the XUA assertion: {exc}", sent=False)
            try:
                answer = await self._http.post(self._url, payload, operation="iti38", timeout_s=budget,
                                               content_type=_CONTENT_TYPE)
            except PeerCallError as exc:
                return self._call_failure(exc, cut_by_deadline=budget < self.community.timeout_s)
            except asyncio.CancelledError:
                # The caller gave up (its own deadline): the BSN went out all the same.
                self._audit(claims, bsn, query_bytes, _Attempt("timeout", "cancelled by the caller"))
                raise
            if len(answer.body) <= INLINE_ANSWER_BYTES:
                return self._interpret(answer, message_id, bsn)
            try:
                return await asyncio.to_thread(self._interpret, answer, message_id, bsn)
            except asyncio.CancelledError:
                # The answer came, but the caller's deadline fell while it was read: still a disclosure.
                self._audit(claims, bsn, query_bytes, _Attempt("timeout", "cancelled by the caller"))
                raise
        finally:
            self._slots.release()

    def _request(self, claims: Claims, bsn: str, query: bytes, message_id: str) -> bytes:
        """The signed envelope: the assertion reused or signed here, in a Security header with a new
        Timestamp. Query and Security header go in as bytes, unparsed."""
        return serialize_with(
            Addressing(action=Action.ITI38, message_id=message_id, to=self._url, reply_to=WSA_ANONYMOUS),
            query, [self.signer.security(claims, bsn)])

    def _call_failure(self, exc: PeerCallError, *, cut_by_deadline: bool) -> _Attempt:
        if exc.kind == "timeout":
            if cut_by_deadline:
                return _Attempt("timeout", "no answer before the timeline deadline")
            return _Attempt("timeout", f"no answer within {self.community.timeout_s:g} s", retryable=True)
        kind, detail, retryable = classify_call_error(exc)
        return _Attempt(kind, detail, retryable=retryable)

    def _interpret(self, answer: PeerResponse, message_id: str, bsn: str) -> _Attempt:
        if answer.status in TRANSIENT_HTTP:
            return _Attempt("unavailable", f"HTTP {answer.status}", retryable=True)
        try:
            root, _ = parse_mtom(answer.headers.get("Content-Type", ""), answer.body, MAX_ANSWER_BYTES)
            envelope = parse_envelope(root)
        except SoapFault as fault:
            subcode = f" ({fault.subcode[1]})" if fault.subcode else ""
            return _Attempt("error", f"SOAP fault {fault.code}{subcode}: {fault.reason}")
        except (XmlError, EnvelopeError, ValueError) as exc:
            if answer.status != 200:
                return _Attempt("error", f"HTTP {answer.status} without a SOAP answer")
            return _Attempt("error", f"malformed answer: {exc}")
        if answer.status != 200:
            return _Attempt("error", f"HTTP {answer.status} with a SOAP answer that is not a fault")
        addressing = envelope.addressing
        if addressing.action != Action.ITI38_RESPONSE:
            return _Attempt("error", f"malformed answer: wsa:Action {addressing.action or '(none)'}, "
                            f"expected {Action.ITI38_RESPONSE}")
        if addressing.relates_to != message_id:
            return _Attempt("error", "malformed answer: wsa:RelatesTo does not name the request's MessageID")
        if envelope.body is None:
            return _Attempt("error", "malformed answer: empty SOAP Body")
        try:
            response = parse_adhoc_query_response(envelope.body)
        except (ValueError, Hl7FormatError) as exc:
            return _Attempt("error", f"malformed answer: {exc}")
        return self._classify(response.status, response.entries, response.errors,
                              response.objects_missing_home(), bsn)

    def _classify(self, status: ResponseStatus, entries: list[DocumentEntry],
                  errors: tuple[RegistryError, ...], missing_home: list[str], bsn: str) -> _Attempt:
        community = f"{self.community.name} ({self.community.home_community_id})"
        if missing_home:
            shown = ", ".join(missing_home[:5]) + (" ..." if len(missing_home) > 5 else "")
            error = RegistryError(
                ErrorCode.MISSING_HOME_COMMUNITY_ID,
                f"responding gateway {community} returned {len(missing_home)} object(s) "
                f"without home: {shown}",
                location=self.community.home_community_id)
            return _Attempt("error", f"{ErrorCode.MISSING_HOME_COMMUNITY_ID}: {error.code_context}; "
                            "the whole answer was discarded", errors=(error,))
        strangers = [e for e in entries if not _is_patient(e.patient_id, bsn)]
        if strangers:
            error = RegistryError(
                ErrorCode.RESULT_NOT_SINGLE_PATIENT,
                f"responding gateway {community} returned {len(strangers)} entr(y/ies) of another patient",
                location=self.community.home_community_id)
            return _Attempt("error", f"{ErrorCode.RESULT_NOT_SINGLE_PATIENT}: {error.code_context}; "
                            "the whole answer was discarded", errors=(error,))
        listed = "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)
        if status == ResponseStatus.FAILURE:
            return _Attempt("error", f"registry Failure: {listed or 'no RegistryError given'}", errors=errors)
        if status == ResponseStatus.PARTIAL_SUCCESS:
            return _Attempt("partial", f"PartialSuccess, {len(entries)} entries: {listed}",
                            entries=tuple(entries), errors=errors)
        return _Attempt("ok", f"{len(entries)} entries" + (f"; warnings: {listed}" if listed else ""),
                        entries=tuple(entries), errors=errors)

    # -- audit ----------------------------------------------------------------------------------

    def _audit(self, claims: Claims, bsn: str, query_bytes: bytes, result: _Attempt) -> None:
        if self._auditor is None:
            return
        outcome = {"ok": EventOutcome.SUCCESS, "partial": EventOutcome.MINOR_FAILURE}.get(
            result.status, EventOutcome.SERIOUS_FAILURE)
        self._auditor.record(iti38_query(
            initiating=self._identity, responding=self._peer, audit_source=self._auditor.audit_source,
            query_id=StoredQuery.FIND_DOCUMENTS, query_request=query_bytes, patient_id=bsn_cx(bsn),
            home_community_id=self.community.home_community_id, outcome=outcome,
            outcome_description=None if result.status == "ok" else
            f"{result.status}: {result.detail.replace(bsn, PATIENT_MASK)}"[:1024],
            when=datetime.now(UTC), requestor=Requestor.of(claims, issuer=self.signer.issuer)))


def _is_patient(patient_id: str, bsn: str) -> bool:
    try:
        cx = Cx.parse(patient_id)
    except Hl7FormatError:
        return False
    return cx.id == bsn and cx.authority_oid == BSN_OID


__all__ = [
    "ASSERTION_LIFETIME_S", "INLINE_ANSWER_BYTES", "MIN_ATTEMPT_S", "PATIENT_MASK", "QUERY_FORMATS",
    "REPORT_FORMATS", "REUSE_MARGIN", "TRANSIENT_HTTP",
    "CommunityClient", "CommunityResponse", "CommunitySigner", "CommunityStatus", "SigningPair",
    "find_documents_query", "service_window",
]
