"""DICOMweb (PS3.18) under each view's root: what a web viewer needs to show a remote study.

Routes, all under ``{views.dicomweb_path}/{capability}``:

- QIDO-RS: ``studies``, ``studies/{study}/series``, ``studies/{study}/series/{series}/instances``,
  ``studies/{study}/instances`` (``application/dicom+json``; match keys, ``includefield``, ``limit``,
  ``offset``); answered from the view's manifests and the headers of the instances that arrived.
- WADO-RS: ``studies/{study}``, ``.../series/{series}``, ``.../instances/{instance}``
  (``multipart/related; type="application/dicom"``), their ``/metadata``, an instance's
  ``frames/{n[,m…]}`` and ``bulk/{tag}``, and ``rendered`` / ``thumbnail`` (JPEG or PNG) of an instance.

Every route belongs to the TLB client that made the view (``tlb:views.*``, mTLS), and the capability
must be one of that client's open views: anything else is a 404, so a URL seen by someone else
shows nothing, not even that it exists. Instances stream as they arrive from the source; a request
waits only for those it names. Errors are problem+json with PS3.18's status codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import shutil
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, BinaryIO, Final

import structlog
from aiohttp import web
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.config.views import ViewsConfig
from duo_gateway.dicom.convert import convert_in_place, convertible
from duo_gateway.dicom.decode_worker import SharedDecodeWorker
from duo_gateway.dicom.syntaxes import UNCOMPRESSED_LE
from duo_gateway.dicomweb.dicomjson import to_dicom_json
from duo_gateway.dicomweb.multipart import (
    Acceptable,
    MultipartRelated,
    NotAcceptable,
    choose_transfer_syntax,
    covers_dicom_parts,
    parse_accept,
)
from duo_gateway.dicomweb.qido import Level, QidoError, matches, parse_qido, return_tags
from duo_gateway.dicomweb.render import RenderError, frame_bytes, render, thumbnail
from duo_gateway.http.access import caller_of, route_name
from duo_gateway.http.problem import problem_response
from duo_gateway.views.cache import CachedInstance
from duo_gateway.views.feed import InstanceGone, StudyFeed
from duo_gateway.views.service import View, ViewService

log = structlog.get_logger(__name__)

DICOM_JSON: Final = "application/dicom+json"
DICOM: Final = "application/dicom"
_CHUNK: Final = 1024 * 1024
#: Cached instances up to this size are read on the event loop (see ``_file_chunks``).
_READ_ON_LOOP: Final = 4 * 1024 * 1024
#: Headers encoded per hop to a thread in a metadata answer, and QIDO results encoded on the loop.
_METADATA_BATCH: Final = 64
#: Study-level attributes a study answer takes from its first instance (PS3.18 Table 10.6.3-3).
_STUDY_KEYWORDS: Final = (
    "SpecificCharacterSet", "StudyDate", "StudyTime", "AccessionNumber", "ReferringPhysicianName",
    "PatientName", "PatientID", "PatientBirthDate", "PatientSex", "StudyInstanceUID", "StudyID",
    "StudyDescription", "TimezoneOffsetFromUTC",
)
_SERIES_KEYWORDS: Final = (
    "SpecificCharacterSet", "Modality", "SeriesDescription", "SeriesNumber",
    "PerformedProcedureStepStartDate", "PerformedProcedureStepStartTime", "SeriesInstanceUID",
    "BodyPartExamined", "TimezoneOffsetFromUTC",
)
_INSTANCE_KEYWORDS: Final = (
    "SpecificCharacterSet", "SOPClassUID", "SOPInstanceUID", "InstanceNumber", "Rows", "Columns",
    "BitsAllocated", "NumberOfFrames", "TimezoneOffsetFromUTC",
)
#: Media type of a compressed frame per transfer syntax (PS3.18 Table 8.7.3-2).
_FRAME_MEDIA: Final = {
    "1.2.840.10008.1.2.4.50": "image/jpeg", "1.2.840.10008.1.2.4.51": "image/jpeg",
    "1.2.840.10008.1.2.4.57": "image/jpeg", "1.2.840.10008.1.2.4.70": "image/jpeg",
    "1.2.840.10008.1.2.4.80": "image/jls", "1.2.840.10008.1.2.4.81": "image/jls",
    "1.2.840.10008.1.2.4.90": "image/jp2", "1.2.840.10008.1.2.4.91": "image/jp2",
    "1.2.840.10008.1.2.4.201": "image/jphc", "1.2.840.10008.1.2.4.202": "image/jphc",
    "1.2.840.10008.1.2.4.203": "image/jphc", "1.2.840.10008.1.2.5": "image/dicom-rle",
}
#: A refused frame or rendering: a bad parameter, a frame the instance lacks, or data it cannot render.
_RENDER_STATUS: Final = {"parameter": 400, "frame": 404, "unrenderable": 406}

Handler = Callable[[web.Request, View], Awaitable[web.StreamResponse]]
#: Set once a streamed answer's headers are on their way: a failure after that cannot be a problem body.
_STARTED: Final = web.RequestKey("duo.dicomweb.started", bool)


class _Problem(Exception):
    def __init__(self, status: int, detail: str) -> None:
        super().__init__(detail)
        self.status = status
        self.detail = detail


_TITLES: Final = {400: "Bad request", 404: "Not found", 406: "Not acceptable", 500: "Internal error",
                  502: "Source failed", 504: "Source too slow"}


def _problem(status: int, detail: str) -> web.Response:
    response = problem_response(status, _TITLES.get(status, "Refused"), detail)
    response.headers["Cache-Control"] = "no-store"
    return response


class DicomWebDoor:
    name = "views-dicomweb"

    def __init__(self, service: ViewService, cfg: ViewsConfig) -> None:
        self._service = service
        self._cfg = cfg

    def mount(self, app: web.Application) -> None:
        if not self._cfg.enabled:
            return
        root = f"{self._cfg.dicomweb_path}/{{token}}"
        study = f"{root}/studies/{{study}}"
        series = f"{study}/series/{{series}}"
        instance = f"{series}/instances/{{instance}}"
        routes: list[tuple[str, str, Handler]] = [
            ("qido-studies", f"{root}/studies", self._qido_studies),
            ("qido-series", f"{study}/series", self._qido_series),
            ("qido-instances", f"{series}/instances", self._qido_instances),
            ("qido-study-instances", f"{study}/instances", self._qido_instances),
            ("study", study, self._retrieve),
            ("series", series, self._retrieve),
            ("instance", instance, self._retrieve),
            ("study-metadata", f"{study}/metadata", self._metadata),
            ("series-metadata", f"{series}/metadata", self._metadata),
            ("instance-metadata", f"{instance}/metadata", self._metadata),
            ("frames", f"{instance}/frames/{{frames}}", self._frames),
            ("bulk", f"{instance}/bulk/{{tag}}", self._bulk),
            ("rendered", f"{instance}/rendered", self._rendered),
            ("frame-rendered", f"{instance}/frames/{{frames}}/rendered", self._rendered),
            ("thumbnail", f"{instance}/thumbnail", self._rendered),
        ]
        for name, path, handler in routes:
            app.router.add_get(path, self._guarded(handler), name=route_name("tlb", f"views.dicomweb-{name}"))
            app.router.add_route("OPTIONS", path, self._preflight,
                                 name=route_name("tlb", f"views.dicomweb-{name}-options"))

    # -- the guard: capability, client, CORS, errors ------------------------------------------
    def _guarded(self, handler: Handler) -> Callable[[web.Request], Awaitable[web.StreamResponse]]:
        async def guarded(request: web.Request) -> web.StreamResponse:
            client = caller_of(request).tlb
            view = self._service.by_token(request.match_info["token"], client.name) if client else None
            try:
                if view is None:
                    raise _Problem(404, "no such view (it may have expired or been deleted)")
                response = await handler(request, view)
            except _Problem as problem:
                response = _problem(problem.status, problem.detail)
            except NotAcceptable as exc:
                response = _problem(406, str(exc) or "none of the accepted media types can be served")
            except (ConnectionError, asyncio.CancelledError):
                raise  # the viewer went away: nothing to answer
            except Exception:
                # Before the answer started, DUO's own failure is a 500 with a request id; after it,
                # aiohttp drops the connection, so a truncated answer is never taken for a whole one.
                log.exception("dicomweb_failed", route=request.match_info.route.name)
                if request.get(_STARTED):
                    raise
                response = _problem(500, "DUO failed answering this request; quote the request id")
            self._cors(request, response)
            return response

        return guarded

    async def _preflight(self, request: web.Request) -> web.StreamResponse:
        response = web.Response(status=204)
        self._cors(request, response)
        if "Access-Control-Allow-Origin" in response.headers:
            response.headers["Access-Control-Allow-Methods"] = "GET, OPTIONS"
            response.headers["Access-Control-Allow-Headers"] = "Accept, Authorization, Content-Type"
            response.headers["Access-Control-Max-Age"] = "600"
        return response

    def _cors(self, request: web.Request, response: web.StreamResponse) -> None:
        origin = request.headers.get("Origin")
        if origin is None or origin not in self._cfg.cors_origins or response.prepared:
            return
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Allow-Credentials"] = "true"
        response.headers["Access-Control-Expose-Headers"] = "Content-Type, Content-Length, Warning"
        response.headers["Vary"] = "Origin"

    def _started(self, request: web.Request, response: web.StreamResponse) -> web.StreamResponse:
        """CORS on a streamed answer must be set before it is prepared."""
        request[_STARTED] = True
        self._cors(request, response)
        response.headers["Cache-Control"] = "no-store"
        return response

    # -- scope -----------------------------------------------------------------------------
    def _root(self, request: web.Request) -> str:
        return f"{request.scheme}://{request.host}{self._cfg.dicomweb_path}/{request.match_info['token']}"

    def _feed(self, request: web.Request, view: View) -> StudyFeed:
        feed = view.feeds.get(request.match_info["study"])
        if feed is None:
            raise _Problem(404, "this view holds no such study")
        return feed

    def _scope(self, request: web.Request, view: View) -> tuple[StudyFeed, list[str]]:
        """The study's feed and the SOP Instance UIDs the route names, in series order."""
        feed = self._feed(request, view)
        series = request.match_info.get("series")
        instance = request.match_info.get("instance")
        if series is None:
            return feed, [uid for members in feed.series.values() for uid in members]
        members = feed.series.get(series)
        if members is None:
            raise _Problem(404, "the study holds no such series")
        if instance is None:
            return feed, list(members)
        if instance not in members:
            raise _Problem(404, "the series holds no such instance")
        return feed, [instance]

    # -- QIDO-RS -------------------------------------------------------------------------------
    async def _qido_studies(self, request: web.Request, view: View) -> web.StreamResponse:
        query = self._qido(request, "study")
        found = []
        for uid, feed in view.feeds.items():
            ds = await self._study_attributes(feed)
            ds.RetrieveURL = f"{self._root(request)}/studies/{uid}"
            found.append(ds)
        return await self._qido_answer(request, query, found)

    async def _qido_series(self, request: web.Request, view: View) -> web.StreamResponse:
        query = self._qido(request, "series")
        feed = self._feed(request, view)
        found = []
        for series_uid, members in feed.series.items():
            header = await feed.any_header(members)
            ds = _pick(header, _SERIES_KEYWORDS)
            ds.SeriesInstanceUID = series_uid
            ds.NumberOfSeriesRelatedInstances = len(members)
            ds.RetrieveURL = f"{self._root(request)}/studies/{feed.study_uid}/series/{series_uid}"
            found.append(ds)
        return await self._qido_answer(request, query, found)

    async def _qido_instances(self, request: web.Request, view: View) -> web.StreamResponse:
        query = self._qido(request, "instance")
        feed, uids = self._scope(request, view)
        await feed.read_headers(set(uids))  # those that arrived, in one hop
        found = []
        for uid in uids:
            expected = feed.expected[uid]
            ds = _pick(await feed.known_header(uid), _INSTANCE_KEYWORDS)
            ds.SOPClassUID = ds.get("SOPClassUID") or expected.sop_class_uid
            ds.SOPInstanceUID = uid
            ds.SeriesInstanceUID = expected.series_instance_uid
            ds.StudyInstanceUID = feed.study_uid
            ds.RetrieveURL = (f"{self._root(request)}/studies/{feed.study_uid}/series/"
                              f"{expected.series_instance_uid}/instances/{uid}")
            found.append(ds)
        return await self._qido_answer(request, query, found)

    def _qido(self, request: web.Request, level: Level) -> Any:
        try:
            return parse_qido(list(request.query.items()), level)
        except QidoError as exc:
            raise _Problem(400, str(exc)) from None

    async def _qido_answer(self, request: web.Request, query: Any,
                           found: list[Dataset]) -> web.StreamResponse:
        hits = [ds for ds in found if matches(query, ds)]
        hits = hits[query.offset:]
        if query.limit is not None:
            hits = hits[:query.limit]
        tags = return_tags(query)
        if tags is not None:
            tags = frozenset(tags | {0x00081190})  # RetrieveURL
        body = (await asyncio.to_thread(_qido_json, hits, tags) if len(hits) > _METADATA_BATCH
                else _qido_json(hits, tags))
        response = web.Response(body=body, content_type=DICOM_JSON)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _study_attributes(self, feed: StudyFeed) -> Dataset:
        first = await feed.any_header([uid for members in feed.series.values() for uid in members[:1]])
        ds = _pick(first, _STUDY_KEYWORDS)
        ds.StudyInstanceUID = feed.study_uid
        # A series has one modality: the first instance of each that arrived says it.
        firsts = [next((u for u in members if feed.arrived(u)), None) for members in feed.series.values()]
        modalities = sorted({str(h.Modality) for uid in firsts if uid is not None
                             and (h := await feed.known_header(uid)) is not None and h.get("Modality")})
        if modalities:
            ds.ModalitiesInStudy = modalities
        ds.NumberOfStudyRelatedSeries = len(feed.series)
        ds.NumberOfStudyRelatedInstances = len(feed.expected)
        return ds

    # -- WADO-RS -------------------------------------------------------------------------------
    async def _retrieve(self, request: web.Request, view: View) -> web.StreamResponse:
        feed, uids = self._scope(request, view)
        accepted = _accepting(request)
        writer: MultipartRelated | None = None
        response: web.StreamResponse | None = None
        sent = 0
        for uid in uids:
            try:
                entry = await feed.instance(uid)
            except InstanceGone as exc:
                log.info("view_instance_not_served", reason=str(exc))
                continue
            except TimeoutError:
                if response is None:
                    raise _Problem(504, "the source did not deliver the instance in time") from None
                break
            try:
                if not entry.transfer_syntax_uid:
                    await feed.read_headers()  # a spooled file from a community: its meta says
                syntax = _syntax_for(accepted, entry.transfer_syntax_uid)
                if syntax is None:
                    if response is None and sent == 0 and len(uids) == 1:
                        raise NotAcceptable("the instance cannot be served in an accepted transfer syntax")
                    log.info("view_instance_not_convertible", stored=entry.transfer_syntax_uid)
                    continue
                converted = None
                if syntax != entry.transfer_syntax_uid:
                    converted = await asyncio.to_thread(_converted, entry, syntax, self._service.decoder)
                    if converted is None:
                        if response is None and len(uids) == 1:
                            raise NotAcceptable("the instance could not be converted losslessly")
                        continue
                if response is None:
                    writer = MultipartRelated(DICOM)
                    response = self._started(request, web.StreamResponse(
                        status=200, headers={"Content-Type": writer.content_type}))
                    await response.prepare(request)
                assert writer is not None
                await response.write(writer.part_head(f'{DICOM}; transfer-syntax={syntax}'))
                if converted is not None:
                    await response.write(converted)
                else:
                    async for chunk in _file_chunks(entry):
                        await response.write(chunk)
                await response.write(writer.PART_END)
                sent += 1
            finally:
                self._service.cache.done_reading(entry)
        if response is None:
            raise _Problem(502, "none of the instances could be fetched from the source")
        assert writer is not None
        await response.write(writer.end())
        await response.write_eof()
        return response

    async def _metadata(self, request: web.Request, view: View) -> web.StreamResponse:
        feed, uids = self._scope(request, view)
        root = self._root(request)
        response: web.StreamResponse | None = None
        batch: list[tuple[Dataset, str]] = []
        first = True

        async def flush() -> None:
            # Encoding is ~1 ms an instance: a batch at a time in a thread, never a series on the loop.
            nonlocal response, first
            encoded = await asyncio.to_thread(_metadata_items, batch)
            batch.clear()
            if response is None:
                response = self._started(request, web.StreamResponse(status=200,
                                                                      headers={"Content-Type": DICOM_JSON}))
                await response.prepare(request)
                await response.write(b"[")
            for item in encoded:
                await response.write((b"" if first else b",") + item)
                first = False

        for uid in uids:
            try:
                header = await feed.header(uid)
            except InstanceGone:
                continue
            except TimeoutError:
                if response is None and not batch:
                    raise _Problem(504, "the source did not deliver the instance in time") from None
                break
            batch.append((header, f"{root}/studies/{feed.study_uid}/series/"
                                  f"{feed.expected[uid].series_instance_uid}/instances/{uid}"))
            if len(batch) >= _METADATA_BATCH:
                await flush()
        if batch:
            await flush()
        if response is None:
            raise _Problem(502, "none of the instances could be fetched from the source")
        await response.write(b"]")
        await response.write_eof()
        return response

    async def _frames(self, request: web.Request, view: View) -> web.StreamResponse:
        feed, uids = self._scope(request, view)
        numbers = _frame_numbers(request.match_info["frames"])
        ds, _entry = await self._dataset(feed, uids[0])
        stored = str(ds.file_meta.TransferSyntaxUID)
        media = "application/octet-stream" if stored in UNCOMPRESSED_LE else _FRAME_MEDIA.get(stored)
        if media is None:
            raise NotAcceptable(f"frames of {stored} data are not served")
        try:
            frames = [await asyncio.to_thread(frame_bytes, ds, n) for n in numbers]
        except RenderError as exc:
            raise _Problem(_RENDER_STATUS[exc.reason], str(exc)) from None
        writer = MultipartRelated(media, transfer_syntax=stored)
        parts = [writer.part_head(f"{media}; transfer-syntax={stored}") + f + writer.PART_END for f in frames]
        response = web.Response(body=b"".join(parts) + writer.end())
        response.headers["Content-Type"] = writer.content_type
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _bulk(self, request: web.Request, view: View) -> web.StreamResponse:
        feed, uids = self._scope(request, view)
        try:
            tag = int(request.match_info["tag"], 16)
        except ValueError:
            raise _Problem(404, "bulk data is addressed by one top-level tag") from None
        ds, _entry = await self._dataset(feed, uids[0])
        if tag not in ds:
            raise _Problem(404, "the instance has no such element")
        value = ds[tag].value
        if not isinstance(value, bytes):
            raise _Problem(404, "the element is not bulk data")
        writer = MultipartRelated("application/octet-stream")
        body = writer.part_head("application/octet-stream") + value + writer.PART_END + writer.end()
        response = web.Response(body=body)
        response.headers["Content-Type"] = writer.content_type
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _rendered(self, request: web.Request, view: View) -> web.StreamResponse:
        feed, uids = self._scope(request, view)
        media = _image_media(request.headers.get("Accept"))
        ds, _entry = await self._dataset(feed, uids[0])
        try:
            if request.path.endswith("/thumbnail"):
                size = _int_query(request, "size", 128, 16, 1024)
                data = await asyncio.to_thread(thumbnail, ds, media, size=size)
            else:
                frames = request.match_info.get("frames")
                frame = _frame_numbers(frames)[0] if frames else 1
                viewport = _viewport(request.query.get("viewport"))
                quality = _int_query(request, "quality", 90, 1, 100)
                data = await asyncio.to_thread(render, ds, frame, media, viewport=viewport, quality=quality,
                                               window=_window(request.query.get("window")))
        except RenderError as exc:
            raise _Problem(_RENDER_STATUS[exc.reason], str(exc)) from None
        response = web.Response(body=data, content_type=media)
        response.headers["Cache-Control"] = "no-store"
        return response

    async def _dataset(self, feed: StudyFeed, uid: str) -> tuple[Dataset, CachedInstance]:
        """The whole instance, pixels included, read once for a frame, bulk or rendered answer."""
        try:
            entry = await feed.instance(uid)
        except InstanceGone as exc:
            raise _Problem(502, f"the source did not deliver the instance: {exc}") from None
        except TimeoutError:
            raise _Problem(504, "the source did not deliver the instance in time") from None
        try:
            return await asyncio.to_thread(dcmread, entry.path), entry
        finally:
            self._service.cache.done_reading(entry)


