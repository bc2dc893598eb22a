"""Transfers survive what production does to them: a DUO killed mid-transfer, two DUOs sharing the work
(and one of them dying), a source that goes away mid-study; and a crash leaves no patient data behind.

DUO runs here as a real OS process (``python -m duo_gateway serve``, :mod:`tests.support.duo_process`)
so it can die by SIGKILL, with no shutdown code and its lease left in the job store. The XCA community
is the simulator, slowed down (``delay_ms``, one instance per RAD-75) so a transfer is reliably still
running when the test strikes. The destination is DCMTK ``storescp`` keeping one file per C-STORE
(:mod:`tests.support.storescp`): a receive log that shows how often every instance arrived.

**What "exactly once" means.** C-STORE is at-least-once by nature: DUO learns that an instance is
stored from the destination's response, and records it in the job store right after. A DUO killed
between the destination's write and its own record cannot know, and re-sends that instance on resume;
a PACS keeps one copy per SOP Instance UID, so the re-send is harmless. What DUO *can* promise, and
what is asserted here, is the strongest true statement:

- every instance of the manifest arrives at the destination;
- no instance the job store had recorded as stored before the kill is ever sent again;
- at most one instance (the one in flight at the kill, one association per job) arrives twice.

Without a crash (two replicas, a source outage) every instance arrives exactly once.
"""

from __future__ import annotations

import asyncio
import base64
import os
import sqlite3
import threading
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
from aiohttp import web

from duo_gateway.daemon import free_port
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.http import BEHAVIOUR_KEY
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from tests.support.duo_process import HOST, DuoProcess, duo_processes
from tests.support.orthanc import Orthanc
from tests.support.peers import serve_peer
from tests.support.postgres import Postgres, run_postgres
from tests.support.storescp import StoreScp, run_storescp
from tests.transfer.harness import (
    ALL,
    DESTINATION,
    HOME,
    NET,
    NOORD,
    PERIOD,
    REQUESTER,
    kos_instances,
    raw_config,
)

#: Three studies per institution: the ALL patient has six studies in the community, enough for one
#: job each in the replica test. All uncompressed: the destination is storescp's default, which takes
#: uncompressed syntaxes only, and durability, not transfer syntaxes, is what is tested here.
COMMUNITY: Final = NOORD.model_copy(update={"studies_per_patient": 3, "compressed": []})
NETWORK: Final = NET.model_copy(update={"communities": [COMMUNITY]})
#: Per RAD-75 (one instance each) and per ITI-39: a study takes seconds, so a test can act mid-way.
SLOW: Final = Misbehaviour(delay_ms=250)
#: Waiting only; nothing asserts how long anything took.
DEADLINE_S: Final = 60.0


@dataclass
class Network:
    """The simulated peers, served from the test's event loop, and what DUO needs to reach them."""

    community_sim: XcaCommunitySimulator
    community_app: web.Application
    mitz_url: str
    community_url: str
    pki: Pki
    destination: StoreScp
    session: aiohttp.ClientSession
    tmp: Path

    def config(self, name: str, **transfers: Any) -> dict[str, Any]:
        """A DUO config on fresh loopback ports with its own storage directory."""
        stand_in = Orthanc("UNUSED", HOST, 1, 0)  # raw_config wants a TLB source; none is configured
        dest = Orthanc(self.destination.ae_title, self.destination.host, self.destination.port, 0)
        raw = raw_config(self.tmp / name, self.mitz_url, self.community_url, stand_in, dest, self.pki,
                         **{"lease_s": 3.0, **transfers})
        raw["tlb_hospitals"] = []
        raw["listeners"]["http"]["port"] = free_port()
        raw["listeners"]["dicom"]["port"] = free_port()
        raw["xca_communities"][0]["rad75_batch_size"] = 1
        raw["storage"] = {"path": str(self.tmp / name / "storage")}
        raw["logging"] = {"level": "INFO"}
        return raw

    def behave(self, behaviour: Misbehaviour) -> None:
        self.community_app[BEHAVIOUR_KEY].value = behaviour

    async def xca_studies(self, duo: DuoProcess) -> list[tuple[str, str]]:
        """(timeline id, Study Instance UID) of the ALL patient's community studies, as DUO lists them."""
        body = {"patient": {"bsn": ALL.bsn}, "period": {"from": PERIOD[0].isoformat(),
                                                        "to": PERIOD[1].isoformat()},
                "requester": REQUESTER}
        async with self.session.post(f"{duo.api}/timeline", json=body) as r:
            assert r.status == 200, await r.text()
            answer = await r.json()
        return [(s["id"], s["study_instance_uid"]) for s in answer["studies"]
                if s["sources"][0].startswith(f"xca:{COMMUNITY.home_community_id}")]

    async def submit(self, duo: DuoProcess, study_ids: list[str]) -> str:
        body = {"studies": study_ids, "destination": DESTINATION, "requester": REQUESTER}
        async with self.session.post(f"{duo.api}/transfers", json=body) as r:
            answer = await r.json()
            assert r.status == 202, answer
            return str(answer["id"])

    async def status(self, duo: DuoProcess, job_id: str) -> dict[str, Any]:
        async with self.session.get(f"{duo.api}/transfers/{job_id}") as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def until(self, duo: DuoProcess, job_id: str, what: str, done: Any) -> dict[str, Any]:
        """Poll the job until ``done(status)``; fails (with DUO's log) after a generous deadline."""
        deadline = time.monotonic() + DEADLINE_S
        while True:
            status = await self.status(duo, job_id)
            if done(status):
                return status
            assert time.monotonic() < deadline, f"{what}: {status}\n{duo.log_tail()}"
            await asyncio.sleep(0.05)

    async def final(self, duo: DuoProcess, job_id: str) -> dict[str, Any]:
        return await self.until(duo, job_id, "job did not finish",
                                lambda s: s["state"] not in ("queued", "running"))

    def wanted(self, study_uids: list[str]) -> set[str]:
        return {uid for study in study_uids for uid in kos_instances(self.community_sim, study)}


