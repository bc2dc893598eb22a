"""Where a transfer's instances come from, seen through one small interface.

A study lives either in a TLB hospital's PACS (DICOM, behind a Mitz closed question) or in an XCA
community (ITI-39 manifest + RAD-75, consent being that community's business). The transfer runner
only needs two things of either: *what the study holds* (the manifest it verifies against at the
end) and *those instances, as they arrive* (spooled Part 10 files it relays and deletes). A new kind
of source (DICOMweb, the TLB gateways' own protocol) is a new :class:`StudyFetcher`, nothing else.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from duo_gateway.failure import Failure
from duo_gateway.transfer.jobstore import ExpectedInstance


class FetchFailed(Failure):
    """The source could not give the manifest or any instance now.

    ``retryable``: a later attempt may succeed (down, timeout, refused association, Mitz outage);
    otherwise (no consent, unknown study, a manifest that is not one) retrying only repeats it.
    """


class ConsentRefused(FetchFailed):
    """No Permit from Mitz for this source (Deny, NotApplicable, Indeterminate, or no usable answer):
    it gives nothing. ``retryable`` as for any FetchFailed: an outage may pass, a Deny will not."""


@dataclass(frozen=True)
class Fetched:
    """One instance on disk; the runner owns ``path`` from here and deletes it after relaying. Or, for a
    consumer that asked for memory (``fetch(..., in_memory=True)``), its Part 10 bytes (``path`` None)."""

    sop_instance_uid: str
    path: Path | None
    size: int
    #: Set by a source that already read and checked the file's header while receiving it (the
    #: C-GET/C-MOVE spool does): the relay then does not read the header a second time.
    sop_class_uid: str | None = None
    transfer_syntax_uid: str | None = None
    data: bytes | None = None

    def file(self) -> Path:
        """The spooled file, for consumers that did not ask for memory (a transfer's relay)."""
        if self.path is None:
            raise TypeError("this instance is held in memory, not spooled to a file")
        return self.path


@dataclass(frozen=True)
class Missed:
    """One asked-for instance the source said (or showed, by not sending it) it would not deliver."""

    sop_instance_uid: str
    detail: str
    retryable: bool


class StudyFetcher(Protocol):
    #: Names the source in job detail, logs and metrics (e.g. ``tlb:00010001``, ``xca:urn:oid:…``).
    source: str

    async def manifest(self) -> list[ExpectedInstance]:
        """Every instance of the study the source will deliver: what "completed" is checked against."""
        ...

    def fetch(self, wanted: Sequence[ExpectedInstance], *,
              in_memory: bool = False) -> AsyncGenerator[Fetched | Missed, None]:
        """Stream ``wanted`` as it arrives, then a :class:`Missed` for each one that did not come.
        ``in_memory``: the consumer keeps nothing past the next item, so a source may hand over bytes
        (``Fetched.data``) instead of spool files where it can (a view writes them into its cache).

        Raises :class:`FetchFailed` when the source as a whole failed; consumers iterate inside
        ``contextlib.aclosing`` so an early stop releases the source and its spool at once.
        """
        ...


__all__ = ["ConsentRefused", "FetchFailed", "Fetched", "Missed", "StudyFetcher"]
