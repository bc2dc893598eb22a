"""Burgerservicenummer validation (11-proef) and the identifier forms the BSN travels in."""

from __future__ import annotations

BSN_OID = "2.16.840.1.113883.2.4.6.3"
_WEIGHTS = (9, 8, 7, 6, 5, 4, 3, 2, -1)


def is_valid_bsn(value: str) -> bool:
    """Exactly nine ASCII digits, not all zeros, passing the 11-proef.

    Eight-digit legacy numbers are refused: padding must be an explicit decision upstream, since a
    silently padded typo could name another person.
    """
    if len(value) != 9 or not value.isascii() or not value.isdigit() or value == "000000000":
        return False
    return sum(int(d) * w for d, w in zip(value, _WEIGHTS, strict=True)) % 11 == 0


def bsn_cx(bsn: str) -> str:
    """The HL7 CX form used for XDS patientId: ``BSN^^^&OID&ISO``."""
    return f"{bsn}^^^&{BSN_OID}&ISO"
