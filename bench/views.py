"""A study through a DUO view's DICOMweb root against Orthanc's own DICOMweb plugin, in the same run.

Baseline: Orthanc (Debian ``orthanc-dicomweb``) serves the study locally: the time to the first
frame (the first series' ``metadata``, then ``frames/1`` of its first instance, as a viewer asks) and
the MB/s of a WADO-RS retrieve of the whole study (``multipart/related; type="application/dicom"``),
read as it streams.

Measured, from each source kind, a fresh view each time (so nothing is cached):

- **tlb**: DUO with the same Orthanc as a TLB hospital's PACS (Mitz closed question, C-FIND walk,
  C-GET into the view's cache);
- **xca**: DUO with an XCA community in front of it, which is a second DUO process as that
  community's Responding Imaging Gateway (ITI-39 KOS, RAD-75 answered from the same Orthanc).

First frame: from ``POST /tlb/v1/views`` to the frame's last byte, so it includes consent, the
manifest and the fetch of that instance from the source: what a clinician waits for. MB/s: from
``POST /tlb/v1/views`` to the retrieve's last byte. Every retrieve must hold every instance of the
study exactly once (its parts are counted and their SOP Instance UIDs read); a number is printed only
for a path that delivered the whole study.

Usage: python -m bench.views [--mb 500] [--size 512] [--series 4] [--source tlb xca] [--repeat 1]

Ends with one line ``RESULT {json}``: ``orthanc`` {first_frame_s, mb_s}, ``sources`` {tlb|xca:
{first_frame_s, mb_s, ratio_orthanc}}, ``goals`` and ``all_goals_met`` (first frame < 1.5 s,
MB/s >= 0.4 x Orthanc's).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp

from bench._harness import (
    Child,
    consenting_patient,
    duo_config,
    median,
    missing_tools,
    network,
    run_in_workdir,
    start_duo,
)
from bench.rad75 import BrokenTransfer, Study, load_into_orthanc, make_study
from bench.transfer import PERIOD, REQUESTER, initiating_config
from duo_gateway.sim.network import HOST
from duo_gateway.sim.pki import Pki, make_pki

MB: Final = 1e6
GOAL_FIRST_FRAME_S: Final = 1.5
GOAL_RATIO: Final = 0.4
DICOM_ACCEPT: Final = 'multipart/related; type="application/dicom"; transfer-syntax=*'
FRAME_ACCEPT: Final = "multipart/related; type=application/octet-stream; transfer-syntax=*"
_SOP_UID_TAG: Final = b"\x08\x00\x18\x00UI"


@dataclass(frozen=True)
class Measured:
    first_frame_s: float
    mb_s: float
    seconds: float
    #: DUO: of ``seconds``, making the view (consent, the source's manifest).
    view_s: float = 0.0


async def first_frame(session: aiohttp.ClientSession, root: str, study: Study) -> bytes:
    """What a web viewer asks before it can paint (cornerstone's DICOMweb loader, tests/viewer): the
    series' metadata, then the first instance's frame."""
    series, sops = next(iter(study.series.items()))
    async with session.get(f"{root}/studies/{study.uid}/series/{series}/metadata",
                           headers={"Accept": "application/dicom+json"}) as r:
        metadata = await r.json(content_type=None)
        if r.status != 200 or len(metadata) != len(sops):
            raise BrokenTransfer(f"metadata: HTTP {r.status}, {len(metadata)} of {len(sops)} instances")
    url = f"{root}/studies/{study.uid}/series/{series}/instances/{sops[0]}/frames/1"
    async with session.get(url, headers={"Accept": FRAME_ACCEPT}) as r:
        body = await r.read()
        if r.status != 200:
            raise BrokenTransfer(f"frames/1: HTTP {r.status}: {body[:300]!r}")
    if study.pixels[:64] not in body:
        raise BrokenTransfer("frames/1 does not hold the study's pixels")
    return body


async def retrieve(session: aiohttp.ClientSession, root: str, study: Study) -> int:
    """The whole study as one WADO-RS answer, read as it streams; returns its bytes. Counts the parts
    and reads each part's SOP Instance UID (from its first bytes), so a short or doubled answer fails."""
    async with session.get(f"{root}/studies/{study.uid}", headers={"Accept": DICOM_ACCEPT}) as r:
        if r.status != 200:
            raise BrokenTransfer(f"retrieve: HTTP {r.status}: {(await r.read())[:300]!r}")
        match = re.search(r'boundary="?([^";]+)"?', r.headers.get("Content-Type", ""))
        if match is None:
            raise BrokenTransfer(f"retrieve: not multipart: {r.headers.get('Content-Type')}")
        total = 0
        keep = len(_SOP_UID_TAG) + 2 + 64  # the tag, its length, the longest UID
        tail = b""
        seen: list[str] = []
        async for chunk in r.content.iter_chunked(1024 * 1024):
            total += len(chunk)
            window = tail + chunk
            for found in re.finditer(re.escape(_SOP_UID_TAG), window):
                start = found.end()
                length = int.from_bytes(window[start:start + 2], "little")
                end = start + 2 + length
                # complete here, and not already complete within the previous chunk's tail
                if start + 2 <= len(window) and end <= len(window) and end > len(tail):
                    seen.append(window[start + 2:end].rstrip(b"\0 ").decode())
            tail = window[-keep:]
    uids = [u for u in seen if u in study.sops]
    if sorted(uids) != sorted(study.sops):
        raise BrokenTransfer(f"retrieve: {len(set(uids))} of {study.count} instances, {len(uids)} parts")
    return total


async def via_orthanc(root: str, study: Study) -> Measured:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        started = time.perf_counter()
        await first_frame(session, root, study)
        frame_s = time.perf_counter() - started
        started = time.perf_counter()
        total = await retrieve(session, root, study)
        seconds = time.perf_counter() - started
    return Measured(frame_s, total / MB / seconds, seconds)


async def via_duo(http_url: str, study: Study) -> Measured:
    api = f"{http_url}/tlb/v1"
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=1800)) as session:
        body = {"patient": {"bsn": consenting_patient(network()).bsn},
                "period": {"from": PERIOD[0], "to": PERIOD[1]}, "requester": REQUESTER}
        async with session.post(f"{api}/timeline", json=body) as r:
            timeline = await r.json()
        ids = [s["id"] for s in timeline.get("studies", []) if s.get("study_instance_uid") == study.uid]
        if len(ids) != 1:
            raise BrokenTransfer(f"the timeline lists the study {len(ids)} times: {timeline}")

        async def view() -> str:
            async with session.post(f"{api}/views", json={"studies": ids, "requester": REQUESTER}) as r:
                made = await r.json()
                if r.status != 201:
                    raise BrokenTransfer(f"view: HTTP {r.status}: {made}")
            return str(made["dicomweb"])

        started = time.perf_counter()
        await first_frame(session, await view(), study)
        frame_s = time.perf_counter() - started
        started = time.perf_counter()
        root = await view()
        made_s = time.perf_counter() - started
        total = await retrieve(session, root, study)
        seconds = time.perf_counter() - started
    return Measured(frame_s, total / MB / seconds, seconds, made_s)


