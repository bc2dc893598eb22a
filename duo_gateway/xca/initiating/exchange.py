"""DUO's outbound exchange policy towards one XCA community: how ITI-38, ITI-39 and RAD-75 go out.

The three transactions differ in what they ask and how they read the answer (:mod:`.finder`,
:mod:`.retriever`); how a request leaves DUO and what happens when it fails is one policy, here, so
that it cannot drift apart between them. The choices that matter, and why:

- **Never unsigned.** Without DUO's XUA signing pair the community is not asked at all: an unsigned
  request would be refused anyway (xca.md §11), and sending the BSN for nothing is a disclosure.
- **One assertion per community, reused; Timestamps never** (:class:`CommunitySigner`). The
  assertion is a bearer token: one naming several communities could be replayed by any of them at
  the others for its lifetime, under DUO's requester, so each names only its own community. A
  clinician who opens a timeline usually asks again within minutes (another period, a refresh, then a
  transfer), and at 50 communities the signatures were a third of a timeline's CPU, so the signer
  keeps the assertions it signed, by requester and patient, until :data:`REUSE_MARGIN` before they
  expire. That gives nothing away: the community already received it and could replay it for its
  lifetime anyway. Every message still gets a fresh ``wsu:Timestamp``, since WS-Security receivers may
  refuse a message Timestamp they have seen before.
- **The caller's deadline is absolute.** Waiting for a connection slot, every attempt and every
  backoff sleep fit inside it; a slow community costs its own budget and no more.
- **A bounded number of connections per community and side** (``max_concurrency``): the community's
  capacity is a property of the community, shared by every timeline (or every transfer), and waiting
  for a slot counts against the deadline like everything else.
- **Retries only where repeating can help** (xca.md §13.5): a refused or lost connection, HTTP
  502/503/504 (:data:`TRANSIENT_HTTP`), and a timeout of the community's own per-attempt limit while
  the deadline still has room. A SOAP Fault, a registry Failure or a malformed answer would come back
  the same way, so they are final here (a busy registry is still ``retryable`` for a later job, see
  :func:`is_transient`). So is a request of which part of the answer was already used: asking again
  would deliver it twice. Backoff is exponential with full jitter, so many requests that failed
  together do not all come back at the same instant; :meth:`Exchange.retry_delay` is the one place
  that decides.
- **Answers must answer this request**: the right ``wsa:Action``, and ``wsa:RelatesTo`` naming the
  request's MessageID (:func:`answer_body`); anything else is a malformed answer.
- **Every request that went out is audited, once, even when the caller gives up while it is on the
  wire or being read**: each one disclosed the BSN to the community.
- **Logs never carry the BSN**, and text a peer wrote (fault reasons, codeContexts) has it masked as
  :data:`PATIENT_MASK` in every ``detail``, because a peer may echo the patient id there.
"""

from __future__ import annotations

import asyncio
import random
from collections import OrderedDict
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Final, TypeVar

import aiohttp
import structlog
from cryptography import x509
from lxml import etree

from duo_gateway.config.peers import XcaCommunity
from duo_gateway.failure import Failure, FailureKind
from duo_gateway.http.client import PeerCallError, PeerClient, PeerResponse, PeerStream
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_ANONYMOUS,
    Addressing,
    Envelope,
    SoapFault,
    element_bytes,
    new_message_id,
    serialize_with,
)
from duo_gateway.soap.mtom import mtom_request
from duo_gateway.xca.codes import ErrorCode
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xmldsig import PrivateKey
from duo_gateway.xua import Claims, issue_assertion, security_header_bytes

log = structlog.get_logger(__name__)

T = TypeVar("T")
SigningPair = tuple[PrivateKey, x509.Certificate | Sequence[x509.Certificate]]

#: A retry with less time than this left cannot get an answer through and only adds load.
MIN_ATTEMPT_S: Final = 0.1
#: HTTP answers that mean "not now": worth a retry.
TRANSIENT_HTTP: Final = frozenset({502, 503, 504})
#: Registry errors that say "not now" rather than "no": worth another try later.
TRANSIENT_CODES: Final = frozenset({
    ErrorCode.REGISTRY_BUSY, ErrorCode.REPOSITORY_BUSY, ErrorCode.REGISTRY_OUT_OF_RESOURCES,
    ErrorCode.REGISTRY_NOT_AVAILABLE, ErrorCode.UNAVAILABLE_COMMUNITY,
})
#: What stands for the BSN in text a peer wrote, before it is shown or logged.
PATIENT_MASK: Final = "[patient]"
#: How long DUO's XUA assertions live (Twiin's 10 minutes, netherlands.md §3).
ASSERTION_LIFETIME_S: Final = 600.0
#: An assertion closer than this to its end is not used any more: a fresh one is signed instead.
REUSE_MARGIN: Final = timedelta(seconds=60)


