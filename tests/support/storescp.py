"""DCMTK ``storescp`` as an independent destination PACS that keeps every object it was sent.

With ``+uf`` (unique filenames) a second C-STORE of the same SOP Instance UID becomes a second file
instead of overwriting the first, so the directory is a receive log: how often each instance arrived.
``--fork`` serves each association in its own process, so several senders (jobs, DUO replicas) can
store at the same time, as they would into a real PACS.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread

from duo_gateway.daemon import free_port
from tests.support.dcmtk import require_tool
from tests.support.duo_process import HOST


@dataclass(frozen=True)
class StoreScp:
    ae_title: str
    host: str
    port: int
    directory: Path

    def received(self) -> Counter[str]:
        """SOP Instance UID -> how many times it was stored (one file per C-STORE)."""
        counts: Counter[str] = Counter()
        for path in sorted(self.directory.iterdir()):
            if path.is_file() and not path.name.startswith("."):
                ds = dcmread(path, stop_before_pixels=True, specific_tags=["SOPInstanceUID"])
                counts[str(ds.SOPInstanceUID)] += 1
        return counts


@contextmanager
def run_storescp(workdir: Path, ae_title: str = "OWN_PACS",
                 options: Sequence[str] = ()) -> Iterator[StoreScp]:
    """``options`` go to storescp as they are (e.g. ``+xa`` to accept every transfer syntax it knows;
    by default it accepts only the uncompressed ones)."""
    binary = require_tool("storescp")
    directory = workdir / "received"
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = (workdir / "storescp.log").open("wb")
    # start_new_session: --fork children are killed with the listener (whole process group).
    proc = subprocess.Popen([binary, "--fork", "+uf", *options, "-aet", ae_title, "-od", str(directory),
                             str(port)],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                            env={**os.environ, "TCP_NODELAY": "1"})
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                with socket.create_connection((HOST, port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"storescp did not start: see {workdir / 'storescp.log'}") from None
                time.sleep(0.05)
        yield StoreScp(ae_title, HOST, port, directory)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        log.close()


__all__ = ["StoreScp", "run_storescp"]
