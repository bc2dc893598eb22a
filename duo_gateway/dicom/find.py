"""Blocking C-FIND SCU (Study Root). pynetdicom is thread-based: async callers use asyncio.to_thread."""

from __future__ import annotations

import ssl

from pydicom.dataset import Dataset
from pynetdicom import AE
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from duo_gateway.dicom.nodelay import ensure_tcp_nodelay
from duo_gateway.dicom.status import SUCCESS, is_pending
from duo_gateway.dicom.teardown import install_fast_teardown


class FindError(RuntimeError):
    """The association or the C-FIND failed; the caller reports the PACS as unavailable."""


def c_find(calling_ae: str, host: str, port: int, called_ae: str, query: Dataset,
           timeout_s: float, tls: ssl.SSLContext | None = None) -> list[Dataset]:
    ensure_tcp_nodelay()
    install_fast_teardown()
    ae = AE(ae_title=calling_ae)
    for attr in ("acse_timeout", "dimse_timeout", "network_timeout", "connection_timeout"):
        setattr(ae, attr, timeout_s)
    ae.add_requested_context(StudyRootQueryRetrieveInformationModelFind)
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, host) if tls else None)
    if not assoc.is_established:
        raise FindError("association rejected" if assoc.is_rejected else "association failed")
    matches: list[Dataset] = []
    try:
        for status, identifier in assoc.send_c_find(query, StudyRootQueryRetrieveInformationModelFind):
            code = getattr(status, "Status", None)
            if code is None:
                raise FindError("no C-FIND response (timeout or aborted association)")
            if is_pending(code):
                if identifier is not None:
                    matches.append(identifier)
            elif code != SUCCESS:
                raise FindError(f"C-FIND failed with status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return matches
