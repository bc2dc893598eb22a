"""The acceptor shim: pynetdicom's per-association copy of the supported contexts stays cheap and
negotiation still works on the shared contexts (pynetdicom 3.0.x, pinned like nodelay.py)."""

from __future__ import annotations

import copy
import socket
import threading
import time
from typing import Any

import pynetdicom
import pytest
from pydicom.uid import ImplicitVRLittleEndian, JPEGBaseline8Bit
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification  # type: ignore[attr-defined]

from duo_gateway.dicom.acceptor import (
    SHUTDOWN_POLL_S,
    PromptAssociationServer,
    SharedContexts,
    shared_contexts,
    start_acceptor,
)
from duo_gateway.dicom.nodelay import UnsupportedPynetdicomError


def _all_storage_ae() -> AE:
    """An SCP as wide as DUO's C-MOVE destination and the simulated PACS: every storage class in
    every transfer syntax, the case where pynetdicom's deep copy cost ~125 ms per association."""
    ae = AE(ae_title="WIDE_SCP")
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        assert cx.abstract_syntax is not None
        ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def _snapshot(contexts: list[Any]) -> list[tuple[Any, ...]]:
    return [(cx.abstract_syntax, list(cx.transfer_syntax), cx.scu_role, cx.scp_role) for cx in contexts]


def test_each_association_gets_the_shared_syntaxes_and_negotiation_leaves_them_untouched() -> None:
    ae = _all_storage_ae()
    seen: list[list[Any]] = []
    done = threading.Event()

    def on_echo(event: Any) -> int:
        seen.append(event.assoc.acceptor.supported_contexts)
        done.set()
        return 0x0000

    server = start_acceptor(ae, ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_ECHO, on_echo)])
    try:
        assert isinstance(server.contexts, SharedContexts), "pynetdicom replaced the contexts list"
        before = _snapshot(server.contexts)
        scu = AE(ae_title="SCU")
        scu.add_requested_context(Verification)
        scu.add_requested_context(CTImageStorage, [JPEGBaseline8Bit])
        scu.add_requested_context("1.2.3.4.5.6.7", ImplicitVRLittleEndian)  # not supported: rejected
        for _ in range(2):
            done.clear()
            assoc = scu.associate("127.0.0.1", int(server.server_address[1]), ae_title="WIDE_SCP")
            assert assoc.is_established
            try:
                results = {str(cx.abstract_syntax): cx for cx in assoc.accepted_contexts}
                assert results[str(CTImageStorage)].transfer_syntax == [JPEGBaseline8Bit]
                assert [str(cx.abstract_syntax) for cx in assoc.rejected_contexts] == ["1.2.3.4.5.6.7"]
                assert assoc.send_c_echo().Status == 0x0000
            finally:
                assoc.release()
            assert done.wait(5)
    finally:
        server.shutdown()
    assert _snapshot(server.contexts) == before, "negotiation changed the shared contexts"
    for got in seen:
        # Each association has contexts of its own (a setter on one cannot reach another) that
        # share the syntax UIDs: the proof that pynetdicom copied through SharedContexts.__deepcopy__.
        assert got is not server.contexts and got[0] is not server.contexts[0]
        assert got[0].transfer_syntax[0] is server.contexts[0].transfer_syntax[0]


def test_the_per_association_copy_is_cheap() -> None:
    contexts = shared_contexts(_all_storage_ae().supported_contexts)
    started = time.process_time()
    for _ in range(5):
        copy.deepcopy(contexts)
    per_copy = (time.process_time() - started) / 5
    # pynetdicom's own deepcopy of these ~7,700 UIDs measured 125 ms of CPU; the shallow copy ~1 ms.
    assert per_copy < 0.03, f"{per_copy * 1000:.1f} ms of CPU per association"


def test_shutdown_is_prompt_and_complete() -> None:
    ae = AE(ae_title="PROMPT_SCP")
    ae.add_supported_context(Verification)
    server = start_acceptor(ae, ("127.0.0.1", 0))
    port = int(server.server_address[1])
    assert isinstance(server, PromptAssociationServer) and server in ae._servers
    deadline = time.monotonic() + 5
    while server.poll_interval_s is None and time.monotonic() < deadline:
        time.sleep(0.005)
    assert server.poll_interval_s == SHUTDOWN_POLL_S, "the accept loop runs with socketserver's 0.5 s"
    started = time.monotonic()
    server.shutdown()
    # pynetdicom's own loop makes this 0-0.5 s (0.25 s on average); a loaded machine still does ~0.1 s.
    assert time.monotonic() - started < 0.4
    assert server not in ae._servers
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass


def test_refuses_an_unverified_pynetdicom(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(pynetdicom, "__version__", "3.1.0")
    with pytest.raises(UnsupportedPynetdicomError, match=r"3\.1\.0"):
        shared_contexts([])
