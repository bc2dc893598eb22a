"""A small national network for transfer end-to-end tests, with real PACSes at both ends.

- **Mitz**: the simulator, knowing one TLB hospital and one XCA community.
- **TLB hospital**: an **Orthanc** (Debian package) loaded with DCMTK ``storescu``, queried by DUO with
  C-FIND and C-GET, behind the consent gate.
- **XCA community**: the community simulator (ITI-38, ITI-39 KOS, RAD-75 MTOM), misbehaving on demand.
- **Destination**: a second **Orthanc**, the requester's own PACS, named ``own-pacs`` in DUO's config.
- **DUO**: a real :class:`~duo_gateway.daemon.Gateway`; study ids come from its own timeline API, as a
  TLB client would get them.
"""

from __future__ import annotations

import asyncio
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any, Final

import aiohttp

from duo_gateway.config.loader import parse_config
from duo_gateway.daemon import Gateway
from duo_gateway.dicom.kos import parse_kos
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.config import SimHospital, default_network
from duo_gateway.sim.http import misbehaving
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.xca.metadata import KOS_FORMAT
from tests.support.clients import plain_clients
from tests.support.orthanc import Orthanc, load_with_storescu, run_orthanc
from tests.support.peers import Peer, serve_peer

HOST: Final = "127.0.0.1"
HOME: Final = "urn:oid:2.16.528.1.1007.99.1"
PERIOD: Final = (date(2015, 1, 1), date(2026, 12, 31))
REQUESTER: Final = {"ura": "00010001", "organization_type": "V6", "uzi": "000095254", "role": "01.039",
                    "purpose": "TREAT"}
BASE = default_network()
ALL, NONE = (next(p for p in BASE.patients if p.consent == c) for c in ("all", "none"))
NOORD = BASE.communities[0]
#: The Orthanc-backed TLB hospital.
TLB: Final = SimHospital(ura="00010003", name="Orthanc Ziekenhuis", ae_title="ORTHANC_SRC",
                         repository_unique_id="2.16.528.1.1007.99.10003.1", studies_per_patient=1)
NET: Final = BASE.model_copy(update={"hospitals": [TLB], "communities": [NOORD]})
DESTINATION: Final = "own-pacs"
LOCAL_ISSUER: Final = "OWN_HOSPITAL"


def tlb_studies() -> list[GeneratedStudy]:
    return [s for p in NET.patients for s in generate_studies(p, TLB, TLB.studies_per_patient, NET.seed,
                                                              image_size=NET.image_size)]


@contextmanager
def tlb_source(tmp: Path) -> Iterator[Orthanc]:
    """The TLB hospital's Orthanc, loaded with :func:`tlb_studies` over DCMTK storescu."""
    files = [str(p) for s in tlb_studies() for p in write_study(s, tmp / "send" / s.study_instance_uid)]
    with run_orthanc(tmp / "orthanc", ae_title=TLB.ae_title) as orthanc:
        load_with_storescu(orthanc, files)
        yield orthanc


@dataclass
class TransferNetwork:
    gateway: Gateway
    mitz: Peer
    community: Peer
    community_sim: XcaCommunitySimulator
    source: Orthanc
    destination: Orthanc
    session: aiohttp.ClientSession
    pki: Pki
    tmp: Path

    @property
    def api(self) -> str:
        return f"{self.gateway.http_url}{self.gateway.config.timeline.path_prefix}"

    async def timeline(self, bsn: str) -> dict[str, Any]:
        body = {"patient": {"bsn": bsn}, "requester": REQUESTER,
                "period": {"from": PERIOD[0].isoformat(), "to": PERIOD[1].isoformat()}}
        async with self.session.post(f"{self.api}/timeline", json=body) as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def study_ids(self, bsn: str, source_prefix: str) -> list[tuple[str, dict[str, Any]]]:
        """(id, study) of every timeline study whose primary source starts with ``source_prefix``."""
        answer = await self.timeline(bsn)
        return [(s["id"], s) for s in answer["studies"] if s["sources"][0].startswith(source_prefix)]

    async def submit(self, study_ids: list[str], **extra: Any) -> tuple[int, dict[str, Any]]:
        body = {"studies": study_ids, "destination": DESTINATION, "requester": REQUESTER, **extra}
        async with self.session.post(f"{self.api}/transfers", json=body) as r:
            return r.status, await r.json()

    async def status(self, job_id: str) -> dict[str, Any]:
        async with self.session.get(f"{self.api}/transfers/{job_id}") as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
            return answer

    async def wait(self, job_id: str, timeout_s: float = 60.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            status = await self.status(job_id)
            if status["state"] not in ("queued", "running"):
                return status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)

    @contextmanager
    def misbehaving(self, behaviour: Misbehaviour) -> Iterator[None]:
        with misbehaving(self.community.app, behaviour):
            yield


