"""The HL7 v2 data types XDS metadata is written in: CX, XON, coded values and DTM.

They are small, but getting them wrong is silent: a URA in the wrong XON component or a BSN CX with
a namespace id makes a peer drop the entry without an error (netherlands.md §6–§7).
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from duo_gateway.saml import URA_OID

_DTM = re.compile(r"^\d{4}(\d{2}(\d{2}(\d{2}(\d{2}(\d{2})?)?)?)?)?$")
_OID = re.compile(r"^[0-2](\.(0|[1-9]\d*))+$")


class Hl7FormatError(ValueError):
    """A value that does not fit its HL7 v2 data type."""


def is_oid(value: str) -> bool:
    return bool(_OID.match(value))


@dataclass(frozen=True)
class Code:
    """A coded value; ``scheme`` is the codingScheme as sent (an OID, or a legacy literal like DCM)."""

    code: str
    scheme: str
    display: str | None = None

    def query_form(self) -> str:
        """``code^^scheme``: how a stored-query code-list parameter names the code (xca.md §4)."""
        return f"{self.code}^^{self.scheme}"

    @classmethod
    def parse_query_form(cls, value: str) -> Code:
        code, sep, scheme = value.partition("^^")
        if not sep or not code or not scheme or "^" in scheme:
            raise Hl7FormatError(f"not a code^^scheme value: {value!r}")
        return cls(code, scheme)

    def matches(self, other: Code) -> bool:
        """Equal code and scheme; DICOM's DCM scheme matches both its OID and the literal ``DCM``."""
        return self.code == other.code and _scheme_key(self.scheme) == _scheme_key(other.scheme)


def _scheme_key(scheme: str) -> str:
    return "1.2.840.10008.2.16.4" if scheme == "DCM" else scheme


def _escape(value: str) -> str:
    # HL7 v2 escape sequences for the delimiters that may appear inside a component.
    return (value.replace("\\", "\\E\\").replace("|", "\\F\\").replace("^", "\\S\\")
            .replace("&", "\\T\\").replace("~", "\\R\\"))


def _unescape(value: str) -> str:
    return re.sub(r"\\([EFSTR])\\", lambda m: _UNESCAPE[m[1]], value)


_UNESCAPE = {"E": "\\", "F": "|", "S": "^", "T": "&", "R": "~"}


@dataclass(frozen=True)
class Cx:
    """A CX identifier with an ISO assigning authority: ``id^^^&oid&ISO`` (netherlands.md §7)."""

    id: str
    authority_oid: str

    def __str__(self) -> str:
        return f"{self.id}^^^&{self.authority_oid}&ISO"

    @classmethod
    def parse(cls, value: str) -> Cx:
        """Strict: real registries drop entries with a malformed patient id, so refuse them early."""
        comps = value.split("^")
        if len(comps) < 4 or not comps[0] or any(comps[1:3]):
            raise Hl7FormatError(f"not a CX with an assigning authority: {value!r}")
        namespace, _, rest = comps[3].partition("&")
        oid, _, oid_type = rest.partition("&")
        if not is_oid(oid) or oid_type != "ISO" or any(c for c in comps[4:]):
            raise Hl7FormatError(f"CX assigning authority is not an ISO OID: {value!r}")
        del namespace  # a namespace id is tolerated on input; it is never emitted
        return cls(comps[0], oid)


@dataclass(frozen=True)
class Xon:
    """authorInstitution as the Nictiz metadata set writes it: name, URA authority, URA in XON.10."""

    name: str
    identifier: str | None = None
    authority_oid: str = URA_OID

    def __str__(self) -> str:
        if self.identifier is None:
            return _escape(self.name)
        return f"{_escape(self.name)}^^^^^&{self.authority_oid}&ISO^^^^{self.identifier}"

    @classmethod
    def parse(cls, value: str) -> Xon:
        """Lenient: older senders put the id in XON.3 (the pre-2.5 form) or leave it out."""
        comps = value.split("^")
        name = _unescape(comps[0])
        identifier = comps[9] if len(comps) > 9 and comps[9] else None
        if identifier is None and len(comps) > 2 and comps[2]:
            identifier = comps[2]
        authority = URA_OID
        if len(comps) > 5 and comps[5]:
            _, _, rest = comps[5].partition("&")
            oid = rest.partition("&")[0]
            if oid:
                authority = oid
        return cls(name, identifier, authority)

    @property
    def ura(self) -> str | None:
        """The URA left-padded to 8 digits, so ``10990`` and ``00010990`` compare equal (§6)."""
        if self.identifier is None or self.authority_oid != URA_OID or not self.identifier.isdigit():
            return None
        return self.identifier.zfill(8)


def reference_id(value: str, id_type: str) -> str:
    """A referenceIdList CXi with CX.1 and CX.5 only, e.g. a study UID (xca.md §7)."""
    return f"{value}^^^^{id_type}"


def parse_reference_id(value: str) -> tuple[str, str]:
    """(id, CX.5 identifier type) of a referenceIdList value."""
    comps = value.split("^")
    if not comps[0]:
        raise Hl7FormatError(f"reference id without CX.1: {value!r}")
    return comps[0], comps[4] if len(comps) > 4 else ""


def check_dtm(value: str) -> str:
    """DTM as XDS uses it: UTC, ``YYYY[MM[DD[hh[mm[ss]]]]]``, nothing else."""
    if not _DTM.match(value):
        raise Hl7FormatError(f"not an XDS DTM value: {value!r}")
    return value


def dtm_key(value: str) -> str:
    """A 14-digit sort key, so values of different precision compare as the start of their period."""
    return check_dtm(value).ljust(14, "0")
