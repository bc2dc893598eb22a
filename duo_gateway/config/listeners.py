"""The sockets DUO listens on: one HTTP(S) listener for every HTTP front door and one DICOM AE."""

from __future__ import annotations

from pydantic import Field

from duo_gateway.config.base import AeTitle, StrictModel
from duo_gateway.config.tls import ServerTls


class HttpListener(StrictModel):
    host: str = "127.0.0.1"
    #: 0 picks a free port (tests, demo); a deployment sets a fixed one.
    port: int = Field(default=8443, ge=0, le=65535)
    #: Without ``tls`` the listener is plain HTTP: only behind a TLS-terminating proxy or on loopback.
    tls: ServerTls | None = None
    #: Largest request body accepted (ITI-38/ITI-39/RAD-75 requests are small; answers stream).
    max_request_bytes: int = Field(default=16 * 1024 * 1024, ge=1024)
    #: Serve the TLB and XCA routes on a non-loopback address without mTLS (``tls.client_auth =
    #: "required"``). Only behind a proxy that authenticates callers itself; DUO refuses to start
    #: such a listener otherwise, because it could not tell who is calling.
    allow_insecure: bool = False
    #: A connection that has not sent its complete request headers this long after connecting (or
    #: after the first byte of a later request) is closed, so slow clients cannot hold sockets
    #: forever; TLS handshakes get the same time. Idle kept-alive connections follow aiohttp's
    #: keep-alive timeout.
    header_timeout_s: float = Field(default=5.0, gt=0, le=300)


class DicomListener(StrictModel):
    """DUO's own DICOM AE: the C-MOVE destination hospitals send retrieved instances to."""

    ae_title: AeTitle = "DUO_GATEWAY"
    host: str = "127.0.0.1"
    port: int = Field(default=11112, ge=0, le=65535)
    #: TCP_NODELAY on every DICOM socket; off only to reproduce the 40 ms Nagle stall.
    tcp_nodelay: bool = True
    #: DICOM over TLS (PS3.15 B.1, conventionally port 2762); with client_auth "required" only PACSes
    #: holding a certificate from ca_file may associate.
    tls: ServerTls | None = None
    #: Maximum PDU length DUO advertises (and the largest it sends). Received PDUs are streamed to
    #: the spool, never held whole, so a large value costs no memory and saves per-PDU work at both
    #: ends; the PACS still chooses to send smaller ones (0 would mean "no limit").
    max_pdu_length: int = Field(default=1 << 20, ge=4096, le=1 << 26)
    #: ARTIM: how long a connecting PACS may take to send its A-ASSOCIATE-RQ (and a write to stall).
    timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: Longest silence on an association between C-STOREs (the PACS then gets an A-ABORT).
    idle_timeout_s: float = Field(default=120.0, gt=0, le=3600)
    #: Associations served at once; more are rejected (transient) until one ends.
    max_associations: int = Field(default=32, ge=1, le=1024)


class OpsListener(StrictModel):
    """Plain-HTTP /healthz, /readyz and /metrics for the container runtime and Prometheus.

    With mTLS on the main listener, probes and scrapers would each need a client certificate; this
    listener keeps them out of the PKI. Bind it to loopback or a management network only: it serves
    no patient data.
    """

    host: str = "127.0.0.1"
    port: int = Field(default=9090, ge=0, le=65535)


class Listeners(StrictModel):
    http: HttpListener = HttpListener()
    dicom: DicomListener = DicomListener()
    ops: OpsListener | None = None
