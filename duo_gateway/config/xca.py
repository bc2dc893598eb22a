"""DUO as XCA(-I) Responding Gateway of the TLB community: paths, deadlines, limits, metadata codes."""

from __future__ import annotations

from typing import Literal

from pydantic import ByteSize, Field, field_validator

from duo_gateway.config.base import StrictModel


class CodeConfig(StrictModel):
    code: str = Field(min_length=1, max_length=64)
    scheme: str = Field(min_length=1, max_length=64)
    display: str = Field(min_length=1, max_length=256)


def _c(code: str, scheme: str, display: str) -> CodeConfig:
    return CodeConfig(code=code, scheme=scheme, display=display)


_SNOMED = "2.16.840.1.113883.6.96"

#: ``retrieve_window``'s default: a few dozen CT slices or one large multi-frame object.
RETRIEVE_WINDOW_DEFAULT = 64 * 1024 * 1024
MIN_RETRIEVE_WINDOW = 1024 * 1024
#: ``retrieve_memory``'s default: two requests' windows.
RETRIEVE_MEMORY_DEFAULT = 2 * RETRIEVE_WINDOW_DEFAULT


class DocumentCodes(StrictModel):
    """XDS codes of one hospital's documents. No XDS-I rule fixes them for the KOS; the defaults follow
    the Twiin report metadata (netherlands.md §4) and common Dutch XDS practice."""

    kos_class: CodeConfig = _c("363679005", _SNOMED, "Imaging")
    kos_type: CodeConfig = _c("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study")
    report_class: CodeConfig = _c("9491000146107", _SNOMED, "Imaging Documentation")
    report_type: CodeConfig = _c("722124004", _SNOMED, "Radiologisch verslag")
    practice_setting: CodeConfig = _c("394914008", _SNOMED, "Radiology")
    facility_type: CodeConfig = _c("22232009", _SNOMED, "Hospital")
    confidentiality: CodeConfig = _c("N", "2.16.840.1.113883.5.25", "normal")
    language: str = "nl-NL"


class XcaRespondingConfig(StrictModel):
    enabled: bool = True
    iti38_path: str = Field(default="/xca/iti38", pattern=r"^/[A-Za-z0-9/_.-]*$")
    iti39_path: str = Field(default="/xca/iti39", pattern=r"^/[A-Za-z0-9/_.-]*$")
    rad75_path: str = Field(default="/xca/rad75", pattern=r"^/[A-Za-z0-9/_.-]*$")
    #: Each hospital must answer (consent + C-FIND) within this; late ones make PartialSuccess.
    hospital_deadline_s: float = Field(default=8.0, gt=0, le=120)
    #: Largest request body (ITI-39/RAD-75 requests are small; this bounds hostile input).
    max_request_bytes: int = Field(default=4 * 1024 * 1024, ge=1024)
    #: Largest number of DocumentRequests in one ITI-39 or RAD-75 request.
    max_documents_per_request: int = Field(default=10_000, ge=1)
    #: Most distinct studies one RAD-75 request may name, and distinct documents one ITI-39 request
    #: may name (a KOS or a report each): every one costs PACS lookups, so a request over it is
    #: refused whole (Failure, XDSRegistryError) before any PACS or Mitz is asked.
    max_studies_per_request: int = Field(default=100, ge=1, le=10_000)
    #: An ITI-39 or RAD-75 request is answered within this: studies/documents not done by then are
    #: named in the answer as not available (XDSRepositoryError), the rest is delivered.
    request_deadline_s: float = Field(default=60.0, gt=0, le=3600)
    #: Studies (RAD-75) or documents (ITI-39) of one request looked up and fetched at the same time.
    max_parallel_lookups: int = Field(default=4, ge=1, le=64)
    #: How DUO pulls instances from a PACS for RAD-75: C-GET over the same association, or C-MOVE
    #: to DUO's own storage SCP (for PACSes that refuse C-GET).
    retrieve_method: Literal["c-get", "c-move"] = "c-get"
    #: Bytes a PACS may deliver ahead of DUO's consumer (C-GET/C-MOVE back-pressure: a C-STORE that
    #: does not fit waits, so the PACS waits), per study being fetched. A RAD-75 answered as MTOM
    #: writes each instance out before the next is asked for, so this bounds its spool; an instance
    #: larger than the window passes alone. A size: bytes, or "64MiB", "1GiB".
    retrieve_window: ByteSize = Field(default=ByteSize(RETRIEVE_WINDOW_DEFAULT), ge=MIN_RETRIEVE_WINDOW)
    #: Bytes of instances that streamed RAD-75 answers may hold in memory at once, all requests
    #: together, instead of a spool file each (each request also stays within retrieve_window).
    #: Beyond it instances go to files as before; 0: always files. A size, as retrieve_window.
    retrieve_memory: ByteSize = Field(default=ByteSize(RETRIEVE_MEMORY_DEFAULT), ge=0)

    @field_validator("retrieve_window", mode="before")
    @classmethod
    def _a_size_not_a_count(cls, value: object) -> object:
        # Until issue 14 this key counted files (default 16): such a value now means bytes and would
        # throttle every retrieve to one instance at a time, so it is refused with the reason.
        if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < MIN_RETRIEVE_WINDOW:
            raise ValueError(f"retrieve_window is a size in bytes (e.g. \"64MiB\"), at least "
                             f"{MIN_RETRIEVE_WINDOW} bytes; {value} looks like the former count of files")
        return value
