"""What ITI-38, ITI-39 and RAD-75 mean for the TLB community, without any HTTP or SOAP.

For every patient-bearing request and every TLB hospital, the Mitz closed question comes first (data
holder = that hospital, requester = the XUA assertion); a hospital's PACS is only ever touched with
the :class:`~duo_gateway.consent.Permit` that answer produced. Hospitals are asked in parallel, each
within its own deadline; one that is down or late turns the answer into a PartialSuccess naming it,
one without consent contributes nothing (the Mitz client has audited why).

Where a request names documents but no patient (ITI-39, RAD-75), the study's patient is read from
the PACS first, then consent is asked again: consent may have been withdrawn since the query.

A request whose assertion carries an authorization decision is refused whole before anyone is asked
(:meth:`~duo_gateway.xua.Requester.authorization_refusal` says why): a Failure with
LocalPolicyRestrictionError, audited like any refusal.

A study's KOS is a stable document assembled on its first ITI-39 (``xca.metadata``): the answer that
builds it records its hash and size (``xca.docindex``), later ITI-38 answers announce them, and a
later ITI-39 delivers it only if the rebuilt bytes are still those. A study that changed is a new
document under a new uniqueId; the old uniqueId is then "not available" (XDSDocumentUniqueIdError).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import date
from functools import partial
from pathlib import Path
from typing import TypeVar

import structlog
from pydicom import dcmread

from duo_gateway.access import Caller
from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    DocumentRef,
    EventOutcome,
    Peer,
    StudyTransfer,
    iti38_query,
    iti39_retrieve,
    rad75_retrieve,
)
from duo_gateway.audit.messages import Requestor as AuditRequestor
from duo_gateway.bsn import BSN_OID, bsn_cx, is_valid_bsn
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.peers import TlbHospital
from duo_gateway.config.xca import XcaRespondingConfig
from duo_gateway.consent import ConsentGate, Permit, Refusal
from duo_gateway.dicom.convert import convert_in_place
from duo_gateway.dicom.decode_worker import SharedDecodeWorker
from duo_gateway.dicom.kos import encode_part10
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sources.base import ImagingSource, SourceUnavailable
from duo_gateway.xca.codes import (
    MIME_DICOM,
    STUDY_INSTANCE_UID_ID_TYPE,
    EntryStatus,
    EntryType,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    Severity,
    StoredQuery,
)
from duo_gateway.xca.docindex import DocumentIndex, IndexedDocument
from duo_gateway.xca.ebrim import DocumentEntry, ObjectRef
from duo_gateway.xca.entry_ids import normalise_home
from duo_gateway.xca.errors import RegistryError, RegistryErrorException, status_for
from duo_gateway.xca.hl7 import Cx, Hl7FormatError, dtm_key, parse_reference_id
from duo_gateway.xca.metadata import (
    is_report,
    kos_for_study,
    report_entry,
    study_entry,
    study_kos_unique_id,
)
from duo_gateway.xca.query import AdhocQueryRequest, AdhocQueryResponse, validate_stored_query
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    composite_context,
    spent,
)
from duo_gateway.xua import PATIENT_MISMATCH, Requester, patient_mismatch

log = structlog.get_logger(__name__)

T = TypeVar("T")

_REPORT_MODALITIES = ("SR", "DOC")
_PDF = "application/pdf"


@dataclass(frozen=True)
class CallContext:
    """Who asked: the XUA requester and the calling gateway (for consent and audit).

    ``caller`` is what the message says of its sender (the WS-Addressing ReplyTo, which IHE makes the
    audit's UserID, and the remote address); ``system`` is who the TLS client certificate proved it
    is. Only the latter identifies anyone, so the audit records both.
    """

    requester: Requester
    caller: Peer
    request_bytes: bytes = b""
    system: Caller | None = None

    def audit_caller(self) -> Peer:
        """The calling gateway as its audit participant: ``caller`` as given (UserID, address), plus the
        configured client name as AlternativeUserID (unless it already is the UserID) and the
        certificate (subject and fingerprint) as UserName."""
        if self.system is None:
            return self.caller
        certificate = self.system.certificate
        name = self.system.name
        return replace(self.caller, alternative_user_id=None if name == self.caller.user_id else name,
                       user_name=None if certificate is None else certificate.label)

    def audit_requestor(self) -> AuditRequestor:
        return AuditRequestor.of(self.requester)


@dataclass
class _HospitalAnswer:
    entries: list[DocumentEntry] = field(default_factory=list)
    errors: list[RegistryError] = field(default_factory=list)
    answered: bool = False


@dataclass
class _StudyDisclosure:
    """What the ITI-20 record of one fetched study needs, kept until the answer is over: only then is
    it known which of the instances handed to the transport reached the caller."""

    bsn: str | None
    study_uid: str
    hospital: TlbHospital
    handed: list[DocumentRef] = field(default_factory=list)
    #: Set once the fetch ended: its outcome and why, as the audit should say if all was disclosed.
    outcome: EventOutcome | None = None
    description: str | None = None


@dataclass
class _Handed:
    document: RetrievedDocument
    #: Resolved when the consumer asks for the next document: the study's fetch then goes on, so the
    #: spool holds what the PACS window allows and nothing the consumer has not finished with.
    taken: asyncio.Future[None]


#: Records one fetched study's disclosure: the study, the instances disclosed, why the answer was cut.
_StudyAudit = Callable[[_StudyDisclosure, list[DocumentRef], str | None], None]


class ImagingRetrieval:
    """A RAD-75 answer as it is fetched: each instance is handed over as soon as it is in the spool.

    :meth:`stream` starts the fetch and yields every document (``data`` is a file in ``spool``) the
    moment it arrives; a study's fetch waits while the consumer holds its document, so a consumer that
    writes each one out (and deletes it) before asking for the next keeps the spool within the PACS
    retrieve window (``xca_responding.retrieve_window``). What the PACSes did not deliver becomes
    ``errors`` along the way; ``status`` and :meth:`response` are final once :meth:`stream` ended.

    Disclosure is what the audit records: call :meth:`disclosing` before any byte of a document goes
    to the caller. :meth:`aclose` (always, also after a failure or a caller who went away) stops the
    fetch, writes one ITI-20 record per fetched study naming exactly the disclosed instances, and
    removes the spool.
    """

    def __init__(self, errors: list[RegistryError], spool: Path | None,
                 fetch: Callable[[ImagingRetrieval], Awaitable[None]] | None = None,
                 audit: _StudyAudit | None = None) -> None:
        self.errors = errors
        self.spool = spool
        #: Every document handed to the consumer, in the order handed: what the answer holds.
        self.handed: list[RetrievedDocument] = []
        self._fetch = fetch
        self._audit = audit
        self._queue: asyncio.Queue[_Handed | None] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._studies: list[_StudyDisclosure] = []
        self._disclosed: set[tuple[str, str]] = set()
        self._stopped: str | None = None
        self._closed = False
        #: Set by :meth:`stream`: the consumer writes each document out before asking for the next.
        self.writes_through = False

    @property
    def status(self) -> ResponseStatus:
        return status_for(self.errors, bool(self.handed))

    def response(self, documents: Sequence[RetrievedDocument] | None = None) -> RetrieveDocumentSetResponse:
        """The answer for ``documents`` (default: every one handed over), once :meth:`stream` ended."""
        docs = tuple(self.handed if documents is None else documents)
        return RetrieveDocumentSetResponse(status_for(self.errors, bool(docs)), docs, tuple(self.errors))

    async def stream(self, *, writes_through: bool = False) -> AsyncGenerator[RetrievedDocument, None]:
        """Each document as it lands, once; use inside ``contextlib.aclosing``. Not re-entrant.

        ``writes_through``: the consumer is done with each document's bytes when it asks for the next
        (a streamed answer). The fetch may then hand over bytes held in memory instead of files, and
        :attr:`handed` keeps only what each document was (:func:`spent`), so memory never grows with
        the study.
        """
        if self._fetch is None or self._task is not None:
            return
        self.writes_through = writes_through
        fetch = self._fetch

        async def run() -> None:
            try:
                await fetch(self)
            finally:
                self._queue.put_nowait(None)

        self._task = asyncio.create_task(run())
        while (item := await self._queue.get()) is not None:
            self.handed.append(item.document)
            try:
                yield item.document
            finally:
                if writes_through:
                    self.handed[-1] = spent(item.document)
                if not item.taken.done():
                    item.taken.set_result(None)
        await self._task  # a bug in the fetch surfaces here instead of vanishing

    def disclosing(self, document: RetrievedDocument) -> None:
        """``document``'s bytes are about to go to the caller (its header names the patient first)."""
        self._disclosed.add((document.repository_unique_id, document.document_unique_id))

    def stopped(self, why: str) -> None:
        """The answer ends before everything handed over was written (the caller went away): the
        audit says so for every study not wholly disclosed."""
        self._stopped = self._stopped or why

    async def aclose(self) -> None:
        """Stop fetching, audit what was disclosed, remove the spool; safe to call more than once."""
        if self._closed:
            return
        self._closed = True
        if self._task is not None and not self._task.done():
            self._task.cancel()
            self._stopped = self._stopped or "the answer ended before the fetch"
        if self._task is not None:
            await asyncio.gather(self._task, return_exceptions=True)
        while not self._queue.empty():
            item = self._queue.get_nowait()
            if item is not None and not item.taken.done():
                item.taken.cancel()
        if self._audit is not None:
            for study in self._studies:
                disclosed = [r for r in study.handed
                             if (r.repository_unique_id, r.document_unique_id) in self._disclosed]
                self._audit(study, disclosed, self._stopped)
        self.close()

    def close(self) -> None:
        """Remove the spool (blocking; :meth:`aclose` is the whole ending)."""
        if self.spool is not None:
            shutil.rmtree(self.spool, ignore_errors=True)
            self.spool = None

    # -- the fetch's side ---------------------------------------------------------------------------

    def _study(self, record: _StudyDisclosure) -> _StudyDisclosure:
        self._studies.append(record)
        return record

    async def _hand(self, study: _StudyDisclosure, document: RetrievedDocument) -> None:
        """Give ``document`` to the consumer and wait until it asks for the next one."""
        taken: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        study.handed.append(DocumentRef(document.document_unique_id, document.repository_unique_id,
                                        document.home))
        self._queue.put_nowait(_Handed(document, taken))
        await taken


class RespondingGateway:
    def __init__(
        self,
        config: DuoConfig,
        *,
        sources: Mapping[str, ImagingSource],
        gate: ConsentGate,
        index: DocumentIndex,
        auditor: Auditor,
        identity: Peer,
        spool_dir: Path,
        metrics: Metrics | None = None,
    ) -> None:
        self._cfg = config
        self._home = config.gateway.home_community_id
        self._sources = dict(sources)
        self._hospitals = {h.ura: h for h in config.tlb_hospitals}
        self._by_repository = {h.repository_unique_id: h for h in config.tlb_hospitals}
        self._gate = gate
        self._index = index
        self._auditor = auditor
        self._identity = identity
        self._spool_dir = spool_dir
        self._metrics = metrics
        self._deadline = config.xca_responding.hospital_deadline_s
        #: Decompresses what a PACS sent by C-MOVE in a syntax the RAD-75 did not ask for.
        self._decoder = SharedDecodeWorker()

    def close(self) -> None:
        """Stop the decoder helper, if one was started; blocking (it reaps a process)."""
        self._decoder.close()

    @property
    def home(self) -> str:
        return self._home

    def _authorization_refusal(self, ctx: CallContext) -> RegistryError | None:
        """The whole-request refusal of an assertion carrying authorization decisions, or None.

        LocalPolicyRestrictionError because it is exactly that: DUO's policy, not the request's form,
        refuses (xca.md §9); a Failure, not a fault, as NIST's ``_withauthzconsent`` cases expect.
        """
        why = ctx.requester.authorization_refusal()
        if why is None:
            return None
        log.info("xca request refused", reason=why, issuer=ctx.requester.issuer)
        return RegistryError(ErrorCode.LOCAL_POLICY_RESTRICTION, why, Severity.ERROR, self._home)

    # ------------------------------------------------------------------------------------------
    # ITI-38
    # ------------------------------------------------------------------------------------------
    async def query(self, req: AdhocQueryRequest, ctx: CallContext) -> AdhocQueryResponse:
        bsn: str | None = None
        refusal = self._authorization_refusal(ctx)
        if refusal is not None:
            with contextlib.suppress(RegistryErrorException):
                bsn = self._patient(req)  # the audit names whom the refused query was about, if anyone
            self._audit_query(req, ctx, bsn, EventOutcome.MINOR_FAILURE, refusal.code_context)
            return AdhocQueryResponse(ResponseStatus.FAILURE, (), (refusal,))
        try:
            stored = validate_stored_query(req)
            if req.home is not None and normalise_home(req.home) != self._home:
                raise RegistryErrorException.of(
                    ErrorCode.UNKNOWN_COMMUNITY, f"unknown community {req.home}", self._home
                )
            if stored in (StoredQuery.FIND_DOCUMENTS, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID):
                bsn = self._patient(req)
                if not ctx.requester.concerns(bsn):
                    self._audit_query(req, ctx, bsn, EventOutcome.SERIOUS_FAILURE, PATIENT_MISMATCH)
                    raise patient_mismatch()
                entries, errors = await self._find(req, stored, bsn, ctx)
            elif stored == StoredQuery.GET_DOCUMENTS:
                entries, errors, bsn = await self._get_documents(req, ctx)
            else:
                # Folders, submission sets and associations do not exist on-demand (TF-38 §3.38.1).
                entries, errors = [], []
        except RegistryErrorException as exc:
            errors = [replace(e, location=e.location or self._home) for e in exc.errors]
            self._audit_query(
                req, ctx, bsn, EventOutcome.MINOR_FAILURE, "; ".join(e.error_code for e in errors)
            )
            return AdhocQueryResponse(ResponseStatus.FAILURE, (), tuple(errors))
        await self._index.record_entries(entries)
        objects: tuple[DocumentEntry | ObjectRef, ...]
        if req.return_type is ReturnType.OBJECT_REF:
            objects = tuple(ObjectRef(e.entry_uuid, self._home) for e in entries)
        else:
            objects = tuple(entries)
        status = status_for(errors, bool(entries) or len(errors) < len(self._sources))
        self._audit_query(
            req,
            ctx,
            bsn,
            EventOutcome.SUCCESS if status == ResponseStatus.SUCCESS else EventOutcome.MINOR_FAILURE,
            None,
        )
        return AdhocQueryResponse(status, objects, tuple(errors))

    def _patient(self, req: AdhocQueryRequest) -> str:
        raw = req.single(QueryParam.PATIENT_ID)
        if raw is None:
            raise RegistryErrorException.of(ErrorCode.STORED_QUERY_MISSING_PARAM, QueryParam.PATIENT_ID)
        try:
            cx = Cx.parse(raw)
        except Hl7FormatError as exc:
            raise RegistryErrorException.of(ErrorCode.UNKNOWN_PATIENT_ID, str(exc)) from exc
        if cx.authority_oid != BSN_OID or not is_valid_bsn(cx.id):
            # Never echo the id itself: it may be a BSN with a typo, i.e. someone else's.
            raise RegistryErrorException.of(
                ErrorCode.UNKNOWN_PATIENT_ID,
                f"patient id is not a valid BSN (11-proef) with authority {BSN_OID}",
            )
        return cx.id

    async def _find(
        self, req: AdhocQueryRequest, stored: StoredQuery, bsn: str, ctx: CallContext
    ) -> tuple[list[DocumentEntry], list[RegistryError]]:
        statuses = req.values(QueryParam.STATUS) or []
        types = req.values(QueryParam.ENTRY_TYPE)
        if EntryStatus.APPROVED not in statuses or (types is not None and EntryType.STABLE not in types):
            # Every entry DUO has is an Approved, stable entry (a KOS by delayed assembly, see the
            # module notes): DUO has no On-Demand Document Entries, so a query for those finds nothing.
            return [], []
        start_from, start_to = (
            req.time(QueryParam.SERVICE_START_TIME_FROM),
            req.time(QueryParam.SERVICE_START_TIME_TO),
        )
        study_uids: list[str] = []
        if stored == StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID:
            for group in req.slot_groups(QueryParam.REFERENCE_ID_LIST):
                for value in group:
                    try:
                        uid, id_type = parse_reference_id(value)
                    except Hl7FormatError:
                        continue
                    if id_type == STUDY_INSTANCE_UID_ID_TYPE:
                        study_uids.append(uid)
            if not study_uids:
                return [], []
        results = await asyncio.gather(
            *(
                self._hospital_find(ctx, bsn, h, start_from, start_to, study_uids)
                for h in self._cfg.tlb_hospitals
                if h.ura in self._sources
            )
        )
        entries = [e for r in results for e in r.entries]
        errors = [e for r in results for e in r.errors]
        entries = [e for e in entries if _matches(e, req, start_from, start_to)]
        return entries, errors

    async def _hospital_find(
        self,
        ctx: CallContext,
        bsn: str,
        hospital: TlbHospital,
        start_from: str | None,
        start_to: str | None,
        study_uids: Sequence[str],
    ) -> _HospitalAnswer:
        source = self._sources[hospital.ura]
        answer = _HospitalAnswer()

        async def work() -> None:
            verdict = await self._gate.check(self._gate.for_hospital(ctx.requester, bsn, hospital))
            if isinstance(verdict, Refusal):
                answer.answered = True
                return
            studies = await source.find_studies(
                verdict,
                bsn,
                date_from=_dtm_date(start_from),
                date_to=_dtm_date(start_to, upper=True),
                study_uids=study_uids,
            )
            repository = hospital.repository_unique_id
            revisions = await self._index.revisions((s.study_instance_uid, repository) for s in studies)
            kos_ids = {
                s.study_instance_uid: study_kos_unique_id(s, repository, revisions.get(
                    (s.study_instance_uid, repository), 0))
                for s in studies
            }
            known = await self._index.lookup_many(kos_ids.values())
            for study in studies:
                indexed = known.get(kos_ids[study.study_instance_uid])
                answer.entries.append(
                    study_entry(
                        study,
                        bsn=bsn,
                        hospital_ura=hospital.ura,
                        hospital_name=hospital.name,
                        repository_unique_id=repository,
                        home=self._home,
                        codes=hospital.document_codes,
                        revision=revisions.get((study.study_instance_uid, repository), 0),
                        assembled=indexed.assembled if indexed is not None else None,
                    )
                )
                if any(m in _REPORT_MODALITIES for m in study.modalities):
                    instances = await source.find_instances(
                        verdict, bsn, study.study_instance_uid, modalities=_REPORT_MODALITIES
                    )
                    answer.entries.extend(
                        report_entry(
                            rec,
                            study,
                            bsn=bsn,
                            hospital_ura=hospital.ura,
                            hospital_name=hospital.name,
                            repository_unique_id=hospital.repository_unique_id,
                            home=self._home,
                            codes=hospital.document_codes,
                        )
                        for rec in instances
                        if is_report(rec)
                    )
            answer.answered = True

        try:
            await asyncio.wait_for(work(), self._deadline)
        except TimeoutError:
            answer.entries.clear()
            answer.errors.append(self._unavailable(hospital, f"no answer within {self._deadline:g} s"))
        except SourceUnavailable as exc:
            answer.entries.clear()
            answer.errors.append(self._unavailable(hospital, exc.detail))
        return answer

    def _unavailable(self, hospital: TlbHospital, detail: str) -> RegistryError:
        log.warning("tlb hospital unavailable", hospital_ura=hospital.ura, detail=detail)
        return RegistryError(
            ErrorCode.REGISTRY_NOT_AVAILABLE,
            f"TLB hospital {hospital.name} (URA {hospital.ura}) unavailable: {detail}"[:1000],
            Severity.ERROR,
            self._home,
        )

    async def _get_documents(
        self,
        req: AdhocQueryRequest,
        ctx: CallContext,
    ) -> tuple[list[DocumentEntry], list[RegistryError], str | None]:
        unique_ids = req.values(QueryParam.UNIQUE_ID) or []
        entry_uuids = req.values(QueryParam.ENTRY_UUID) or []
        docs = list((await self._index.lookup_many(unique_ids)).values())
        for entry_uuid in entry_uuids:
            found = await self._index.lookup_entry_uuid(entry_uuid)
            if found is not None:
                docs.append(found)
        entries: list[DocumentEntry] = []
        errors: list[RegistryError] = []
        bsn_seen: str | None = None
        for (hospital_ura, study_uid), group in _group(docs).items():
            hospital = self._hospitals.get(hospital_ura)
            source = self._sources.get(hospital_ura)
            if hospital is None or source is None:
                continue
            try:
                bsn = await asyncio.wait_for(source.patient_of_study(study_uid), self._deadline)
                if bsn is None or not ctx.requester.concerns(bsn):
                    continue  # another patient's study is as unknown as a missing one
                bsn_seen = bsn
                answer = await self._hospital_find(ctx, bsn, hospital, None, None, [study_uid])
            except (TimeoutError, SourceUnavailable) as exc:
                errors.append(self._unavailable(hospital, str(exc) or "timeout"))
                continue
            wanted = {d.unique_id for d in group}
            entries.extend(e for e in answer.entries if e.unique_id in wanted)
            errors.extend(answer.errors)
        return entries, errors, bsn_seen

    def _audit_query(
        self,
        req: AdhocQueryRequest,
        ctx: CallContext,
        bsn: str | None,
        outcome: EventOutcome,
        description: str | None,
    ) -> None:
        self._auditor.record(
            iti38_query(
                initiating=ctx.audit_caller(),
                responding=self._identity,
                audit_source=self._auditor.audit_source,
                query_id=req.query_id,
                query_request=ctx.request_bytes,
                patient_id=bsn_cx(bsn) if bsn else None,
                home_community_id=self._home,
                outcome=outcome,
                outcome_description=description,
                requestor=ctx.audit_requestor(),
            )
        )

    # ------------------------------------------------------------------------------------------
    # ITI-39
    # ------------------------------------------------------------------------------------------
    async def retrieve(
        self, req: RetrieveDocumentSetRequest, ctx: CallContext
    ) -> RetrieveDocumentSetResponse:
        cfg = self._cfg.xca_responding
        refusal = self._authorization_refusal(ctx)
        if refusal is not None:
            # Capped like an answered request, so a refused one cannot make a bigger audit record.
            refs = [DocumentRef(d.document_unique_id, d.repository_unique_id, d.home)
                    for d in req.documents[:cfg.max_documents_per_request]]
            self._audit_iti39(ctx, None, refs, EventOutcome.MINOR_FAILURE, refusal.code_context)
            return RetrieveDocumentSetResponse(ResponseStatus.FAILURE, (), (refusal,))
        if len(req.documents) > cfg.max_documents_per_request:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, "too many DocumentRequests", self._home)
        distinct = len({(d.repository_unique_id, d.document_unique_id) for d in req.documents})
        if distinct > cfg.max_studies_per_request:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, _over_cap(distinct, "documents", cfg),
                                            self._home)
        documents: list[RetrievedDocument] = []
        errors: list[RegistryError] = []
        delivered: dict[str | None, list[DocumentRef]] = {}
        refused: dict[str | None, list[DocumentRef]] = {}
        Answer = tuple[RegistryError | None, str | None, RetrievedDocument | None]

        def late(doc: DocumentRequest) -> Answer:
            return RegistryError(
                ErrorCode.REPOSITORY_ERROR,
                f"document {doc.document_unique_id} not answered within the request deadline "
                f"({cfg.request_deadline_s:g} s)",
                Severity.ERROR,
                self._home,
            ), None, None

        async def one(doc: DocumentRequest, deadline: float) -> Answer:
            try:
                async with asyncio.timeout_at(deadline):
                    return await self._retrieve_one(doc, ctx)
            except TimeoutError:
                return late(doc)  # cut before its bytes were handed over: nothing of it is disclosed

        answers = await _bounded(req.documents, cfg, one, late)
        for doc, (error, bsn, data) in zip(req.documents, answers, strict=True):
            ref = DocumentRef(doc.document_unique_id, doc.repository_unique_id, doc.home)
            if error is not None:
                errors.append(error)
                refused.setdefault(bsn, []).append(ref)
                continue
            assert data is not None
            documents.append(data)
            delivered.setdefault(bsn, []).append(ref)
        for bsn, refs in delivered.items():
            self._audit_iti39(ctx, bsn, refs, EventOutcome.SUCCESS, None)
        for bsn, refs in refused.items():
            self._audit_iti39(ctx, bsn, refs, EventOutcome.MINOR_FAILURE, "not delivered")
        return RetrieveDocumentSetResponse(
            status_for(errors, bool(documents)), tuple(documents), tuple(errors)
        )

    def _home_error(self, doc: DocumentRequest) -> RegistryError | None:
        if doc.home is None:
            return RegistryError(
                ErrorCode.MISSING_HOME_COMMUNITY_ID,
                f"DocumentRequest {doc.document_unique_id} without HomeCommunityId",
                Severity.ERROR,
                self._home,
            )
        if normalise_home(doc.home) != self._home:
            return RegistryError(
                ErrorCode.UNKNOWN_COMMUNITY, f"unknown community {doc.home}", Severity.ERROR, self._home
            )
        return None

    def _unknown_repository(self, doc: DocumentRequest) -> RegistryError:
        """A RepositoryUniqueId naming no TLB hospital: XDSUnknownRepositoryId (ITI TF-3 Table
        4.2.4.1-2), for ITI-39 and RAD-75 alike, because RAD-75 answers with the semantics of RAD-69,
        which are ITI-43's. Not XDSRepositoryError: that reports a failure inside a known repository,
        where the requester's own RepositoryUniqueId is what is wrong (NIST rig_2018-5424c)."""
        return RegistryError(
            ErrorCode.UNKNOWN_REPOSITORY_ID,
            f"unknown repository {doc.repository_unique_id}",
            Severity.ERROR,
            self._home,
        )

    async def _retrieve_one(
        self,
        doc: DocumentRequest,
        ctx: CallContext,
    ) -> tuple[RegistryError | None, str | None, RetrievedDocument | None]:
        def unknown(why: str) -> RegistryError:
            # Unknown, no consent, or gone: the requester learns the same, the audit knows which.
            log.info("iti-39 document not delivered", reason=why)
            return RegistryError(
                ErrorCode.DOCUMENT_UNIQUE_ID_ERROR,
                f"document {doc.document_unique_id} is not available",
                Severity.ERROR,
                self._home,
            )

        home_error = self._home_error(doc)
        if home_error is not None:
            return home_error, None, None
        hospital = self._by_repository.get(doc.repository_unique_id)
        if hospital is None or hospital.ura not in self._sources:
            return self._unknown_repository(doc), None, None
        indexed = await self._index.lookup(doc.document_unique_id)
        if indexed is None or indexed.hospital_ura != hospital.ura:
            return unknown("not announced by an ITI-38 answer"), None, None
        source = self._sources[hospital.ura]
        try:
            async with asyncio.timeout(self._deadline * 4):
                bsn = await source.patient_of_study(indexed.study_uid)
                if bsn is None:
                    return unknown("study no longer in the PACS"), None, None
                if not ctx.requester.concerns(bsn):
                    return unknown(PATIENT_MISMATCH), bsn, None
                verdict = await self._gate.check(self._gate.for_hospital(ctx.requester, bsn, hospital))
                if isinstance(verdict, Refusal):
                    return unknown(f"no consent: {verdict.reason}"), bsn, None
                data, mime, why_not = await self._document_bytes(source, verdict, bsn, indexed, hospital)
        except (TimeoutError, SourceUnavailable) as exc:
            err = self._unavailable(hospital, str(exc) or "timeout")
            return replace(err, error_code=ErrorCode.REPOSITORY_ERROR), None, None
        if data is None:
            return unknown(why_not or "document not found in the study"), bsn, None
        return (
            None,
            bsn,
            RetrievedDocument(doc.repository_unique_id, doc.document_unique_id, mime, data, home=self._home),
        )

    async def _document_bytes(
        self, source: ImagingSource, permit: Permit, bsn: str, indexed: IndexedDocument, hospital: TlbHospital
    ) -> tuple[bytes | None, str, str | None]:
        """The document's bytes and MIME type, or None and why not (for the log, never the requester)."""
        if indexed.kind == "kos":
            return await self._kos_bytes(source, permit, bsn, indexed, hospital)
        instances = await source.find_instances(permit, bsn, indexed.study_uid)
        record = next((i for i in instances if i.sop_instance_uid == indexed.sop_instance_uid), None)
        if record is None:
            return None, indexed.mime_type, None
        # aclosing: returning from inside the loop must end the C-GET and free the association now,
        # not whenever the abandoned generator is garbage-collected.
        async with contextlib.aclosing(source.retrieve(permit, bsn, indexed.study_uid, [record])) as stream:
            async for got in stream:
                path = got.file()
                data = await asyncio.to_thread(path.read_bytes)
                path.unlink(missing_ok=True)
                if indexed.mime_type == _PDF:
                    return await asyncio.to_thread(_encapsulated_document, data), _PDF, None
                return data, MIME_DICOM, None
        return None, indexed.mime_type, None

    async def _kos_bytes(
        self, source: ImagingSource, permit: Permit, bsn: str, indexed: IndexedDocument, hospital: TlbHospital
    ) -> tuple[bytes | None, str, str | None]:
        """Assemble the KOS of the study's current generation, if that is still the one requested.

        The first assembly of a uniqueId fixes its bytes (hash and size recorded); a later one must give
        the same bytes or the uniqueId is not delivered, and the study's revision moves on so that the
        next ITI-38 names the changed study anew (the study-level counts do not show every change).
        """
        repository = hospital.repository_unique_id
        studies = await source.find_studies(permit, bsn, study_uids=[indexed.study_uid])
        if not studies:
            return None, MIME_DICOM, "study no longer in the PACS"
        study = studies[0]
        key = (indexed.study_uid, repository)
        revision = (await self._index.revisions([key])).get(key, 0)
        if study_kos_unique_id(study, repository, revision) != indexed.unique_id:
            return None, MIME_DICOM, "study changed since this manifest was announced"
        instances = await source.find_instances(permit, bsn, indexed.study_uid)
        try:
            kos = kos_for_study(study, instances, bsn=bsn, repository_unique_id=repository,
                                revision=revision, institution_name=hospital.name)
        except ValueError:
            return None, MIME_DICOM, "no instance left to reference"
        data = await asyncio.to_thread(encode_part10, kos)
        digest = hashlib.sha1(data, usedforsecurity=False).hexdigest()
        recorded = await self._index.record_assembly(indexed.unique_id, digest, len(data))
        if recorded is not None and recorded != (digest, len(data)):
            now = await self._index.bump_revision(indexed.study_uid, repository, revision)
            log.info("kos generation superseded", repository_unique_id=repository, revision=now)
            return None, MIME_DICOM, "study changed since this manifest was assembled"
        return data, MIME_DICOM, None

    def _audit_iti39(
        self,
        ctx: CallContext,
        bsn: str | None,
        refs: list[DocumentRef],
        outcome: EventOutcome,
        description: str | None,
    ) -> None:
        self._auditor.record(
            iti39_retrieve(
                side="responding",
                initiating=ctx.audit_caller(),
                responding=self._identity,
                audit_source=self._auditor.audit_source,
                documents=refs,
                patient_id=bsn_cx(bsn) if bsn else None,
                outcome=outcome,
                outcome_description=description,
                requestor=ctx.audit_requestor(),
            )
        )

    # ------------------------------------------------------------------------------------------
    # RAD-75
    # ------------------------------------------------------------------------------------------
    async def retrieve_imaging(
        self, req: RetrieveImagingDocumentSetRequest, ctx: CallContext
    ) -> ImagingRetrieval:
        """The answer to a RAD-75 request, to be streamed: see :class:`ImagingRetrieval`.

        Refusals of the whole request are decided here, before anything is fetched; everything else
        happens while the consumer iterates :meth:`ImagingRetrieval.stream`: per study, the patient,
        consent and the C-FIND first, then each instance handed over as the PACS delivers it.
        """
        cfg = self._cfg.xca_responding
        requested = req.instances()
        refusal = self._authorization_refusal(ctx)
        if refusal is not None:
            studies_asked = list(dict.fromkeys(study_uid for study_uid, _se, _doc in requested))
            self._auditor.record(rad75_retrieve(
                side="responding", initiating=ctx.audit_caller(), responding=self._identity,
                audit_source=self._auditor.audit_source,
                studies=[StudyTransfer(uid) for uid in studies_asked[:cfg.max_studies_per_request]],
                documents=[], patient_id=None, outcome=EventOutcome.MINOR_FAILURE,
                outcome_description=refusal.code_context, requestor=ctx.audit_requestor()))
            return ImagingRetrieval([refusal], None)
        if len(requested) > cfg.max_documents_per_request:
            return _refused("too many DocumentRequests", self._home)
        studies = len({(doc.repository_unique_id, study_uid) for study_uid, _se, doc in requested})
        if studies > cfg.max_studies_per_request:
            return _refused(_over_cap(studies, "studies", cfg), self._home)
        accepted = [ts for ts in req.transfer_syntaxes]
        errors: list[RegistryError] = []
        by_study: dict[tuple[str, str], list[tuple[str, str, DocumentRequest]]] = {}
        for study_uid, series_uid, doc in requested:
            ctx_id = composite_context(study_uid, series_uid, doc.document_unique_id)
            home_error = self._home_error(doc)
            if home_error is not None:
                errors.append(replace(home_error, code_context=f"{home_error.code_context} ({ctx_id})"))
                continue
            hospital = self._by_repository.get(doc.repository_unique_id)
            if hospital is None or hospital.ura not in self._sources:
                unknown = self._unknown_repository(doc)
                errors.append(replace(unknown, code_context=f"{unknown.code_context} ({ctx_id})"))
                continue
            by_study.setdefault((hospital.ura, study_uid), []).append((study_uid, series_uid, doc))
        spool = Path(tempfile.mkdtemp(prefix="rad75-", dir=self._spool_dir))
        Study = tuple[tuple[str, str], list[tuple[str, str, DocumentRequest]]]

        def late(study: Study) -> list[RegistryError]:
            # Never started: nobody was asked anything about it, so there is nothing to audit.
            return _late(study[1], cfg.request_deadline_s, self._home)

        async def fetch(answer: ImagingRetrieval) -> None:
            async def one(study: Study, deadline: float) -> list[RegistryError]:
                # Each study fills its own list, merged in request order below.
                (ura, study_uid), wanted = study
                errs: list[RegistryError] = []
                await self._retrieve_study(ctx, self._hospitals[ura], study_uid, wanted, accepted, spool,
                                           answer, errs, deadline=deadline)
                return errs

            for errs in await _bounded(list(by_study.items()), cfg, one, late):
                answer.errors.extend(errs)

        return ImagingRetrieval(errors, spool, fetch, partial(self._audit_study, ctx))

    async def _retrieve_study(
        self,
        ctx: CallContext,
        hospital: TlbHospital,
        study_uid: str,
        wanted: list[tuple[str, str, DocumentRequest]],
        accepted: list[str],
        spool: Path,
        answer: ImagingRetrieval,
        errors: list[RegistryError],
        *,
        deadline: float,
    ) -> None:
        """One study: its instances handed to ``answer`` as they arrive, what is not delivered into
        ``errors`` (this study's own list), by the loop time ``deadline`` at the latest. A study cut by
        it, or by its PACS failing, keeps what was already handed over (it may be on the wire) and
        names every other instance as not available (XDSRepositoryError)."""
        source = self._sources[hospital.ura]

        def missing(
            items: Iterable[tuple[str, str, DocumentRequest]],
            code: str = ErrorCode.DOCUMENT_UNIQUE_ID_ERROR,
            why: str = "not available",
        ) -> None:
            items = list(items)
            for st, se, doc in items:
                errors.append(
                    RegistryError(
                        code, composite_context(st, se, doc.document_unique_id), Severity.ERROR, self._home
                    )
                )
            if why != "not available" and items:
                log.info("rad-75 instances not delivered", count=len(items), reason=why)

        bsn: str | None = None
        disclosure: _StudyDisclosure | None = None
        handed: set[str] = set()
        try:
            async with asyncio.timeout_at(_earlier(self._deadline, deadline)):
                bsn = await source.patient_of_study(study_uid)
            if bsn is None:
                missing(wanted)
                self._audit_rad75(
                    ctx, None, study_uid, hospital, [], EventOutcome.MINOR_FAILURE, "unknown study"
                )
                return
            if not ctx.requester.concerns(bsn):
                missing(wanted)
                self._audit_rad75(ctx, bsn, study_uid, hospital, [], EventOutcome.SERIOUS_FAILURE,
                                  PATIENT_MISMATCH)
                return
            verdict = await asyncio.wait_for(
                self._gate.check(self._gate.for_hospital(ctx.requester, bsn, hospital)), _remaining(deadline)
            )
            if isinstance(verdict, Refusal):
                missing(wanted)  # the requester learns "not available", the audit learns why
                self._audit_rad75(
                    ctx,
                    bsn,
                    study_uid,
                    hospital,
                    [],
                    EventOutcome.MINOR_FAILURE,
                    f"no consent: {verdict.reason}",
                )
                return
            # From here on instances may reach the caller: the audit waits for the answer to end.
            disclosure = answer._study(_StudyDisclosure(bsn, study_uid, hospital))
            named = {doc.document_unique_id: se for _st, se, doc in wanted}
            # aclosing: an error below must end the C-GET at once, not at garbage collection.
            async with (
                asyncio.timeout_at(deadline),
                contextlib.aclosing(source.retrieve_named(verdict, bsn, study_uid, named,
                                                          transfer_syntaxes=accepted,
                                                          in_memory=answer.writes_through)) as stream,
            ):
                async for got in stream:
                    target = spool / f"{got.record.sop_instance_uid}.dcm"
                    # Held in memory it goes out as it is; spooled, the file moves into this answer's.
                    content: bytes | Path = got.data if got.data is not None else target
                    if got.path is not None:
                        await asyncio.to_thread(shutil.move, got.path, target)
                    where = composite_context(
                        study_uid, got.record.series_instance_uid, got.record.sop_instance_uid
                    )
                    if got.transfer_syntax_uid not in accepted:
                        if got.data is not None:  # a conversion works on a file
                            await asyncio.to_thread(target.write_bytes, got.data)
                            content = target
                        # The PACS chose (a C-MOVE cannot negotiate): converted between uncompressed
                        # syntaxes or decompressed if lossless, never re-encoded, or it fails alone.
                        why = await asyncio.to_thread(convert_in_place, target, accepted, self._decoder)
                        if why is not None:
                            log.info("rad75 instance not convertible", source=got.transfer_syntax_uid,
                                     reason=why)
                            errors.append(
                                RegistryError(
                                    ErrorCode.REPOSITORY_ERROR,
                                    f"{where}: the PACS sent it as {got.transfer_syntax_uid}, which cannot "
                                    f"be converted to any of the requested transfer syntaxes ({why})",
                                    Severity.ERROR,
                                    self._home,
                                )
                            )
                            target.unlink(missing_ok=True)
                            continue
                    handed.add(got.record.sop_instance_uid)
                    # Waits until the consumer is done with it: the PACS window then bounds the spool.
                    await answer._hand(disclosure, RetrievedDocument(
                        hospital.repository_unique_id,
                        got.record.sop_instance_uid,
                        MIME_DICOM,
                        content,
                        home=self._home,
                    ))
            undelivered = [(st, se, doc) for st, se, doc in wanted if doc.document_unique_id not in handed
                           and not any(doc.document_unique_id in e.code_context for e in errors)]
            if undelivered:
                # Only now is the study listed, and only the series concerned: the instances it holds
                # under the named series were the PACS's to deliver, the others do not exist there.
                async with asyncio.timeout_at(_earlier(self._deadline, deadline)):
                    listed = await source.find_instances(verdict, bsn, study_uid,
                                                         series={se for _st, se, _doc in undelivered})
                existing = {(i.sop_instance_uid, i.series_instance_uid) for i in listed}
                for st, se, doc in undelivered:
                    if (doc.document_unique_id, se) in existing:
                        missing([(st, se, doc)], ErrorCode.REPOSITORY_ERROR, "not delivered by the PACS")
                    else:
                        missing([(st, se, doc)])
            disclosure.outcome = EventOutcome.SUCCESS if handed else EventOutcome.MINOR_FAILURE
        except (TimeoutError, SourceUnavailable) as exc:
            detail = getattr(exc, "detail", None) or "timeout"
            # What was handed over stays in the answer; every other instance is named once, as missing.
            errors.clear()
            missing([w for w in wanted if w[2].document_unique_id not in handed], ErrorCode.REPOSITORY_ERROR,
                    detail)
            if disclosure is None:
                self._audit_rad75(ctx, bsn, study_uid, hospital, [], EventOutcome.SERIOUS_FAILURE, detail)
            else:
                disclosure.outcome = EventOutcome.MINOR_FAILURE if handed else EventOutcome.SERIOUS_FAILURE
                disclosure.description = detail

    def _audit_study(self, ctx: CallContext, study: _StudyDisclosure, disclosed: list[DocumentRef],
                     stopped: str | None) -> None:
        """A fetched study's ITI-20 record, once its answer ended: exactly the instances disclosed.

        The fetch's own outcome stands (SUCCESS when anything was delivered, as before streaming);
        an answer that ended before the study's fetch did, or before all it handed over went out (the
        caller went away, DUO failed writing), is a MINOR_FAILURE that says why (``stopped``), unless
        the fetch already failed worse.
        """
        outcome = EventOutcome.MINOR_FAILURE if study.outcome is None else study.outcome
        description = study.description
        if study.outcome is None or len(disclosed) < len(study.handed):
            why = stopped or ("the answer ended before the fetch" if study.outcome is None
                              else "the answer ended before all of it was sent")
            description = f"{description}; {why}" if description else why
            if outcome == EventOutcome.SUCCESS:
                outcome = EventOutcome.MINOR_FAILURE
        self._audit_rad75(ctx, study.bsn, study.study_uid, study.hospital, disclosed, outcome, description)

    def _audit_rad75(
        self,
        ctx: CallContext,
        bsn: str | None,
        study_uid: str,
        hospital: TlbHospital,
        refs: list[DocumentRef],
        outcome: EventOutcome,
        description: str | None,
    ) -> None:
        self._auditor.record(
            rad75_retrieve(
                side="responding",
                initiating=ctx.audit_caller(),
                responding=self._identity,
                audit_source=self._auditor.audit_source,
                studies=[StudyTransfer(study_uid)],
                documents=refs,
                patient_id=bsn_cx(bsn) if bsn else None,
                outcome=outcome,
                outcome_description=description,
                requestor=ctx.audit_requestor(),
            )
        )


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------


