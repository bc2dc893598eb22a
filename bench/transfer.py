"""Transfers (issues 6 and 14): one large study relayed source PACS → DUO → destination PACS, against
what a hospital would do without DUO, in the same run.

Measured, all peers with TCP_NODELAY=1 (docs/dicom.md §1), per study size (default 500 MB and 1 GB, the
sizes of issue 14's goals):

1. **DUO**: the study id from DUO's own timeline API, then ``POST /tlb/v1/transfers`` to a configured
   destination; timed from the 202 to ``completed`` with ``instances_stored == instances_expected``.
   DUO asks Mitz (the simulator, in a peers process), C-FINDs the study, pulls it from the source
   Orthanc by C-GET or C-MOVE (``--method``) and C-STOREs each instance into the destination Orthanc.
2. **DUO from an XCA community** (``--source xca``): the same study, but the measured DUO knows it only
   through an XCA community whose Responding Imaging Gateway is a second DUO process in front of the
   same source Orthanc: timeline (ITI-38) → POST transfer → ITI-39 KOS manifest → RAD-75 (the responding
   DUO C-GETs from the source) → C-STORE into the destination. This measures the initiating RAD-75 path
   (``transfer/fetch_xca.py``, ``xca/initiating/retriever.py``); the responding DUO's CPU is printed too.
3. **The ceiling**: DCMTK ``storescu`` sending the same files straight into the same destination.
4. **What a hospital would use instead**: the source Orthanc C-MOVEs the study straight into the
   destination (``movescu`` to the source with the destination as move target).
5. Ratios DUO ÷ Orthanc C-MOVE (goal ≥ 0.8) and DUO ÷ storescu.
6. DUO's peak RSS (VmHWM of a fresh DUO process per transfer; goal < 200 MB) per size: it must stay
   flat with the study size, since DUO streams instance by instance through a bounded spool.
7. DUO's CPU per MB: its process's user + sys CPU over the transfer ÷ the study's MB (goal ≤ 12, half
   of what issue 14 measured).

Each size runs twice (``--syntax``): uncompressed (Explicit VR Little Endian) and JPEG 2000 Lossless, as
the source holds it; every path must deliver the J2K study as held (DUO asks for the stored syntax first,
dicom/syntaxes.py PREFERRED), so its MB/s count compressed bytes and both ratios are printed.

Every path is verified, never assumed: after each run the destination must hold exactly the study's
SOP Instance UIDs (Orthanc ``/tools/find``), and it is emptied before the next. Where DUO's time goes
comes from timers around the transfer runner's stages (``bench._transfer_duo``: manifest, waiting for
the source, C-STORE, job-store writes, reconciliation) and from the CPU seconds of each process.

Setup, not timed: the study is a generated CT series (512×512×16 bit, ~0.5 MB per instance, the
consenting patient of the simulated network, at its first TLB hospital) written once with pydicom
and loaded into the source Orthanc with storescu; ``--workdir DIR --keep`` keeps it for the next run.

The last line is ``RESULT {json}`` (:func:`result_json`): ``{"sizes": {"500": {"c-move": {"ratio_orthanc",
"mb_s", "peak_rss_mib", "cpu_ms_per_mb", ...}, "c-get": {...}, "xca": {...}, ...}, "1024": {...}}, ...}``.

Usage: python -m bench.transfer [--size-mb 500 1024] [--method c-get c-move] [--source pacs xca]
       [--syntax explicit j2k] [--keep] [--workdir DIR] [--reconcile] [--profile PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

from bench._harness import (
    Child,
    consenting_patient,
    duo_config,
    exit_on_sigterm,
    missing_tools,
    network,
    proc_status_kib,
    run_in_workdir,
    start_duo,
)
from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.daemon import free_port
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.network import (
    DEMO_ROLE,
    DEMO_UZI,
    DEMO_XDS_HOME,
    DEMO_XUA_ISSUER,
    DUO_AE_TITLE,
    DUO_HOME_COMMUNITY_ID,
    HOST,
    REQUESTER_PACS,
)

#: --syntax choices: the transfer syntax the source holds the study in.
SYNTAXES: Final = {"explicit": "1.2.840.10008.1.2.1", "j2k": "1.2.840.10008.1.2.4.90"}
#: storescu's option proposing a file's own syntax (J2K: a context of its own, uncompressed the fallback).
STORESCU_PROPOSE: Final = {"explicit": [], "j2k": ["-xv"]}

ENV: Final = {**os.environ, "TCP_NODELAY": "1"}
MB: Final = 1e6
#: DUO's default for a destination (DestinationPacs.max_associations): the relays that run in parallel.
ASSOCIATIONS = DestinationPacs.model_fields["max_associations"].default
SOURCE_AE: Final = "ORTHANC_SRC"
DEST_AE: Final = "OWN_PACS"
DESTINATION: Final = "own-pacs"
REQUESTER: Final = {"ura": REQUESTER_PACS.ura, "organization_type": "V6", "uzi": DEMO_UZI, "role": DEMO_ROLE,
                    "purpose": "TREAT"}
PERIOD: Final = ("2015-01-01", "2026-12-31")
#: The measured DUO of the XCA-source transfer (``--source xca``): its own URA and AE title, so that
#: nothing of it can be mistaken for the responding DUO's.
XCA_INITIATOR_URA: Final = "00099002"
XCA_INITIATOR_AE: Final = "DUO_INITIATING"
#: Issue 14's goals ("Done when"): DUO ÷ Orthanc C-MOVE of the same study in the same run, for the C-MOVE
#: and C-GET sources at 500 MB and 1 GB; DUO's peak RSS, flat with the study size; DUO's CPU per MB at
#: least halved from the 24-28 ms/MB the issue measured (so ≤ 12).
GOAL_RATIO: Final = 0.8
GOAL_RSS_MB: Final = 200
GOAL_CPU_MS_PER_MB: Final = 12.0
#: docs/dicom.md §2 (200 × 514 KiB CT, 2-core VM, TCP_NODELAY everywhere): context for the table.
REFERENCE: Final = (
    ("DCMTK storescu → storescp", 633.0),
    ("storescu → Orthanc C-STORE (ingest)", 151.4),
    ("C-MOVE: movescu → Orthanc → storescp", 291.1),
    ("C-GET: DCMTK getscu from Orthanc", 272.8),
    ("C-GET: pynetdicom client from Orthanc", 118.4),
    ("pynetdicom chunked SCU → storescp", 114.6),
    ("asyncio relay prototype storescu → relay → storescp", 67.2),
)


class BrokenTransfer(AssertionError):
    """A path delivered something other than the study: no number may be printed for it."""


# -- the study -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Study:
    uid: str
    folder: Path
    sops: frozenset[str]
    total_bytes: int
    series: int
    #: A SYNTAXES key: how the source holds every image.
    syntax: str = "explicit"
    #: The size asked for (MB, before compression): what the rows are labelled with.
    nominal_mb: float = 0.0

    @property
    def count(self) -> int:
        return len(self.sops)

    @property
    def label(self) -> str:
        return f"{self.nominal_mb:g} MB{' J2K' if self.syntax == 'j2k' else ''}"


def study_on_disk(folder: Path, megabytes: float, size: int, series: int,
                  syntax: str = "explicit") -> tuple[Study, float]:
    """Generate the study once (``bench.rad75.make_study``: a generated CT header, fresh UIDs, a pixel
    ramp; for ``j2k`` every image then JPEG 2000 Lossless) and record it in ``study.json``; a kept folder
    is reused. Returns it and the seconds spent."""
    from bench.rad75 import make_study

    record = folder.parent / f"{folder.name}.json"  # beside it: storescu +sd sends every file inside
    if record.exists():
        saved = json.loads(record.read_text())
        study = Study(saved["uid"], folder, frozenset(saved["sops"]), saved["total_bytes"], saved["series"],
                      syntax, megabytes)
        return study, 0.0
    shutil.rmtree(folder, ignore_errors=True)
    started = time.perf_counter()
    record.unlink(missing_ok=True)
    made = make_study(folder, megabytes, size, series)
    total = made.total_bytes if syntax == "explicit" else compress_study(folder, SYNTAXES[syntax])
    record.write_text(json.dumps({"uid": made.uid, "sops": sorted(made.sops), "total_bytes": total,
                                  "series": len(made.series)}))
    return (Study(made.uid, folder, made.sops, total, len(made.series), syntax, megabytes),
            time.perf_counter() - started)


def compress_study(folder: Path, transfer_syntax: str) -> int:
    """Re-encode every file of a generated study in place; returns the new total size.

    Every image of ``make_study`` has the same pixels, so they are compressed once (pydicom's encoder,
    losslessly, the instance UID kept) and the encapsulated stream is given to each file. Six bits of
    noise go onto make_study's ramp first: a ramp compresses some 30:1, a CT slice about 2:1, and the
    ratio decides how much a compressed transfer saves.
    """
    import numpy as np
    from pydicom import dcmread
    from pydicom.uid import UID

    encoded: Any = None
    total = 0
    for path in sorted(folder.rglob("*.dcm")):
        ds = dcmread(path)
        if encoded is None:
            ramp = np.frombuffer(ds.PixelData, dtype="<u2")
            noise = np.random.default_rng(13).integers(0, 64, ramp.size, dtype=np.uint16)
            ds.PixelData = ((ramp + noise) & 0x0FFF).astype("<u2").tobytes()
            ds.compress(UID(transfer_syntax), generate_instance_uid=False)
            encoded = ds["PixelData"]
        else:
            ds["PixelData"] = encoded
            ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
        ds.save_as(path, enforce_file_format=True)
        total += path.stat().st_size
    return total


def held_as(orthanc: Any, study: Study, path: str, sample: int = 5) -> None:
    """The destination keeps the study in the syntax the source holds it in (checked on a sample)."""
    found = _http(orthanc, "POST", "/tools/find", {"Level": "Instance",
                                                  "Query": {"StudyInstanceUID": study.uid}})
    for instance in found[:sample]:
        url = f"http://{orthanc.host}:{orthanc.http_port}/instances/{instance}/metadata/TransferSyntax"
        with urllib.request.urlopen(url, timeout=30) as r:  # plain text, not JSON
            got = r.read().decode().strip()
        if got != SYNTAXES[study.syntax]:
            raise BrokenTransfer(f"{path}: the destination holds an instance as {got}, the source as "
                                 f"{SYNTAXES[study.syntax]}")


# -- Orthanc helpers -----------------------------------------------------------------------------------


def _http(orthanc: Any, method: str, path: str, body: object | None = None, timeout: float = 120) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"http://{orthanc.host}:{orthanc.http_port}{path}", data=data,
                                     method=method, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=timeout) as r:
        raw = r.read()
    return json.loads(raw) if raw else None


def orthanc_pid(workdir: Path) -> int | None:
    """The pid of the Orthanc started on ``workdir``'s config (tests.support.orthanc does not expose it)."""
    wanted = str(workdir / "orthanc.json").encode()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if wanted in (entry / "cmdline").read_bytes():
                    return int(entry.name)
            except OSError:
                continue
    return None


