"""A DUO config for tests: loopback listeners on free ports, storage in the test's tmp dir."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from duo_gateway.config.loader import DuoConfig, parse_config
from tests.support.clients import plain_clients


def make_config(tmp_path: Path, *, mitz_port: int, tls: dict[str, Any] | None = None,
                hospitals: list[dict[str, Any]] | None = None, ops: bool = False,
                clients: dict[str, Any] | None = None) -> DuoConfig:
    http: dict[str, Any] = {"host": "127.0.0.1", "port": 0}
    if tls:
        http["tls"] = tls
    listeners: dict[str, Any] = {"http": http, "dicom": {"host": "127.0.0.1", "port": 0}}
    if ops:
        listeners["ops"] = {"host": "127.0.0.1", "port": 0}
    mitz = f"http://127.0.0.1:{mitz_port}"
    raw = {
        "gateway": {"home_community_id": "urn:oid:2.16.528.1.1007.99.1", "ura": "00099001", "name": "DUO"},
        "listeners": listeners,
        "tlb_hospitals": hospitals or [],
        "mitz": {"closed_url": f"{mitz}/geslotenautorisatievraag/xacml3", "open_url": f"{mitz}/open",
                 "subscriptions_url": f"{mitz}/sub"},
        # Plain-HTTP tests call as the certificate-less client; under mTLS a test names its own clients.
        "clients": clients if clients is not None else ({} if tls else plain_clients()),
        "storage": {"path": str(tmp_path / "storage")},
        "daemon": {"shutdown_grace_s": 5.0, "readiness_timeout_s": 1.0},
    }
    return parse_config(raw, base_dir=tmp_path, source="test", env={})
