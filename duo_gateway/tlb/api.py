"""The TLB timeline API's HTTP edge: JSON in, one merged timeline or an RFC 9457 problem out.

Everything about *building* a timeline lives behind :class:`TimelineProvider`; here: media type, size
and syntax of the body, validation (:mod:`duo_gateway.tlb.models`), and turning each refusal into a
problem that says which member to fix. Status codes, as documented in ``schemas/tlb-api.openapi.yaml``:

* 400 ``malformed-json``: the body is not one UTF-8 JSON text (or repeats a member name: with two
  ``bsn`` members, which one DUO reads must not be left to a parser's habit);
* 422 ``invalid-*``: well-formed JSON that is not a valid timeline request, typed by what to fix;
* 413, 415: too large, not ``application/json``;
* 500 ``internal``, 504 ``timeout``: DUO's own failure, never the caller's input.

No BSN is logged here, not even refused ones: log records carry counts, codes and the requester's
professional identifiers only.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import re
import sys
import time
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any, Final, NoReturn, Protocol, TypeVar

import structlog
from aiohttp import web
from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

from duo_gateway.access import Caller
from duo_gateway.config.access import TlbClient
from duo_gateway.config.timeline import TimelineConfig
from duo_gateway.http.access import caller_of, register_denial, route_name
from duo_gateway.http.problem import PROBLEM_CONTENT_TYPE
from duo_gateway.timeline.model import TimelineRequest
from duo_gateway.timeline.result import TimelineResult
from duo_gateway.tlb.identity import SCHEME, AssertionIdentity, AssertionRefused
from duo_gateway.tlb.models import (
    MAX_PERIOD_DAYS,
    DestinationAddress,
    FieldError,
    Problem,
    ProblemType,
    TimelineAnswer,
    TimelineQuery,
    TransferAccepted,
    TransferList,
    TransferQuery,
    TransferStatus,
    ViewCreated,
    ViewQuery,
    ViewStudy,
)
from duo_gateway.transfer.jobstore import Job
from duo_gateway.transfer.service import AdhocDestination, TransferRefused, TransferRequest
from duo_gateway.views.service import ViewRefused, ViewService
from duo_gateway.xua import Claims

log = structlog.get_logger(__name__)
Q = TypeVar("Q", bound=BaseModel)

def _schema_location() -> Path:
    """The repository copy in a checkout; the one pip installs under ``<prefix>/share`` otherwise."""
    in_repo = Path(__file__).resolve().parents[2] / "schemas" / "tlb-api.openapi.yaml"
    installed = Path(sys.prefix) / "share" / "duo-gateway" / "schemas" / "tlb-api.openapi.yaml"
    return in_repo if in_repo.is_file() or not installed.is_file() else installed


DEFAULT_SCHEMA_PATH: Final = _schema_location()
#: A timeline request is a few hundred bytes; 64 KiB leaves room for MAX_INSTITUTIONS and nothing silly.
DEFAULT_MAX_BODY_BYTES: Final = 64 * 1024
#: How long past its own deadline the provider may take before the door gives up on it.
DEFAULT_DEADLINE_GRACE_S: Final = 5.0
YAML_CONTENT_TYPE: Final = "application/yaml"
#: Details of at most this many refused members go into ``detail``; ``errors`` lists them all.
_DETAIL_ERRORS: Final = 3

_TITLES: Final[dict[ProblemType, str]] = {
    ProblemType.MALFORMED_JSON: "Request body is not JSON",
    ProblemType.INVALID_REQUEST: "Invalid timeline request",
    ProblemType.INVALID_BSN: "Invalid BSN",
    ProblemType.INVALID_PERIOD: "Invalid period",
    ProblemType.INVALID_INSTITUTION: "Invalid institution",
    ProblemType.INVALID_REQUESTER: "Invalid requester",
    ProblemType.UNSUPPORTED_MEDIA_TYPE: "Unsupported media type",
    ProblemType.PAYLOAD_TOO_LARGE: "Request too large",
    ProblemType.TIMEOUT: "Timeline not ready in time",
    ProblemType.INTERNAL: "Internal error",
    ProblemType.INVALID_STUDY: "Invalid study id",
    ProblemType.INVALID_DESTINATION: "Invalid destination",
    ProblemType.INVALID_PATIENT_ID: "Invalid local patient id",
    ProblemType.DESTINATION_NOT_ALLOWED: "Destination not allowed",
    ProblemType.NOT_FOUND: "No such transfer",
    ProblemType.FORBIDDEN: "Forbidden",
    ProblemType.TOO_MANY_REQUESTS: "Too many requests",
    ProblemType.INVALID_ASSERTION: "No acceptable XUA assertion",
    ProblemType.NO_CONSENT: "No consent",
    ProblemType.SOURCE_UNAVAILABLE: "Source unavailable",
}
#: How each refusal of a view is answered.
_VIEW_REFUSALS: Final[dict[str, tuple[int, ProblemType]]] = {
    "invalid-study": (422, ProblemType.INVALID_STUDY),
    "no-consent": (403, ProblemType.NO_CONSENT),
    "source-unavailable": (502, ProblemType.SOURCE_UNAVAILABLE),
    "too-many": (429, ProblemType.TOO_MANY_REQUESTS),
}
#: View ids are UUIDs (the service makes them); anything else is answered 404 without a lookup.
_VIEW_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Which problem a refused member belongs to, by the top-level member it sits in.
_BY_MEMBER: Final[dict[str, ProblemType]] = {
    "patient": ProblemType.INVALID_BSN,
    "period": ProblemType.INVALID_PERIOD,
    "institutions": ProblemType.INVALID_INSTITUTION,
    "requester": ProblemType.INVALID_REQUESTER,
    "studies": ProblemType.INVALID_STUDY,
    "destination": ProblemType.INVALID_DESTINATION,
    "local_patient_id": ProblemType.INVALID_PATIENT_ID,
}
_REFUSALS: Final[dict[str, tuple[int, ProblemType]]] = {
    "unknown-study": (422, ProblemType.INVALID_STUDY),
    "unknown-destination": (422, ProblemType.INVALID_DESTINATION),
    "destination-not-allowed": (403, ProblemType.DESTINATION_NOT_ALLOWED),
}
#: A comment line on an idle event stream, so proxies and clients see the connection is alive.
SSE_KEEPALIVE_S: Final = 15.0
#: A transfer request names at most MAX_TRANSFER_STUDIES ids of a few hundred bytes each.
TRANSFER_MAX_BODY_BYTES: Final = 512 * 1024
#: Transfer ids are UUIDs (the store makes them); anything else is answered 404 without a lookup.
_JOB_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
#: Most transfers one list page holds.
MAX_LIST_LIMIT: Final = 100
_SERVERS_LINE = re.compile(r"(?m)^(servers:\n  - url: )\S+$")


class TimelineProvider(Protocol):
    """Builds the timeline (duo_gateway.timeline.service). Expected not to raise: a failing source is a
    :class:`~duo_gateway.timeline.model.SourceOutcome`, and the deadline is its own to keep."""

    async def timeline(self, request: TimelineRequest) -> TimelineResult: ...


class TransferProvider(Protocol):
    """Queues and reports transfers (duo_gateway.transfer.service); refusals are TransferRefused.

    Every read takes the calling client's name: a job another client submitted does not exist for it."""

    async def submit(self, request: TransferRequest) -> Job: ...

    async def get(self, job_id: str, client: str) -> Job | None: ...

    async def list_jobs(self, client: str, *, limit: int, offset: int = 0) -> list[Job]: ...

    async def cancel(self, job_id: str, client: str) -> Job | None: ...

    def watch(self, job_id: str, client: str) -> AsyncIterator[Job]: ...