@asynccontextmanager
async def network(tmp: Path) -> AsyncIterator[Network]:
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    runners: list[web.AppRunner] = []
    try:
        mitz = await serve_peer(MitzSimulator(NETWORK, tlb_home_community_id=HOME).app())
        runners.append(mitz.runner)
        sim = XcaCommunitySimulator(COMMUNITY, NETWORK)
        community = await serve_peer(sim.app())
        runners.append(community.runner)
        with run_storescp(tmp / "destination") as destination:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                yield Network(sim, community.app, mitz.url, community.url, pki, destination, session, tmp)
    finally:
        for runner in runners:
            await runner.cleanup()


@contextmanager
def sqlite_rows(storage: Path, job_id: str) -> Iterator[sqlite3.Connection]:
    """The job store of a dead DUO, read as it was left (read-only)."""
    conn = sqlite3.connect(f"file:{storage / 'transfers.sqlite'}?mode=ro", uri=True)
    try:
        yield conn
    finally:
        conn.close()


def _pid(owner: str) -> int:
    """Owners are ``host:pid:random`` (TransferService)."""
    return int(owner.split(":")[1])


async def assert_resumed_without_resending(destination: StoreScp, wanted: set[str],
                                           stored_before: set[str]) -> None:
    """The module docstring's "exactly once" after a crash, checked on the destination's receive log."""
    received = await asyncio.to_thread(destination.received)
    assert set(received) == wanted, "every instance of the manifest arrived"
    assert {uid: received[uid] for uid in stored_before} == dict.fromkeys(stored_before, 1), \
        "an instance recorded as stored before the kill was sent again"
    resent = {uid: n for uid, n in received.items() if n > 1}
    # Only the instance in flight at the kill may arrive twice (its success was not yet recorded).
    assert len(resent) <= 1 and all(n == 2 for n in resent.values()), resent


# --- 1. killed mid-transfer, restarted --------------------------------------------------------


async def test_a_duo_killed_mid_transfer_resumes_after_restart_and_resends_nothing_it_had_recorded(
        tmp_path: Path) -> None:
    async with network(tmp_path) as net:
        raw = net.config("duo")
        storage = Path(raw["storage"]["path"])
        with duo_processes(DuoProcess(tmp_path / "duo", raw)) as (duo,):
            await duo.wait_ready(net.session)
            studies = (await net.xca_studies(duo))[:2]
            assert len(studies) == 2, studies
            wanted = net.wanted([uid for _, uid in studies])
            net.behave(SLOW)
            job_id = await net.submit(duo, [sid for sid, _ in studies])
            # Strike once some, not all, instances are recorded as stored.
            await net.until(duo, job_id, "no progress to interrupt",
                            lambda s: s["instances_stored"] >= 2 or s["state"] not in ("queued", "running"))
            first_pid = duo.pid
            duo.kill()

            with sqlite_rows(storage, job_id) as db:
                state, owner = db.execute("SELECT state, owner FROM transfer_jobs WHERE id = ?",
                                          (job_id,)).fetchone()
                rows = dict(db.execute("SELECT sop_instance_uid, state FROM transfer_instances"
                                       " WHERE job_id = ?", (job_id,)).fetchall())
            stored_before = {uid for uid, s in rows.items() if s == "stored"}
            assert state == "running" and _pid(owner) == first_pid, (state, owner)
            assert 0 < len(stored_before) < len(wanted), "the kill must land mid-transfer"
            assert stored_before <= wanted

            duo.start()  # same config, same storage: the lease lapses and the job is claimed again
            await duo.wait_ready(net.session)
            final = await net.final(duo, job_id)
            net.behave(Misbehaviour())

        assert final["state"] == "completed", final
        assert final["instances_expected"] == final["instances_stored"] == len(wanted)
        assert final["instances_failed"] == 0
        with sqlite_rows(storage, job_id) as db:
            (owner_after,) = db.execute("SELECT owner FROM transfer_jobs WHERE id = ?", (job_id,)).fetchone()
        assert _pid(owner_after) != first_pid, "the restarted DUO finished the job"

        await assert_resumed_without_resending(net.destination, wanted, stored_before)