def cpu_seconds(pid: int | None) -> float:
    """utime + stime of a process (all its threads), from /proc/<pid>/stat."""
    if pid is None:
        return 0.0
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def instances_at(orthanc: Any, study_uid: str) -> list[str]:
    """SOP Instance UIDs of the study at an Orthanc (one per stored instance, duplicates kept)."""
    found = _http(orthanc, "POST", "/tools/find", {"Level": "Instance", "Expand": True,
                                                  "Query": {"StudyInstanceUID": study_uid}})
    return [str(item["MainDicomTags"]["SOPInstanceUID"]) for item in found]


def verify_destination(orthanc: Any, study: Study, path: str) -> None:
    arrived = instances_at(orthanc, study.uid)
    if len(arrived) != study.count or set(arrived) != study.sops:
        missing = len(study.sops - set(arrived))
        raise BrokenTransfer(f"{path}: destination holds {len(arrived)} instances of {study.count}, "
                             f"{missing} missing, {len(set(arrived) - study.sops)} foreign")


def empty_destination(orthanc: Any) -> None:
    for study_id in _http(orthanc, "GET", "/studies"):
        _http(orthanc, "DELETE", f"/studies/{study_id}")
    if _http(orthanc, "GET", "/statistics")["CountInstances"] != 0:
        raise RuntimeError("the destination Orthanc is not empty after deleting every study")


