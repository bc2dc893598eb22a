"""Whose word the responding gateway takes, end to end over mTLS with two XCA peers (issue 11, part 4).

Each peer connects with its own TLS client certificate and signs its own issuer's assertions with its
own pinned key. The attacks a security officer tried are each refused with the SOAP fault xua.py
names, and nothing about the patient comes back: another trusted peer's key under this issuer, a
certificate the network's CA issued (DUO's own server certificate) or the CA key itself, one peer's
assertion over the other's TLS identity, a replayed MessageID, an assertion naming another patient,
a role that has no business with images. The legitimate paths keep working: both peers, and one
assertion reused for several messages with fresh MessageIDs.
"""

from __future__ import annotations

import datetime as dt
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from lxml import etree

from duo_gateway.bsn import bsn_cx
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    Addressing,
    build_envelope,
    serialize,
)
from duo_gateway.xca.codes import Action, ErrorCode, ResponseStatus
from duo_gateway.xca.query import build_adhoc_query_request, find_documents, parse_adhoc_query_response
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveImagingDocumentSetRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
    parse_retrieve_response,
)
from duo_gateway.xmldsig import PrivateKey, load_signing_pair
from duo_gateway.xua import Claims, security_header
from tests.support.pki import CertPair, Pki, make_pki
from tests.xca.responding_harness import CLAIMS, HOME, XUA_ISSUER, Network, Reply, running_network
from tests.xca.test_responding import ALL, H1, PARTIAL, fault_of, kos_of, repo, studies_of, study_request

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: Peer B: another XDS community with its own issuer, TLS certificate and signing key.
ISSUER_B = "urn:oid:2.16.528.1.1007.99.888"
HOME_A = "urn:oid:2.16.528.1.1007.99.700"
HOME_B = "urn:oid:2.16.528.1.1007.99.701"

Signer = tuple[PrivateKey, list[x509.Certificate]]


def _issue(pki: Pki, cn: str, *, tls_client: bool) -> CertPair:
    """A certificate from the network's CA: a TLS client certificate, or a signing one (digitalSignature)."""
    assert pki.ca_key is not None
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), None)
    assert isinstance(ca_key, rsa.RSAPrivateKey)
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    now = dt.datetime.now(dt.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    builder = (x509.CertificateBuilder().subject_name(name).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if tls_client:
        builder = builder.add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]),
                                        critical=False)
    else:
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False, data_encipherment=False,
            key_agreement=False, key_cert_sign=False, crl_sign=False, encipher_only=False,
            decipher_only=False), critical=True)
    folder = pki.ca_cert.parent
    pair = CertPair(folder / f"{cn}.crt", folder / f"{cn}.key")
    pair.cert.write_bytes(builder.sign(ca_key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM))
    pair.key.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return pair


def _tls(pki: Pki, pair: CertPair) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca_cert))
    ctx.load_cert_chain(str(pair.cert), str(pair.key))
    return ctx


@dataclass(frozen=True)
class Peer:
    issuer: str
    tls: ssl.SSLContext
    signer: Signer


