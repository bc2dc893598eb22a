"""A guard for tests that claim to need no network: any socket connect or bind fails the test.

Use it as ``pytestmark = pytest.mark.usefixtures("no_sockets")`` after importing ``no_sockets``.
The event loop's own wake-up pipe is a ``socketpair`` made before the test starts (and needs neither
call), so only what the code under test tries is caught.
"""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest


class SocketUsed(AssertionError):
    """The code under test tried to reach the network."""


@pytest.fixture
def no_sockets(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    def refuse(self: socket.socket, *args: object, **kwargs: object) -> None:
        raise SocketUsed(f"this test must not use sockets: {args!r}")

    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(socket.socket, name, refuse)
    yield
