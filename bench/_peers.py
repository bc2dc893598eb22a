"""DUO's peers for the benchmarks in a process of their own: the Mitz simulator and SimPacs hospitals.

``python -m bench._peers --workdir DIR --hospitals 2 --studies 50`` preloads each hospital with the
consenting patient's studies (:func:`bench._harness.bench_studies`), serves Mitz over HTTP and the
PACSes over DICOM on free loopback ports, and writes them to the ready file. Out of the benchmark
process so that answering C-FINDs (pynetdicom threads) and consent questions does not share a GIL
with the client that measures DUO, nor with DUO. ``--hospitals 0`` runs Mitz alone.
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from aiohttp import web

from bench._harness import bench_studies, die_with_parent, network, write_ready
from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.daemon import stop_on_signals
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.network import DUO_HOME_COMMUNITY_ID, HOST
from duo_gateway.sim.pacs import SimPacs


async def run(args: argparse.Namespace) -> int:
    net = network()
    stop = stop_on_signals()
    runner = web.AppRunner(MitzSimulator(net, tlb_home_community_id=DUO_HOME_COMMUNITY_ID).app())
    await runner.setup()
    pacs: list[SimPacs] = []
    try:
        await web.TCPSite(runner, HOST, 0).start()
        mitz_url = f"http://{HOST}:{runner.addresses[0][1]}"
        hospitals = []
        for h in net.hospitals[: args.hospitals]:
            p = SimPacs(h, args.workdir / "pacs" / h.ae_title)
            studies = bench_studies(net, h, args.studies, args.image_size, args.reports)
            await asyncio.to_thread(p.preload, studies)
            await asyncio.to_thread(p.start)
            pacs.append(p)
            hospitals.append({"ura": h.ura, "name": h.name, "ae_title": h.ae_title, "port": p.port,
                              "repository_unique_id": h.repository_unique_id,
                              "instances": p.instance_count()})
        write_ready(args.ready, {"mitz_url": mitz_url, "hospitals": hospitals})
        await stop.wait()
    finally:
        for p in pacs:
            await asyncio.to_thread(p.stop)
        await runner.cleanup()
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--hospitals", type=int, default=2)
    parser.add_argument("--studies", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--reports", action="store_true")
    args = parser.parse_args()
    die_with_parent(args.parent)
    configure_logging(LoggingConfig(level="WARNING"))
    return asyncio.run(run(args))


if __name__ == "__main__":
    raise SystemExit(main())
