"""Two XCA communities behind one DUO, for transfers across communities and NIST's IIG cases.

DUO is the Initiating Imaging Gateway; the community simulator plays NIST's Responding Imaging Gateways
A and B with NIST's home community and repository ids (``iig_2018-5400``: A ``…13.70.101`` /
``…13.71.101``, B ``…13.70.102`` / ``…13.71.102``, and the unregistered ``…13.70.102.999`` that DUO must
not know). Each simulator sits behind a :class:`~tests.xca.recording.Recorder` that keeps every request
DUO sends it, the way NIST's simulators store the RAD-75 requests they then check (``SimTransaction``).
The requester's PACS is an Orthanc; Mitz is the simulator; study ids come from DUO's own timeline, as
a TLB app gets them.

The studies have the shapes NIST's cases ask for rather than the generator's random ones: a single
image (twice, for "two studies"), a pair, six images in one series; see :data:`SHAPES`.
"""

from __future__ import annotations

import asyncio
import copy
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Final

import aiohttp
from lxml import etree
from pydicom.dataset import Dataset

from duo_gateway.config.loader import parse_config
from duo_gateway.daemon import Gateway
from duo_gateway.sim.behaviour import XcaMisbehaviour
from duo_gateway.sim.config import SimCommunity, SimHospital, SimInstitution, SimNetworkConfig, SimPatient
from duo_gateway.sim.http import misbehaving
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.soap.envelope import parse_envelope
from duo_gateway.xca.codes import Action
from duo_gateway.xca.retrieve import RetrieveImagingDocumentSetRequest, parse_imaging_retrieve_request
from tests.support.clients import plain_clients
from tests.support.orthanc import Orthanc
from tests.support.peers import Peer, serve_peer
from tests.xca.recording import Recorder

HOST: Final = "127.0.0.1"
DUO_HOME: Final = "urn:oid:2.16.528.1.1007.99.1"
REQUESTER: Final = {"ura": "00010001", "organization_type": "V6", "uzi": "000095254", "role": "01.039",
                    "purpose": "TREAT"}
DESTINATION: Final = "own-pacs"
#: NIST's unregistered community (``iig_2018-5400``: "Do not configure these in your Initiating
#: Imaging Gateway").
UNKNOWN_HOME: Final = "urn:oid:1.3.6.1.4.1.21367.13.70.102.999"
UNKNOWN_REPOSITORY: Final = "1.3.6.1.4.1.21367.13.71.102.999"

PATIENT: Final = SimPatient(bsn="999911120", name="Jansen^Anna", birth_date="19700312", sex="F",
                            consent="all")
A: Final = SimCommunity(home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.101", name="Community A",
                        repository_unique_id="1.3.6.1.4.1.21367.13.71.101",
                        institutions=[SimInstitution(ura="00020101", name="Imaging Centre A")])
B: Final = SimCommunity(home_community_id="urn:oid:1.3.6.1.4.1.21367.13.70.102", name="Community B",
                        repository_unique_id="1.3.6.1.4.1.21367.13.71.102",
                        institutions=[SimInstitution(ura="00020102", name="Imaging Centre B")])
#: Mitz places the patient's data at A and B; the hospital is there only because a network needs one
#: (DUO has no TLB hospital configured, and Mitz does not place it).
NET: Final = SimNetworkConfig(
    patients=[PATIENT],
    hospitals=[SimHospital(ura="00010009", name="Unused", ae_title="UNUSED",
                           repository_unique_id="2.16.528.1.1007.99.10009.1")],
    communities=[A, B])


def shaped(study: GeneratedStudy, images: int) -> GeneratedStudy:
    """``study`` with exactly ``images`` images, all in its first series (copies of its first image under
    their own SOP Instance UIDs), and no report: the shape a NIST case prescribes."""
    first = study.instances[0]
    instances: list[Dataset] = []
    for n in range(1, images + 1):
        ds = copy.deepcopy(first)
        if n > 1:
            ds.SOPInstanceUID = f"{first.SOPInstanceUID}.{n}"
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.InstanceNumber = n
        instances.append(ds)
    return replace(study, instances=instances, modalities=(str(first.Modality),), report_text=None)


