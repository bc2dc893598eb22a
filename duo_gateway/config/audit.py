"""Where the ATNA audit trail (IHE ITI-20) goes: a local append-only file and/or a syslog repository.

Every default is usable as is: with no keys at all the gateway keeps a local audit file and sends
nothing over the network, so a hospital can start the gateway before its Audit Record Repository is
reachable without losing the records of that period.
"""

from __future__ import annotations

from pathlib import Path

from pydantic import Field, model_validator

from duo_gateway.config.base import StrictModel
from duo_gateway.config.tls import ClientTls

#: APP-NAME of the RFC 5424 header when no syslog peer is configured (the file keeps the same format).
DEFAULT_APP_NAME = "duo-gateway"


class SyslogConfig(StrictModel):
    """The Audit Record Repository, reached by syslog over TLS (RFC 5425), as IHE ATNA requires."""

    #: Host name or IP of the Audit Record Repository; with TLS it must match its certificate.
    host: str = Field(min_length=1, max_length=253)
    #: 6514 is the IANA port for syslog over TLS (RFC 5425 §4.1).
    port: int = Field(default=6514, ge=1, le=65535)
    #: TLS towards the repository; the default trusts the system store and checks the host name.
    #: ``None`` means plain TCP: audit records carry BSNs, so that is only for tests and local
    #: development, and can only be set programmatically (TOML has no null).
    tls: ClientTls | None = ClientTls()
    #: APP-NAME in the RFC 5424 header: how the repository tells this application's records apart.
    app_name: str = Field(default=DEFAULT_APP_NAME, pattern=r"^[!-~]{1,48}$")
    #: Durable outbox: each record waits here as one file until the repository has it, so a
    #: repository outage or a gateway restart loses nothing. Relative to the storage path.
    queue_dir: Path = Path("audit/queue")
    #: First wait before reconnecting; doubles after every failed attempt.
    reconnect_initial_s: float = Field(default=0.5, gt=0, le=60)
    #: Ceiling of the reconnect wait, so a repository that comes back is used again soon enough.
    reconnect_max_s: float = Field(default=30.0, gt=0, le=3600)
    #: TCP connect plus TLS handshake; a black-holed repository must not stall the sender forever.
    connect_timeout_s: float = Field(default=5.0, gt=0, le=120)
    #: A connection that takes longer than this to absorb a write, or to have a written record
    #: acknowledged, is treated as dead and replaced: a stalled repository must not hold the outbox.
    send_timeout_s: float = Field(default=30.0, gt=0, le=600)
    #: RFC 5425 has no acknowledgement: a record leaves the outbox only after the connection stayed
    #: healthy this long after it was written (and TCP saw it acknowledged). A peer that drops the
    #: connection within this window gets the record again (at-least-once delivery).
    confirm_grace_s: float = Field(default=1.0, ge=0, le=60)

    @model_validator(mode="after")
    def _backoff_order(self) -> SyslogConfig:
        if self.reconnect_max_s < self.reconnect_initial_s:
            raise ValueError("reconnect_max_s must not be smaller than reconnect_initial_s")
        return self


class AuditConfig(StrictModel):
    """The audit trail is where disclosures of patient data are recorded; it is never optional."""

    #: Append-only local audit log (RFC 5425 framed records); relative to the storage path.
    #: ``None`` disables it; then a syslog repository should be configured.
    file: Path | None = Path("audit/audit.log")
    #: The Audit Record Repository; ``None`` keeps the trail local only.
    syslog: SyslogConfig | None = None
    #: AuditEnterpriseSiteID: the organisation operating this gateway (e.g. its URA or name).
    enterprise_site_id: str = Field(default="DUO", min_length=1, max_length=128)
    #: AuditSourceID: this gateway instance, so records of several instances can be told apart.
    source_id: str = Field(default="duo-gateway", min_length=1, max_length=128)