@dataclass(frozen=True)
class Trust:
    net: Network
    a: Peer
    b: Peer
    #: A certificate the CA issued that is pinned for nobody.
    stranger: Signer

    def assertion(self, peer: Peer, *, claims: Claims = CLAIMS, issuer: str | None = None,
                  signer: Signer | None = None, subject_bsn: str | None = None) -> etree._Element:
        return self.net.assertion(claims, issuer=issuer or peer.issuer, signer=signer or peer.signer,
                                  subject_bsn=subject_bsn)

    async def iti38(self, peer: Peer, assertion: etree._Element | None = None, *, bsn: str = ALL,
                    message_id: str | None = None) -> Reply:
        body = build_adhoc_query_request(find_documents(bsn_cx(bsn)))
        return await self.net.call(self.net.gateway.config.xca_responding.iti38_path, Action.ITI38, body,
                                   assertion=assertion if assertion is not None else self.assertion(peer),
                                   message_id=message_id, tls=peer.tls)


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def trust(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Trust]:
    tmp = tmp_path_factory.mktemp("trust")
    pki = make_pki(tmp / "pki", key_type="rsa")
    # Peer A presents pki.client for TLS and signs with it (the harness's signer); peer B keeps them apart.
    b_tls, b_sign = _issue(pki, "peer-b-tls", tls_client=True), _issue(pki, "peer-b-sign", tls_client=False)
    stranger = _issue(pki, "stranger-sign", tls_client=False)
    clients = {"tlb": [], "mitz": [], "xca": [
        {"name": "peer-a", "certificate": {"cert_file": str(pki.client.cert)}, "home_community_id": HOME_A,
         "issuer": XUA_ISSUER, "signing_certs": [str(pki.client.cert)]},
        {"name": "peer-b", "certificate": {"cert_file": str(b_tls.cert)}, "home_community_id": HOME_B,
         "issuer": ISSUER_B, "signing_certs": [str(b_sign.cert)]},
    ]}
    tls = {"cert_file": str(pki.server.cert), "key_file": str(pki.server.key), "ca_file": str(pki.ca_cert),
           "client_auth": "required"}
    # A generous PACS deadline: these tests are about trust, not about a loaded machine's C-FIND times.
    async with running_network(tmp, studies_per_patient=1, pki=pki, clients=clients,
                               listeners={"http": {"host": "127.0.0.1", "port": 0, "tls": tls}},
                               xca_responding={"hospital_deadline_s": 10.0}) as net:
        assert net.url.startswith("https://")
        a = Peer(XUA_ISSUER, _tls(pki, pki.client), load_signing_pair(pki.client.key, pki.client.cert))
        b = Peer(ISSUER_B, _tls(pki, b_tls), load_signing_pair(b_sign.key, b_sign.cert))
        yield Trust(net, a, b, load_signing_pair(stranger.key, stranger.cert))


def entries(reply: Reply) -> int:
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    resp = parse_adhoc_query_response(reply.envelope.body)
    assert resp.status == ResponseStatus.SUCCESS, resp.errors
    return len(resp.entries)


def refused(reply: Reply, subcode: str, reason: str) -> None:
    """A Sender fault with this wsse subcode and reason, and nothing about the patient in it."""
    assert reply.status == 400, reply.raw[:500]
    code, sub, text = fault_of(reply)
    assert (code, sub) == ("Sender", subcode), text
    assert reason in text, text
    assert ALL.encode() not in reply.raw and b"ExtrinsicObject" not in reply.raw


# -- the legitimate paths -------------------------------------------------------------------------


async def test_both_peers_are_answered_under_their_own_issuer(trust: Trust) -> None:
    assert entries(await trust.iti38(trust.a)) > 0
    assert entries(await trust.iti38(trust.b)) > 0


async def test_one_assertion_serves_several_messages_with_fresh_message_ids(trust: Trust) -> None:
    kept = trust.assertion(trust.a)
    counts = [entries(await trust.iti38(trust.a, kept)) for _ in range(3)]
    assert counts[0] > 0 and len(set(counts)) == 1


# -- replay ---------------------------------------------------------------------------------------


async def test_a_replayed_message_is_refused(trust: Trust) -> None:
    mid = "urn:uuid:7f9e6a52-5b0e-4c59-9d0e-3a4c1a1d2b01"
    kept = trust.assertion(trust.a)
    assert entries(await trust.iti38(trust.a, kept, message_id=mid)) > 0
    refused(await trust.iti38(trust.a, kept, message_id=mid), "InvalidSecurity", "seen before")
    # Even under a fresh assertion: it is the message that was used, not the assertion.
    refused(await trust.iti38(trust.a, message_id=mid), "InvalidSecurity", "seen before")
    # Scoped per issuer: another peer's MessageIDs are its own (no peer can pre-empt another's).
    assert entries(await trust.iti38(trust.b, message_id=mid)) > 0


async def test_a_message_without_message_id_is_refused(trust: Trust) -> None:
    env = build_envelope(Addressing(action=Action.ITI38, to=trust.net.url),
                         build_adhoc_query_request(find_documents(bsn_cx(ALL))),
                         [security_header(trust.assertion(trust.a), dt.datetime.now(dt.UTC))])
    reply = await trust.net.post(trust.net.gateway.config.xca_responding.iti38_path, serialize(env),
                                 f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38}"',
                                 tls=trust.a.tls)
    assert reply.status == 400
    code, sub, text = fault_of(reply)
    assert (code, sub) == ("Sender", "MessageAddressingHeaderRequired"), text


# -- who may sign, for whom -----------------------------------------------------------------------


async def test_one_peers_assertion_over_the_other_peers_identity_is_refused(trust: Trust) -> None:
    refused(await trust.iti38(trust.b, trust.assertion(trust.a)), "FailedAuthentication",
            "is not the issuer of the calling peer")
    refused(await trust.iti38(trust.a, trust.assertion(trust.b)), "FailedAuthentication",
            "is not the issuer of the calling peer")


