"""Start a pynetdicom SCP whose associations do not each deep-copy every supported context.

pynetdicom's ``RequestHandler._create_association`` hands every new association
``deepcopy(server.contexts)``. For an SCP that accepts all storage classes in all transfer syntaxes
(DUO's C-MOVE destination, the simulated PACS: 170 classes x 45 syntaxes) that is ~7,700 UIDs, each
re-validated by pydicom's ``UID.__new__`` on the copy: about 125 ms of CPU per association, held
under the GIL, before the A-ASSOCIATE-AC can leave. It was most of the ~110 ms an association to the
simulated PACS took, and it scales with load (every C-MOVE, C-GET, C-FIND, C-ECHO pays it).

The copy is defensive only: pynetdicom's acceptor negotiation (``presentation.negotiate_as_acceptor``)
reads the supported contexts and builds new result contexts, it never mutates them. So the contexts
handed to ``start_server`` are a :class:`SharedContexts`, whose deep copy is one shallow copy per
context (the UIDs are immutable strings; the lists of them are shared, as negotiation only reads
them): about 1 ms. Only public API is used (``start_server(contexts=...)`` and the ``__deepcopy__``
protocol), but it relies on the private behaviour above, so like :mod:`duo_gateway.dicom.nodelay` it
refuses any pynetdicom but the minor version it was checked against.

**Prompt shutdown.** ``ae.start_server`` runs socketserver's accept loop with its default 0.5 s poll,
and ``server.shutdown()`` waits for the loop to look: 0.25 s on average, 0.5 s at worst, for every
SCP stopped (a simulated PACS going "down", a test network torn down: 146 shutdowns cost 52 s over
the DICOM, source, timeline, XCA, HTTP and Mitz tests). :func:`start_acceptor` starts the same server
the way ``start_server`` does but polls every :data:`SHUTDOWN_POLL_S`. pynetdicom's loop also runs a
full ``gc.collect()`` every 60th poll (every 30 s at its pace); the faster loop keeps that at 30 s of
wall time rather than collecting 25 times as often.
"""

from __future__ import annotations

import copy
import gc
import threading
import time
from collections.abc import Iterable
from datetime import datetime
from typing import Any

import pynetdicom
from pynetdicom import AE
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer
from pynetdicom.utils import make_target

from duo_gateway.dicom.nodelay import SUPPORTED_PYNETDICOM, UnsupportedPynetdicomError


class SharedContexts(list[PresentationContext]):
    """Supported presentation contexts whose deep copy shares the (immutable) syntax UIDs."""

    def __deepcopy__(self, memo: dict[int, Any]) -> list[PresentationContext]:
        return [copy.copy(cx) for cx in self]


def shared_contexts(contexts: Iterable[PresentationContext]) -> SharedContexts:
    version = str(getattr(pynetdicom, "__version__", ""))
    if not version.startswith(SUPPORTED_PYNETDICOM):
        raise UnsupportedPynetdicomError(
            f"duo_gateway.dicom.acceptor relies on pynetdicom {SUPPORTED_PYNETDICOM}x not mutating an "
            f"acceptor's supported contexts, found pynetdicom {version or 'unknown'}: re-verify "
            "transport.RequestHandler._create_association and presentation.negotiate_as_acceptor")
    return SharedContexts(contexts)


#: How often an acceptor's accept loop looks for a shutdown request (socketserver's default: 0.5 s).
SHUTDOWN_POLL_S = 0.02
#: pynetdicom's garbage collection period in its accept loop: 60 polls of 0.5 s.
GC_PERIOD_S = 30.0


class PromptAssociationServer(ThreadedAssociationServer):
    """pynetdicom's threaded server, polling for shutdown every :data:`SHUTDOWN_POLL_S`."""

    #: The poll of the running accept loop (None until it runs).
    poll_interval_s: float | None = None
    _next_gc = 0.0

    def serve_forever(self, poll_interval: float = SHUTDOWN_POLL_S) -> None:
        self.poll_interval_s = poll_interval
        self._next_gc = time.monotonic() + GC_PERIOD_S
        super().serve_forever(poll_interval)

    def service_actions(self) -> None:
        """pynetdicom collects garbage here (its dead association threads were not freed otherwise),
        counted in polls; this keeps the period it had in seconds."""
        now = time.monotonic()
        if now >= self._next_gc:
            self._next_gc = now + GC_PERIOD_S
            gc.collect()


def start_acceptor(ae: AE, address: tuple[str, int], *,
                   evt_handlers: list[EventHandlerType] | None = None,
                   ssl_context: Any = None) -> ThreadedAssociationServer:
    """``ae.start_server(address, block=False, ...)`` with the AE's supported contexts shared and a
    prompt shutdown; stop it with ``server.shutdown()`` as any pynetdicom server.

    Call it once the AE's supported contexts are final: later ``add_supported_context`` calls do not
    reach a running server (as with pynetdicom's own ``start_server``).
    """
    server = ae.make_server(address, contexts=shared_contexts(ae.supported_contexts),
                            ssl_context=ssl_context, evt_handlers=evt_handlers,
                            server_class=PromptAssociationServer)
    # What start_server(block=False) does with its server: a daemon thread, and the AE's list of
    # servers (AssociationServer.shutdown removes itself from it).
    timestamp = datetime.now().strftime("%Y%m%d%H%M%S")
    threading.Thread(target=make_target(server.serve_forever), name=f"AcceptorServer@{timestamp}",
                     daemon=True).start()
    ae._servers.append(server)
    return server