# -- helpers -----------------------------------------------------------------------------------


def _qido_json(hits: list[Dataset], tags: frozenset[int] | None) -> bytes:
    return json.dumps([to_dicom_json(ds, include=tags) for ds in hits], separators=(",", ":")).encode()


def _metadata_items(batch: list[tuple[Dataset, str]]) -> list[bytes]:
    """Each header's DICOM JSON, bulk data by URI under its instance's URL, Pixel Data as its frames."""
    out = []
    for header, base in batch:
        item = to_dicom_json(header, bulk_uri=_bulk_uri(base))
        if "7FE00010" not in item:
            frames = ",".join(str(n) for n in range(1, int(header.get("NumberOfFrames", 1) or 1) + 1))
            item["7FE00010"] = {"vr": "OW", "BulkDataURI": f"{base}/frames/{frames}"}
        out.append(json.dumps(item, separators=(",", ":")).encode())
    return out


def _bulk_uri(base: str) -> Callable[[str], str]:
    def uri(path: str) -> str:
        return f"{base}/bulk/{path}"

    return uri


def _pick(header: Dataset | None, keywords: Sequence[str]) -> Dataset:
    ds = Dataset()
    if header is None:
        return ds
    for keyword in keywords:
        if keyword in header:
            ds[keyword] = header[keyword]
    return ds


