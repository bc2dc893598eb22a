"""Shared machinery of the XCA benchmarks: child processes, DUO's config, signed requests, metrics.

Why child processes: DUO, its peers (the Mitz simulator, simulated PACSes) and the load-generating
client are separate machines in production. In one Python process they would share one GIL, so the
client's work would show up as DUO latency and DUO's memory could not be told apart from the
client's. Each child sets a parent-death signal, and :class:`Child` stops it on every exit path
(including Ctrl-C and SIGTERM, see :func:`exit_on_sigterm`), so a benchmark leaves nothing running.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

from lxml import etree
from prometheus_client.parser import text_string_to_metric_families

from duo_gateway.sim.config import SimHospital, SimNetworkConfig, SimPatient, default_network
from duo_gateway.sim.network import (
    DEMO_ROLE,
    DEMO_UZI,
    DEMO_XDS_HOME,
    DEMO_XUA_ISSUER,
    DUO_HOME_COMMUNITY_ID,
    DUO_URA,
    HOST,
    REQUESTER_PACS,
)
from duo_gateway.sim.pki import Pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_ANONYMOUS,
    Addressing,
    build_envelope,
    new_message_id,
    serialize,
)
from duo_gateway.soap.mtom import build_mtom
from duo_gateway.xmldsig import load_signing_pair
from duo_gateway.xua import Claims, issue_assertion, security_header

#: The XDS side's professional: the demo's radiologist, asking for an organisation outside the demo.
CLAIMS = Claims(uzi=DEMO_UZI, role=DEMO_ROLE, ura="00000666", organisation_type="V6", purpose="TREAT")
PYTHON = sys.executable


# -- the simulated network -----------------------------------------------------------------------


def network() -> SimNetworkConfig:
    """The demo network; its first patient consents everywhere, which is what the benchmarks need."""
    return default_network()


def consenting_patient(net: SimNetworkConfig) -> SimPatient:
    patient = net.patients[0]
    assert patient.consent == "all", "the benchmarks need a patient with consent at every hospital"
    return patient


def bench_studies(net: SimNetworkConfig, hospital: SimHospital, count: int, image_size: int,
                  reports: bool) -> list[GeneratedStudy]:
    """``count`` studies of the consenting patient, cut to one image (plus the report when wanted).

    ITI-38 only touches study-level C-FIND, so one tiny image per study keeps preloading fast. Without
    reports a FindDocuments answer is exactly one KOS entry per study; with them DUO also walks every
    reported study down to IMAGE level to announce the report (the slower, heavier case).
    Deterministic: the peers process and the floor measurement derive the same studies independently.
    """
    out: list[GeneratedStudy] = []
    for study in generate_studies(consenting_patient(net), hospital, count, net.seed, image_size=image_size):
        images = [ds for ds in study.instances if ds.Modality != "SR"][:1]
        srs = [ds for ds in study.instances if ds.Modality == "SR"] if reports else []
        modalities = tuple(m for m in study.modalities if m != "SR" or reports)
        out.append(replace(study, instances=images + srs, modalities=modalities,
                           report_text=study.report_text if reports else None))
    return out


# -- child processes -----------------------------------------------------------------------------


def die_with_parent(parent_pid: int) -> None:
    """Called first thing in a child: get SIGTERM when the benchmark dies, however it dies."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        raise SystemExit(1)


def _raise_exit(signum: int, _frame: FrameType | None) -> None:
    raise SystemExit(128 + signum)


def exit_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C does, so every ``finally`` (stop children, remove temp dirs) runs."""
    signal.signal(signal.SIGTERM, _raise_exit)


class Child:
    """A ``python -m module`` child that writes a JSON ready file once it serves, and is stopped
    (SIGTERM, then SIGKILL) on :meth:`stop`; its output goes to a log printed if it fails to start."""

    def __init__(self, module: str, args: Sequence[str], workdir: Path, name: str) -> None:
        self.name = name
        self.ready_file = workdir / f"{name}.ready.json"
        self.log_path = workdir / f"{name}.log"
        self._log = self.log_path.open("wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        self.proc = subprocess.Popen(
            [PYTHON, "-m", module, "--ready", str(self.ready_file), "--parent", str(os.getpid()), *args],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, cwd=Path(__file__).resolve().parent.parent)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait_ready(self, timeout_s: float = 120.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while not self.ready_file.exists():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = self.log_path.read_text(errors="replace")[-3000:]
                raise RuntimeError(f"{self.name} did not start (exit {self.proc.returncode}):\n{tail}")
            time.sleep(0.05)
        info: dict[str, Any] = json.loads(self.ready_file.read_text())
        return info

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def write_ready(path: Path, info: dict[str, Any]) -> None:
    """Atomically, so the parent never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(info))
    tmp.replace(path)


def proc_status_kib(pid: int) -> dict[str, int]:
    """VmRSS/VmHWM (peak RSS) etc. of a process, in KiB, from /proc/<pid>/status."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key.startswith("Vm") and value.strip().endswith("kB"):
            out[key] = int(value.split()[0])
    return out


def reset_peak_rss(pid: int) -> bool:
    """Reset VmHWM to the current RSS (Linux ≥ 4.0, ``clear_refs`` 5), so the peak is the request's."""
    try:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
        return True
    except OSError:
        return False


# -- DUO -----------------------------------------------------------------------------------------


