"""A loopback HTTP origin server for the DICOMweb codec tests: what the codec writes, served as is, so
``dicomweb-client`` (an independent DICOMweb client) reads it exactly as it reads a real archive."""

from __future__ import annotations

import threading
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from io import BytesIO
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite

from duo_gateway.sim.config import default_network
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from tests.support.orthanc import Orthanc, run_orthanc


@dataclass
class Origin:
    """Answers GET ``path`` with a fixed body, or one made from the request target (path and query); a
    body given in pieces goes out one chunk per piece (chunked transfer coding), the way a streaming
    route sends a multipart answer as it is made."""

    url: str
    routes: dict[str, tuple[str, bytes | Sequence[bytes]] | Callable[[str], tuple[str, bytes]]] = \
        field(default_factory=dict)
    accept_headers: list[str] = field(default_factory=list)
    targets: list[str] = field(default_factory=list)  # each request's path and query, as sent

    def serve(self, path: str, content_type: str, body: bytes | Sequence[bytes]) -> None:
        self.routes[path] = (content_type, body)

    def answer(self, path: str, respond: Callable[[str], tuple[str, bytes]]) -> None:
        self.routes[path] = respond


@pytest.fixture
def origin() -> Iterator[Origin]:
    state = Origin(url="")

    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:
            state.accept_headers.append(self.headers.get("Accept", ""))
            state.targets.append(self.path)
            path = self.path.partition("?")[0]
            if path not in state.routes:
                self.send_error(404)
                return
            route = state.routes[path]
            content_type, body = route(self.path) if callable(route) else route
            self.send_response(200)
            self.send_header("Content-Type", content_type)
            if isinstance(body, bytes):
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            for piece in body:
                if piece:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            self.wfile.write(b"0\r\n\r\n")

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    state.url = f"http://127.0.0.1:{server.server_address[1]}/dicom-web"
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield state
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture(scope="session")
def ct_study() -> GeneratedStudy:
    """A generated CT study with its report (index 0 of the default network's first patient)."""
    net = default_network()
    study = generate_studies(net.patients[0], net.hospitals[0], 1, net.seed, image_size=32)[0]
    assert study.modalities == ("CT", "SR")
    return study


@pytest.fixture(scope="session")
def ct(ct_study: GeneratedStudy) -> Dataset:
    return next(ds for ds in ct_study.instances if ds.Modality == "CT")


@pytest.fixture(scope="session")
def report(ct_study: GeneratedStudy) -> Dataset:
    return next(ds for ds in ct_study.instances if ds.Modality == "SR")


@contextmanager
def dicomweb_orthanc(workdir: Path, instances: Sequence[Dataset]) -> Iterator[Orthanc]:
    """Orthanc with its DICOMweb plugin (the Debian orthanc-dicomweb package), holding ``instances``:
    the independent QIDO-RS and WADO-RS implementation the codec's answers are compared with."""
    options: dict[str, object] = {"Plugins": ["/usr/share/orthanc/plugins/libOrthancDicomWeb.so"],
                                  "DicomWeb": {"Enable": True, "Root": "/dicom-web/"}}
    with run_orthanc(workdir, options=options) as peer:
        for ds in instances:
            buffer = BytesIO()
            dcmwrite(buffer, ds, enforce_file_format=True)
            request = urllib.request.Request(f"http://{peer.host}:{peer.http_port}/instances",
                                             data=buffer.getvalue(), method="POST")
            with urllib.request.urlopen(request, timeout=10) as answer:
                answer.read()
        yield peer
