"""The simulated national network in one process: Mitz, TLB hospital PACSes, XCA communities and DUO.

Used by ``duo-gateway demo`` (:mod:`duo_gateway.sim.demo`), by end-to-end tests and by integrators
who want a network to point their own systems at. Everything listens on loopback; ``base_port`` makes
the ports predictable for firewall-free demos, 0 picks free ports.

DUO runs in the shape of a real deployment: its HTTP listener is TLS with ``client_auth =
"required"``, and a throwaway demo PKI gives every system that calls it its own identity: two TLB
clients (timeline apps of two organisations), two XCA peers (each with a TLS client certificate and
an XUA signing pair under its own issuer) and Mitz (for notifications). Health and metrics are on a
plain-HTTP ops listener. The generated DUO config is written to the workdir as ``duo.toml``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import structlog
from aiohttp import web

from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.daemon import Gateway, free_port
from duo_gateway.sim.config import SimHospital, SimNetworkConfig
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.pki import CertPair, Pki, issue, make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.sim.toml import dumps as toml_dumps
from duo_gateway.sim.xca import XcaCommunitySimulator

log = structlog.get_logger(__name__)

HOST = "127.0.0.1"
DUO_HOME_COMMUNITY_ID = "urn:oid:2.16.528.1.1007.99.1"
DUO_URA = "00099001"
DUO_AE_TITLE = "DUO_GATEWAY"
#: The professional in whose name the demo asks: a radiologist of DUO's own organisation (the benches
#: ask in the same name).
DEMO_UZI = "000095254"
DEMO_ROLE = "01.039"
#: The first demo XCA peer's XUA issuer: DUO believes its assertions only when signed by its pinned
#: signing certificate ([clients.xca] signing_certs) and presented over its own TLS identity.
DEMO_XUA_ISSUER = "urn:oid:2.16.528.1.1007.99.777"
#: The home community of the demo XDS side that asks DUO (its XCA initiating gateway).
DEMO_XDS_HOME = "urn:oid:2.16.528.1.1007.99.700"
#: The TLB requester's own PACS: where the demo's transfers land (an empty SimPacs storage SCP).
REQUESTER_PACS = SimHospital(ura="00010001", name="Eigen PACS (aanvrager)", ae_title="REQUESTER_PACS",
                             repository_unique_id="2.16.528.1.1007.99.10001.9", studies_per_patient=0)
REQUESTER_PACS_NAME = "requester-pacs"
#: The second XCA peer: another community's initiating gateway, with an issuer of its own.
DEMO_XDS2_HOME = "urn:oid:2.16.528.1.1007.99.701"
DEMO_XUA_ISSUER2 = "urn:oid:2.16.528.1.1007.99.778"
#: The second TLB client's organisation: it may ask timelines, not send to the requester's PACS.
SECOND_TLB_URA = "00010002"


@dataclass(frozen=True)
class DemoTlbClient:
    name: str
    uras: tuple[str, ...]
    tls: CertPair

    def ssl_context(self, ca: Path) -> ssl.SSLContext:
        return client_ssl(ca, self.tls)


@dataclass(frozen=True)
class DemoXcaPeer:
    name: str
    home_community_id: str
    issuer: str
    tls: CertPair
    signing: CertPair

    def ssl_context(self, ca: Path) -> ssl.SSLContext:
        return client_ssl(ca, self.tls)


def client_ssl(ca: Path, pair: CertPair) -> ssl.SSLContext:
    """A TLS context that verifies DUO's server certificate and presents ``pair``."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


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


