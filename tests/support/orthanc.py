"""Orthanc (Debian package) as the independent PACS peer: one fresh instance per test on free ports."""

from __future__ import annotations

import glob
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def orthanc_binary() -> str:
    path = shutil.which("Orthanc") or ("/usr/sbin/Orthanc" if os.path.exists("/usr/sbin/Orthanc") else None)
    if path is None:
        msg = "Orthanc not installed (apt-get install orthanc): interop with a real PACS untested"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


#: Where Debian's orthanc-dicomweb puts the plugin: the unversioned link first, the library it names
#: after (a packaging change that drops the link must not silently untest DICOMweb).
_DICOMWEB_PLUGIN_GLOBS = ("/usr/share/orthanc/plugins/libOrthancDicomWeb.so",
                          "/usr/lib/orthanc/libOrthancDicomWeb.so*")
#: The plugin's root as its Debian configuration and Orthanc's documentation have it.
DICOMWEB_ROOT = "/dicom-web/"


def dicomweb_plugin() -> str:
    """Path of Orthanc's DICOMweb plugin; skip loudly without it, fail under CI where `make test`
    installs it."""
    for pattern in _DICOMWEB_PLUGIN_GLOBS:
        found = sorted(glob.glob(pattern))
        if found:
            return found[0]
    msg = "Orthanc's DICOMweb plugin not installed (apt-get install orthanc-dicomweb): DICOMweb untested"
    if os.environ.get("CI") == "true":
        pytest.fail(msg)
    pytest.skip(msg)


@dataclass(frozen=True)
class Orthanc:
    ae_title: str
    host: str
    dicom_port: int
    http_port: int
    #: ``http://host:port/dicom-web`` (no trailing slash) when started with ``dicomweb=True``.
    dicomweb_root: str | None = None

    def rest(self, path: str) -> object:
        with urllib.request.urlopen(f"http://{self.host}:{self.http_port}{path}", timeout=10) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object) -> object:
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}{path}",
                                         data=json.dumps(body).encode(), method="POST",
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=10) as r:
            return json.loads(r.read())

    def upload(self, part10: bytes) -> object:
        """Store one Part 10 file over REST: unlike a C-STORE, in whatever syntax the file has, with no
        presentation context to negotiate."""
        request = urllib.request.Request(f"http://{self.host}:{self.http_port}/instances", data=part10,
                                         method="POST", headers={"Content-Type": "application/dicom"})
        with urllib.request.urlopen(request, timeout=30) as r:
            return json.loads(r.read())


