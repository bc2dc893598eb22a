"""``[clients]`` entries for tests on plain-HTTP loopback listeners: callers without a certificate.

Plain HTTP has no client certificate, so the only way a test's caller is a known client is an entry
with ``certificate.absent``; one per kind. Tests of identification by certificate build their own.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from duo_gateway.access import ClientDirectory
from duo_gateway.config.access import ClientsConfig

#: The URA the test requesters speak for (tests/timeline/harness.py, tests/transfer/harness.py).
TEST_URA = "00010001"


def plain_clients(*, tlb_uras: Sequence[str] = (TEST_URA,), xca: dict[str, Any] | None = None,
                  mitz: bool = True, **tlb_extra: Any) -> dict[str, Any]:
    """A TLB client (and optionally an XCA peer and Mitz) matched by having no certificate."""
    clients: dict[str, Any] = {"tlb": [{"name": "test-tlb", "certificate": {"absent": True},
                                        "uras": list(tlb_uras), **tlb_extra}]}
    if xca is not None:
        clients["xca"] = [{"name": "test-xca", "certificate": {"absent": True}, **xca}]
    if mitz:
        clients["mitz"] = [{"name": "test-mitz", "certificate": {"absent": True}}]
    return clients


def plain_xca_peer(*, home_community_id: str, issuer: str,
                   signing_certs: Sequence[Path | str]) -> dict[str, Any]:
    return {"home_community_id": home_community_id, "issuer": issuer,
            "signing_certs": [str(p) for p in signing_certs]}


def plain_directory(**kwargs: Any) -> ClientDirectory:
    """The resolved directory of :func:`plain_clients`, for apps built with ``build_app`` directly."""
    return ClientDirectory.build(ClientsConfig.model_validate(plain_clients(**kwargs)))
