"""The address book: TLB hospitals (DICOM) and XCA communities (SOAP) DUO talks to."""

from __future__ import annotations

from typing import Literal

from pydantic import AnyHttpUrl, Field

from duo_gateway.bsn import BsnAttribute
from duo_gateway.config.base import AeTitle, HomeCommunityId, Oid, StrictModel, Ura
from duo_gateway.config.tls import ClientTls
from duo_gateway.config.xca import DocumentCodes


class TlbHospital(StrictModel):
    """One TLB hospital; DUO answers for it as data holder and queries its PACS over DICOM."""

    ura: Ura
    name: str = Field(min_length=1, max_length=200)
    #: Organisation type code (RoleCodeNL 2.16.840.1.113883.2.4.15.1060), the Mitz data holder type.
    organisation_type: str = Field(default="V6", pattern=r"^[A-Z0-9]{1,4}$")
    ae_title: AeTitle
    host: str
    port: int = Field(ge=1, le=65535)
    #: XDS repositoryUniqueId under which this hospital's documents are retrieved (ITI-39/RAD-75).
    repository_unique_id: Oid
    #: Mitz SourceSystem of this hospital (subscriptions; the open question returns it as SourceId).
    #: Defaults to repository_unique_id.
    mitz_source_id: Oid | None = None
    #: Where this PACS keeps the BSN: Twiin's guideline location is not settled, so it is per PACS.
    #: How the issuer labels are read there is duo_gateway.bsn's one rule.
    bsn_attribute: BsnAttribute = "PatientID"
    #: Deadline for one DICOM operation (association + C-FIND) against this PACS.
    timeout_s: float = Field(default=10.0, gt=0, le=600)
    #: Parallel associations DUO opens to this PACS at most.
    max_associations: int = Field(default=4, ge=1, le=64)
    #: DICOM over TLS towards this PACS; cert_file/key_file make it mutual.
    tls: ClientTls | None = None
    #: XDS codes of this hospital's KOS and report entries (Dutch defaults).
    document_codes: DocumentCodes = DocumentCodes()

    @property
    def source_id(self) -> str:
        return self.mitz_source_id or self.repository_unique_id


class XcaCommunity(StrictModel):
    """One XCA community reached through its Responding Gateway."""

    home_community_id: HomeCommunityId
    name: str = Field(min_length=1, max_length=200)
    iti38: AnyHttpUrl
    iti39: AnyHttpUrl
    rad75: AnyHttpUrl | None = None
    #: URAs of the institutions behind this gateway: matches Mitz localization and filters.
    uras: list[Ura] = Field(default_factory=list)
    tls: ClientTls | None = None
    #: Some live peers still want SHA-1 XML signatures; the default is SHA-256.
    signature_algorithm: Literal["sha256", "sha1"] = "sha256"
    timeout_s: float = Field(default=20.0, gt=0, le=600)
    max_concurrency: int = Field(default=4, ge=1, le=64)
    #: Retries after a transient failure (connection refused/reset, HTTP 502/503/504), with
    #: exponential backoff and jitter; never after a SOAP Fault or a registry error.
    retries: int = Field(default=2, ge=0, le=10)
    retry_backoff_s: float = Field(default=0.2, gt=0, le=30)
    #: Query this community even when Mitz localization names none of its data holders.
    query_without_localization: bool = False
    #: Transfers: instances asked per RAD-75 request (a series is split into batches of this size).
    rad75_batch_size: int = Field(default=50, ge=1, le=10_000)
    #: Timelines: ask ITI-38 FindDocuments for ObjectRefs, then the entries by GetDocuments in
    #: batches of ``iti38_batch_size``, every time. Off, DUO asks for the entries at once (LeafClass)
    #: and only falls back to asking by reference when that answer is over DUO's answer limit or the
    #: community refuses it with XDSTooManyResults; on, for a community known to hold patients with
    #: thousands of entries, so the oversized answer is never built, sent and thrown away first.
    iti38_by_reference: bool = False
    #: Timelines: entryUUIDs per GetDocuments request when asking by reference. At ~7 kB per entry the
    #: largest batch (1,000) answers ~7 MB, inside the default ITI-38 answer limit; a batch answered
    #: over ``iti38_max_answer_bytes`` anyway (or with XDSTooManyResults) is asked again as two halves.
    iti38_batch_size: int = Field(default=100, ge=1, le=1_000)
    #: Timelines: the largest ITI-38 answer DUO reads (HTTP body; reading stops here). An answer is
    #: metadata only, ~7 kB an entry, so the default takes a patient of ~7,000 entries in one LeafClass
    #: answer (issue 14 measured 5,000 entries at 34 MB); over it DUO asks again by reference, in
    #: batches. Decoding takes ~0.3 ms of CPU per entry in a worker thread and, while it lasts, ~6
    #: times the answer in memory (34 MB: +205 MiB; docs/performance.md): lower it where that is short.
    iti38_max_answer_bytes: int = Field(default=48 * 1024 * 1024, ge=16 * 1024, le=512 * 1024 * 1024)
    #: Transfers: the largest KOS manifest DUO takes from an ITI-39 answer (decoded size; reading the
    #: HTTP body stops at this plus room for inline base64 and the envelope). A manifest is ~180
    #: bytes per referenced instance, so the default covers ~23,000 instances; a bigger one is a
    #: misbehaving peer or a study to allow for explicitly.
    iti39_max_manifest_bytes: int = Field(default=4 * 1024 * 1024, ge=64 * 1024, le=256 * 1024 * 1024)
