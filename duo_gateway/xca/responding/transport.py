"""The HTTP edge of the XCA responding gateway: bytes in, SOAP/MTOM out, faults for bad input.

Everything protocol-specific happens in :mod:`.service`; here: size limits, MTOM/plain SOAP
parsing, WS-Addressing, XUA, and turning outcomes into SOAP 1.2 responses (faults with HTTP 400/500,
registry errors inside 200 answers as XDS wants). Unexpected errors become a Receiver fault, never
a stack trace and never a crashed daemon.

**A RAD-75 answer to an MTOM request is written as the instances arrive, its envelope last.** The
C-FIND says which instances to expect, but whether each arrives (and converts) is only known once the
PACS delivered it, and the envelope's ``RegistryResponse/@status`` and ``RegistryErrorList`` come
before every ``DocumentResponse`` in the schema. So each instance goes out in its own binary part
(``multipart/related``, chunked, no Content-Length) the moment it is in the spool, its file deleted
once written, and the root part (the SOAP envelope, the part the ``start`` parameter names, which
RFC 2387 lets be any part) closes the message: it lists exactly the parts sent, and an instance the
PACS did not deliver, also after it failed mid-study, as XDSRepositoryError with its
``study:series:instance`` codeContext, so the status is the PartialSuccess or Failure the standard
gives (xca.md §9, §10). Chosen over an envelope first, which would have to promise Success and a part
for every expected instance before any was fetched and could only truncate the message when the PACS
failed: a reader must then discard the whole answer, and no standard error says why.

What reads it: DUO's own initiating side (:class:`~duo_gateway.soap.mtom_stream.MtomStream` keeps the
parts before the root and hands them over after it), any reader that honours ``start`` (RFC 2387, as
xca.md §10 asks), and a plain multipart reader that returns parts by Content-ID. A reader that takes
the first part as the envelope whatever ``start`` says cannot: zeep (its ``MultipartDecoder`` use)
and Apache CXF (its ``AttachmentDeserializer`` reads the first part as the message, so IPF too). For
such a peer, ``[[clients.xca]] rad75_envelope = "first"`` keeps the answer of before: every instance
spooled, then the envelope first (with Content-Length); zeep itself sends plain SOAP and so gets the
inline answer, which is spooled whole and status-first too (its readers buffer the body anyway).

The first response byte leaves with the first instance, so a failure before that (consent, the
C-FIND, nothing found) is still an ordinary answer or fault; after it, only DUO's own failure (its
disk) cuts the connection, so the caller never takes a truncated answer for a whole one. A caller
that stops reading stops the fetch; the audit names what was written to it.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import BinaryIO

import structlog
from aiohttp import web
from lxml import etree

from duo_gateway.access import Caller
from duo_gateway.audit.messages import Peer
from duo_gateway.config.loader import DuoConfig
from duo_gateway.http.access import RETRY_AFTER_S, caller_of, register_denial, route_name
from duo_gateway.saml import WSSE_NS
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_NS,
    Addressing,
    Envelope,
    SoapFault,
    build_envelope,
    build_fault,
    fault_http_status,
    new_message_id,
    parse_envelope,
    serialize,
    serialize_with,
)
from duo_gateway.soap.mtom import (
    XOP_NS,
    Attachment,
    MtomRootLast,
    build_mtom,
    new_content_id,
    normalise_cid,
    parse_mtom,
)
from duo_gateway.soap.xml import INLINE_PARSE_BYTES, XmlError
from duo_gateway.xca.codes import Action, ResponseStatus
from duo_gateway.xca.errors import RegistryErrorException
from duo_gateway.xca.query import (
    AdhocQueryResponse,
    adhoc_query_response_bytes,
    parse_adhoc_query_request,
)
from duo_gateway.xca.responding.replay import ReplayGuard, ReplayStoreFull, replay_guard, replay_key
from duo_gateway.xca.responding.service import CallContext, ImagingRetrieval, RespondingGateway
from duo_gateway.xca.retrieve import (
    RetrievedDocument,
    RetrieveDocumentSetResponse,
    build_retrieve_response,
    parse_imaging_retrieve_request,
    parse_retrieve_request,
    spent,
)
from duo_gateway.xmldsig import TrustStore
from duo_gateway.xua import accepted_audiences, peer_trust, validate_xua

log = structlog.get_logger(__name__)

FAULT_ACTION = "http://www.w3.org/2005/08/addressing/soap/fault"
#: MIME parts accepted in an ITI-38/ITI-39/RAD-75 request: the envelope and, at most, a few a lenient
#: peer adds; any attachment is refused afterwards anyway ("attachments are not expected").
REQUEST_MAX_PARTS = 8


@dataclass(frozen=True)
class _Route:
    #: The route's name after ``xca:`` (its owner): iti38, iti39, rad75.
    name: str
    path: str
    action: str
    response_action: str


class XcaRespondingDoor:
    """Mounts ITI-38, ITI-39 and RAD-75 on DUO's HTTP listener."""

    name = "xca-responding"

    def __init__(self, config: DuoConfig, service: RespondingGateway,
                 replay: ReplayGuard | None = None) -> None:
        self._cfg = config
        self._service = service
        #: Per XCA peer (by client name): the certificates pinned for its issuer. Loaded once, so a
        #: missing or CA certificate stops start-up instead of failing every request.
        self._trusted: dict[str, TrustStore] = {p.name: peer_trust(p) for p in config.clients.xca}
        self._replay = replay if replay is not None else replay_guard(config)
        rc = config.xca_responding
        self._audiences = accepted_audiences(config)
        self._routes = {
            rc.iti38_path: _Route("iti38", rc.iti38_path, Action.ITI38, Action.ITI38_RESPONSE),
            rc.iti39_path: _Route("iti39", rc.iti39_path, Action.ITI39, Action.ITI39_RESPONSE),
            rc.rad75_path: _Route("rad75", rc.rad75_path, Action.RAD75, Action.RAD75_RESPONSE),
        }

    def mount(self, app: web.Application) -> None:
        handlers: dict[
            str, Callable[[web.Request, Envelope, CallContext, _Route], Awaitable[web.StreamResponse]]
        ] = {Action.ITI38: self._iti38, Action.ITI39: self._iti39, Action.RAD75: self._rad75}
        register_denial(app, "xca", _denial)

        async def open_replay(_app: web.Application) -> None:
            await self._replay.open()

        async def close_replay(_app: web.Application) -> None:
            await self._replay.close()

        app.on_startup.append(open_replay)
        app.on_cleanup.append(close_replay)
        for route in self._routes.values():
            handler = handlers[route.action]

            async def endpoint(
                request: web.Request,
                route: _Route = route,
                handler: Callable[..., Awaitable[web.StreamResponse]] = handler,
            ) -> web.StreamResponse:
                return await self._handle(request, route, handler)

            app.router.add_post(route.path, endpoint, name=route_name("xca", route.name))

    async def _handle(
        self, request: web.Request, route: _Route, handler: Callable[..., Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        relates_to: str | None = None
        try:
            limit = self._cfg.xca_responding.max_request_bytes
            if request.content_length is not None and request.content_length > limit:
                raise SoapFault("Sender", f"request larger than {limit} bytes")
            raw = await _read_bounded(request, limit)
            content_type = request.headers.get("Content-Type", "")
            # A request carries no attachments, so a few parts are plenty: a hostile body of
            # delimiters is refused after REQUEST_MAX_PARTS, not after the general 10,000. Big bodies
            # are parsed off the loop, as big answers are (soap.xml.INLINE_PARSE_BYTES).
            if len(raw) <= INLINE_PARSE_BYTES:
                root, parts = parse_mtom(content_type, raw, limit, max_parts=REQUEST_MAX_PARTS)
            else:
                root, parts = await asyncio.to_thread(
                    parse_mtom, content_type, raw, limit, max_parts=REQUEST_MAX_PARTS
                )
            if parts:
                raise SoapFault("Sender", "attachments are not expected in this request")
            env = parse_envelope(root)
            relates_to = env.addressing.message_id
            if env.addressing.action != route.action:
                raise SoapFault(
                    "Sender",
                    f"wsa:Action must be {route.action} at {route.path}",
                    subcode=(WSA_NS, "ActionNotSupported"),
                )
            if env.body is None:
                raise SoapFault("Sender", "empty SOAP Body")
            message_id = env.addressing.message_id
            if not message_id:
                # Without it a replay cannot be told from a new request.
                raise SoapFault("Sender", "wsa:MessageID is required",
                                subcode=(WSA_NS, "MessageAddressingHeaderRequired"))
            caller = caller_of(request)
            if caller.xca is None:
                # The access middleware admits XCA peers only; this is the backstop.
                raise SoapFault("Sender", "this caller is not a configured XCA peer",
                                subcode=(WSSE_NS, "FailedAuthentication"))
            peer = caller.xca
            trusted = self._trusted.get(peer.name)
            if trusted is None:
                raise SoapFault("Sender", "no signing certificates are pinned for this peer",
                                subcode=(WSSE_NS, "FailedAuthentication"))
            now = datetime.now(UTC)
            # The peer's TLS identity binds the issuer: its own assertions only, signed by its pinned keys.
            requester = validate_xua(env, self._cfg.xua, issuer=peer.issuer, trusted=trusted,
                                     audiences=self._audiences, now=now)
            if requester is None:
                # Even where XUA is optional, Mitz must be asked in someone's name: no requester, no data.
                raise SoapFault("Sender", "no XUA assertion: there is no requester to ask consent for",
                                subcode=(WSSE_NS, "InvalidSecurity"))
            # After authentication, so only a peer's signed messages take room in the replay store.
            until = requester.not_on_or_after + timedelta(seconds=self._cfg.xua.clock_skew_s)
            try:
                first = await self._replay.first_use(replay_key(peer.issuer, message_id), until=until,
                                                     now=now)
            except ReplayStoreFull as exc:
                log.error("xua replay store full", reason=str(exc))
                raise SoapFault("Receiver", "too many requests to check for replay; retry later") from exc
            if not first:
                raise SoapFault("Sender", "this wsa:MessageID was seen before (replayed message)",
                                subcode=(WSSE_NS, "InvalidSecurity"))
            ctx = CallContext(
                requester,
                # The calling system as its certificate identified it; never the (free-text) ReplyTo.
                Peer(user_id=caller.name, host=request.remote),
                etree.tostring(env.body),
                system=caller,
            )
            return await handler(request, env, ctx, route)
        except SoapFault as fault:
            log.info("xca request faulted", path=route.path, code=fault.code, reason=fault.reason)
            return _fault_response(fault, relates_to)
        except (XmlError, ValueError) as exc:
            log.info("xca request refused", path=route.path, reason=str(exc)[:200])
            return _fault_response(
                SoapFault("Sender", f"not an acceptable SOAP 1.2 message: {exc}"[:500]), relates_to
            )
        except web.HTTPException:
            raise
        except Exception:
            log.exception("xca request failed", path=route.path)
            return _fault_response(
                SoapFault("Receiver", "internal error; the request was not processed"), relates_to
            )

    async def _iti38(
        self,
        request: web.Request,
        env: Envelope,
        ctx: CallContext,
        route: _Route,
    ) -> web.StreamResponse:
        assert env.body is not None
        try:
            req = parse_adhoc_query_request(env.body)
        except RegistryErrorException as exc:
            resp = AdhocQueryResponse(ResponseStatus.FAILURE, (), exc.errors)
        else:
            resp = await self._service.query(req, ctx)
        # Written as bytes and spliced into the envelope: no tree of the entries is built (xca.ebrim).
        if len(resp.objects) <= _INLINE_BUILD_OBJECTS:
            answer = adhoc_query_response_bytes(resp)
        else:
            answer = await asyncio.to_thread(adhoc_query_response_bytes, resp)
        body = serialize_with(_addressing(route.response_action, env), answer)
        return web.Response(body=body, headers={"Content-Type": _content_type(route.response_action)})

    async def _iti39(
        self,
        request: web.Request,
        env: Envelope,
        ctx: CallContext,
        route: _Route,
    ) -> web.StreamResponse:
        assert env.body is not None
        try:
            resp = await self._service.retrieve(parse_retrieve_request(env.body), ctx)
        except RegistryErrorException as exc:
            resp = RetrieveDocumentSetResponse(ResponseStatus.FAILURE, (), exc.errors)
        return await _mtom_response(request, resp, route.response_action, env)

    async def _rad75(
        self,
        request: web.Request,
        env: Envelope,
        ctx: CallContext,
        route: _Route,
    ) -> web.StreamResponse:
        assert env.body is not None
        try:
            req = parse_imaging_retrieve_request(env.body)
        except RegistryErrorException as exc:
            return await _mtom_response(
                request,
                RetrieveDocumentSetResponse(ResponseStatus.FAILURE, (), exc.errors),
                route.response_action,
                env,
            )
        retrieval = await self._service.retrieve_imaging(req, ctx)
        peer = ctx.system.xca if ctx.system is not None else None
        try:
            if _wants_mtom(request) and (peer is None or peer.rad75_envelope == "last"):
                return await _rad75_streamed(request, retrieval, route.response_action, env)
            async with contextlib.aclosing(retrieval.stream()) as documents:
                async for _document in documents:
                    pass  # envelope first: every instance must be in the spool before the first byte
            try:
                return await _mtom_response(request, retrieval.response(), route.response_action, env,
                                            disclosing=retrieval.disclosing)
            except ConnectionError:
                retrieval.stopped("the caller stopped reading the answer")
                raise
        finally:
            await retrieval.aclose()


async def _rad75_streamed(request: web.Request, retrieval: ImagingRetrieval, action: str,
                          env: Envelope) -> web.StreamResponse:
    """The MTOM answer written as the instances arrive, envelope last (see the module docstring)."""
    writer = MtomRootLast(action)
    response: web.StreamResponse | None = None
    written: list[RetrievedDocument] = []
    content_ids: list[str] = []

    async def started() -> web.StreamResponse:
        nonlocal response
        if response is None:
            response = web.StreamResponse(status=200, headers={"Content-Type": writer.content_type})
            response.enable_chunked_encoding()
            await response.prepare(request)
        return response

    try:
        async with contextlib.aclosing(retrieval.stream(writes_through=True)) as documents:
            async for document in documents:
                out = await started()
                cid = new_content_id()
                await out.write(writer.part_head(cid, document.mime_type))
                retrieval.disclosing(document)
                await _write_document(out, document.data)
                await out.write(writer.PART_END)
                written.append(spent(document))
                content_ids.append(cid)
        body_el, _ = build_retrieve_response(retrieval.response(written), mtom=True, content_ids=content_ids)
        root = writer.root(_answer(body_el, action, env))
        out = await started()
        await out.write(root)
        await out.write_eof()
        return out
    except ConnectionError:
        # The caller went away: nothing more can reach it, and what it got is audited as disclosed.
        retrieval.stopped("the caller stopped reading the answer")
        log.info("rad75 answer cut: the caller went away", parts_written=len(written))
        if response is None:
            raise
        return response
    except Exception:
        if response is None:
            raise  # nothing sent yet: the door's Receiver fault
        # Parts went out but the envelope cannot follow: drop the connection, so the caller sees a
        # truncated message (no close delimiter) and never a complete answer that is not one.
        retrieval.stopped("DUO failed while writing the answer")
        log.exception("rad75 answer cut: internal error", parts_written=len(written))
        if request.transport is not None:
            request.transport.close()
        return response


#: A document up to this size is read in one go (one hand-off to a thread instead of one per chunk,
#: per instance of a study of hundreds); a larger one is read in chunks of it.
_WHOLE_READ_BYTES = 4 * 1024 * 1024


async def _write_document(out: web.StreamResponse, data: bytes | Path) -> None:
    """A document's bytes, read from disk in a thread (never more than 4 MiB of it at a time, never on
    the loop), and its spool file removed: once written it has no other reader."""
    if isinstance(data, bytes):
        await out.write(data)
        return
    head, fh = await asyncio.to_thread(_open_document, data)
    try:
        await out.write(head)
        while fh is not None and (chunk := await asyncio.to_thread(fh.read, _WHOLE_READ_BYTES)):
            await out.write(chunk)
    finally:
        if fh is not None:
            await asyncio.to_thread(_close_document, fh, data)


def _open_document(path: Path) -> tuple[bytes, BinaryIO | None]:
    """The first (or only) block of ``path``; the open file when more follows, else None and the file
    already deleted."""
    fh = path.open("rb")
    head = fh.read(_WHOLE_READ_BYTES)
    if len(head) < _WHOLE_READ_BYTES:
        _close_document(fh, path)
        return head, None
    return head, fh


def _close_document(fh: BinaryIO, path: Path) -> None:
    fh.close()
    path.unlink(missing_ok=True)


def _wants_mtom(request: web.Request) -> bool:
    return request.headers.get("Content-Type", "").lower().startswith("multipart/related")


async def _read_bounded(request: web.Request, limit: int) -> bytes:
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.content.iter_chunked(64 * 1024):
        size += len(chunk)
        if size > limit:
            raise SoapFault("Sender", f"request larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def _content_type(action: str) -> str:
    return f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"'


def _addressing(action: str, env: Envelope) -> Addressing:
    return Addressing(action=action, message_id=new_message_id(), relates_to=env.addressing.message_id)


def _answer(body: etree._Element, action: str, env: Envelope) -> etree._Element:
    return build_envelope(_addressing(action, env), body)


async def _mtom_response(
    request: web.Request, resp: RetrieveDocumentSetResponse, action: str, env: Envelope, *,
    disclosing: Callable[[RetrievedDocument], None] | None = None,
) -> web.StreamResponse:
    """Answer in kind: MTOM to an MTOM request, inline base64 to a plain SOAP one (peers that cannot
    read multipart, zeep among them). Both stream; documents on disk are read chunk by chunk in a
    thread, so neither memory nor the event loop depends on the study size. ``disclosing`` hears of
    each document just before its bytes are written (inline answers; the RAD-75 audit)."""
    body_el, attachments = build_retrieve_response(resp, mtom=True)
    envelope = _answer(body_el, action, env)
    by_cid = dict(zip((a.content_id for a in attachments), resp.documents, strict=True))
    if _wants_mtom(request):
        content_type, body = build_mtom(envelope, attachments, action)
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        response.content_length = body.content_length
        await response.prepare(request)
        on_attachment = None if disclosing is None else lambda a: disclosing(by_cid[a.content_id])
        async for chunk in body.astream(on_attachment):
            await response.write(chunk)
    else:
        segments = _inline_segments(envelope, attachments)
        response = web.StreamResponse(status=200, headers={"Content-Type": _content_type(action)})
        response.content_length = sum(
            len(x) if isinstance(x, bytes) else _b64_len(x.size()) for x in segments
        )
        await response.prepare(request)
        for segment in segments:
            if isinstance(segment, bytes):
                await response.write(segment)
                continue
            if disclosing is not None:
                disclosing(by_cid[segment.content_id])
            async for chunk in _b64_stream(segment):
                await response.write(chunk)
    await response.write_eof()
    return response


#: Entries an ITI-38 answer may have and still be written on the event loop: ~0.2 ms each
#: (docs/performance.md), so a 5,000-entry answer (~1 s) is written in a thread instead.
_INLINE_BUILD_OBJECTS = 100
_MARK = "DUO-INLINE-DOCUMENT-"


def _inline_segments(envelope: etree._Element, attachments: list[Attachment]) -> list[bytes | Attachment]:
    """The serialized envelope cut where each xop:Include stood, with the attachment in between."""
    by_cid = {a.content_id: a for a in attachments}
    for include in envelope.iter(f"{{{XOP_NS}}}Include"):
        parent = include.getparent()
        assert parent is not None
        cid = normalise_cid(include.get("href", ""))
        parent.remove(include)
        parent.text = f"{_MARK}{cid}{_MARK}"
    out: list[bytes | Attachment] = []
    for i, piece in enumerate(serialize(envelope).split(_MARK.encode())):
        if i % 2 == 0:
            out.append(piece)
        else:
            out.append(by_cid[piece.decode()])
    return out


def _b64_len(n: int) -> int:
    return 4 * ((n + 2) // 3)


async def _b64_stream(attachment: Attachment) -> AsyncIterator[bytes]:
    """Base64 in chunks whose raw size is a multiple of 3, so the pieces concatenate correctly."""
    if isinstance(attachment.data, bytes):
        yield base64.b64encode(attachment.data)
        return
    fh = await asyncio.to_thread(attachment.data.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, 3 * 64 * 1024):
            yield base64.b64encode(chunk)
    finally:
        await asyncio.to_thread(fh.close)


def _denial(status: int, detail: str, _caller: Caller) -> web.Response:
    """The access middleware's refusals as SOAP 1.2 faults: 403 for a caller that is not a configured
    XCA peer (wsse:FailedAuthentication), 429 when the peer has too many requests in progress."""
    if status == 429:
        response = _fault_response(SoapFault("Receiver", detail), None)
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    else:
        fault = SoapFault("Sender", detail, subcode=(WSSE_NS, "FailedAuthentication"))
        response = _fault_response(fault, None)
    response.set_status(status)
    return response


def _fault_response(fault: SoapFault, relates_to: str | None) -> web.Response:
    return web.Response(
        status=fault_http_status(fault),
        body=serialize(build_fault(fault, relates_to)),
        headers={"Content-Type": _content_type(FAULT_ACTION)},
    )