def _accepting(request: web.Request) -> list[Acceptable]:
    """The Accept header's ranges, when one admits application/dicom parts (none: the default)."""
    accepted = parse_accept(request.headers.get("Accept"))
    if accepted and not any(covers_dicom_parts(a) for a in accepted):
        raise NotAcceptable(f'this resource is multipart/related; type="{DICOM}"')
    return accepted


def _syntax_for(accepted: list[Acceptable], stored: str) -> str | None:
    try:
        # The contract: a range without transfer-syntax gets the syntax as stored.
        return choose_transfer_syntax(accepted, stored, convertible=convertible, unnamed="*")
    except NotAcceptable:
        return None


def _converted(entry: CachedInstance, syntax: str, decoder: SharedDecodeWorker) -> bytes | None:
    """The instance in ``syntax`` (dicom/convert's rule: nothing lost), from a copy of the cached file;
    None when it cannot be converted after all (a corrupt stream, a decoder that gave up)."""
    copy = entry.path.with_name(f".serve-{secrets.token_hex(4)}-{entry.path.name}")
    try:
        shutil.copyfile(entry.path, copy)
        why = convert_in_place(copy, [syntax], decoder)
        if why is not None:
            log.info("view_instance_not_converted", reason=why)
            return None
        return copy.read_bytes()
    finally:
        copy.unlink(missing_ok=True)


