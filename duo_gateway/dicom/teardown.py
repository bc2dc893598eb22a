"""Association teardown without pynetdicom's fixed sleeps: 10 ms per release, 100 ms per abort.

pynetdicom ends an association in ``Association.kill``, which polls for its DUL thread to stop with
``time.sleep(0.01)``: the DUL reaches its idle state within about a millisecond of the A-RELEASE-RP,
yet the caller waits a full 10 ms poll. ``Association.abort`` (the blocking form, outside event
handlers) then adds a flat ``time.sleep(0.1)`` after kill has already waited for the DUL thread to
end and the socket is shut down. DUO itself no longer runs pynetdicom associations (its Q/R SCU, C-STORE
SCU, C-ECHO and storage SCP are on :mod:`duo_gateway.dicom.ul`); the simulated PACS (``sim/pacs.py``)
does, and in the tests and the demo every query reaches it, so those waits still add up there.

This module replaces the two methods with copies that differ only in those waits (kill polls every
millisecond, as pynetdicom's own ``stop_dul`` does; abort does not sleep after kill). Because the
copies must stay copies, they are installed only when the originals are, character for character,
the code they were made from (a fingerprint of their source); any other pynetdicom keeps its own
methods, slower but correct, and a warning says so. The switch is process-wide and idempotent.
"""

from __future__ import annotations

import contextlib
import hashlib
import inspect
import threading
import time
from collections.abc import Callable
from typing import Any, cast

import structlog
from pynetdicom import evt
from pynetdicom.association import LOGGER, Association
from pynetdicom.transport import AssociationSocket

log = structlog.get_logger(__name__)

#: SHA-256 of ``inspect.getsource`` of pynetdicom 3.0.4's ``Association.kill`` and
#: ``Association._abort_blocking``: the code the replacements below were copied from.
VERIFIED_SOURCES = {
    "kill": "8f9713666a7f4cffd840899f023090e9786668945a7c844f99d7a834077c3972",
    "_abort_blocking": "10b43ef8c63c67649b7d82f3af2aa55b6798149a007ab758d11e7286ff4168d8",
}
#: How often kill looks whether the DUL thread has stopped (pynetdicom: 10 ms).
KILL_POLL_S = 0.001

_MARKER = "__duo_fast_teardown__"
_lock = threading.Lock()
#: pynetdicom's own methods, as found when this module was imported (before any replacement).
PYNETDICOM_METHODS: dict[str, Callable[..., Any]] = {name: getattr(Association, name)
                                                     for name in VERIFIED_SOURCES}


def source_fingerprint(fn: Callable[..., Any]) -> str:
    return hashlib.sha256(inspect.getsource(fn).encode("utf-8")).hexdigest()


def is_installed() -> bool:
    return all(getattr(getattr(Association, name), _MARKER, False) for name in VERIFIED_SOURCES)


def install_fast_teardown() -> bool:
    """Replace kill and the blocking abort when pynetdicom's are the verified code; True once done."""
    with _lock:
        if is_installed():
            return True
        changed = [name for name, digest in VERIFIED_SOURCES.items()
                   if source_fingerprint(PYNETDICOM_METHODS[name]) != digest
                   or getattr(Association, name) is not PYNETDICOM_METHODS[name]]
        if changed:
            log.warning("fast_teardown_not_installed", changed=changed,
                        reason="pynetdicom's teardown code is not the verified one: its own sleeps stay")
            return False
        setattr(Association, "kill", _kill)  # noqa: B010
        setattr(Association, "_abort_blocking", _abort_blocking)  # noqa: B010
        log.info("fast_teardown_installed")
        return True


def _kill(self: Association) -> None:
    """pynetdicom 3.0.4's ``Association.kill`` polling every :data:`KILL_POLL_S`."""
    # Ensure the reactor is running so it can be exited
    self._reactor_checkpoint.set()
    self._kill = True
    self.is_established = False
    self._is_paused = True
    while self.dul.is_alive() and not self.dul.stop_dul():
        time.sleep(KILL_POLL_S)


def _abort_blocking(self: Association, block: bool = True) -> None:
    """pynetdicom 3.0.4's ``Association._abort_blocking`` without the final 100 ms sleep: by then
    kill has waited for the DUL thread to end and the socket is shut down."""
    if self._sent_abort:
        return
    if self.is_released:
        return
    # Set before restarting the reactor to prevent race condition
    self._sent_abort = True
    # Ensure the reactor is running so it can be exited
    self._reactor_checkpoint.set()
    LOGGER.info("Aborting Association")
    self.acse.send_abort(0x00)
    evt.trigger(self, evt.EVT_ABORTED, {})
    if block is False:
        return
    self.kill()
    # as pynetdicom: the socket may already be gone
    with contextlib.suppress(Exception):
        cast(AssociationSocket, self.dul.socket)._shutdown_socket()


for _fn in (_kill, _abort_blocking):
    setattr(_fn, _MARKER, True)
