"""DUO in a process of its own for the benchmarks: ``python -m bench._duo_process --config cfg.json``.

The same :class:`~duo_gateway.daemon.Gateway` as ``duo-gateway serve``, but it takes the raw config as
JSON (the benchmark writes it; no TOML writer needed) and reports where it listens in a ready file,
because the benchmark lets the OS pick the ports. Separate so DUO's peak RSS (``/proc/<pid>/status``
VmHWM) and CPU are DUO's alone, and it stops on SIGTERM or when the benchmark dies.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
from pathlib import Path
from typing import Any

from bench._harness import die_with_parent, write_ready
from duo_gateway.config.loader import parse_config
from duo_gateway.daemon import Gateway, settle_heap, stop_on_signals
from duo_gateway.observability.logging import configure_logging


async def run(config_path: Path, raw: dict[str, Any], ready: Path) -> int:
    config = parse_config(raw, base_dir=config_path.parent, source=str(config_path), env={})
    configure_logging(config.logging)
    gateway = Gateway(config)
    stop = stop_on_signals()
    try:
        await gateway.start()
        settle_heap()  # as ``duo-gateway serve`` does
        write_ready(ready, {"pid": os.getpid(), "http_url": gateway.http_url,
                            "dicom_port": gateway.dicom_port, "spool_dir": str(gateway.spool_dir)})
        await stop.wait()
    finally:
        await gateway.stop()
    return 0


def serve(config_path: Path, raw: dict[str, Any], ready: Path) -> int:
    """:func:`run`, under cProfile when ``DUO_BENCH_PROFILE=path`` is set (written on a clean stop as
    ``path.<pid>``): where DUO's CPU goes under a benchmark."""
    profile_to = os.environ.get("DUO_BENCH_PROFILE")
    if not profile_to:
        return asyncio.run(run(config_path, raw, ready))
    import cProfile
    import time

    async def inline(func: Any, /, *args: Any, **kwargs: Any) -> Any:
        return func(*args, **kwargs)

    # Worker threads are invisible to cProfile: run their work inline and count CPU, not wall time.
    setattr(asyncio, "to_thread", inline)  # noqa: B010
    profiler = cProfile.Profile(time.process_time)
    profiler.enable()
    try:
        return asyncio.run(run(config_path, raw, ready))
    finally:
        profiler.disable()
        profiler.dump_stats(f"{profile_to}.{os.getpid()}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    args = parser.parse_args()
    die_with_parent(args.parent)
    return serve(args.config, json.loads(args.config.read_text()), args.ready)


if __name__ == "__main__":
    raise SystemExit(main())
