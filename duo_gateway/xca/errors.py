"""Registry errors (rs:RegistryError) and the response status they imply (xca.md §9)."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from lxml import etree

from duo_gateway.xca.codes import RS_NS, ErrorCode, ResponseStatus, Severity


@dataclass(frozen=True)
class RegistryError:
    error_code: str
    code_context: str
    severity: str = Severity.ERROR
    location: str | None = None

    @property
    def is_error(self) -> bool:
        return self.severity != Severity.WARNING


class RegistryErrorException(Exception):
    """A request the codec or a responder refuses with registry errors rather than a SOAP Fault.

    XDS reports bad stored-query parameters inside a Failure response, not as a fault, so the
    transport layer turns this into an AdhocQueryResponse/RegistryResponse.
    """

    def __init__(self, *errors: RegistryError) -> None:
        super().__init__("; ".join(f"{e.error_code}: {e.code_context}" for e in errors))
        self.errors = errors

    @classmethod
    def of(cls, code: ErrorCode, context: str, location: str | None = None) -> RegistryErrorException:
        return cls(RegistryError(code, context, Severity.ERROR, location))


def status_for(errors: Iterable[RegistryError], has_results: bool) -> ResponseStatus:
    """Success without errors; PartialSuccess when errors come with results; Failure otherwise.

    Warnings alone do not degrade the status.
    """
    if not any(e.is_error for e in errors):
        return ResponseStatus.SUCCESS
    return ResponseStatus.PARTIAL_SUCCESS if has_results else ResponseStatus.FAILURE


def parse_status(value: str | None) -> ResponseStatus:
    """Lenient: some peers send the short form (``Success``) or PartialSuccess in the OASIS namespace."""
    if not value:
        raise ValueError("response without status")
    short = value.rsplit(":", 1)[-1]
    for status in ResponseStatus:
        if status.rsplit(":", 1)[-1] == short:
            return status
    raise ValueError(f"unknown response status {value!r}")


def build_error_list(errors: Iterable[RegistryError]) -> etree._Element | None:
    errs = list(errors)
    if not errs:
        return None
    el = etree.Element(f"{{{RS_NS}}}RegistryErrorList", nsmap={"rs": RS_NS})
    highest = Severity.ERROR if any(e.is_error for e in errs) else Severity.WARNING
    el.set("highestSeverity", highest)
    for e in errs:
        child = etree.SubElement(el, f"{{{RS_NS}}}RegistryError")
        child.set("errorCode", e.error_code)
        child.set("codeContext", e.code_context)
        child.set("severity", e.severity)
        if e.location is not None:
            child.set("location", e.location)
    return el


def parse_error_list(parent: etree._Element) -> tuple[RegistryError, ...]:
    """Errors under ``parent`` (a response element); a short severity (``Error``) is accepted."""
    out: list[RegistryError] = []
    for child in parent.iterfind(f"{{{RS_NS}}}RegistryErrorList/{{{RS_NS}}}RegistryError"):
        severity = child.get("severity") or Severity.ERROR
        severity = Severity.WARNING if severity.endswith("Warning") else Severity.ERROR
        context = child.get("codeContext") or (child.text or "").strip()
        out.append(RegistryError(child.get("errorCode") or "", context, severity, child.get("location")))
    return tuple(out)
