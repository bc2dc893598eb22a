"""XML-DSig checked against two independent implementations, and against the attacks it must refuse.

xmlsec1 (libxmlsec1, C) and signxml (Python) are the peers: our signatures must verify with both,
theirs must verify with ours. Keys are RSA because PKIoverheid is RSA-only; one ECDSA round trip
checks the r||s encoding. The negative cases each assert the *reason*, so a test cannot pass
because verification failed for some unrelated cause.
"""

from __future__ import annotations

import base64
import copy
import datetime as dt
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from cryptography.x509.oid import NameOID
from lxml import etree
from signxml.algorithms import DigestAlgorithm, SignatureMethod
from signxml.signer import XMLSigner
from signxml.verifier import SignatureConfiguration, XMLVerifier

from duo_gateway import xmldsig
from duo_gateway.mitz.xacml import XACML_NS, XACML_SAML_NS, ClosedQuestion, build_closed_question
from duo_gateway.mitz.xcpd import OpenQuestion, build_assertion, build_open_question
from duo_gateway.saml import HL7_NS, SAML_NS, WSSE_NS
from duo_gateway.soap.xml import parse_xml, to_bytes
from duo_gateway.xmldsig import (
    DS_NS,
    ENVELOPED_SIGNATURE,
    EXC_C14N,
    RSA_SHA1,
    RSA_SHA256,
    SAML_ID,
    SHA1,
    SHA256,
    XML_ID,
    PrivateKey,
    SignatureError,
    TrustStore,
    VerifiedSignature,
    load_signing_pair,
    sign,
    verify,
)
from tests.support.pki import Pki, make_pki

FIXTURES = Path(__file__).parent / "fixtures" / "xmldsig"
SAML_ASSERTION = f"{{{SAML_NS}}}Assertion"
SAML_ISSUER = f"{{{SAML_NS}}}Issuer"
DS_SIGNATURE = f"{{{DS_NS}}}Signature"
NS = {"ds": DS_NS, "saml2": SAML_NS, "q": XACML_SAML_NS, "x": XACML_NS,
      "h": HL7_NS, "wsse": WSSE_NS}
#: xmlsec1 only resolves xml:id natively; SAML's ID attribute must be declared per element type.
XMLSEC_SAML_ID = ["--id-attr:ID", "urn:oasis:names:tc:SAML:2.0:assertion:Assertion"]

CLOSED = ClosedQuestion(bsn="900186021", holder_ura="00000659", holder_type="Z3",
                        requester_uzi="000095254", requester_role="01.015", requester_ura="00000666",
                        requester_type="Z3")
OPEN = OpenQuestion(bsn="900186021", requester_uzi="000095254", requester_role="01.039",
                    requester_ura="00000666", requester_type="V6",
                    issuer="urn:oid:2.16.528.1.1007.99.9999")
CLOSED_URL = "https://mitz.test/tst-us/mitz/geslotenautorisatievraag/xacml3"
OPEN_URL = "https://mitz.test/tst-us/mitz/openautorisatievraag"
MESSAGE_ID = "urn:uuid:11111111-2222-4333-8444-555555555555"

Signer = tuple[PrivateKey, list[x509.Certificate]]


# --------------------------------------------------------------------------------------------------
# Fixtures and helpers
# --------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rsa_pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("rsa-pki"), key_type="rsa")


@pytest.fixture(scope="module")
def signer(rsa_pki: Pki) -> Signer:
    return load_signing_pair(rsa_pki.client.key, rsa_pki.client.cert)


@pytest.fixture(scope="module")
def store(rsa_pki: Pki) -> TrustStore:
    return TrustStore.from_pem_files([rsa_pki.ca_cert])


@pytest.fixture
def now() -> dt.datetime:
    # The throwaway PKI is valid from five minutes ago until tomorrow.
    return dt.datetime.now(dt.UTC)


@pytest.fixture(scope="session")
def xmlsec1() -> str:
    path = shutil.which("xmlsec1")
    if path is None:
        msg = ("xmlsec1 CLI not found (Debian package xmlsec1): the checks against an independent "
               "XML-DSig implementation did NOT run")
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    return path


