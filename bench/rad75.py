"""RAD-75 of one large study through DUO against DCMTK getscu from the same PACS, in the same run.

Baseline: DCMTK ``getscu`` pulls the study straight from Orthanc into a directory (TCP_NODELAY=1), the
fastest way this machine moves it (docs/dicom.md §2). Measured: one RAD-75 request naming every
instance of the study, sent as MTOM with a signed XUA assertion to DUO, which asks Mitz, C-GETs the
study from the same Orthanc and answers MTOM; the client streams the answer, splitting the parts on
the fly and keeping only each part's first bytes, so the client's memory does not depend on the study.

DUO runs in a process of its own so that its peak RSS (VmHWM, reset just before the request) is
DUO's alone; the client, the spool watcher and the getscu baseline run here, Mitz in a peers process.
DUO answers an MTOM RAD-75 as the instances arrive, envelope last (issue 14): the time to the first
response byte is set against the C-FINDs and consent DUO did first (their durations from its /metrics),
and the spool's high-water mark is read from DUO's own metric (what its byte window held at most,
in memory or in files); the spool directory is sampled from outside as well, where anything spilled
to files (xca_responding.retrieve_memory spent) would show.

Correctness is checked, never assumed: every instance of the study must arrive exactly once, under its
own SOP Instance UID and study, with a dataset exactly as long as the generated file's, in both paths.

Usage: python -m bench.rad75 [--mb 500] [--size 512] [--series 4] [--load-jobs 2] [--repeat 1]
                             [--window 64MiB]

Ends with one line ``RESULT {json}``: ``ratio_getscu`` (DUO's MB/s ÷ getscu's), ``first_byte_s`` (request
to first response byte), ``lookups_s`` (DUO's C-FINDs and Mitz before the C-GET, from its /metrics),
``first_byte_after_lookups_s``, ``spool_high_water_mib`` (DUO's metric), ``window_mib``, and more.
"""

from __future__ import annotations

import argparse
import array
import asyncio
import json
import os
import resource
import shutil
import subprocess
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path

import aiohttp
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian, generate_uid

from bench._harness import (
    Child,
    XdsCaller,
    consenting_patient,
    dir_usage,
    duo_config,
    exit_on_sigterm,
    histogram_deltas,
    median,
    missing_tools,
    network,
    parse_metrics,
    proc_status_kib,
    reset_peak_rss,
    run_in_workdir,
    start_duo,
)
from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.network import DUO_HOME_COMMUNITY_ID, HOST
from duo_gateway.sim.pki import make_pki
from duo_gateway.sim.studies import generate_studies
from duo_gateway.soap.envelope import parse_envelope
from duo_gateway.soap.mtom import (
    XOP_NS,
    MessageEnd,
    MtomError,
    MtomParser,
    NeedData,
    PartData,
    PartEnd,
    PartStart,
    multipart_related,
    normalise_cid,
    parse_content_type,
)
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca.codes import Action, ResponseStatus
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    parse_retrieve_response,
)

ENV = {**os.environ, "TCP_NODELAY": "1"}
HEAD_BYTES = 16 * 1024
TAIL_BYTES = 64
MB = 1e6
MIB = 1024 * 1024


class BrokenTransfer(AssertionError):
    """A path delivered something other than the study: no number may be printed for it."""


# -- the study -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    uid: str
    folder: Path
    #: series UID → SOP Instance UIDs, in order
    series: dict[str, list[str]]
    sops: frozenset[str]
    #: every instance carries these pixels (so any delivered byte range can be compared)
    pixels: bytes
    total_bytes: int

    @property
    def count(self) -> int:
        return len(self.sops)


