"""A throwaway PostgreSQL server from Debian's ``postgresql`` package, for tests that need the real thing.

SKIP LOCKED, row locks and the server clock are exactly what a fake would get wrong, so the transfer
store is tested against a real server. It listens on 127.0.0.1 only (plus a unix socket in its own
directory), trusts local connections, and runs with fsync off: a test database never needs to
survive a power cut. PostgreSQL refuses to run as root, so under root it runs as the ``postgres`` user.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from duo_gateway.daemon import free_port

_SUPERUSER = "duo"
_counter = itertools.count(1)


def postgres_bindir() -> Path:
    """The newest installed server's bin directory; skip (fail under CI=true) when there is none."""
    candidates = sorted(Path("/usr/lib/postgresql").glob("*/bin"),
                        key=lambda p: int(p.parent.name) if p.parent.name.isdigit() else 0)
    found = [p for p in candidates if (p / "initdb").is_file() and (p / "postgres").is_file()]
    if not found:
        msg = ("PostgreSQL server not installed (apt-get install postgresql): the transfer store's "
               "multi-replica backend is untested")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return found[-1]


@dataclass(frozen=True)
class Postgres:
    host: str
    port: int
    user: str
    socket_dir: Path

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://{self.user}@{self.host}:{self.port}/{dbname}"

    def create_database(self, prefix: str = "t") -> str:
        """A fresh, empty database; returns its URL. Cheaper than a server per test."""
        import psycopg

        name = f"{prefix}_{os.getpid()}_{next(_counter)}"
        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)


def _as_postgres_user() -> list[str]:
    if os.geteuid() != 0:
        return []
    # setpriv execs (runuser would fork and sit between us and the server's pid and signals).
    return ["setpriv", "--reuid=postgres", "--regid=postgres", "--init-groups", "--"]


@contextlib.contextmanager
def run_postgres() -> Iterator[Postgres]:
    """Start a private server and stop it (fast shutdown) afterwards, whatever happened."""
    bindir = postgres_bindir()
    # Not under pytest's tmp_path: that is root-only (0700) and the postgres user could not enter it.
    workdir = Path(tempfile.mkdtemp(prefix="duo-pg-"))
    data, sock = workdir / "data", workdir / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        pw = pwd.getpwnam("postgres")
        for path in (workdir, sock):
            os.chown(path, pw.pw_uid, pw.pw_gid)
    proc: subprocess.Popen[bytes] | None = None
    log = workdir / "server.log"
    try:
        subprocess.run([*_as_postgres_user(), str(bindir / "initdb"), "-D", str(data), "-U", _SUPERUSER,
                        "--auth=trust", "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
                       check=True, capture_output=True, timeout=120)
        port = free_port()
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [*_as_postgres_user(), str(bindir / "postgres"), "-D", str(data), "-p", str(port),
                 "-c", "listen_addresses=127.0.0.1", "-c", f"unix_socket_directories={sock}",
                 "-c", "fsync=off", "-c", "synchronous_commit=off", "-c", "full_page_writes=off",
                 "-c", "max_connections=50", "-c", "shared_buffers=16MB"],
                stdout=out, stderr=subprocess.STDOUT)
        server = Postgres(host="127.0.0.1", port=port, user=_SUPERUSER, socket_dir=sock)
        _wait_ready(server, proc, log)
        yield server
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGINT)  # fast shutdown: disconnect clients, no checkpoint wait
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        shutil.rmtree(workdir, ignore_errors=True)


def _wait_ready(server: Postgres, proc: subprocess.Popen[bytes], log: Path, timeout_s: float = 30) -> None:
    import psycopg

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"postgres exited with {proc.returncode}:\n{log.read_text(errors='replace')}")
        try:
            with psycopg.connect(server.url(), connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"postgres not ready after {timeout_s}s:\n"
                                   f"{log.read_text(errors='replace')}") from None
            time.sleep(0.05)
