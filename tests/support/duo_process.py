"""DUO as a real OS process for tests: ``python -m duo_gateway serve --config duo.toml``, killable.

The durability tests need what an in-process :class:`~duo_gateway.daemon.Gateway` cannot give: a DUO
that dies by SIGKILL (no ``finally``, no graceful stop, its lease left behind in the job store) and a
second, independent DUO. This starts the same command line an operator runs, from a TOML file written
from the raw config dict the in-process tests use; secrets go in as ``DUO__…`` environment variables,
as the config documentation asks.

Ports are picked free up front (the listeners' addresses must be known before the config is written);
everything binds 127.0.0.1. Each child gets SIGTERM when the test process dies (PR_SET_PDEATHSIG), so a
crashed test run leaves no DUO behind.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp

HOST: Final = "127.0.0.1"
#: A job id no DUO ever issued: the transfer API answers 404 for it once the job store is open.
NIL_JOB: Final = "00000000-0000-4000-8000-000000000000"


# --- a TOML writer for the subset a DUO config uses ---------------------------------------------


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, str | Path):
        return json.dumps(str(value))  # a JSON string is a valid TOML basic string
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    raise TypeError(f"no TOML for {type(value).__name__}")


def _is_table_array(value: Any) -> bool:
    return isinstance(value, list | tuple) and bool(value) and all(isinstance(v, dict) for v in value)


def _toml_table(table: Mapping[str, Any], prefix: list[str], array: bool, out: list[str]) -> None:
    if prefix:
        name = ".".join(json.dumps(p) if not p.replace("_", "").replace("-", "").isalnum() else p
                        for p in prefix)
        out.append(f"\n[[{name}]]" if array else f"\n[{name}]")
    for key, value in table.items():
        if value is None or isinstance(value, dict) or _is_table_array(value):
            continue
        out.append(f"{key} = {_toml_value(value)}")
    for key, value in table.items():
        if isinstance(value, dict):
            _toml_table(value, [*prefix, key], False, out)
    for key, value in table.items():
        if _is_table_array(value):
            for item in value:
                _toml_table(item, [*prefix, key], True, out)


def to_toml(raw: Mapping[str, Any]) -> str:
    """Dicts become tables, lists of dicts arrays of tables, ``None`` is left out (the default)."""
    out: list[str] = []
    _toml_table(raw, [], False, out)
    return "\n".join(out).lstrip("\n") + "\n"


# --- the process ----------------------------------------------------------------------------------


def _die_with_parent() -> None:  # pragma: no cover - runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


@dataclass
class DuoProcess:
    """One DUO daemon. ``start`` may be called again after ``kill``: same config, same storage."""

    workdir: Path
    raw: dict[str, Any]
    #: Extra environment (``DUO__STORAGE__URL``, ``DUO__TIMELINE__STUDY_ID_KEY``, ...).
    env: dict[str, str] = field(default_factory=dict)
    name: str = "duo"
    proc: subprocess.Popen[bytes] | None = None
    starts: int = 0

    def __post_init__(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.config_path = self.workdir / f"{self.name}.toml"
        self.config_path.write_text(to_toml(self.raw))
        http = self.raw["listeners"]["http"]
        prefix = self.raw.get("timeline", {}).get("path_prefix", "/tlb/v1")
        self.http_url = f"http://{http['host']}:{http['port']}"
        self.api = f"{self.http_url}{prefix}"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    @property
    def log_path(self) -> Path:
        return self.workdir / f"{self.name}.{self.starts}.log"

    def log_tail(self, chars: int = 4000) -> str:
        return "".join(p.read_text(errors="replace")[-chars:] for p in
                       sorted(self.workdir.glob(f"{self.name}.*.log")))

    def start(self) -> None:
        """Spawn the daemon (from the calling thread: PDEATHSIG follows the thread that forked)."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        env = {k: v for k, v in os.environ.items() if not k.startswith("DUO__")}
        env.update(self.env)
        with open(self.log_path, "wb") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "duo_gateway", "serve", "--config", str(self.config_path)],
                stdout=log, stderr=subprocess.STDOUT, env=env, cwd=self.workdir,
                preexec_fn=_die_with_parent)

    async def wait_ready(self, session: aiohttp.ClientSession, timeout_s: float = 45.0) -> None:
        """Until the transfer API answers from an open job store (404 for an unknown job).

        /readyz and /healthz answer as soon as the HTTP listener is up, which is before the job store
        is opened and the workers start; a 404 from the store is the first moment a submit works."""
        deadline = time.monotonic() + timeout_s
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}:\n{self.log_tail()}")
            with contextlib.suppress(aiohttp.ClientError, TimeoutError):
                async with session.get(f"{self.api}/transfers/{NIL_JOB}",
                                       timeout=aiohttp.ClientTimeout(total=2)) as r:
                    if r.status == 404:
                        return
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} not ready after {timeout_s}s:\n{self.log_tail()}")
            await asyncio.sleep(0.05)

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs, the job's lease stays behind as after a crash."""
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        """SIGTERM (graceful), SIGKILL if it does not go within the grace period."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


@contextlib.contextmanager
def duo_processes(*duos: DuoProcess) -> Iterator[tuple[DuoProcess, ...]]:
    """Start every DUO (not waiting: see :meth:`DuoProcess.wait_ready`); stop them all afterwards."""
    try:
        for duo in duos:
            duo.start()
        yield duos
    finally:
        for duo in duos:
            duo.stop()


__all__ = ["HOST", "DuoProcess", "duo_processes", "to_toml"]