def make_study(folder: Path, megabytes: float, size: int, series_count: int) -> Study:
    """One CT study of about ``megabytes``: a generated CT header cloned with fresh UIDs (dicom.md §5).

    The pixels are a cheap deterministic ramp; only the size matters to a transfer. One subfolder per
    series so the study can be loaded into Orthanc by several storescu processes at once.
    """
    net = network()
    patient = consenting_patient(net)
    template = next(ds for st in generate_studies(patient, net.hospitals[0], 12, net.seed, image_size=8)
                    for ds in st.instances if ds.Modality == "CT")
    ds: Dataset = template
    ds.Rows = ds.Columns = size
    ds.PixelSpacing = [round(400 / size, 4)] * 2
    pixels = array.array("H", (i * 7 % 4096 for i in range(size * size))).tobytes()
    ds.PixelData = pixels
    count = max(1, round(megabytes * MB / (len(pixels) + 2048)))
    ds.StudyInstanceUID = generate_uid()
    series: dict[str, list[str]] = {}
    total = 0
    series_uids = [generate_uid() for _ in range(series_count)]
    for i in range(count):
        s = i * series_count // count
        ds.SeriesInstanceUID = series_uids[s]
        ds.SeriesNumber = s + 1
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        ds.ImagePositionPatient = [-200, -200, -100 + i]
        ds.SliceLocation = -100 + i
        path = folder / f"s{s}" / f"{i:06d}.dcm"
        path.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        series.setdefault(str(ds.SeriesInstanceUID), []).append(str(ds.SOPInstanceUID))
        total += path.stat().st_size
    sops = frozenset(u for uids in series.values() for u in uids)
    return Study(str(ds.StudyInstanceUID), folder, series, sops, pixels, total)


_PIXEL_TAG = b"\xe0\x7f\x10\x00"


def check_instance(study: Study, head: bytes, tail: bytes, size: int, seen: set[str],
                   expect_sop: str | None = None) -> str:
    """One delivered instance: this study, a wanted SOP instance not seen before, and its Pixel Data
    exactly the generated length, ending the object, with the generated bytes at both ends.

    Header encodings legitimately differ between paths (DCMTK and pynetdicom write sequences and the
    meta group differently), so lengths are checked on the Pixel Data, not the whole object.
    """
    header = dcmread(BytesIO(head), stop_before_pixels=True)
    sop = str(header.SOPInstanceUID)
    if expect_sop is not None and sop != expect_sop:
        raise BrokenTransfer(f"part for {expect_sop} holds {sop}")
    if str(header.StudyInstanceUID) != study.uid or sop not in study.sops:
        raise BrokenTransfer(f"instance {sop} is not one of the study's")
    if sop in seen:
        raise BrokenTransfer(f"instance {sop} delivered twice")
    syntax = str(header.file_meta.TransferSyntaxUID)
    at = head.find(_PIXEL_TAG)  # the ramp never holds 0x7FE0, so the first hit is the element
    value_at = at + (8 if syntax == ImplicitVRLittleEndian else 12)
    if at < 0 or len(head) < value_at + 64:
        raise BrokenTransfer(f"instance {sop}: no Pixel Data in the first {len(head)} bytes")
    length = int.from_bytes(head[value_at - 4:value_at], "little")
    if length != len(study.pixels) or size != value_at + length:
        raise BrokenTransfer(f"instance {sop}: {size} bytes with Pixel Data of {length} at {value_at}")
    start = head[value_at:]
    if start != study.pixels[: len(start)] or not study.pixels.endswith(tail):
        raise BrokenTransfer(f"instance {sop}: Pixel Data differs from the generated")
    seen.add(sop)
    return syntax


def check_complete(study: Study, seen: set[str], path: str) -> None:
    if len(seen) != study.count:
        raise BrokenTransfer(f"{path}: {len(seen)} of {study.count} instances")


# -- loading and the baseline ------------------------------------------------------------------------


def load_into_orthanc(study: Study, ae_title: str, port: int, jobs: int) -> float:
    """storescu +sd per series folder, ``jobs`` at a time; returns seconds."""
    started = time.perf_counter()
    folders = sorted(p for p in study.folder.iterdir() if p.is_dir())
    for first in range(0, len(folders), jobs):
        procs = [subprocess.Popen(["storescu", "-aet", "BENCH", "-aec", ae_title, "+sd", HOST,
                                   str(port), str(f)], env=ENV, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE) for f in folders[first:first + jobs]]
        for p in procs:
            _out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"storescu failed: {err[-2000:]!r}")
    return time.perf_counter() - started


def getscu(study: Study, ae_title: str, port: int, out: Path) -> tuple[float, str]:
    """The baseline: DCMTK getscu of the whole study into ``out``; verified, then removed."""
    out.mkdir(parents=True)
    try:
        started = time.perf_counter()
        subprocess.run(["getscu", "-S", "-aet", "BENCH", "-aec", ae_title, "-od", str(out),
                        "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
                        HOST, str(port)], check=True, env=ENV, capture_output=True)
        elapsed = time.perf_counter() - started
        seen: set[str] = set()
        syntax = ""
        for path in out.iterdir():
            size = path.stat().st_size
            with path.open("rb") as fh:
                head = fh.read(HEAD_BYTES)
                fh.seek(max(0, size - TAIL_BYTES))
                tail = fh.read()
            syntax = check_instance(study, head, tail, size, seen)
        check_complete(study, seen, "getscu")
        return elapsed, syntax
    finally:
        shutil.rmtree(out, ignore_errors=True)


