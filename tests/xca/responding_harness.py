"""A DUO with two simulated TLB hospitals and the Mitz simulator, and an XDS-side caller with XUA."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web
from cryptography import x509
from lxml import etree

from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.daemon import Gateway
from duo_gateway.sim.config import SimHospital, SimNetworkConfig, default_network
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_ANONYMOUS,
    Addressing,
    Envelope,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.soap.mtom import build_mtom, parse_mtom
from duo_gateway.xca.codes import Action
from duo_gateway.xmldsig import PrivateKey, load_signing_pair
from duo_gateway.xua import Claims, issue_assertion, security_header
from tests.support.clients import plain_clients, plain_xca_peer

HOME = "urn:oid:2.16.528.1.1007.99.1"
CLAIMS = Claims(uzi="000095254", role="01.039", ura="00000666", organisation_type="V6", purpose="TREAT")


#: The XUA issuer of the test XCA peer, and that peer's home community.
XUA_ISSUER = "urn:oid:2.16.528.1.1007.99.777"
PEER_HOME = "urn:oid:2.16.528.1.1007.99.700"

@dataclass
class Reply:
    status: int
    envelope: Envelope | None
    parts: dict[str, bytes]
    raw: bytes
    content_type: str


@dataclass
class Network:
    net: SimNetworkConfig
    gateway: Gateway
    pacs: list[SimPacs]
    studies: dict[str, list[GeneratedStudy]]  # hospital URA -> studies
    mitz: MitzSimulator
    pki: Pki
    key: PrivateKey
    cert: list[x509.Certificate]
    session: aiohttp.ClientSession

    @property
    def url(self) -> str:
        return self.gateway.http_url

    def assertion(
        self,
        claims: Claims = CLAIMS,
        *,
        audience: str = HOME,
        lifetime_s: float = 600,
        now: datetime | None = None,
        issuer: str = XUA_ISSUER,
        signer: tuple[PrivateKey, list[x509.Certificate]] | None = None,
        subject_bsn: str | None = None,
    ) -> etree._Element:
        key, cert = signer if signer is not None else (self.key, self.cert)
        return issue_assertion(
            claims,
            issuer=issuer,
            audience=audience,
            key=key,
            cert=cert,
            now=now or datetime.now(UTC),
            lifetime_s=lifetime_s,
            subject_bsn=subject_bsn,
        )

    async def call(
        self,
        path: str,
        action: str,
        body: etree._Element,
        *,
        assertion: etree._Element | None = None,
        with_xua: bool = True,
        mtom: bool = False,
        message_id: str | None = None,
        tls: ssl.SSLContext | None = None,
    ) -> Reply:
        """One request; ``message_id`` repeats a MessageID (replays), ``tls`` presents a client identity."""
        data, content_type = self.message(path, action, body, assertion=assertion, with_xua=with_xua,
                                          mtom=mtom, message_id=message_id)
        return await self.post(path, data, content_type, tls=tls)

    def message(
        self,
        path: str,
        action: str,
        body: etree._Element,
        *,
        assertion: etree._Element | None = None,
        with_xua: bool = True,
        mtom: bool = False,
        message_id: str | None = None,
    ) -> tuple[bytes, str]:
        """The request :meth:`call` sends, as (body, Content-Type): for a test that reads the answer
        itself, as it streams."""
        headers_el = []
        if with_xua:
            headers_el.append(
                security_header(assertion if assertion is not None else self.assertion(), datetime.now(UTC))
            )
        env = build_envelope(
            Addressing(
                action=action, message_id=message_id or new_message_id(), to=self.url + path,
                reply_to=WSA_ANONYMOUS,
            ),
            body,
            headers_el,
        )
        if mtom:
            content_type, mbody = build_mtom(env, [], action)
            return bytes(mbody), content_type
        return serialize(env), f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"'

    async def post(self, path: str, data: bytes, content_type: str, *,
                   tls: ssl.SSLContext | None = None) -> Reply:
        async with self.session.post(self.url + path, data=data, headers={"Content-Type": content_type},
                                     ssl=tls if tls is not None else True) as r:
            raw = await r.read()
            ct = r.headers.get("Content-Type", "")
            status = r.status
        try:
            root, parts = parse_mtom(ct, raw, 1 << 30)
            env: Envelope | None = parse_envelope(root)
        except Exception:
            env, parts = None, {}
        return Reply(status, env, parts, raw, ct)


@dataclass(frozen=True)
class PacsEndpoint:
    """Where DUO finds one TLB hospital's PACS: a SimPacs or any other DICOM peer (Orthanc)."""

    hospital: SimHospital
    ae_title: str
    port: int
    host: str = "127.0.0.1"


