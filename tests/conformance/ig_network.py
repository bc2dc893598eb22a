"""A network for DUO's Initiating Gateway, driven the way the NIST XDS Toolkit drives one.

NIST puts the Initiating Gateway under test in front of two Responding Gateway simulators ("Community
1" and "Community 2") loaded with test data per patient id, sends it queries and retrieves, and checks
both what it sent each community (the simulator logs) and what it answered. Here:

- the communities are DUO's own community simulator (:mod:`duo_gateway.sim.xca`), holding per patient
  exactly the manifest-only studies a case needs (one KOS entry each), with a recording middleware in
  front that keeps every request and every ITI-38 answer (the simulator log), and optionally one
  patient for whom the community answers ITI-38 with a registry Failure (NIST 15814's Community 1);
- Mitz is the Mitz simulator, consent "all" for every patient, so both communities are localized and
  asked, as NIST's Initiating Gateway is configured to forward to both;
- DUO is a real :class:`~duo_gateway.daemon.Gateway` (or two: each a configuration of the same peers),
  driven through its TLB API (``POST /tlb/v1/timeline``, ``/transfers``), the only way in to DUO's
  Initiating Gateway;
- a transfer's destination is DCMTK ``storescp``.

What the communities hold is read from the simulators, never from DUO's answer.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import aiohttp
from aiohttp import web
from aiohttp.typedefs import Middleware
from lxml import etree

from duo_gateway.bsn import BSN_OID
from duo_gateway.config.loader import parse_config
from duo_gateway.daemon import Gateway
from duo_gateway.dicom.kos import parse_kos
from duo_gateway.sim.config import SimCommunity, SimNetworkConfig
from duo_gateway.sim.http import Handler
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.xca import SimDocument, XcaCommunitySimulator
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    Addressing,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.tlb.models import TimelineAnswer
from duo_gateway.xca.codes import Action, ErrorCode, QueryParam, ResponseStatus, StoredQuery
from duo_gateway.xca.errors import RegistryError
from duo_gateway.xca.hl7 import Cx
from duo_gateway.xca.metadata import KOS_FORMAT
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_response,
    parse_adhoc_query_request,
)
from duo_gateway.xca.retrieve import RetrieveDocumentSetRequest, parse_retrieve_request
from tests.support.clients import plain_clients
from tests.support.peers import Peer, serve_peer
from tests.support.storescp import StoreScp

HOST: Final = "127.0.0.1"
HOME: Final = "urn:oid:2.16.528.1.1007.99.1"
REQUESTER: Final = {"ura": "00010001", "organization_type": "V6", "uzi": "000095254", "role": "01.039",
                    "purpose": "TREAT"}
PERIOD: Final = ("2015-01-01", "2026-12-31")
DESTINATION: Final = "own-pacs"
#: ITI-38 answers bigger than this are recorded by their size only (a 34 MB answer need not be kept).
KEEP_ANSWER_BYTES: Final = 1024 * 1024


@dataclass
class Exchange:
    """One request a community received, and its ITI-38 answer as sent (None: streamed, or too big)."""

    path: str
    request: bytes
    answer: bytes | None = None
    answer_size: int = 0

    def body(self) -> etree._Element:
        env = parse_envelope(self.request)
        assert env.body is not None
        return env.body

    def query(self) -> AdhocQueryRequest:
        return parse_adhoc_query_request(self.body())

    def retrieve(self) -> RetrieveDocumentSetRequest:
        return parse_retrieve_request(self.body())

    def response(self) -> etree._Element:
        """The AdhocQueryResponse the community sent."""
        assert self.answer is not None, "answer not kept"
        env = parse_envelope(self.answer)
        assert env.body is not None
        return env.body


@dataclass
class Community:
    """One Responding Gateway: the simulator, where DUO reaches it, and its log."""

    sim: XcaCommunitySimulator
    peer: Peer
    log: list[Exchange] = field(default_factory=list)

    @property
    def home(self) -> str:
        return self.sim.home

    @property
    def source_id(self) -> str:
        return f"xca:{self.home}"

    def since(self, mark: int, path: str) -> list[Exchange]:
        return [e for e in self.log[mark:] if e.path == path]

    def kos_entries(self, bsn: str) -> list[SimDocument]:
        """The KOS documents the community holds of a patient, in its own order."""
        return [d for d in self.sim.documents if d.bsn == bsn
                and d.entry.format_code is not None and d.entry.format_code.matches(KOS_FORMAT)]


def manifest_instances(doc: SimDocument) -> set[str]:
    """The SOP Instance UIDs a KOS document references: what a transfer of its study must deliver."""
    kos = parse_kos(doc.data)
    return {uid for series in kos.series for uid in series.sop_instance_uids}


def recording(log: list[Exchange]) -> Middleware:
    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path.startswith("/admin/"):
            return await handler(request)
        exchange = Exchange(request.path, await request.read())
        log.append(exchange)
        response = await handler(request)
        if isinstance(response, web.Response) and isinstance(response.body, bytes):
            exchange.answer_size = len(response.body)
            if exchange.answer_size <= KEEP_ANSWER_BYTES:
                exchange.answer = response.body
        return response

    return record


def registry_error_for(bsn: str, home: str) -> Middleware:
    """The community answers every FindDocuments about ``bsn`` with Failure and an XDSRegistryError,
    as NIST's Community 1 does for 15814's patient."""

    @web.middleware
    async def fail(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/iti38":
            env = parse_envelope(await request.read())
            assert env.body is not None
            query = parse_adhoc_query_request(env.body)
            patient = query.single(QueryParam.PATIENT_ID)
            finding = query.query_id == StoredQuery.FIND_DOCUMENTS and patient is not None
            cx = Cx.parse(patient) if finding and patient is not None else None
            if cx is not None and (cx.id, cx.authority_oid) == (bsn, BSN_OID):
                answer = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.FAILURE, (), (
                    RegistryError(ErrorCode.REGISTRY_ERROR, "registry error for this patient (test data)",
                                  location=home),)))
                reply = build_envelope(Addressing(action=Action.ITI38_RESPONSE, message_id=new_message_id(),
                                                  relates_to=env.addressing.message_id), answer)
                content_type = f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38_RESPONSE}"'
                return web.Response(body=serialize(reply), headers={"Content-Type": content_type})
        return await handler(request)

    return fail


@dataclass
class IgNetwork:
    #: DUO configurations of the same peers, by name.
    gateways: dict[str, Gateway]
    communities: list[Community]
    mitz: Peer
    session: aiohttp.ClientSession
    destination: StoreScp | None

    def community(self, home: str) -> Community:
        return next(c for c in self.communities if c.home == home)

    def marks(self) -> dict[str, int]:
        """Where each community's log stands now: what a test sent is what comes after."""
        return {c.home: len(c.log) for c in self.communities}

    def api(self, gateway: str) -> str:
        gw = self.gateways[gateway]
        return f"{gw.http_url}{gw.config.timeline.path_prefix}"

    async def timeline(self, bsn: str, gateway: str) -> dict[str, Any]:
        """POST /tlb/v1/timeline as a TLB client does; the answer, checked against the API's model."""
        body = {"patient": {"bsn": bsn}, "requester": REQUESTER,
                "period": {"from": PERIOD[0], "to": PERIOD[1]}}
        async with self.session.post(f"{self.api(gateway)}/timeline", json=body) as r:
            assert r.status == 200, await r.text()
            answer: dict[str, Any] = await r.json()
        TimelineAnswer.model_validate(answer)  # the documented shape, every member present
        return answer

    async def transfer(self, study_ids: Sequence[str], gateway: str,
                       timeout_s: float = 60.0) -> dict[str, Any]:
        """POST /tlb/v1/transfers and wait until the job has ended; its final status."""
        body = {"studies": list(study_ids), "destination": DESTINATION, "requester": REQUESTER}
        async with self.session.post(f"{self.api(gateway)}/transfers", json=body) as r:
            assert r.status == 202, await r.text()
            job = (await r.json())["id"]
        deadline = time.monotonic() + timeout_s
        while True:
            async with self.session.get(f"{self.api(gateway)}/transfers/{job}") as r:
                assert r.status == 200, await r.text()
                status: dict[str, Any] = await r.json()
            if status["state"] not in ("queued", "running"):
                return status
            assert time.monotonic() < deadline, status
            await asyncio.sleep(0.1)