_Item = TypeVar("_Item")
_Answer = TypeVar("_Answer")


async def _bounded(items: Sequence[_Item], cfg: XcaRespondingConfig,
                   work: Callable[[_Item, float], Awaitable[_Answer]],
                   late: Callable[[_Item], _Answer]) -> list[_Answer]:
    """The one policy for the lookups of an ITI-39 or RAD-75 request: ``work`` per item, at most
    ``max_parallel_lookups`` at a time, all under one ``request_deadline_s`` (passed to ``work`` as a
    loop time); an item still waiting for a slot at the deadline is ``late`` without being started.
    Answers come back in the order of ``items``."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + cfg.request_deadline_s
    slots = asyncio.Semaphore(cfg.max_parallel_lookups)

    async def one(item: _Item) -> _Answer:
        async with slots:
            if loop.time() >= deadline:
                return late(item)
            return await work(item, deadline)

    return list(await asyncio.gather(*(one(item) for item in items)))


def _earlier(step_s: float, deadline: float) -> float:
    """The loop time a step bounded by ``step_s`` must end by, within the request's ``deadline``."""
    return min(asyncio.get_running_loop().time() + step_s, deadline)


def _remaining(deadline: float) -> float:
    return max(0.0, deadline - asyncio.get_running_loop().time())