# --- 2. two DUOs, one PostgreSQL ------------------------------------------------------------------


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with run_postgres() as server:
        yield server


def replica_env(url: str) -> dict[str, str]:
    """Shared secrets, from the environment as the config documentation asks: the same job store and
    the same study id key, so an id from one replica's timeline is valid at the other."""
    key = base64.b64encode(os.urandom(32)).decode()
    return {"DUO__STORAGE__URL": url, "DUO__TIMELINE__STUDY_ID_KEY": key}


def pg_owner(url: str, job_id: str) -> str:
    import psycopg

    with psycopg.connect(url) as conn:
        row = conn.execute("SELECT owner FROM transfer_jobs WHERE id = %s", (job_id,)).fetchone()
    assert row is not None and row[0], row
    return str(row[0])


async def test_two_duos_sharing_one_postgresql_split_the_jobs_and_send_every_instance_once(
        tmp_path: Path, postgres: Postgres) -> None:
    import psycopg

    url = await asyncio.to_thread(postgres.create_database, "duo")
    env = replica_env(url)
    async with network(tmp_path) as net:
        a = DuoProcess(tmp_path / "a", net.config("a"), env=env, name="a")
        b = DuoProcess(tmp_path / "b", net.config("b"), env=env, name="b")
        with duo_processes(a, b):  # started together: both migrate the empty schema at once
            await a.wait_ready(net.session)
            await b.wait_ready(net.session)
            studies = await net.xca_studies(a)
            assert len(studies) == 6, studies
            net.behave(SLOW)
            # Everything submitted to A; B only learns of the jobs from the shared store.
            jobs = [await net.submit(a, [sid]) for sid, _ in studies]
            finals = [await net.final(b if n % 2 else a, job) for n, job in enumerate(jobs)]
            net.behave(Misbehaviour())
            pids = {a.pid: "a", b.pid: "b"}

        for status in finals:
            assert status["state"] == "completed", status
            assert status["instances_failed"] == 0
        with psycopg.connect(url) as conn:
            owners: dict[str, str] = dict(conn.execute("SELECT id, owner FROM transfer_jobs").fetchall())
        assert set(owners) == set(jobs)
        assert {pids.get(_pid(owner)) for owner in owners.values()} == {"a", "b"}, \
            f"both replicas must have worked: {owners}"

        wanted = net.wanted([uid for _, uid in studies])
        assert sum(s["instances_stored"] for s in finals) == len(wanted)
        received = await asyncio.to_thread(net.destination.received)
        assert set(received) == wanted
        assert received == Counter(dict.fromkeys(wanted, 1)), \
            f"sent more than once: {({u: n for u, n in received.items() if n > 1})}"


async def test_a_replica_killed_mid_job_is_taken_over_by_the_other_when_its_lease_lapses(
        tmp_path: Path, postgres: Postgres) -> None:
    import psycopg

    url = await asyncio.to_thread(postgres.create_database, "duo")
    env = replica_env(url)
    async with network(tmp_path) as net:
        a = DuoProcess(tmp_path / "a", net.config("a"), env=env, name="a")
        b = DuoProcess(tmp_path / "b", net.config("b"), env=env, name="b")
        with duo_processes(a, b):
            await a.wait_ready(net.session)
            await b.wait_ready(net.session)
            studies = (await net.xca_studies(a))[:2]
            wanted = net.wanted([uid for _, uid in studies])
            net.behave(SLOW)
            job_id = await net.submit(a, [sid for sid, _ in studies])
            await net.until(b, job_id, "no progress to interrupt",
                            lambda s: s["instances_stored"] >= 2 or s["state"] not in ("queued", "running"))
            holder = pg_owner(url, job_id)
            # Whichever replica claimed it dies; the other one never heard of the job but from the store.
            victim, survivor = (a, b) if _pid(holder) == a.pid else (b, a)
            assert _pid(holder) == victim.pid
            victim.kill()
            with psycopg.connect(url) as conn:
                rows = conn.execute("SELECT sop_instance_uid FROM transfer_instances"
                                    " WHERE job_id = %s AND state = 'stored'", (job_id,)).fetchall()
            stored_before = {uid for (uid,) in rows}
            assert 0 < len(stored_before) < len(wanted), "the kill must land mid-transfer"
            final = await net.final(survivor, job_id)
            net.behave(Misbehaviour())

        assert final["state"] == "completed", final
        assert final["instances_expected"] == final["instances_stored"] == len(wanted)
        assert _pid(pg_owner(url, job_id)) == survivor.pid, "the surviving replica finished the job"
        await assert_resumed_without_resending(net.destination, wanted, stored_before)