# -- the RAD-75 client -------------------------------------------------------------------------------


@dataclass
class Part:
    headers: dict[str, str]
    #: The SOAP envelope: the part named by ``start`` (DUO sends it last), or the first without it.
    is_root: bool = False
    size: int = 0
    head: bytearray = field(default_factory=bytearray)
    tail: bytes = b""


class MtomSplitter:
    """Reads the answer with the gateway's own incremental MIME reader (:class:`MtomParser`, fed each
    network read), keeping each part's size and first and last bytes only (the whole root part, the
    SOAP envelope), so memory does not grow with the study. Only the limits are the bench's: a study
    may have more parts and larger ones than DUO accepts from a peer by default."""

    def __init__(self, content_type: str, root_limit: int = 64 << 20) -> None:
        related = multipart_related(content_type)
        if related is None:
            raise BrokenTransfer(f"not a multipart/related answer: {content_type}")
        self._parser = MtomParser(related, max_parts=1 << 20, max_part_bytes=1 << 40,
                                  max_root_bytes=root_limit)
        self._root_limit = root_limit
        self.parts: list[Part] = []
        self._current: Part | None = None
        self.done = False
        #: perf_counter() when the first attachment was complete in the client
        self.first_part_at: float | None = None

    def feed(self, chunk: bytes) -> None:
        self._parser.feed(chunk)
        self._drain()

    def end(self) -> None:
        """The body ended: a message without its close delimiter is refused here."""
        self._parser.end()
        self._drain()

    def _drain(self) -> None:
        while not self.done:  # after MessageEnd the parser repeats it: stop there
            try:
                event = self._parser.next_event()
            except MtomError as exc:
                raise BrokenTransfer(f"the MTOM answer is broken: {exc}") from exc
            if isinstance(event, NeedData):
                return
            if isinstance(event, PartStart):
                self._current = Part(dict(event.headers), event.is_root)
                self.parts.append(self._current)
            elif isinstance(event, PartData):
                self._body(event.data)
            elif isinstance(event, PartEnd):
                if self._current is not None and not self._current.is_root and self.first_part_at is None:
                    self.first_part_at = time.perf_counter()
                self._current = None
            elif isinstance(event, MessageEnd):
                self.done = True

    def _body(self, data: bytes) -> None:
        part = self._current
        if part is None or not data:
            return
        part.size += len(data)
        part.tail = (part.tail + data[-TAIL_BYTES:])[-TAIL_BYTES:]
        limit = self._root_limit if part.is_root else HEAD_BYTES
        if len(part.head) < limit:
            part.head += data[: limit - len(part.head)]