def _over_cap(count: int, what: str, cfg: XcaRespondingConfig) -> str:
    return (f"{count} distinct {what} in one request; at most {cfg.max_studies_per_request} are answered "
            "(xca_responding.max_studies_per_request): split the request")


def _refused(why: str, home: str) -> ImagingRetrieval:
    """A RAD-75 request refused whole, before any PACS or Mitz is asked.

    IHE defines no "request too large" code for retrieves (XDSTooManyResults is the stored query's),
    and a SOAP Sender fault would call a well-formed request malformed; so, as for an oversized
    ITI-39, a Failure with XDSRegistryError whose codeContext names the limit.
    """
    return ImagingRetrieval([RegistryError(ErrorCode.REGISTRY_ERROR, why, Severity.ERROR, home)], None)


def _late(
    wanted: Iterable[tuple[str, str, DocumentRequest]], deadline_s: float, home: str
) -> list[RegistryError]:
    return [
        RegistryError(
            ErrorCode.REPOSITORY_ERROR,
            f"{composite_context(st, se, doc.document_unique_id)}: not answered within the request "
            f"deadline ({deadline_s:g} s)",
            Severity.ERROR,
            home,
        )
        for st, se, doc in wanted
    ]


def _dtm_date(value: str | None, upper: bool = False) -> date | None:
    """The calendar day of a DTM bound; the exact comparison happens on the entries afterwards."""
    if not value or len(value) < 4:
        return None
    y = int(value[0:4])
    m = int(value[4:6]) if len(value) >= 6 else (12 if upper else 1)
    d = int(value[6:8]) if len(value) >= 8 else (31 if upper and m == 12 else 1)
    with contextlib.suppress(ValueError):
        return date(y, m, d)
    return date(y, m, 28)


