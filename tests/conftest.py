from __future__ import annotations

import os
from pathlib import Path

import pytest

from duo_gateway.observability.logging import quiet_pynetdicom
from tests.support.pki import Pki, make_pki

REPO = Path(__file__).resolve().parent.parent
SHARED = REPO.parent / "shared"
WSDL_DIR = SHARED / "ihe" / "wsdl"


def pytest_configure(config: pytest.Config) -> None:
    """pynetdicom formats every PDU for DEBUG even when nothing writes it; like the daemon (through
    configure_logging), the test process has it build only what its log level keeps."""
    quiet_pynetdicom()


@pytest.fixture(scope="session")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="session")
def wsdl_dir() -> Path:
    """The official IHE/OASIS schemas beside the repo; absent outside CI means skip, loudly."""
    if not WSDL_DIR.is_dir():
        msg = f"../shared/ihe/wsdl not found at {WSDL_DIR}: official IHE XSDs are needed for this test"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return WSDL_DIR
