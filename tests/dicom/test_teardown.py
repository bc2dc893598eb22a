"""The teardown shim: pynetdicom's fixed 10 ms (kill) and 100 ms (abort) sleeps are gone, releases and
aborts still end the association on both sides, and any pynetdicom but the verified one keeps its own."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from types import SimpleNamespace

import pytest
from pynetdicom import AE, association, evt
from pynetdicom.association import Association
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from duo_gateway.dicom import teardown
from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.dicom.teardown import PYNETDICOM_METHODS, install_fast_teardown, is_installed


class _Peer:
    """An echo SCP that notes how each association ended."""

    def __init__(self) -> None:
        self.ended: list[str] = []
        self.event = threading.Event()
        ae = AE(ae_title="TEARDOWN_SCP")
        ae.add_supported_context(Verification)
        self.server = start_acceptor(ae, ("127.0.0.1", 0), evt_handlers=[
            (evt.EVT_RELEASED, lambda _e: self._end("released")),
            (evt.EVT_ABORTED, lambda _e: self._end("aborted"))])

    def _end(self, how: str) -> None:
        self.ended.append(how)
        self.event.set()

    def associate(self) -> Association:
        self.event.clear()
        ae = AE(ae_title="TEARDOWN_SCU")
        ae.add_requested_context(Verification)
        assoc = ae.associate("127.0.0.1", int(self.server.server_address[1]), ae_title="TEARDOWN_SCP")
        assert assoc.is_established
        assert assoc.send_c_echo().Status == 0x0000
        return assoc


@pytest.fixture(scope="module")
def peer() -> Iterator[_Peer]:
    assert install_fast_teardown()
    p = _Peer()
    yield p
    p.server.shutdown()


@pytest.fixture
def sleeps(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Every time.sleep of the teardown code (pynetdicom's association module and the shim)."""
    seen: list[float] = []

    def sleep(seconds: float) -> None:
        seen.append(seconds)
        time.sleep(seconds)

    for module in (association, teardown):
        monkeypatch.setattr(module, "time", SimpleNamespace(sleep=sleep, monotonic=time.monotonic))
    return seen


def test_installed_on_the_verified_pynetdicom() -> None:
    assert install_fast_teardown() and is_installed()
    assert install_fast_teardown(), "idempotent"


@pytest.mark.parametrize("how", ["released", "aborted"])
def test_teardown_ends_both_sides_without_the_fixed_sleeps(peer: _Peer, sleeps: list[float],
                                                           how: str) -> None:
    assoc = peer.associate()
    if how == "released":
        assoc.release()
        assert assoc.is_released
    else:
        assoc.abort()
        assert assoc.is_aborted
    assert not assoc.is_established and not assoc.dul.is_alive()
    assert peer.event.wait(5) and peer.ended[-1] == how
    assert all(s <= teardown.KILL_POLL_S for s in sleeps), sleeps


def test_another_pynetdicom_keeps_its_own_methods(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, original in PYNETDICOM_METHODS.items():
        monkeypatch.setattr(Association, name, original)
    monkeypatch.setitem(teardown.VERIFIED_SOURCES, "kill", "0" * 64)
    assert not install_fast_teardown()
    assert all(getattr(Association, name) is fn for name, fn in PYNETDICOM_METHODS.items())
    assert not is_installed()