class _Refusal(Exception):
    """A request the door will not pass on; carries the problem to answer with."""

    def __init__(self, status: int, type_: ProblemType, detail: str,
                 errors: Sequence[FieldError] | None = None) -> None:
        super().__init__(detail)
        self.status = status
        self.type = type_
        self.detail = detail
        self.errors = list(errors) if errors is not None else None


class TlbApiDoor:
    """POST {prefix}/timeline, the transfers and GET {prefix}/openapi.yaml on DUO's HTTP listener.

    The calling system is the TLB client its certificate matched (:mod:`duo_gateway.http.access` lets
    only those through); the professional is the request's ``requester``, believed only for an
    organisation (URA) that client may speak for. Transfers are the submitting client's own.
    """

    name = "tlb-api"

    def __init__(self, provider: TimelineProvider, config: TimelineConfig, *,
                 transfers: TransferProvider | None = None,
                 views: ViewService | None = None,
                 identity: AssertionIdentity | None = None,
                 schema_path: Path | None = DEFAULT_SCHEMA_PATH,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
                 deadline_grace_s: float = DEFAULT_DEADLINE_GRACE_S) -> None:
        if max_body_bytes < 1 or deadline_grace_s < 0:
            raise ValueError("max_body_bytes must be positive and deadline_grace_s not negative")
        self._provider = provider
        self._transfers = transfers
        self._views = views
        #: Checks the assertions of clients with ``identity = "assertion"``; None: no such client.
        self._identity = identity
        self._config = config
        self._max_body_bytes = max_body_bytes
        self._deadline_grace_s = deadline_grace_s
        self._document = self._with_prefix(self._load_document(schema_path))

    def mount(self, app: web.Application) -> None:
        if not self._config.enabled:
            log.info("tlb api disabled; not mounted")
            return
        prefix = self._config.path_prefix
        register_denial(app, "tlb", _denial)
        app.router.add_post(f"{prefix}/timeline", self._timeline, name=route_name("tlb", "timeline"))
        if self._transfers is not None:
            app.router.add_post(f"{prefix}/transfers", self._submit,
                                name=route_name("tlb", "transfers.submit"))
            app.router.add_get(f"{prefix}/transfers", self._list, name=route_name("tlb", "transfers.list"))
            app.router.add_get(f"{prefix}/transfers/{{id}}", self._status,
                               name=route_name("tlb", "transfers.status"))
            app.router.add_delete(f"{prefix}/transfers/{{id}}", self._cancel,
                                  name=route_name("tlb", "transfers.cancel"))
            app.router.add_get(f"{prefix}/transfers/{{id}}/events", self._events,
                               name=route_name("tlb", "transfers.events"))
        if self._views is not None:
            app.router.add_post(f"{prefix}/views", self._create_view, name=route_name("tlb", "views.create"))
            app.router.add_delete(f"{prefix}/views/{{id}}", self._delete_view,
                                  name=route_name("tlb", "views.delete"))
        document = self._document
        if document is not None:
            async def openapi(_request: web.Request) -> web.Response:
                return web.Response(body=document, content_type=YAML_CONTENT_TYPE, charset="utf-8")

            # The contract is public: any system that reached the listener may read it.
            app.router.add_get(f"{prefix}/openapi.yaml", openapi, name=route_name("ops", "tlb-openapi"))

    # -- handlers ------------------------------------------------------------------------------
    async def _timeline(self, request: web.Request) -> web.Response:
        started = time.perf_counter()
        try:
            client = _client(request)
            query = await self._parse(request, TimelineQuery, self._max_body_bytes)
            _speaks_for(client, query.requester.ura)
            requester = self._requester(request, client, query.requester.claims())
        except _Refusal as refusal:
            log.info("tlb_timeline_refused", status=refusal.status, problem=refusal.type.value,
                     codes=sorted({e.code for e in refusal.errors or ()}))
            return _refused(refusal)
        timeline_request = dataclasses.replace(query.to_request(), client=caller_of(request).name,
                                               requester=requester)
        budget = self._config.deadline_s + self._deadline_grace_s
        try:
            async with asyncio.timeout(budget) as deadline:
                result = await self._provider.timeline(timeline_request)
        except TimeoutError:
            if not deadline.expired():
                return _internal_error("the provider raised TimeoutError")
            log.error("tlb_timeline_overran", budget_s=budget)
            return _problem(504, ProblemType.TIMEOUT,
                            f"the timeline was not ready within {budget:g} s; try again later")
        except Exception:
            return _internal_error("the provider raised")
        try:
            answer = TimelineAnswer.from_result(result)
        except ValidationError:
            # Sending it anyway would break the documented schema clients rely on.
            return _internal_error("the result does not fit the API's answer")
        log.info("tlb_timeline", studies=len(answer.studies),
                 sources={s.id: s.status for s in answer.sources},
                 institutions=len(timeline_request.institutions),
                 period_days=(timeline_request.date_to - timeline_request.date_from).days + 1,
                 requester_ura=timeline_request.requester.ura, purpose=timeline_request.requester.purpose,
                 elapsed_ms=round((time.perf_counter() - started) * 1000))
        response = web.json_response(answer.model_dump(mode="json"))
        # The answer is patient data: no shared or private cache may keep it.
        response.headers["Cache-Control"] = "no-store"
        return response

    # -- transfers -----------------------------------------------------------------------------
    async def _submit(self, request: web.Request) -> web.Response:
        assert self._transfers is not None
        try:
            client = _client(request)
            query = await self._parse(request, TransferQuery, TRANSFER_MAX_BODY_BYTES)
            _speaks_for(client, query.requester.ura)
            # The job keeps plain claims (it outlives the assertion); checked like the timeline's.
            self._requester(request, client, query.requester.claims())
            if isinstance(query.destination, str) and client.destinations is not None \
                    and query.destination not in client.destinations:
                raise _Refusal(403, ProblemType.DESTINATION_NOT_ALLOWED,
                               f"client {client.name} may not send to {query.destination!r}")
        except _Refusal as refusal:
            log.info("tlb_transfer_refused", status=refusal.status, problem=refusal.type.value,
                     codes=sorted({e.code for e in refusal.errors or ()}))
            return _refused(refusal)
        destination: str | AdhocDestination
        if isinstance(query.destination, DestinationAddress):
            d = query.destination
            destination = AdhocDestination(d.ae_title, d.host, d.port)
        else:
            destination = query.destination
        try:
            job = await self._transfers.submit(TransferRequest(
                study_ids=tuple(query.studies), destination=destination, requester=query.requester.claims(),
                local_patient_id=query.local_patient_id, client=client.name))
        except TransferRefused as refused:
            status, type_ = _REFUSALS[refused.kind]
            log.info("tlb_transfer_refused", status=status, problem=type_.value)
            return _problem(status, type_, refused.detail)
        except Exception:
            return _internal_error("the transfer service raised", event="tlb_transfer_failed",
                                   failed="the transfer could not be queued")
        href = f"{self._config.path_prefix}/transfers/{job.id}"
        body = TransferAccepted(id=job.id, state=job.state, href=href)
        response = web.json_response(body.model_dump(mode="json"), status=202)
        response.headers["Location"] = href
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _status(self, request: web.Request) -> web.Response:
        assert self._transfers is not None
        job_id = request.match_info["id"]
        client = caller_of(request).tlb
        found = client is not None and _JOB_ID.fullmatch(job_id)
        job = await self._transfers.get(job_id, client.name) if client is not None and found else None
        return _not_found() if job is None else _status_response(job)

    async def _list(self, request: web.Request) -> web.Response:
        """The caller's own transfers, newest first, ``limit`` (1-100, default 20) from ``offset``."""
        assert self._transfers is not None
        try:
            client = _client(request)
            limit = _int_param(request, "limit", 20, 1, MAX_LIST_LIMIT)
            offset = _int_param(request, "offset", 0, 0, 1_000_000)
        except _Refusal as refusal:
            return _problem(refusal.status, refusal.type, refusal.detail)
        jobs = await self._transfers.list_jobs(client.name, limit=limit, offset=offset)
        body = TransferList(transfers=[TransferStatus.model_validate(_status_fields(j)) for j in jobs],
                            limit=limit, offset=offset)
        response = web.json_response(body.model_dump(mode="json"))
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _cancel(self, request: web.Request) -> web.Response:
        assert self._transfers is not None
        job_id = request.match_info["id"]
        client = caller_of(request).tlb
        found = client is not None and _JOB_ID.fullmatch(job_id)
        job = await self._transfers.cancel(job_id, client.name) if client is not None and found else None
        if job is None:
            return _not_found()
        log.info("tlb_transfer_cancel", job=job.id, state=job.state)
        return _status_response(job)

    async def _events(self, request: web.Request) -> web.StreamResponse:
        """Server-sent events: ``progress`` with the whole status on every change, ``end`` once final."""
        assert self._transfers is not None
        client = caller_of(request).tlb
        if client is None or not _JOB_ID.fullmatch(request.match_info["id"]):
            return _not_found()
        stream = self._transfers.watch(request.match_info["id"], client.name)
        first: asyncio.Task[Job] = asyncio.ensure_future(anext(stream))
        pending: asyncio.Task[Job] | None = first
        try:
            done, _ = await asyncio.wait({first}, timeout=SSE_KEEPALIVE_S)
            if first in done and (failure := first.exception()) is not None:
                if isinstance(failure, StopAsyncIteration):
                    return _not_found()
                # Before the 200 and the stream's headers go out, so the client gets a problem answer.
                try:
                    raise failure
                except Exception:
                    return _internal_error("reading the job failed", event="tlb_transfer_events_failed",
                                           failed="the transfer's events could not be read")
            response = web.StreamResponse(headers={"Content-Type": "text/event-stream",
                                                   "Cache-Control": "no-store", "X-Accel-Buffering": "no"})
            await response.prepare(request)
            while pending is not None:
                current = pending
                done, _ = await asyncio.wait({current}, timeout=SSE_KEEPALIVE_S)
                if not done:
                    await response.write(b": keep-alive\n\n")
                    continue
                try:
                    job = current.result()
                except StopAsyncIteration:
                    break
                status = TransferStatus.model_validate(_status_fields(job))
                data = json.dumps(status.model_dump(mode="json"), separators=(",", ":"))
                final = job.terminal
                await response.write(f"event: {'end' if final else 'progress'}\nid: {job.revision}\n"
                                     f"data: {data}\n\n".encode())
                pending = None if final else asyncio.ensure_future(anext(stream))
            await response.write_eof()
            return response
        finally:
            if pending is not None and not pending.done():
                # The generator must be out of its anext() before it can be closed.
                pending.cancel()
                with contextlib.suppress(asyncio.CancelledError, StopAsyncIteration):
                    await pending
            await stream.aclose()  # type: ignore[attr-defined]

    # -- views ---------------------------------------------------------------------------------
    async def _create_view(self, request: web.Request) -> web.Response:
        assert self._views is not None
        try:
            client = _client(request)
            query = await self._parse(request, ViewQuery, TRANSFER_MAX_BODY_BYTES)
            _speaks_for(client, query.requester.ura)
            requester = self._requester(request, client, query.requester.claims())
        except _Refusal as refusal:
            log.info("tlb_view_refused", status=refusal.status, problem=refusal.type.value)
            return _refused(refusal)
        try:
            view = await self._views.create(client=client.name, requester=requester, study_ids=query.studies)
        except ViewRefused as refused:
            status, type_ = _VIEW_REFUSALS[refused.kind]
            log.info("tlb_view_refused", status=status, problem=type_.value, source=refused.source)
            return _problem(status, type_, refused.detail)
        except Exception:
            return _internal_error("the view service raised", event="tlb_view_failed",
                                   failed="the view could not be made")
        root = f"{request.scheme}://{request.host}{self._views.cfg.dicomweb_path}/{view.token}"
        body = ViewCreated(id=view.id, dicomweb=root, expires_at=view.expires_iso(), studies=[
            ViewStudy(id=feed.study_id, study_instance_uid=uid, source=feed.source,
                      instances=len(feed.expected))
            for uid, feed in view.feeds.items()])
        response = web.json_response(body.model_dump(mode="json"), status=201)
        response.headers["Location"] = f"{self._config.path_prefix}/views/{view.id}"
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _delete_view(self, request: web.Request) -> web.Response:
        assert self._views is not None
        client = caller_of(request).tlb
        view_id = request.match_info["id"]
        deleted = client is not None and _VIEW_ID.fullmatch(view_id) is not None \
            and await self._views.delete(view_id, client.name)
        if not deleted:
            return _problem(404, ProblemType.NOT_FOUND, "no open view with this id")
        return web.Response(status=204)

    # -- the professional ----------------------------------------------------------------------
    def _requester(self, request: web.Request, client: TlbClient, stated: Claims) -> Claims:
        """The body's requester, or, for a client with ``identity = "assertion"``, its assertion's
        (which must say the same)."""
        if client.identity == "body":
            return stated
        if self._identity is None:
            raise _Refusal(500, ProblemType.INTERNAL, "no assertion checks are configured for this client")
        try:
            return self._identity.requester(client, request.headers.get("Authorization"), stated)
        except AssertionRefused as refused:
            log.warning("tlb_assertion_refused", client=client.name, status=refused.status,
                        reason=refused.detail)
            type_ = ProblemType.INVALID_ASSERTION if refused.status == 401 else ProblemType.FORBIDDEN
            raise _Refusal(refused.status, type_, refused.detail) from None

    # -- parsing -------------------------------------------------------------------------------
    async def _parse(self, request: web.Request, model: type[Q], max_body_bytes: int) -> Q:
        if request.content_type != "application/json" or (
                request.charset is not None and request.charset.lower() not in ("utf-8", "utf8")):
            raise _Refusal(415, ProblemType.UNSUPPORTED_MEDIA_TYPE,
                           "send the request as application/json (UTF-8)")
        raw = await self._read_body(request, max_body_bytes)
        _check_json(raw)
        try:
            return model.model_validate_json(
                raw, context={MAX_PERIOD_DAYS: self._config.max_period_days})
        except ValidationError as exc:
            errors = exc.errors(include_url=False, include_input=False)
            if any(e["type"] == "json_invalid" for e in errors):
                # json.loads took it, pydantic's parser did not (e.g. a number too large for it).
                raise _Refusal(400, ProblemType.MALFORMED_JSON,
                               "the body is not JSON this API can read") from None
            _refuse_invalid(errors)

    async def _read_body(self, request: web.Request, limit: int) -> bytes:
        """The whole body, read no further than the limit, whatever Content-Length claims."""
        too_large = _Refusal(413, ProblemType.PAYLOAD_TOO_LARGE, f"a request is at most {limit} bytes")
        if request.content_length is not None and request.content_length > limit:
            raise too_large
        body = bytearray()
        while len(body) <= limit:
            chunk = await request.content.read(limit + 1 - len(body))
            if not chunk:
                break
            body += chunk
        if len(body) > limit:
            raise too_large
        return bytes(body)

    # -- helpers -------------------------------------------------------------------------------
    @staticmethod
    def _load_document(path: Path | None) -> bytes | None:
        if path is None:
            return None
        try:
            return path.read_bytes()
        except OSError as exc:
            # A missing document must not keep the gateway from serving timelines.
            log.error("tlb api document unreadable; GET openapi.yaml not served", path=str(path),
                      error=exc.strerror)
            return None

    def _with_prefix(self, document: bytes | None) -> bytes | None:
        """The document's ``servers`` URL set to the configured prefix, so the served copy is never wrong.

        Text substitution on the one fixed-format line, because YAML is not a runtime dependency.
        """
        if document is None:
            return None
        text = document.decode("utf-8")
        replaced, count = _SERVERS_LINE.subn(lambda m: m.group(1) + self._config.path_prefix, text, count=1)
        if count != 1:
            log.warning("tlb api document has no servers line to set the prefix in; served as is")
            return document
        return replaced.encode("utf-8")


