"""DIMSE status codes (PS3.7 Annex C, PS3.4 B.2.3 and C.4) and their classes: the one table.

Every DICOM path of DUO (C-STORE SCU and SCP, C-FIND, C-GET/C-MOVE, the simulated PACS) reads its
codes and its "is this a warning / pending / retryable" rules from here, as pynetdicom keeps its own
in one ``status.py``, so two paths can never disagree about what a status means.
"""

from __future__ import annotations

from typing import Final

SUCCESS: Final = 0x0000
#: Success with a warning in some DIMSE-N and retrieve answers.
WARNING: Final = 0x0001
#: PS3.7 C.5.19: what DUO reports for an instance it could not even offer (no accepted context).
SOP_CLASS_NOT_SUPPORTED: Final = 0x0122
NOT_AUTHORISED: Final = 0x0124
PENDING: Final = 0xFF00
#: Pending, with optional keys not supported (PS3.4 C.4.1.1.4).
PENDING_WARNING: Final = 0xFF01
CANCEL: Final = 0xFE00
OUT_OF_RESOURCES: Final = 0xA700
MOVE_DESTINATION_UNKNOWN: Final = 0xA801
IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS: Final = 0xA900
#: "Unable to process" for queries and retrieves, "cannot understand" for C-STORE: the 0xCxxx class.
UNABLE_TO_PROCESS: Final = 0xC000
#: A retrieve whose sub-operations failed (the simulated PACS's answer for a failed C-STORE).
SUBOPERATIONS_FAILED: Final = 0xC511

#: The C-STORE warnings PS3.4 B.2.3 names.
STORE_WARNINGS: Final = {0xB000: "coercion of data elements", 0xB006: "elements discarded",
                         0xB007: "data set does not match SOP class"}


def is_pending(status: int) -> bool:
    return status in (PENDING, PENDING_WARNING)


def is_warning(status: int) -> bool:
    """The operation succeeded, with a warning (0xBxxx, or 0x0001)."""
    return status == WARNING or 0xB000 <= status <= 0xBFFF


def is_out_of_resources(status: int) -> bool:
    """0xA7xx: the peer may well succeed later, so it is worth a retry."""
    return 0xA700 <= status <= 0xA7FF


def is_identifier_mismatch(status: int) -> bool:
    return 0xA900 <= status <= 0xA9FF


def is_unable_to_process(status: int) -> bool:
    return 0xC000 <= status <= 0xCFFF


__all__ = [
    "CANCEL", "IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS", "MOVE_DESTINATION_UNKNOWN", "NOT_AUTHORISED",
    "OUT_OF_RESOURCES", "PENDING", "PENDING_WARNING", "SOP_CLASS_NOT_SUPPORTED", "STORE_WARNINGS",
    "SUBOPERATIONS_FAILED", "SUCCESS", "UNABLE_TO_PROCESS", "WARNING", "is_identifier_mismatch",
    "is_out_of_resources", "is_pending", "is_unable_to_process", "is_warning",
]
