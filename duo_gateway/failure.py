"""How an outbound call failed, said one way for every peer DUO depends on.

A TLB source, an XCA community, a Q/R or C-STORE association and a transfer's fetch all fail in the
same three ways (:data:`FailureKind`), and their callers make the same two decisions about it: what
to report (the kind, and a ``detail`` a person can act on) and whether asking again later can help
(``retryable``). So those three facts live on one base exception, :class:`Failure`; each peer's
exception is a thin subclass that callers can still catch on its own, and adds only what that peer
alone knows (the registry errors of a community, the source's name, a DICOM metric label).
"""

from __future__ import annotations

from typing import Literal

#: ``timeout``: no (complete) answer in time; ``unavailable``: refused, down, aborted, busy;
#: ``error``: the peer answered, but with something unusable or a refusal.
FailureKind = Literal["timeout", "unavailable", "error"]


class Failure(Exception):
    """An outbound call that gave nothing usable.

    ``detail`` is safe to log and show (no BSN); ``retryable`` says whether a later attempt may see
    something else (a timeout, an outage), as opposed to one that would come back the same.
    """

    def __init__(self, kind: FailureKind, detail: str, *, retryable: bool) -> None:
        super().__init__(detail)
        self.kind: FailureKind = kind
        self.detail = detail
        self.retryable = retryable


__all__ = ["Failure", "FailureKind"]