def kos_instances(sim: XcaCommunitySimulator, study_uid: str) -> set[str]:
    """What the community's manifest of a study lists: the exact set a transfer must deliver."""
    for doc in sim.documents:
        if doc.entry.format_code is not None and doc.entry.format_code.code == KOS_FORMAT.code:
            kos = parse_kos(doc.data)
            if kos.study_instance_uid == study_uid:
                return {uid for series in kos.series for uid in series.sop_instance_uids}
    raise KeyError(study_uid)


def clear(orthanc: Orthanc) -> None:
    """Delete every study, so each test sees only what it transferred."""
    studies = orthanc.rest("/studies")
    assert isinstance(studies, list)
    for study in studies:
        request = urllib.request.Request(f"http://{orthanc.host}:{orthanc.http_port}/studies/{study}",
                                         method="DELETE")
        urllib.request.urlopen(request, timeout=10).close()


def destination_instances(orthanc: Orthanc, study_uid: str) -> dict[str, dict[str, Any]]:
    """SOP Instance UID -> main DICOM tags of every instance of one study at an Orthanc."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Query": {"StudyInstanceUID": study_uid},
                                        "Expand": True})
    assert isinstance(found, list)
    out: dict[str, dict[str, Any]] = {}
    for item in found:
        tags = orthanc.rest(f"/instances/{item['ID']}/simplified-tags")
        assert isinstance(tags, dict)
        out[str(tags["SOPInstanceUID"])] = tags
    return out


def raw_config(tmp: Path, mitz_url: str, community_url: str, source: Orthanc, destination: Orthanc,
               pki: Pki, **transfers: Any) -> dict[str, Any]:
    return {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO (transfer e2e)"},
        "listeners": {"http": {"host": HOST, "port": 0},
                      "dicom": {"ae_title": "DUO_GATEWAY", "host": HOST, "port": 0}},
        "tlb_hospitals": [{"ura": TLB.ura, "name": TLB.name, "organisation_type": TLB.organisation_type,
                           "ae_title": source.ae_title, "host": HOST, "port": source.dicom_port,
                           "repository_unique_id": TLB.repository_unique_id, "timeout_s": 10.0}],
        "xca_communities": [{
            "home_community_id": NOORD.home_community_id, "name": NOORD.name,
            "iti38": f"{community_url}/iti38", "iti39": f"{community_url}/iti39",
            "rad75": f"{community_url}/rad75", "uras": [i.ura for i in NOORD.institutions],
            "timeout_s": 10.0, "retries": 1, "retry_backoff_s": 0.05, "rad75_batch_size": 4}],
        "mitz": {"closed_url": f"{mitz_url}/geslotenautorisatievraag/xacml3",
                 "open_url": f"{mitz_url}/openautorisatievraag",
                 "subscriptions_url": f"{mitz_url}/abonnementen/fhir/Subscription", "timeout_s": 3.0},
        "xua": {"signing_key_file": str(pki.server.key),
                "signing_cert_file": str(pki.server.cert)},
        "transfers": {"destinations": [{"name": DESTINATION, "ae_title": destination.ae_title, "host": HOST,
                                        "port": destination.dicom_port, "uras": [REQUESTER["ura"]],
                                        "patient_id_issuer": LOCAL_ISSUER, "timeout_s": 10.0}],
                      "retries": 3, "retry_backoff_s": 0.1, "lease_s": 6.0, **transfers},
        "clients": plain_clients(tlb_uras=[REQUESTER["ura"]]),
        "storage": {"path": str(tmp / "duo")},
        "logging": {"level": "WARNING"},
        "daemon": {"shutdown_grace_s": 2.0},
    }


@asynccontextmanager
async def running(tmp: Path, source: Orthanc, destination: Orthanc, **transfers: Any
                  ) -> AsyncIterator[TransferNetwork]:
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    peers: list[Peer] = []
    gateway: Gateway | None = None
    try:
        mitz = await serve_peer(MitzSimulator(NET, tlb_home_community_id=HOME).app())
        peers.append(mitz)
        community_sim = XcaCommunitySimulator(NOORD, NET)
        community = await serve_peer(community_sim.app())
        peers.append(community)
        raw = raw_config(tmp, mitz.url, community.url, source, destination, pki, **transfers)
        gateway = Gateway(parse_config(raw, base_dir=tmp, source="transfer e2e", env={}))
        await gateway.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            yield TransferNetwork(gateway, mitz, community, community_sim, source, destination, session, pki,
                                  tmp)
    finally:
        if gateway is not None:
            await gateway.stop()
        for peer in peers:
            await peer.runner.cleanup()
