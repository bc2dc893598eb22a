"""C-ECHO, the DICOM liveness probe behind /readyz. Blocking: call it through asyncio.to_thread."""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pynetdicom import AE
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from duo_gateway.dicom.nodelay import ensure_tcp_nodelay
from duo_gateway.dicom.teardown import install_fast_teardown


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str


def c_echo(calling_ae: str, host: str, port: int, called_ae: str, timeout_s: float,
           tls: ssl.SSLContext | None = None) -> EchoResult:
    ensure_tcp_nodelay()
    install_fast_teardown()
    ae = AE(ae_title=calling_ae)
    ae.acse_timeout = timeout_s
    ae.dimse_timeout = timeout_s
    ae.network_timeout = timeout_s
    ae.connection_timeout = timeout_s
    ae.add_requested_context(Verification)
    assoc = ae.associate(host, port, ae_title=called_ae, tls_args=(tls, host) if tls else None)
    if not assoc.is_established:
        reason = "association rejected" if assoc.is_rejected else "association failed"
        return EchoResult(False, reason)
    try:
        status = assoc.send_c_echo()
    finally:
        assoc.release()
    code = getattr(status, "Status", None)
    if code == 0x0000:
        return EchoResult(True, "C-ECHO success")
    return EchoResult(False, "no C-ECHO response" if code is None else f"C-ECHO status 0x{code:04X}")