class SpoolWatcher(threading.Thread):
    """Samples DUO's spool directory while the request runs: high-water bytes/files and when."""

    def __init__(self, spool: Path, interval_s: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.spool = spool
        self.interval_s = interval_s
        self.peak_bytes = self.peak_files = 0
        self.peak_at = 0.0
        self.started = time.perf_counter()
        self._halt = threading.Event()

    def run(self) -> None:
        while not self._halt.wait(self.interval_s):
            used, files = dir_usage(self.spool)
            if used > self.peak_bytes:
                self.peak_bytes, self.peak_at = used, time.perf_counter() - self.started
            self.peak_files = max(self.peak_files, files)

    def stop(self) -> None:
        self._halt.set()
        self.join()


@dataclass
class Rad75Result:
    seconds: float
    first_byte_s: float
    first_part_s: float
    wire_bytes: int
    syntax: str
    peak_rss_kib: int
    idle_rss_kib: int
    spool_peak_bytes: int
    spool_peak_files: int
    spool_peak_at: float
    spool_after_files: int
    #: (peer, operation) → (calls, seconds) inside DUO during the request, from its /metrics
    peers: dict[tuple[str, ...], tuple[float, float]]
    #: DUO's own account of its spool: the byte window's high-water mark and the window (bytes)
    duo_spool_high_water: float
    duo_window: float
    chunked: bool


async def rad75(study: Study, url: str, caller: XdsCaller, duo_pid: int, spool: Path,
                repository: str) -> Rad75Result:
    req = RetrieveImagingDocumentSetRequest(
        studies=(StudyRequest(study.uid, tuple(
            SeriesRequest(se, tuple(DocumentRequest(repository, sop, DUO_HOME_COMMUNITY_ID) for sop in sops))
            for se, sops in study.series.items())),),
        transfer_syntaxes=(ExplicitVRLittleEndian, ImplicitVRLittleEndian))
    prepared = caller.request(url, Action.RAD75, build_imaging_retrieve_request(req), mtom=True)
    idle = proc_status_kib(duo_pid)["VmRSS"]
    if not reset_peak_rss(duo_pid):
        raise RuntimeError("cannot reset DUO's peak RSS (/proc/<pid>/clear_refs)")
    watcher = SpoolWatcher(spool)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=600)
    metrics_url = url.split("/xca/")[0] + "/metrics"
    try:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            async with session.get(metrics_url) as m:
                before = parse_metrics(await m.text())
            watcher.start()
            started = time.perf_counter()
            watcher.started = started
            async with session.post(url, data=prepared.body,
                                    headers={"Content-Type": prepared.content_type}) as r:
                first_byte = time.perf_counter() - started
                chunked = r.headers.get("Transfer-Encoding", "").lower() == "chunked"
                mime, params = parse_content_type(r.headers.get("Content-Type", ""))
                if r.status != 200 or mime != "multipart/related" or "boundary" not in params:
                    raise BrokenTransfer(f"HTTP {r.status} {mime}: {(await r.content.read(2000))!r}")
                splitter = MtomSplitter(r.headers.get("Content-Type", ""))
                wire = 0
                async for chunk in r.content.iter_chunked(1 << 20):
                    wire += len(chunk)
                    splitter.feed(chunk)
                splitter.end()
            elapsed = time.perf_counter() - started
            async with session.get(metrics_url) as m:
                after = parse_metrics(await m.text())
    finally:
        if watcher.is_alive():
            watcher.stop()
    peak = proc_status_kib(duo_pid)["VmHWM"]
    if not splitter.done:
        raise BrokenTransfer("the MTOM body ended without its closing delimiter")
    after_files = dir_usage(spool)[1]
    for _ in range(40):  # the spool is removed once the last byte is written; give it a moment
        if after_files == 0:
            break
        await asyncio.sleep(0.05)
        after_files = dir_usage(spool)[1]
    syntax = verify_answer(study, splitter.parts)
    peers = histogram_deltas(before, after, "duo_peer_request_duration_seconds", ("peer", "operation"))
    first_part = (splitter.first_part_at or started) - started
    return Rad75Result(elapsed, first_byte, first_part, wire, syntax, peak, idle, watcher.peak_bytes,
                       watcher.peak_files, watcher.peak_at, after_files, peers,
                       _gauge(after, "duo_retrieve_spool_last_high_water_bytes"),
                       _gauge(after, "duo_retrieve_spool_window_bytes"), chunked)


def _gauge(samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str) -> float:
    """A per-peer gauge of DUO's (one PACS here); NaN where DUO does not export it."""
    values = [v for (n, _labels), v in samples.items() if n == name]
    return max(values) if values else float("nan")


def verify_answer(study: Study, parts: Sequence[Part]) -> str:
    """Success, one DocumentResponse per instance, and each part the very instance its cid names.

    The envelope is the part ``start`` names wherever it is (DUO streams it last)."""
    roots = [p for p in parts if p.is_root]
    if len(roots) != 1:
        raise BrokenTransfer(f"{len(roots)} root parts")
    root = roots[0]
    attachments = [p for p in parts if not p.is_root]
    env = parse_envelope(parse_xml(bytes(root.head), max_bytes=len(root.head) + 1))
    assert env.body is not None
    by_cid = {normalise_cid(p.headers.get("content-id", "")): p for p in attachments}
    includes = {}
    for doc in env.body.iter("{urn:ihe:iti:xds-b:2007}DocumentResponse"):
        inc = next(doc.iter(f"{{{XOP_NS}}}Include"), None)
        if inc is None:
            raise BrokenTransfer("a DocumentResponse without xop:Include")
        uid = (doc.findtext("{urn:ihe:iti:xds-b:2007}DocumentUniqueId") or "").strip()
        includes[uid] = normalise_cid(inc.get("href", ""))
    # parse_retrieve_response needs the bytes of every part; give it empty stand-ins for the status.
    resp = parse_retrieve_response(env.body, dict.fromkeys(by_cid, b""))
    if resp.status != ResponseStatus.SUCCESS or resp.errors:
        raise BrokenTransfer(f"status {resp.status}, errors {[e.code_context for e in resp.errors][:3]}")
    if len(includes) != study.count or len(by_cid) != study.count:
        raise BrokenTransfer(f"{len(includes)} DocumentResponses, {len(by_cid)} parts for {study.count}")
    seen: set[str] = set()
    syntax = ""
    for uid, cid in includes.items():
        part = by_cid.get(cid)
        if part is None:
            raise BrokenTransfer(f"no part for {uid}")
        syntax = check_instance(study, bytes(part.head), part.tail, part.size, seen, expect_sop=uid)
    check_complete(study, seen, "RAD-75")
    return syntax