class ExchangeFailed(Failure):
    """An exchange with a community gave nothing usable.

    ``retryable`` says whether asking again later can help (a timeout, an unavailable community, a
    busy repository); ``errors`` are the registry errors the community gave, if any, or the one DUO
    raised against its answer.
    """

    def __init__(self, kind: FailureKind, detail: str, *, retryable: bool = False,
                 errors: tuple[RegistryError, ...] = ()) -> None:
        super().__init__(kind, detail, retryable=retryable)
        self.errors = errors

    def __str__(self) -> str:
        return f"{self.kind}: {self.detail}"

    def masked(self, bsn: str) -> ExchangeFailed:
        """The same failure (of the same class) with the patient's BSN masked in ``detail`` (a peer
        may have echoed it)."""
        if bsn not in self.detail:
            return self
        return type(self)(self.kind, self.detail.replace(bsn, PATIENT_MASK), retryable=self.retryable,
                          errors=self.errors)


@dataclass(frozen=True)
class AnswerLimit:
    """How much of an answer DUO reads, and the community setting that says so.

    ``key`` is the :class:`~duo_gateway.config.peers.XcaCommunity` field and ``value`` its setting;
    ``body_bytes`` is where reading the HTTP body stops (the setting plus what the encoding adds, e.g.
    inline base64). Every refusal names the key and its value, so an integrator who meets a legitimate
    answer over it knows what to raise.
    """

    key: str
    value: int
    body_bytes: int

    def refusal(self, what: str) -> str:
        mib = f" ({self.value / 1024 / 1024:.4g} MiB)" if self.value >= 1024 * 1024 else ""
        return f"{what}; the limit is xca_communities.{self.key} = {self.value} bytes{mib}"


class AnswerTooLarge(ExchangeFailed):
    """The answer was over the client's size limit, so it was not read.

    Final for this request like any unusable answer (the same request would bring the same answer),
    but a caller that can ask for less may: ITI-38 then asks by reference, in batches (:mod:`.finder`).
    """


def is_transient(errors: Sequence[RegistryError]) -> bool:
    """Whether a registry error among these says "not now" (:data:`TRANSIENT_CODES`)."""
    return any(e.error_code in TRANSIENT_CODES for e in errors if e.is_error)


def unusable_answer(exc: Exception, http_status: int) -> ExchangeFailed:
    """An answer that is no SOAP envelope DUO can read: a SOAP Fault, or not SOAP at all."""
    if isinstance(exc, SoapFault):
        subcode = f" ({exc.subcode[1]})" if exc.subcode else ""
        return ExchangeFailed("error", f"SOAP fault {exc.code}{subcode}: {exc.reason}")
    return ExchangeFailed("error", f"HTTP {http_status} without a SOAP answer" if http_status != 200
                          else f"malformed answer: {exc}")


def answer_body(envelope: Envelope, http_status: int, action: str, message_id: str) -> etree._Element:
    """The Body of an answer to *this* request; raises :class:`ExchangeFailed` for any other."""
    if http_status != 200:
        raise ExchangeFailed("error", f"HTTP {http_status} with a SOAP answer that is not a fault")
    if envelope.addressing.action != action:
        got = envelope.addressing.action or "(none)"
        raise ExchangeFailed("error", f"malformed answer: wsa:Action {got}, expected {action}")
    if envelope.addressing.relates_to != message_id:
        raise ExchangeFailed("error", "malformed answer: wsa:RelatesTo does not name the request's MessageID")
    if envelope.body is None:
        raise ExchangeFailed("error", "malformed answer: empty SOAP Body")
    return envelope.body