def _studies(community: SimCommunity, images: tuple[int, ...]) -> list[GeneratedStudy]:
    institution = community.institutions[0]
    generated = generate_studies(PATIENT, institution, len(images), seed=_seed(community), image_size=16)
    return [shaped(s, n) for s, n in zip(generated, images, strict=True)]


def _seed(community: SimCommunity) -> int:
    """A stable seed per community, so A's and B's studies never share UIDs."""
    return NET.seed + int(community.home_community_id.rsplit(".", 1)[-1])


#: Community -> its studies' image counts. A: one image (NIST's study ``…958036``), one image
#: (``…958040``, the second of "two studies"), a pair (one to be lost for partial success); B: six images
#: in one series (``…958052``), one image (to be lost: "not present in Community B").
SHAPES: Final = {A.home_community_id: (1, 1, 2), B.home_community_id: (6, 1)}
STUDIES: Final = {A.home_community_id: _studies(A, SHAPES[A.home_community_id]),
                  B.home_community_id: _studies(B, SHAPES[B.home_community_id])}
A_ONE, A_TWO, A_PAIR = STUDIES[A.home_community_id]
B_SIX, B_ONE = STUDIES[B.home_community_id]


def sop_uids(study: GeneratedStudy) -> list[str]:
    return [str(ds.SOPInstanceUID) for ds in study.instances]


@dataclass
class SimulatedCommunity:
    """One Responding Imaging Gateway: the simulator, its HTTP peer and what it received."""

    config: SimCommunity
    sim: XcaCommunitySimulator
    peer: Peer
    recorder: Recorder

    @property
    def home(self) -> str:
        return self.config.home_community_id

    def requests(self, action: str, since: int = 0) -> list[etree._Element]:
        """The SOAP Body payloads of the requests with this wsa:Action received since ``since``."""
        out: list[etree._Element] = []
        for raw in self.recorder.bodies[since:]:
            envelope = parse_envelope(raw)
            if envelope.addressing.action == action and envelope.body is not None:
                out.append(envelope.body)
        return out

    def rad75(self, since: int = 0) -> list[RetrieveImagingDocumentSetRequest]:
        return [parse_imaging_retrieve_request(el) for el in self.requests(Action.RAD75, since)]

    @contextmanager
    def misbehaving(self, behaviour: XcaMisbehaviour) -> Iterator[None]:
        with misbehaving(self.peer.app, behaviour):
            yield


@dataclass
class CommunitiesNetwork:
    gateway: Gateway
    communities: dict[str, SimulatedCommunity]
    destination: Orthanc
    session: aiohttp.ClientSession

    @property
    def api(self) -> str:
        return f"{self.gateway.http_url}{self.gateway.config.timeline.path_prefix}"

    @property
    def a(self) -> SimulatedCommunity:
        return self.communities[A.home_community_id]

    @property
    def b(self) -> SimulatedCommunity:
        return self.communities[B.home_community_id]

    def received(self) -> int:
        """Requests of any kind both communities have received so far."""
        return sum(len(c.recorder.bodies) for c in self.communities.values())

    async def study_ids(self) -> dict[str, str]:
        """Study instance UID -> the id DUO's timeline hands out for it."""
        body = {"patient": {"bsn": PATIENT.bsn}, "requester": REQUESTER,
                "period": {"from": "2015-01-01", "to": "2026-12-31"}}
        async with self.session.post(f"{self.api}/timeline", json=body) as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
        return {s["study_instance_uid"]: s["id"] for s in answer["studies"]}

    async def submit(self, study_ids: list[str]) -> tuple[int, dict[str, Any]]:
        body = {"studies": study_ids, "destination": DESTINATION, "requester": REQUESTER}
        async with self.session.post(f"{self.api}/transfers", json=body) as r:
            return r.status, await r.json()

    async def jobs(self) -> list[dict[str, Any]]:
        async with self.session.get(f"{self.api}/transfers") as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return list(answer["transfers"])

    async def wait(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.session.get(f"{self.api}/transfers/{job_id}") as r:
                assert r.status == 200, await r.text()
                status: dict[str, Any] = await r.json()
            if status["state"] not in ("queued", "running"):
                return status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.05)

    async def transfer(self, study_ids: list[str]) -> dict[str, Any]:
        """Submit and wait for the job's final state."""
        status, accepted = await self.submit(study_ids)
        assert status == 202, accepted
        return await self.wait(accepted["id"])


