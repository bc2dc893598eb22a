"""TCP_NODELAY on every pynetdicom socket, outgoing and accepted.

With Nagle's algorithm on, small DIMSE PDUs wait for the peer's 40 ms delayed ACK: C-STORE crawls at
about 11 instances/s whatever the sender (measured in docs/dicom.md §1, a 10-50x loss). pynetdicom
has no option for it, so this module wraps the two private methods that create its sockets:
``transport.AssociationSocket._create_socket`` (requestor side) and
``transport.AssociationServer.get_request`` (acceptor side).

Because that is private API, the patch refuses to install on any pynetdicom but the minor version it
was written and tested for; a silent no-op after an upgrade would bring the 40 ms stalls back
unnoticed. Call :func:`install_tcp_nodelay` once before creating any AE; it is idempotent, and the
on/off switch is read per socket so a later call with another value takes effect for new sockets.
"""

from __future__ import annotations

import functools
import socket
import threading
from collections.abc import Callable
from typing import Any

import pynetdicom
import structlog
from pynetdicom import transport

log = structlog.get_logger(__name__)

#: The pynetdicom minor version whose private socket API this module patches.
SUPPORTED_PYNETDICOM = "3.0."

_MARKER = "__duo_tcp_nodelay__"
_lock = threading.Lock()
_enabled = False
_chosen = False


class UnsupportedPynetdicomError(RuntimeError):
    """The installed pynetdicom is not the version the socket patch was written for."""


def install_tcp_nodelay(enabled: bool = True) -> None:
    """Make every new pynetdicom socket (outgoing and accepted) set TCP_NODELAY when ``enabled``.

    Safe to call from any thread, any number of times: the wrappers are installed once and only the
    switch changes afterwards. Sockets that already exist keep their setting.
    """
    _check_version()
    with _lock:
        _choose(enabled)


def ensure_tcp_nodelay() -> None:
    """Install with TCP_NODELAY on unless someone already chose: for library code and simulators.

    The switch is process-wide and the last :func:`install_tcp_nodelay` call wins, so a helper that
    calls ``install_tcp_nodelay()`` would silently undo a deliberate ``tcp_nodelay = false`` from the
    daemon's config (e.g. the demo runs simulators and gateway in one process). This keeps that choice.
    """
    _check_version()
    with _lock:
        if not _chosen:
            _choose(True)


def _choose(enabled: bool) -> None:
    """Set the switch and wrap on first enable; the caller holds ``_lock``."""
    global _enabled, _chosen
    _enabled = enabled
    _chosen = True
    if enabled and not is_installed():
        _wrap_create_socket()
        _wrap_get_request()
        log.info("tcp_nodelay_installed", pynetdicom=pynetdicom.__version__)


def _check_version() -> None:
    version = str(getattr(pynetdicom, "__version__", ""))
    if not version.startswith(SUPPORTED_PYNETDICOM):
        raise UnsupportedPynetdicomError(
            f"duo_gateway.dicom.nodelay patches private pynetdicom {SUPPORTED_PYNETDICOM}x socket API, "
            f"found pynetdicom {version or 'unknown'}: re-verify transport.AssociationSocket._create_socket "
            "and transport.AssociationServer.get_request, then update SUPPORTED_PYNETDICOM"
        )


def is_installed() -> bool:
    """Whether both wrappers are in place (whatever the switch says)."""
    return all(
        getattr(fn, _MARKER, False)
        for fn in (transport.AssociationSocket._create_socket, transport.AssociationServer.get_request)
    )


def tcp_nodelay_enabled() -> bool:
    return _enabled and is_installed()


def nodelay_wanted() -> bool:
    """The process's choice for every DICOM socket: on unless someone explicitly chose off."""
    return _enabled or not _chosen


def apply_tcp_nodelay(sock: socket.socket) -> None:
    """Apply the process's choice to a socket DUO created itself (the asyncio Upper Layer,
    :mod:`duo_gateway.dicom.ul`): same rule as the pynetdicom sockets, both ways, so that
    ``tcp_nodelay = false`` reproduces the stall there too (asyncio switches it on by default)."""
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1 if nodelay_wanted() else 0)
    except OSError as exc:
        log.warning("tcp_nodelay_failed", error=str(exc))


def _set_nodelay(sock: socket.socket) -> socket.socket:
    if _enabled:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError as exc:
            # A socket that cannot take the option still works, only slower: never fail the
            # association over a performance setting.
            log.warning("tcp_nodelay_failed", error=str(exc))
    return sock


def _mark(fn: Callable[..., Any]) -> None:
    setattr(fn, _MARKER, True)


def _wrap_create_socket() -> None:
    original = transport.AssociationSocket._create_socket
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def _create_socket(self: transport.AssociationSocket, address: Any) -> socket.socket:
        return _set_nodelay(original(self, address))

    _mark(_create_socket)
    setattr(transport.AssociationSocket, "_create_socket", _create_socket)  # noqa: B010


def _wrap_get_request() -> None:
    original = transport.AssociationServer.get_request
    if getattr(original, _MARKER, False):
        return

    @functools.wraps(original)
    def get_request(self: transport.AssociationServer) -> tuple[socket.socket, Any]:
        sock, address = original(self)
        return _set_nodelay(sock), address

    _mark(get_request)
    setattr(transport.AssociationServer, "get_request", get_request)  # noqa: B010