def run_xmlsec1(xmlsec1: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([xmlsec1, *args], capture_output=True, text=True, timeout=60, check=False)


def xmlsec1_verify(xmlsec1: str, doc: bytes, trusted_pem: Path, tmp_path: Path, *extra: str) -> None:
    path = tmp_path / "to-verify.xml"
    path.write_bytes(doc)
    result = run_xmlsec1(xmlsec1, "--verify", "--trusted-pem", str(trusted_pem), *extra, str(path))
    assert result.returncode == 0, result.stderr
    assert "SignedInfo References (ok/all): 1/1" in result.stderr + result.stdout


def closed_question() -> tuple[etree._Element, etree._Element, etree._Element]:
    """(envelope, XACMLAuthzDecisionQuery, Request) of a real closed question, parsed as a peer would."""
    root = parse_xml(build_closed_question(CLOSED, CLOSED_URL, MESSAGE_ID))
    query = root.find(".//q:XACMLAuthzDecisionQuery", NS)
    assert query is not None
    request = query.find("x:Request", NS)
    assert request is not None
    return root, query, request


def assertion(now: dt.datetime, assertion_id: str = "_4f1c0ffee") -> etree._Element:
    return build_assertion(OPEN, now, assertion_id)


def sign_assertion(signer: Signer, now: dt.datetime, digest: xmldsig.DigestName = "sha256") -> bytes:
    """Signed where the SAML schema puts the signature: right after Issuer."""
    a = assertion(now)
    sign(a, a, signer[0], signer[1], digest=digest, id_attribute=SAML_ID, position=1)
    return to_bytes(a)


def signature_of(el: etree._Element) -> etree._Element:
    sig = el.find("ds:Signature", NS)
    assert sig is not None
    return sig


def verify_assertion(data: bytes, store: TrustStore, now: dt.datetime, **kwargs: Any) -> VerifiedSignature:
    """What the XUA consumer will do: parse untrusted bytes, take the assertion, check its signature."""
    root = parse_xml(data)
    a = root if root.tag == SAML_ASSERTION else root.find(".//wsse:Security/saml2:Assertion", NS)
    assert a is not None
    return verify(signature_of(a), expected_referenced=a, id_attribute=SAML_ID, trusted=store, now=now,
                  **kwargs)


def issue(ca_cert: Path, ca_key: Path | None, cn: str, not_before: dt.datetime,
          not_after: dt.datetime) -> tuple[rsa.RSAPrivateKey, x509.Certificate]:
    assert ca_key is not None
    issuer = x509.load_pem_x509_certificate(ca_cert.read_bytes())
    signing_key = serialization.load_pem_private_key(ca_key.read_bytes(), password=None)
    assert isinstance(signing_key, rsa.RSAPrivateKey)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder()
            .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)]))
            .issuer_name(issuer.subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .sign(signing_key, hashes.SHA256()))
    return key, cert


def make_ca(folder: Path, name: x509.Name, not_before: dt.datetime,
            not_after: dt.datetime) -> tuple[Path, Path]:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
            .sign(key, hashes.SHA256()))
    cert_path, key_path = folder / "extra-ca.pem", folder / "extra-ca.key"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                           serialization.NoEncryption()))
    return cert_path, key_path


def self_signed(cn: str, key: rsa.RSAPrivateKey, not_before: dt.datetime, not_after: dt.datetime,
                serial: int | None = None) -> x509.Certificate:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    return (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(serial or x509.random_serial_number())
            .not_valid_before(not_before).not_valid_after(not_after)
            .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
            .add_extension(x509.KeyUsage(digital_signature=True, content_commitment=True,
                                         key_encipherment=False, data_encipherment=False, key_agreement=False,
                                         key_cert_sign=False, crl_sign=False, encipher_only=False,
                                         decipher_only=False), critical=True)
            .sign(key, hashes.SHA256()))


# --------------------------------------------------------------------------------------------------
# Our signatures, checked by xmlsec1 and signxml
# --------------------------------------------------------------------------------------------------


def test_closed_question_signature_has_the_mitz_shape(signer: Signer) -> None:
    _, query, request = closed_question()
    sig = sign(query, request, *signer)
    assert query[0] is sig, "mitz.md §2.2: ds:Signature is the first child of XACMLAuthzDecisionQuery"
    request_id = request.get(XML_ID)
    assert request_id and request_id.startswith("_")
    assert sig.xpath("ds:SignedInfo/ds:Reference/@URI", namespaces=NS) == [f"#{request_id}"]
    assert sig.xpath("ds:SignedInfo/ds:CanonicalizationMethod/@Algorithm", namespaces=NS) == [EXC_C14N]
    assert sig.xpath("ds:SignedInfo/ds:SignatureMethod/@Algorithm", namespaces=NS) == [RSA_SHA256]
    # A sibling reference: the enveloped transform would be meaningless and is not claimed.
    assert sig.xpath(".//ds:Transform/@Algorithm", namespaces=NS) == [EXC_C14N]
    assert sig.xpath(".//ds:DigestMethod/@Algorithm", namespaces=NS) == [SHA256]
    certs = sig.findall("ds:KeyInfo/ds:X509Data/ds:X509Certificate", namespaces=NS)
    assert len(certs) == 1
    assert x509.load_der_x509_certificate(base64.b64decode(certs[0].text or "")) == signer[1][0]


def test_closed_question_signed_by_us_verifies_with_xmlsec1(
        signer: Signer, rsa_pki: Pki, store: TrustStore, xmlsec1: str, tmp_path: Path,
        now: dt.datetime) -> None:
    root, query, request = closed_question()
    sign(query, request, *signer)
    data = to_bytes(root)
    # No --id-attr: xmlsec1 (libxml2) knows xml:id natively, as a Mitz-side verifier would.
    xmlsec1_verify(xmlsec1, data, rsa_pki.ca_cert, tmp_path)
    # And the control: a one-attribute change must make xmlsec1 fail, or the check above proves nothing.
    tampered = data.replace(b'extension="00000666"', b'extension="00000667"')
    assert tampered != data
    (tmp_path / "tampered.xml").write_bytes(tampered)
    result = run_xmlsec1(xmlsec1, "--verify", "--trusted-pem", str(rsa_pki.ca_cert),
                         str(tmp_path / "tampered.xml"))
    assert result.returncode != 0
    # Ours agrees on the untampered document after a parse round trip.
    parsed = parse_xml(data)
    q = parsed.find(".//q:XACMLAuthzDecisionQuery", NS)
    assert q is not None
    r = q.find("x:Request", NS)
    assert r is not None
    verify(signature_of(q), expected_referenced=r, id_attribute=XML_ID, trusted=store, now=now)


