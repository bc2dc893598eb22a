from __future__ import annotations

import socket
import threading
from collections.abc import Iterator
from typing import Any

import pynetdicom
import pytest
from pynetdicom import AE, evt, transport
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from duo_gateway.dicom import nodelay
from duo_gateway.dicom.nodelay import (
    UnsupportedPynetdicomError,
    ensure_tcp_nodelay,
    install_tcp_nodelay,
    is_installed,
    tcp_nodelay_enabled,
)


def _nodelay(sock: socket.socket) -> int:
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY)


class _Scp:
    """An echo SCP that records TCP_NODELAY of each socket it accepts, seen from inside its handler."""

    def __init__(self) -> None:
        self.accepted: list[int] = []
        self.seen = threading.Event()
        ae = AE(ae_title="NODELAY_SCP")
        ae.add_supported_context(Verification)
        server = ae.start_server(
            ("127.0.0.1", 0), block=False, evt_handlers=[(evt.EVT_CONN_OPEN, self._on_open)]
        )
        assert server is not None
        self.server = server
        self.port: int = server.server_address[1]

    def _on_open(self, event: Any) -> None:
        self.accepted.append(_nodelay(event.assoc.dul.socket.socket))
        self.seen.set()

    def echo(self) -> int:
        """C-ECHO once and return TCP_NODELAY of the SCU's own outgoing socket."""
        self.seen.clear()
        ae = AE(ae_title="NODELAY_SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", self.port, ae_title="NODELAY_SCP")
        assert assoc.is_established
        try:
            assert assoc.dul.socket is not None and assoc.dul.socket.socket is not None
            outgoing = _nodelay(assoc.dul.socket.socket)
            status = assoc.send_c_echo()
            assert status.Status == 0x0000
        finally:
            assoc.release()
        assert self.seen.wait(5)
        return outgoing


@pytest.fixture
def scp() -> Iterator[_Scp]:
    server = _Scp()
    yield server
    server.server.shutdown()
    install_tcp_nodelay(True)  # leave the process as every other module expects it


def test_nodelay_set_on_outgoing_and_accepted_sockets(scp: _Scp) -> None:
    install_tcp_nodelay(True)
    assert tcp_nodelay_enabled()
    outgoing = scp.echo()
    assert outgoing != 0
    assert scp.accepted and scp.accepted[-1] != 0


def test_switching_off_leaves_nagle_on_for_new_sockets(scp: _Scp) -> None:
    """The control case: proves the checks above observe the patch, not a kernel default."""
    install_tcp_nodelay(False)
    assert not tcp_nodelay_enabled()
    assert scp.echo() == 0
    assert scp.accepted[-1] == 0
    install_tcp_nodelay(True)
    assert scp.echo() != 0
    assert scp.accepted[-1] != 0


def test_ensure_keeps_a_deliberate_choice(monkeypatch: pytest.MonkeyPatch) -> None:
    try:
        install_tcp_nodelay(False)
        ensure_tcp_nodelay()  # what a simulator or helper calls: must not undo the daemon's False
        assert not tcp_nodelay_enabled()
    finally:
        install_tcp_nodelay(True)
    # in a process where nobody chose yet, ensure switches it on
    monkeypatch.setattr(nodelay, "_chosen", False)
    monkeypatch.setattr(nodelay, "_enabled", False)
    ensure_tcp_nodelay()
    assert tcp_nodelay_enabled()


def test_double_install_does_not_double_wrap() -> None:
    install_tcp_nodelay(True)
    create = transport.AssociationSocket._create_socket
    get_request = transport.AssociationServer.get_request
    install_tcp_nodelay(True)
    install_tcp_nodelay()
    assert is_installed()
    assert transport.AssociationSocket._create_socket is create
    assert transport.AssociationServer.get_request is get_request
    # exactly one layer: the wrapped function is pynetdicom's own, not another wrapper
    for wrapper in (create, get_request):
        inner = getattr(wrapper, "__wrapped__", None)
        assert inner is not None, "not wrapped at all"
        assert inner.__module__ == "pynetdicom.transport"
        assert not hasattr(inner, "__wrapped__")


def test_refuses_an_unverified_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(UnsupportedPynetdicomError, match=r"3\.1\.0"):
        install_tcp_nodelay(True)


def test_installed_pynetdicom_is_the_supported_one() -> None:
    assert pynetdicom.__version__.startswith("3.0.")