# -- main -------------------------------------------------------------------------------------------


def syntax_name(uid: str) -> str:
    names = {str(ExplicitVRLittleEndian): "Explicit VR LE", str(ImplicitVRLittleEndian): "Implicit VR LE"}
    return names.get(uid, uid)


async def amain(args: argparse.Namespace, work: Path) -> int:
    from tests.support.orthanc import run_orthanc  # the project's Orthanc runner (TCP_NODELAY=1)

    t0 = time.perf_counter()
    study = await asyncio.to_thread(make_study, work / "study", args.mb, args.size, args.series)
    generated_s = time.perf_counter() - t0
    net = network()
    hospital = net.hospitals[0]
    peers = Child("bench._peers", ["--workdir", str(work / "peers"), "--hospitals", "0"], work, "mitz")
    duo: Child | None = None
    try:
        with run_orthanc(work / "orthanc") as orthanc:
            load_s = await asyncio.to_thread(load_into_orthanc, study, orthanc.ae_title, orthanc.dicom_port,
                                             args.load_jobs)
            stats = orthanc.rest("/statistics")
            assert isinstance(stats, dict)
            if int(stats["CountInstances"]) != study.count:
                raise BrokenTransfer(f"Orthanc holds {stats['CountInstances']} of {study.count} instances")
            shutil.rmtree(study.folder, ignore_errors=True)  # sizes are recorded; free the disk early

            pki = await asyncio.to_thread(make_pki, work / "pki", "rsa")
            info = await asyncio.to_thread(peers.wait_ready)
            tlb = [{"ura": hospital.ura, "name": hospital.name, "ae_title": orthanc.ae_title,
                    "host": HOST, "port": orthanc.dicom_port,
                    "repository_unique_id": hospital.repository_unique_id}]
            raw = duo_config(work, tlb, info["mitz_url"], pki.ca_cert,
                             xca_responding={"retrieve_window": args.window})
            started_duo, ready = await asyncio.to_thread(start_duo, work, raw)
            duo, duo_pid = started_duo, started_duo.pid
            url = ready["http_url"] + "/xca/rad75"
            caller = XdsCaller(pki)

            baseline: list[float] = []
            results: list[Rad75Result] = []
            base_syntax = ""
            for i in range(args.repeat):
                secs, base_syntax = await asyncio.to_thread(
                    getscu, study, orthanc.ae_title, orthanc.dicom_port, work / f"getscu-{i}")
                baseline.append(secs)
                results.append(await rad75(study, url, caller, duo_pid, Path(ready["spool_dir"]),
                                           hospital.repository_unique_id))
        print_report(args, study, generated_s, load_s, baseline, base_syntax, results)
        return 0
    finally:
        if duo is not None:
            await asyncio.to_thread(duo.stop)
        await asyncio.to_thread(peers.stop)


def lookups(r: Rad75Result) -> float:
    """Seconds DUO spent in C-FINDs and consent before its C-GET (sequential within one study)."""
    return sum(secs for (peer, op), (_n, secs) in r.peers.items()
               if op in ("c-find", "closed") or peer.startswith("mitz"))