def test_closed_question_signed_by_us_verifies_with_signxml(signer: Signer) -> None:
    root, query, request = closed_question()
    sign(query, request, *signer)
    result = XMLVerifier().verify(to_bytes(root), x509_cert=signer[1][0])
    assert not isinstance(result, list) and result.signed_xml is not None
    assert result.signed_xml.tag == request.tag
    assert result.signed_xml.get(XML_ID) == request.get(XML_ID)


def test_assertion_signed_by_us_verifies_with_xmlsec1_and_signxml(
        signer: Signer, rsa_pki: Pki, xmlsec1: str, tmp_path: Path, now: dt.datetime) -> None:
    data = sign_assertion(signer, now)
    a = parse_xml(data)
    assert a[0].tag == SAML_ISSUER and a[1].tag == DS_SIGNATURE
    assert a.xpath("ds:Signature//ds:Transform/@Algorithm", namespaces=NS) == [ENVELOPED_SIGNATURE, EXC_C14N]
    xmlsec1_verify(xmlsec1, data, rsa_pki.ca_cert, tmp_path, *XMLSEC_SAML_ID)
    result = XMLVerifier().verify(data, x509_cert=signer[1][0])
    assert not isinstance(result, list)
    assert result.signed_xml is not None and result.signed_xml.get("ID") == "_4f1c0ffee"


def test_sha1_assertion_for_legacy_peers_verifies_with_xmlsec1_and_signxml(
        signer: Signer, rsa_pki: Pki, xmlsec1: str, tmp_path: Path, now: dt.datetime) -> None:
    data = sign_assertion(signer, now, digest="sha1")
    a = parse_xml(data)
    assert a.xpath("ds:Signature/ds:SignedInfo/ds:SignatureMethod/@Algorithm", namespaces=NS) == [RSA_SHA1]
    assert a.xpath("ds:Signature//ds:DigestMethod/@Algorithm", namespaces=NS) == [SHA1]
    xmlsec1_verify(xmlsec1, data, rsa_pki.ca_cert, tmp_path, *XMLSEC_SAML_ID)
    config = SignatureConfiguration(signature_methods=frozenset({SignatureMethod.RSA_SHA1}),
                                    digest_algorithms=frozenset({DigestAlgorithm.SHA1}))
    result = XMLVerifier().verify(data, x509_cert=signer[1][0], expect_config=config)
    assert not isinstance(result, list) and result.signed_xml is not None


def test_ecdsa_signature_uses_the_xmldsig_encoding(
        pki: Pki, xmlsec1: str, tmp_path: Path, now: dt.datetime) -> None:
    """XML-DSig wants raw r||s, not DER; xmlsec1 only accepts the former."""
    key, chain = load_signing_pair(pki.client.key, pki.client.cert)
    a = assertion(now)
    sig = sign(a, a, key, chain, id_attribute=SAML_ID, position=1)
    assert sig.xpath("ds:SignedInfo/ds:SignatureMethod/@Algorithm", namespaces=NS) == [xmldsig.ECDSA_SHA256]
    value = base64.b64decode(sig.findtext("ds:SignatureValue", namespaces=NS) or "")
    assert len(value) == 64
    data = to_bytes(a)
    xmlsec1_verify(xmlsec1, data, pki.ca_cert, tmp_path, *XMLSEC_SAML_ID)
    verified = verify_assertion(data, TrustStore.from_pem_files([pki.ca_cert]), now)
    assert verified.signature_algorithm == xmldsig.ECDSA_SHA256