def raw_config(tmp: Path, mitz_url: str, communities: dict[str, str], destination: Orthanc,
               pki: Pki) -> dict[str, Any]:
    return {
        "gateway": {"home_community_id": DUO_HOME, "ura": "00099001", "name": "DUO (IIG across communities)"},
        "listeners": {"http": {"host": HOST, "port": 0},
                      "dicom": {"ae_title": "DUO_GATEWAY", "host": HOST, "port": 0}},
        "xca_communities": [{
            "home_community_id": c.home_community_id, "name": c.name,
            "iti38": f"{communities[c.home_community_id]}/iti38",
            "iti39": f"{communities[c.home_community_id]}/iti39",
            "rad75": f"{communities[c.home_community_id]}/rad75", "uras": [i.ura for i in c.institutions],
            "timeout_s": 5.0, "retries": 1, "retry_backoff_s": 0.02} for c in (A, B)],
        "mitz": {"closed_url": f"{mitz_url}/geslotenautorisatievraag/xacml3",
                 "open_url": f"{mitz_url}/openautorisatievraag",
                 "subscriptions_url": f"{mitz_url}/abonnementen/fhir/Subscription", "timeout_s": 3.0},
        "xua": {"signing_key_file": str(pki.server.key), "signing_cert_file": str(pki.server.cert)},
        "transfers": {"destinations": [{"name": DESTINATION, "ae_title": destination.ae_title, "host": HOST,
                                        "port": destination.dicom_port, "uras": [REQUESTER["ura"]],
                                        "timeout_s": 10.0}],
                      "retries": 1, "retry_backoff_s": 0.02, "lease_s": 6.0},
        "clients": plain_clients(tlb_uras=[REQUESTER["ura"]]),
        "storage": {"path": str(tmp / "duo")},
        "logging": {"level": "WARNING"},
        "daemon": {"shutdown_grace_s": 2.0},
    }


@asynccontextmanager
async def running(tmp: Path, destination: Orthanc) -> AsyncIterator[CommunitiesNetwork]:
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    peers: list[Peer] = []
    gateway: Gateway | None = None
    try:
        mitz = await serve_peer(MitzSimulator(NET).app())
        peers.append(mitz)
        communities: dict[str, SimulatedCommunity] = {}
        for config in (A, B):
            sim = XcaCommunitySimulator(config, NET, studies=[
                (PATIENT, config.institutions[0], s) for s in STUDIES[config.home_community_id]])
            recorder = Recorder()
            app = sim.app()
            app.middlewares.insert(0, recorder.middleware)
            peer = await serve_peer(app)
            peers.append(peer)
            communities[config.home_community_id] = SimulatedCommunity(config, sim, peer, recorder)
        raw = raw_config(tmp, mitz.url, {h: c.peer.url for h, c in communities.items()}, destination, pki)
        gateway = Gateway(parse_config(raw, base_dir=tmp, source="IIG across communities", env={}))
        await gateway.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            yield CommunitiesNetwork(gateway, communities, destination, session)
    finally:
        if gateway is not None:
            await gateway.stop()
        for peer in peers:
            await peer.runner.cleanup()