def tlb_config(work: Path, orthanc: Any, mitz_url: str, pki: Pki) -> dict[str, Any]:
    hospital = network().hospitals[0]
    tlb = [{"ura": hospital.ura, "name": hospital.name, "ae_title": orthanc.ae_title, "host": HOST,
            "port": orthanc.dicom_port, "repository_unique_id": hospital.repository_unique_id,
            "timeout_s": 60.0}]
    return duo_config(work, tlb, mitz_url, pki.ca_cert)


async def amain(args: argparse.Namespace, work: Path) -> int:
    from tests.support.orthanc import run_orthanc  # the project's Orthanc runner, with the DICOMweb plugin

    study = await asyncio.to_thread(make_study, work / "study", args.mb, args.size, args.series)
    peers = Child("bench._peers", ["--workdir", str(work / "peers"), "--hospitals", "0"], work, "mitz")
    children: list[Child] = []
    results: dict[str, list[Measured]] = {}
    baseline: list[Measured] = []
    try:
        with run_orthanc(work / "orthanc", dicomweb=True) as orthanc:
            await asyncio.to_thread(load_into_orthanc, study, orthanc.ae_title, orthanc.dicom_port, 2)
            shutil.rmtree(study.folder, ignore_errors=True)
            assert orthanc.dicomweb_root is not None
            pki = await asyncio.to_thread(make_pki, work / "pki", "rsa")
            mitz_url = (await asyncio.to_thread(peers.wait_ready))["mitz_url"]
            duo: dict[str, str] = {}
            for name in ("tlb", "responder", "xca"):
                (work / name).mkdir(parents=True, exist_ok=True)
            if "tlb" in args.source:
                child, ready = await asyncio.to_thread(start_duo, work / "tlb",
                                                       tlb_config(work / "tlb", orthanc, mitz_url, pki))
                children.append(child)
                duo["tlb"] = ready["http_url"]
            if "xca" in args.source:
                responder, ready = await asyncio.to_thread(
                    start_duo, work / "responder", tlb_config(work / "responder", orthanc, mitz_url, pki))
                children.append(responder)
                raw = initiating_config(work / "xca", ready["http_url"], mitz_url, pki,
                                        network().hospitals[0].ura)
                child, ready = await asyncio.to_thread(start_duo, work / "xca", raw)
                children.append(child)
                duo["xca"] = ready["http_url"]
            for _ in range(args.repeat):
                baseline.append(await via_orthanc(orthanc.dicomweb_root, study))
                for source, url in duo.items():
                    results.setdefault(source, []).append(await via_duo(url, study))
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await asyncio.to_thread(peers.stop)
    report(args, study, baseline, results)
    return 0