def duo_config(
    tmp: Path, endpoints: list[PacsEndpoint], mitz_url: str, trusted: Path, **overrides: Any
) -> DuoConfig:
    signing_cert = trusted.parent / "client.crt"
    raw: dict[str, Any] = {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO"},
        "listeners": {"http": {"host": "127.0.0.1", "port": 0}, "dicom": {"host": "127.0.0.1", "port": 0}},
        "tlb_hospitals": [
            {
                "ura": e.hospital.ura,
                "name": e.hospital.name,
                "ae_title": e.ae_title,
                "host": e.host,
                "port": e.port,
                "repository_unique_id": e.hospital.repository_unique_id,
                "timeout_s": 3.0,
            }
            for e in endpoints
        ],
        "mitz": {
            "closed_url": f"{mitz_url}/geslotenautorisatievraag/xacml3",
            "open_url": f"{mitz_url}/openautorisatievraag",
            "subscriptions_url": f"{mitz_url}/abonnementen/fhir/Subscription",
        },
        "xca_responding": {"hospital_deadline_s": 4.0},
        "clients": plain_clients(xca=plain_xca_peer(home_community_id=PEER_HOME, issuer=XUA_ISSUER,
                                                    signing_certs=[signing_cert])),
        "storage": {"path": str(tmp / "duo")},
    }
    for key, value in overrides.items():
        raw[key] = {**raw.get(key, {}), **value}
    return parse_config(raw, base_dir=tmp, source="test", env={})


@asynccontextmanager
async def _network(
    tmp: Path,
    net: SimNetworkConfig,
    endpoints: list[PacsEndpoint],
    pacs: list[SimPacs],
    studies: dict[str, list[GeneratedStudy]],
    pki: Pki | None = None,
    **overrides: Any,
) -> AsyncIterator[Network]:
    """DUO, the Mitz simulator and a XUA issuer around PACSes that are already running.

    ``pki``: one the caller made (to put its certificates into ``overrides``); its ``client`` pair is
    the XUA signer, as in the harness's own.
    """
    mitz = MitzSimulator(net, tlb_home_community_id=HOME)
    runner = web.AppRunner(mitz.app())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    mitz_url = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        pki = pki or make_pki(tmp / "pki", key_type="rsa")
        key, cert = load_signing_pair(pki.client.key, pki.client.cert)
        gateway = Gateway(duo_config(tmp, endpoints, mitz_url, pki.ca_cert, **overrides))
        await gateway.start()
        try:
            async with aiohttp.ClientSession() as session:
                yield Network(net, gateway, pacs, studies, mitz, pki, key, cert, session)
        finally:
            await gateway.stop()
    finally:
        await runner.cleanup()


@asynccontextmanager
async def running_network(
    tmp: Path, *, studies_per_patient: int = 2, pki: Pki | None = None,
    pacs_class: type[SimPacs] = SimPacs, compressed: bool = False, **overrides: Any
) -> AsyncIterator[Network]:
    """Two SimPacs hospitals, each holding ``studies_per_patient`` generated studies of every patient.

    ``pacs_class``: a SimPacs subclass, for a test that must watch what DUO asks of a PACS.
    ``compressed``: the hospitals store the studies the default network names compressed as such.
    """
    net = default_network()
    pacs: list[SimPacs] = []
    studies: dict[str, list[GeneratedStudy]] = {}
    try:
        for h in net.hospitals:
            p = pacs_class(h, tmp / "pacs" / h.ae_title)
            pacs.append(p)
            generated = [
                s for pt in net.patients
                for s in generate_studies(pt, h, studies_per_patient, net.seed,
                                          encodings=h.encodings(pt.bsn) if compressed else None)
            ]
            await asyncio.to_thread(p.preload, generated)
            await asyncio.to_thread(p.start)
            studies[h.ura] = generated
        endpoints = [PacsEndpoint(h, h.ae_title, p.port) for h, p in zip(net.hospitals, pacs, strict=True)]
        async with _network(tmp, net, endpoints, pacs, studies, pki, **overrides) as network:
            yield network
    finally:
        for p in pacs:
            await asyncio.to_thread(p.stop)


@asynccontextmanager
async def running_external_pacs_network(
    tmp: Path, endpoint: PacsEndpoint, studies: list[GeneratedStudy], **overrides: Any
) -> AsyncIterator[Network]:
    """One TLB hospital whose PACS is someone else's (Orthanc), already loaded with ``studies``."""
    net = default_network()
    async with _network(tmp, net, [endpoint], [], {endpoint.hospital.ura: studies}, **overrides) as network:
        yield network


__all__ = [
    "CLAIMS", "HOME", "Action", "Network", "PacsEndpoint", "Reply", "running_external_pacs_network",
    "running_network",
]
