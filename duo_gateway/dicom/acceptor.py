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
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from typing import Any

import pynetdicom
from pynetdicom import AE
from pynetdicom.events import EventHandlerType
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import ThreadedAssociationServer

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


def start_acceptor(ae: AE, address: tuple[str, int], *,
                   evt_handlers: list[EventHandlerType] | None = None,
                   ssl_context: Any = None) -> ThreadedAssociationServer:
    """``ae.start_server(address, block=False, ...)`` with the AE's supported contexts shared.

    Call it once the AE's supported contexts are final: later ``add_supported_context`` calls do not
    reach a running server (as with pynetdicom's own ``start_server``).
    """
    server = ae.start_server(address, block=False, ssl_context=ssl_context, evt_handlers=evt_handlers,
                             contexts=shared_contexts(ae.supported_contexts))
    assert server is not None  # block=False always returns the server
    return server