# --- 3. the source goes away mid-study and comes back --------------------------------------------


async def test_a_community_going_down_mid_study_and_coming_back_still_completes_the_study(
        tmp_path: Path) -> None:
    async with network(tmp_path) as net:
        with duo_processes(DuoProcess(tmp_path / "duo", net.config("duo", retries=5))) as (duo,):
            await duo.wait_ready(net.session)
            study_id, study_uid = (await net.xca_studies(duo))[0]
            wanted = net.wanted([study_uid])
            net.behave(SLOW)
            job_id = await net.submit(duo, [study_id])
            await net.until(duo, job_id, "no progress before the outage",
                            lambda s: s["instances_stored"] >= 1 or s["state"] not in ("queued", "running"))
            net.behave(Misbehaviour(down=True))
            during = await net.until(duo, job_id, "the outage went unnoticed",
                                     lambda s: s["instances_failed"] >= 1 or s["state"] != "running")
            net.behave(Misbehaviour())
            final = await net.final(duo, job_id)

        assert during["state"] == "running" and 0 < during["instances_stored"] < len(wanted), during
        assert final["state"] == "completed", final
        assert final["instances_stored"] == final["instances_expected"] == len(wanted)
        assert final["instances_failed"] == 0, "instances that failed in the outage were fetched again"
        received = await asyncio.to_thread(net.destination.received)
        assert received == Counter(dict.fromkeys(wanted, 1)), received


# --- 4. what a crash leaves on disk ---------------------------------------------------------------


@contextmanager
def holding_pacs(hold_at: int) -> Iterator[tuple[int, threading.Event, threading.Event]]:
    """A pynetdicom storage SCP that stores at once, except the ``hold_at``-th C-STORE: that one it
    holds (no response) until ``release`` is set, after setting ``holding``. DUO is then mid-C-STORE
    with the instance in its spool, deterministically."""
    from pynetdicom import AE, evt

    from duo_gateway.dicom.acceptor import start_acceptor
    from duo_gateway.dicom.qr import receiving_contexts

    holding, release = threading.Event(), threading.Event()
    seen: list[str] = []

    def on_store(event: evt.Event) -> int:
        seen.append(str(getattr(event.request, "AffectedSOPInstanceUID", "")))
        if len(seen) == hold_at:
            holding.set()
            release.wait(60)
        return 0x0000

    ae = AE(ae_title="HOLDING_PACS")
    ae.supported_contexts = receiving_contexts()
    server = start_acceptor(ae, (HOST, 0), evt_handlers=[(evt.EVT_C_STORE, on_store)])
    try:
        yield int(server.server_address[1]), holding, release
    finally:
        release.set()
        server.shutdown()


async def test_a_kill_mid_transfer_leaves_no_patient_data_in_the_spool(tmp_path: Path) -> None:
    async with network(tmp_path) as net:
        raw = net.config("duo")
        spool = Path(raw["storage"]["path"]) / "spool"
        with holding_pacs(hold_at=2) as (port, holding, release):
            raw["transfers"]["destinations"][0].update({"ae_title": "HOLDING_PACS", "port": port})
            with duo_processes(DuoProcess(tmp_path / "duo", raw)) as (duo,):
                await duo.wait_ready(net.session)
                study_id, _ = (await net.xca_studies(duo))[0]
                job_id = await net.submit(duo, [study_id])
                assert await asyncio.to_thread(holding.wait, DEADLINE_S), duo.log_tail()
                in_flight = [p for p in spool.rglob("*") if p.is_file()]
                assert in_flight, "the instance being stored is in the spool"
                duo.kill()
                release.set()
                duo.start()
                await duo.wait_ready(net.session)
                final = await net.final(duo, job_id)
        assert final["state"] == "completed", final
        left = sorted(str(p.relative_to(spool)) for p in spool.rglob("*") if p.is_file())
        assert not left, f"patient data left behind in the spool: {left}"
