"""Which configured system is calling: a TLS client certificate in, a :class:`Caller` out.

The one place a certificate becomes an identity. The TLS layer has already verified the chain to the
listener's CA; here the verified certificate is matched against ``[clients]`` (fingerprint, or issuer
with subject or with the URA of a UZI server certificate). Pure: no sockets, so every rule is tested
on certificates made in memory.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Final, Literal

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from duo_gateway.config.access import CertificateMatch, ClientsConfig, MitzCaller, TlbClient, XcaPeer
from duo_gateway.config.loader import DuoConfig

#: otherName type of the UZI-register's compound identifier in a server certificate's subjectAltName.
UZI_OTHERNAME_OID: Final = x509.ObjectIdentifier("2.5.5.5")
#: RFC 4043 permanentIdentifier, which UZI certificates issued after 8 November 2023 also carry.
PERMANENT_IDENTIFIER_OID: Final = x509.ObjectIdentifier("1.3.6.1.5.5.7.8.3")
#: ``<OID CA>-<version>-<UZI number>-<card type>-<subscriber number = URA>-<role>-<AGB code>``.
_UZI_COMPOUND = re.compile(r"[0-9.]+-[0-9]+-[0-9]+-S-([0-9]{8})-[^-]*-[^-]*")

Kind = Literal["tlb", "xca", "mitz"]


@dataclass(frozen=True)
class PeerCertificate:
    """What DUO knows of a verified client certificate; ``label`` is what logs name it by."""

    sha256: str
    subject: str
    issuer: str
    uras: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        return f"{self.subject or '(no subject)'} sha256:{self.sha256[:16]}"

    @classmethod
    def from_der(cls, der: bytes) -> PeerCertificate:
        cert = x509.load_der_x509_certificate(der)
        return cls(sha256=hashlib.sha256(der).hexdigest(), subject=cert.subject.rfc4514_string(),
                   issuer=cert.issuer.rfc4514_string(), uras=certificate_uras(cert))


def _der_ia5(value: bytes) -> str | None:
    """The text of a DER IA5String/UTF8String/PrintableString (short or long form length)."""
    if len(value) < 2 or value[0] not in (0x16, 0x0C, 0x13):
        return None
    length, offset = value[1], 2
    if length & 0x80:
        n = length & 0x7F
        if n == 0 or n > 2 or len(value) < 2 + n:
            return None
        length, offset = int.from_bytes(value[2:2 + n], "big"), 2 + n
    body = value[offset:offset + length]
    if len(body) != length:
        return None
    try:
        return body.decode("ascii")
    except UnicodeDecodeError:
        return None


def _permanent_identifier(value: bytes) -> str | None:
    """RFC 4043 ``PermanentIdentifier ::= SEQUENCE { identifierValue UTF8String OPTIONAL, ... }``."""
    if len(value) < 2 or value[0] != 0x30 or value[1] & 0x80:
        return None
    return _der_ia5(value[2:2 + value[1]])


def certificate_uras(cert: x509.Certificate) -> tuple[str, ...]:
    """The URAs a UZI server certificate binds (card type S only), in the order they appear."""
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    except x509.ExtensionNotFound:
        return ()
    found: list[str] = []
    for name in san.get_values_for_type(x509.OtherName):
        if name.type_id == UZI_OTHERNAME_OID:
            text = _der_ia5(name.value)
            match = _UZI_COMPOUND.fullmatch(text or "")
            if match:
                found.append(match.group(1))
        elif name.type_id == PERMANENT_IDENTIFIER_OID:
            text = _permanent_identifier(name.value)
            if text is not None and re.fullmatch(r"[0-9]{8}", text):
                found.append(text)
    return tuple(dict.fromkeys(found))


def fingerprint_of_pem(data: bytes) -> str:
    cert = x509.load_pem_x509_certificate(data)
    return hashlib.sha256(cert.public_bytes(serialization.Encoding.DER)).hexdigest()


@dataclass(frozen=True)
class _Matcher:
    match: CertificateMatch
    sha256: str | None

    def matches(self, cert: PeerCertificate | None) -> bool:
        m = self.match
        if cert is None:
            return m.absent
        if m.absent:
            return False
        if self.sha256 is not None:
            return cert.sha256 == self.sha256
        if m.issuer != cert.issuer:
            return False
        if m.subject is not None and m.subject != cert.subject:
            return False
        return m.ura is None or m.ura in cert.uras


Client = TlbClient | XcaPeer | MitzCaller


@dataclass(frozen=True)
class Caller:
    """The system behind one request: its certificate (None: none presented) and the client it is."""

    certificate: PeerCertificate | None
    kind: Kind | None = None
    client: Client | None = None

    @property
    def name(self) -> str:
        if self.client is not None:
            return f"{self.kind}:{self.client.name}"
        return "anonymous" if self.certificate is None else f"unknown:{self.certificate.sha256[:16]}"

    @property
    def tlb(self) -> TlbClient | None:
        return self.client if isinstance(self.client, TlbClient) else None

    @property
    def xca(self) -> XcaPeer | None:
        return self.client if isinstance(self.client, XcaPeer) else None


class AccessConfigError(ValueError):
    """A ``[clients]`` entry that can never match anything (unreadable file, twin of another entry)."""


@dataclass
class ClientDirectory:
    """``[clients]`` resolved for matching; built once at start (reads the ``cert_file``s)."""

    entries: list[tuple[Kind, Client, _Matcher]] = field(default_factory=list)

    @classmethod
    def build(cls, config: ClientsConfig) -> ClientDirectory:
        problems = directory_problems(config)
        if problems:
            raise AccessConfigError("; ".join(problems))
        return cls([(kind, client, _matcher(client.certificate)) for kind, _i, client in _every(config)])

    def identify(self, certificate: PeerCertificate | None, kind: str | None = None) -> Caller:
        """The client of ``kind`` (a route's owner) this certificate is; any kind when None.

        Per kind, because one system may legitimately be two clients (a hospital gateway that is both
        a TLB client and an XCA peer), and a plain-HTTP setup may name one ``absent`` client per kind.
        """
        for entry_kind, client, matcher in self.entries:
            if (kind is None or entry_kind == kind) and matcher.matches(certificate):
                return Caller(certificate, entry_kind, client)
        return Caller(certificate)

def _every(config: ClientsConfig) -> Iterator[tuple[Kind, int, Client]]:
    """Every configured client with its kind and index (``clients.<kind>[<index>]`` in messages)."""
    groups: Sequence[tuple[Kind, Sequence[Client]]] = (("tlb", config.tlb), ("xca", config.xca),
                                                       ("mitz", config.mitz))
    for kind, clients in groups:
        for i, client in enumerate(clients):
            yield kind, i, client


def _matcher(match: CertificateMatch) -> _Matcher:
    if match.cert_file is not None:
        return _Matcher(match, fingerprint_of_pem(match.cert_file.read_bytes()))
    return _Matcher(match, match.sha256)


def directory_problems(config: ClientsConfig) -> list[str]:
    """Entries that cannot be matched to anything: ``check-config`` prints them, ``serve`` refuses them."""
    problems: list[str] = []
    seen: dict[tuple[object, ...], str] = {}
    for kind, i, client in _every(config):
        # One certificate may be a client of two kinds, never twice of one (the first would always win).
        where = f"clients.{kind}[{i}] ({client.name})"
        m = client.certificate
        key: tuple[object, ...]
        if m.cert_file is not None:
            try:
                key = (kind, "sha256", fingerprint_of_pem(m.cert_file.read_bytes()))
            except OSError as exc:
                problems.append(f"{where}: certificate.cert_file {m.cert_file}: {exc.strerror or exc}")
                continue
            except ValueError:
                problems.append(f"{where}: certificate.cert_file {m.cert_file} is not a PEM certificate")
                continue
        elif m.sha256 is not None:
            key = (kind, "sha256", m.sha256)
        elif m.absent:
            key = (kind, "absent")
        else:
            key = (kind, "name", m.issuer, m.subject, m.ura)
        if key in seen:
            problems.append(f"{where}: matches the same certificate as {seen[key]}; "
                            f"the first entry would always win")
        else:
            seen[key] = where
        pinned = (("signing_certs", client.signing_certs) if isinstance(client, XcaPeer) else
                  ("assertion_signing_certs", client.assertion_signing_certs) if isinstance(client, TlbClient)
                  else ("", []))
        key_name, paths = pinned
        for path in paths:
            try:
                x509.load_pem_x509_certificates(path.read_bytes())
            except OSError as exc:
                problems.append(f"{where}: {key_name} {path}: {exc.strerror or exc}")
            except ValueError:
                problems.append(f"{where}: {key_name} {path} holds no PEM certificate")
    return problems


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def listener_problem(config: DuoConfig) -> str | None:
    """A non-loopback listener without mTLS serves patient data to callers it cannot tell apart.

    Without a client certificate every caller looks alike: the only client it could be matched to is
    one configured with ``certificate.absent``, i.e. anyone who can reach the port. Allowed only with
    ``allow_insecure`` (a proxy in front authenticates every caller).
    """
    http = config.listeners.http
    mtls = http.tls is not None and http.tls.client_auth == "required"
    if mtls or http.allow_insecure or is_loopback(http.host):
        return None
    return (f"listeners.http on {http.host} serves the TLB and XCA routes without mTLS: set "
            f"listeners.http.tls with client_auth = \"required\", bind it to loopback, or set "
            f"listeners.http.allow_insecure = true if a proxy in front authenticates every caller")


def access_problems(config: DuoConfig) -> list[str]:
    """Everything about who may call DUO that cannot work: ``check-config`` lists, ``serve`` refuses."""
    problems = directory_problems(config.clients)
    listener = listener_problem(config)
    if listener is not None:
        problems.append(listener)
    http_tls = config.listeners.http.tls
    requires_cert = http_tls is not None and http_tls.client_auth == "required"
    destinations = {d.name for d in config.transfers.destinations}
    for kind, i, client in _every(config.clients):
        where = f"clients.{kind}[{i}] ({client.name})"
        if client.certificate.absent and requires_cert:
            problems.append(f"{where}: certificate.absent never matches: listeners.http requires a "
                            f"client certificate")
        if isinstance(client, TlbClient):
            unknown = sorted(set(client.destinations or ()) - destinations)
            if unknown:
                problems.append(f"{where}: destinations not in transfers.destinations: "
                                f"{', '.join(unknown)}")
        if isinstance(client, XcaPeer) and client.home_community_id == config.gateway.home_community_id:
            problems.append(f"{where}: home_community_id is DUO's own")
    return problems
