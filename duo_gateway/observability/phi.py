"""Keeping patient identifiers out of operational logs.

Operational logs go to log shippers, dashboards and support tickets; the audit trail is where
disclosures are recorded. So every log record passes :class:`PhiScrubber` before it is rendered:

- values under keys that are known to carry identifiers (``bsn``, ``patient_id``, ``patient_name``…)
  are replaced, whatever they look like;
- anywhere else, a nine-digit number that passes the 11-proef becomes a keyed pseudonym
  (``bsn#1a2b3c4d``: the same BSN gives the same pseudonym within one key, so a support engineer can
  follow one patient's requests without learning who it is);
- DICOM person names (``Family^Given``) and ``Patient's Name`` dumps of pynetdicom are masked.

The scrubber over-masks rather than under-masks: a nine-digit number that happens to pass the 11-proef
is pseudonymised too.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
from collections.abc import Mapping, MutableMapping
from typing import Any

from duo_gateway.bsn import is_valid_bsn

#: Keys whose values are identifying whatever their shape.
SENSITIVE_KEYS = frozenset({
    "bsn", "patient_id", "patientid", "patient_name", "patientname", "name_of_patient",
    "patient_birth_date", "birth_date", "patient", "other_patient_ids",
})
_DIGITS9 = re.compile(r"(?<!\d)\d{9}(?!\d)")
#: DICOM PN with a component separator; names in our sims and in PACS data look like this.
_PERSON_NAME = re.compile(r"[^\s\^=\[\](){}<>,;:\"']*[A-Za-z][^\s\^=\[\](){}<>,;:\"']*\^[^\s\]\[)(<>,;\"']*")
#: pynetdicom identifier dumps: ``(0010,0010) Patient's Name  PN: [Jansen^Anna]``.
_PN_DUMP = re.compile(r"(\(0010,00(?:10|20|30|1000)\)[^\[\n]*\[)[^\]\n]*(\])")
MASK = "[redacted]"


class PhiScrubber:
    def __init__(self, key: bytes | None = None) -> None:
        self._key = key if key else secrets.token_bytes(32)

    def pseudonym(self, bsn: str) -> str:
        digest = hmac.new(self._key, bsn.encode("ascii"), hashlib.sha256).hexdigest()[:10]
        return f"bsn#{digest}"

    def scrub_text(self, text: str) -> str:
        text = _PN_DUMP.sub(lambda m: f"{m.group(1)}{MASK}{m.group(2)}", text)
        text = _DIGITS9.sub(lambda m: self.pseudonym(m.group(0)) if is_valid_bsn(m.group(0)) else m.group(0),
                            text)
        return _PERSON_NAME.sub(MASK, text)

    def scrub_value(self, key: str | None, value: Any) -> Any:
        if key is not None and key.lower() in SENSITIVE_KEYS:
            if isinstance(value, str) and is_valid_bsn(value):
                return self.pseudonym(value)
            return MASK
        if isinstance(value, str):
            return self.scrub_text(value)
        if isinstance(value, Mapping):
            return {k: self.scrub_value(str(k), v) for k, v in value.items()}
        if isinstance(value, list | tuple | set | frozenset):
            return [self.scrub_value(None, v) for v in value]
        if isinstance(value, int | float | bool) or value is None:
            return value
        return self.scrub_text(str(value))

    def __call__(self, _logger: Any, _method: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
        """structlog processor: runs last before rendering, on every record from every library."""
        return {k: self.scrub_value(k, v) if k not in _UNTOUCHED else v for k, v in event_dict.items()}


#: Keys that structlog itself fills with non-PHI values.
_UNTOUCHED = frozenset({"timestamp", "level", "logger", "request_id"})
