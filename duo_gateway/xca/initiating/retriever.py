"""DUO as XCA(-I) Initiating Gateway for a transfer: ITI-39 for the KOS, RAD-75 for the images.

A transfer of a study found in a community reads the study's KOS manifest (:meth:`retrieve_document`),
parses it (:func:`duo_gateway.dicom.kos.parse_kos`) and asks for the images per series batch
(:meth:`retrieve_images`); the caller C-STOREs each instance and deletes its file. The choices that
matter, and why:

- **Memory does not grow with the study.** A RAD-75 answer is read with
  :class:`duo_gateway.soap.mtom_stream.MtomStream`: each MTOM part goes to its own spool file as it
  arrives and is handed to the caller as soon as it is complete, while the rest is still on the wire.
  A background task reads the answer, so a slow C-STORE downstream never stalls the HTTP exchange
  into the deadline, and disk use is bounded by one batch. The request itself goes as MTOM: a
  gateway that answers in kind (DUO's own does) would answer a plain SOAP request with inline base64,
  which can only be read whole (docs/performance.md: 33 MB held twice per 50-image batch).
- **Per-instance outcomes.** The source's consent decision and repository trouble show up as a
  registry Failure or PartialSuccess: every requested instance that did not arrive becomes a
  :class:`PartFailure` naming the source's reason, so the transfer can report and retry per image.
  Only when nothing usable came (SOAP Fault, HTTP error, timeout, garbage) does the call raise
  :class:`~.exchange.ExchangeFailed`; once images were handed over, a later breakdown fails the rest
  per instance.
- **How requests go out is the community exchange policy of** :mod:`.exchange`, as for ITI-38:
  signed (an XUA assertion with ``subject_bsn``, which the responding side asks Mitz with, xca.md
  §11; SHA-1 only where the community's config says so), in one of this side's connection slots,
  within the caller's absolute deadline, retried only where repeating can help, and for RAD-75 only
  before any image was handed over (a retry would deliver them twice).
- **Every request that went out is audited** as an Import (ITI-39 110107, RAD-75 110104), one record
  per outcome (CP-ITI-493): the BSN was disclosed and the data now lives on DUO's side.
- **Logs never carry the BSN**; text a peer wrote has it masked in every ``detail``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import random
import re
import uuid
from collections.abc import AsyncGenerator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Final
from urllib.parse import urlsplit

import structlog
from lxml import etree

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    DocumentRef,
    EventOutcome,
    Peer,
    Requestor,
    StudyTransfer,
    iti39_retrieve,
    rad75_retrieve,
)
from duo_gateway.bsn import bsn_cx, is_valid_bsn
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.http.client import PeerClient
from duo_gateway.observability.metrics import Metrics
from duo_gateway.soap.envelope import EnvelopeError, SoapFault, element_bytes, parse_envelope
from duo_gateway.soap.mtom import XOP_NS, MtomError, MtomTooLarge, normalise_cid, parse_mtom
from duo_gateway.soap.mtom_stream import MtomStream, remove_quietly
from duo_gateway.soap.xml import INLINE_PARSE_BYTES, XmlError
from duo_gateway.xca.codes import MIME_DICOM, RS_NS, Action, ResponseStatus
from duo_gateway.xca.entry_ids import normalise_home
from duo_gateway.xca.errors import RegistryError, parse_error_list, parse_status
from duo_gateway.xca.initiating.exchange import (
    PATIENT_MASK,
    AnswerLimit,
    AnswerTooLarge,
    Attempt,
    Audit,
    CommunitySigner,
    Exchange,
    ExchangeFailed,
    answer_body,
    is_transient,
    unusable_answer,
)
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
    parse_retrieve_response,
    xdsb,
)
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)

#: One image: an enhanced multi-frame CT can be a few hundred MiB.
MAX_IMAGE_BYTES: Final = 1024 * 1024 * 1024
#: The SOAP envelope of a RAD-75 answer without its parts (inline base64 answers included).
MAX_ENVELOPE_BYTES: Final = 64 * 1024 * 1024
#: What an ITI-39 answer may add to the manifest's (base64) bytes: envelope, registry response, MIME.
_ENVELOPE_ROOM: Final = 256 * 1024
_UID_TOKEN: Final = re.compile(r"[0-9]+(?:\.[0-9]+)*")


@dataclass(frozen=True)
class RetrievedPart:
    """One instance, complete in a spool file; the consumer deletes ``path``."""

    sop_instance_uid: str
    path: Path
    size: int
    mime_type: str


@dataclass(frozen=True)
class PartFailure:
    """An instance the source did not deliver, with its reason (registry error or absence)."""

    sop_instance_uid: str
    detail: str
    retryable: bool


@dataclass
class _Call:
    """Mutable state of one RAD-75 call, shared by the reading task and the generator."""

    #: The last request that went out still needs its audit record, written by the generator
    #: because only it knows what the consumer actually took.
    sent: bool = False
    pushed: set[str] = field(default_factory=set)
    failed: ExchangeFailed | None = None
    failures: list[PartFailure] = field(default_factory=list)
    errors: tuple[RegistryError, ...] = ()


@dataclass(frozen=True)
class _Done:
    pass


class CommunityRetriever:
    """ITI-39 and RAD-75 towards one community for transfers; lives as long as the daemon.

    ``spool_dir`` holds the images between arrival and the consumer's C-STORE; it is created if
    missing. The connection slots (``max_concurrency``) are separate from the query client's, so
    transfers cannot starve timelines of connections or the other way round.
    """

    def __init__(self, community: XcaCommunity, *, signer: CommunitySigner, metrics: Metrics | None,
                 auditor: Auditor | None, identity: Peer, spool_dir: Path,
                 rng: random.Random | None = None) -> None:
        self.community = community
        self._auditor = auditor
        self._identity = identity
        self._spool = spool_dir
        self._spool.mkdir(parents=True, exist_ok=True)
        self._limit = manifest_limit(community)
        http = PeerClient(f"xca:{community.home_community_id}", community.tls, metrics,
                          max_body_bytes=self._limit.body_bytes, pool_size=community.max_concurrency)
        #: ``signer`` is the community's one signer, shared with its query client: a transfer right
        #: after the timeline reuses the timeline's assertion.
        self._exchange = Exchange(community, signer=signer, http=http,
                                  late="no complete answer before the deadline", limit=self._limit, rng=rng)

    async def close(self) -> None:
        await self._exchange.close()

    # -- ITI-39 ---------------------------------------------------------------------------------

    async def retrieve_document(self, claims: Claims, bsn: str, *, home_community_id: str,
                                repository_unique_id: str, document_unique_id: str,
                                deadline_s: float) -> bytes:
        """One KOS manifest by ITI-39; raises :class:`~.exchange.ExchangeFailed`.

        The answer is read up to the community's ``iti39_max_manifest_bytes`` (plus what inline base64
        and the envelope add) and no further, and decoded in a worker thread.
        """
        if not is_valid_bsn(bsn):
            raise ValueError("bsn is not a valid BSN")
        self._exchange.require_signing()
        deadline = asyncio.get_running_loop().time() + deadline_s
        request = RetrieveDocumentSetRequest(
            (DocumentRequest(repository_unique_id, document_unique_id, home_community_id),))
        body = element_bytes(build_retrieve_request(request))
        doc = DocumentRef(document_unique_id, repository_unique_id, home_community_id)

        async def ask(attempt: Attempt) -> bytes:
            answer = await self._exchange.post(attempt, action=Action.ITI39, url=str(self.community.iti39),
                                               body=body, operation="iti39")
            return await asyncio.to_thread(self._interpret_iti39, answer.status,
                                           answer.headers.get("Content-Type", ""), answer.body,
                                           attempt.message_id, doc)

        def audit(result: bytes | ExchangeFailed, _retried: bool) -> None:
            self._audit_iti39(claims, bsn, doc, result if isinstance(result, ExchangeFailed) else None)

        result, attempts = await self._exchange.run(ask, claims=claims, bsn=bsn, deadline=deadline,
                                                    audit=audit, retry_event="xca retrieve document retry")
        if isinstance(result, ExchangeFailed):
            log.info("xca retrieve document", community=self.community.home_community_id,
                     status=result.kind, detail=result.detail, attempts=attempts)
            raise result from None
        log.info("xca retrieve document", community=self.community.home_community_id, status="ok",
                 size=len(result), attempts=attempts)
        return result

    def _interpret_iti39(self, status: int, content_type: str, body: bytes, message_id: str,
                         asked: DocumentRef) -> bytes:
        limit = self._limit
        try:
            root, parts = parse_mtom(content_type, body, limit.value, max_xml_bytes=limit.body_bytes)
            envelope = parse_envelope(root)
        except MtomTooLarge as exc:
            raise AnswerTooLarge("error", limit.refusal(f"manifest over the size limit ({exc})")) from None
        except (SoapFault, XmlError, EnvelopeError, ValueError) as exc:
            raise unusable_answer(exc, status) from None
        response_el = answer_body(envelope, status, Action.ITI39_RESPONSE, message_id)
        try:
            response = parse_retrieve_response(response_el, parts, max_document_bytes=limit.value)
        except MtomTooLarge as exc:
            raise AnswerTooLarge("error", limit.refusal(f"manifest over the size limit ({exc})")) from None
        except ValueError as exc:
            raise ExchangeFailed("error", f"malformed answer: {exc}") from None
        for doc in response.documents:
            # The answer names the document by all three ids asked (ITI TF-2 3.43.4.2.3): the same
            # uniqueId from another repository or community is another document.
            if (doc.document_unique_id == asked.document_unique_id
                    and doc.repository_unique_id == asked.repository_unique_id
                    and (doc.home is None or _same_home(doc.home, asked.home_community_id))
                    and isinstance(doc.data, bytes)):
                return doc.data
        listed = _listed(response.errors)
        raise ExchangeFailed(
            "error", f"registry {response.status.rsplit(':', 1)[-1]} without the document"
            + (f": {listed}" if listed else ""),
            retryable=is_transient(response.errors), errors=response.errors)

    # -- RAD-75 ---------------------------------------------------------------------------------

    async def retrieve_images(self, claims: Claims, bsn: str, *, home_community_id: str, study_uid: str,
                              series_uid: str, repository_unique_id: str, sop_instance_uids: Sequence[str],
                              transfer_syntaxes: Sequence[str],
                              deadline_s: float) -> AsyncGenerator[RetrievedPart | PartFailure, None]:
        """One RAD-75 request for these instances of one series; see the module docstring.

        Yields each :class:`RetrievedPart` once it is complete on disk, then a :class:`PartFailure` for
        every requested UID not delivered. An async generator (the brief's ``AsyncIterator``, narrowed
        so ``contextlib.aclosing`` type-checks): use ``aclosing`` or exhaust it, since closing early
        stops the download and deletes every spool file not yet handed over.
        """
        if self.community.rad75 is None:
            raise ExchangeFailed("error", "community has no RAD-75 endpoint")
        if not is_valid_bsn(bsn):
            raise ValueError("bsn is not a valid BSN")
        wanted = list(dict.fromkeys(sop_instance_uids))
        if not wanted or not transfer_syntaxes:
            raise ValueError("RAD-75 needs at least one SOP Instance UID and one transfer syntax")
        self._exchange.require_signing()
        request = RetrieveImagingDocumentSetRequest(
            (StudyRequest(study_uid, (SeriesRequest(series_uid, tuple(
                DocumentRequest(repository_unique_id, uid, home_community_id) for uid in wanted)),)),),
            tuple(transfer_syntaxes))
        body = element_bytes(build_imaging_retrieve_request(request))
        deadline = asyncio.get_running_loop().time() + deadline_s
        queue: asyncio.Queue[RetrievedPart | _Done] = asyncio.Queue()
        state = _Call()

        def audit(result: ExchangeFailed | None, retried: bool) -> None:
            if retried and isinstance(result, ExchangeFailed):
                # That attempt sent the BSN too: it gets its own record before the next one goes out.
                self._audit_rad75(claims, bsn, study_uid, repository_unique_id, home_community_id, [], wanted,
                                  _Call(), f"{result.kind}: {result.detail}; retried")
            else:
                state.sent = True  # the last request: recorded below, with what the consumer took

        task = asyncio.create_task(self._rad75_exchange(claims, bsn, body, wanted, deadline, queue, state,
                                                        audit))
        delivered: list[str] = []
        ended = "stopped by the caller"
        try:
            while True:
                item = await queue.get()
                if isinstance(item, _Done):
                    break
                delivered.append(item.sop_instance_uid)
                yield item
            await task  # done already; surfaces a bug in the reader rather than hiding it
            if state.failed is not None and not delivered:
                ended = state.failed.detail
                raise state.failed
            ended = ""
            for failure in state.failures:
                # The detail may quote a peer's codeContext, which may quote the patient id.
                yield PartFailure(failure.sop_instance_uid, failure.detail.replace(bsn, PATIENT_MASK),
                                  failure.retryable)
        finally:
            if not task.done():
                task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            while not queue.empty():
                leftover = queue.get_nowait()
                if isinstance(leftover, RetrievedPart):
                    await remove_quietly(leftover.path)
            if state.sent:
                self._audit_rad75(claims, bsn, study_uid, repository_unique_id, home_community_id,
                                  delivered, wanted, state, ended)
            log.info("xca retrieve images", community=self.community.home_community_id,
                     requested=len(wanted), delivered=len(delivered),
                     failed=len(wanted) - len(delivered),
                     status=state.failed.kind if state.failed and not delivered else "ok" if not ended
                     else "stopped", errors=[e.error_code for e in state.errors])

    async def _rad75_exchange(self, claims: Claims, bsn: str, body: bytes, wanted: list[str],
                              deadline: float, queue: asyncio.Queue[RetrievedPart | _Done],
                              state: _Call, audit: Audit[None]) -> None:
        """The reading task: attempts with retries, parts into ``queue``, the verdict into ``state``."""
        try:
            result, _ = await self._exchange.run(
                lambda attempt: self._rad75_attempt(attempt, body, wanted, queue, state),
                claims=claims, bsn=bsn, deadline=deadline, audit=audit,
                retry_event="xca retrieve images retry")
            if isinstance(result, ExchangeFailed):
                self._fail_rest(state, result, wanted)
        finally:
            queue.put_nowait(_Done())

    def _fail_rest(self, state: _Call, failed: ExchangeFailed, wanted: list[str]) -> None:
        state.failed = failed
        state.errors = failed.errors or state.errors
        # Used once parts were handed over: then the rest fails per instance instead of the call.
        answered = state.pushed | {f.sop_instance_uid for f in state.failures}
        state.failures.extend(PartFailure(uid, f"{failed.kind}: {failed.detail}", failed.retryable)
                              for uid in wanted if uid not in answered)

    async def _rad75_attempt(self, attempt: Attempt, body: bytes, wanted: list[str],
                             queue: asyncio.Queue[RetrievedPart | _Done], state: _Call) -> None:
        url = str(self.community.rad75)
        state.failures.clear()  # a retry only happens before anything was handed over
        try:
            # Sent as MTOM: a gateway that answers in kind (DUO's own does) then answers MTOM, whose
            # parts are spooled as they arrive; a plain SOAP answer is read whole (inline base64).
            async with self._exchange.stream_post(attempt, action=Action.RAD75, url=url, body=body,
                                                  operation="rad75", mtom=True) as resp:
                stream = MtomStream(resp.headers.get("Content-Type", ""), resp.content, self._spool,
                                    max_part_bytes=MAX_IMAGE_BYTES, max_xml_bytes=MAX_ENVELOPE_BYTES)
                async with stream:
                    await self._read_answer(stream, resp.status, attempt.message_id, wanted, queue, state)
        except MtomError as exc:
            raise ExchangeFailed("error", f"malformed answer: {exc}") from None
        except OSError as exc:
            # DUO's own spool (disk full, permissions): the instances still get their verdicts.
            raise ExchangeFailed("error", f"could not spool the answer: {exc.strerror or exc}") from None
        finally:
            # Once an image was handed over, asking again would hand it over twice.
            attempt.used = bool(state.pushed)

    async def _read_answer(self, stream: MtomStream, http_status: int, message_id: str, wanted: list[str],
                           queue: asyncio.Queue[RetrievedPart | _Done], state: _Call) -> None:
        """Check the envelope, then hand over each requested instance as its part completes."""
        try:
            envelope = parse_envelope(await stream.envelope())
        except (SoapFault, XmlError) as exc:
            raise unusable_answer(exc, http_status) from None
        response_el = answer_body(envelope, http_status, Action.RAD75_RESPONSE, message_id)
        wanted_set = set(wanted)
        if stream.envelope_bytes <= INLINE_PARSE_BYTES:
            status, errors, by_cid, inline = _index_response(response_el, wanted_set)
        else:  # a plain SOAP answer with images inline: base64 off the loop
            status, errors, by_cid, inline = await asyncio.to_thread(_index_response, response_el, wanted_set)
        state.errors = errors
        for uid, mime, data in inline:
            await self._push_inline(uid, mime, data, queue, state.pushed)
        async for part in stream.parts():
            try:
                target = by_cid.pop(part.content_id, None)
                if target is None or target[0] in state.pushed:
                    part.path.unlink(missing_ok=True)
                    continue
                uid, mime = target
                if mime == MIME_DICOM and not _is_part10(part.path):  # 132 bytes: not worth a thread
                    part.path.unlink(missing_ok=True)
                    state.failures.append(PartFailure(
                        uid, "the source sent something that is not a DICOM Part 10 file", False))
                    continue
            except BaseException:
                # Handed over by the stream, not yet by us: ours to delete, cancelled or not.
                part.path.unlink(missing_ok=True)
                raise
            state.pushed.add(uid)
            queue.put_nowait(RetrievedPart(uid, part.path, part.size, mime))
        state.failures.extend(_absent(wanted, state.pushed, {f.sop_instance_uid for f in state.failures},
                                      status, errors, set(by_cid.values())))

    async def _push_inline(self, uid: str, mime: str, data: bytes,
                           queue: asyncio.Queue[RetrievedPart | _Done], pushed: set[str]) -> None:
        """A document sent as inline base64 (plain SOAP answers): spooled like an MTOM part."""
        path = self._spool / f"inline-{uuid.uuid4().hex}.part"
        try:
            await asyncio.to_thread(path.write_bytes, data)
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        pushed.add(uid)
        queue.put_nowait(RetrievedPart(uid, path, len(data), mime))

    # -- shared ---------------------------------------------------------------------------------

    # -- audit ----------------------------------------------------------------------------------

    def _requestor(self, claims: Claims) -> Requestor:
        return Requestor.of(claims, issuer=self._exchange.signer.issuer)

    def _peer(self, url: str) -> Peer:
        return Peer(user_id=url, host=urlsplit(url).hostname)

    def _audit_iti39(self, claims: Claims, bsn: str, doc: DocumentRef, failed: ExchangeFailed | None) -> None:
        if self._auditor is None:
            return
        self._auditor.record(iti39_retrieve(
            side="initiating", initiating=self._identity, responding=self._peer(str(self.community.iti39)),
            audit_source=self._auditor.audit_source, documents=(doc,), patient_id=bsn_cx(bsn),
            outcome=EventOutcome.SUCCESS if failed is None else EventOutcome.SERIOUS_FAILURE,
            outcome_description=None if failed is None else f"{failed.kind}: {failed.detail}"[:1024],
            when=datetime.now(UTC), requestor=self._requestor(claims)))

    def _audit_rad75(self, claims: Claims, bsn: str, study_uid: str, repository_unique_id: str, home: str,
                     delivered: list[str], wanted: list[str], state: _Call, ended: str) -> None:
        if self._auditor is None:
            return
        peer = self._peer(str(self.community.rad75))

        def record(uids: Sequence[str], outcome: EventOutcome, description: str | None) -> None:
            assert self._auditor is not None
            self._auditor.record(rad75_retrieve(
                side="initiating", initiating=self._identity, responding=peer,
                audit_source=self._auditor.audit_source, studies=(StudyTransfer(study_uid),),
                documents=[DocumentRef(u, repository_unique_id, home) for u in uids],
                patient_id=bsn_cx(bsn), outcome=outcome,
                outcome_description=None if description is None else description[:1024],
                when=datetime.now(UTC), requestor=self._requestor(claims)))

        if delivered:
            record(delivered, EventOutcome.SUCCESS, None)
        got = set(delivered)
        missing = [u for u in wanted if u not in got]
        if missing:
            reasons = {f.sop_instance_uid: f.detail for f in state.failures}
            detail = ended or "; ".join(dict.fromkeys(reasons.get(u, "not delivered") for u in missing))
            record(missing, EventOutcome.MINOR_FAILURE if delivered else EventOutcome.SERIOUS_FAILURE, detail)


# --- interpretation --------------------------------------------------------------------------------


def _listed(errors: Sequence[RegistryError]) -> str:
    return "; ".join(f"{e.error_code}: {e.code_context}" for e in errors)


def _index_response(el: etree._Element, wanted: set[str]) -> tuple[
        ResponseStatus, tuple[RegistryError, ...], dict[str, tuple[str, str]], list[tuple[str, str, bytes]]]:
    """Status, errors, ``{cid: (uid, mime)}`` of the MTOM documents, and the inline ones decoded.

    Only requested UIDs are kept: a document DUO did not ask for has no place in the transfer.
    """
    if el.tag != xdsb("RetrieveDocumentSetResponse"):
        raise ExchangeFailed("error", f"malformed answer: expected RetrieveDocumentSetResponse, got {el.tag}")
    rr = el.find(f"{{{RS_NS}}}RegistryResponse")
    try:
        if rr is None:
            raise ValueError("RetrieveDocumentSetResponse without RegistryResponse")
        status = parse_status(rr.get("status"))
        errors = parse_error_list(rr)
    except ValueError as exc:
        raise ExchangeFailed("error", f"malformed answer: {exc}") from None
    by_cid: dict[str, tuple[str, str]] = {}
    inline: list[tuple[str, str, bytes]] = []
    for dr in el.iterfind(xdsb("DocumentResponse")):
        uid = (dr.findtext(xdsb("DocumentUniqueId")) or "").strip()
        mime = (dr.findtext(xdsb("mimeType")) or "").strip() or MIME_DICOM
        doc = dr.find(xdsb("Document"))
        if uid not in wanted or doc is None:
            continue
        include = doc.find(f"{{{XOP_NS}}}Include")
        if include is not None:
            by_cid[normalise_cid(include.get("href", ""))] = (uid, mime)
            continue
        try:
            inline.append((uid, mime, base64.b64decode("".join((doc.text or "").split()), validate=True)))
        except binascii.Error:
            raise ExchangeFailed("error", f"malformed answer: Document of {uid} is neither xop:Include "
                                 "nor base64") from None
    return status, errors, by_cid, inline


def _names(error: RegistryError, uid: str) -> bool:
    """Whether a codeContext names this instance (alone or as ``study:series:instance``, xca.md §9)."""
    return uid in _UID_TOKEN.findall(error.code_context)


def _absent(wanted: list[str], pushed: set[str], failed: set[str], status: ResponseStatus,
            errors: tuple[RegistryError, ...], named_without_part: set[tuple[str, str]]) -> list[PartFailure]:
    """A PartFailure for each requested instance that neither arrived nor already failed."""
    orphans = {uid for uid, _ in named_without_part}
    general = [e for e in errors if e.is_error and not any(_names(e, u) for u in wanted)]
    out: list[PartFailure] = []
    for uid in wanted:
        if uid in pushed or uid in failed:
            continue
        own = [e for e in errors if e.is_error and _names(e, uid)]
        if own:
            out.append(PartFailure(uid, _listed(own), is_transient(own)))
        elif uid in orphans:
            out.append(PartFailure(uid, "named in the answer but its MTOM part is missing", True))
        elif general:
            out.append(PartFailure(uid, _listed(general), is_transient(general)))
        else:
            short = status.rsplit(":", 1)[-1]
            out.append(PartFailure(uid, f"absent from a {short} answer without a RegistryError", True))
    return out


def _is_part10(path: Path) -> bool:
    with path.open("rb") as fh:
        head = fh.read(132)
    return len(head) == 132 and head[128:] == b"DICM"



def manifest_limit(community: XcaCommunity) -> AnswerLimit:
    """The community's ITI-39 limit: on the manifest, so the HTTP body may be what inline base64 makes
    of it (4/3) plus an envelope; an MTOM answer is refused at the part once its bytes pass the value."""
    value = community.iti39_max_manifest_bytes
    return AnswerLimit("iti39_max_manifest_bytes", value, value * 4 // 3 + _ENVELOPE_ROOM)


def _same_home(answered: str, asked: str | None) -> bool:
    """Whether two homeCommunityIds name one community; a malformed one names none (no exception)."""
    try:
        return asked is not None and normalise_home(answered) == normalise_home(asked)
    except ValueError:
        return False

__all__ = [
    "MAX_IMAGE_BYTES", "CommunityRetriever", "PartFailure", "RetrievedPart", "manifest_limit",
]
