"""A national network for timeline end-to-end tests: DUO in front of every kind of source it meets.

Built from the same pieces as :class:`duo_gateway.sim.network.SimulatedNetwork` (Mitz simulator,
SimPacs hospitals, XCA community simulators, a real :class:`~duo_gateway.daemon.Gateway`), plus what
the demo network cannot show and the timeline must survive:

- an **Orthanc** PACS as a third TLB hospital, so a hospital DUO did not write itself is on the timeline;
- **XDS Partieel**, a small custom Responding Gateway that answers every ITI-38 with *PartialSuccess*
  (results plus a RegistryError), and whose institution Mitz places, so DUO localizes and asks it;
- **XDS Buiten Mitz**, a community Mitz knows nothing about, configured with
  ``query_without_localization``, so the fallback is exercised;
- a **request counter** in front of every community, because "DUO did not ask" is only provable at the
  peer, not from DUO's own answer.

Per-community timeouts differ on purpose: XDS Zuid gives up after :data:`ZUID_TIMEOUT_S` (no retries)
so a hanging community's cost can be measured well inside the timeline deadline.
"""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware

from duo_gateway.bsn import BSN_OID
from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.config.xca import DocumentCodes
from duo_gateway.daemon import Gateway
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.config import (
    SimCommunity,
    SimHospital,
    SimInstitution,
    default_network,
)
from duo_gateway.sim.http import Handler, install_behaviour, misbehaving
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.sim.xca import XcaCommunitySimulator, community_seed, instance_record, study_record
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    Addressing,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.xca.codes import Action, ErrorCode, QueryParam, ResponseStatus
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.hl7 import Cx
from duo_gateway.xca.metadata import is_report, report_entry, study_entry
from duo_gateway.xca.query import AdhocQueryResponse, build_adhoc_query_response, parse_adhoc_query_request
from tests.support.clients import plain_clients
from tests.support.peers import Peer, serve_peer

HOST: Final = "127.0.0.1"
HOME: Final = "urn:oid:2.16.528.1.1007.99.1"
PERIOD: Final = (date(2015, 1, 1), date(2026, 12, 31))
#: The TLB professional every timeline is asked for (a radiologist of hospital H1).
REQUESTER: Final = {"ura": "00010001", "organization_type": "V6", "uzi": "000095254", "role": "01.039",
                    "purpose": "TREAT"}

BASE = default_network()
ALL, PARTIAL, NONE = (next(p for p in BASE.patients if p.consent == c) for c in ("all", "partial", "none"))
H1, H2 = BASE.hospitals
NOORD, ZUID = BASE.communities
#: The Orthanc-backed hospital; in Mitz's network like any TLB hospital, but a real PACS product.
H3: Final = SimHospital(ura="00010003", name="Orthanc Ziekenhuis", ae_title="ORTHANC_TLB",
                        repository_unique_id="2.16.528.1.1007.99.10003.1", studies_per_patient=2)
PARTIEEL: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20003", name="XDS Partieel",
    repository_unique_id="2.16.528.1.1007.99.20003.1",
    institutions=[SimInstitution(ura="00020031", name="Partieel MC")], studies_per_patient=1)
#: Not in Mitz's network: no data holder of it is ever localized.
BUITEN: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20004", name="XDS Buiten Mitz",
    repository_unique_id="2.16.528.1.1007.99.20004.1",
    institutions=[SimInstitution(ura="00020041", name="Buitenhof Kliniek")], studies_per_patient=1)
#: What Mitz knows: both demo hospitals and communities, the Orthanc hospital and XDS Partieel.
NET: Final = BASE.model_copy(update={"hospitals": [H1, H2, H3], "communities": [NOORD, ZUID, PARTIEEL]})

ZUID_TIMEOUT_S: Final = 1.5
PARTIAL_ERROR: Final = RegistryError(ErrorCode.REGISTRY_NOT_AVAILABLE,
                                     "the Partieel MC archive is in maintenance",
                                     location=PARTIEEL.home_community_id)


def source_id(community: SimCommunity) -> str:
    return f"xca:{community.home_community_id}"


def hospital_studies(hospital: SimHospital) -> list[GeneratedStudy]:
    """What a TLB hospital's PACS holds of the network's patients (the same function SimPacs is fed)."""
    return [s for p in NET.patients for s in generate_studies(p, hospital, hospital.studies_per_patient,
                                                              NET.seed, image_size=NET.image_size)]


def duplicate_in_orthanc() -> GeneratedStudy:
    """H1's first study of the all-consent patient, also loaded into Orthanc (H3): one study, two PACSes."""
    return generate_studies(ALL, H1, 1, NET.seed, image_size=NET.image_size)[0]


