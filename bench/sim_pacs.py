"""Simulated PACS throughput against DCMTK measured in the same run.

Baseline: DCMTK storescu → DCMTK storescp (the fastest path on this machine, dicom.md §2). Measured:
the same files into the simulated PACS (C-STORE ingest), and a C-MOVE of all of them out of it into
storescp. The simulated PACS is a test peer, not the product; the ratio tells whether tests and demos
that push studies through it are bounded by it, and the TCP_NODELAY row shows the 40 ms Nagle stall
that every DICOM socket of the project must avoid.

Then C-FIND latency: DUO's Q/R client (``dicom/qr.py``, the path of every timeline and ITI-38) asks
the simulated PACS for one patient's 50 studies, each time on a new association as the product does:
p50/p90 of the whole find, of associating and releasing alone, and the CPU of both ends (one
process) per find. Most of a find is CPU: pynetdicom encoding and decoding 50 identifiers under one
GIL; the association itself was ~130 ms before the acceptor stopped deep-copying its contexts.

Usage: python -m bench.sim_pacs [--count 200] [--size 128] [--finds 30]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid

from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.daemon import free_port
from duo_gateway.dicom.nodelay import install_tcp_nodelay
from duo_gateway.dicom.qr import QrClient
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.config import SimHospital, SimInstitution, default_network
from duo_gateway.sim.network import HOST
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import generate_studies, write_study

ENV = {**os.environ, "TCP_NODELAY": "1"}


def make_instances(folder: Path, count: int, size: int) -> int:
    """``count`` copies of one generated CT image with fresh UIDs (dicom.md §5)."""
    net = default_network()
    inst = SimInstitution(ura="00010001", name="Bench")
    study = next(s for s in generate_studies(net.patients[0], inst, 8, net.seed, image_size=size)
                 if "CT" in s.modalities)
    template_dir = folder / "template"
    template = next(p for p in write_study(study, template_dir) if dcmread(p).Modality == "CT")
    ds = dcmread(template)
    study_uid, series_uid = generate_uid(), generate_uid()
    total = 0
    for i in range(count):
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study_uid, series_uid
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = i + 1
        out = folder / "send" / f"{i:05d}.dcm"
        out.parent.mkdir(parents=True, exist_ok=True)
        ds.save_as(out, enforce_file_format=True)
        total += out.stat().st_size
    shutil.rmtree(template_dir)
    return total


def storescu(files: Path, ae: str, port: int) -> float:
    started = time.perf_counter()
    subprocess.run(["storescu", "-aet", "BENCH", "-aec", ae, "+sd", HOST, str(port), str(files)],
                   check=True, env=ENV, capture_output=True)
    return time.perf_counter() - started


class StoreScp:
    def __init__(self, folder: Path) -> None:
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self.folder = folder
        self.proc = subprocess.Popen(["storescp", "-aet", "STORESCP", "-od", str(folder), "+uf",
                                      str(self.port)], env=ENV, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection((HOST, self.port), timeout=0.2).close()
                return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("storescp did not start")

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


async def _find_latency(port: int, ae_title: str, finds: int) -> dict[str, list[float]]:
    client = QrClient("BENCH", HOST, port, ae_title, timeout_s=30)
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = default_network().patients[0].bsn
    query.StudyInstanceUID = ""
    query.StudyDate = ""
    query.ModalitiesInStudy = ""
    times: dict[str, list[float]] = {"find": [], "cpu": [], "associate": [], "release": []}
    for _ in range(finds):
        started, cpu = time.perf_counter(), time.process_time()
        matches = await client.find_all(query)
        times["find"].append(time.perf_counter() - started)
        times["cpu"].append(time.process_time() - cpu)
        assert len(matches) == 50, f"{len(matches)} matches, not 50"
    for _ in range(finds):
        started = time.perf_counter()
        async with client.associate():
            associated = time.perf_counter()
        times["associate"].append(associated - started)
        times["release"].append(time.perf_counter() - associated)
    return times


def find_latency(work: Path, finds: int) -> dict[str, float]:
    """One patient's 50 studies in a SimPacs, asked ``finds`` times through DUO's QrClient."""
    net = default_network()
    hospital = SimHospital(ura="00010001", name="Bench", ae_title="BENCH_PACS",
                           repository_unique_id="2.16.528.1.1007.99.1.1")
    pacs = SimPacs(hospital, work / "pacs-find")
    pacs.preload(generate_studies(net.patients[0], SimInstitution(ura=hospital.ura, name=hospital.name),
                                  50, net.seed, image_size=8))
    pacs.start()
    try:
        times = asyncio.run(_find_latency(pacs.port, hospital.ae_title, finds))
    finally:
        pacs.stop()

    def pct(values: list[float], p: float) -> float:
        ordered = sorted(values)
        return ordered[min(len(ordered) - 1, int(p * len(ordered)))] * 1000

    print(f"\nC-FIND, 50 study matches, DUO's QrClient -> SimPacs, new association each ({finds} finds)")
    print(f"{'':<28} {'p50 ms':>8} {'p90 ms':>8}")
    for label, key in (("whole find", "find"), ("CPU per find (both ends)", "cpu"),
                       ("associate", "associate"), ("release", "release")):
        print(f"{label:<28} {pct(times[key], 0.5):8.1f} {pct(times[key], 0.9):8.1f}")
    return {f"find_{key}_p50_ms": round(pct(times[key], 0.5), 2)
            for key in ("find", "cpu", "associate", "release")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--size", type=int, default=128)
    parser.add_argument("--finds", type=int, default=30)
    args = parser.parse_args()
    configure_logging(LoggingConfig(level="WARNING"))
    if shutil.which("storescu") is None:
        print("DCMTK is not installed (apt-get install dcmtk)")
        return 2
    work = Path(tempfile.mkdtemp(prefix="duo-bench-"))
    try:
        size = make_instances(work, args.count, args.size)
        send = work / "send"
        mb = size / 1e6
        rows: list[tuple[str, float]] = []

        scp = StoreScp(work / "baseline")
        try:
            rows.append(("DCMTK storescu → storescp (baseline)", storescu(send, "STORESCP", scp.port)))
        finally:
            scp.stop()

        hospital = SimHospital(ura="00010001", name="Bench", ae_title="BENCH_PACS",
                               repository_unique_id="2.16.528.1.1007.99.1.1")
        for nodelay in (True, False):
            install_tcp_nodelay(nodelay)
            pacs = SimPacs(hospital, work / f"pacs-{nodelay}")
            pacs.start()
            try:
                label = "storescu → SimPacs C-STORE" + ("" if nodelay else " (Nagle on: no TCP_NODELAY)")
                rows.append((label, storescu(send, "BENCH_PACS", pacs.port)))
                if nodelay:
                    dest = StoreScp(work / "moved")
                    pacs.add_move_destination("STORESCP", HOST, dest.port)
                    started = time.perf_counter()
                    study_uid = dcmread(next(send.iterdir())).StudyInstanceUID
                    subprocess.run(["movescu", "-S", "-aet", "BENCH", "-aec", "BENCH_PACS",
                                    "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                                    "-k", f"StudyInstanceUID={study_uid}", HOST, str(pacs.port)],
                                   check=True, env=ENV, capture_output=True)
                    rows.append(("SimPacs C-MOVE → storescp", time.perf_counter() - started))
                    moved = len(list((work / "moved").iterdir()))
                    dest.stop()
                    assert moved == args.count, f"C-MOVE delivered {moved} of {args.count}"
            finally:
                pacs.stop()
        install_tcp_nodelay(True)

        base = rows[0][1]
        print(f"{args.count} CT instances of {args.size}x{args.size} ({mb:.1f} MB), loopback, "
              "TCP_NODELAY=1 on DCMTK")
        print(f"{'path':<56} {'seconds':>8} {'inst/s':>8} {'MB/s':>8} {'× baseline time':>16}")
        for label, secs in rows:
            print(f"{label:<56} {secs:8.2f} {args.count / secs:8.0f} {mb / secs:8.1f} {secs / base:16.1f}")
        result: dict[str, object] = {
            "instances": args.count, "mb": round(mb, 1),
            "paths": {label: {"seconds": round(secs, 3), "ratio_time_storescu": round(secs / base, 2)}
                      for label, secs in rows}}
        result.update(find_latency(work, args.finds))
        print("RESULT " + json.dumps(result, sort_keys=True))
        return 0
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    raise SystemExit(main())
