"""The one DIMSE status table: the classes every DICOM path decides by."""

from __future__ import annotations

import pytest

from duo_gateway.dicom import status
from duo_gateway.dicom.store_scu import classify


@pytest.mark.parametrize(("code", "pending", "warning", "retry"), [
    (0x0000, False, False, False), (0xFF00, True, False, False), (0xFF01, True, False, False),
    (0x0001, False, True, False), (0xB000, False, True, False), (0xB007, False, True, False),
    (0xA700, False, False, True), (0xA7FF, False, False, True), (0xA801, False, False, False),
    (0xA900, False, False, False), (0xC000, False, False, False), (0xFE00, False, False, False),
])
def test_status_classes(code: int, pending: bool, warning: bool, retry: bool) -> None:
    assert status.is_pending(code) is pending
    assert status.is_warning(code) is warning
    assert status.is_out_of_resources(code) is retry


def test_the_store_verdict_follows_the_table() -> None:
    assert classify(status.SUCCESS) == "stored"
    assert all(classify(code) == "warning" for code in status.STORE_WARNINGS)
    assert classify(status.OUT_OF_RESOURCES) == "transient"
    for refused in (status.SOP_CLASS_NOT_SUPPORTED, status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                    status.UNABLE_TO_PROCESS, status.MOVE_DESTINATION_UNKNOWN):
        assert classify(refused) == "refused"
