"""PHI never reaches operational logs in clear, whichever library writes the record."""

from __future__ import annotations

import io
import json
import logging
import warnings
from collections.abc import Iterator

import pytest
import structlog
from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.sop_class import PatientRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]

from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.observability.logging import configure_logging
from duo_gateway.observability.phi import PhiScrubber

BSNS = ("999911120", "900186021")
NAMES = ("Jansen^Anna", "de Vries^Bram", "Jansen", "Vries^Bram")


@pytest.fixture
def captured() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    configure_logging(LoggingConfig(level="DEBUG", dicom_level="DEBUG",
                                    pseudonym_key="test-key"), stream=stream)  # type: ignore[arg-type]
    yield stream
    configure_logging(LoggingConfig(level="WARNING"))


def assert_no_phi(text: str) -> None:
    for bsn in BSNS:
        assert bsn not in text
    for name in NAMES:
        assert name not in text, name


def test_structlog_keys_and_free_text_are_scrubbed(captured: io.StringIO) -> None:
    log = structlog.get_logger("duo.test")
    log.info("closed question", bsn=BSNS[0], holder_ura="00010001", decision="Permit")
    log.info(f"free text mentions {BSNS[1]} and Jansen^Anna", study_count=3)
    log.warning("nested", detail={"patient": {"PatientName": "Jansen^Anna"}, "ids": [BSNS[0]]})
    try:
        raise ValueError(f"no study for {BSNS[0]}")
    except ValueError:
        log.exception("failure")
    text = captured.getvalue()
    assert_no_phi(text)
    records = [json.loads(line) for line in text.splitlines()]
    assert records[0]["holder_ura"] == "00010001"  # non-PHI stays readable
    assert records[0]["bsn"].startswith("bsn#")
    # pseudonyms are stable within a key, so one patient's trail can be followed
    assert records[0]["bsn"] in records[3]["exception"]
    assert all({"timestamp", "level", "event"} <= r.keys() for r in records)


def test_stdlib_library_records_go_through_the_same_filter(captured: io.StringIO) -> None:
    logging.getLogger("aiohttp.access").info('127.0.0.1 "GET /tlb?bsn=%s HTTP/1.1" 200', BSNS[1])
    logging.getLogger("pynetdicom.acse").info("(0010,0010) Patient's Name   PN: [%s]", "Jansen^Anna")
    text = captured.getvalue()
    assert_no_phi(text)
    assert '"logger": "aiohttp.access"' in text


def test_real_pynetdicom_debug_dump_is_scrubbed(captured: io.StringIO) -> None:
    """pynetdicom at DEBUG dumps C-FIND identifiers, names and ids included: none may survive."""
    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        ds = Dataset()
        ds.QueryRetrieveLevel = "PATIENT"
        ds.PatientName = "Jansen^Anna"
        ds.PatientID = BSNS[0]
        yield 0xFF00, ds

    scp = AE(ae_title="PHI_SCP")
    scp.add_supported_context(PatientRootQueryRetrieveInformationModelFind)
    server = start_acceptor(scp, ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_FIND, on_find)])
    try:
        port = server.server_address[1]
        scu = AE(ae_title="PHI_SCU")
        scu.add_requested_context(PatientRootQueryRetrieveInformationModelFind)
        assoc = scu.associate("127.0.0.1", port, ae_title="PHI_SCP")
        assert assoc.is_established
        query = Dataset()
        query.QueryRetrieveLevel = "PATIENT"
        query.PatientName = "de Vries^Bram"
        query.PatientID = BSNS[1]
        results = list(assoc.send_c_find(query, PatientRootQueryRetrieveInformationModelFind))
        assoc.release()
    finally:
        server.shutdown()
    assert any(ident is not None and ident.PatientID == BSNS[0] for _s, ident in results)
    text = captured.getvalue()
    assert "pynetdicom" in text and "C-FIND" in text, "pynetdicom debug records must be captured"
    assert_no_phi(text)


def test_scrubber_leaves_non_bsn_numbers_alone() -> None:
    scrubber = PhiScrubber(b"k")
    assert scrubber.scrub_text("port 123456789 study 1.2.840.113619.2.55") == \
        "port 123456789 study 1.2.840.113619.2.55"  # 123456789 fails the 11-proef
    assert "999911120" not in scrubber.scrub_text("bsn 999911120")
    assert scrubber.pseudonym("999911120") == PhiScrubber(b"k").pseudonym("999911120")
    assert scrubber.pseudonym("999911120") != PhiScrubber(b"other").pseudonym("999911120")


def test_python_warnings_are_logged_scrubbed_not_printed(
    captured: io.StringIO, capsys: pytest.CaptureFixture[str]
) -> None:
    """pydicom's validation warnings quote the offending value: through warnings.warn they would reach
    stderr in clear, so they must come out as scrubbed log records instead."""
    with warnings.catch_warnings():
        warnings.simplefilter("always")
        ds = Dataset()
        # A CS longer than 16 characters: pydicom warns with the value in the message.
        ds.Modality = f"{BSNS[0]} Jansen^Anna"
    records = [json.loads(line) for line in captured.getvalue().splitlines()]
    warned = [r for r in records if r.get("logger") == "py.warnings"]
    assert warned, "the warning must be a log record of py.warnings"
    assert "Invalid value for VR CS" in warned[0]["event"]
    assert "bsn#" in warned[0]["event"]  # pseudonymised, not dropped
    assert_no_phi(captured.getvalue())
    out = capsys.readouterr()
    assert_no_phi(out.err + out.out)


def test_pynetdicom_builds_log_text_only_at_a_level_that_writes_it() -> None:
    from pynetdicom import _config

    try:
        configure_logging(LoggingConfig(level="WARNING"))
        assert (_config.LOG_HANDLER_LEVEL, _config.LOG_RESPONSE_IDENTIFIERS,
                _config.LOG_REQUEST_IDENTIFIERS) == ("none", False, False)
        configure_logging(LoggingConfig(level="WARNING", dicom_level="INFO"))
        assert (_config.LOG_HANDLER_LEVEL, _config.LOG_RESPONSE_IDENTIFIERS) == ("standard", False)
        configure_logging(LoggingConfig(level="WARNING", dicom_level="DEBUG"))
        assert (_config.LOG_HANDLER_LEVEL, _config.LOG_RESPONSE_IDENTIFIERS,
                _config.LOG_REQUEST_IDENTIFIERS) == ("standard", True, True)
    finally:
        configure_logging(LoggingConfig(level="WARNING"))
