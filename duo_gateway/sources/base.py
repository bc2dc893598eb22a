"""What the broker knows of a data source: small typed records and one protocol.

A TLB hospital's PACS (DICOM today; DICOMweb or the TLB gateways' own protocol once published) is an
:class:`ImagingSource`. The XCA responding front door and the TLB timeline only see this interface,
so a new kind of source is a new module implementing it, not a change to them. Every method that
reads patient data takes a :class:`~duo_gateway.consent.Permit` and must refuse one that does not
cover that patient and this source (``permit.covers(bsn, source.holder_ura)``).
"""

from __future__ import annotations

import contextlib
from collections.abc import AsyncGenerator, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Protocol

from duo_gateway.consent import Permit
from duo_gateway.dicom.syntaxes import PREFERRED
from duo_gateway.failure import Failure, FailureKind


class SourceUnavailable(Failure):
    """The source could not answer; ``kind`` says how (callers report it per source), ``detail`` why.

    ``unavailable``: refused, down, aborted; ``timeout``: no answer in time; ``error``: it answered,
    but with something unusable (a broken identifier, a failure status). Only an ``error`` would come
    back the same when asked again, so only it is not ``retryable``.
    """

    def __init__(self, source: str, detail: str, kind: FailureKind = "unavailable") -> None:
        super().__init__(kind, detail, retryable=kind != "error")
        self.source = source

    def __str__(self) -> str:
        return f"{self.source}: {self.detail}"


class NotCovered(PermissionError):
    """A Permit for another patient or source was presented: a bug upstream, never data."""


@dataclass(frozen=True)
class StudyRecord:
    """One study as a study-level C-FIND (or QIDO-RS) describes it."""

    study_instance_uid: str
    patient_id: str
    study_date: str | None = None          # YYYYMMDD
    study_time: str | None = None          # HHMMSS[.ffffff]
    accession_number: str | None = None
    description: str | None = None
    modalities: tuple[str, ...] = ()
    body_part: str | None = None
    series_count: int | None = None
    instance_count: int | None = None
    study_id: str | None = None
    patient_name: str | None = None
    patient_birth_date: str | None = None
    patient_sex: str | None = None
    institution_name: str | None = None
    referring_physician: str | None = None


@dataclass(frozen=True)
class InstanceRecord:
    """One instance as an image-level C-FIND describes it (enough for a KOS and for retrieval)."""

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uid: str
    modality: str | None = None
    series_number: int | None = None
    instance_number: int | None = None
    #: For reports (SR, encapsulated PDF): when the document content was made.
    content_date: str | None = None
    content_time: str | None = None
    #: Encapsulated PDF: the document's MIME type; SR: None.
    mime_type: str | None = None
    title: str | None = None


@dataclass(frozen=True)
class RetrievedInstance:
    """One instance fetched from the source, spooled to ``path`` (Part 10 file), or held as ``data``
    (the same bytes, ``path`` None) where the caller asked for memory (``retrieve_named``).

    The consumer owns the file: it must delete it (or move it) once consumed, so the spool holds at
    most the instances in flight and memory never grows with the study. Held bytes count against the
    source's memory budget until the consumer asks for the next instance.
    """

    record: InstanceRecord
    path: Path | None
    transfer_syntax_uid: str
    size: int
    data: bytes | None = None

    def file(self) -> Path:
        """The spooled file, for consumers of :meth:`ImagingSource.retrieve`, which always spools."""
        if self.path is None:
            raise TypeError("this instance is held in memory, not spooled to a file")
        return self.path


@dataclass(frozen=True)
class RetrieveOutcome:
    """What a retrieve did not deliver, per SOP Instance UID, with a reason each."""

    missing: dict[str, str] = field(default_factory=dict)


class ImagingSource(Protocol):
    #: Stable id for logs, metrics and error contexts (e.g. "tlb:00010001").
    name: str
    #: The data holder: the URA Mitz is asked about.
    holder_ura: str

    async def find_studies(self, permit: Permit, bsn: str, *, date_from: date | None = None,
                           date_to: date | None = None,
                           study_uids: Sequence[str] = ()) -> list[StudyRecord]:
        """Studies of the patient (optionally restricted to a date range and/or UIDs)."""
        ...

    async def find_instances(self, permit: Permit, bsn: str, study_uid: str, *,
                             modalities: Sequence[str] = (),
                             series: Collection[str] = (), lean: bool = False) -> list[InstanceRecord]:
        """Every instance of one study (optionally only series of the given modalities, or only the
        given series: a RAD-75 batch names its series, and walking the others per batch multiplied the
        C-FIND work of a large study by its series count).

        ``lean``: the instances' identity is all the caller needs (a view fetching the study), so the
        source may ask for less where that is cheaper; a per-instance patient check it skips is then
        the retrieve's (on receipt). Records may lack content dates, titles and MIME types."""
        ...

    async def patient_of_study(self, study_uid: str) -> str | None:
        """The BSN of a study's patient, to form the consent question before any data is read.

        Needed where a request names documents but no patient (ITI-39, RAD-75). It reveals the BSN to
        DUO only, never to the requester.
        """
        ...

    def retrieve(self, permit: Permit, bsn: str, study_uid: str, instances: Sequence[InstanceRecord], *,
                 transfer_syntaxes: Sequence[str] = PREFERRED,
                 in_memory: bool = False) -> AsyncGenerator[RetrievedInstance, None]:
        """Stream the instances as they arrive, bounded in memory; what could not be fetched is
        reported by raising nothing: the caller compares what arrived with what it asked for.
        ``in_memory`` as for :meth:`retrieve_named`.

        ``transfer_syntaxes``: what the caller can use, best first (a RAD-75 request's list); the source
        asks for those where its protocol lets it negotiate, and each instance says what it came in
        (``RetrievedInstance.transfer_syntax_uid``), which the caller checks.
        """
        ...

    def retrieve_named(
        self, permit: Permit, bsn: str, study_uid: str, named: Mapping[str, str], *,
        transfer_syntaxes: Sequence[str] = PREFERRED, in_memory: bool = False,
    ) -> AsyncGenerator[RetrievedInstance, None]:
        """Stream the instances a request names (SOP Instance UID → the series the request puts it in)
        as :meth:`retrieve` does, without listing the study first where the source can avoid it.
        ``in_memory``: the caller writes each instance onwards before asking for the next, so the
        source may hand over bytes (``RetrievedInstance.data``) instead of files, within its budget.

        Why: a RAD-75 request names its instances; walking the study to the image level before the
        first byte cost a 570-image study half a second of the PACS's time. An instance that is not
        there, or not in the named series, is simply not delivered: a caller that must tell "no such
        document" from "the source failed" asks :meth:`find_instances` about those afterwards. A source
        with no cheaper way delegates to :func:`retrieve_named_by_walk`.
        """
        ...


async def retrieve_named_by_walk(
    source: ImagingSource, permit: Permit, bsn: str, study_uid: str, named: Mapping[str, str], *,
    transfer_syntaxes: Sequence[str] = PREFERRED,
) -> AsyncGenerator[RetrievedInstance, None]:
    """:meth:`ImagingSource.retrieve_named` by the long way: the named series walked to the image level,
    the instances found there under the series named retrieved, the rest left undelivered."""
    found = await source.find_instances(permit, bsn, study_uid, series=set(named.values()))
    records = [r for r in found if named.get(r.sop_instance_uid) == r.series_instance_uid]
    if not records:
        return
    async with contextlib.aclosing(source.retrieve(permit, bsn, study_uid, records,
                                                   transfer_syntaxes=transfer_syntaxes)) as stream:
        async for item in stream:
            yield item