def _refused(refusal: _Refusal) -> web.Response:
    response = _problem(refusal.status, refusal.type, refusal.detail, refusal.errors)
    if refusal.status == 401:
        response.headers["WWW-Authenticate"] = SCHEME  # RFC 9110 §11.6.1: say how to authenticate
    return response


def _client(request: web.Request) -> TlbClient:
    """The calling TLB client; the access middleware already refused anyone else, this is the backstop."""
    client = caller_of(request).tlb
    if client is None:
        raise _Refusal(403, ProblemType.FORBIDDEN, "this caller is not a configured TLB client")
    return client


def _speaks_for(client: TlbClient, ura: str) -> None:
    """The requester's organisation must be one the calling system's certificate binds."""
    if ura not in client.uras:
        log.warning("tlb_requester_not_bound", client=client.name, requester_ura=ura)
        raise _Refusal(403, ProblemType.FORBIDDEN,
                       f"client {client.name} may not speak for organisation {ura}")


def _int_param(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _Refusal(400, ProblemType.INVALID_REQUEST,
                       f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _denial(status: int, detail: str, _caller: Caller) -> web.Response:
    """The access middleware's refusals, in this API's problem vocabulary."""
    type_ = ProblemType.TOO_MANY_REQUESTS if status == 429 else ProblemType.FORBIDDEN
    return _problem(status, type_, detail)


def _status_fields(job: Job) -> dict[str, Any]:
    return {
        "id": job.id, "state": job.state, "instances_expected": job.instances_expected,
        "instances_stored": job.instances_stored, "instances_failed": job.instances_failed,
        "bytes": job.bytes, "destination": str(job.destination.get("name", "")),
        "created": job.created_at.isoformat(), "updated": job.updated_at.isoformat(),
        "cancel_requested": job.cancel_requested,
        "studies": [{"id": s.study_id, "state": s.state, "instances_expected": s.instances_expected,
                     "instances_stored": s.instances_stored, "instances_failed": s.instances_failed,
                     "bytes": s.bytes, "detail": s.detail} for s in job.studies],
        "errors": list(job.errors),
    }


def _status_response(job: Job) -> web.Response:
    status = TransferStatus.model_validate(_status_fields(job))
    response = web.json_response(status.model_dump(mode="json"))
    response.headers["Cache-Control"] = "no-store"
    return response


def _not_found() -> web.Response:
    return _problem(404, ProblemType.NOT_FOUND,
                    "no transfer with this id (finished ones are kept for a while)")


def _internal_error(reason: str, *, event: str = "tlb_timeline_failed",
                    failed: str = "the timeline could not be built") -> web.Response:
    """Called inside ``except``: the traceback goes to the log (through the PHI scrubber, since exception
    text is not DUO's to vouch for); the caller gets the request id and nothing else."""
    log.exception(event, reason=reason)
    return _problem(500, ProblemType.INTERNAL, f"{failed}; quote the request id")


def _check_json(raw: bytes) -> None:
    """One UTF-8 JSON text with no repeated member names and no NaN/Infinity."""

    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        obj: dict[str, Any] = {}
        for key, value in pairs:
            if key in obj:
                raise ValueError("a member name is repeated")
            obj[key] = value
        return obj

    def no_constants(_name: str) -> NoReturn:
        raise ValueError("NaN and Infinity are not JSON")

    try:
        json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constants)
    except UnicodeDecodeError:
        raise _Refusal(400, ProblemType.MALFORMED_JSON, "the body is not UTF-8") from None
    except RecursionError:
        raise _Refusal(400, ProblemType.MALFORMED_JSON, "the body nests too deeply") from None
    except ValueError as exc:  # JSONDecodeError is one
        reason = exc.msg if isinstance(exc, json.JSONDecodeError) else str(exc)
        raise _Refusal(400, ProblemType.MALFORMED_JSON, f"the body is not valid JSON: {reason}") from None


def _refuse_invalid(errors: list[ErrorDetails]) -> NoReturn:
    field_errors = [FieldError(pointer=_pointer(e["loc"]), detail=e["msg"], code=e["type"]) for e in errors]
    kinds = {_kind(e) for e in errors}
    type_ = kinds.pop() if len(kinds) == 1 else ProblemType.INVALID_REQUEST
    shown = "; ".join(f"{f.pointer or '(body)'}: {f.detail}" for f in field_errors[:_DETAIL_ERRORS])
    more = len(field_errors) - _DETAIL_ERRORS
    detail = shown + (f" (and {more} more)" if more > 0 else "")
    raise _Refusal(422, type_, detail, field_errors)


def _kind(error: ErrorDetails) -> ProblemType:
    # An unknown member is a shape problem wherever it sits: "Invalid BSN" would mislead for /patient/x.
    if error["type"] == "extra_forbidden" or not error["loc"]:
        return ProblemType.INVALID_REQUEST
    return _BY_MEMBER.get(str(error["loc"][0]), ProblemType.INVALID_REQUEST)


def _pointer(loc: tuple[int | str, ...]) -> str:
    """RFC 6901: ``~`` and ``/`` inside a member name are escaped, so every pointer resolves."""
    return "".join("/" + str(part).replace("~", "~0").replace("/", "~1") for part in loc)


def _problem(status: int, type_: ProblemType, detail: str,
             errors: Sequence[FieldError] | None = None) -> web.Response:
    request_id = structlog.contextvars.get_contextvars().get("request_id")
    # Built as the model first, so every problem sent is one the documented schema describes.
    problem = Problem(type=type_.value, title=_TITLES[type_], status=status, detail=detail,
                      errors=list(errors) if errors is not None else None,
                      request_id=request_id if isinstance(request_id, str) else None)
    response = web.json_response(problem.model_dump(mode="json", exclude_none=True), status=status,
                                 content_type=PROBLEM_CONTENT_TYPE)
    response.headers["Cache-Control"] = "no-store"
    return response


__all__ = [
    "DEFAULT_MAX_BODY_BYTES", "DEFAULT_SCHEMA_PATH", "TimelineProvider", "TlbApiDoor", "TransferProvider",
]