def _med(runs: Sequence[Measured], attr: str) -> float:
    return median([float(getattr(r, attr)) for r in runs])


def report(args: argparse.Namespace, study: Study, baseline: list[Measured],
           results: dict[str, list[Measured]]) -> None:
    print(f"one CT study: {study.count} instances, {study.total_bytes / MB:.0f} MB in {len(study.series)} "
          f"series; medians of {args.repeat}; loopback, 2 cores")
    base_frame, base_mb_s = _med(baseline, "first_frame_s"), _med(baseline, "mb_s")
    print(f"{'path':<44}{'first frame s':>15}{'MB/s':>9}{'x Orthanc':>11}")
    baseline_label = "Orthanc DICOMweb plugin, local (baseline)"
    print(f"{baseline_label:<44}{base_frame:>15.3f}{base_mb_s:>9.1f}{1.0:>11.2f}")
    sources: dict[str, dict[str, float]] = {}
    met = True
    for source, runs in results.items():
        frame, mb_s = _med(runs, "first_frame_s"), _med(runs, "mb_s")
        ratio = mb_s / base_mb_s
        sources[source] = {"first_frame_s": round(frame, 3), "mb_s": round(mb_s, 1),
                           "ratio_orthanc": round(ratio, 3), "view_s": round(_med(runs, "view_s"), 3)}
        met = met and frame < GOAL_FIRST_FRAME_S and ratio >= GOAL_RATIO
        label = {"tlb": "DUO view, TLB source (C-GET from the PACS)",
                 "xca": "DUO view, XCA source (ITI-39 + RAD-75)"}[source]
        print(f"{label:<44}{frame:>15.3f}{mb_s:>9.1f}{ratio:>11.2f}")
    print("first frame: series metadata then frames/1, from POST /views (consent, manifest, fetch) to the "
          "frame's last byte; Orthanc: the two requests alone. MB/s: the whole study's WADO-RS answer, every "
          "instance checked once")
    result = {"instances": study.count, "study_mb": round(study.total_bytes / MB, 1), "repeat": args.repeat,
              "orthanc": {"first_frame_s": round(base_frame, 3), "mb_s": round(base_mb_s, 1)},
              "sources": sources,
              "goals": {"first_frame_s": GOAL_FIRST_FRAME_S, "ratio_orthanc": GOAL_RATIO},
              "all_goals_met": met}
    print("RESULT " + json.dumps(result, sort_keys=True))


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.views", description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=float, default=500.0)
    parser.add_argument("--size", type=int, default=512, help="rows = columns of each CT slice")
    parser.add_argument("--series", type=int, default=4)
    parser.add_argument("--source", nargs="+", choices=("tlb", "xca"), default=["tlb", "xca"])
    parser.add_argument("--repeat", type=int, default=1)
    parser.add_argument("--workdir", type=Path)
    args = parser.parse_args(argv)
    missing = missing_tools(("storescu",), orthanc=True)
    if missing:
        print(missing)
        return 2
    return run_in_workdir("duo-bench-views-", lambda work: asyncio.run(amain(args, work)),
                          workdir=args.workdir)


if __name__ == "__main__":
    raise SystemExit(main())