def storescu(study: Study, ae_title: str, port: int, calling: str = "BENCH") -> float:
    """DCMTK storescu of every file of the study over one association; returns seconds."""
    started = time.perf_counter()
    proc = subprocess.run(["storescu", *STORESCU_PROPOSE[study.syntax], "-aet", calling, "-aec", ae_title,
                           "+sd", "+r", HOST, str(port), str(study.folder)], env=ENV, capture_output=True,
                          text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise BrokenTransfer(f"storescu failed: {proc.stderr[-2000:]}")
    return elapsed


def load_source(study: Study, ae_title: str, port: int, jobs: int = 2) -> float:
    """Load the source with storescu, one process per series folder, ``jobs`` at a time."""
    started = time.perf_counter()
    folders = sorted(p for p in study.folder.iterdir() if p.is_dir())
    for first in range(0, len(folders), jobs):
        procs = [subprocess.Popen(["storescu", *STORESCU_PROPOSE[study.syntax], "-aet", "LOADER", "-aec",
                                   ae_title, "+sd", HOST, str(port), str(f)], env=ENV,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for f in folders[first:first + jobs]]
        for p in procs:
            _out, err = p.communicate()
            if p.returncode != 0:
                raise RuntimeError(f"storescu (loading the source) failed: {err[-2000:]!r}")
    return time.perf_counter() - started


def orthanc_move(study: Study, source: Any, move_to: str) -> float:
    """The hospital's own way: C-MOVE of the study at the source, straight into ``move_to``."""
    started = time.perf_counter()
    proc = subprocess.run(["movescu", "-S", "-aet", "BENCH", "-aec", source.ae_title, "-aem", move_to,
                           "-k", "QueryRetrieveLevel=STUDY", "-k", f"StudyInstanceUID={study.uid}",
                           HOST, str(source.dicom_port)], env=ENV, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0 or "Failed" in proc.stderr:
        raise BrokenTransfer(f"movescu failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return elapsed


# -- DUO -------------------------------------------------------------------------------------------------


@dataclass
class DuoRun:
    method: str
    seconds: float
    first_stored_s: float
    idle_rss_kib: int
    peak_rss_kib: int
    cpu_s: float
    source_cpu_s: float
    dest_cpu_s: float
    stages: dict[str, list[float]] = field(default_factory=dict)
    #: The XCA source only: CPU seconds of the responding DUO (RAD-75 from the source PACS).
    responder_cpu_s: float | None = None


def _api(http_url: str, method: str, path: str, body: object | None = None) -> tuple[int, Any]:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(f"{http_url}/tlb/v1{path}", data=data, method=method,
                                     headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")


def duo_transfer(work: Path, study: Study, method: str, source: Any, dest: Any, duo_port: int, mitz_url: str,
                 pki: Any, hospital: Any, reconcile: bool) -> DuoRun:
    """A fresh DUO process (so its VmHWM is this transfer's and nothing earlier's), one transfer."""
    run_dir = work / f"duo-{method}-{study.count}-{study.syntax}"
    shutil.rmtree(run_dir, ignore_errors=True)
    run_dir.mkdir(parents=True)
    tlb = [{"ura": hospital.ura, "name": hospital.name, "ae_title": source.ae_title, "host": HOST,
            "port": source.dicom_port, "repository_unique_id": hospital.repository_unique_id,
            "timeout_s": 30.0}]
    raw = duo_config(run_dir, tlb, mitz_url, pki.ca_cert,
                     listeners={"dicom": {"ae_title": DUO_AE_TITLE, "host": HOST, "port": duo_port}},
                     xua={"signing_key_file": str(pki.server.key),
                          "signing_cert_file": str(pki.server.cert)},
                     xca_responding={"retrieve_method": method},
                     transfers=_destination(dest))
    return _measured_transfer(run_dir, raw, study, method, source, dest, reconcile)


def _destination(dest: Any) -> dict[str, Any]:
    return {"destinations": [{"name": DESTINATION, "ae_title": dest.ae_title, "host": HOST,
                              "port": dest.dicom_port, "uras": [REQUESTER["ura"]],
                              "patient_id_issuer": "OWN_HOSPITAL", "timeout_s": 60.0}]}


def initiating_config(work: Path, responder_url: str, mitz_url: str, pki: Any, hospital_ura: str,
                      **overrides: dict[str, Any]) -> dict[str, Any]:
    """The measured DUO of an XCA-source bench: no TLB hospital, one community, which is the responding
    DUO at ``responder_url``; it signs its XUA assertions as the benchmarks' XDS peer, whom the
    responder trusts, and nobody asks it anything over XCA."""
    xca = responder_url + "/xca"
    raw = duo_config(work, [], mitz_url, pki.ca_cert,
                     gateway={"home_community_id": DEMO_XDS_HOME, "ura": XCA_INITIATOR_URA,
                              "name": "DUO initiating (bench)"},
                     listeners={"dicom": {"ae_title": XCA_INITIATOR_AE, "host": HOST, "port": 0}},
                     xua={"issuer": DEMO_XUA_ISSUER, "signing_key_file": str(pki.client.key),
                          "signing_cert_file": str(pki.client.cert)},
                     clients={"xca": []}, **overrides)
    raw["xca_communities"] = [{
        "home_community_id": DUO_HOME_COMMUNITY_ID, "name": "DUO responding (bench)",
        "iti38": f"{xca}/iti38", "iti39": f"{xca}/iti39", "rad75": f"{xca}/rad75", "uras": [hospital_ura],
        "query_without_localization": True, "timeout_s": 120.0}]
    return raw


def xca_transfer(work: Path, study: Study, source: Any, dest: Any, mitz_url: str, pki: Any, hospital: Any,
                 reconcile: bool) -> DuoRun:
    """The study fetched from an XCA community: a second DUO process is that community's Responding
    Imaging Gateway (ITI-38, ITI-39 KOS, RAD-75 answered from the source Orthanc by C-GET, exactly as
    DUO answers real XCA peers), and the measured DUO, a fresh process with no TLB hospital, is its
    Initiating Imaging Gateway: timeline (ITI-38) -> POST transfer -> ITI-39 manifest -> RAD-75 batches
    of ``rad75_batch_size`` per series -> C-STORE into the destination. The measured DUO signs its XUA
    assertions as the benchmarks' XDS peer (``bench._harness.CLAIMS``' issuer, the PKI's client key),
    the peer the responding DUO's config trusts; the responder's CPU is reported beside it."""
    run_dir = work / f"duo-xca-{study.count}-{study.syntax}"
    shutil.rmtree(run_dir, ignore_errors=True)
    (run_dir / "responder").mkdir(parents=True)
    tlb = [{"ura": hospital.ura, "name": hospital.name, "ae_title": source.ae_title, "host": HOST,
            "port": source.dicom_port, "repository_unique_id": hospital.repository_unique_id,
            "timeout_s": 30.0}]
    responder_raw = duo_config(run_dir / "responder", tlb, mitz_url, pki.ca_cert,
                               xca_responding={"retrieve_method": "c-get"})
    profile = os.environ.pop("DUO_BENCH_PROFILE", None)  # --profile is about the measured DUO only
    try:
        responder, ready = start_duo(run_dir / "responder", responder_raw)
    finally:
        if profile is not None:
            os.environ["DUO_BENCH_PROFILE"] = profile
    try:
        raw = initiating_config(run_dir, ready["http_url"], mitz_url, pki, hospital.ura,
                                transfers=_destination(dest))
        return _measured_transfer(run_dir, raw, study, "xca", source, dest, reconcile,
                                  responder=responder.pid)
    finally:
        responder.stop()


def _measured_transfer(run_dir: Path, raw: dict[str, Any], study: Study, method: str, source: Any, dest: Any,
                       reconcile: bool, responder: int | None = None) -> DuoRun:
    """Start the measured DUO (``bench._transfer_duo``, with its stage timers) on ``raw``, take the study
    id from its timeline and time one transfer from the 202 to the end, with every process's CPU."""
    cfg = run_dir / "duo-config.json"
    cfg.write_text(json.dumps(raw, indent=1))
    stages_file = run_dir / "stages.json"
    child = Child("bench._transfer_duo", ["--config", str(cfg), "--stages", str(stages_file)], run_dir, "duo")
    try:
        ready = child.wait_ready()
        url = ready["http_url"]
        status, timeline = _api(url, "POST", "/timeline", {
            "patient": {"bsn": consenting_patient(network()).bsn},
            "period": {"from": PERIOD[0], "to": PERIOD[1]}, "requester": REQUESTER})
        if status != 200:
            raise BrokenTransfer(f"timeline: HTTP {status}: {timeline}")
        ids = [s["id"] for s in timeline["studies"] if s.get("study_instance_uid") == study.uid]
        if len(ids) != 1:
            raise BrokenTransfer(f"timeline lists the study {len(ids)} times: {timeline}")
        body: dict[str, Any] = {"studies": ids, "destination": DESTINATION, "requester": REQUESTER}
        if reconcile:
            body["local_patient_id"] = "LOCAL-42"
        src_pid, dst_pid = orthanc_pid(Path(source.workdir)), orthanc_pid(Path(dest.workdir))
        idle = proc_status_kib(child.pid)["VmRSS"]
        pids = (child.pid, src_pid, dst_pid, responder)
        cpu0 = [cpu_seconds(p) for p in pids]
        started = time.perf_counter()
        status, accepted = _api(url, "POST", "/transfers", body)
        accepted_at = time.perf_counter()
        if status != 202:
            raise BrokenTransfer(f"transfer refused: HTTP {status}: {accepted}")
        first_stored = 0.0
        while True:
            _status, job = _api(url, "GET", f"/transfers/{accepted['id']}")
            now = time.perf_counter()
            if not first_stored and job.get("instances_stored"):
                first_stored = now - accepted_at
            if job["state"] not in ("queued", "running"):
                break
            if now - started > 1800:
                raise BrokenTransfer(f"DUO: no end after 30 minutes: {job}")
            time.sleep(0.1)
        elapsed = time.perf_counter() - accepted_at
        cpu = [cpu_seconds(p) - c for p, c in zip(pids, cpu0, strict=True)]
        peak = proc_status_kib(child.pid)["VmHWM"]
        if job["state"] != "completed" or job["instances_stored"] != job["instances_expected"]:
            raise BrokenTransfer(f"DUO ({method}): {job['state']}, {job['instances_stored']} of "
                                 f"{job['instances_expected']} stored: {job.get('errors')} "
                                 f"{job.get('studies')}")
        if job["instances_expected"] != study.count:
            raise BrokenTransfer(f"DUO expected {job['instances_expected']} instances, the study has "
                                 f"{study.count}")
        stages: dict[str, list[float]] = {}
        for _ in range(100):
            if stages_file.exists():
                stages = json.loads(stages_file.read_text())
                break
            time.sleep(0.02)
        return DuoRun(method, elapsed, first_stored, idle, peak, cpu[0], cpu[1], cpu[2], stages,
                      responder_cpu_s=cpu[3] if responder is not None else None)
    finally:
        child.stop()


# -- main ----------------------------------------------------------------------------------------------


@dataclass
class SizeResult:
    study: Study
    generated_s: float
    load_s: float
    move_s: float
    move_cpu: tuple[float, float]
    storescu_s: float
    duo: list[DuoRun]


@dataclass(frozen=True)
class RunningOrthanc:
    """tests.support.orthanc.Orthanc plus its work directory (for its pid)."""

    ae_title: str
    host: str
    dicom_port: int
    http_port: int
    workdir: str


def run(args: argparse.Namespace, work: Path, results: list[SizeResult]) -> int:
    from duo_gateway.sim.pki import make_pki
    from tests.support.orthanc import run_orthanc  # the project's Orthanc runner (TCP_NODELAY=1)

    net = network()
    hospital = net.hospitals[0]
    pki = make_pki(work / "pki", "rsa")
    (work / "mitz.ready.json").unlink(missing_ok=True)  # a kept work directory's would be stale
    peers = Child("bench._peers", ["--workdir", str(work / "peers"), "--hospitals", "0"], work, "mitz")
    try:
        mitz_url = peers.wait_ready()["mitz_url"]
        for mb, syntax in ((mb, syntax) for mb in args.size_mb for syntax in args.syntax):
            folder = work / (f"study-{mb:g}MB" + ("" if syntax == "explicit" else f"-{syntax}"))
            study, generated_s = study_on_disk(folder, mb, args.image_size, args.series, syntax)
            tag = study.label
            slug = tag.replace(" ", "-")
            print(f"[{tag}] study: {study.count} instances, {study.total_bytes / MB:.0f} MB "
                  f"({f'generated in {generated_s:.1f} s' if generated_s else 'reused'})", flush=True)
            # DUO's DICOM port is fixed before the source starts: the source must know it as a C-MOVE target.
            duo_port = free_port()
            for name in (f"dest-{slug}", f"source-{slug}"):
                shutil.rmtree(work / name, ignore_errors=True)
            with run_orthanc(work / f"dest-{slug}", ae_title=DEST_AE) as d, \
                    run_orthanc(work / f"source-{slug}", ae_title=SOURCE_AE,
                                modalities={"dest": (DEST_AE, HOST, d.dicom_port),
                                            "duo": (DUO_AE_TITLE, HOST, duo_port)}) as s:
                dest = RunningOrthanc(d.ae_title, d.host, d.dicom_port, d.http_port,
                                      str(work / f"dest-{slug}"))
                source = RunningOrthanc(s.ae_title, s.host, s.dicom_port, s.http_port,
                                        str(work / f"source-{slug}"))
                load_s = load_source(study, source.ae_title, source.dicom_port)
                verify_destination(source, study, "loading the source")
                print(f"[{tag}] source loaded in {load_s:.1f} s", flush=True)

                src_pid, dst_pid = orthanc_pid(Path(source.workdir)), orthanc_pid(Path(dest.workdir))
                c0 = (cpu_seconds(src_pid), cpu_seconds(dst_pid))
                move_s = orthanc_move(study, source, DEST_AE)
                c1 = (cpu_seconds(src_pid), cpu_seconds(dst_pid))
                verify_destination(dest, study, "Orthanc C-MOVE")
                held_as(dest, study, "Orthanc C-MOVE")
                empty_destination(dest)
                print(f"[{tag}] Orthanc C-MOVE: {move_s:.2f} s", flush=True)

                store_s = storescu(study, dest.ae_title, dest.dicom_port)
                verify_destination(dest, study, "storescu")
                held_as(dest, study, "storescu")
                empty_destination(dest)
                print(f"[{tag}] storescu: {store_s:.2f} s", flush=True)

                duo_runs = []
                paths = [*(args.method if "pacs" in args.source else []),
                         *(["xca"] if "xca" in args.source else [])]
                for method in paths:
                    if args.profile:
                        os.environ["DUO_BENCH_PROFILE"] = f"{args.profile}-{method}-{slug}"
                    try:
                        if method == "xca":
                            r = xca_transfer(work, study, source, dest, mitz_url, pki, hospital,
                                             args.reconcile)
                        else:
                            r = duo_transfer(work, study, method, source, dest, duo_port, mitz_url, pki,
                                             hospital, args.reconcile)
                    finally:
                        os.environ.pop("DUO_BENCH_PROFILE", None)
                    verify_destination(dest, study, f"DUO ({method})")
                    held_as(dest, study, f"DUO ({method})")
                    empty_destination(dest)
                    print(f"[{tag}] DUO {method}: {r.seconds:.2f} s", flush=True)
                    duo_runs.append(r)
                results.append(SizeResult(study, generated_s, load_s, move_s, (c1[0] - c0[0], c1[1] - c0[1]),
                                          store_s, duo_runs))
            for name in (f"dest-{slug}", f"source-{slug}"):  # 2× the study on disk: free it now
                shutil.rmtree(work / name, ignore_errors=True)
            if not args.keep:
                shutil.rmtree(study.folder, ignore_errors=True)
    finally:
        peers.stop()
    print()
    print_report(args, results)
    return 0


def path_name(method: str) -> str:
    return "from an XCA community (RAD-75)" if method == "xca" else f"{method} from source"


def cpu_ms_per_mb(run: DuoRun, study: Study) -> float:
    """DUO's own process CPU (user + sys, all threads) over the transfer, per MB of the study."""
    return run.cpu_s * 1e3 / (study.total_bytes / MB)


def _goals(run: DuoRun, res: SizeResult) -> dict[str, bool]:
    return {"ratio_orthanc": res.move_s / run.seconds >= GOAL_RATIO,
            "peak_rss": run.peak_rss_kib * 1024 / MB < GOAL_RSS_MB,
            "cpu_ms_per_mb": cpu_ms_per_mb(run, res.study) <= GOAL_CPU_MS_PER_MB}


def result_json(results: Sequence[SizeResult]) -> dict[str, Any]:
    """The RESULT line: per size (the --size-mb value, an integer key), per path (``c-move``, ``c-get``,
    ``xca``) the ratio to Orthanc C-MOVE of the same study in the same run, MB/s, peak RSS, CPU per MB,
    the storescu ratio and the stage timers. The first syntax run of a size is at the top of its entry
    (with ``syntax`` naming it); further syntaxes are under ``by_syntax``, in the same shape."""
    def entry(res: SizeResult) -> dict[str, Any]:
        mb = res.study.total_bytes / MB
        out: dict[str, Any] = {
            "syntax": res.study.syntax, "instances": res.study.count, "mb": round(mb, 1),
            "orthanc_c_move": {"seconds": round(res.move_s, 3), "mb_s": round(mb / res.move_s, 1)},
            "storescu": {"seconds": round(res.storescu_s, 3), "mb_s": round(mb / res.storescu_s, 1)}}
        for r in res.duo:
            out[r.method] = {
                "ratio_orthanc": round(res.move_s / r.seconds, 3), "mb_s": round(mb / r.seconds, 1),
                "peak_rss_mib": round(r.peak_rss_kib / 1024, 1),
                "cpu_ms_per_mb": round(cpu_ms_per_mb(r, res.study), 2),
                "ratio_storescu": round(res.storescu_s / r.seconds, 3), "seconds": round(r.seconds, 3),
                "first_stored_s": round(r.first_stored_s, 3), "idle_rss_mib": round(r.idle_rss_kib / 1024, 1),
                "cpu_s": round(r.cpu_s, 2), "source_cpu_s": round(r.source_cpu_s, 2),
                "dest_cpu_s": round(r.dest_cpu_s, 2),
                **({"responder_cpu_s": round(r.responder_cpu_s, 2)} if r.responder_cpu_s is not None else {}),
                "goals_met": _goals(r, res),
                "stages_s": {k: round(v[1], 3) for k, v in sorted(r.stages.items())},
                "stage_calls": {k: int(v[0]) for k, v in sorted(r.stages.items())}}
        return out

    sizes: dict[str, dict[str, Any]] = {}
    for res in results:
        key = str(round(res.study.nominal_mb))
        if key not in sizes:
            sizes[key] = entry(res)
        else:
            sizes[key].setdefault("by_syntax", {})[res.study.syntax] = entry(res)
    # The issue's goals are about the PACS sources; None when none of them ran.
    pacs = [all(_goals(r, res).values()) for res in results for r in res.duo
            if r.method in ("c-move", "c-get")]
    return {"sizes": sizes, "goals": {"ratio_orthanc": GOAL_RATIO, "peak_rss_mb": GOAL_RSS_MB,
                                      "cpu_ms_per_mb": GOAL_CPU_MS_PER_MB},
            "all_goals_met": all(pacs) if pacs else None}


def print_report(args: argparse.Namespace, results: list[SizeResult]) -> None:
    print(f"Transfer of one CT study source Orthanc → DUO → destination Orthanc; Orthanc 1.10, DCMTK, "
          f"TCP_NODELAY=1 on every peer and DUO; loopback, {os.cpu_count()} cores; "
          f"{args.image_size}×{args.image_size}×16 bit slices; DUO defaults (transfer window 16, "
          f"retrieve window 16, {ASSOCIATIONS} parallel C-STORE associations per destination)"
          f"{'; with reconciliation (local patient id)' if args.reconcile else ''}"
          f"{f'; DUO GIL switch interval {args.switch_interval} s' if args.switch_interval else ''}")
    print(f"{'study':>12} {'path':<52} {'seconds':>8} {'MB/s':>7} {'inst/s':>7} {'÷ C-MOVE':>9} "
          f"{'÷ storescu':>10}")
    for res in results:
        rows = [("DCMTK storescu → destination (ceiling)", res.storescu_s),
                ("Orthanc C-MOVE source → destination (hospital)", res.move_s),
                *((f"DUO transfer API, {path_name(r.method)}", r.seconds) for r in res.duo)]
        mb = res.study.total_bytes / MB
        for name, secs in rows:
            print(f"{res.study.label:>12} {name:<52} {secs:8.2f} {mb / secs:7.1f} "
                  f"{res.study.count / secs:7.0f} {res.move_s / secs:9.2f} {res.storescu_s / secs:10.2f}")
    print()
    print("ratios (throughput, DUO ÷ baseline; goal DUO ÷ Orthanc C-MOVE ≥ "
          f"{GOAL_RATIO}):")
    for res in results:
        for r in res.duo:
            ratio = res.move_s / r.seconds
            print(f"  {res.study.label:>12} {r.method}: DUO ÷ C-MOVE {ratio:.2f} "
                  f"({'meets' if ratio >= GOAL_RATIO else 'BELOW'} goal), DUO ÷ storescu "
                  f"{res.storescu_s / r.seconds:.2f}")
    print()
    print(f"DUO peak RSS (VmHWM of a fresh DUO process per transfer; goal < {GOAL_RSS_MB} MB):")
    kinds = sorted({(r.method, res.study.syntax) for res in results for r in res.duo})
    for method, syntax in kinds:
        peaks = [(res.study.total_bytes / MB, r) for res in results for r in res.duo
                 if r.method == method and res.study.syntax == syntax]
        text = ", ".join(f"{mb:.0f} MB study: idle {r.idle_rss_kib / 1024:.0f} MiB, peak "
                         f"{r.peak_rss_kib / 1024:.0f} MiB" for mb, r in peaks)
        name = f"{method}, {syntax}"
        above = [f"{mb:.0f} MB study" for mb, r in peaks if r.peak_rss_kib * 1024 / MB >= GOAL_RSS_MB]
        print(f"  {name}: {text} ({'ABOVE goal: ' + ', '.join(above) if above else 'meets goal'})")
        if len(peaks) >= 2:
            (mb_a, a), (mb_b, b) = max(peaks, key=lambda p: p[0]), min(peaks, key=lambda p: p[0])
            worst_mb = max(a.peak_rss_kib, b.peak_rss_kib) * 1024 / MB
            print(f"  {name}: difference {mb_a:.0f} MB − {mb_b:.0f} MB study = "
                  f"{(a.peak_rss_kib - b.peak_rss_kib) / 1024:+.1f} MiB; highest peak {worst_mb:.0f} MB "
                  f"({'meets' if worst_mb < GOAL_RSS_MB else 'ABOVE'} goal)")
    print()
    print(f"where DUO's time goes (timers in bench._transfer_duo; relay stages are summed over the "
          f"{ASSOCIATIONS} parallel relays, so they can add up to more than the job; the source wait is "
          f"the fetch loop's time not spent relaying, only meaningful with one relay):")
    for res in results:
        for r in res.duo:
            s = {k: v[1] for k, v in r.stages.items()}
            n = {k: int(v[0]) for k, v in r.stages.items()}
            source_wait = max(0.0, s.get("pass", 0.0) - s.get("relay", 0.0) / ASSOCIATIONS)
            relay_other = s.get("relay", 0.0) - sum(s.get(k, 0.0) for k in
                                                    ("read meta", "reconcile", "C-STORE", "mark_stored"))
            parts = [("manifest (Mitz + C-FIND walk; XCA: ITI-39 + KOS)", s.get("manifest", 0.0)),
                     ("  of which Mitz consent", s.get("consent", 0.0)),
                     (f"  of which C-FIND walks ({n.get('walk', 0)}; >1: asked again)",
                      max(0.0, s.get("walk", 0.0) - s.get("consent", 0.0))),
                     ("waiting for the source (C-GET/C-MOVE/RAD-75)", source_wait),
                     ("C-STORE to the destination", s.get("C-STORE", 0.0)),
                     (f"job store mark_stored ({n.get('mark_stored', 0)} commits)",
                      s.get("mark_stored", 0.0)),
                     ("read Part 10 meta", s.get("read meta", 0.0)),
                     ("reconcile (local patient id)", s.get("reconcile", 0.0)),
                     ("rest of the relay (retries, unlink, loop)", relay_other),
                     ("verify against the manifest", s.get("verify", 0.0))]
            job = s.get("job", r.seconds)
            print(f"  {res.study.label}, {r.method}: job {job:.2f} s of {r.seconds:.2f} s "
                  f"API time; first instance stored {r.first_stored_s:.2f} s after the 202; "
                  f"{n.get('C-STORE', 0)} C-STOREs")
            for name, secs in parts:
                share = f"{secs / job:5.0%}" if job else ""
                print(f"      {name:<50} {secs:7.2f} s {share}")
            responder = (f", responding DUO {r.responder_cpu_s:.1f} s" if r.responder_cpu_s is not None
                         else "")
            print(f"      CPU during the transfer: DUO {r.cpu_s:.1f} s ({r.cpu_s / r.seconds:.0%} of one "
                  f"core, {cpu_ms_per_mb(r, res.study):.1f} ms/MB; goal ≤ {GOAL_CPU_MS_PER_MB:g}), source "
                  f"Orthanc {r.source_cpu_s:.1f} s, destination Orthanc {r.dest_cpu_s:.1f} s{responder}")
        print(f"  {res.study.label}, Orthanc C-MOVE for comparison: source Orthanc "
              f"{res.move_cpu[0]:.1f} s CPU, destination Orthanc {res.move_cpu[1]:.1f} s CPU in "
              f"{res.move_s:.2f} s")
    print()
    print("setup (not timed): " + "; ".join(
        f"{r.study.label}: {r.study.total_bytes / MB:.0f} MB ({r.study.count} instances × "
        f"{r.study.total_bytes / r.study.count / 1e3:.0f} kB in {r.study.series} series) "
        f"{'generated in ' + format(r.generated_s, '.1f') + ' s, ' if r.generated_s else 'reused, '}"
        f"loaded into the source in {r.load_s:.1f} s" for r in results))
    print("every path verified: the destination held exactly the study's SOP Instance UIDs after each run "
          "(a sample of them in the syntax the source holds), and was emptied before the next; a J2K study's "
          "MB are its compressed bytes")
    print("reference, docs/dicom.md §2 (200 × 514 KiB CT, 2-core VM, TCP_NODELAY): " + "; ".join(
        f"{name} {mbs:.0f} MB/s" for name, mbs in REFERENCE))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=float, nargs="+", default=[500, 1024], help="study sizes in MB")
    parser.add_argument("--method", nargs="+", choices=("c-get", "c-move"), default=["c-get", "c-move"],
                        help="how DUO retrieves from the source PACS")
    parser.add_argument("--source", nargs="+", choices=("pacs", "xca"), default=["pacs", "xca"],
                        help="where DUO fetches from: the source PACS itself (each --method), an XCA "
                             "community (a responding DUO in front of the same PACS, RAD-75), or both")
    parser.add_argument("--syntax", nargs="+", choices=tuple(SYNTAXES), default=list(SYNTAXES),
                        help="how the source holds the study: uncompressed, JPEG 2000 Lossless, or both")
    parser.add_argument("--image-size", type=int, default=512, help="rows = columns of each CT slice")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--reconcile", action="store_true",
                        help="ask for a local patient id (DUO rewrites every instance's patient ids)")
    parser.add_argument("--workdir", type=Path, help="work directory (a kept one's studies are reused)")
    parser.add_argument("--keep", action="store_true", help="keep the work directory and generated studies")
    parser.add_argument("--switch-interval", type=float,
                        help="experiment: sys.setswitchinterval in DUO (GIL hand-off, default 0.005)")
    parser.add_argument("--profile", help="also write a cProfile of DUO to PROFILE-<method>-<size>.<pid>")
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="WARNING"))
    if (missing := missing_tools(("storescu", "movescu"), orthanc=True)) is not None:
        print(missing)
        return 2
    exit_on_sigterm()
    if args.switch_interval:
        os.environ["DUO_BENCH_SWITCH_INTERVAL"] = str(args.switch_interval)
    results: list[SizeResult] = []
    status = run_in_workdir("duo-bench-transfer-", lambda work: run(args, work, results),
                            workdir=args.workdir, keep=args.keep)
    if status == 0:
        print("RESULT " + json.dumps(result_json(results), separators=(",", ":")), flush=True)
    return status


if __name__ == "__main__":
    raise SystemExit(main())
