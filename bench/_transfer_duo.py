"""DUO for ``bench.transfer`` in a process of its own, with wall-clock timers around each transfer stage.

``python -m bench._transfer_duo --config cfg.json --ready ready.json --parent PID --stages stages.json``
runs exactly what ``bench._duo_process`` runs (its :func:`~bench._duo_process.run`, the real
:class:`~duo_gateway.daemon.Gateway`), after wrapping a handful of the transfer runner's own
functions with timers, so the benchmark can say where a transfer's time goes without editing DUO:

- ``manifest``: Mitz closed question + the C-FIND walk of the study, or for an XCA source the ITI-39
  of its KOS and the KOS parse (:meth:`JobRunner._manifest`),
- ``consent``: the Mitz part of it (:meth:`TlbStudyFetcher._consent`),
- ``walk``: each C-FIND walk of a TLB source (:meth:`TlbStudyFetcher.manifest`; a walk that listed less
  than the PACS counts is refused and asked again, so its call count shows those retries),
- ``pass``: fetching and relaying every instance (:meth:`JobRunner._pass`); of which
- ``relay``: per instance, everything after it arrived in the spool (:class:`_Relay`), split into
  ``read meta`` (the Part 10 header), ``reconcile`` (local patient id), ``C-STORE`` (to the
  destination, :meth:`StoreClient.store`) and ``mark_stored`` (the job store write: one call per
  group commit of the relays' records, so its call count can be below the instances'),
- ``source wait`` = pass - relay: the relay loop waiting for the source (C-GET/C-MOVE/RAD-75) to deliver,
- ``verify``: stored UIDs against the manifest (:meth:`JobRunner._verify`).

Within a study the fetch runs ahead (pynetdicom's thread, bounded by the window) and the relay runs
as one task per destination association, so relay stages are summed over those parallel relays.
They are written to ``--stages`` (JSON) each time a job's run ends. ``DUO_BENCH_SWITCH_INTERVAL``
sets ``sys.setswitchinterval`` (GIL hand-off; an experiment knob). With ``DUO_BENCH_PROFILE=path``
it also writes a cProfile like ``bench._duo_process`` (same caveats: threads run inline, CPU time).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench._duo_process import serve
from bench._harness import die_with_parent

Stages = dict[str, list[float]]  # name -> [calls, seconds]
_stages: Stages = {}


def _add(name: str, seconds: float) -> None:
    entry = _stages.setdefault(name, [0.0, 0.0])
    entry[0] += 1
    entry[1] += seconds


def _timed_async(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return await fn(*args, **kwargs)
        finally:
            _add(name, time.perf_counter() - started)

    return wrapper


def _timed_sync(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        started = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            _add(name, time.perf_counter() - started)

    return wrapper


def install_timers(stages_file: Path) -> None:
    """Wrap the runner's stages (class attributes and the runner module's imported names)."""
    from duo_gateway.dicom.store_scu import StoreClient
    from duo_gateway.transfer import runner
    from duo_gateway.transfer.fetch_tlb import TlbStudyFetcher
    from duo_gateway.transfer.jobstore import SqlTransferStore

    runner.read_file_meta_info = _timed_sync("read meta", runner.read_file_meta_info)  # type: ignore[attr-defined]
    runner.reconcile_file = _timed_sync("reconcile", runner.reconcile_file)  # type: ignore[attr-defined]
    StoreClient.store = _timed_async("C-STORE", StoreClient.store)  # type: ignore[method-assign]
    # mark_stored is mark_stored_many of one; the relays' group commit calls the latter directly.
    SqlTransferStore.mark_stored_many = _timed_async("mark_stored", SqlTransferStore.mark_stored_many)  # type: ignore[method-assign]
    TlbStudyFetcher._consent = _timed_async("consent", TlbStudyFetcher._consent)  # type: ignore[method-assign]
    # Each call is one walk: more calls than studies are walks refused as incomplete and asked again.
    TlbStudyFetcher.manifest = _timed_async("walk", TlbStudyFetcher.manifest)  # type: ignore[method-assign]
    runner._Relay.__call__ = _timed_async("relay", runner._Relay.__call__)  # type: ignore[method-assign]
    for method, name in (("_manifest", "manifest"), ("_pass", "pass"), ("_verify", "verify")):
        setattr(runner.JobRunner, method, _timed_async(name, getattr(runner.JobRunner, method)))

    job_run = runner.JobRunner.run

    @functools.wraps(job_run)
    async def run_job(self: Any, job: Any) -> Any:
        _stages.clear()
        started = time.perf_counter()
        try:
            return await job_run(self, job)
        finally:
            _add("job", time.perf_counter() - started)
            tmp = stages_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(_stages))
            tmp.replace(stages_file)

    runner.JobRunner.run = run_job  # type: ignore[method-assign]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, required=True)
    parser.add_argument("--ready", type=Path, required=True)
    parser.add_argument("--parent", type=int, required=True)
    parser.add_argument("--stages", type=Path, required=True)
    args = parser.parse_args()
    die_with_parent(args.parent)
    install_timers(args.stages)
    # An experiment knob (bench.transfer --switch-interval): the GIL hand-off interval, 5 ms by default.
    if os.environ.get("DUO_BENCH_SWITCH_INTERVAL"):
        sys.setswitchinterval(float(os.environ["DUO_BENCH_SWITCH_INTERVAL"]))
    return serve(args.config, json.loads(args.config.read_text()), args.ready)


__all__ = ["install_timers", "main"]

if __name__ == "__main__":
    raise SystemExit(main())
