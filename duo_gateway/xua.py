"""XUA (IHE ITI-40): who is asking, proven by a signed SAML 2.0 assertion in ``wsse:Security``.

Two directions, one vocabulary (the Twiin/Mitz attributes of netherlands.md §3 and mitz.md §3, in
:mod:`duo_gateway.saml`); this module is the policy of which assertions DUO accepts and issues:

* **Inbound** (DUO as XCA Responding Gateway): :func:`validate_xua` turns the header into a
  :class:`Requester`, or raises the SOAP 1.2 ``Sender`` fault with a ``wsse:`` subcode that xca.md §11
  requires for the NIST must-fault cases. The requester's attributes are what the consent gate puts
  into the Mitz closed question (:meth:`Requester.closed_question`), so an attribute DUO accepts here
  is an attribute Mitz is asked about: every one must be single-valued and typed exactly.
* **Outbound** (DUO as Initiating Gateway): :func:`issue_assertion` and :func:`security_header`.

Fault subcodes (OASIS WSS 1.1 §12), chosen so a peer's operator can tell what to fix:

* ``InvalidSecurity``: the header itself is off (no assertion, two Security headers, a bad or missing
  Timestamp), or the message was seen before (a replay, which WSS4J reports the same way);
* ``InvalidSecurityToken``: the assertion is malformed, unsigned, not yet valid, too long-lived, or its
  attributes are missing, duplicated or malformed;
* ``FailedCheck``: the signature does not verify or falls outside the accepted XML-DSig profile;
* ``FailedAuthentication``: well formed, but not acceptable: an issuer other than the calling peer's,
  a signer not pinned for that issuer, not meant for us (audience), too weak an authentication class,
  a role or purpose of use not allowed here, a ``resource-id`` naming another patient than the request;
* ``MessageExpired``: the assertion or the message Timestamp has expired.

Trust is per issuer and bound to the connection: the caller (its TLS client certificate) is one
configured XCA peer, which has exactly one issuer and the certificates pinned to sign for it. So an
assertion is believed only when its Issuer is the calling peer's and its signer is pinned for that
issuer: another peer's key, a CA key, or any certificate the CA issued (DUO's own TLS key included)
signs nothing, and a bearer assertion stolen from one peer is useless over another peer's connection.

Signature wrapping is defeated by construction: the attributes are read from the one ``saml2:Assertion``
that is a direct child of the one ``wsse:Security`` header, and that same element object is what
:func:`duo_gateway.xmldsig.verify` is told to expect (which also refuses an ID that occurs twice
anywhere in the document). Nothing is read through ``.//`` searches that could reach a nested copy.
The one nested assertion tolerated is evidence at ``AuthzDecisionStatement/Evidence/Assertion``, which
is never read, only the reason the request is refused (below).

Authorization decisions (XUA's Authz-Consent option, NIST ``_withauthzconsent``): an assertion may
carry an ``AuthzDecisionStatement``, typically a Permit with a consent document as evidence. DUO does
not act on it, and refuses the request. The statement is signed by the caller's own issuer, so the
signature binds it to the caller, not to the patient's will: it is the caller's word about its own
access. In the Netherlands consent is Mitz's to state, and DUO asks Mitz itself (the consent gate);
a Permit written by anyone else grants nothing. A Deny or Indeterminate is the caller's side
restricting itself on terms (Resource, evidence) DUO cannot interpret, so ignoring the statement could
disclose what the caller's own policy refused. Refusing is fail-closed and tells the peer plainly that
the decision was not honoured. The refusal is not a WS-Security fault, since the assertion is authentic
and well formed: :meth:`Requester.authorization_refusal` gives the reason, and each door answers it in
its protocol's terms (an ebRS Failure with ``LocalPolicyRestrictionError`` on XCA, as NIST's
``12309``/``12312_withauthzconsent`` expect; 403 on the TLB API). A door that forgot to ask would
still disclose nothing without a Mitz Permit, only ignore the statement.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Final, Literal

from cryptography import x509
from lxml import etree

from duo_gateway import xmldsig
from duo_gateway.bsn import BSN_OID, is_valid_bsn
from duo_gateway.config.access import XcaPeer
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.xua import XuaConfig
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.saml import (
    ASSERTION_VALIDITY,
    ATTR_CONSULTING_TYPE,
    ATTR_MANDATED,
    ATTR_PROVIDER_ID,
    ATTR_PROVIDER_INSTITUTION,
    ATTR_PURPOSE,
    ATTR_RESOURCE_ID,
    ATTR_ROLE,
    ORG_TYPE_OID,
    PURPOSE_OID,
    PURPOSES,
    ROLE_OID,
    SAML_AC_CLASSES,
    SAML_BEARER,
    SAML_HOLDER_OF_KEY,
    SAML_NS,
    SAML_X509,
    URA_OID,
    UZI_OID,
    WSSE_NS,
    WSU_NS,
    AuthzDecision,
    SamlError,
    authz_decisions,
    build_xua_assertion,
    evidence_assertions,
    hl7_type,
    single_attribute_values,
)
from duo_gateway.soap.envelope import SOAP12_NS, Envelope, SoapFault
from duo_gateway.soap.xml import XmlError, format_datetime, parse_datetime, qname
from duo_gateway.xmldsig import DS_NS, SAML_ID, DigestName, PrivateKey, SignatureError, TrustStore

Subcode = Literal["InvalidSecurity", "InvalidSecurityToken", "FailedAuthentication", "FailedCheck",
                  "MessageExpired"]

#: Bearer is what Twiin/Mitz send. Holder-of-key is accepted but its key is *not* matched against the
#: TLS client: the assertion is then trusted exactly as much as a bearer one, never more.
SUBJECT_CONFIRMATIONS: Final = frozenset({SAML_BEARER, SAML_HOLDER_OF_KEY})

#: Project policy: certificate-backed authentication only, because the Dutch professional signs in with
#: an UZI pass (X509 in B365's assertion). This refuses Gazelle's ``secondauthncontext``
#: (InternetProtocol: "an unacceptable authentication method") and ``invalidauthncontext`` cases.
ACCEPTED_AUTHN_CONTEXTS: Final = frozenset({SAML_X509, f"{SAML_AC_CLASSES}SmartcardPKI",
                                            f"{SAML_AC_CLASSES}SoftwarePKI", f"{SAML_AC_CLASSES}TLSClient"})

#: How long the message Timestamp DUO sends stays valid (WSS4J's default time-to-live).
TIMESTAMP_TTL_S: Final = 300.0

_DIGITS = re.compile(r"[0-9]+")
_URA = re.compile(r"[0-9]{8}")
#: xs:ID is an NCName; the signature Reference is ``#<ID>``, so nothing looser may pass.
_NCNAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")

#: Trust-store refusals from :func:`duo_gateway.xmldsig.verify` (who signed), as opposed to refusals
#: of the signature itself (what was signed). Pinned by tests so a rewording there cannot go unnoticed.
_TRUST_REFUSAL = re.compile(r"certificate .* (is not trusted|expired at|is not valid before|has a KeyUsage)")

#: Why a request whose assertion carries an AuthzDecisionStatement is refused (answers, audit, logs).
AUTHZ_DECISION_REFUSED: Final = ("the XUA assertion carries an authorization decision, which DUO does not "
                                 "act on: consent is asked of Mitz")


def _fault(subcode: Subcode, reason: str) -> SoapFault:
    return SoapFault("Sender", reason, subcode=(WSSE_NS, subcode))


# --------------------------------------------------------------------------------------------------
# What a token says
# --------------------------------------------------------------------------------------------------


def _check_claims(uzi: str, role: str, ura: str, purpose: str, organisation_type: str | None,
                  mandated_uzi: str | None) -> None:
    """The value rules shared by both directions, so DUO never issues what it would itself refuse.

    UZI and URA formats are UNVERIFIED (netherlands.md §5): UZI is only required to be digits (examples
    have nine), URA to be exactly eight digits as in the project's config type. ``fullmatch`` with
    ``[0-9]``, not ``\\d`` with ``$``: a trailing newline or a non-ASCII digit is not a number Mitz knows.
    """
    if not _DIGITS.fullmatch(uzi):
        raise ValueError("provider-identifier (UZI) must be digits")
    if mandated_uzi is not None and not _DIGITS.fullmatch(mandated_uzi):
        raise ValueError("mandated (UZI) must be digits")
    if not _URA.fullmatch(ura):
        raise ValueError("provider-institution (URA) must be eight digits")
    if purpose not in PURPOSES:
        raise ValueError(f"purposeofuse must be one of {', '.join(sorted(PURPOSES))}")
    if not role or role != role.strip():
        raise ValueError("role code must be a non-empty code without surrounding whitespace")
    if organisation_type is not None and (not organisation_type
                                          or organisation_type != organisation_type.strip()):
        raise ValueError("consulting-healthcare-facility-type-code must be a non-empty code")


@dataclass(frozen=True, kw_only=True)
class Claims:
    """The responsible professional and organisation an assertion speaks for (netherlands.md §3).

    ``organisation_type`` is optional because Twiin's ITI-40 table does not list it; Mitz needs it, so
    :meth:`closed_question` takes a fallback (e.g. from the peer's address-book entry).
    """

    uzi: str
    role: str
    ura: str
    purpose: str = "TREAT"
    organisation_type: str | None = None
    mandated_uzi: str | None = None

    def __post_init__(self) -> None:
        _check_claims(self.uzi, self.role, self.ura, self.purpose, self.organisation_type, self.mandated_uzi)

    def closed_question(self, *, bsn: str, holder_ura: str, holder_type: str,
                        categories: tuple[str, ...],
                        requester_type: str | None = None) -> ClosedQuestion:
        """The Mitz question for this requester (netherlands.md §3: copy the token, add the holder).

        The token's own organisation type wins over ``requester_type``; with neither, ClosedQuestion
        raises MitzRequestError, which the consent gate turns into a refusal instead of asking Mitz.
        """
        return ClosedQuestion(
            bsn=bsn, holder_ura=holder_ura, holder_type=holder_type, categories=categories,
            requester_uzi=self.uzi, requester_role=self.role, requester_ura=self.ura,
            requester_type=self.organisation_type or requester_type or "",
            purpose=self.purpose, mandated_uzi=self.mandated_uzi,
        )


@dataclass(frozen=True, kw_only=True)
class Requester(Claims):
    """A validated inbound assertion: the claims plus what audit and consent need to know about it."""

    issuer: str
    assertion_id: str
    issue_instant: datetime
    not_on_or_after: datetime
    #: ``Subject/NameID`` when the peer sends one (Twiin/Mitz tokens carry none).
    subject: str | None = None
    #: The XACML ``resource-id`` BSN when present, for the caller to match against the query's patient.
    patient_bsn: str | None = None
    #: RFC 4514 subject of the certificate whose signature was verified.
    signer: str
    #: The assertion's AuthzDecisionStatements: what its issuer decided about its own access.
    authz_decisions: tuple[AuthzDecision, ...] = ()

    def authorization_refusal(self) -> str | None:
        """Why a request on this assertion is refused for carrying authorization decisions, or None.

        The policy of this module's docstring: any decision, Permit or not, refuses the request. The
        reason names the decisions, never the evidence (which may name the patient).
        """
        if not self.authz_decisions:
            return None
        decisions = ", ".join(sorted({d.decision for d in self.authz_decisions}))
        return f"{AUTHZ_DECISION_REFUSED} (Decision {decisions})"

    def concerns(self, bsn: str) -> bool:
        """Whether a request about ``bsn`` is one this assertion may be used for.

        An assertion that names its patient (``resource-id``) was issued for that patient's care only:
        using it for another is the requester reaching past what was authenticated. One without a
        ``resource-id`` is not limited to a patient (Twiin's token carries none).
        """
        return self.patient_bsn is None or self.patient_bsn == bsn


# --------------------------------------------------------------------------------------------------
# Inbound
# --------------------------------------------------------------------------------------------------


def _elements(parent: etree._Element, ns: str, local: str) -> list[etree._Element]:
    """Direct children only: a nested element of the same name is never the one we mean."""
    return [c for c in parent if c.tag == qname(ns, local)]


def _exactly_one(parent: etree._Element, ns: str, local: str, where: str,
                 subcode: Subcode = "InvalidSecurityToken") -> etree._Element:
    found = _elements(parent, ns, local)
    if len(found) != 1:
        raise _fault(subcode, f"{where} must hold exactly one {local}, found {len(found)}")
    return found[0]


def _time(value: str | None, what: str, subcode: Subcode = "InvalidSecurityToken") -> datetime:
    """xs:dateTime with a zone (SAML core §1.3.3 wants UTC), or the fault with ``subcode``."""
    try:
        return parse_datetime(value, what).astimezone(UTC)
    except XmlError as exc:
        raise _fault(subcode, str(exc)) from None


def _text(el: etree._Element) -> str:
    return (el.text or "").strip()


def _check_timestamp(security: etree._Element, now: datetime, skew: timedelta, required: bool) -> None:
    stamps = _elements(security, WSU_NS, "Timestamp")
    if len(stamps) > 1:
        raise _fault("InvalidSecurity", f"wsse:Security holds {len(stamps)} wsu:Timestamp elements")
    if not stamps:
        if required:
            raise _fault("InvalidSecurity", "wsse:Security must hold a wsu:Timestamp")
        return
    created_el = _elements(stamps[0], WSU_NS, "Created")
    expires_el = _elements(stamps[0], WSU_NS, "Expires")
    if len(created_el) > 1 or len(expires_el) > 1:
        raise _fault("InvalidSecurity", "wsu:Timestamp holds more than one Created or Expires")
    if required and not created_el:
        # A Timestamp that does not say when the message was made says nothing.
        raise _fault("InvalidSecurity", "wsu:Timestamp must hold Created")
    created = _time(created_el[0].text, "wsu:Timestamp/Created", "InvalidSecurity") if created_el else None
    expires = _time(expires_el[0].text, "wsu:Timestamp/Expires", "InvalidSecurity") if expires_el else None
    if created is not None and expires is not None and expires <= created:
        raise _fault("InvalidSecurity", "wsu:Timestamp Expires is not after Created")
    if created is not None and created > now + skew:
        raise _fault("InvalidSecurity", f"wsu:Timestamp was created in the future ({created.isoformat()})")
    if expires is not None and expires <= now - skew:
        raise _fault("MessageExpired", f"the message expired at {expires.isoformat()} (wsu:Timestamp)")


def _find_assertion(security: etree._Element) -> etree._Element | None:
    if any(True for _ in security.iter(qname(SAML_NS, "EncryptedAssertion"))):
        raise _fault("InvalidSecurityToken", "encrypted assertions are not supported")
    direct = _elements(security, SAML_NS, "Assertion")
    # Identity, not id(): lxml keeps one proxy per element only while it is referenced (this list).
    evidence = [e for d in direct for e in evidence_assertions(d)]
    anywhere = [a for a in security.iter(qname(SAML_NS, "Assertion")) if not any(a is e for e in evidence)]
    if len(anywhere) > len(direct) or len(direct) > 1:
        # A second assertion, nested (Advice) or not, is exactly what wrapping attacks smuggle in.
        raise _fault("InvalidSecurity",
                     f"wsse:Security must hold exactly one saml2:Assertion, found {len(anywhere)}")
    return direct[0] if direct else None


def _verify_signature(assertion: etree._Element, trusted: TrustStore, now: datetime,
                      allow_sha1: bool) -> x509.Certificate:
    signatures = _elements(assertion, DS_NS, "Signature")
    if not signatures:
        raise _fault("InvalidSecurityToken",
                     "the assertion is not signed (an enveloped ds:Signature is required)")
    if len(signatures) > 1:
        raise _fault("InvalidSecurityToken", f"the assertion carries {len(signatures)} signatures")
    digests: frozenset[DigestName] = frozenset({"sha256", "sha1"} if allow_sha1 else {"sha256"})
    try:
        verified = xmldsig.verify(signatures[0], expected_referenced=assertion, id_attribute=SAML_ID,
                                  trusted=trusted, now=now, allowed_digests=digests)
    except SignatureError as exc:
        subcode: Subcode = "FailedAuthentication" if _TRUST_REFUSAL.search(exc.reason) else "FailedCheck"
        raise _fault(subcode, f"assertion signature refused: {exc.reason}") from exc
    return verified.cert


def _check_conditions(assertion: etree._Element, issued: datetime, now: datetime, skew: timedelta,
                      max_lifetime: timedelta, audiences: Collection[str]) -> datetime:
    """Returns NotOnOrAfter. Expiry at exactly NotOnOrAfter follows SAML's "on or after" wording."""
    conditions = _exactly_one(assertion, SAML_NS, "Conditions", "the assertion")
    not_after = _time(conditions.get("NotOnOrAfter"), "Conditions/@NotOnOrAfter")
    not_before = _time(conditions.get("NotBefore"), "Conditions/@NotBefore") \
        if conditions.get("NotBefore") is not None else None
    if not_before is not None and not_after <= not_before:
        raise _fault("InvalidSecurityToken", "Conditions NotOnOrAfter is not after NotBefore")
    if not_after <= now - skew:
        raise _fault("MessageExpired", f"the assertion expired at {not_after.isoformat()}")
    if not_before is not None and not_before > now + skew:
        raise _fault("InvalidSecurityToken", f"the assertion is not valid before {not_before.isoformat()}")
    if issued > now + skew:
        raise _fault("InvalidSecurityToken", f"the assertion was issued in the future ({issued.isoformat()})")
    start = min(issued, not_before) if not_before is not None else issued
    if not_after - start > max_lifetime:
        raise _fault("InvalidSecurityToken",
                     f"the assertion is valid for {(not_after - start).total_seconds():.0f} s, "
                     f"longer than the accepted {max_lifetime.total_seconds():.0f} s")

    restrictions: list[etree._Element] = []
    for child in conditions:
        if child.tag != qname(SAML_NS, "AudienceRestriction"):
            # SAML core §2.5.1.5: a condition the relying party does not understand makes the
            # assertion's validity indeterminate, which must not be read as valid.
            raise _fault("InvalidSecurityToken", f"condition {etree.QName(child).localname} is not supported")
        restrictions.append(child)
    if not restrictions:
        raise _fault("FailedAuthentication", "the assertion has no AudienceRestriction; it could be replayed "
                     "to any service")
    for restriction in restrictions:
        # Every restriction must be met, each by any one of its audiences (SAML core §2.5.1.4).
        offered = [_text(a) for a in _elements(restriction, SAML_NS, "Audience")]
        if not any(a in audiences for a in offered):
            raise _fault("FailedAuthentication",
                         f"audience {', '.join(offered) or '(none)'} is not accepted by this gateway")
    return not_after


def _check_subject(assertion: etree._Element, now: datetime, skew: timedelta) -> str | None:
    subject = _exactly_one(assertion, SAML_NS, "Subject", "the assertion")
    name_ids = _elements(subject, SAML_NS, "NameID")
    if len(name_ids) > 1:
        raise _fault("InvalidSecurityToken", "Subject holds more than one NameID")
    confirmations = _elements(subject, SAML_NS, "SubjectConfirmation")
    accepted = [c for c in confirmations if c.get("Method") in SUBJECT_CONFIRMATIONS]
    if not accepted:
        raise _fault("InvalidSecurityToken", "Subject needs a bearer or holder-of-key SubjectConfirmation")
    for confirmation in accepted:
        for data in _elements(confirmation, SAML_NS, "SubjectConfirmationData"):
            if data.get("NotOnOrAfter") is not None:
                limit = _time(data.get("NotOnOrAfter"), "SubjectConfirmationData/@NotOnOrAfter")
                if limit <= now - skew:
                    raise _fault("MessageExpired", f"the subject confirmation expired at {limit.isoformat()}")
    return (_text(name_ids[0]) or None) if name_ids else None


def _check_authn(assertion: etree._Element, authn_contexts: Collection[str]) -> None:
    statements = _elements(assertion, SAML_NS, "AuthnStatement")
    if len(statements) != 1:
        raise _fault("InvalidSecurityToken", f"the assertion must hold exactly one AuthnStatement, "
                     f"found {len(statements)}")
    statement = statements[0]
    _time(statement.get("AuthnInstant"), "AuthnStatement/@AuthnInstant")
    context = _exactly_one(statement, SAML_NS, "AuthnContext", "AuthnStatement")
    refs = _elements(context, SAML_NS, "AuthnContextClassRef")
    if len(refs) != 1 or len([c for c in context if isinstance(c.tag, str)]) != 1:
        raise _fault("InvalidSecurityToken", "AuthnContext must hold exactly one AuthnContextClassRef and "
                     "nothing else")
    class_ref = _text(refs[0])
    if class_ref not in authn_contexts:
        raise _fault("FailedAuthentication", f"authentication class {class_ref or '(empty)'} is not accepted")


_KNOWN_ATTRIBUTES: Final = (ATTR_PROVIDER_ID, ATTR_MANDATED, ATTR_ROLE, ATTR_PROVIDER_INSTITUTION,
                            ATTR_CONSULTING_TYPE, ATTR_PURPOSE, ATTR_RESOURCE_ID)


def _single_values(assertion: etree._Element) -> dict[str, etree._Element]:
    """The hl7 element of each attribute DUO acts on; any second occurrence or value is refused.

    Attributes DUO does not read (XSPA subject-id, organization, homeCommunityId, ...) are left alone:
    international peers send them and they decide nothing here.
    """
    try:
        return single_attribute_values(_elements(assertion, SAML_NS, "AttributeStatement"), _KNOWN_ATTRIBUTES)
    except SamlError as exc:
        raise _fault("InvalidSecurityToken", str(exc)) from None


def _identifier(values: dict[str, etree._Element], name: str, root: str) -> str | None:
    el = values.get(name)
    if el is None:
        return None
    if hl7_type(el) != "II":
        raise _fault("InvalidSecurityToken", f"attribute {name} must be an hl7 II")
    if el.get("root") != root:
        raise _fault("InvalidSecurityToken", f"attribute {name} must have root {root}")
    return el.get("extension") or ""


def _code(values: dict[str, etree._Element], name: str, code_system: str) -> str | None:
    el = values.get(name)
    if el is None:
        return None
    # Mitz writes CE for role and purpose, Twiin's table CV for purpose: both carry code + codeSystem.
    if hl7_type(el) not in ("CE", "CV"):
        raise _fault("InvalidSecurityToken", f"attribute {name} must be an hl7 CE or CV")
    if el.get("codeSystem") != code_system:
        raise _fault("FailedAuthentication", f"attribute {name} must use code system {code_system}")
    return el.get("code") or ""


def _shown(code: str) -> str:
    """A code from the request as a fault reason may quote it: short, so a peer cannot fill our logs."""
    return repr(code[:32] + ("..." if len(code) > 32 else ""))


def _claims(assertion: etree._Element, cfg: XuaConfig) -> tuple[dict[str, str | None], str | None]:
    values = _single_values(assertion)
    claims = {
        "uzi": _identifier(values, ATTR_PROVIDER_ID, UZI_OID),
        "role": _code(values, ATTR_ROLE, ROLE_OID),
        "ura": _identifier(values, ATTR_PROVIDER_INSTITUTION, URA_OID),
        "purpose": _code(values, ATTR_PURPOSE, PURPOSE_OID),
        "organisation_type": _code(values, ATTR_CONSULTING_TYPE, ORG_TYPE_OID),
        "mandated_uzi": _identifier(values, ATTR_MANDATED, UZI_OID),
    }
    required = {"uzi": ATTR_PROVIDER_ID, "role": ATTR_ROLE, "ura": ATTR_PROVIDER_INSTITUTION,
                "purpose": ATTR_PURPOSE}
    missing = [attr for key, attr in required.items() if claims[key] is None]
    if missing:
        raise _fault("InvalidSecurityToken",
                     f"the assertion lacks required attribute(s) {', '.join(missing)}")
    purpose = claims["purpose"] or ""
    if purpose not in PURPOSES or purpose not in cfg.purposes:
        # Gazelle's _secondpurposeofuse: a purpose the policy does not grant access for.
        raise _fault("FailedAuthentication",
                     f"purposeofuse {_shown(purpose)} is not accepted "
                     f"(only {', '.join(sorted(cfg.purposes))})")
    bsn = _identifier(values, ATTR_RESOURCE_ID, BSN_OID)
    if bsn is not None and not is_valid_bsn(bsn):
        # The value stays out of the reason: faults are logged.
        raise _fault("InvalidSecurityToken", f"attribute {ATTR_RESOURCE_ID} is not a valid BSN")
    return claims, bsn


def validate_xua(
    envelope: Envelope,
    cfg: XuaConfig,
    *,
    issuer: str,
    trusted: TrustStore,
    audiences: Collection[str],
    now: datetime,
    authn_contexts: Collection[str] = ACCEPTED_AUTHN_CONTEXTS,
) -> Requester | None:
    """The requester of an inbound XCA request, or the SOAP fault to answer with.

    ``issuer`` and ``trusted`` are the calling peer's (see :func:`peer_trust`): the one Issuer its
    assertions may carry and the certificates pinned to sign them. Replay (a MessageID seen before)
    is the transport's to refuse, after this check, so only authenticated messages take its memory.

    Returns None only when ``cfg.required`` is off and there is no assertion at all; a Security header
    or assertion that *is* present is always checked, because a closed test network should still not
    act on a broken or forged token. ``audiences`` is passed in (not read from ``cfg``) because its
    empty-config default, the home community id, lives in the responding-gateway config.
    ``mustUnderstand`` is not demanded on Security: DUO understands the header whether or not the
    sender flagged it. A message-level ds:Signature over the Timestamp is ignored, not checked.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not audiences:
        raise ValueError("at least one accepted audience is required")
    now = now.astimezone(UTC)
    skew = timedelta(seconds=cfg.clock_skew_s)
    securities = [h for h in envelope.headers if h.tag == qname(WSSE_NS, "Security")]
    if len(securities) > 1:
        raise _fault("InvalidSecurity", f"{len(securities)} wsse:Security headers; exactly one is accepted")
    if not securities:
        if cfg.required:
            raise _fault("InvalidSecurity",
                         "an XUA assertion is required, but there is no wsse:Security header")
        return None
    security = securities[0]
    _check_timestamp(security, now, skew, cfg.require_timestamp)
    assertion = _find_assertion(security)
    if assertion is None:
        if cfg.required:
            raise _fault("InvalidSecurity", "an XUA assertion is required, but wsse:Security holds none")
        return None
    return validate_assertion(assertion, cfg, issuer=issuer, trusted=trusted, audiences=audiences, now=now,
                              authn_contexts=authn_contexts)


def validate_assertion(
    assertion: etree._Element,
    cfg: XuaConfig,
    *,
    issuer: str,
    trusted: TrustStore,
    audiences: Collection[str],
    now: datetime,
    authn_contexts: Collection[str] = ACCEPTED_AUTHN_CONTEXTS,
) -> Requester:
    """The requester of one ``saml2:Assertion`` element, or the SOAP fault (whose subcode says why).

    :func:`validate_xua` calls it with the assertion it found in ``wsse:Security``; a caller with an
    assertion of its own (e.g. parsed from an ``Authorization: SAML`` header) passes the root element
    of that document. Every value is read from ``assertion`` itself, the element the signature is
    verified to cover, and an assertion nested inside it (Advice) is refused, but for the evidence of
    an AuthzDecisionStatement, which is never read. Such a statement is kept on the Requester
    (:meth:`Requester.authorization_refusal`); a malformed one is refused here.
    """
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if not audiences:
        raise ValueError("at least one accepted audience is required")
    now = now.astimezone(UTC)
    skew = timedelta(seconds=cfg.clock_skew_s)
    if assertion.tag != qname(SAML_NS, "Assertion"):
        raise _fault("InvalidSecurityToken", "not a saml2:Assertion")
    evidence = evidence_assertions(assertion)
    if any(el is not assertion and not any(el is e for e in evidence)
           for el in assertion.iter(qname(SAML_NS, "Assertion"), qname(SAML_NS, "EncryptedAssertion"))):
        raise _fault("InvalidSecurity", "the assertion holds another assertion")
    if assertion.get("Version") != "2.0":
        raise _fault("InvalidSecurityToken",
                     f"assertion Version must be 2.0, not {assertion.get('Version')!r}")
    assertion_id = assertion.get("ID") or ""
    if not _NCNAME.fullmatch(assertion_id):
        raise _fault("InvalidSecurityToken", "the assertion ID is missing or not an xs:ID")
    issued = _time(assertion.get("IssueInstant"), "assertion IssueInstant")
    assertion_issuer = _text(_exactly_one(assertion, SAML_NS, "Issuer", "the assertion"))
    if not assertion_issuer:
        raise _fault("InvalidSecurityToken", "the assertion Issuer is empty")
    if assertion_issuer != issuer:
        # Checked before the signature so the peer is told the real problem, not "untrusted signer".
        raise _fault("FailedAuthentication", f"assertion issuer {_shown(assertion_issuer)} is not the issuer "
                     "of the calling peer")

    # Everything below is read from this very element, now known to be what the signer signed.
    signer = _verify_signature(assertion, trusted, now, cfg.allow_sha1)
    not_after = _check_conditions(assertion, issued, now, skew, timedelta(seconds=cfg.max_lifetime_s),
                                  audiences)
    subject = _check_subject(assertion, now, skew)
    _check_authn(assertion, authn_contexts)
    claims, bsn = _claims(assertion, cfg)
    try:
        decisions = authz_decisions(assertion)
    except SamlError as exc:
        raise _fault("InvalidSecurityToken", str(exc)) from None
    try:
        requester = Requester(
            uzi=claims["uzi"] or "", role=claims["role"] or "", ura=claims["ura"] or "",
            purpose=claims["purpose"] or "", organisation_type=claims["organisation_type"],
            mandated_uzi=claims["mandated_uzi"], issuer=assertion_issuer, assertion_id=assertion_id,
            issue_instant=issued, not_on_or_after=not_after, subject=subject, patient_bsn=bsn,
            signer=signer.subject.rfc4514_string(), authz_decisions=decisions,
        )
    except ValueError as exc:
        raise _fault("InvalidSecurityToken", f"malformed attribute value: {exc}") from exc
    if requester.role not in cfg.roles:
        # Checked here, not left to Mitz: consent says the patient allows care providers, not that
        # this role has any business with images (xua.roles, mitz.md §5). After the format checks,
        # so a malformed code is reported as malformed.
        raise _fault("FailedAuthentication", f"role {_shown(requester.role)} may not consult imaging here")
    return requester


#: Why a request about another patient than the assertion's ``resource-id`` is refused (audit, logs).
PATIENT_MISMATCH: Final = "the XUA assertion's resource-id names another patient than this request"


def patient_mismatch() -> SoapFault:
    """The fault for a query whose patient is not the assertion's (:meth:`Requester.concerns`).

    Neither BSN is quoted: faults are logged, and the peer knows both already.
    """
    return _fault("FailedAuthentication", PATIENT_MISMATCH)


def accepted_audiences(config: DuoConfig) -> list[str]:
    """The AudienceRestriction values DUO accepts: ``xua.audiences``, else its home community id."""
    return config.xua.audiences or [config.gateway.home_community_id]


def peer_trust(peer: XcaPeer) -> TrustStore:
    """The certificates pinned to sign ``peer``'s issuer's assertions: only these, never what a CA issued.

    Raises ValueError (a CA certificate pinned) or OSError (unreadable file): a start-up error.
    """
    return TrustStore.from_pem_files(peer.signing_certs, pinned=True)


# --------------------------------------------------------------------------------------------------
# Outbound
# --------------------------------------------------------------------------------------------------


def issue_assertion(
    claims: Claims,
    *,
    issuer: str,
    audience: str,
    key: PrivateKey,
    cert: x509.Certificate | Sequence[x509.Certificate],
    now: datetime,
    lifetime_s: float = ASSERTION_VALIDITY.total_seconds(),
    digest: DigestName = "sha256",
    subject_bsn: str | None = None,
    assertion_id: str | None = None,
) -> etree._Element:
    """A signed assertion for a request DUO sends as Initiating Gateway.

    The default lifetime is Twiin's 10 minutes (netherlands.md §3). The signature sits right after
    Issuer, where the SAML schema puts it (strict peers validate the schema). ``subject_bsn``, when
    given, travels as ``resource-id`` (see :func:`~duo_gateway.saml.build_xua_assertion`).

    One ``audience`` only, on purpose: the assertion is a bearer token, and one naming several
    gateways could be replayed by any of them at the others for its lifetime, under DUO's requester.
    """
    if not issuer.strip() or not audience.strip():
        raise ValueError("issuer and audience are required")
    if subject_bsn is not None and not is_valid_bsn(subject_bsn):
        raise ValueError("subject_bsn is not nine digits passing the 11-proef")
    assertion = build_xua_assertion(
        issuer=issuer, uzi=claims.uzi, role=claims.role, ura=claims.ura, org_type=claims.organisation_type,
        purpose=claims.purpose, now=now, audience=audience, validity=timedelta(seconds=lifetime_s),
        mandated_uzi=claims.mandated_uzi, patient_bsn=subject_bsn, assertion_id=assertion_id)
    xmldsig.sign(assertion, assertion, key, cert, digest=digest, id_attribute=SAML_ID, position=1)
    return assertion


def security_header(assertion: etree._Element, now: datetime, *,
                    ttl_s: float = TIMESTAMP_TTL_S) -> etree._Element:
    """``wsse:Security`` (mustUnderstand) with a ``wsu:Timestamp`` and a copy of ``assertion``.

    A copy, so the caller's element is not moved out of its document; exclusive canonicalisation keeps
    the signature valid in its new place (xca.md §11).
    """
    security = _timestamped_security(now, ttl_s)
    security.append(copy.deepcopy(assertion))
    return security


def security_header_bytes(assertion: bytes, now: datetime, *, ttl_s: float = TIMESTAMP_TTL_S) -> bytes:
    """:func:`security_header` serialized, for an assertion kept as bytes (``element_bytes``).

    Why bytes: a reused assertion then costs each message a Timestamp, not a copy of its tree, and a
    kept assertion is ~5 kB of bytes instead of a ~20 kB tree. Splicing is sound because the
    assertion's bytes declare every namespace they use and its signature covers its exclusive
    canonical form, which the surrounding element does not change.
    """
    head = etree.tostring(_timestamped_security(now, ttl_s), encoding="UTF-8")
    close = b"</wsse:Security>"
    assert head.endswith(close), "the Timestamp child keeps the Security element open"
    return head[:-len(close)] + assertion + close


def _timestamped_security(now: datetime, ttl_s: float) -> etree._Element:
    if now.tzinfo is None:
        raise ValueError("now must be timezone-aware")
    if ttl_s <= 0:
        raise ValueError("ttl_s must be positive")
    security = etree.Element(qname(WSSE_NS, "Security"), nsmap={"wsse": WSSE_NS, "wsu": WSU_NS})
    security.set(qname(SOAP12_NS, "mustUnderstand"), "1")
    stamp = etree.SubElement(security, qname(WSU_NS, "Timestamp"))
    etree.SubElement(stamp, qname(WSU_NS, "Created")).text = format_datetime(now)
    etree.SubElement(stamp, qname(WSU_NS, "Expires")).text = format_datetime(now + timedelta(seconds=ttl_s))
    return security


__all__ = [
    "ACCEPTED_AUTHN_CONTEXTS", "AUTHZ_DECISION_REFUSED", "PATIENT_MISMATCH", "SUBJECT_CONFIRMATIONS",
    "Claims", "Requester", "Subcode", "issue_assertion", "patient_mismatch", "peer_trust", "security_header",
    "security_header_bytes", "validate_assertion", "validate_xua",
]