class CommunitySigner:
    """DUO's XUA assertions for one community: signed for it alone, kept for reuse (module docstring).

    Shared by everything DUO sends that community (ITI-38, ITI-39 and RAD-75). Use it on the event
    loop only.
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


@dataclass
class Attempt:
    """One request of an exchange, as the policy tracks it: whose, until when, and whether it went out."""

    claims: Claims
    bsn: str
    #: The caller's absolute deadline, on the event loop's clock.
    deadline: float
    message_id: str = field(default_factory=new_message_id)
    #: The request left DUO (and so disclosed the BSN): it gets an audit record, whatever comes next.
    sent: bool = False
    #: Part of the answer was already handed on: asking again would hand it on twice.
    used: bool = False


#: Records one sent attempt's outcome; the flag says whether another attempt follows it.
Audit = Callable[[T | ExchangeFailed, bool], None]


class Exchange:
    """Requests to one community from one side of DUO (timelines, or transfers); lives with the daemon.

    Owns the HTTP client and the connection slots, so a side's capacity is shared by all its callers;
    ``late`` is how a timeout at the caller's deadline is described (it ends up in audit records).
    """

    def __init__(self, community: XcaCommunity, *, signer: CommunitySigner, http: PeerClient, late: str,
                 limit: AnswerLimit, rng: random.Random | None = None) -> None:
        self.community = community
        self.signer = signer
        self._http = http
        self._late = late
        #: What :meth:`post` reads at most (``http`` must stop reading there too).
        self.limit = limit
        self._slots = asyncio.Semaphore(community.max_concurrency)
        self._rng = rng or random.SystemRandom()

    async def close(self) -> None:
        await self._http.close()

    def require_signing(self) -> None:
        """Raises :class:`ExchangeFailed` unless DUO can sign: nothing then goes out (module docstring)."""
        if not self.signer.can_sign:
            raise ExchangeFailed("error", "DUO has no XUA signing key and certificate "
                                 "(xua.signing_key_file): the community was not asked, since an unsigned "
                                 "request must not be sent")

    async def run(self, send: Callable[[Attempt], Awaitable[T]], *, claims: Claims, bsn: str,
                  deadline: float, audit: Audit[T], retry_event: str) -> tuple[T | ExchangeFailed, int]:
        """``send`` once, and again while :meth:`retry_delay` allows; (its result or the final failure,
        the number of requests that went out).

        ``send`` does one attempt inside a connection slot, using :meth:`post` or :meth:`stream_post`,
        and raises :class:`ExchangeFailed` when it gives nothing usable. ``audit`` gets every attempt
        that went out, once, failures with the BSN masked; an attempt cancelled after it went out is
        recorded as a timeout "cancelled by the caller" before the cancellation goes on.
        """
        loop = asyncio.get_running_loop()
        sent = 0
        while True:
            attempt = Attempt(claims, bsn, deadline)
            try:
                result = await self._attempt(send, attempt)
            except ExchangeFailed as exc:
                failed = exc.masked(bsn)
                sent += attempt.sent
                delay = self.retry_delay(failed, attempt, sent, loop.time())
                if attempt.sent:
                    audit(failed, delay is not None)
                if delay is None:
                    return failed, sent
                log.info(retry_event, community=self.community.home_community_id, attempt=sent,
                         after=failed.kind, backoff_ms=round(delay * 1000))
                await asyncio.sleep(delay)
                continue
            except asyncio.CancelledError:
                if attempt.sent:
                    audit(ExchangeFailed("timeout", "cancelled by the caller"), False)
                raise
            audit(result, False)
            return result, sent + 1

    def retry_delay(self, failed: ExchangeFailed, attempt: Attempt, sent: int, now: float) -> float | None:
        """Seconds to wait before asking again after ``failed``, or None when it is final.

        THE retry policy of ITI-38, ITI-39 and RAD-75 (module docstring): only a request that went
        out, failed transiently (``retryable``, and not an answer that would come back the same) and
        of which nothing was used yet; at most ``retries`` more; exponential backoff with full jitter;
        and only when the backoff still leaves :data:`MIN_ATTEMPT_S` before the deadline.
        """
        if not attempt.sent or attempt.used or not failed.retryable or failed.kind == "error":
            return None
        if sent > self.community.retries:
            return None
        backoff = self._rng.uniform(0, self.community.retry_backoff_s * 2 ** (sent - 1))
        if attempt.deadline - now - backoff < MIN_ATTEMPT_S:
            return None
        return backoff

    async def _attempt(self, send: Callable[[Attempt], Awaitable[T]], attempt: Attempt) -> T:
        self.require_signing()
        if attempt.deadline <= asyncio.get_running_loop().time():
            raise _not_asked()
        try:
            async with asyncio.timeout_at(attempt.deadline):
                await self._slots.acquire()
        except TimeoutError:
            raise ExchangeFailed("timeout", f"all {self.community.max_concurrency} connections to the "
                                 "community stayed busy until the deadline", retryable=True) from None
        try:
            return await send(attempt)
        finally:
            self._slots.release()

    async def post(self, attempt: Attempt, *, action: str, url: str, body: bytes,
                   operation: str) -> PeerResponse:
        """Send the signed request and read the whole answer, within the community's ``timeout_s``
        and the deadline; raises :class:`ExchangeFailed` for no answer or a "not now" HTTP status."""
        limit = self.community.timeout_s
        budget = self._budget(attempt, limit)
        payload = self._signed(attempt, action, url, body)
        attempt.sent = True
        try:
            answer = await self._http.post(url, payload, operation=operation, timeout_s=budget,
                                           content_type=_content_type(action))
        except PeerCallError as exc:
            raise self._no_answer(exc, limit, cut=budget < limit) from exc
        _raise_if_transient(answer.status)
        return answer

    @asynccontextmanager
    async def stream_post(self, attempt: Attempt, *, action: str, url: str, body: bytes,
                          operation: str, mtom: bool = False) -> AsyncIterator[PeerStream]:
        """Send the signed request and hand over the answer while its body is still on the wire.

        For answers too big to hold (RAD-75): the deadline alone bounds it, since a big study on a slow
        link may rightly take longer than one query. Transport failures while the caller reads become
        :class:`ExchangeFailed` as for :meth:`post`; the caller's own exceptions pass unchanged.
        ``mtom`` sends the request as MTOM, so that a gateway answering in kind answers MTOM too.
        """
        budget = self._budget(attempt, None)
        payload = self._signed(attempt, action, url, body)
        content_type = _content_type(action)
        if mtom:
            content_type, payload = mtom_request(payload, action)
        attempt.sent = True
        try:
            async with self._http.stream_post(url, payload, operation=operation, timeout_s=budget,
                                              content_type=content_type) as resp:
                _raise_if_transient(resp.status)
                yield resp
        except PeerCallError as exc:
            raise self._no_answer(exc, budget, cut=True) from exc

    def _budget(self, attempt: Attempt, limit_s: float | None) -> float:
        left = attempt.deadline - asyncio.get_running_loop().time()
        budget = left if limit_s is None else min(limit_s, left)
        if budget <= 0:
            raise _not_asked()
        return budget

    def _signed(self, attempt: Attempt, action: str, url: str, body: bytes) -> bytes:
        """The envelope: the assertion reused or signed here, in a Security header with a new
        Timestamp. Body and Security header go in as bytes, unparsed."""
        try:
            security = self.signer.security(attempt.claims, attempt.bsn)
        except ValueError as exc:
            raise ExchangeFailed("error", f"could not issue the XUA assertion: {exc}") from None
        addressing = Addressing(action=action, message_id=attempt.message_id, to=url, reply_to=WSA_ANONYMOUS)
        return serialize_with(addressing, body, [security])

    def _no_answer(self, exc: PeerCallError, limit_s: float, *, cut: bool) -> ExchangeFailed:
        """No HTTP answer. Retryable only where a second attempt can see something else: a timeout, a
        refused connection, a connection the peer dropped. A TLS failure is not (a certificate does not
        heal in a second), nor is an answer DUO could not use."""
        if exc.kind == "timeout":
            return ExchangeFailed("timeout", self._late if cut else f"no answer within {limit_s:g} s",
                                  retryable=True)
        if exc.kind == "connect":
            return ExchangeFailed("unavailable", f"connection failed: {exc.detail}", retryable=True)
        if exc.kind == "protocol" and isinstance(exc.__cause__, aiohttp.ServerDisconnectedError
                                                  | aiohttp.ClientOSError):
            return ExchangeFailed("unavailable", f"connection lost: {exc.detail}", retryable=True)
        if exc.kind == "tls":
            return ExchangeFailed("unavailable", f"TLS failed: {exc.detail}")
        if exc.kind == "too-large":
            return AnswerTooLarge("error", self.limit.refusal(f"answer over the size limit ({exc.detail})"))
        return ExchangeFailed("error", f"unusable HTTP answer ({exc.kind}): {exc.detail}")


def _not_asked() -> ExchangeFailed:
    return ExchangeFailed("timeout", "the deadline passed before the community could be asked",
                          retryable=True)


def _raise_if_transient(http_status: int) -> None:
    if http_status in TRANSIENT_HTTP:
        raise ExchangeFailed("unavailable", f"HTTP {http_status}", retryable=True)


def _content_type(action: str) -> str:
    return f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"'


__all__ = [
    "ASSERTION_LIFETIME_S", "MIN_ATTEMPT_S", "PATIENT_MASK", "REUSE_MARGIN", "TRANSIENT_CODES",
    "TRANSIENT_HTTP", "AnswerLimit", "AnswerTooLarge", "Attempt", "Audit", "CommunitySigner", "Exchange",
    "ExchangeFailed", "SigningPair", "answer_body", "is_transient", "unusable_answer",
]
