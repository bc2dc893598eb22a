"""Transfers: where chosen studies may be sent, and how hard DUO tries before it gives up."""

from __future__ import annotations

from pydantic import Field, model_validator

from duo_gateway.config.base import AeTitle, StrictModel, Ura
from duo_gateway.config.tls import ClientTls


class DestinationPacs(StrictModel):
    """A requester's own PACS that DUO may C-STORE into, named in the transfer request."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    ae_title: AeTitle
    host: str
    port: int = Field(ge=1, le=65535)
    #: URAs of the organisations this PACS belongs to: only their requesters may send here.
    uras: list[Ura] = Field(min_length=1)
    tls: ClientTls | None = None
    #: IssuerOfPatientID written with a request's ``local_patient_id`` (import reconciliation): the
    #: assigning authority of the patient ids in this PACS.
    patient_id_issuer: str | None = Field(default=None, min_length=1, max_length=64)
    #: Parallel C-STORE associations towards this PACS per transfer: while one waits for a response,
    #: another sends. 1 for a PACS that allows one association per peer.
    max_associations: int = Field(default=2, ge=1, le=16)
    #: Deadline for one DICOM operation (association, one C-STORE).
    timeout_s: float = Field(default=30.0, gt=0, le=600)


class TransferConfig(StrictModel):
    enabled: bool = True
    #: The configured destinations; a request names one of these by ``name``.
    destinations: list[DestinationPacs] = Field(default_factory=list)
    #: Also accept an ad-hoc destination (AE title, host, port) in the request. Off by default: DUO
    #: would otherwise send patient data to any address a caller types.
    allow_adhoc_destinations: bool = False
    #: Jobs this DUO process works on at the same time (each replica claims its own).
    workers: int = Field(default=2, ge=1, le=64)
    #: A running job's claim lapses after this long without a heartbeat; another replica (or this one
    #: after a restart) then resumes it.
    lease_s: float = Field(default=30.0, ge=2, le=3600)
    #: Retries of one transient failure (association refused, timeout, out of resources), with
    #: exponential backoff and jitter, before the instance or study is marked failed.
    retries: int = Field(default=4, ge=0, le=20)
    retry_backoff_s: float = Field(default=1.0, gt=0, le=300)
    #: Instances fetched ahead of the destination per study: bounds the spool, not memory.
    window: int = Field(default=16, ge=1, le=1024)
    #: Finished jobs are kept (GET-able) this long, then purged.
    keep_finished_s: float = Field(default=7 * 86400, ge=60)

    @model_validator(mode="after")
    def _unique_names(self) -> TransferConfig:
        names = [d.name for d in self.destinations]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate destination name: {', '.join(dupes)}")
        return self
