"""C-ECHO, the DICOM liveness probe behind /readyz, on DUO's asyncio Upper Layer.

Why asyncio: a probe per TLB hospital per readiness check would otherwise be a pynetdicom
association in a thread (two polling threads each); here it is one coroutine with a bounded
connect, association and answer, whatever the peer does.
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass

from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian

from duo_gateway.dicom.status import SUCCESS
from duo_gateway.dicom.ul.association import VERIFICATION, Timeouts, UlError, UlRejected, UlTimeout, connect
from duo_gateway.dicom.ul.dimse import C_ECHO_RSP, c_echo_rq
from duo_gateway.dicom.ul.pdu import PresentationContextRQ


@dataclass(frozen=True)
class EchoResult:
    ok: bool
    detail: str


async def c_echo(calling_ae: str, host: str, port: int, called_ae: str, timeout_s: float,
                 tls: ssl.SSLContext | None = None) -> EchoResult:
    """One association, one C-ECHO, release; every failure is a result with a reason, never raised."""
    timeouts = Timeouts(connect_s=timeout_s, acse_s=timeout_s, dimse_s=timeout_s, network_s=timeout_s)
    syntaxes = (str(ImplicitVRLittleEndian), str(ExplicitVRLittleEndian))
    context = PresentationContextRQ(1, VERIFICATION, syntaxes)
    try:
        assoc = await connect(host, port, calling_ae=calling_ae, called_ae=called_ae, contexts=[context],
                              ssl_context=tls, timeouts=timeouts)
    except UlRejected:
        return EchoResult(False, "association rejected")
    except UlError:
        return EchoResult(False, "association failed")
    try:
        if 1 not in assoc.accepted:
            return EchoResult(False, "Verification not accepted")
        request = c_echo_rq(assoc.next_message_id())
        await assoc.send_command(1, request)
        msg = await assoc.receive(timeout_s)
    except UlTimeout:
        return EchoResult(False, "no C-ECHO response")
    except UlError as exc:
        return EchoResult(False, f"association aborted: {exc}")
    finally:
        await assoc.release()
    if msg is None or msg.command.command_field != C_ECHO_RSP or \
            msg.command.message_id_responded_to != request.message_id:
        return EchoResult(False, "no C-ECHO response")
    code = msg.command.status
    if code == SUCCESS:
        return EchoResult(True, "C-ECHO success")
    return EchoResult(False, "no C-ECHO status" if code is None else f"C-ECHO status 0x{code:04X}")
