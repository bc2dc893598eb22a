"""The views' network: DUO with each test module's TLB source Orthanc (its ``source`` fixture), an XCA
community simulator and Mitz, from the transfers' harness."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from tests.support.orthanc import Orthanc
from tests.transfer.harness import TransferNetwork, running


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory,
                  source: Orthanc) -> AsyncIterator[TransferNetwork]:
    # The source doubles as the (unused) transfer destination: views store nothing anywhere.
    async with running(tmp_path_factory.mktemp("net"), source, source) as net:
        yield net
