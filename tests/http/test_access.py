"""Every door knows who is calling: certificates become callers, routes have owners, requesters are bound.

Identification and the config rules are tested without sockets; the attacks of issue 11 against the TLB
API are tested over real TLS with client certificates from the test PKI.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import ssl
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from lxml import etree
from pydantic import ValidationError

from duo_gateway.access import (
    AccessConfigError,
    ClientDirectory,
    PeerCertificate,
    access_problems,
    certificate_uras,
)
from duo_gateway.config.access import CertificateMatch, ClientsConfig
from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.config.transfer import DestinationPacs, TransferConfig
from duo_gateway.daemon import Gateway
from duo_gateway.http.access import route_name
from duo_gateway.http.server import build_app
from duo_gateway.observability.logging import configure_logging
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.pki import CertPair, Pki, issue, make_pki, uzi_server_name
from duo_gateway.timeline.model import StudyRef
from duo_gateway.xmldsig import load_signing_pair
from duo_gateway.xua import Claims, issue_assertion
from tests.support.clients import plain_directory
from tests.support.gateway import make_config

BSN = "999911120"
URA_A, URA_B = "00010001", "00020002"
HOSPITAL = {"ura": "00030003", "name": "H3", "ae_title": "H3_PACS", "host": "127.0.0.1", "port": 9,
            "repository_unique_id": "1.2.3.4"}


def _requester(ura: str) -> dict[str, str]:
    return {"ura": ura, "organization_type": "V6", "uzi": "000095254", "role": "01.039", "purpose": "TREAT"}


def _cert(pair: CertPair) -> PeerCertificate:
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    return PeerCertificate.from_der(cert.public_bytes(serialization.Encoding.DER))


# --------------------------------------------------------------------------------------------------
# identification, without sockets
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("access-pki"), "rsa")


def test_the_ura_of_a_uzi_server_certificate_is_read_from_its_subject_alt_name(rsa_pki: Pki) -> None:
    pair = issue(rsa_pki, "uzi-two-uras", uras=(URA_A, URA_B))
    cert = x509.load_pem_x509_certificate(pair.cert.read_bytes())
    assert certificate_uras(cert) == (URA_A, URA_B)
    assert _cert(pair).uras == (URA_A, URA_B)
    # A personal card (type Z) in the same place binds no organisation.
    personal = uzi_server_name(URA_A)
    z_card = x509.OtherName(personal.type_id, personal.value.replace(b"-S-", b"-Z-"))
    ca = x509.load_pem_x509_certificate(rsa_pki.ca_cert.read_bytes())
    assert rsa_pki.ca_key is not None
    ca_key = serialization.load_pem_private_key(rsa_pki.ca_key.read_bytes(), password=None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    now = datetime.now(UTC)
    z_cert = (x509.CertificateBuilder().subject_name(ca.subject).issuer_name(ca.subject)
              .public_key(ca_key.public_key()).serial_number(1).not_valid_before(now)
              .not_valid_after(now + timedelta(hours=1))
              .add_extension(x509.SubjectAlternativeName([z_card]), critical=False)
              .sign(ca_key, hashes.SHA256()))
    assert certificate_uras(z_cert) == ()
    plain = issue(rsa_pki, "no-uzi")
    assert certificate_uras(x509.load_pem_x509_certificate(plain.cert.read_bytes())) == ()


def test_a_certificate_match_takes_exactly_one_robust_way() -> None:
    for bad in ({}, {"subject": "CN=x"}, {"ura": URA_A}, {"issuer": "CN=ca"},
                {"sha256": "ab" * 32, "absent": True}, {"sha256": "xyz"}):
        with pytest.raises(ValidationError):
            CertificateMatch.model_validate(bad)
    assert CertificateMatch.model_validate({"sha256": ":".join(["AB"] * 32)}).sha256 == "ab" * 32
    CertificateMatch.model_validate({"issuer": "CN=ca", "ura": URA_A})


def test_callers_are_identified_per_route_owner(rsa_pki: Pki) -> None:
    a, b, stranger = (issue(rsa_pki, n, uras=(u,)) for n, u in (("a", URA_A), ("b", URA_B), ("s", URA_A)))
    ca_subject = x509.load_pem_x509_certificate(rsa_pki.ca_cert.read_bytes()).subject.rfc4514_string()
    directory = ClientDirectory.build(ClientsConfig.model_validate({
        "tlb": [{"name": "by-file", "certificate": {"cert_file": str(a.cert)}, "uras": [URA_A]},
                {"name": "by-ura", "certificate": {"issuer": ca_subject, "subject": "CN=b", "ura": URA_B},
                 "uras": [URA_B]}],
        "xca": [{"name": "peer", "certificate": {"cert_file": str(a.cert)},
                 "home_community_id": "urn:oid:1.2.3", "issuer": "urn:oid:1.2.3",
                 "signing_certs": [str(a.cert)]}]}))
    assert directory.identify(_cert(a), "tlb").name == "tlb:by-file"
    # The same certificate may be a client of two kinds: which one depends on the route.
    assert directory.identify(_cert(a), "xca").name == "xca:peer"
    assert directory.identify(_cert(b), "tlb").name == "tlb:by-ura"
    # Same CA, same URA in the SAN, but another subject: not that client.
    unknown = directory.identify(_cert(stranger), "tlb")
    assert unknown.client is None and unknown.name.startswith("unknown:")
    assert directory.identify(None, "tlb").name == "anonymous"
    assert directory.identify(_cert(b), "mitz").client is None


def test_entries_that_can_never_match_are_refused(tmp_path: Path, rsa_pki: Pki) -> None:
    not_pem = tmp_path / "not.pem"
    not_pem.write_text("hello")
    config = make_config(tmp_path, mitz_port=9, clients={
        "tlb": [{"name": "gone", "certificate": {"cert_file": str(tmp_path / "missing.pem")},
                 "uras": [URA_A]},
                {"name": "garbage", "certificate": {"cert_file": str(not_pem)}, "uras": [URA_A]},
                {"name": "twin-1", "certificate": {"sha256": "ab" * 32}, "uras": [URA_A]},
                {"name": "twin-2", "certificate": {"sha256": "AB" * 32}, "uras": [URA_B]},
                {"name": "nowhere", "certificate": {"absent": True}, "uras": [URA_A],
                 "destinations": ["no-such-pacs"]}]},
        tls={"cert_file": str(rsa_pki.server.cert), "key_file": str(rsa_pki.server.key),
             "ca_file": str(rsa_pki.ca_cert), "client_auth": "required"})
    problems = "\n".join(access_problems(config))
    assert "clients.tlb[0] (gone)" in problems and "No such file" in problems
    assert "clients.tlb[1] (garbage)" in problems and "not a PEM certificate" in problems
    assert "clients.tlb[3] (twin-2): matches the same certificate as clients.tlb[2]" in problems
    assert "clients.tlb[4] (nowhere): certificate.absent never matches" in problems
    assert "destinations not in transfers.destinations: no-such-pacs" in problems
    with pytest.raises(AccessConfigError):
        Gateway(config)


def test_a_listener_off_loopback_without_mtls_is_refused(tmp_path: Path) -> None:
    config = make_config(tmp_path, mitz_port=9)
    http = config.listeners.http.model_copy(update={"host": "0.0.0.0"})
    exposed = config.model_copy(update={"listeners": config.listeners.model_copy(update={"http": http})})
    assert any("without mTLS" in p for p in access_problems(exposed))
    http = http.model_copy(update={"allow_insecure": True})
    allowed = config.model_copy(update={"listeners": config.listeners.model_copy(update={"http": http})})
    assert not any("without mTLS" in p for p in access_problems(allowed))


def test_check_config_names_a_client_that_cannot_match(tmp_path: Path) -> None:
    (tmp_path / "duo.toml").write_text(f"""