@dataclass(frozen=True)
class CompressedStudy:
    """A study a simulated source holds compressed: ``kind`` tlb (``source`` the hospital's URA) or xca
    (``source`` the community's home community id)."""

    kind: Literal["tlb", "xca"]
    source: str
    study_instance_uid: str
    transfer_syntax: str


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
    tlb_clients: list[DemoTlbClient] = field(default_factory=list)
    xca_peers: list[DemoXcaPeer] = field(default_factory=list)
    mitz_tls: CertPair | None = None
    duo_signing: CertPair | None = None
    ops_port: int = 0
    #: The studies held in another syntax than Explicit VR Little Endian (the ports file lists them).
    compressed_studies: list[CompressedStudy] = field(default_factory=list)

    async def start(self) -> None:
        # A throwaway RSA PKI (XML-DSig peers are RSA-only): DUO's server certificate and one identity
        # per system that calls DUO.
        self.pki = await asyncio.to_thread(self._make_identities)
        ports = _Ports(self.base_port)
        # Port allocation order is fixed: DUO HTTP, DUO DICOM, Mitz, hospitals, communities.
        duo_http_port, duo_dicom_port = ports.take(), ports.take()
        # Mitz must know DUO's notify URL before DUO starts, so DUO's HTTP port is fixed up front.
        duo_http_port = duo_http_port or free_port(HOST)
        assert self.mitz_tls is not None
        self.mitz_sim = MitzSimulator(self.net, tlb_home_community_id=DUO_HOME_COMMUNITY_ID,
                                      notify_ssl=client_ssl(self.pki.ca_cert, self.mitz_tls))
        self.mitz = await _serve("mitz", self.mitz_sim.app(), ports.take())
        for hospital in self.net.hospitals:
            pacs = SimPacs(hospital, self.workdir / "pacs" / hospital.ae_title, host=HOST, port=ports.take())
            studies = await asyncio.to_thread(self._hospital_studies, hospital)
            await asyncio.to_thread(pacs.preload, studies)
            await asyncio.to_thread(pacs.start)
            self.pacs.append(pacs)
        for community in self.net.communities:
            sim = await asyncio.to_thread(XcaCommunitySimulator, community, self.net)
            self.community_sims.append(sim)
            self.compressed_studies.extend(CompressedStudy("xca", community.home_community_id, uid, syntax)
                                           for uid, syntax in sim.compressed)
            self.communities.append(await _serve(community.name, sim.app(), ports.take()))
        # Taken last, so the other listeners keep the ports they had before transfers existed.
        self.requester_pacs = SimPacs(REQUESTER_PACS, self.workdir / "pacs" / "REQUESTER", host=HOST,
                                      port=ports.take())
        await asyncio.to_thread(self.requester_pacs.start)
        self.ops_port = ports.take() or free_port(HOST)
        config = self._duo_config(duo_http_port, duo_dicom_port)
        # What DUO runs with, for an integrator to read and reuse (the paths point into the workdir).
        (self.workdir / "duo.toml").write_text(toml_dumps(self._raw), encoding="utf-8")
        self.gateway = Gateway(config)
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

    def _hospital_studies(self, hospital: SimHospital) -> list[GeneratedStudy]:
        """Every patient's studies at ``hospital``, as its PACS stores them; notes the compressed ones."""
        studies: list[GeneratedStudy] = []
        for patient in self.net.patients:
            encodings = hospital.encodings(patient.bsn)
            own = generate_studies(patient, hospital, hospital.studies_per_patient, self.net.seed,
                                   image_size=self.net.image_size, encodings=encodings)
            self.compressed_studies.extend(CompressedStudy("tlb", hospital.ura, own[i].study_instance_uid, ts)
                                           for i, ts in sorted(encodings.items()))
            studies.extend(own)
        return studies

    def _make_identities(self) -> Pki:
        pki = make_pki(self.workdir / "pki", "rsa")
        self.tlb_clients = [
            DemoTlbClient("timeline-eigen", (REQUESTER_PACS.ura,),
                          issue(pki, "timeline-eigen", uras=(REQUESTER_PACS.ura,))),
            DemoTlbClient("timeline-oost", (SECOND_TLB_URA,),
                          issue(pki, "timeline-oost", uras=(SECOND_TLB_URA,)))]
        self.xca_peers = [
            DemoXcaPeer(name, home, issuer, issue(pki, name), issue(pki, f"{name}-xua", signing=True))
            for name, home, issuer in (("xds-noord", DEMO_XDS_HOME, DEMO_XUA_ISSUER),
                                       ("xds-zuid", DEMO_XDS2_HOME, DEMO_XUA_ISSUER2))]
        self.mitz_tls = issue(pki, "mitz")
        self.duo_signing = issue(pki, "duo-xua", signing=True)
        return pki

    def _duo_config(self, http_port: int, dicom_port: int) -> DuoConfig:
        assert self.mitz is not None and self.requester_pacs is not None and self.pki is not None
        assert self.duo_signing is not None
        raw: dict[str, Any] = {
            "gateway": {"home_community_id": DUO_HOME_COMMUNITY_ID, "ura": DUO_URA,
                        "name": "DUO gateway (simulated network)"},
            "listeners": {"http": {"host": HOST, "port": http_port,
                                   "tls": {"cert_file": str(self.pki.server.cert),
                                           "key_file": str(self.pki.server.key),
                                           "ca_file": str(self.pki.ca_cert), "client_auth": "required"}},
                          "ops": {"host": HOST, "port": self.ops_port},
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
                     "notify_url": f"https://{HOST}:{http_port}/mitz/notify",
                     # The demo shows a notification evicting a cached decision, so it caches;
                     # production's default is no cache at all.
                     "cache_ttl_s": 30.0,
                     # Subscribe every demo patient at start (generated studies span five years).
                     "subscription_sync_interval_s": 3600.0, "subscription_lookback_days": 36500},
            # DUO signs its own outbound assertions with a signing pair of its own; whose inbound
            # assertions it believes is per XCA peer in [clients] (each peer's pinned signing cert).
            "xua": {"signing_key_file": str(self.duo_signing.key),
                    "signing_cert_file": str(self.duo_signing.cert)},
            "transfers": {"destinations": [{
                "name": REQUESTER_PACS_NAME, "ae_title": REQUESTER_PACS.ae_title, "host": HOST,
                "uras": [REQUESTER_PACS.ura],
                "port": self.requester_pacs.port, "patient_id_issuer": "EIGEN_ZIEKENHUIS"}],
                "retry_backoff_s": 0.2},
            "clients": self._clients(),
            "storage": {"path": str(self.workdir / "duo")},
            "logging": {"level": "WARNING"},
            "daemon": {"shutdown_grace_s": 5.0},
        }
        self._raw = raw
        return parse_config(raw, base_dir=self.workdir, source="simulated network", env={})

    @property
    def audit_file(self) -> Path:
        """The ATNA file sink: audit.file's default under storage.path."""
        return self.workdir / "duo" / "audit" / "audit.log"

    def _clients(self) -> dict[str, Any]:
        """Every caller by its certificate: TLB clients with their URAs (only the first may send to the
        requester's PACS), XCA peers with their issuer and pinned signing certificate, and Mitz."""
        assert self.mitz_tls is not None
        return {"tlb": [{"name": c.name, "certificate": {"cert_file": str(c.tls.cert)}, "uras": list(c.uras),
                         "destinations": [REQUESTER_PACS_NAME] if i == 0 else []}
                        for i, c in enumerate(self.tlb_clients)],
                "xca": [{"name": p.name, "certificate": {"cert_file": str(p.tls.cert)},
                         "home_community_id": p.home_community_id, "issuer": p.issuer,
                         "signing_certs": [str(p.signing.cert)]} for p in self.xca_peers],
                "mitz": [{"name": "mitz", "certificate": {"cert_file": str(self.mitz_tls.cert)}}]}

    def endpoints(self) -> dict[str, Any]:
        """The ``--ports-file`` contract (see the README); keys are stable, more may be added."""
        assert self.gateway is not None and self.mitz is not None
        gw = self.gateway
        base = gw.http_url
        xca = gw.config.xca_responding
        assert self.pki is not None
        first = self.xca_peers[0]
        ops = gw.ops_url or base
        return {
            # The first XCA peer's issuer and signing pair, as before the demo had several.
            "xua": {"issuer": first.issuer, "audience": gw.config.gateway.home_community_id,
                    "cert": str(first.signing.cert), "key": str(first.signing.key),
                    "ca": str(self.pki.ca_cert)},
            "tls": {"ca": str(self.pki.ca_cert)},
            "clients": {
                "tlb": [{"name": c.name, "uras": list(c.uras), "cert": str(c.tls.cert), "key": str(c.tls.key)}
                        for c in self.tlb_clients],
                "xca": [{"name": p.name, "home_community_id": p.home_community_id, "issuer": p.issuer,
                         "cert": str(p.tls.cert), "key": str(p.tls.key), "signing_cert": str(p.signing.cert),
                         "signing_key": str(p.signing.key)} for p in self.xca_peers]},
            "audit": {"file": str(self.audit_file)},
            "config": str(self.workdir / "duo.toml"),
            "duo": {"http": base, "metrics": f"{ops}/metrics", "healthz": f"{ops}/healthz",
                    "readyz": f"{ops}/readyz", "iti38": base + xca.iti38_path,
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
            "compressed_studies": [dataclasses.asdict(c) for c in self.compressed_studies],
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