async def test_another_issuer_signed_by_a_trusted_peers_key_is_refused(trust: Trust) -> None:
    refused(await trust.iti38(trust.a, trust.assertion(trust.a, issuer="urn:oid:6.6.6")),
            "FailedAuthentication", "'urn:oid:6.6.6' is not the issuer of the calling peer")


async def test_only_the_keys_pinned_for_the_issuer_sign_its_assertions(trust: Trust,
                                                                      tmp_path: Path) -> None:
    pki_dir = trust.net.pki
    cases: dict[str, tuple[Signer, str]] = {
        "another trusted peer's key": (trust.b.signer, "CN=peer-b-sign is not trusted"),
        "DUO's own TLS server key": (load_signing_pair(pki_dir.server.key, pki_dir.server.cert),
                                     "CN=server is not trusted"),
        "a key the CA issued to nobody in particular": (trust.stranger, "CN=stranger-sign is not trusted"),
        "the CA key itself": (load_signing_pair(pki_dir.ca_key or tmp_path, pki_dir.ca_cert),
                              "a CA certificate never signs assertions"),
    }
    for name, (signer, reason) in cases.items():
        reply = await trust.iti38(trust.a, trust.assertion(trust.a, signer=signer))
        assert reply.status == 400, name
        refused(reply, "FailedAuthentication", reason)


@pytest.mark.parametrize("role", ["99.999", "X"])
async def test_a_role_without_business_with_images_is_refused(trust: Trust, role: str) -> None:
    claims = Claims(uzi="000095254", role=role, ura="00000666", organisation_type="V6", purpose="TREAT")
    refused(await trust.iti38(trust.a, trust.assertion(trust.a, claims=claims)), "FailedAuthentication",
            f"role '{role}' may not consult imaging here")


# -- the patient the assertion names ----------------------------------------------------------------


async def test_an_assertion_for_another_patient_finds_nothing(trust: Trust) -> None:
    for_partial = trust.assertion(trust.a, subject_bsn=PARTIAL)
    refused(await trust.iti38(trust.a, for_partial, bsn=ALL), "FailedAuthentication",
            "resource-id names another patient")
    assert entries(await trust.iti38(trust.a, trust.assertion(trust.a, subject_bsn=ALL), bsn=ALL)) > 0


async def test_documents_of_another_patient_are_not_retrieved(trust: Trust) -> None:
    """ITI-39 and RAD-75 name documents, not the patient: the study's patient (from the PACS) must be
    the assertion's, or the documents are "not available", exactly as unknown ones are."""
    net = trust.net
    found = await trust.iti38(trust.a)
    assert found.envelope is not None and found.envelope.body is not None
    study = studies_of(net, H1, ALL)[0]
    kos = kos_of(parse_adhoc_query_response(found.envelope.body), H1, study.study_instance_uid)
    cfg = net.gateway.config.xca_responding
    iti39 = build_retrieve_request(RetrieveDocumentSetRequest((
        DocumentRequest(repo(net, H1), kos.unique_id, HOME),)))
    rad75 = build_imaging_retrieve_request(RetrieveImagingDocumentSetRequest(
        (study_request(study, repo(net, H1)),), ("1.2.840.10008.1.2.1",)))
    for path, action, body in ((cfg.iti39_path, Action.ITI39, iti39), (cfg.rad75_path, Action.RAD75, rad75)):
        other = await net.call(path, action, body, assertion=trust.assertion(trust.a, subject_bsn=PARTIAL),
                               tls=trust.a.tls, mtom=True)
        assert other.status == 200 and other.envelope is not None and other.envelope.body is not None
        resp = parse_retrieve_response(other.envelope.body, other.parts)
        assert resp.status == ResponseStatus.FAILURE and not resp.documents and not other.parts, action
        # The same answer as for a document that does not exist: no oracle for whose it is.
        assert resp.errors and {e.error_code for e in resp.errors} == {ErrorCode.DOCUMENT_UNIQUE_ID_ERROR}
        own = await net.call(path, action, body, assertion=trust.assertion(trust.a, subject_bsn=ALL),
                             tls=trust.a.tls, mtom=True)
        assert own.status == 200 and own.envelope is not None and own.envelope.body is not None
        assert parse_retrieve_response(own.envelope.body, own.parts).documents, action