def duo_config(tmp: Path, name: str, mitz: Peer, communities: Sequence[Community], pki: Pki,
               destination: StoreScp | None, *,
               community_extra: Mapping[str, Mapping[str, Any]] | None = None,
               deadline_s: float = 10.0) -> dict[str, Any]:
    """DUO in front of these peers; ``community_extra`` overrides a community's settings, by home."""
    extra = community_extra or {}
    raw: dict[str, Any] = {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": f"DUO ({name})"},
        "listeners": {"http": {"host": HOST, "port": 0}, "dicom": {"ae_title": "DUO_GATEWAY", "host": HOST,
                                                                   "port": 0}},
        "tlb_hospitals": [],
        "xca_communities": [{
            "home_community_id": c.home, "name": c.sim.community.name, "iti38": f"{c.peer.url}/iti38",
            "iti39": f"{c.peer.url}/iti39", "rad75": f"{c.peer.url}/rad75",
            "uras": [i.ura for i in c.sim.community.institutions], "timeout_s": 10.0, "retries": 1,
            "retry_backoff_s": 0.05, **extra.get(c.home, {})} for c in communities],
        "mitz": {"closed_url": f"{mitz.url}/geslotenautorisatievraag/xacml3",
                 "open_url": f"{mitz.url}/openautorisatievraag",
                 "subscriptions_url": f"{mitz.url}/abonnementen/fhir/Subscription", "timeout_s": 3.0},
        "xua": {"signing_key_file": str(pki.server.key), "signing_cert_file": str(pki.server.cert)},
        "timeline": {"deadline_s": deadline_s},
        "clients": plain_clients(tlb_uras=[REQUESTER["ura"]]),
        "storage": {"path": str(tmp / name)},
        "logging": {"level": "WARNING"},
        "daemon": {"shutdown_grace_s": 2.0},
    }
    if destination is not None:
        raw["transfers"] = {
            "destinations": [{"name": DESTINATION, "ae_title": destination.ae_title, "host": destination.host,
                              "port": destination.port, "uras": [REQUESTER["ura"]], "timeout_s": 10.0}],
            "retries": 1, "retry_backoff_s": 0.1, "lease_s": 6.0}
    else:
        raw["transfers"] = {"enabled": False}
    return raw


