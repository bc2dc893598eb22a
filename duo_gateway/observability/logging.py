"""structlog JSON lines on stdout for our code and for every library (aiohttp, pynetdicom).

All records, whichever API produced them, go through one processor chain ending in the PHI
scrubber, so there is one place to guarantee that no BSN or patient name is written in clear.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from pynetdicom import _config as _pnd_config

from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.observability.phi import PhiScrubber

_LIB_LOGGERS = ("pynetdicom", "aiohttp.access", "aiohttp.server", "aiohttp.web", "aiohttp.client",
                "asyncio")


def configure_logging(cfg: LoggingConfig, stream: TextIO | None = None) -> PhiScrubber:
    key = cfg.pseudonym_key.get_secret_value().encode("utf-8") if cfg.pseudonym_key else None
    scrubber = PhiScrubber(key)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    renderer: Any = (structlog.processors.JSONRenderer() if cfg.format == "json"
                     else structlog.dev.ConsoleRenderer(colors=False))
    structlog.configure(
        # filter_by_level first: a record below the configured level costs one isEnabledFor() instead of
        # the whole chain (time stamp included) only for the stdlib logger to drop it at the end.
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, scrubber, renderer],
    )
    handler = logging.StreamHandler(stream or sys.stdout)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for old in list(root.handlers):
        if getattr(old, "_duo_handler", False):
            root.removeHandler(old)
    handler._duo_handler = True  # type: ignore[attr-defined]
    root.addHandler(handler)
    root.setLevel(cfg.level)
    for name in _LIB_LOGGERS:
        logging.getLogger(name).setLevel(cfg.level)
    logging.getLogger("pynetdicom").setLevel(cfg.dicom_level)
    # pynetdicom installs its own NullHandler-free handler on import in some versions; route it to root.
    pnd = logging.getLogger("pynetdicom")
    pnd.handlers.clear()
    pnd.propagate = True
    quiet_pynetdicom()
    _capture_warnings()
    return scrubber


def quiet_pynetdicom() -> None:
    """Let pynetdicom build its log text only when its logger's level can write it.

    Its "standard" event handlers format every PDU and DIMSE message (INFO and DEBUG lines), and its
    identifier dumps pretty-print every C-FIND/C-GET/C-MOVE identifier, whatever the logger's level:
    at the default WARNING all of it is thrown away, after costing 10-25% of the CPU a 50-match
    C-FIND took on both ends (measured against the simulated PACS), all of it holding the GIL.
    The switches are read when an association or server is created, so the level configured here
    holds for every association made afterwards. Called by :func:`configure_logging`, and by
    processes that leave logging as it is (the test session).
    """
    pnd = logging.getLogger("pynetdicom")
    _pnd_config.LOG_HANDLER_LEVEL = "standard" if pnd.isEnabledFor(logging.INFO) else "none"
    debug = pnd.isEnabledFor(logging.DEBUG)
    _pnd_config.LOG_REQUEST_IDENTIFIERS = debug
    _pnd_config.LOG_RESPONSE_IDENTIFIERS = debug


def _capture_warnings() -> None:
    """Route ``warnings.warn`` (pydicom's validation warnings quote element values: BSNs, names)
    through the logger ``py.warnings``, hence the root handler and its scrubber, instead of the
    default ``showwarning`` that writes to stderr in clear.

    Turned off and on again because :func:`logging.captureWarnings` remembers the ``showwarning`` it
    replaced and does nothing when already on: if something restored that function since (a
    ``warnings.catch_warnings`` block, as pytest uses), warnings would silently reach stderr again.
    """
    logging.captureWarnings(False)
    logging.captureWarnings(True)
    warnings_logger = logging.getLogger("py.warnings")
    warnings_logger.handlers.clear()
    warnings_logger.propagate = True
