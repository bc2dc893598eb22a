"""Issue 14: a 64 MiB ITI-39 answer is refused at the configured manifest limit while DUO stays responsive.

A community (the simulator, misbehaving with ``oversized_manifest_bytes``) answers the KOS manifest of a
study grown to 64 MiB: hundreds of thousands of references to instances that do not exist. DUO used to
read it whole, parse it for tens of seconds in a thread and stall ``/healthz`` for seconds with the
collector walking millions of pydicom objects. Now reading stops at ``iti39_max_manifest_bytes``, the
transfer fails with a detail naming that key, and ``/healthz`` (polled throughout, in this process and
so on the same event loop as DUO and the simulators) answers every poll in under 100 ms.
"""

from __future__ import annotations

import asyncio
import gc
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Final

import aiohttp
import pytest
import pytest_asyncio

from duo_gateway.sim.behaviour import XcaMisbehaviour
from duo_gateway.sim.config import SimCommunity, SimInstitution, default_network
from duo_gateway.sim.http import misbehaving
from tests.conformance.ig_network import DESTINATION, REQUESTER, IgNetwork, running
from tests.support.storescp import StoreScp, run_storescp

pytestmark = pytest.mark.asyncio(loop_scope="module")

BASE = default_network()
PATIENT = next(p for p in BASE.patients if p.consent == "all")
#: One manifest-only study: the manifest is all a transfer of it reads before it is refused.
BLOATED: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20078", name="XDS Opgeblazen",
    repository_unique_id="2.16.528.1.1007.99.20078.1",
    institutions=[SimInstitution(ura="00020781", name="Opgeblazen Ziekenhuis")], studies_per_patient=0,
    manifest_only_studies={PATIENT.bsn: 1})
NET: Final = BASE.model_copy(update={"communities": [BLOATED]})
#: A 64 MiB answer: the manifest just under the 64 MiB document limit DUO had before issue 14, which
#: read it whole and parsed it (the issue's 27 s of CPU), and with it the MIME part and envelope.
MANIFEST_BYTES: Final = 64 * 1024 * 1024 - 192 * 1024
#: The limit configured for this test, below the 4 MiB default so that the key named is surely the one
#: in force.
LIMIT: Final = 2 * 1024 * 1024
HEALTHZ_MAX_S: Final = 0.1
ATTEMPTS: Final = 3


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StoreScp]:
    with run_storescp(tmp_path_factory.mktemp("own-pacs")) as scp:
        yield scp


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(destination: StoreScp,
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IgNetwork]:
    settings = {BLOATED.home_community_id: {"iti39_max_manifest_bytes": LIMIT}}
    async with running(tmp_path_factory.mktemp("manifest-limit"), NET, gateways={"duo": settings},
                       destination=destination) as net:
        yield net


async def _poll_healthz(url: str, stop: asyncio.Event) -> list[float]:
    """Latency of every /healthz poll until ``stop``, polled back to back (5 ms apart)."""
    latencies: list[float] = []
    async with aiohttp.ClientSession() as session:
        while not stop.is_set() or len(latencies) < 50:
            start = time.perf_counter()
            async with session.get(f"{url}/healthz") as resp:
                assert resp.status == 200
                await resp.read()
            latencies.append(time.perf_counter() - start)
            await asyncio.sleep(0.005)
    return latencies


async def test_a_64_mib_manifest_is_refused_at_the_limit_while_healthz_stays_fast(network: IgNetwork) -> None:
    """The worst of 50+ polls must stay under 100 ms. The machine is shared: a pause of this whole
    process (the scheduler) can put one poll over it in any run, a stall of DUO's in every run, so the
    transfer is measured up to :data:`ATTEMPTS` times and one clean run passes."""
    community = network.communities[0]
    (study_id,) = [s["id"] for s in (await network.timeline(PATIENT.bsn, "duo"))["studies"]]
    (doc,) = community.kos_entries(PATIENT.bsn)
    # The simulator's own work (writing 64 MiB of references) is done before the measurement starts.
    grown = await community.sim.grown_manifest(doc.entry.unique_id, MANIFEST_BYTES)
    assert grown is not None and MANIFEST_BYTES <= len(grown) < 64 * 1024 * 1024
    gateway = network.gateways["duo"]
    worst: list[float] = []
    with misbehaving(community.peer.app, XcaMisbehaviour(oversized_manifest_bytes=MANIFEST_BYTES)):
        # This process also holds what the rest of the suite left behind (hundreds of thousands of objects
        # by the end of a full run): a full collection walking them paused it for 100-500 ms, a pause
        # DUO's own process does not have. Frozen, they are left out of the collections the test triggers.
        gc.collect()
        gc.freeze()
        try:
            for _ in range(ATTEMPTS):
                mark = len(community.log)
                stop = asyncio.Event()
                poller = asyncio.create_task(_poll_healthz(gateway.http_url, stop))
                try:
                    status = await _transfer(network, study_id, timeout_s=30.0)
                finally:
                    stop.set()
                    latencies = await poller
                worst.append(max(latencies))
                if status is None:
                    break  # a transfer stuck on the manifest: no point in another
                assert status["state"] == "failed", status
                (result,) = status["studies"]
                assert result["id"] == study_id
                detail = result["detail"]
                assert "ITI-39 of the manifest" in detail
                assert f"xca_communities.iti39_max_manifest_bytes = {LIMIT} bytes" in detail, detail
                # Refused, not asked again: the same request would bring the same answer.
                assert [e.path for e in community.log[mark:]] == ["/iti39"]
                if worst[-1] < HEALTHZ_MAX_S:
                    break
        finally:
            gc.unfreeze()
    assert min(worst) < HEALTHZ_MAX_S, (
        "/healthz took up to " + ", ".join(f"{w * 1000:.0f}" for w in worst)
        + " ms in each transfer while the manifest was read")
    assert status is not None, "the transfer did not end within 30 s"


async def _transfer(network: IgNetwork, study_id: str, *, timeout_s: float) -> dict[str, Any] | None:
    """Submit and wait for the job's end; None when it has not ended within ``timeout_s``."""
    api = network.api("duo")
    body = {"studies": [study_id], "destination": DESTINATION, "requester": REQUESTER}
    async with network.session.post(f"{api}/transfers", json=body) as r:
        assert r.status == 202, await r.text()
        job = (await r.json())["id"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        async with network.session.get(f"{api}/transfers/{job}") as r:
            status: dict[str, Any] = await r.json()
        if status["state"] not in ("queued", "running"):
            return status
        await asyncio.sleep(0.1)
    return None
