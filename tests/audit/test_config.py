"""The audit config: safe with no keys at all, strict about everything else."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from duo_gateway.config.audit import AuditConfig, SyslogConfig
from duo_gateway.config.tls import ClientTls


def test_no_keys_gives_a_local_audit_file_and_no_network() -> None:
    cfg = AuditConfig.model_validate({})
    assert cfg.file == Path("audit/audit.log")
    assert cfg.syslog is None
    assert (cfg.enterprise_site_id, cfg.source_id) == ("DUO", "duo-gateway")


def test_syslog_defaults_to_tls_on_6514() -> None:
    """Omitting ``tls`` must not mean plain TCP: the records carry BSNs."""
    cfg = AuditConfig.model_validate({"syslog": {"host": "arr.example.nl"}})
    assert cfg.syslog is not None
    assert cfg.syslog.port == 6514
    assert cfg.syslog.tls == ClientTls()
    assert cfg.syslog.queue_dir == Path("audit/queue")


@pytest.mark.parametrize("syslog", [
    {"host": "h", "reconnect_initial_s": 5, "reconnect_max_s": 1},
    {"host": "h", "app_name": "has space"},
    {"host": "h", "port": 0},
    {"host": ""},
    {"host": "h", "confirm_grace_s": -1},
    {"host": "h", "retries": 3},
])
def test_invalid_syslog_settings_are_refused(syslog: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        AuditConfig.model_validate({"syslog": syslog})


def test_plain_tcp_needs_an_explicit_none() -> None:
    assert SyslogConfig(host="127.0.0.1", tls=None).tls is None
