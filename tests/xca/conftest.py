"""Fixtures of the Initiating Gateway tests; each test module brings its own ``net``."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from duo_gateway.sim.config import SimNetworkConfig
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from tests.xca.recording import Community, Recorder, serve


@pytest.fixture(scope="module")
def sim(net: SimNetworkConfig) -> XcaCommunitySimulator:
    return XcaCommunitySimulator(net.communities[0], net)


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    # PKIoverheid, and so every XML-DSig peer, is RSA-only.
    return make_pki(tmp_path_factory.mktemp("xua-pki"), key_type="rsa")


@pytest.fixture
async def community(sim: XcaCommunitySimulator) -> AsyncIterator[Community]:
    recorder = Recorder()
    app = sim.app()
    app.middlewares.insert(0, recorder.middleware)
    server = await serve(app)
    try:
        yield Community(str(server.make_url("")).rstrip("/"), app, recorder, sim.home)
    finally:
        await server.close()
