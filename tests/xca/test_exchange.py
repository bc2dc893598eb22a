"""The outbound exchange policy itself (:mod:`duo_gateway.xca.initiating.exchange`), without sockets.

ITI-38, ITI-39 and RAD-75 are tested end to end against the simulator in ``test_initiating*``; here
the policy they share is driven through a scripted HTTP client and a signer that needs no key, so the
retry, deadline, slot and audit rules can be checked exactly and fast.
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import pytest
from lxml import etree
from multidict import CIMultiDict, CIMultiDictProxy

from duo_gateway.config.peers import XcaCommunity
from duo_gateway.http.client import PeerCallError, PeerClient, PeerResponse, PeerStream
from duo_gateway.soap.envelope import Addressing, Envelope, parse_envelope
from duo_gateway.xca.initiating.exchange import (
    MIN_ATTEMPT_S,
    PATIENT_MASK,
    AnswerLimit,
    AnswerTooLarge,
    Attempt,
    CommunitySigner,
    Exchange,
    ExchangeFailed,
    answer_body,
    unusable_answer,
)
from tests.xca.recording import BSN, CLAIMS

URL = "http://community.invalid/iti38"
LATE = "no answer before the test deadline"
LIMIT = AnswerLimit("iti99_max_test_bytes", 1024, 2048)
SECURITY = (b'<wsse:Security xmlns:wsse="http://docs.oasis-open.org/wss/2004/01/'
            b'oasis-200401-wss-wssecurity-secext-1.0.xsd"/>')


def community(**kw: Any) -> XcaCommunity:
    base: dict[str, Any] = {"home_community_id": "urn:oid:2.16.528.1.1007.99.20001", "name": "Test",
                            "iti38": URL, "iti39": URL, "timeout_s": 5.0, "retries": 2,
                            "retry_backoff_s": 0.05, "max_concurrency": 2}
    return XcaCommunity.model_validate({**base, **kw})


class Signer(CommunitySigner):
    """A signer with a fixed Security header: signing itself is tested with the real pair elsewhere."""

    def __init__(self, cfg: XcaCommunity, *, can_sign: bool = True) -> None:
        super().__init__(cfg, issuer="urn:oid:2.16.528.1.1007.99.1", signing=None, keep=0)
        self._can = can_sign

    @property
    def can_sign(self) -> bool:
        return self._can

    def security(self, claims: Any, bsn: str) -> bytes:
        return SECURITY


class Hang:
    """A script step: no answer until the call's own timeout, which then fires as aiohttp's would."""


@dataclass
class Script:
    """What the community does with each request in turn: an HTTP status, a PeerCallError, or Hang."""

    steps: list[int | PeerCallError | Hang]
    #: (loop time, timeout_s, payload) of every request that reached the "network".
    sent: list[tuple[float, float, bytes]] = field(default_factory=list)
    posted: asyncio.Event = field(default_factory=asyncio.Event)


class FakePeer(PeerClient):
    def __init__(self, script: Script) -> None:
        super().__init__("fake", None)
        self.script = script

    async def _step(self, body: bytes | dict[str, object], timeout_s: float) -> int:
        assert isinstance(body, bytes)
        self.script.sent.append((asyncio.get_running_loop().time(), timeout_s, body))
        self.script.posted.set()
        step = self.script.steps.pop(0)
        if isinstance(step, PeerCallError):
            raise step
        if isinstance(step, Hang):
            await asyncio.sleep(timeout_s)
            raise PeerCallError("timeout", f"no complete answer within {timeout_s:g} s")
        return step

    async def post(self, url: str, body: bytes | dict[str, object], *, operation: str, timeout_s: float,
                   content_type: str | None = None) -> PeerResponse:
        status = await self._step(body, timeout_s)
        return PeerResponse(status, CIMultiDictProxy(CIMultiDict()), b"", 0.0)

    @asynccontextmanager
    async def stream_post(self, url: str, body: bytes, *, operation: str, timeout_s: float,
                          content_type: str | None = None) -> AsyncIterator[PeerStream]:
        status = await self._step(body, timeout_s)
        yield PeerStream(status, CIMultiDictProxy(CIMultiDict()), None)  # type: ignore[arg-type]


class Jitter(random.Random):
    """Records each jitter range asked for and picks a fixed fraction of it."""

    def __init__(self, fraction: float) -> None:
        super().__init__()
        self.fraction = fraction
        self.ranges: list[tuple[float, float]] = []

    def uniform(self, a: float, b: float) -> float:
        self.ranges.append((a, b))
        return a + (b - a) * self.fraction


@dataclass
class Setup:
    exchange: Exchange
    script: Script
    rng: Jitter
    #: (outcome, another attempt follows) as the audit callback saw them.
    audits: list[tuple[str, bool]] = field(default_factory=list)
    audited: asyncio.Event = field(default_factory=asyncio.Event)

    def audit(self, result: int | ExchangeFailed, retried: bool) -> None:
        self.audits.append((str(result), retried))
        self.audited.set()

    async def run(self, deadline_s: float = 5.0) -> tuple[int | ExchangeFailed, int]:
        async def send(attempt: Attempt) -> int:
            answer = await self.exchange.post(attempt, action="urn:test:Query", url=URL, body=b"<q/>",
                                              operation="test")
            if answer.status != 200:
                raise unusable_answer(ValueError("not SOAP"), answer.status)
            return answer.status

        deadline = asyncio.get_running_loop().time() + deadline_s
        return await self.exchange.run(send, claims=CLAIMS, bsn=BSN, deadline=deadline, audit=self.audit,
                                       retry_event="test retry")


def setup(steps: list[int | PeerCallError | Hang], *, fraction: float = 0.5, can_sign: bool = True,
          **kw: Any) -> Setup:
    cfg = community(**kw)
    script = Script(list(steps))
    rng = Jitter(fraction)
    exchange = Exchange(cfg, signer=Signer(cfg, can_sign=can_sign), http=FakePeer(script), late=LATE,
                        limit=LIMIT, rng=rng)
    return Setup(exchange, script, rng)


# --- retries -----------------------------------------------------------------------------------------


async def test_transient_503s_are_retried_with_jittered_exponential_backoff_then_succeed() -> None:
    s = setup([503, 503, 200], fraction=0.5)
    result, sent = await s.run()
    assert (result, sent) == (200, 3)
    # Full jitter over an exponentially growing range: [0, 0.05], then [0, 0.1].
    assert s.rng.ranges == [(0, 0.05), (0, 0.1)]
    (t1, _, p1), (t2, _, p2), (t3, _, p3) = s.script.sent
    assert t2 - t1 >= 0.025 and t3 - t2 >= 0.05  # the jittered backoffs (half of each range) were slept
    # Every attempt is a new message, and each one is audited as it ends.
    ids = {parse_envelope(p).addressing.message_id for p in (p1, p2, p3)}
    assert len(ids) == 3
    assert s.audits == [("unavailable: HTTP 503", True), ("unavailable: HTTP 503", True), ("200", False)]


async def test_retries_stop_after_the_configured_number() -> None:
    s = setup([503] * 5, retries=2)
    result, sent = await s.run()
    assert isinstance(result, ExchangeFailed) and (result.kind, result.detail, sent) == (
        "unavailable", "HTTP 503", 3)
    assert [retried for _, retried in s.audits] == [True, True, False]


@pytest.mark.parametrize("step", [
    PeerCallError("tls", "certificate verify failed"),  # unavailable, but a certificate does not heal
    PeerCallError("too-large", "more than 16 bytes"),
    500,  # not one of the "not now" statuses: the send below calls it an unusable answer
])
async def test_a_non_transient_failure_is_not_retried(step: int | PeerCallError) -> None:
    s = setup([step, 200])
    result, sent = await s.run()
    assert isinstance(result, ExchangeFailed) and not result.retryable, result
    assert sent == 1 and len(s.script.sent) == 1 and s.rng.ranges == []
    assert s.audits == [(str(result), False)]


async def test_an_answer_over_the_limit_is_refused_naming_the_setting_to_raise() -> None:
    s = setup([PeerCallError("too-large", "more than 2048 bytes"), 200])
    result, sent = await s.run()
    assert isinstance(result, AnswerTooLarge) and sent == 1
    assert result.detail == ("answer over the size limit (more than 2048 bytes); the limit is "
                             "xca_communities.iti99_max_test_bytes = 1024 bytes")


async def test_an_answer_that_would_come_back_the_same_is_final_even_when_retryable_later() -> None:
    """A busy registry is ``retryable`` for a later job, but not asked again within this deadline."""
    s = setup([200, 200])

    async def send(attempt: Attempt) -> int:
        await s.exchange.post(attempt, action="urn:test:Query", url=URL, body=b"<q/>", operation="test")
        raise ExchangeFailed("error", "registry Failure: XDSRegistryBusy", retryable=True)

    deadline = asyncio.get_running_loop().time() + 5
    result, sent = await s.exchange.run(send, claims=CLAIMS, bsn=BSN, deadline=deadline, audit=s.audit,
                                        retry_event="test retry")
    assert isinstance(result, ExchangeFailed) and (result.kind, sent) == ("error", 1)


async def test_a_request_whose_answer_was_already_used_is_not_retried() -> None:
    s = setup([200, 200])

    async def send(attempt: Attempt) -> int:
        await s.exchange.post(attempt, action="urn:test:Query", url=URL, body=b"<q/>", operation="test")
        attempt.used = True  # e.g. RAD-75 handed images over before the connection broke
        raise ExchangeFailed("unavailable", "connection lost", retryable=True)

    deadline = asyncio.get_running_loop().time() + 5
    result, sent = await s.exchange.run(send, claims=CLAIMS, bsn=BSN, deadline=deadline, audit=s.audit,
                                        retry_event="test retry")
    assert isinstance(result, ExchangeFailed) and sent == 1 and len(s.script.sent) == 1


# --- the deadline ------------------------------------------------------------------------------------


async def test_a_timeout_at_the_deadline_is_not_retried() -> None:
    s = setup([Hang(), 200], timeout_s=5.0, retries=5)
    started = asyncio.get_running_loop().time()
    result, sent = await s.run(deadline_s=0.2)
    elapsed = asyncio.get_running_loop().time() - started
    assert isinstance(result, ExchangeFailed)
    assert (result.kind, result.detail, result.retryable, sent) == ("timeout", LATE, True, 1)
    assert s.script.sent[0][1] <= 0.2 and 0.2 <= elapsed < 0.5
    assert len(s.script.sent) == 1 and s.rng.ranges == [(0, 0.05)]  # the backoff did not fit


async def test_the_communitys_own_timeout_is_retried_while_the_deadline_has_room() -> None:
    s = setup([Hang(), Hang(), 200], timeout_s=0.1, retries=5, retry_backoff_s=0.01)
    result, sent = await s.run(deadline_s=2.0)
    assert (result, sent) == (200, 3)
    assert s.audits[0] == ("timeout: no answer within 0.1 s", True)


async def test_a_backoff_that_would_leave_no_room_before_the_deadline_ends_the_exchange() -> None:
    s = setup([503, 200], fraction=1.0, retry_backoff_s=1.0)
    started = asyncio.get_running_loop().time()
    result, sent = await s.run(deadline_s=1.0 + MIN_ATTEMPT_S / 2)
    assert isinstance(result, ExchangeFailed) and (result.detail, sent) == ("HTTP 503", 1)
    assert asyncio.get_running_loop().time() - started < 0.5  # gave up at once instead of sleeping
    assert s.audits == [("unavailable: HTTP 503", False)]


async def test_waiting_for_a_slot_counts_against_the_deadline_and_sends_nothing() -> None:
    s = setup([Hang(), 200], max_concurrency=1, timeout_s=1.0, retries=0)
    first = asyncio.create_task(s.run(deadline_s=1.0))
    await s.script.posted.wait()
    result, sent = await s.run(deadline_s=0.1)
    assert isinstance(result, ExchangeFailed) and sent == 0
    assert (result.kind, result.detail) == (
        "timeout", "all 1 connections to the community stayed busy until the deadline")
    assert len(s.script.sent) == 1
    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first


# --- signing and audit -------------------------------------------------------------------------------


async def test_without_a_signing_pair_nothing_is_sent_or_audited() -> None:
    s = setup([200], can_sign=False)
    result, sent = await s.run()
    assert isinstance(result, ExchangeFailed) and (result.kind, sent) == ("error", 0)
    assert "signing key" in result.detail and s.script.sent == [] and s.audits == []


async def test_a_sent_request_cancelled_by_the_caller_is_audited_once() -> None:
    s = setup([Hang()], timeout_s=30.0)
    task = asyncio.create_task(s.run(deadline_s=30.0))
    await s.script.posted.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.audits == [("timeout: cancelled by the caller", False)]


async def test_cancelled_during_the_backoff_only_the_attempt_that_went_out_is_audited() -> None:
    s = setup([503, 200], fraction=1.0, retry_backoff_s=5.0)
    task = asyncio.create_task(s.run(deadline_s=30.0))
    await s.audited.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert s.audits == [("unavailable: HTTP 503", True)] and len(s.script.sent) == 1


async def test_a_streamed_answer_follows_the_same_policy() -> None:
    s = setup([502, 200])
    seen: list[int] = []

    async def send(attempt: Attempt) -> int:
        async with s.exchange.stream_post(attempt, action="urn:test:Retrieve", url=URL, body=b"<q/>",
                                          operation="test") as resp:
            seen.append(resp.status)
            return resp.status

    deadline = asyncio.get_running_loop().time() + 5
    result, sent = await s.exchange.run(send, claims=CLAIMS, bsn=BSN, deadline=deadline, audit=s.audit,
                                        retry_event="test retry")
    assert (result, sent, seen) == (200, 2, [200])
    assert s.script.sent[0][1] > 4  # streamed: bounded by the deadline, not the per-query timeout_s
    assert s.audits[0] == ("unavailable: HTTP 502", True)


async def test_a_failure_quoting_the_patient_is_masked_before_it_is_audited_or_returned() -> None:
    s = setup([200])

    async def send(attempt: Attempt) -> int:
        await s.exchange.post(attempt, action="urn:test:Query", url=URL, body=b"<q/>", operation="test")
        raise ExchangeFailed("error", f"SOAP fault Sender: unknown patient {BSN}")

    deadline = asyncio.get_running_loop().time() + 5
    result, _ = await s.exchange.run(send, claims=CLAIMS, bsn=BSN, deadline=deadline, audit=s.audit,
                                     retry_event="test retry")
    assert isinstance(result, ExchangeFailed) and BSN not in result.detail and PATIENT_MASK in result.detail
    assert BSN not in repr(s.audits)


# --- answers -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("addressing", "status", "detail"), [
    (Addressing("urn:other", relates_to="urn:uuid:1"), 200, "malformed answer: wsa:Action urn:other, "
     "expected urn:test:QueryResponse"),
    (Addressing("urn:test:QueryResponse", relates_to="urn:uuid:2"), 200,
     "malformed answer: wsa:RelatesTo does not name the request's MessageID"),
    (Addressing("urn:test:QueryResponse", relates_to="urn:uuid:1"), 500,
     "HTTP 500 with a SOAP answer that is not a fault"),
])
def test_an_answer_to_another_request_is_malformed(addressing: Addressing, status: int, detail: str) -> None:
    with pytest.raises(ExchangeFailed) as info:
        answer_body(Envelope(addressing, etree.Element("b")), status, "urn:test:QueryResponse", "urn:uuid:1")
    assert (info.value.kind, info.value.detail, info.value.retryable) == ("error", detail, False)


def test_the_answer_to_this_request_gives_its_body() -> None:
    body = etree.Element("b")
    env = Envelope(Addressing("urn:test:QueryResponse", relates_to="urn:uuid:1"), body)
    assert answer_body(env, 200, "urn:test:QueryResponse", "urn:uuid:1") is body
