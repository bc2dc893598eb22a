"""The consent gate: the only way from a request to patient data passes a Mitz Permit.

Sources that disclose data (a TLB hospital's PACS, a KOS manifest, instances) take a :class:`Permit`
argument, and a Permit is only ever created here, from a ``permitted`` Mitz decision. So "no consent,
no data" is not a convention each front door has to remember: a code path that skips the question
has no Permit to hand over. Every non-Permit (Deny, NotApplicable, Indeterminate, fault, garbage,
timeout, TLS failure, invalid input) is a :class:`Refusal` with the reason.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, TypeVar

import structlog

from duo_gateway.config.peers import TlbHospital
from duo_gateway.mitz.client import ConsentDecision
from duo_gateway.mitz.codec import MitzRequestError
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

T = TypeVar("T")
_MINT = object()  # only this module can mint Permits


class ClosedQuestionAsker(Protocol):
    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision: ...


@dataclass(frozen=True)
class Permit:
    """Proof that Mitz permitted disclosure of ``question.bsn``'s data held by ``question.holder_ura``."""

    question: ClosedQuestion
    decision: ConsentDecision
    _mint: object = field(repr=False, compare=False)

    def __post_init__(self) -> None:
        if self._mint is not _MINT or not self.decision.permitted:
            raise TypeError("a Permit can only be issued by the consent gate on a Mitz Permit")

    def covers(self, bsn: str, holder_ura: str) -> bool:
        """Sources check this before answering: a Permit for one hospital is no Permit for another."""
        return self.question.bsn == bsn and self.question.holder_ura == holder_ura


@dataclass(frozen=True)
class Refusal:
    holder_ura: str
    reason: str
    decision: ConsentDecision | None

    @property
    def denied(self) -> bool:
        """Mitz answered and did not permit (Deny, NotApplicable, Indeterminate): asking again will not
        help. False when there was no usable answer (an outage, an incomplete question)."""
        return self.decision is not None and self.decision.source != "error"

    @property
    def summary(self) -> str:
        return self.decision.summary if self.decision is not None else "error"


class ConsentGate:
    """``categories`` are the data categories every closed question asks (``mitz.categories``): the
    gate forms the question for a TLB hospital itself (:meth:`for_hospital`), so the timeline, the
    transfers and the XCA door cannot each ask Mitz a different question about the same disclosure."""

    def __init__(self, mitz: ClosedQuestionAsker, *, categories: Sequence[str]) -> None:
        if not categories:
            raise ValueError("a closed question needs at least one data category")
        self._mitz = mitz
        self._categories = tuple(categories)

    def for_hospital(self, claims: Claims, bsn: str, hospital: TlbHospital) -> Callable[[], ClosedQuestion]:
        """The question "may ``claims`` see ``bsn``'s data held by ``hospital``", formed lazily so
        that an incomplete one is refused by :meth:`check` instead of raising at the caller."""
        return lambda: claims.closed_question(bsn=bsn, holder_ura=hospital.ura,
                                              holder_type=hospital.organisation_type,
                                              categories=self._categories)

    async def check(self, question: ClosedQuestion | Callable[[], ClosedQuestion]) -> Permit | Refusal:
        """Ask Mitz; a question that cannot even be formed (missing attribute) is refused, not asked."""
        if not isinstance(question, ClosedQuestion):
            try:
                question = question()
            except MitzRequestError as exc:
                log.info("consent refused: incomplete question", reason=str(exc))
                return Refusal("unknown", f"incomplete question: {exc}", None)
        decision = await self._mitz.closed_question(question)
        if decision.permitted:
            return Permit(question, decision, _MINT)
        return Refusal(question.holder_ura, decision.reason or "no Permit", decision)

    async def disclose(self, question: ClosedQuestion | Callable[[], ClosedQuestion],
                       produce: Callable[[Permit], Awaitable[T]]) -> T | Refusal:
        """Run ``produce`` only on a Permit; otherwise return the Refusal without touching the source."""
        verdict = await self.check(question)
        if isinstance(verdict, Refusal):
            return verdict
        return await produce(verdict)
