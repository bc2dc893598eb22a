"""One failure type for every outbound call: each peer's exception says kind/detail/retryable alike."""

from __future__ import annotations

import pytest

from duo_gateway.dicom.qr import (
    AssociationFailed,
    AssociationRejected,
    QrAborted,
    QrError,
    QrStatusError,
    QrTimeout,
)
from duo_gateway.dicom.store_scu import StoreUnavailable
from duo_gateway.failure import Failure
from duo_gateway.sources.base import SourceUnavailable
from duo_gateway.transfer.fetch import FetchFailed
from duo_gateway.xca.initiating.exchange import ExchangeFailed


@pytest.mark.parametrize(("failure", "kind", "retryable", "text"), [
    (SourceUnavailable("tlb:00010001", "C-FIND aborted"), "unavailable", True,
     "tlb:00010001: C-FIND aborted"),
    (SourceUnavailable("tlb:00010001", "no answer", "timeout"), "timeout", True, "tlb:00010001: no answer"),
    (SourceUnavailable("tlb:00010001", "broken UID", "error"), "error", False, "tlb:00010001: broken UID"),
    (ExchangeFailed("unavailable", "HTTP 503", retryable=True), "unavailable", True, "unavailable: HTTP 503"),
    (ExchangeFailed("error", "SOAP fault Receiver: x"), "error", False, "error: SOAP fault Receiver: x"),
    (FetchFailed("error", "no consent", retryable=False), "error", False, "no consent"),
    (QrError("65535 C-MOVEs in flight"), "unavailable", True, "65535 C-MOVEs in flight"),
    (AssociationRejected("rejected by X"), "unavailable", True, "rejected by X"),
    (AssociationFailed("no association"), "unavailable", True, "no association"),
    (QrAborted("aborted"), "unavailable", True, "aborted"),
    (QrTimeout("no DIMSE progress"), "timeout", True, "no DIMSE progress"),
    (QrStatusError("C-FIND", 0xC000), "error", False, "C-FIND failed with status 0xC000"),
    (StoreUnavailable("no association", label="connect"), "unavailable", True, "no association"),
    (StoreUnavailable("stalled", label="timeout"), "timeout", True, "stalled"),
    (StoreUnavailable("could not send x.dcm", label="aborted", retryable=False), "error", False,
     "could not send x.dcm"),
])
def test_every_peer_failure_is_a_failure_with_kind_detail_and_retryable(
        failure: Failure, kind: str, retryable: bool, text: str) -> None:
    assert isinstance(failure, Failure)
    assert (failure.kind, failure.retryable, str(failure)) == (kind, retryable, text)
    assert failure.detail in text


def test_dicom_failures_keep_their_short_label_for_metrics_and_logs() -> None:
    assert [e.label for e in (QrError("x"), AssociationRejected("x"), AssociationFailed("x"), QrTimeout("x"),
                              QrAborted("x"), QrStatusError("C-GET", 0xA701))] == [
        "error", "rejected", "connect", "timeout", "aborted", "status"]
    assert StoreUnavailable("x", label="rejected").label == "rejected"