@contextmanager
def run_orthanc(workdir: Path, *, ae_title: str = "ORTHANC",
                modalities: dict[str, tuple[str, str, int]] | None = None,
                nodelay: bool = True, options: dict[str, object] | None = None,
                dicomweb: bool = False) -> Iterator[Orthanc]:
    """Start Orthanc with its index and storage in ``workdir``; ``modalities`` are C-MOVE destinations,
    ``options`` further configuration entries (e.g. ``AcceptedTransferSyntaxes``). ``dicomweb`` loads
    the DICOMweb plugin at :data:`DICOMWEB_ROOT`: the reference DICOMweb server the viewer test and the
    benchmark hold DUO's own routes against.

    Orthanc binds 0.0.0.0 (no listen-address option in 1.10); DicomCheckModalityHost and the disabled
    remote HTTP access keep it to loopback peers.
    """
    binary = orthanc_binary()
    plugins = [dicomweb_plugin()] if dicomweb else []
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port, http_port = _free_port(), _free_port()
    config = {
        "Name": "DUO_TEST", "StorageDirectory": str(workdir), "IndexDirectory": str(workdir),
        "HttpServerEnabled": True, "HttpPort": http_port, "RemoteAccessAllowed": False,
        "AuthenticationEnabled": False, "DicomServerEnabled": True, "DicomAet": ae_title,
        "DicomPort": dicom_port, "DicomCheckCalledAet": True, "DicomAlwaysAllowEcho": True,
        "DicomAlwaysAllowStore": True, "DicomAlwaysAllowFind": True, "DicomAlwaysAllowMove": True,
        "DicomAlwaysAllowGet": True, "DicomCheckModalityHost": False,
        "DicomModalities": {name: {"AET": aet, "Host": host, "Port": port}
                            for name, (aet, host, port) in (modalities or {}).items()},
        "Plugins": plugins, "StableAge": 1, "SaveJobs": False, "ConcurrentJobs": 2,
        # No "Host": the plugin then takes the request's Host header for the URLs it writes into answers
        # (RetrieveURL, BulkDataURI) instead of a hard-coded name.
        **({"DicomWeb": {"Enable": True, "Root": DICOMWEB_ROOT, "EnableWado": False}} if dicomweb else {}),
        **(options or {}),
    }
    cfg_path = workdir / "orthanc.json"
    cfg_path.write_text(json.dumps(config))
    env = {**os.environ, **({"TCP_NODELAY": "1"} if nodelay else {})}
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen([binary, str(cfg_path)], stdout=log, stderr=subprocess.STDOUT, env=env)
    root = f"http://127.0.0.1:{http_port}{DICOMWEB_ROOT.rstrip('/')}" if dicomweb else None
    orthanc = Orthanc(ae_title, "127.0.0.1", dicom_port, http_port, root)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                orthanc.rest("/system")
                with socket.create_connection(("127.0.0.1", dicom_port), timeout=1):
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"Orthanc did not start: see {workdir / 'orthanc.log'}") from None
                time.sleep(0.05)
        if dicomweb and "dicom-web" not in cast(list[str], orthanc.rest("/plugins")):
            # Orthanc starts without a plugin it could not load: say so here, not as a 404 in a browser
            raise RuntimeError(f"Orthanc did not load its DICOMweb plugin: see {workdir / 'orthanc.log'}")
        yield orthanc
    finally:
        # Killed, not terminated: the peer's index and storage go with the test's tmp dir, and a
        # graceful stop costs 3.5 s (Orthanc 1.10's HTTP and DICOM servers wind down on 1-2 s polls).
        proc.kill()
        proc.wait()
        log.close()


def load_with_storescu(orthanc: Orthanc, files: list[str]) -> None:
    """Load files with DCMTK storescu, the independent sender (TCP_NODELAY as in every benchmark)."""
    from tests.support.dcmtk import require_tool

    proc = subprocess.run([require_tool("storescu"), "-aet", "LOADER", "-aec", orthanc.ae_title, orthanc.host,
                           str(orthanc.dicom_port), *files], capture_output=True, text=True,
                          env={**os.environ, "TCP_NODELAY": "1"}, timeout=120)
    assert proc.returncode == 0, proc.stderr


@contextmanager
def orthanc_moving_to(workdir: Path, ae_title: str, files: list[str]) -> Iterator[tuple[Orthanc, int]]:
    """A loaded Orthanc whose C-MOVE destination ``ae_title`` is a loopback port reserved for DUO's own
    storage SCP: (the Orthanc, that port). The SCP itself runs on the test's event loop
    (:func:`own_storage_scp`), as the daemon runs it, so Orthanc's config can name it before it exists."""
    from duo_gateway.daemon import free_port

    port = free_port()
    with run_orthanc(workdir, modalities={"duo": (ae_title, "127.0.0.1", port)}) as orthanc:
        load_with_storescu(orthanc, files)
        yield orthanc, port


@asynccontextmanager
async def own_storage_scp(router: Any, ae_title: str, port: int) -> AsyncIterator[None]:
    """DUO's storage SCP (the asyncio UL acceptor the daemon starts) on ``port``: every C-STORE goes
    through ``router`` (duo_gateway.dicom.qr.MoveRouter) into the spool of the move it belongs to."""
    from duo_gateway.dicom.qr import receiving_syntaxes
    from duo_gateway.dicom.ul.association import AcceptorPolicy, UlServer, verification_supported

    server = UlServer(AcceptorPolicy(ae_title, {**verification_supported(), **receiving_syntaxes()}),
                      router.ul_store)
    await server.start("127.0.0.1", port)
    try:
        yield
    finally:
        await server.close()