[gateway]
home_community_id = "urn:oid:2.16.528.1.1007.99.1"
ura = "00099001"
name = "DUO"

[mitz]
closed_url = "https://mitz.example/closed"
open_url = "https://mitz.example/open"
subscriptions_url = "https://mitz.example/sub"

[[clients.tlb]]
name = "umc-timeline"
uras = ["{URA_A}"]
certificate = {{ cert_file = "certs/umc.pem" }}
""")
    done = subprocess.run([sys.executable, "-m", "duo_gateway", "check-config", str(tmp_path / "duo.toml")],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2, done
    assert "clients.tlb[0] (umc-timeline): certificate.cert_file" in done.stderr


# --------------------------------------------------------------------------------------------------
# route owners and concurrency, on a plain loopback app
# --------------------------------------------------------------------------------------------------


class _SlowDoor:
    """A TLB route that takes its time, so requests pile up."""

    name = "slow"

    def __init__(self) -> None:
        self.release = asyncio.Event()

    def mount(self, app: web.Application) -> None:
        async def slow(_request: web.Request) -> web.Response:
            await self.release.wait()
            return web.json_response({})

        async def unowned(_request: web.Request) -> web.Response:
            return web.json_response({"leaked": True})

        app.router.add_get("/tlb/v1/slow", slow, name=route_name("tlb", "timeline"))
        app.router.add_get("/nobody", unowned)


async def test_a_client_over_its_concurrency_gets_429_and_an_unowned_route_serves_nobody() -> None:
    door = _SlowDoor()
    app = build_app(Metrics(), lambda: [], 1.0, [door], clients=plain_directory(max_concurrent=2))
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    base = f"http://127.0.0.1:{runner.addresses[0][1]}"
    try:
        async with aiohttp.ClientSession() as session:
            first = [asyncio.create_task(session.get(f"{base}/tlb/v1/slow")) for _ in range(2)]
            await asyncio.sleep(0.2)
            async with session.get(f"{base}/tlb/v1/slow") as over:
                assert over.status == 429 and over.headers["Retry-After"] == "1"
                assert (await over.json())["title"] == "Too many requests"
            door.release.set()
            for task in first:
                response = await task
                assert response.status == 200
                response.release()
            async with session.get(f"{base}/tlb/v1/slow") as again:
                assert again.status == 200  # the slots are free again
            async with session.get(f"{base}/nobody") as unowned:
                assert unowned.status == 403 and "leaked" not in await unowned.text()
    finally:
        await runner.cleanup()


# --------------------------------------------------------------------------------------------------
# the attacks, over real TLS with client certificates
# --------------------------------------------------------------------------------------------------


@dataclass
class Tls:
    gateway: Gateway
    pki: Pki
    a: CertPair
    b: CertPair
    stranger: CertPair
    peer: CertPair
    log: io.StringIO

    def ctx(self, pair: CertPair) -> ssl.SSLContext:
        ctx = ssl.create_default_context(cafile=str(self.pki.ca_cert))
        ctx.load_cert_chain(str(pair.cert), str(pair.key))
        return ctx

    async def call(self, pair: CertPair, method: str, path: str, body: Any = None) -> tuple[int, Any, str]:
        async with aiohttp.ClientSession() as session, session.request(
                method, f"{self.gateway.http_url}{path}", json=body, ssl=self.ctx(pair)) as response:
            text = await response.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = None
            return response.status, parsed, text


@pytest.fixture
async def tls(tmp_path: Path, rsa_pki: Pki) -> AsyncIterator[Tls]:
    a = issue(rsa_pki, f"tlb-a-{tmp_path.name}", uras=(URA_A,))
    b = issue(rsa_pki, f"tlb-b-{tmp_path.name}", uras=(URA_B,))
    stranger = issue(rsa_pki, f"stranger-{tmp_path.name}", uras=(URA_A,))
    peer = issue(rsa_pki, f"xca-{tmp_path.name}")
    ca_subject = x509.load_pem_x509_certificate(rsa_pki.ca_cert.read_bytes()).subject.rfc4514_string()
    config = make_config(tmp_path, mitz_port=9, hospitals=[HOSPITAL], tls={
        "cert_file": str(rsa_pki.server.cert), "key_file": str(rsa_pki.server.key),
        "ca_file": str(rsa_pki.ca_cert), "client_auth": "required"}, clients={
        "tlb": [{"name": "umc-a", "certificate": {"cert_file": str(a.cert)}, "uras": [URA_A]},
                {"name": "umc-b", "certificate": {"issuer": ca_subject, "subject": f"CN={b.cert.stem}",
                                                   "ura": URA_B}, "uras": [URA_B]}],
        "xca": [{"name": "xds", "certificate": {"cert_file": str(peer.cert)},
                 "home_community_id": "urn:oid:1.2.3", "issuer": "urn:oid:1.2.3",
                 "signing_certs": [str(peer.cert)]}]})
    config = config.model_copy(update={"transfers": TransferConfig(destinations=[
        DestinationPacs(name="pacs-a", ae_title="PACS_A", host="127.0.0.1", port=9, uras=[URA_A]),
        DestinationPacs(name="pacs-b", ae_title="PACS_B", host="127.0.0.1", port=9, uras=[URA_B])],
        workers=1, retries=0)})
    log = io.StringIO()
    configure_logging(LoggingConfig(level="INFO"), stream=log)
    gateway = Gateway(config)
    await gateway.start()
    try:
        yield Tls(gateway, rsa_pki, a, b, stranger, peer, log)
    finally:
        await gateway.stop()
        configure_logging(LoggingConfig(level="WARNING"))


def _timeline(ura: str) -> dict[str, Any]:
    return {"patient": {"bsn": BSN}, "period": {"from": "2020-01-01", "to": "2026-12-31"},
            "requester": _requester(ura)}


async def test_a_forged_requester_or_a_stranger_gets_nothing(tls: Tls) -> None:
    status, body, _ = await tls.call(tls.a, "POST", "/tlb/v1/timeline", _timeline("99999999"))
    assert status == 403 and body["type"] == "urn:duo-gateway:problem:forbidden"
    assert "may not speak for organisation 99999999" in body["detail"] and "studies" not in body
    # B's organisation, claimed over A's certificate.
    status, body, _ = await tls.call(tls.a, "POST", "/tlb/v1/timeline", _timeline(URA_B))
    assert status == 403
    # A certificate from the same CA, carrying A's URA, but not a configured client.
    status, body, _ = await tls.call(tls.stranger, "POST", "/tlb/v1/timeline", _timeline(URA_A))
    assert status == 403 and "not a configured client" in body["detail"]
    # An XCA peer is not a TLB client, and a TLB client is not an XCA peer (answered as a SOAP Fault).
    status, body, _ = await tls.call(tls.peer, "POST", "/tlb/v1/timeline", _timeline(URA_A))
    assert status == 403
    status, _, text = await tls.call(tls.a, "POST", "/xca/iti38", None)
    assert status == 403 and "FailedAuthentication" in text and "Envelope" in text
    # Both legitimate clients, each for its own organisation.
    for pair, ura in ((tls.a, URA_A), (tls.b, URA_B)):
        status, body, _ = await tls.call(pair, "POST", "/tlb/v1/timeline", _timeline(ura))
        assert status == 200, body
    records = [json.loads(line) for line in tls.log.getvalue().splitlines() if line.startswith("{")]
    denied = [r for r in records if r.get("event") == "access_denied"]
    assert any(r.get("certificate", "").startswith(f"CN={tls.stranger.cert.stem}") for r in denied)
    access = [r for r in records if r.get("event") == "http_request"]
    assert access and all(r.get("request_id") and r.get("caller") for r in access)
    assert {"tlb:umc-a", "tlb:umc-b"} <= {r["caller"] for r in access}
    assert BSN not in tls.log.getvalue()


def _transfer(study: str, destination: str, ura: str) -> dict[str, Any]:
    return {"studies": [study], "destination": destination, "requester": _requester(ura)}


async def test_a_transfer_is_its_clients_alone_and_study_ids_are_the_requesters(tls: Tls) -> None:
    ref = StudyRef("tlb", "1.2.3.4", "urn:oid:2.16.528.1.1007.99.1", repository_unique_id="1.2.3.4",
                   hospital_ura=HOSPITAL["ura"])
    study_a = tls.gateway.study_ids.seal(ref, BSN, ura=URA_A)
    status, body, _ = await tls.call(tls.a, "POST", "/tlb/v1/transfers", _transfer(study_a, "pacs-a", URA_A))
    assert status == 202, body
    job = body["id"]
    for method, path in (("GET", f"/tlb/v1/transfers/{job}"), ("DELETE", f"/tlb/v1/transfers/{job}"),
                         ("GET", f"/tlb/v1/transfers/{job}/events")):
        status, body, _ = await tls.call(tls.b, method, path)
        assert status == 404, (method, path, body)
    status, body, _ = await tls.call(tls.b, "GET", "/tlb/v1/transfers")
    assert status == 200 and body["transfers"] == []
    status, body, _ = await tls.call(tls.a, "GET", "/tlb/v1/transfers")
    assert status == 200 and [t["id"] for t in body["transfers"]] == [job]
    status, body, _ = await tls.call(tls.a, "GET", f"/tlb/v1/transfers/{job}")
    assert status == 200 and not body["cancel_requested"]  # B's DELETE did nothing
    # A's study id replayed by B for B's own organisation: a genuine id, but not B's to use.
    status, body, _ = await tls.call(tls.b, "POST", "/tlb/v1/transfers", _transfer(study_a, "pacs-b", URA_B))
    assert status == 422 and "another organisation" in body["detail"]
    # An expired id.
    old = tls.gateway.study_ids.seal(ref, BSN, ura=URA_A, now=0.0)
    status, body, _ = await tls.call(tls.a, "POST", "/tlb/v1/transfers", _transfer(old, "pacs-a", URA_A))
    assert status == 422 and "expired" in body["detail"]


# --------------------------------------------------------------------------------------------------
# identity = "assertion": the professional proven by the client's own signed XUA assertion
# --------------------------------------------------------------------------------------------------

ASSERTING_ISSUER = "urn:oid:2.16.528.1.1007.99.555"


@pytest.fixture
async def asserting(tmp_path: Path, rsa_pki: Pki) -> AsyncIterator[Tls]:
    a = issue(rsa_pki, f"tlb-xua-{tmp_path.name}", uras=(URA_A,))
    signing = issue(rsa_pki, f"tlb-xua-sign-{tmp_path.name}", signing=True)
    config = make_config(tmp_path, mitz_port=9, tls={
        "cert_file": str(rsa_pki.server.cert), "key_file": str(rsa_pki.server.key),
        "ca_file": str(rsa_pki.ca_cert), "client_auth": "required"}, clients={
        "tlb": [{"name": "umc-a", "certificate": {"cert_file": str(a.cert)}, "uras": [URA_A],
                 "identity": "assertion", "assertion_issuer": ASSERTING_ISSUER,
                 "assertion_signing_certs": [str(signing.cert)]}]})
    gateway = Gateway(config)
    await gateway.start()
    try:
        # `b` carries the signing pair here, `peer` a pair that is not pinned.
        yield Tls(gateway, rsa_pki, a, signing, a, rsa_pki.server, io.StringIO())
    finally:
        await gateway.stop()


def _saml(pair: CertPair, *, role: str = "01.039", uzi: str = "000095254",
          audience: str = "urn:oid:2.16.528.1.1007.99.1") -> str:
    key, cert = load_signing_pair(pair.key, pair.cert)
    claims = Claims(uzi=uzi, role=role, ura=URA_A, purpose="TREAT", organisation_type="V6")
    assertion = issue_assertion(claims, issuer=ASSERTING_ISSUER, audience=audience, key=key, cert=cert,
                                now=datetime.now(UTC))
    return "SAML " + base64.b64encode(etree.tostring(assertion)).decode()


async def _post_timeline(tls: Tls, authorization: str | None) -> tuple[int, Any, dict[str, str]]:
    headers = {"Authorization": authorization} if authorization else {}
    async with aiohttp.ClientSession() as session, session.post(
            f"{tls.gateway.http_url}/tlb/v1/timeline", json=_timeline(URA_A), headers=headers,
            ssl=tls.ctx(tls.a)) as response:
        return response.status, await response.json(content_type=None), dict(response.headers)


async def test_a_client_that_asserts_its_professional_is_believed_only_with_its_own_assertion(
        asserting: Tls) -> None:
    status, body, headers = await _post_timeline(asserting, None)
    assert status == 401 and headers["WWW-Authenticate"] == "SAML"
    assert body["type"] == "urn:duo-gateway:problem:invalid-assertion" and "studies" not in body
    for bad in ("Bearer abc", "SAML not-base64!", "SAML " + base64.b64encode(b"<a/>").decode()):
        status, body, _ = await _post_timeline(asserting, bad)
        assert status == 401, (bad, body)
    # Signed by a CA-issued key that is not pinned for this issuer (DUO's own server certificate).
    status, body, _ = await _post_timeline(asserting, _saml(asserting.peer))
    assert status == 401 and "signature refused" in body["detail"], body
    # A role that may not consult imaging, and an assertion for another audience.
    status, body, _ = await _post_timeline(asserting, _saml(asserting.b, role="99.999"))
    assert status == 401 and "role" in body["detail"], body
    status, body, _ = await _post_timeline(asserting, _saml(asserting.b, audience="urn:oid:1.2.3"))
    assert status == 401, body
    # The client's own assertion, but the body speaks for another professional.
    status, body, _ = await _post_timeline(asserting, _saml(asserting.b, uzi="000011111"))
    assert status == 403 and "uzi" in body["detail"], body
    # The client's own assertion, saying what the body says.
    status, body, _ = await _post_timeline(asserting, _saml(asserting.b))
    assert status == 200, body