def test_signed_assertion_survives_being_moved_into_a_soap_header(
        signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """exc-c14n is what lets an assertion travel between documents: the XUA case of xca.md §11."""
    signed = parse_xml(sign_assertion(signer, now))
    envelope = parse_xml(build_open_question(OPEN, OPEN_URL, MESSAGE_ID, now))
    security = envelope.find(".//wsse:Security", NS)
    assert security is not None
    security.replace(security[0], signed)
    verified = verify_assertion(to_bytes(envelope), store, now)
    assert verified.cert == signer[1][0]


# --------------------------------------------------------------------------------------------------
# Their signatures, checked by us
# --------------------------------------------------------------------------------------------------


class _Sha1XMLSigner(XMLSigner):
    """signxml refuses SHA-1 by default; overriding its check is the documented escape hatch."""

    def check_deprecated_methods(self) -> None:
        return None


@pytest.mark.parametrize("digest", ["sha256", "sha1"])
def test_signxml_signed_assertion_verifies_with_ours(
        digest: str, signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    cls = _Sha1XMLSigner if digest == "sha1" else XMLSigner
    signxml_signer = cls(signature_algorithm=f"rsa-{digest}", digest_algorithm=digest,
                         c14n_algorithm=EXC_C14N)
    signed = signxml_signer.sign(assertion(now), key=signer[0], cert=[signer[1][0]], id_attribute="ID")
    data = etree.tostring(signed)
    verified = verify_assertion(data, store, now, allowed_digests={"sha256", "sha1"})
    assert verified.digest_algorithm == digest
    assert verified.signature_algorithm == (RSA_SHA256 if digest == "sha256" else RSA_SHA1)
    assert verified.cert == signer[1][0]
    if digest == "sha1":
        with pytest.raises(SignatureError, match="uses sha1, which is not allowed"):
            verify_assertion(data, store, now)


XMLSEC_TEMPLATE = """<ds:Signature xmlns:ds="http://www.w3.org/2000/09/xmldsig#">
  <ds:SignedInfo>
    <ds:CanonicalizationMethod Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#">{si_prefixes}</ds:CanonicalizationMethod>
    <ds:SignatureMethod Algorithm="{method}"/>
    <ds:Reference URI="#{id}">
      <ds:Transforms>
        <ds:Transform Algorithm="http://www.w3.org/2000/09/xmldsig#enveloped-signature"/>
        <ds:Transform Algorithm="http://www.w3.org/2001/10/xml-exc-c14n#">{prefixes}</ds:Transform>
      </ds:Transforms>
      <ds:DigestMethod Algorithm="{digest}"/>
      <ds:DigestValue/>
    </ds:Reference>
  </ds:SignedInfo>
  <ds:SignatureValue/>
  <ds:KeyInfo><ds:X509Data><ds:X509Certificate/></ds:X509Data></ds:KeyInfo>
</ds:Signature>"""


INCLUSIVE_XS = '<ec:InclusiveNamespaces xmlns:ec="http://www.w3.org/2001/10/xml-exc-c14n#" PrefixList="xs"/>'


@pytest.mark.parametrize(("method", "digest", "si_prefixes", "prefixes"), [
    (RSA_SHA256, SHA256, "", ""),
    (RSA_SHA1, SHA1, "", ""),
    (RSA_SHA256, SHA256, "", INCLUSIVE_XS),
    (RSA_SHA256, SHA256, INCLUSIVE_XS, ""),
], ids=["rsa-sha256", "rsa-sha1", "transform-prefix-list", "signedinfo-prefix-list"])
def test_xmlsec1_signed_assertion_verifies_with_ours(
        method: str, digest: str, si_prefixes: str, prefixes: str, signer: Signer, rsa_pki: Pki,
        store: TrustStore, xmlsec1: str, tmp_path: Path, now: dt.datetime) -> None:
    """The PrefixList variants only prove something because xs (declared on the assertion, used by no
    element or attribute name) changes the canonical form: ignoring the list would break the check."""
    a = assertion(now)
    etree.indent(a)
    template_el = parse_xml(XMLSEC_TEMPLATE.format(method=method, digest=digest, id=a.get("ID"),
                                                   si_prefixes=si_prefixes, prefixes=prefixes).encode())
    # Pretty-printed like most peers' output: the enveloped transform must drop the Signature
    # element but keep the whitespace after it, which lxml stores on the element itself (.tail).
    template_el.tail = "\n  "
    a.insert(1, template_el)
    for el in (a, a[1][0]):
        assert etree.tostring(el, method="c14n", exclusive=True) != etree.tostring(
            el, method="c14n", exclusive=True, inclusive_ns_prefixes=["xs"])
    template = tmp_path / "template.xml"
    template.write_bytes(to_bytes(a))
    out = tmp_path / "signed.xml"
    result = run_xmlsec1(xmlsec1, "--sign", "--privkey-pem", f"{rsa_pki.client.key},{rsa_pki.client.cert}",
                         *XMLSEC_SAML_ID, "--output", str(out), str(template))
    assert result.returncode == 0, result.stderr
    data = out.read_bytes()
    signed = parse_xml(data)
    assert signed.findtext(".//ds:DigestValue", namespaces=NS), "xmlsec1 did not fill the template"
    verified = verify_assertion(data, store, now, allowed_digests={"sha256", "sha1"})
    assert verified.signature_algorithm == method
    assert verified.cert == signer[1][0]


# --------------------------------------------------------------------------------------------------
# Refusals
# --------------------------------------------------------------------------------------------------


def test_positive_control(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    verified = verify_assertion(sign_assertion(signer, now), store, now)
    assert verified == VerifiedSignature(cert=signer[1][0], digest_algorithm="sha256",
                                         signature_algorithm=RSA_SHA256)


def _one(el: etree._Element, path: str) -> etree._Element:
    found = el.xpath(path, namespaces=NS)
    assert isinstance(found, list) and len(found) == 1 and isinstance(found[0], etree._Element), path
    return found[0]


def _tamper_uzi(a: etree._Element) -> None:
    uzi = _one(a, ".//saml2:Attribute[@Name='urn:ihe:iti:xua:2017:subject:provider-identifier']//h:id")
    uzi.set("extension", "000099999")


def _tamper_signed_info(a: etree._Element, pki: Pki) -> None:
    _one(a, "ds:Signature/ds:SignedInfo/ds:Reference").set("Type", "urn:example:innocent-looking")


def _cert_b64(path: Path) -> str:
    der = x509.load_pem_x509_certificate(path.read_bytes()).public_bytes(serialization.Encoding.DER)
    return base64.b64encode(der).decode()


def _swap_in_trusted_cert(a: etree._Element, pki: Pki) -> None:
    _one(a, ".//ds:X509Certificate").text = _cert_b64(pki.server.cert)


def _swap_in_rogue_cert(a: etree._Element, pki: Pki) -> None:
    _one(a, ".//ds:X509Certificate").text = _cert_b64(pki.rogue_client.cert)


def _set_algorithm(path: str, algorithm: str) -> Callable[[etree._Element, Pki], None]:
    def mutate(a: etree._Element, pki: Pki) -> None:
        _one(a, path).set("Algorithm", algorithm)
    return mutate


def _remove(path: str) -> Callable[[etree._Element, Pki], None]:
    def mutate(a: etree._Element, pki: Pki) -> None:
        el = _one(a, path)
        parent = el.getparent()
        assert parent is not None
        parent.remove(el)
    return mutate


def _retrieval_method(a: etree._Element, pki: Pki) -> None:
    key_info = _one(a, "ds:Signature/ds:KeyInfo")
    retrieval = etree.SubElement(key_info, f"{{{DS_NS}}}RetrievalMethod")
    retrieval.set("URI", "http://127.0.0.1:9/key.der")


def _second_reference(a: etree._Element, pki: Pki) -> None:
    reference = _one(a, "ds:Signature/ds:SignedInfo/ds:Reference")
    reference.addnext(copy.deepcopy(reference))


def _object(a: etree._Element, pki: Pki) -> None:
    etree.SubElement(signature_of(a), f"{{{DS_NS}}}Object").text = "payload"


def _prefix_list(value: str) -> Callable[[etree._Element, Pki], None]:
    def mutate(a: etree._Element, pki: Pki) -> None:
        c14n = _one(a, "ds:Signature/ds:SignedInfo/ds:CanonicalizationMethod")
        etree.SubElement(c14n, f"{{{EXC_C14N}}}InclusiveNamespaces").set("PrefixList", value)
    return mutate


def _uri(value: str) -> Callable[[etree._Element, Pki], None]:
    def mutate(a: etree._Element, pki: Pki) -> None:
        _one(a, "ds:Signature/ds:SignedInfo/ds:Reference").set("URI", value)
    return mutate


REFUSALS: list[tuple[str, Callable[[etree._Element, Pki], None], str]] = [
    ("tampered attribute value", lambda a, _: _tamper_uzi(a), "DigestValue does not match"),
    ("tampered SignedInfo", _tamper_signed_info, "SignatureValue does not verify"),
    ("another trusted certificate", _swap_in_trusted_cert, "SignatureValue does not verify"),
    ("untrusted certificate", _swap_in_rogue_cert, r"not trusted \(no trusted CA named CN=rogue-ca\)"),
    ("unknown transform", _set_algorithm("ds:Signature//ds:Transform[2]",
                                         "http://www.w3.org/TR/1999/REC-xpath-19991116"),
     "transform http://www.w3.org/TR/1999/REC-xpath-19991116 is not allowed"),
    ("inclusive c14n transform", _set_algorithm("ds:Signature//ds:Transform[2]",
                                                "http://www.w3.org/TR/2001/REC-xml-c14n-20010315"),
     "is not allowed"),
    ("missing enveloped transform", _remove("ds:Signature//ds:Transform[1]"),
     "enveloped-signature transform is missing"),
    ("no Transforms", _remove("ds:Signature//ds:Transforms"), "Reference has no Transforms"),
    ("WithComments transform",
     _set_algorithm("ds:Signature//ds:Transform[2]", xmldsig.EXC_C14N_WITH_COMMENTS),
     "transform exc-c14n#WithComments is refused"),
    ("WithComments canonicalization", _set_algorithm("ds:Signature/ds:SignedInfo/ds:CanonicalizationMethod",
                                                     xmldsig.EXC_C14N_WITH_COMMENTS),
     "canonicalization exc-c14n#WithComments is refused"),
    ("HMAC signature method", _set_algorithm("ds:Signature/ds:SignedInfo/ds:SignatureMethod",
                                             "http://www.w3.org/2000/09/xmldsig#hmac-sha1"),
     "SignatureMethod http://www.w3.org/2000/09/xmldsig#hmac-sha1 is not allowed"),
    ("md5 digest", _set_algorithm("ds:Signature//ds:DigestMethod", "http://www.w3.org/2001/04/xmldsig-more#md5"),
     "DigestMethod http://www.w3.org/2001/04/xmldsig-more#md5 is not supported"),
    ("missing KeyInfo", _remove("ds:Signature/ds:KeyInfo"), "KeyInfo is missing"),
    ("KeyInfo RetrievalMethod", _retrieval_method, "RetrievalMethod is refused"),
    ("two References", _second_reference, "exactly one Reference is required, found 2"),
    ("ds:Object", _object, "no ds:Object"),
    ("#default prefix", _prefix_list("#default"), "'#default' in InclusiveNamespaces PrefixList"),
    ("whole-document reference", _uri(""), "is not a same-document '#id' reference"),
    ("xpointer reference", _uri("#xpointer(/)"), "XPointer references are not allowed"),
    ("missing SignatureValue", _remove("ds:Signature/ds:SignatureValue"),
     "must start with SignedInfo and SignatureValue"),
]


@pytest.mark.parametrize(("mutate", "reason"), [(m, r) for _, m, r in REFUSALS],
                         ids=[name for name, _, _ in REFUSALS])
def test_refusal(mutate: Callable[[etree._Element, Pki], None], reason: str, signer: Signer, rsa_pki: Pki,
                 store: TrustStore, now: dt.datetime) -> None:
    a = parse_xml(sign_assertion(signer, now))
    verify_assertion(to_bytes(a), store, now)
    mutate(a, rsa_pki)
    with pytest.raises(SignatureError, match=reason) as info:
        verify_assertion(to_bytes(a), store, now)
    assert info.value.reason == str(info.value)


def test_sha1_is_refused_unless_allowed(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    data = sign_assertion(signer, now, digest="sha1")
    with pytest.raises(SignatureError, match="rsa-sha1 uses sha1, which is not allowed"):
        verify_assertion(data, store, now)
    assert verify_assertion(data, store, now, allowed_digests={"sha1"}).digest_algorithm == "sha1"


def test_sha1_reference_digest_alone_is_refused(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """The digest and the signature hash are checked separately: rsa-sha256 over a sha1 digest still fails."""
    a = assertion(now)
    sign(a, a, signer[0], signer[1], digest="sha1", id_attribute=SAML_ID, position=1)
    _one(a, "ds:Signature/ds:SignedInfo/ds:SignatureMethod").set("Algorithm", RSA_SHA256)
    with pytest.raises(SignatureError, match="digest sha1 is not allowed"):
        verify_assertion(to_bytes(a), store, now)


def test_rogue_ca_signature_is_refused(rsa_pki: Pki, store: TrustStore, now: dt.datetime) -> None:
    rogue = load_signing_pair(rsa_pki.rogue_client.key, rsa_pki.rogue_client.cert)
    data = sign_assertion(rogue, now)
    # Cryptographically perfect, and trusted by whoever trusts the rogue CA ...
    verify_assertion(data, TrustStore.from_pem_files([rsa_pki.rogue_ca_cert]), now)
    # ... but not by us.
    with pytest.raises(SignatureError, match=r"CN=rogue-client is not trusted"):
        verify_assertion(data, store, now)


def test_forged_issuer_name_is_refused(rsa_pki: Pki, store: TrustStore, now: dt.datetime,
                                       tmp_path: Path) -> None:
    """A self-made CA that copies our CA's name must fail on the issuer's signature, not on the name."""
    real_ca = x509.load_pem_x509_certificate(rsa_pki.ca_cert.read_bytes())
    fake_ca, fake_ca_key = make_ca(tmp_path, real_ca.subject, now - dt.timedelta(hours=1),
                                   now + dt.timedelta(days=1))
    key, cert = issue(fake_ca, fake_ca_key, "impostor", now - dt.timedelta(hours=1),
                      now + dt.timedelta(days=1))
    with pytest.raises(SignatureError,
                       match=r"CN=impostor is not trusted \(not signed by trusted CN=duo-test-ca\)"):
        verify_assertion(sign_assertion((key, [cert]), now), store, now)


def test_certificate_issued_by_a_trusted_non_ca_is_refused(rsa_pki: Pki, now: dt.datetime) -> None:
    """Trusting a peer's own certificate must not let that peer mint further signing certificates."""
    key, cert = issue(rsa_pki.server.cert, rsa_pki.server.key, "minted-by-a-leaf",
                      now - dt.timedelta(minutes=4), now + dt.timedelta(hours=1))
    leaf_store = TrustStore.from_pem_files([rsa_pki.server.cert])
    with pytest.raises(SignatureError,
                       match=r"CN=minted-by-a-leaf is not trusted \(trusted CN=server is not a CA\)"):
        verify_assertion(sign_assertion((key, [cert]), now), leaf_store, now)


def test_expired_issuing_ca_is_refused(tmp_path: Path, now: dt.datetime) -> None:
    """A leaf that outlives its CA (sloppy issuance) must not outlive the CA's trust."""
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "short-lived-ca")])
    ca, ca_key = make_ca(tmp_path, name, now - dt.timedelta(days=2), now - dt.timedelta(days=1))
    key, cert = issue(ca, ca_key, "outlives-its-ca", now - dt.timedelta(days=2), now + dt.timedelta(days=1))
    data = sign_assertion((key, [cert]), now)
    with pytest.raises(SignatureError, match="issuing CA certificate CN=short-lived-ca expired at"):
        verify_assertion(data, TrustStore.from_pem_files([ca]), now)
    verify_assertion(data, TrustStore.from_pem_files([ca]), now - dt.timedelta(days=1, hours=12))


def test_expired_certificate_is_refused(rsa_pki: Pki, store: TrustStore, now: dt.datetime) -> None:
    # The test CA itself only exists since five minutes ago, so the leaf lived a few minutes.
    key, cert = issue(rsa_pki.ca_cert, rsa_pki.ca_key, "expired", now - dt.timedelta(minutes=4),
                      now - dt.timedelta(minutes=1))
    data = sign_assertion((key, [cert]), now)
    with pytest.raises(SignatureError, match="signing certificate CN=expired expired at"):
        verify_assertion(data, store, now)
    # The same signature was fine while the certificate was valid: the window is what failed.
    verify_assertion(data, store, now - dt.timedelta(minutes=2))


def test_not_yet_valid_certificate_is_refused(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    with pytest.raises(SignatureError, match="signing certificate CN=client is not valid before"):
        verify_assertion(sign_assertion(signer, now), store, now - dt.timedelta(days=1))


def test_pinned_self_signed_certificate(store: TrustStore, now: dt.datetime) -> None:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed("pinned-peer", key, now - dt.timedelta(hours=1), now + dt.timedelta(days=1))
    data = sign_assertion((key, [cert]), now)
    assert verify_assertion(data, TrustStore((cert,)), now).cert == cert
    with pytest.raises(SignatureError, match="CN=pinned-peer is not trusted"):
        verify_assertion(data, store, now)


def test_signature_wrapping_with_a_duplicate_id_is_refused(
        signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """XSW: the consumer reads an altered copy; the original, still carrying the ID, hides inside it."""
    original = parse_xml(sign_assertion(signer, now))
    sig = signature_of(original)
    original.remove(sig)
    evil = copy.deepcopy(original)
    _tamper_uzi(evil)
    evil.insert(1, sig)
    advice = etree.SubElement(evil, f"{{{SAML_NS}}}Advice")
    advice.append(original)
    evil = parse_xml(to_bytes(evil))
    with pytest.raises(SignatureError, match="id '_4f1c0ffee' is carried by 2 elements"):
        verify(signature_of(evil), expected_referenced=evil, id_attribute=SAML_ID, trusted=store, now=now)
    # Control: the signature is genuine for the hidden original; a verifier that resolved the id to
    # it (as first-come or last-come id tables do) would have accepted the altered outer assertion.
    hidden = evil.find("saml2:Advice/saml2:Assertion", NS)
    assert hidden is not None
    del evil.attrib["ID"]
    verify(signature_of(evil), expected_referenced=hidden, id_attribute=SAML_ID, trusted=store, now=now)


def test_signature_wrapping_with_a_reference_elsewhere_is_refused(
        signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """XSW: the signature sits in the assertion the consumer reads but vouches for a different one."""
    original = parse_xml(sign_assertion(signer, now))
    sig = signature_of(original)
    original.remove(sig)
    evil = copy.deepcopy(original)
    evil.set("ID", "_evil")
    _tamper_uzi(evil)
    evil.insert(1, sig)
    etree.SubElement(evil, f"{{{SAML_NS}}}Advice").append(original)
    evil = parse_xml(to_bytes(evil))
    with pytest.raises(SignatureError,
                       match=r"Reference URI '#_4f1c0ffee' does not point at the expected element"):
        verify(signature_of(evil), expected_referenced=evil, id_attribute=SAML_ID, trusted=store, now=now)
    hidden = evil.find("saml2:Advice/saml2:Assertion", NS)
    assert hidden is not None
    # Control: the signature really is valid over the hidden original, which is why binding matters.
    verify(signature_of(evil), expected_referenced=hidden, id_attribute=SAML_ID, trusted=store, now=now)


def test_duplicate_xml_id_in_closed_question_is_refused(signer: Signer, store: TrustStore,
                                                        now: dt.datetime) -> None:
    _, query, request = closed_question()
    sig = sign(query, request, *signer)
    decoy = etree.SubElement(query, f"{{{XACML_NS}}}Request")
    decoy.set(XML_ID, request.get(XML_ID) or "")
    with pytest.raises(SignatureError, match="is carried by 2 elements"):
        verify(sig, expected_referenced=request, id_attribute=XML_ID, trusted=store, now=now)


def test_signature_from_another_document_is_refused(signer: Signer, store: TrustStore,
                                                    now: dt.datetime) -> None:
    a = parse_xml(sign_assertion(signer, now))
    other = parse_xml(to_bytes(a))
    with pytest.raises(SignatureError, match="not in the same document"):
        verify(signature_of(a), expected_referenced=other, id_attribute=SAML_ID, trusted=store, now=now)


def test_comment_injection(signer: Signer, store: TrustStore, now: dt.datetime) -> None:
    """The 2018 SAML attack: a comment splits a signed text node, the digest ignores it, .text stops at it."""
    q = replace(OPEN, issuer="urn:oid:2.999.12")
    a = build_assertion(q, now, "_c")
    sign(a, a, signer[0], signer[1], id_attribute=SAML_ID, position=1)
    injected = to_bytes(a).replace(b">urn:oid:2.999.12<", b">urn:oid:2.999.1<!---->2<")
    assert injected != to_bytes(a)

    naive = etree.fromstring(injected, etree.XMLParser(resolve_entities=False, no_network=True))
    assert naive.findtext("saml2:Issuer", namespaces=NS) == "urn:oid:2.999.1"
    # The digest really does not see the comment, so only the explicit refusal stops this:
    assert XMLVerifier().verify(injected, x509_cert=signer[1][0]) is not None
    with pytest.raises(SignatureError, match="contains an XML comment"):
        verify(signature_of(naive), expected_referenced=naive, id_attribute=SAML_ID, trusted=store, now=now)

    # The project's parser drops comments and rejoins the text, so the signed value is what is read.
    hardened = parse_xml(injected)
    assert hardened.findtext("saml2:Issuer", namespaces=NS) == "urn:oid:2.999.12"
    verify(signature_of(hardened), expected_referenced=hardened, id_attribute=SAML_ID, trusted=store, now=now)


# --------------------------------------------------------------------------------------------------
# Signer edge cases
# --------------------------------------------------------------------------------------------------


def test_sign_refuses_a_key_that_does_not_match_the_certificate(rsa_pki: Pki, signer: Signer) -> None:
    _, query, request = closed_question()
    server_cert = x509.load_pem_x509_certificate(rsa_pki.server.cert.read_bytes())
    with pytest.raises(ValueError, match="does not belong"):
        sign(query, request, signer[0], server_cert)
    assert query.find("ds:Signature", NS) is None
    assert request.get(XML_ID) is None


def test_sign_refuses_an_ambiguous_id(signer: Signer) -> None:
    _, query, request = closed_question()
    request.set(XML_ID, "resource")  # already used by the first Attributes block
    with pytest.raises(ValueError, match="carried by 2 elements"):
        sign(query, request, *signer)


def test_sign_keeps_an_existing_id_and_honours_position(signer: Signer, store: TrustStore,
                                                        now: dt.datetime) -> None:
    _, query, request = closed_question()
    request.set(XML_ID, "_given")
    sig = sign(query, request, *signer, position=1)
    assert query[1] is sig and request.get(XML_ID) == "_given"
    verify(sig, expected_referenced=request, id_attribute=etree.QName(XML_ID), trusted=store, now=now)


def test_load_signing_pair_puts_the_leaf_first(rsa_pki: Pki, tmp_path: Path) -> None:
    bundle = tmp_path / "chain.pem"
    bundle.write_bytes(rsa_pki.ca_cert.read_bytes() + rsa_pki.client.cert.read_bytes())
    key, chain = load_signing_pair(rsa_pki.client.key, bundle)
    assert chain[0].public_key() == key.public_key()
    assert [c.subject.rfc4514_string() for c in chain] == ["CN=client", "CN=duo-test-ca"]
    with pytest.raises(ValueError, match="holds no certificate for the key"):
        load_signing_pair(rsa_pki.client.key, rsa_pki.ca_cert)


# --------------------------------------------------------------------------------------------------
# Golden fixture: RSA PKCS#1 v1.5 is deterministic, so the signed bytes must never drift
# --------------------------------------------------------------------------------------------------

GOLDEN_KEY = FIXTURES / "golden-key.pem"
GOLDEN_CERT = FIXTURES / "golden-cert.pem"
GOLDEN_SIGNED = FIXTURES / "closed-question-signed.xml"
GOLDEN_REQUEST_ID = "_golden-request"
GOLDEN_NOW = dt.datetime(2026, 3, 4, 10, 15, 30, tzinfo=dt.UTC)


def golden_signed_bytes() -> bytes:
    root, query, request = closed_question()
    request.set(XML_ID, GOLDEN_REQUEST_ID)
    key, chain = load_signing_pair(GOLDEN_KEY, GOLDEN_CERT)
    sign(query, request, key, chain)
    return to_bytes(root)


def test_golden_signed_closed_question_is_byte_stable() -> None:
    assert golden_signed_bytes() == GOLDEN_SIGNED.read_bytes(), (
        "signed XACML bytes changed; if intended, regenerate with `python -m tests.test_xmldsig`")


def test_golden_signed_closed_question_verifies(xmlsec1: str, tmp_path: Path) -> None:
    data = GOLDEN_SIGNED.read_bytes()
    xmlsec1_verify(xmlsec1, data, GOLDEN_CERT, tmp_path)
    root = parse_xml(data)
    query = root.find(".//q:XACMLAuthzDecisionQuery", NS)
    assert query is not None
    request = query.find("x:Request", NS)
    assert request is not None
    verified = verify(signature_of(query), expected_referenced=request, id_attribute=XML_ID,
                      trusted=TrustStore.from_pem_files([GOLDEN_CERT]), now=GOLDEN_NOW)
    assert verified.cert.subject.rfc4514_string() == "CN=duo-xmldsig-golden"


def _regenerate_golden() -> None:
    """Write a fresh key, a long-lived self-signed certificate and the expected signed bytes."""
    FIXTURES.mkdir(parents=True, exist_ok=True)
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    cert = self_signed("duo-xmldsig-golden", key, dt.datetime(2025, 1, 1, tzinfo=dt.UTC),
                       dt.datetime(2045, 1, 1, tzinfo=dt.UTC), serial=20260304)
    GOLDEN_KEY.write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                             serialization.NoEncryption()))
    GOLDEN_CERT.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    GOLDEN_SIGNED.write_bytes(golden_signed_bytes())


if __name__ == "__main__":
    if "--regenerate-golden" not in sys.argv:
        sys.exit("usage: python -m tests.test_xmldsig --regenerate-golden  (test-only key, never a real one)")
    _regenerate_golden()