@asynccontextmanager
async def running(tmp: Path, net: SimNetworkConfig, *,
                  gateways: Mapping[str, Mapping[str, Mapping[str, Any]]],
                  failing: Mapping[str, str] | None = None, destination: StoreScp | None = None,
                  deadline_s: float = 10.0) -> AsyncIterator[IgNetwork]:
    """Start the network: one community per ``net.communities``, and one DUO per entry of ``gateways``
    (name -> per-community overrides by home). ``failing``: home -> the BSN that community refuses."""
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    peers: list[Peer] = []
    started: dict[str, Gateway] = {}
    try:
        mitz = await serve_peer(MitzSimulator(net).app())
        peers.append(mitz)
        communities: list[Community] = []
        for sim_community in net.communities:
            community = await _serve_community(sim_community, net, (failing or {}).get(
                sim_community.home_community_id))
            peers.append(community.peer)
            communities.append(community)
        for name, overrides in gateways.items():
            raw = duo_config(tmp, name, mitz, communities, pki, destination, community_extra=overrides,
                             deadline_s=deadline_s)
            gateway = Gateway(parse_config(raw, base_dir=tmp, source=f"ig conformance ({name})", env={}))
            started[name] = gateway
            await gateway.start()
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
            yield IgNetwork(started, communities, mitz, session, destination)
    finally:
        for gateway in started.values():
            await gateway.stop()
        for peer in peers:
            await peer.runner.cleanup()


async def _serve_community(community: SimCommunity, net: SimNetworkConfig, failing: str | None) -> Community:
    sim = await asyncio.to_thread(XcaCommunitySimulator, community, net)
    app = sim.app()
    log: list[Exchange] = []
    app.middlewares.insert(0, recording(log))
    if failing is not None:
        app.middlewares.insert(1, registry_error_for(failing, sim.home))
    return Community(sim, await serve_peer(app), log)
