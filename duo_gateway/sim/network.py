"""The simulated national network in one process: Mitz, TLB hospital PACSes, XCA communities and DUO.

Used by ``duo-gateway demo``, by end-to-end tests and by integrators who want a network to point
their own systems at. Everything listens on loopback; ``base_port`` makes the ports predictable for
firewall-free demos, 0 picks free ports.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog
from aiohttp import web

from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.daemon import Gateway, free_port, stop_on_signals
from duo_gateway.sim.config import SimHospital, SimNetworkConfig, default_network, load_network
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import generate_studies
from duo_gateway.sim.xca import XcaCommunitySimulator

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
DUO_HOME_COMMUNITY_ID = "urn:oid:2.16.528.1.1007.99.1"
DUO_URA = "00099001"
DUO_AE_TITLE = "DUO_GATEWAY"
#: The demo XDS community's XUA issuer: DUO trusts assertions it signs (its CA is in xua.trusted_certs).
DEMO_XUA_ISSUER = "urn:oid:2.16.528.1.1007.99.777"
#: The home community of the demo XDS side that asks DUO (its XCA initiating gateway).
DEMO_XDS_HOME = "urn:oid:2.16.528.1.1007.99.700"
#: The TLB requester's own PACS: where the demo's transfers land (an empty SimPacs storage SCP).
REQUESTER_PACS = SimHospital(ura="00010001", name="Eigen PACS (aanvrager)", ae_title="REQUESTER_PACS",
                             repository_unique_id="2.16.528.1.1007.99.10001.9", studies_per_patient=0)
REQUESTER_PACS_NAME = "requester-pacs"


class _Ports:
    """Hands out consecutive ports from ``base`` or 0 (ephemeral) for every listener."""

    def __init__(self, base: int) -> None:
        self._next = base

    def take(self) -> int:
        if self._next == 0:
            return 0
        port = self._next
        self._next += 1
        return port


@dataclass
class _HttpPeer:
    name: str
    runner: web.AppRunner
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"


@dataclass
class SimulatedNetwork:
    net: SimNetworkConfig
    workdir: Path
    base_port: int = 0
    pacs: list[SimPacs] = field(default_factory=list)
    mitz: _HttpPeer | None = None
    mitz_sim: MitzSimulator | None = None
    communities: list[_HttpPeer] = field(default_factory=list)
    community_sims: list[XcaCommunitySimulator] = field(default_factory=list)
    gateway: Gateway | None = None
    pki: Pki | None = None
    requester_pacs: SimPacs | None = None

    async def start(self) -> None:
        # A throwaway RSA PKI: the demo XDS side signs XUA assertions with its client pair.
        self.pki = await asyncio.to_thread(make_pki, self.workdir / "pki", "rsa")
        ports = _Ports(self.base_port)
        # Port allocation order is fixed: DUO HTTP, DUO DICOM, Mitz, hospitals, communities.
        duo_http_port, duo_dicom_port = ports.take(), ports.take()
        # Mitz must know DUO's notify URL before DUO starts, so DUO's HTTP port is fixed up front.
        duo_http_port = duo_http_port or free_port(HOST)
        self.mitz_sim = MitzSimulator(self.net, tlb_home_community_id=DUO_HOME_COMMUNITY_ID)
        self.mitz = await _serve("mitz", self.mitz_sim.app(), ports.take())
        for hospital in self.net.hospitals:
            pacs = SimPacs(hospital, self.workdir / "pacs" / hospital.ae_title, host=HOST, port=ports.take())
            studies = [s for p in self.net.patients
                       for s in generate_studies(p, hospital, hospital.studies_per_patient, self.net.seed,
                                                 image_size=self.net.image_size)]
            await asyncio.to_thread(pacs.preload, studies)
            await asyncio.to_thread(pacs.start)
            self.pacs.append(pacs)
        for community in self.net.communities:
            sim = XcaCommunitySimulator(community, self.net)
            self.community_sims.append(sim)
            self.communities.append(await _serve(community.name, sim.app(), ports.take()))
        # Taken last, so the other listeners keep the ports they had before transfers existed.
        self.requester_pacs = SimPacs(REQUESTER_PACS, self.workdir / "pacs" / "REQUESTER", host=HOST,
                                      port=ports.take())
        await asyncio.to_thread(self.requester_pacs.start)
        self.gateway = Gateway(self._duo_config(duo_http_port, duo_dicom_port))
        await self.gateway.start()
        for pacs in self.pacs:
            pacs.add_move_destination(DUO_AE_TITLE, HOST, self.gateway.dicom_port)

    async def stop(self) -> None:
        if self.gateway is not None:
            await self.gateway.stop()
        for peer in [*self.communities, *([self.mitz] if self.mitz else [])]:
            await peer.runner.cleanup()
        for pacs in [*self.pacs, *([self.requester_pacs] if self.requester_pacs else [])]:
            await asyncio.to_thread(pacs.stop)

    def _duo_config(self, http_port: int, dicom_port: int) -> DuoConfig:
        assert self.mitz is not None and self.requester_pacs is not None
        raw: dict[str, Any] = {
            "gateway": {"home_community_id": DUO_HOME_COMMUNITY_ID, "ura": DUO_URA,
                        "name": "DUO gateway (simulated network)"},
            "listeners": {"http": {"host": HOST, "port": http_port},
                          "dicom": {"ae_title": DUO_AE_TITLE, "host": HOST, "port": dicom_port}},
            "tlb_hospitals": [
                {"ura": h.ura, "name": h.name, "organisation_type": h.organisation_type,
                 "ae_title": h.ae_title, "host": HOST, "port": p.port,
                 "repository_unique_id": h.repository_unique_id, "timeout_s": 5.0}
                for h, p in zip(self.net.hospitals, self.pacs, strict=True)],
            "xca_communities": [
                {"home_community_id": c.home_community_id, "name": c.name,
                 "iti38": f"{peer.url}/iti38", "iti39": f"{peer.url}/iti39", "rad75": f"{peer.url}/rad75",
                 "uras": [i.ura for i in c.institutions], "timeout_s": 5.0}
                for c, peer in zip(self.net.communities, self.communities, strict=True)],
            "mitz": {"closed_url": f"{self.mitz.url}/geslotenautorisatievraag/xacml3",
                     "open_url": f"{self.mitz.url}/openautorisatievraag",
                     "subscriptions_url": f"{self.mitz.url}/abonnementen/fhir/Subscription",
                     "notify_url": f"http://{HOST}:{http_port}/mitz/notify",
                     # The demo shows a notification evicting a cached decision, so it caches;
                     # production's default is no cache at all.
                     "cache_ttl_s": 30.0,
                     # Subscribe every demo patient at start (generated studies span five years).
                     "subscription_sync_interval_s": 3600.0, "subscription_lookback_days": 36500},
            # DUO trusts the demo XDS issuer (the client pair) and signs its own outbound assertions
            # with the server pair.
            "xua": {"trusted_certs": [str(self.pki.ca_cert)], "signing_key_file": str(self.pki.server.key),
                    "signing_cert_file": str(self.pki.server.cert)} if self.pki else {},
            "transfers": {"destinations": [{
                "name": REQUESTER_PACS_NAME, "ae_title": REQUESTER_PACS.ae_title, "host": HOST,
                "port": self.requester_pacs.port, "patient_id_issuer": "EIGEN_ZIEKENHUIS"}],
                "retry_backoff_s": 0.2},
            "clients": self._clients(),
            "storage": {"path": str(self.workdir / "duo")},
            "logging": {"level": "WARNING"},
            "daemon": {"shutdown_grace_s": 5.0},
        }
        return parse_config(raw, base_dir=self.workdir, source="simulated network", env={})

    def _clients(self) -> dict[str, Any]:
        assert self.pki is not None
        return {"tlb": [{"name": "demo-timeline", "certificate": {"absent": True},
                         "uras": [REQUESTER_PACS.ura]}],
                "xca": [{"name": "demo-xds", "certificate": {"absent": True},
                         "home_community_id": DEMO_XDS_HOME, "issuer": DEMO_XUA_ISSUER,
                         "signing_certs": [str(self.pki.client.cert)]}],
                "mitz": [{"name": "mitz", "certificate": {"absent": True}}]}

    def endpoints(self) -> dict[str, Any]:
        """The ``--ports-file`` contract (see the README); keys are stable, more may be added."""
        assert self.gateway is not None and self.mitz is not None
        gw = self.gateway
        base = gw.http_url
        xca = gw.config.xca_responding
        xua: dict[str, str] = {}
        if self.pki is not None:
            xua = {"issuer": DEMO_XUA_ISSUER, "audience": gw.config.gateway.home_community_id,
                   "cert": str(self.pki.client.cert), "key": str(self.pki.client.key),
                   "ca": str(self.pki.ca_cert)}
        return {
            "xua": xua,
            "duo": {"http": base, "metrics": f"{base}/metrics", "healthz": f"{base}/healthz",
                    "readyz": f"{base}/readyz", "iti38": base + xca.iti38_path,
                    "iti39": base + xca.iti39_path, "rad75": base + xca.rad75_path,
                    "tlb_api": base + gw.config.timeline.path_prefix,
                    "home_community_id": gw.config.gateway.home_community_id,
                    "dicom": {"ae_title": gw.config.listeners.dicom.ae_title, "host": HOST,
                              "port": gw.dicom_port}},
            "mitz": {"closed": f"{self.mitz.url}/geslotenautorisatievraag/xacml3",
                     "open": f"{self.mitz.url}/openautorisatievraag",
                     "subscriptions": f"{self.mitz.url}/abonnementen/fhir/Subscription",
                     "admin": f"{self.mitz.url}/admin/"},
            "tlb_hospitals": [
                {"ura": h.ura, "name": h.name, "ae_title": h.ae_title, "host": HOST, "port": p.port}
                for h, p in zip(self.net.hospitals, self.pacs, strict=True)],
            "xca_communities": [
                {"home_community_id": c.home_community_id, "name": c.name, "iti38": f"{peer.url}/iti38",
                 "iti39": f"{peer.url}/iti39", "rad75": f"{peer.url}/rad75", "admin": f"{peer.url}/admin/"}
                for c, peer in zip(self.net.communities, self.communities, strict=True)],
            "patients": [{"bsn": p.bsn, "name": p.name, "consent": p.consent} for p in self.net.patients],
            "requester_pacs": {"name": REQUESTER_PACS_NAME, "ae_title": REQUESTER_PACS.ae_title, "host": HOST,
                               "port": self.requester_pacs.port if self.requester_pacs else 0},
        }

    def iter_pacs(self) -> Iterator[tuple[Any, SimPacs]]:
        return zip(self.net.hospitals, self.pacs, strict=True)


async def _serve(name: str, app: web.Application, port: int) -> _HttpPeer:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, HOST, port)
    await site.start()
    actual = int(runner.addresses[0][1])
    log.info("simulator listening", peer=name, port=actual)
    return _HttpPeer(name, runner, actual)


def write_ports_file(path: Path, endpoints: dict[str, Any]) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(endpoints, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)  # readers polling for the file never see half of it


async def run_demo(*, once: bool, ports_file: Path | None, base_port: int, sim_config: Path | None,
                   workdir: Path | None, log_level: str) -> int:
    from duo_gateway.config.runtime import LoggingConfig
    from duo_gateway.observability.logging import configure_logging
    from duo_gateway.sim.scenario import run_scenario

    configure_logging(LoggingConfig.model_validate({"level": log_level}))
    net = load_network(sim_config) if sim_config else default_network()
    own_workdir = workdir is None
    root = Path(tempfile.mkdtemp(prefix="duo-demo-")) if workdir is None else workdir
    root.mkdir(parents=True, exist_ok=True)
    network = SimulatedNetwork(net, root, base_port)
    stop = stop_on_signals()
    try:
        await network.start()
        if ports_file is not None:
            write_ports_file(ports_file, network.endpoints())
        if once:
            report = await run_scenario(network)
            print(report.render())
            return 0 if report.ok else 1
        print(json.dumps(network.endpoints(), indent=2))
        print("simulated network running; Ctrl-C to stop", flush=True)
        await stop.wait()
        return 0
    finally:
        await network.stop()
        if own_workdir:
            shutil.rmtree(root, ignore_errors=True)
