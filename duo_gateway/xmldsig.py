"""W3C XML Signature 1.0, reduced to the one profile the gateway needs, signing and verifying.

Two callers: the optional signature over the Mitz closed question (mitz.md §2.2: ``ds:Signature`` as
first child of ``XACMLAuthzDecisionQuery``, a sibling reference to the ``Request`` by ``xml:id``) and
XUA assertions (xca.md §11: an enveloped signature inside ``saml2:Assertion``). Both use exclusive
canonicalisation, one Reference, RSA with SHA-256 (SHA-1 only for the peers of xca.md §13.2).

The general standard is a famous source of vulnerabilities (signature wrapping, comment injection,
key retrieval, transform-based denial of service), and general libraries accept all of it by
default. This module is deliberately narrow instead: the verifier accepts exactly the profile the
signer produces plus what real peers are known to send, refuses everything else with a precise
:class:`SignatureError`, never fetches anything, and is told by its caller *which* element the
caller is going to trust, so "valid signature over some other element" cannot happen.

Canonicalisation is libxml2's exclusive C14N 1.0 through lxml, used identically on both sides.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import hmac
import os
import uuid
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Final, Literal, TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature, UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature, encode_dss_signature
from lxml import etree

from duo_gateway.saml import WSU_NS
from duo_gateway.soap.xml import XML_NS, qname

DS_NS: Final = "http://www.w3.org/2000/09/xmldsig#"
EXC_C14N: Final = "http://www.w3.org/2001/10/xml-exc-c14n#"
EXC_C14N_WITH_COMMENTS: Final = "http://www.w3.org/2001/10/xml-exc-c14n#WithComments"
ENVELOPED_SIGNATURE: Final = "http://www.w3.org/2000/09/xmldsig#enveloped-signature"
RSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#rsa-sha256"
RSA_SHA1: Final = "http://www.w3.org/2000/09/xmldsig#rsa-sha1"
ECDSA_SHA256: Final = "http://www.w3.org/2001/04/xmldsig-more#ecdsa-sha256"
SHA256: Final = "http://www.w3.org/2001/04/xmlenc#sha256"
SHA1: Final = "http://www.w3.org/2000/09/xmldsig#sha1"

#: ``xml:id``, the id attribute of the XACML request (mitz.md §2.2).
XML_ID: Final = qname(XML_NS, "id")
#: The id attribute of a SAML 2.0 assertion.
SAML_ID: Final = "ID"
_WSU_ID: Final = qname(WSU_NS, "Id")

DigestName = Literal["sha256", "sha1"]
PrivateKey: TypeAlias = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey
IdAttribute: TypeAlias = str | etree.QName

_DIGEST_BY_URI: Final[dict[str, DigestName]] = {SHA256: "sha256", SHA1: "sha1"}
_DIGEST_URI: Final[dict[DigestName, str]] = {"sha256": SHA256, "sha1": SHA1}
_KeyKind = Literal["rsa", "ec"]
_SIGNATURE_METHODS: Final[dict[str, tuple[_KeyKind, DigestName]]] = {
    RSA_SHA256: ("rsa", "sha256"),
    RSA_SHA1: ("rsa", "sha1"),
    ECDSA_SHA256: ("ec", "sha256"),
}
#: Anything smaller is breakable or a configuration mistake; PKIoverheid issues 2048 bits and up.
MIN_RSA_BITS: Final = 2048

#: Attributes some XML-DSig implementation resolves ``URI="#…"`` against. An id value that appears
#: under any of them more than once is ambiguous: another verifier might resolve it to a different
#: element than we did, which is how signature wrapping works.
_ID_LIKE_ATTRIBUTES: Final = frozenset({"ID", "Id", "id", XML_ID, _WSU_ID})


def _ds(local: str) -> str:
    return qname(DS_NS, local)


def _hash(name: DigestName) -> hashes.HashAlgorithm:
    return hashes.SHA256() if name == "sha256" else hashes.SHA1()  # noqa: S303 - only when a peer needs it


def _digest(name: DigestName, data: bytes) -> bytes:
    return hashlib.sha256(data).digest() if name == "sha256" else hashlib.sha1(data).digest()  # noqa: S324


class SignatureError(Exception):
    """A signature is absent, malformed, outside the accepted profile, untrusted or wrong.

    ``reason`` is meant for logs and for the SOAP fault text (wsse:InvalidSecurity / FailedCheck):
    it names what was refused and never contains signed content.
    """

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class VerifiedSignature:
    """What a caller may rely on after :func:`verify`: who signed, and with how strong a hash."""

    cert: x509.Certificate
    digest_algorithm: DigestName
    #: The SignatureMethod URI, e.g. :data:`RSA_SHA256`.
    signature_algorithm: str


@dataclass(frozen=True)
class TrustStore:
    """Certificates a signer may present (pinned) and CAs that may issue them.

    Trust is one level deep on purpose: a signing certificate is accepted when it is itself in the
    store or is directly issued by a CA in the store. Intermediates that arrive in ``KeyInfo`` are
    never used to build a path, so a peer cannot bring its own chain; put the issuing CA (e.g. the
    UZI-register CA of PKIoverheid) in the store instead.

    ``pinned=True`` is the mode for XUA issuers: only the listed certificates themselves sign, never
    anything a CA issued. A CA issues TLS certificates to every system of the network (DUO's own
    server certificate included), so "chains to the CA" would let any of those keys speak for any
    issuer. A pinned store refuses CA certificates (neither listed nor as the signer, since a CA key
    signing assertions is a CA doing what it must not) and wants ``digitalSignature`` in a KeyUsage:
    an assertion signature authenticates its origin, which is not what ``nonRepudiation`` is for.
    """

    certificates: tuple[x509.Certificate, ...]
    pinned: bool = False

    def __post_init__(self) -> None:
        if not self.certificates:
            raise ValueError("a TrustStore needs at least one certificate")
        if self.pinned:
            for cert in self.certificates:
                if _is_ca(cert) or _claims_ca(cert):
                    raise ValueError(f"{_describe(cert)} is a CA certificate: pin the signing certificates "
                                     "themselves, not their CA")

    @classmethod
    def from_pem_files(cls, paths: Iterable[str | os.PathLike[str]], *, pinned: bool = False) -> TrustStore:
        certs: list[x509.Certificate] = []
        for path in paths:
            with open(path, "rb") as f:
                data = f.read()
            found = x509.load_pem_x509_certificates(data)
            certs.extend(found)
        return cls(tuple(certs), pinned=pinned)


# --------------------------------------------------------------------------------------------------
# Canonicalisation shared by signer and verifier
# --------------------------------------------------------------------------------------------------


def _exc_c14n(element: etree._Element, prefixes: Sequence[str] = ()) -> bytes:
    # lxml canonicalises a subtree in its document context: ancestors' namespace declarations are
    # visible, so an InclusiveNamespaces prefix declared on e.g. the SOAP Envelope is honoured.
    return etree.tostring(element, method="c14n", exclusive=True, with_comments=False,
                          inclusive_ns_prefixes=list(prefixes) or None)


def _index_path(element: etree._Element) -> list[int]:
    path: list[int] = []
    node = element
    parent = node.getparent()
    while parent is not None:
        path.append(parent.index(node))
        node, parent = parent, parent.getparent()
    path.reverse()
    return path


def _follow(root: etree._Element, path: Sequence[int]) -> etree._Element:
    node = root
    for i in path:
        node = node[i]
    return node


def _detach_keeping_tail(element: etree._Element) -> None:
    """Remove one node as XPath would: lxml carries ``.tail`` along, but that text is not ours."""
    parent = element.getparent()
    assert parent is not None
    tail, element.tail = element.tail, None
    if tail:
        previous = element.getprevious()
        if previous is not None:
            previous.tail = (previous.tail or "") + tail
        else:
            parent.text = (parent.text or "") + tail
    parent.remove(element)


def _reference_octets(referenced: etree._Element, signature: etree._Element, enveloped: bool,
                      prefixes: Sequence[str]) -> bytes:
    """The referenced element after the transforms: [enveloped-signature,] exc-c14n.

    The enveloped transform runs on a deep copy of the whole document (not of the subtree) so the
    caller's tree is never mutated and in-scope namespace declarations above ``referenced`` stay
    available to InclusiveNamespaces.
    """
    if not enveloped or not _is_inside(signature, referenced):
        return _exc_c14n(referenced, prefixes)
    tree_copy = copy.deepcopy(referenced.getroottree())
    root_copy = tree_copy.getroot()
    referenced_copy = _follow(root_copy, _index_path(referenced))
    _detach_keeping_tail(_follow(root_copy, _index_path(signature)))
    return _exc_c14n(referenced_copy, prefixes)


def _is_inside(node: etree._Element, ancestor: etree._Element) -> bool:
    return any(a is ancestor for a in node.iterancestors())


def _root(element: etree._Element) -> etree._Element:
    return element.getroottree().getroot()


def _elements_with_id(root: etree._Element, value: str, id_attribute: str) -> list[etree._Element]:
    names = _ID_LIKE_ATTRIBUTES | {id_attribute}
    return [el for el in root.iter() if isinstance(el.tag, str)
            and any(el.get(name) == value for name in names)]


def _id_name(id_attribute: IdAttribute) -> str:
    return id_attribute.text if isinstance(id_attribute, etree.QName) else id_attribute


# --------------------------------------------------------------------------------------------------
# Signing
# --------------------------------------------------------------------------------------------------


def _signature_method(key: PrivateKey, digest: DigestName) -> str:
    if isinstance(key, rsa.RSAPrivateKey):
        if key.key_size < MIN_RSA_BITS:
            raise ValueError(f"RSA key of {key.key_size} bits is below the minimum of {MIN_RSA_BITS}")
        return RSA_SHA256 if digest == "sha256" else RSA_SHA1
    if isinstance(key, ec.EllipticCurvePrivateKey):
        if digest != "sha256":
            raise ValueError("ECDSA signing is offered with SHA-256 only")
        return ECDSA_SHA256
    raise TypeError(f"unsupported key type {type(key).__name__}: RSA or EC is required")


def _raw_signature(key: PrivateKey, digest: DigestName, data: bytes) -> bytes:
    if isinstance(key, rsa.RSAPrivateKey):
        return key.sign(data, padding.PKCS1v15(), _hash(digest))
    # XML-DSig wants r || s as fixed-width big-endian integers (RFC 4050 / XMLDSig 1.1 §6.4.3), not DER.
    r, s = decode_dss_signature(key.sign(data, ec.ECDSA(_hash(digest))))
    width = (key.curve.key_size + 7) // 8
    return r.to_bytes(width, "big") + s.to_bytes(width, "big")


def _sub(parent: etree._Element, local: str, algorithm: str | None = None) -> etree._Element:
    el = etree.SubElement(parent, _ds(local))
    if algorithm is not None:
        el.set("Algorithm", algorithm)
    return el


def sign(
    parent: etree._Element,
    referenced: etree._Element,
    key: PrivateKey,
    cert: x509.Certificate | Sequence[x509.Certificate],
    *,
    digest: DigestName = "sha256",
    id_attribute: IdAttribute = XML_ID,
    position: int = 0,
) -> etree._Element:
    """Insert a ``ds:Signature`` over ``referenced`` as child ``position`` of ``parent``; return it.

    The enveloped-signature transform is added exactly when the signature ends up inside the
    element it signs (the SAML case); a sibling reference (the XACML case) gets exc-c14n only, so
    the SignedInfo says precisely what was done. ``referenced`` gets a fresh ``_<uuid>`` id when it
    has none (as NK does for the XACML Request). ``cert`` may be a chain, leaf first; all of it goes
    into KeyInfo for peers that build paths, although :func:`verify` itself never does.

    Raises ``ValueError`` for inputs that would yield a signature nobody can check (key not matching
    the certificate, ambiguous id, elements in different documents) and leaves the tree untouched.
    """
    chain = [cert] if isinstance(cert, x509.Certificate) else list(cert)
    if not chain:
        raise ValueError("at least one certificate is required")
    if key.public_key() != chain[0].public_key():
        raise ValueError("the private key does not belong to the (first) certificate")
    method = _signature_method(key, digest)
    if _root(parent) is not _root(referenced):
        raise ValueError("parent and referenced must be in the same document")
    id_name = _id_name(id_attribute)
    ref_id = referenced.get(id_name)
    if ref_id == "":
        raise ValueError(f"referenced element has an empty {id_name}")
    if ref_id is not None:
        holders = _elements_with_id(_root(referenced), ref_id, id_name)
        if len(holders) != 1:
            raise ValueError(f"id {ref_id!r} is carried by {len(holders)} elements; it must be unique")
    enveloped = parent is referenced or _is_inside(parent, referenced)

    signature = etree.Element(_ds("Signature"), nsmap={"ds": DS_NS})
    signed_info = _sub(signature, "SignedInfo")
    _sub(signed_info, "CanonicalizationMethod", EXC_C14N)
    _sub(signed_info, "SignatureMethod", method)
    reference = _sub(signed_info, "Reference")
    transforms = _sub(reference, "Transforms")
    if enveloped:
        _sub(transforms, "Transform", ENVELOPED_SIGNATURE)
    _sub(transforms, "Transform", EXC_C14N)
    _sub(reference, "DigestMethod", _DIGEST_URI[digest])
    digest_value = _sub(reference, "DigestValue")
    signature_value = _sub(signature, "SignatureValue")
    x509_data = _sub(_sub(signature, "KeyInfo"), "X509Data")
    for c in chain:
        _sub(x509_data, "X509Certificate").text = base64.b64encode(
            c.public_bytes(serialization.Encoding.DER)).decode("ascii")

    assigned_id = ref_id is None
    if ref_id is None:
        ref_id = f"_{uuid.uuid4().hex}"
        referenced.set(id_name, ref_id)
    reference.set("URI", f"#{ref_id}")
    parent.insert(position, signature)
    try:
        digest_value.text = base64.b64encode(
            _digest(digest, _reference_octets(referenced, signature, enveloped, ()))).decode("ascii")
        signature_value.text = base64.b64encode(
            _raw_signature(key, digest, _exc_c14n(signed_info))).decode("ascii")
    except BaseException:
        parent.remove(signature)
        if assigned_id:
            del referenced.attrib[id_name]
        raise
    return signature


def load_signing_pair(
    key_path: str | os.PathLike[str],
    cert_path: str | os.PathLike[str],
    password: bytes | None = None,
) -> tuple[PrivateKey, list[x509.Certificate]]:
    """Read a PEM key and a PEM certificate file (optionally with its chain) for :func:`sign`.

    The certificate that matches the key is moved to the front whatever the file order, because
    peers take the first KeyInfo certificate as the signer's; a file without it is refused here
    rather than producing signatures that fail at the other end.
    """
    with open(key_path, "rb") as f:
        key = serialization.load_pem_private_key(f.read(), password=password)
    if not isinstance(key, rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey):
        raise ValueError(f"{key_path}: unsupported key type {type(key).__name__}: RSA or EC is required")
    with open(cert_path, "rb") as f:
        certs = x509.load_pem_x509_certificates(f.read())
    leaf = [c for c in certs if c.public_key() == key.public_key()]
    if not leaf:
        raise ValueError(f"{cert_path} holds no certificate for the key in {key_path}")
    return key, [leaf[0], *(c for c in certs if c is not leaf[0])]


# --------------------------------------------------------------------------------------------------
# Verification
# --------------------------------------------------------------------------------------------------


def _children(parent: etree._Element) -> list[etree._Element]:
    return [c for c in parent if isinstance(c.tag, str)]


def _algorithm(el: etree._Element, what: str) -> str:
    value = el.get("Algorithm")
    if not value:
        raise SignatureError(f"{what} has no Algorithm")
    return value


def _b64(text: str | None, what: str) -> bytes:
    # Whitespace inside base64 content is legal (xmlsec1 wraps lines); anything else is not.
    compact = "".join((text or "").split())
    if not compact:
        raise SignatureError(f"{what} is empty")
    try:
        return base64.b64decode(compact, validate=True)
    except binascii.Error as exc:
        raise SignatureError(f"{what} is not valid base64") from exc


def _inclusive_prefixes(method: etree._Element, what: str) -> list[str]:
    """The optional ``ec:InclusiveNamespaces PrefixList`` of an exc-c14n method or transform."""
    children = _children(method)
    if not children:
        return []
    if len(children) > 1 or children[0].tag != f"{{{EXC_C14N}}}InclusiveNamespaces":
        raise SignatureError(f"{what} may only hold one ec:InclusiveNamespaces")
    prefixes = (children[0].get("PrefixList") or "").split()
    if "#default" in prefixes:
        # libxml2 (through lxml) silently ignores it; a canonical form we cannot reproduce must be refused.
        raise SignatureError(f"{what}: '#default' in InclusiveNamespaces PrefixList is not supported")
    return prefixes


def _check_canonicalization(method: etree._Element) -> list[str]:
    algorithm = _algorithm(method, "CanonicalizationMethod")
    if algorithm == EXC_C14N_WITH_COMMENTS:
        raise SignatureError("canonicalization exc-c14n#WithComments is refused: "
                             "comments are not signed content")
    if algorithm != EXC_C14N:
        raise SignatureError(f"canonicalization method {algorithm} is not allowed (only exc-c14n)")
    return _inclusive_prefixes(method, "CanonicalizationMethod")


def _check_transforms(transforms: etree._Element | None) -> tuple[bool, list[str]]:
    """Return (enveloped, PrefixList); only [enveloped-signature,] exc-c14n is accepted."""
    if transforms is None:
        # Without Transforms the node set would be serialised with inclusive C14N 1.0.
        raise SignatureError("Reference has no Transforms: exc-c14n is required")
    steps = _children(transforms)
    algorithms: list[str] = []
    for step in steps:
        if step.tag != _ds("Transform"):
            raise SignatureError(f"unexpected element {step.tag} in Transforms")
        algorithm = _algorithm(step, "Transform")
        if algorithm == EXC_C14N_WITH_COMMENTS:
            raise SignatureError("transform exc-c14n#WithComments is refused: "
                                 "comments are not signed content")
        if algorithm not in (ENVELOPED_SIGNATURE, EXC_C14N):
            raise SignatureError(f"transform {algorithm} is not allowed")
        if algorithm == ENVELOPED_SIGNATURE and _children(step):
            raise SignatureError("the enveloped-signature transform takes no parameters")
        algorithms.append(algorithm)
    if algorithms == [EXC_C14N]:
        return False, _inclusive_prefixes(steps[0], "exc-c14n transform")
    if algorithms == [ENVELOPED_SIGNATURE, EXC_C14N]:
        return True, _inclusive_prefixes(steps[1], "exc-c14n transform")
    raise SignatureError(f"transform sequence {algorithms} is not allowed: "
                         "expected [enveloped-signature,] exc-c14n")


def _check_id(uri: str | None, expected: etree._Element, id_attribute: str) -> str:
    if uri is None or not uri.startswith("#") or len(uri) < 2:
        raise SignatureError(f"Reference URI {uri!r} is not a same-document '#id' reference")
    ref_id = uri[1:]
    if ref_id.startswith("xpointer("):
        raise SignatureError("XPointer references are not allowed")
    actual = expected.get(id_attribute)
    if actual != ref_id:
        raise SignatureError(f"Reference URI {uri!r} does not point at the expected element "
                             f"(whose {id_attribute} is {actual!r})")
    holders = _elements_with_id(_root(expected), ref_id, id_attribute)
    if len(holders) != 1:
        raise SignatureError(f"id {ref_id!r} is carried by {len(holders)} elements in the document; "
                             "it must be unique (signature wrapping?)")
    return ref_id


def _refuse_comments(element: etree._Element, what: str) -> None:
    # exc-c14n drops comments, so a comment can split a signed text node without breaking the
    # digest while lxml's .text then returns only the part before it (the 2018 SAML comment attack).
    if next(element.iter(etree.Comment), None) is not None:
        raise SignatureError(f"{what} contains an XML comment; comments are refused in signed content")


def _signer_certificate(key_info: etree._Element | None) -> x509.Certificate:
    if key_info is None:
        raise SignatureError("KeyInfo is missing: the signer's certificate must be in KeyInfo/X509Data")
    data: list[etree._Element] = []
    for child in _children(key_info):
        if child.tag == _ds("X509Data"):
            data.append(child)
        elif child.tag == _ds("RetrievalMethod"):
            raise SignatureError("KeyInfo/RetrievalMethod is refused: keys are never fetched")
        elif child.tag not in (_ds("KeyName"), _ds("KeyValue")):
            # KeyName/KeyValue are informative at best and ignored; anything else is not understood.
            raise SignatureError(f"unexpected element {child.tag} in KeyInfo")
    if len(data) != 1:
        raise SignatureError(f"KeyInfo must hold exactly one X509Data, found {len(data)}")
    certs = data[0].findall(_ds("X509Certificate"))
    if not certs:
        raise SignatureError("KeyInfo/X509Data holds no X509Certificate")
    der = _b64(certs[0].text, "X509Certificate")
    try:
        return x509.load_der_x509_certificate(der)
    except ValueError as exc:
        raise SignatureError("X509Certificate is not a valid DER certificate") from exc


def _describe(cert: x509.Certificate) -> str:
    return cert.subject.rfc4514_string() or f"serial {cert.serial_number}"


def _check_validity(cert: x509.Certificate, now: datetime, role: str) -> None:
    if now < cert.not_valid_before_utc:
        raise SignatureError(f"{role} certificate {_describe(cert)} is not valid before "
                             f"{cert.not_valid_before_utc.isoformat()}")
    if now > cert.not_valid_after_utc:
        raise SignatureError(f"{role} certificate {_describe(cert)} expired at "
                             f"{cert.not_valid_after_utc.isoformat()}")


def _may_sign(cert: x509.Certificate) -> bool:
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return True
    # Server certificates carry digitalSignature; PKIoverheid signing certificates nonRepudiation only.
    return usage.digital_signature or usage.content_commitment


def _is_ca(cert: x509.Certificate) -> bool:
    try:
        if not cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca:
            return False
    except x509.ExtensionNotFound:
        return False
    try:
        return cert.extensions.get_extension_for_class(x509.KeyUsage).value.key_cert_sign
    except x509.ExtensionNotFound:
        return True


def _claims_ca(cert: x509.Certificate) -> bool:
    """BasicConstraints cA=true, whatever its KeyUsage says: for a pinned signer, being a CA is enough."""
    try:
        return cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        return False


def _check_pinned(cert: x509.Certificate, trusted: TrustStore) -> None:
    if _claims_ca(cert) or _is_ca(cert):
        raise SignatureError(f"signing certificate {_describe(cert)} is not trusted (a CA certificate "
                             "never signs assertions)")
    try:
        usage = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        usage = None
    if usage is not None and not usage.digital_signature:
        raise SignatureError(f"signing certificate {_describe(cert)} has a KeyUsage without digitalSignature")
    if cert not in trusted.certificates:
        raise SignatureError(f"signing certificate {_describe(cert)} is not trusted (not one of the "
                             "certificates pinned for this issuer)")


def _check_trust(cert: x509.Certificate, trusted: TrustStore, now: datetime) -> None:
    _check_validity(cert, now, "signing")
    if trusted.pinned:
        _check_pinned(cert, trusted)
        return
    if not _may_sign(cert):
        raise SignatureError(f"signing certificate {_describe(cert)} has a KeyUsage that forbids signatures")
    if cert in trusted.certificates:
        return
    problems: list[str] = []
    for ca in trusted.certificates:
        if ca.subject != cert.issuer:
            continue
        if not _is_ca(ca):
            problems.append(f"trusted {_describe(ca)} is not a CA")
            continue
        try:
            cert.verify_directly_issued_by(ca)
        except (ValueError, TypeError, InvalidSignature, UnsupportedAlgorithm):
            problems.append(f"not signed by trusted {_describe(ca)}")
            continue
        _check_validity(ca, now, "issuing CA")
        return
    detail = "; ".join(problems) if problems else f"no trusted CA named {cert.issuer.rfc4514_string()}"
    raise SignatureError(f"signing certificate {_describe(cert)} is not trusted ({detail})")


def _check_signature_value(cert: x509.Certificate, method: str, value: bytes, data: bytes) -> None:
    kind, digest = _SIGNATURE_METHODS[method]
    public_key = cert.public_key()
    try:
        if kind == "rsa":
            if not isinstance(public_key, rsa.RSAPublicKey):
                raise SignatureError(f"SignatureMethod {method} needs an RSA certificate")
            if public_key.key_size < MIN_RSA_BITS:
                raise SignatureError(f"RSA key of {public_key.key_size} bits is below {MIN_RSA_BITS}")
            public_key.verify(value, data, padding.PKCS1v15(), _hash(digest))
        else:
            if not isinstance(public_key, ec.EllipticCurvePublicKey):
                raise SignatureError(f"SignatureMethod {method} needs an EC certificate")
            width = (public_key.curve.key_size + 7) // 8
            if len(value) != 2 * width:
                raise SignatureError("ECDSA SignatureValue has the wrong length for the curve")
            r, s = int.from_bytes(value[:width], "big"), int.from_bytes(value[width:], "big")
            public_key.verify(encode_dss_signature(r, s), data, ec.ECDSA(_hash(digest)))
    except InvalidSignature as exc:
        raise SignatureError("SignatureValue does not verify over SignedInfo") from exc


def verify(
    signature: etree._Element,
    *,
    expected_referenced: etree._Element,
    id_attribute: IdAttribute,
    trusted: TrustStore,
    now: datetime,
    allowed_digests: Collection[DigestName] = frozenset({"sha256"}),
) -> VerifiedSignature:
    """Check that ``signature`` validly signs exactly ``expected_referenced`` with a trusted key.

    ``expected_referenced`` is the element the caller is about to read (e.g. the assertion in
    ``wsse:Security``); binding the check to it, plus refusing ids that occur twice, is what defeats
    signature wrapping. ``allowed_digests`` governs both the Reference digest and the hash inside the
    SignatureMethod: pass ``{"sha256", "sha1"}`` only for peers that need it (xca.md §13.2).

    Structure and trust are checked before any cryptography; every refusal is a :class:`SignatureError`.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    id_name = _id_name(id_attribute)
    if signature.tag != _ds("Signature"):
        raise SignatureError(f"expected ds:Signature, got {signature.tag}")
    if _root(signature) is not _root(expected_referenced):
        raise SignatureError("the signature and the expected element are not in the same document")
    _refuse_comments(signature, "Signature")
    _refuse_comments(expected_referenced, "the signed element")

    parts = _children(signature)
    names = [p.tag for p in parts]
    if names[:2] != [_ds("SignedInfo"), _ds("SignatureValue")]:
        raise SignatureError("Signature must start with SignedInfo and SignatureValue")
    if names[2:] not in ([], [_ds("KeyInfo")]):
        raise SignatureError("Signature may hold only SignedInfo, SignatureValue and KeyInfo (no ds:Object)")
    signed_info, signature_value = parts[0], parts[1]
    key_info = parts[2] if len(parts) == 3 else None

    si = _children(signed_info)
    if len(si) < 2 or si[0].tag != _ds("CanonicalizationMethod") or si[1].tag != _ds("SignatureMethod"):
        raise SignatureError("SignedInfo must start with CanonicalizationMethod and SignatureMethod")
    references = si[2:]
    if any(r.tag != _ds("Reference") for r in references):
        raise SignatureError("SignedInfo may only hold Reference elements after SignatureMethod")
    if len(references) != 1:
        raise SignatureError(f"exactly one Reference is required, found {len(references)}")
    si_prefixes = _check_canonicalization(si[0])
    method = _algorithm(si[1], "SignatureMethod")
    if method not in _SIGNATURE_METHODS:
        raise SignatureError(f"SignatureMethod {method} is not allowed")
    if _children(si[1]):
        raise SignatureError("SignatureMethod parameters (e.g. HMACOutputLength) are not allowed")
    method_digest = _SIGNATURE_METHODS[method][1]
    if method_digest not in allowed_digests:
        raise SignatureError(f"SignatureMethod {method} uses {method_digest}, which is not allowed "
                             f"(allowed: {', '.join(sorted(allowed_digests))})")

    reference = references[0]
    ref_parts = _children(reference)
    transforms = ref_parts[0] if ref_parts and ref_parts[0].tag == _ds("Transforms") else None
    rest = ref_parts[1:] if transforms is not None else ref_parts
    if [p.tag for p in rest] != [_ds("DigestMethod"), _ds("DigestValue")]:
        raise SignatureError("Reference must hold [Transforms,] DigestMethod, DigestValue")
    enveloped, ref_prefixes = _check_transforms(transforms)
    digest_uri = _algorithm(rest[0], "DigestMethod")
    if digest_uri not in _DIGEST_BY_URI:
        raise SignatureError(f"DigestMethod {digest_uri} is not supported")
    digest_name = _DIGEST_BY_URI[digest_uri]
    if digest_name not in allowed_digests:
        raise SignatureError(f"digest {digest_name} is not allowed "
                             f"(allowed: {', '.join(sorted(allowed_digests))})")
    expected_digest = _b64(rest[1].text, "DigestValue")
    _check_id(reference.get("URI"), expected_referenced, id_name)
    if _is_inside(signature, expected_referenced) and not enveloped:
        raise SignatureError("the signature lies inside the element it signs, "
                             "but the enveloped-signature transform is missing")

    cert = _signer_certificate(key_info)
    _check_trust(cert, trusted, now)
    _check_signature_value(cert, method, _b64(signature_value.text, "SignatureValue"),
                           _exc_c14n(signed_info, si_prefixes))
    actual = _digest(digest_name, _reference_octets(expected_referenced, signature, enveloped, ref_prefixes))
    if not hmac.compare_digest(actual, expected_digest):
        raise SignatureError(f"DigestValue does not match the referenced element {reference.get('URI')} "
                             "(content altered after signing)")
    return VerifiedSignature(cert=cert, digest_algorithm=digest_name, signature_algorithm=method)
