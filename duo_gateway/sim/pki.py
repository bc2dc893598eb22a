"""A throwaway PKI for loopback: a CA, server and client certificates, made at run time.

Used by the simulated network (demo TLS and the demo XUA issuer) and by the tests; never for real
deployments, whose certificates come from PKIoverheid/UZI.

EC keys by default (fast, fine for TLS); ``key_type="rsa"`` exists because PKIoverheid, and so every
XML-DSig peer the gateway meets, is RSA-only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID


@dataclass(frozen=True)
class CertPair:
    cert: Path
    key: Path


@dataclass(frozen=True)
class Pki:
    ca_cert: Path
    server: CertPair
    client: CertPair
    #: A client certificate signed by a different CA: must be refused under mTLS.
    rogue_client: CertPair
    rogue_ca_cert: Path
    #: The CA keys, so a test can issue extra certificates (expired, odd key usage, ...).
    ca_key: Path | None = None
    rogue_ca_key: Path | None = None


KeyType = Literal["ec", "rsa"]
_PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey


def new_key(key_type: KeyType = "ec") -> _PrivateKey:
    if key_type == "rsa":
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return ec.generate_private_key(ec.SECP256R1())


def _name(cn: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])


def _write_key(key: _PrivateKey, path: Path) -> None:
    path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                       serialization.NoEncryption()))


def _ca(cn: str, folder: Path, key_type: KeyType = "ec") -> tuple[x509.Certificate, _PrivateKey, Path]:
    key = new_key(key_type)
    now = dt.datetime.now(dt.UTC)
    cert = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(_name(cn))
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=2))
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, key_cert_sign=True, crl_sign=True,
                                         content_commitment=False, key_encipherment=False,
                                         data_encipherment=False, key_agreement=False,
                                         encipher_only=False, decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))
    path = folder / f"{cn}.pem"
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, folder / f"{cn}.key")
    return cert, key, path


def uzi_server_name(ura: str, uzi_number: str = "90000001") -> x509.OtherName:
    """The subjectAltName ``otherName`` of a UZI-register server certificate binding ``ura``
    (netherlands.md: ``<OID CA>-<version>-<UZI number>-S-<URA>-<role>-<AGB>``, an IA5String)."""
    value = f"2.16.528.1.1003.1.3.5.5.2-1-{uzi_number}-S-{ura}-00.000-00000000".encode("ascii")
    return x509.OtherName(x509.ObjectIdentifier("2.5.5.5"), bytes([0x16, len(value)]) + value)


def _leaf(cn: str, ca: x509.Certificate, ca_key: _PrivateKey, folder: Path,
          server: bool, key_type: KeyType = "ec", *, uras: tuple[str, ...] = (),
          signing: bool = False) -> CertPair:
    key = new_key(key_type)
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (x509.CertificateBuilder().subject_name(_name(cn)).issuer_name(ca.subject)
               .public_key(key.public_key()).serial_number(x509.random_serial_number())
               .not_valid_before(now - dt.timedelta(minutes=5)).not_valid_after(now + dt.timedelta(days=1))
               .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True))
    if signing:
        # An XUA signing certificate: signatures only, no TLS use.
        builder = builder.add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=True, key_cert_sign=False, crl_sign=False,
            key_encipherment=False, data_encipherment=False, key_agreement=False, encipher_only=False,
            decipher_only=False), critical=True)
    else:
        builder = builder.add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
    names: list[x509.GeneralName] = [uzi_server_name(u) for u in uras]
    if server:
        names += [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                  x509.IPAddress(ipaddress.ip_address("::1"))]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    cert = builder.sign(ca_key, hashes.SHA256())
    pair = CertPair(folder / f"{cn}.crt", folder / f"{cn}.key")
    pair.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_key(key, pair.key)
    return pair


def make_pki(folder: Path, key_type: KeyType = "ec") -> Pki:
    folder.mkdir(parents=True, exist_ok=True)
    ca, ca_key, ca_path = _ca("duo-test-ca", folder, key_type)
    rogue, rogue_key, rogue_path = _ca("rogue-ca", folder, key_type)
    return Pki(
        ca_cert=ca_path,
        server=_leaf("server", ca, ca_key, folder, server=True, key_type=key_type),
        client=_leaf("client", ca, ca_key, folder, server=False, key_type=key_type),
        rogue_client=_leaf("rogue-client", rogue, rogue_key, folder, server=False, key_type=key_type),
        rogue_ca_cert=rogue_path,
        ca_key=folder / "duo-test-ca.key",
        rogue_ca_key=folder / "rogue-ca.key",
    )


def issue(pki: Pki, cn: str, *, uras: tuple[str, ...] = (), signing: bool = False,
          key_type: KeyType = "rsa") -> CertPair:
    """One more certificate from the PKI's CA, next to the others: a TLS client certificate (with the
    URAs of a UZI server certificate in its subjectAltName) or, with ``signing``, an XUA signing pair."""
    if pki.ca_key is None:
        raise ValueError("this PKI kept no CA key")
    ca = x509.load_pem_x509_certificate(pki.ca_cert.read_bytes())
    ca_key = serialization.load_pem_private_key(pki.ca_key.read_bytes(), password=None)
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise ValueError("the CA key is neither EC nor RSA")
    return _leaf(cn, ca, ca_key, pki.ca_cert.parent, server=False, key_type=key_type, uras=uras,
                 signing=signing)