def print_report(args: argparse.Namespace, study: Study, generated_s: float, load_s: float,
                 baseline: list[float], base_syntax: str, results: list[Rad75Result]) -> None:
    mb = study.total_bytes / MB
    per = study.total_bytes / study.count / 1e3
    print(f"RAD-75 of one CT study: {study.count} instances × {per:.0f} kB ({args.size}×{args.size}×16 bit)"
          f" in {len(study.series)} series = {mb:.0f} MB; Orthanc 1.10 (TCP_NODELAY=1), C-GET; loopback, "
          f"{os.cpu_count()} cores")
    print(f"setup (not timed): generated in {generated_s:.1f} s, loaded into Orthanc in {load_s:.1f} s "
          f"({mb / load_s:.0f} MB/s, {args.load_jobs} storescu at a time)")
    base = median(baseline)
    duo_s = median([r.seconds for r in results])
    print(f"{'path':<58} {'seconds':>8} {'MB/s':>8} {'× getscu time':>14}")
    print(f"{'DCMTK getscu → files (baseline)':<58} {base:8.2f} {mb / base:8.1f} {1.0:14.2f}")
    print(f"{'RAD-75 via DUO (MTOM, streamed, parts discarded)':<58} {duo_s:8.2f} {mb / duo_s:8.1f} "
          f"{duo_s / base:14.2f}")
    r = results[-1]
    print(f"DUO/getscu throughput ratio: {base / duo_s:.2f}  (median of {len(results)}; "
          f"both verified: all {study.count} instances once each, Pixel Data length and ends as generated; "
          f"getscu got {syntax_name(base_syntax)}, DUO sent {syntax_name(r.syntax)})")
    looked = lookups(r)
    print(f"DUO first response byte after {r.first_byte_s:.2f} s ({r.first_byte_s - looked:.2f} s after its "
          f"C-FINDs and consent, {looked:.2f} s), first whole instance at {r.first_part_s:.2f} s, last byte "
          f"after {r.seconds:.2f} s; {r.wire_bytes / MB:.0f} MB on the wire"
          f"{', chunked' if r.chunked else ''}")
    where = "; ".join(f"{peer} {op} {n:.0f}× = {secs:.2f} s"
                      for (peer, op), (n, secs) in sorted(r.peers.items()))
    print(f"inside DUO during the request (its /metrics): {where}")
    print(f"DUO spool high-water, its own metric: {r.duo_spool_high_water / MIB:.1f} MiB of a "
          f"{r.duo_window / MIB:.0f} MiB window (memory and files); spool files sampled from outside: "
          f"{r.spool_peak_bytes / MB:.0f} MB in "
          f"{r.spool_peak_files} files ({r.spool_peak_bytes / study.total_bytes:.0%} of the study) at "
          f"{r.spool_peak_at:.2f} s; {r.spool_after_files} files left after the answer")
    client_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"DUO RSS: {r.idle_rss_kib / 1024:.0f} MiB idle, peak {r.peak_rss_kib / 1024:.0f} MiB during the "
          f"request (VmHWM, separate process); client peak RSS {client_rss:.0f} MiB")
    result = {
        "ratio_getscu": round(base / duo_s, 3),
        "first_byte_s": round(r.first_byte_s, 3),
        "lookups_s": round(looked, 3),
        "first_byte_after_lookups_s": round(r.first_byte_s - looked, 3),
        "first_part_s": round(r.first_part_s, 3),
        "spool_high_water_mib": round(r.duo_spool_high_water / MIB, 2),
        "window_mib": round(r.duo_window / MIB, 2),
        "spool_sampled_peak_mib": round(r.spool_peak_bytes / MIB, 2),
        "duo_mb_s": round(mb / duo_s, 1),
        "getscu_mb_s": round(mb / base, 1),
        "duo_s": round(duo_s, 3),
        "getscu_s": round(base, 3),
        "study_mb": round(mb, 1),
        "instances": study.count,
        "peak_rss_mib": round(r.peak_rss_kib / 1024, 1),
        "chunked": r.chunked,
        "repeat": len(results),
    }
    print("RESULT " + json.dumps(result, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=500, help="study size in MB")
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each CT slice")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--load-jobs", type=int, default=2, help="storescu processes loading Orthanc")
    parser.add_argument("--repeat", type=int, default=1, help="getscu + RAD-75 rounds (medians printed)")
    parser.add_argument("--window", default="64MiB", help="DUO's xca_responding.retrieve_window")
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="WARNING"))
    if (missing := missing_tools(("storescu", "getscu"), orthanc=True)) is not None:
        print(missing)
        return 2
    exit_on_sigterm()
    return run_in_workdir("duo-bench-rad75-", lambda work: asyncio.run(amain(args, work)))


if __name__ == "__main__":
    raise SystemExit(main())