async def _file_chunks(entry: CachedInstance) -> AsyncIterator[bytes]:
    """The cached file. An instance of a few MB, just written into the page cache by the feed, is read
    on the loop, as the feed wrote it: a hop to a thread waits for the GIL's switch interval (5 ms)
    whenever the loop is busy, which per instance was most of a study's serving time. A larger one
    is read in chunks in a thread."""
    if entry.size <= _READ_ON_LOOP:
        yield entry.path.read_bytes()
        return
    fh: BinaryIO = await asyncio.to_thread(entry.path.open, "rb")
    try:
        while chunk := await asyncio.to_thread(fh.read, _CHUNK):
            yield chunk
    finally:
        with contextlib.suppress(OSError):
            await asyncio.to_thread(fh.close)


def _frame_numbers(raw: str) -> list[int]:
    try:
        numbers = [int(part) for part in raw.split(",")]
    except ValueError:
        raise _Problem(400, "frames are 1-based numbers separated by commas") from None
    if not numbers or any(n < 1 for n in numbers) or len(numbers) > 10_000:
        raise _Problem(400, "frames are 1-based numbers separated by commas")
    return numbers


def _image_media(accept: str | None) -> str:
    if not accept:
        return "image/jpeg"
    try:
        accepted = parse_accept(accept)
    except NotAcceptable:
        raise _Problem(400, "the Accept header is malformed") from None
    for a in accepted:
        if a.media_type in ("image/jpeg", "image/png"):
            return a.media_type
        if a.media_type in ("*/*", "image/*"):
            return "image/jpeg"
    raise NotAcceptable("rendered images are image/jpeg or image/png")


def _int_query(request: web.Request, name: str, default: int, low: int, high: int) -> int:
    raw = request.query.get(name)
    if raw is None:
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _Problem(400, f"{name} must be a whole number from {low} to {high}")
    return int(raw)


def _viewport(raw: str | None) -> tuple[int, int] | None:
    if raw is None:
        return None
    parts = raw.split(",")
    if len(parts) < 2 or not all(p.isdigit() and 0 < int(p) <= 4096 for p in parts[:2]):
        raise _Problem(400, "viewport is columns,rows (1-4096 each)")
    return int(parts[0]), int(parts[1])


def _window(raw: str | None) -> tuple[float, float] | None:
    if raw is None:
        return None
    parts = raw.split(",")
    try:
        center, width = float(parts[0]), float(parts[1])
    except (IndexError, ValueError):
        raise _Problem(400, "window is center,width[,function]") from None
    if width <= 0:
        raise _Problem(400, "window width must be positive")
    return center, width


__all__ = ["DicomWebDoor"]