def duplicate_at_partieel() -> GeneratedStudy:
    """H1's second study of the all-consent patient, also registered by XDS Partieel: in TLB and XCA."""
    return generate_studies(ALL, H1, 2, NET.seed, image_size=NET.image_size)[1]


def partieel_studies(bsn: str) -> list[GeneratedStudy]:
    patient = next(p for p in NET.patients if p.bsn == bsn)
    own = generate_studies(patient, PARTIEEL.institutions[0], PARTIEEL.studies_per_patient,
                           community_seed(NET, PARTIEEL), image_size=NET.image_size)
    return own + ([duplicate_at_partieel()] if bsn == ALL.bsn else [])


# -------------------------------------------------------------------------------------------------
# XDS Partieel: PartialSuccess on every query
# -------------------------------------------------------------------------------------------------


def partial_success_app() -> web.Application:
    """A Responding Gateway that finds the patient's studies but reports one archive unavailable.

    It answers with DUO's own codec (``build_adhoc_query_response``), so the answer is valid ITI-38 and
    only the status and the RegistryError are what is being tested.
    """
    institution = PARTIEEL.institutions[0]
    codes = DocumentCodes()

    async def iti38(request: web.Request) -> web.Response:
        env = parse_envelope(await request.read())
        assert env.body is not None
        query = parse_adhoc_query_request(env.body)
        cx = Cx.parse(query.single(QueryParam.PATIENT_ID) or "")
        bsn = cx.id if cx.authority_oid == BSN_OID else ""
        patient = next((p for p in NET.patients if p.bsn == bsn), None)
        entries: list[DocumentEntry] = []
        for study in partieel_studies(bsn) if patient is not None else []:
            assert patient is not None
            record = study_record(patient, study)
            where: dict[str, Any] = {
                "bsn": bsn, "hospital_ura": institution.ura, "hospital_name": institution.name,
                "repository_unique_id": PARTIEEL.repository_unique_id, "home": PARTIEEL.home_community_id,
                "codes": codes}
            entries.append(study_entry(record, **where))
            entries += [report_entry(r, record, **where)
                        for r in map(instance_record, study.instances) if is_report(r)]
        answer = build_adhoc_query_response(
            AdhocQueryResponse(ResponseStatus.PARTIAL_SUCCESS, tuple(entries), (PARTIAL_ERROR,)))
        reply = build_envelope(Addressing(action=Action.ITI38_RESPONSE, message_id=new_message_id(),
                                          relates_to=env.addressing.message_id), answer)
        return web.Response(body=serialize(reply), headers={
            "Content-Type": f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38_RESPONSE}"'})

    app = web.Application()
    install_behaviour(app, PARTIEEL.behaviour)  # slow or down on demand, like the other simulators
    app.router.add_post("/iti38", iti38)
    return app


# -------------------------------------------------------------------------------------------------
# The network
# -------------------------------------------------------------------------------------------------


@dataclass
class TimelineNetwork:
    gateway: Gateway
    mitz: Peer
    mitz_sim: MitzSimulator
    #: Per home community id: the peer DUO is configured to ask.
    communities: dict[str, Peer]
    pacs: dict[str, SimPacs]
    session: aiohttp.ClientSession
    pki: Pki
    #: (AE title, port) of the Orthanc behind hospital H3.
    orthanc: tuple[str, int]
    tmp: Path
    #: ITI-38 requests each community received, by home community id.
    requests: Counter[str] = field(default_factory=Counter)

    async def timeline(self, bsn: str, *, institutions: list[str] | None = None,
                       gateway: Gateway | None = None) -> tuple[int, dict[str, Any], float]:
        """POST /tlb/v1/timeline as a TLB client would; (HTTP status, JSON answer, seconds taken)."""
        gw = gateway or self.gateway
        body: dict[str, Any] = {"patient": {"bsn": bsn},
                                "period": {"from": PERIOD[0].isoformat(), "to": PERIOD[1].isoformat()},
                                "requester": REQUESTER}
        if institutions is not None:
            body["institutions"] = institutions
        started = time.perf_counter()
        async with self.session.post(f"{gw.http_url}{gw.config.timeline.path_prefix}/timeline",
                                     json=body) as r:
            answer = await r.json()
            return r.status, answer, time.perf_counter() - started

    @contextmanager
    def misbehaving(self, peer: Peer, behaviour: Misbehaviour) -> Iterator[None]:
        """Switch an HTTP simulator's behaviour for the block; always switched back, even on failure."""
        with misbehaving(peer.app, behaviour):
            yield

    def duo_config(self, storage: str, **timeline: Any) -> DuoConfig:
        """A DUO config for this network: same peers, own storage, ``timeline`` settings overridden."""
        raw = _raw_config(self.tmp / storage, self.mitz.url, self.communities, self.pacs, self.orthanc,
                          self.pki)
        raw["timeline"] = {**raw["timeline"], **timeline}
        return parse_config(raw, base_dir=self.tmp, source="timeline e2e", env={})


def _counting(requests: Counter[str], home: str) -> Middleware:
    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not request.path.startswith("/admin/"):
            requests[home] += 1
        return await handler(request)

    return count


def _raw_config(storage: Path, mitz_url: str, communities: dict[str, Peer], pacs: dict[str, SimPacs],
                orthanc: tuple[str, int], pki: Pki) -> dict[str, Any]:
    def hospital(h: SimHospital, ae_title: str, port: int) -> dict[str, Any]:
        return {"ura": h.ura, "name": h.name, "organisation_type": h.organisation_type, "ae_title": ae_title,
                "host": HOST, "port": port, "repository_unique_id": h.repository_unique_id, "timeout_s": 5.0}

    def community(c: SimCommunity, **extra: Any) -> dict[str, Any]:
        url = communities[c.home_community_id].url
        return {"home_community_id": c.home_community_id, "name": c.name, "iti38": f"{url}/iti38",
                "iti39": f"{url}/iti39", "rad75": f"{url}/rad75", "uras": [i.ura for i in c.institutions],
                # One quick retry: enough to see transient failures retried, cheap enough for a test.
                "timeout_s": 5.0, "retries": 1, "retry_backoff_s": 0.05, **extra}

    return {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO (timeline e2e)"},
        "listeners": {"http": {"host": HOST, "port": 0}, "dicom": {"ae_title": "DUO_GATEWAY", "host": HOST,
                                                                   "port": 0}},
        "tlb_hospitals": [hospital(H1, H1.ae_title, pacs[H1.ura].port),
                          hospital(H2, H2.ae_title, pacs[H2.ura].port),
                          hospital(H3, orthanc[0], orthanc[1])],
        "xca_communities": [community(NOORD), community(ZUID, timeout_s=ZUID_TIMEOUT_S, retries=0),
                            community(PARTIEEL), community(BUITEN, query_without_localization=True)],
        "mitz": {"closed_url": f"{mitz_url}/geslotenautorisatievraag/xacml3",
                 "open_url": f"{mitz_url}/openautorisatievraag",
                 "subscriptions_url": f"{mitz_url}/abonnementen/fhir/Subscription", "timeout_s": 3.0},
        # DUO signs its outbound XUA assertions with the server pair (never unsigned: see the client).
        "xua": {"signing_key_file": str(pki.server.key),
                "signing_cert_file": str(pki.server.cert)},
        "timeline": {"deadline_s": 8.0},
        "clients": plain_clients(),
        "storage": {"path": str(storage)},
        "logging": {"level": "WARNING"},
        "daemon": {"shutdown_grace_s": 2.0},
    }


@asynccontextmanager
async def running(tmp: Path, orthanc: tuple[str, int]) -> AsyncIterator[TimelineNetwork]:
    """Start everything on loopback; ``orthanc`` is the (AE title, port) of an already loaded Orthanc."""
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    peers: list[Peer] = []
    pacs: dict[str, SimPacs] = {}
    requests: Counter[str] = Counter()
    gateway: Gateway | None = None
    try:
        mitz_sim = MitzSimulator(NET, tlb_home_community_id=HOME)
        mitz = await serve_peer(mitz_sim.app())
        peers.append(mitz)
        for h in (H1, H2):
            p = SimPacs(h, tmp / "pacs" / h.ae_title, host=HOST)
            pacs[h.ura] = p
            await asyncio.to_thread(p.preload, hospital_studies(h))
            await asyncio.to_thread(p.start)
        communities: dict[str, Peer] = {}
        for c in (NOORD, ZUID, PARTIEEL, BUITEN):
            app = partial_success_app() if c is PARTIEEL else XcaCommunitySimulator(c, NET).app()
            app.middlewares.insert(0, _counting(requests, c.home_community_id))
            communities[c.home_community_id] = peer = await serve_peer(app)
            peers.append(peer)
        raw = _raw_config(tmp / "duo", mitz.url, communities, pacs, orthanc, pki)
        gateway = Gateway(parse_config(raw, base_dir=tmp, source="timeline e2e", env={}))
        await gateway.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
            yield TimelineNetwork(gateway, mitz, mitz_sim, communities, pacs, session, pki, orthanc, tmp,
                                  requests)
    finally:
        if gateway is not None:
            await gateway.stop()
        for peer in peers:
            await peer.runner.cleanup()
        for p in pacs.values():
            await asyncio.to_thread(p.stop)