def _matches(
    entry: DocumentEntry, req: AdhocQueryRequest, start_from: str | None, start_to: str | None
) -> bool:
    """The exact FindDocuments semantics on top of the PACS's day-granular date range."""
    if start_from or start_to:
        if not entry.service_start_time:
            return False
        key = dtm_key(entry.service_start_time)
        if start_from and key < dtm_key(start_from):
            return False
        if start_to and key >= dtm_key(start_to):
            return False
    for name, value in (
        (QueryParam.FORMAT_CODE, entry.format_code),
        (QueryParam.CLASS_CODE, entry.class_code),
        (QueryParam.TYPE_CODE, entry.type_code),
        (QueryParam.PRACTICE_SETTING_CODE, entry.practice_setting_code),
        (QueryParam.HEALTHCARE_FACILITY_TYPE_CODE, entry.healthcare_facility_type_code),
    ):
        groups = req.codes(name)
        if groups and not all(value is not None and any(value.matches(c) for c in g) for g in groups):
            return False
    for name, values in (
        (QueryParam.EVENT_CODE_LIST, entry.event_codes),
        (QueryParam.CONFIDENTIALITY_CODE, entry.confidentiality_codes),
    ):
        for group in req.codes(name):
            if not any(v.matches(c) for v in values for c in group):
                return False
    return True


def _group(docs: Iterable[IndexedDocument]) -> dict[tuple[str, str], list[IndexedDocument]]:
    out: dict[tuple[str, str], list[IndexedDocument]] = {}
    for d in docs:
        out.setdefault((d.hospital_ura, d.study_uid), []).append(d)
    return out


def _encapsulated_document(part10: bytes) -> bytes:
    from io import BytesIO

    ds = dcmread(BytesIO(part10))
    data = bytes(ds.EncapsulatedDocument)
    # The value is padded to even length; a PDF ends with %%EOF, so trailing NULs are padding.
    return data.rstrip(b"\x00") if data.endswith(b"\x00") else data