def duo_config(workdir: Path, hospitals: Sequence[dict[str, Any]], mitz_url: str, trusted_ca: Path,
               **overrides: dict[str, Any]) -> dict[str, Any]:
    """A raw DUO config (what a TOML file would hold) on loopback with free ports."""
    raw: dict[str, Any] = {
        "gateway": {"home_community_id": DUO_HOME_COMMUNITY_ID, "ura": DUO_URA, "name": "DUO"},
        "listeners": {"http": {"host": HOST, "port": 0}, "dicom": {"host": HOST, "port": 0}},
        "tlb_hospitals": list(hospitals),
        "mitz": {
            "closed_url": f"{mitz_url}/geslotenautorisatievraag/xacml3",
            "open_url": f"{mitz_url}/openautorisatievraag",
            "subscriptions_url": f"{mitz_url}/abonnementen/fhir/Subscription",
        },
        # The benchmark's callers are on plain loopback HTTP: one TLB client, one XCA peer, no certificate.
        # It stands for every clinician of the requesting hospitals: the load runs keep --clients
        # timelines in flight at once, more than a TLB client's default max_concurrent (32).
        "clients": {"tlb": [{"name": "bench-tlb", "certificate": {"absent": True},
                             "uras": [CLAIMS.ura, REQUESTER_PACS.ura], "max_concurrent": 10_000}],
                    "xca": [{"name": "bench-xds", "certificate": {"absent": True},
                             "home_community_id": DEMO_XDS_HOME, "issuer": DEMO_XUA_ISSUER,
                             "signing_certs": [str(trusted_ca.parent / "client.crt")]}]},
        "storage": {"path": str(workdir / "duo")},
        "logging": {"level": "WARNING"},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return raw


def start_duo(workdir: Path, raw_config: dict[str, Any]) -> tuple[Child, dict[str, Any]]:
    """DUO in a process of its own (``bench._duo_process``); returns it and its ready info."""
    cfg = workdir / "duo-config.json"
    cfg.write_text(json.dumps(raw_config, indent=1))
    child = Child("bench._duo_process", ["--config", str(cfg)], workdir, "duo")
    return child, child.wait_ready()


# -- the XDS side: signed SOAP requests ----------------------------------------------------------


@dataclass(frozen=True)
class PreparedRequest:
    content_type: str
    body: bytes


class XdsCaller:
    """Builds requests exactly as an XDS initiating gateway would: a fresh signed XUA assertion each."""

    def __init__(self, pki: Pki) -> None:
        self._key, self._cert = load_signing_pair(pki.client.key, pki.client.cert)

    def assertion(self) -> etree._Element:
        return issue_assertion(CLAIMS, issuer=DEMO_XUA_ISSUER, audience=DUO_HOME_COMMUNITY_ID, key=self._key,
                               cert=self._cert, now=datetime.now(UTC), lifetime_s=1800)

    def request(self, url: str, action: str, body: etree._Element, *, mtom: bool = False) -> PreparedRequest:
        env = build_envelope(
            Addressing(action=action, message_id=new_message_id(), to=url, reply_to=WSA_ANONYMOUS),
            body, [security_header(self.assertion(), datetime.now(UTC), ttl_s=1800)])
        if mtom:
            content_type, mbody = build_mtom(env, [], action)
            return PreparedRequest(content_type, bytes(mbody))
        return PreparedRequest(f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"', serialize(env))


# -- measurements --------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100): p99 of 200 samples is the 198th, an observed value."""
    ordered = sorted(values)
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse_metrics(text: str) -> Samples:
    """Prometheus text → {(sample name, sorted labels): value}."""
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = float(sample.value)
    return out


def histogram_deltas(before: Samples, after: Samples, metric: str,
                     keys: Sequence[str]) -> dict[tuple[str, ...], tuple[float, float]]:
    """(count, sum seconds) per label combination of histogram ``metric`` between two scrapes."""
    out: dict[tuple[str, ...], tuple[float, float]] = {}
    for (name, labels), value in after.items():
        if name != f"{metric}_count":
            continue
        d = dict(labels)
        label_key = tuple(d.get(k, "") for k in keys)
        count = value - before.get((name, labels), 0.0)
        total = after.get((f"{metric}_sum", labels), 0.0) - before.get((f"{metric}_sum", labels), 0.0)
        if count > 0:
            out[label_key] = (count, total)
    return out


def dir_usage(path: Path) -> tuple[int, int]:
    """(bytes, files) under ``path``; files vanishing mid-walk are simply not counted."""
    total = files = 0
    for root, _dirs, names in os.walk(path):
        for name in names:
            try:
                total += os.stat(os.path.join(root, name)).st_size
                files += 1
            except OSError:
                pass
    return total, files


def missing_tools(dcmtk: Sequence[str] = (), *, orthanc: bool = False) -> str | None:
    """What to install before a benchmark can run (printed, exit 2), or None when all is there."""
    for tool in dcmtk:
        if shutil.which(tool) is None:
            return f"DCMTK {tool} is not installed (apt-get install dcmtk)"
    if orthanc and shutil.which("Orthanc") is None and not Path("/usr/sbin/Orthanc").exists():
        return "Orthanc is not installed (apt-get install orthanc)"
    return None


def run_in_workdir(prefix: str, body: Callable[[Path], int], *, workdir: Path | None = None,
                   keep: bool = False) -> int:
    """Run ``body`` in a work directory that is removed afterwards (unless kept), Ctrl-C included:
    a benchmark leaves neither processes (they die with their parent) nor gigabytes of studies."""
    work = (workdir or Path(tempfile.mkdtemp(prefix=prefix))).resolve()
    work.mkdir(parents=True, exist_ok=True)
    try:
        return body(work)
    except KeyboardInterrupt:
        print("interrupted; every process of this benchmark was stopped")
        return 130
    finally:
        if keep:
            print(f"kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
