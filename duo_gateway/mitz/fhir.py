"""The Mitz FHIR R4 JSON messages: the Subscription a data holder registers, the notification it gets.

A data holder subscribes per patient so that Mitz can localize it (the subscription's gateway and
source OIDs come back in open answers) and tell it when that patient's consent changes (mitz.md §4).
JSON, not XML, so nothing here shares the SOAP codecs' machinery; the notification is read strictly,
because it is the signal that makes a withdrawn consent take effect at once.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import date, datetime
from typing import Any, Final
from urllib.parse import parse_qsl, urlsplit

from duo_gateway.mitz.codec import (
    MitzAnswerError,
    MitzRequestError,
    bare_oid,
    is_oid,
    parse_time,
    require_bsn,
    require_text,
    require_ura,
)
from duo_gateway.soap.xml import format_datetime

# --------------------------------------------------------------------------------------------------
# FHIR subscription (mitz.md §4)
# --------------------------------------------------------------------------------------------------

SUBSCRIPTION_PATH: Final = "abonnementen/fhir/Subscription"
EXT_BIRTH_DATE: Final = "http://fhir.nl/StructureDefinition/Patient.birthDate"
EXT_GATEWAY: Final = "http://fhir.nl/StructureDefinition/GatewaySystem"
EXT_SOURCE: Final = "http://fhir.nl/StructureDefinition/SourceSystem"
SUBSCRIPTION_EXTENSIONS: Final = frozenset({EXT_BIRTH_DATE, EXT_GATEWAY, EXT_SOURCE})
FHIR_JSON: Final = "application/fhir+json"
FHIR_PAYLOADS: Final = frozenset({FHIR_JSON, "application/fhir+xml"})
_SUBSCRIPTION_KEYS = frozenset({"resourceType", "id", "meta", "extension", "status", "reason", "criteria",
                                "channel"})
_CHANNEL_KEYS = frozenset({"type", "endpoint", "payload"})
_CRITERIA_KEYS = ("_query", "patientid", "providerid", "providertype")
_DATE_RE = re.compile(r"^\d{4}-\d{2}-\d{2}$")


@dataclass(frozen=True, kw_only=True)
class Subscription:
    """A data holder's registration for one patient; OIDs are kept bare (no ``urn:oid:``)."""

    bsn: str
    provider_ura: str
    provider_type: str
    endpoint: str
    #: Comes back as HomeCommunityId in open answers.
    gateway_oid: str
    #: Comes back as SourceId in open answers.
    source_oid: str
    birth_date: date | None = None
    payload: str = FHIR_JSON
    status: str = "requested"
    id: str | None = None


def build_subscription(
    bsn: str,
    provider_ura: str,
    provider_type: str,
    endpoint: str,
    gateway_oid: str,
    source_oid: str,
    birth_date: date | None = None,
) -> dict[str, Any]:
    """The FHIR R4 Subscription to POST.

    OIDs may be given bare or as ``urn:oid:``; they are written with the prefix the FHIR ``oid`` type
    requires, so callers need not care which form their config holds.
    """
    require_bsn(bsn)
    require_ura("provider_ura", provider_ura)
    require_text("provider_type", provider_type)
    require_text("endpoint", endpoint)
    for name, oid in (("gateway_oid", gateway_oid), ("source_oid", source_oid)):
        if not is_oid(bare_oid(oid)):
            raise MitzRequestError(f"{name} must be an OID")
    extension: list[dict[str, str]] = []
    if birth_date is not None:
        extension.append({"url": EXT_BIRTH_DATE, "valueDate": birth_date.isoformat()})
    extension.append({"url": EXT_GATEWAY, "valueOid": f"urn:oid:{bare_oid(gateway_oid)}"})
    extension.append({"url": EXT_SOURCE, "valueOid": f"urn:oid:{bare_oid(source_oid)}"})
    return {
        "resourceType": "Subscription",
        "extension": extension,
        "status": "requested",
        "reason": "OTV",
        "criteria": (f"Consent?_query=otv&patientid={bsn}&providerid={provider_ura}"
                     f"&providertype={provider_type}"),
        "channel": {"type": "rest-hook", "endpoint": endpoint, "payload": FHIR_JSON},
    }


def _str_field(obj: Mapping[str, Any], key: str, where: str) -> str:
    value = obj.get(key)
    if not isinstance(value, str) or not value:
        raise MitzRequestError(f"{where}.{key} must be a non-empty string")
    return value


def parse_subscription(resource: Mapping[str, Any]) -> Subscription:
    """Strict, as NK's validator: only the three Mitz extensions, the documented criteria, rest-hook."""
    if not isinstance(resource, Mapping):
        raise MitzRequestError("Subscription must be a JSON object")
    if resource.get("resourceType") != "Subscription":
        raise MitzRequestError("resourceType must be Subscription")
    extra = set(resource) - _SUBSCRIPTION_KEYS
    if extra:
        raise MitzRequestError(f"unexpected Subscription elements {sorted(extra)}")
    status = _str_field(resource, "status", "Subscription")
    if status not in ("requested", "active"):
        raise MitzRequestError("status must be requested (or active when read back)")
    if resource.get("reason") != "OTV":
        raise MitzRequestError("reason must be OTV")

    criteria = _str_field(resource, "criteria", "Subscription")
    path, sep, query = criteria.partition("?")
    if path != "Consent" or not sep:
        raise MitzRequestError("criteria must be a Consent query")
    pairs = parse_qsl(query, keep_blank_values=True, strict_parsing=False)
    keys = [k for k, _ in pairs]
    if sorted(keys) != sorted(_CRITERIA_KEYS):
        raise MitzRequestError("criteria must hold exactly _query, patientid, providerid and providertype")
    params = dict(pairs)
    if params["_query"] != "otv":
        raise MitzRequestError("criteria _query must be otv")
    bsn = params["patientid"]
    require_bsn(bsn)
    require_ura("criteria providerid", params["providerid"])
    provider_type = require_text("criteria providertype", params["providertype"])

    channel = resource.get("channel")
    if not isinstance(channel, Mapping):
        raise MitzRequestError("channel is required")
    if set(channel) - _CHANNEL_KEYS:
        raise MitzRequestError(f"unexpected channel elements {sorted(set(channel) - _CHANNEL_KEYS)}")
    if channel.get("type") != "rest-hook":
        raise MitzRequestError("channel.type must be rest-hook")
    endpoint = _str_field(channel, "endpoint", "channel")
    if urlsplit(endpoint).scheme not in ("http", "https") or not urlsplit(endpoint).netloc:
        raise MitzRequestError("channel.endpoint must be an http(s) URL")
    payload = _str_field(channel, "payload", "channel")
    if payload not in FHIR_PAYLOADS:
        raise MitzRequestError("channel.payload must be application/fhir+json or application/fhir+xml")

    extensions = resource.get("extension", [])
    if not isinstance(extensions, list):
        raise MitzRequestError("extension must be a list")
    found: dict[str, Mapping[str, Any]] = {}
    for ext in extensions:
        if not isinstance(ext, Mapping):
            raise MitzRequestError("extension entries must be objects")
        url = ext.get("url")
        if url not in SUBSCRIPTION_EXTENSIONS:
            raise MitzRequestError(f"extension {url!r} is not allowed")
        if url in found:
            raise MitzRequestError(f"extension {url} appears twice")
        found[url] = ext
    oids: dict[str, str] = {}
    for url in (EXT_GATEWAY, EXT_SOURCE):
        ext = found.get(url)
        if ext is None:
            raise MitzRequestError(f"extension {url} is required")
        if set(ext) != {"url", "valueOid"}:
            raise MitzRequestError(f"extension {url} must carry exactly a valueOid")
        value = ext["valueOid"]
        if not isinstance(value, str) or not value.startswith("urn:oid:") or not is_oid(bare_oid(value)):
            raise MitzRequestError(f"extension {url} valueOid must be urn:oid:<OID>")
        oids[url] = bare_oid(value)
    birth_date: date | None = None
    if EXT_BIRTH_DATE in found:
        ext = found[EXT_BIRTH_DATE]
        value = ext.get("valueDate")
        if set(ext) != {"url", "valueDate"} or not isinstance(value, str) or not _DATE_RE.match(value):
            raise MitzRequestError("birthDate extension must carry a valueDate YYYY-MM-DD")
        try:
            birth_date = date.fromisoformat(value)
        except ValueError as e:
            raise MitzRequestError("birthDate extension valueDate is not a date") from e
    sub_id = resource.get("id")
    if sub_id is not None and not isinstance(sub_id, str):
        raise MitzRequestError("id must be a string")
    return Subscription(
        bsn=bsn,
        provider_ura=params["providerid"],
        provider_type=provider_type,
        endpoint=endpoint,
        gateway_oid=oids[EXT_GATEWAY],
        source_oid=oids[EXT_SOURCE],
        birth_date=birth_date,
        payload=payload,
        status=status,
        id=sub_id,
    )


def subscription_resource(sub: Subscription) -> dict[str, Any]:
    """A stored subscription as Mitz would return it on read (with id and status)."""
    resource = build_subscription(sub.bsn, sub.provider_ura, sub.provider_type, sub.endpoint,
                                  sub.gateway_oid, sub.source_oid, sub.birth_date)
    resource["channel"]["payload"] = sub.payload
    resource["status"] = sub.status
    if sub.id is not None:
        resource = {"resourceType": "Subscription", "id": sub.id,
                    **{k: v for k, v in resource.items() if k != "resourceType"}}
    return resource


# --------------------------------------------------------------------------------------------------
# Notification: a transaction Bundle of Consent, Patient and Organization (mitz.md §4)
# --------------------------------------------------------------------------------------------------

CONSENT_NOTIFY_PROFILE: Final = "http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"
EXT_PROVIDER_CATEGORY: Final = "http://fhir.nl/StructureDefinition/OTV-ProviderCategory"
RPZAC_SYSTEM: Final = "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie"
GGC_SYSTEM: Final = "http://fhir.nl/otv/CodeSystem/gegevenscategorie"
CONSENT_SCOPE_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/consentscope"
PARTICIPATION_SYSTEM: Final = "http://terminology.hl7.org/CodeSystem/v3-ParticipationType"
ACT_REASON_SYSTEM: Final = "http://hl7.org/fhir/v3/ActReason"
BSN_SYSTEM: Final = "http://fhir.nl/fhir/NamingSystem/bsn"
URA_SYSTEM: Final = "http://fhir.nl/fhir/NamingSystem/ura"
ORG_TYPE_SYSTEM: Final = "http://nictiz.nl/fhir/NamingSystem/organization-type"

#: Every requester category of mitz.md §5, for notifications that do not distinguish them.
ALL_PROVIDER_CATEGORIES: Final[tuple[str, ...]] = (
    "RPZAC001", "RPZAC003", "RPZAC004", "RPZAC005", "RPZAC103", "RPZAC104", "RPZAC200")


@dataclass(frozen=True, kw_only=True)
class ConsentStatement:
    """One Consent entry: for these requester categories, is sharing this data category permitted."""

    provider_categories: tuple[str, ...]
    permit: bool
    category: str = "GGC002"
    purpose: str = "TREAT"


@dataclass(frozen=True, kw_only=True)
class Notification:
    """What Mitz tells a subscribed data holder about one patient's consent for that holder."""

    bsn: str
    holder_ura: str
    holder_type: str
    date_time: datetime
    statements: tuple[ConsentStatement, ...]

    def permits(self, provider_category: str, category: str = "GGC002") -> bool:
        """Fail closed: permitted only when a statement names this requester category and permits."""
        return any(s.permit and s.category == category and provider_category in s.provider_categories
                   for s in self.statements)


def _entry(resource: dict[str, Any], full_id: str, kind: str) -> dict[str, Any]:
    return {"fullUrl": f"urn:uuid:{full_id}", "resource": resource,
            "request": {"method": "POST", "url": kind}}


def build_notification(n: Notification, bundle_id: str | None = None) -> dict[str, Any]:
    """A transaction Bundle shaped like NK's example: Consent entries first, then Patient, Organization.

    Consent given is ``active`` with ``provision.type=permit``; no consent is ``inactive`` with no
    ``provision.type`` — exactly the two shapes of the example, nothing else.
    """
    if not n.statements:
        raise ValueError("a notification needs at least one Consent statement")
    require_bsn(n.bsn)
    patient_id, org_id = str(uuid.uuid4()), str(uuid.uuid4())
    when = format_datetime(n.date_time)
    entries: list[dict[str, Any]] = []
    for s in n.statements:
        if not s.provider_categories:
            raise ValueError("a Consent statement needs at least one requester category")
        consent_id = str(uuid.uuid4())
        provision: dict[str, Any] = {}
        if s.permit:
            provision["type"] = "permit"
        provision["actor"] = [{
            "role": {"coding": [{"system": PARTICIPATION_SYSTEM, "code": "CST"}]},
            "reference": {"reference": f"urn:uuid:{org_id}"},
        }]
        provision["purpose"] = [{"system": ACT_REASON_SYSTEM, "code": s.purpose}]
        consent = {
            "resourceType": "Consent",
            "id": consent_id,
            "meta": {"profile": [CONSENT_NOTIFY_PROFILE]},
            "extension": [
                {"url": EXT_PROVIDER_CATEGORY,
                 "valueCodeableConcept": {"coding": [{"system": RPZAC_SYSTEM, "code": code}]}}
                for code in s.provider_categories
            ],
            "status": "active" if s.permit else "inactive",
            "scope": {"coding": [{"system": CONSENT_SCOPE_SYSTEM, "code": "patient-privacy"}]},
            "category": [{"coding": [{"system": GGC_SYSTEM, "code": s.category}]}],
            "patient": {"reference": f"urn:uuid:{patient_id}"},
            "dateTime": when,
            "provision": provision,
        }
        entries.append(_entry(consent, consent_id, "Consent"))
    entries.append(_entry({"resourceType": "Patient", "id": patient_id,
                           "identifier": [{"system": BSN_SYSTEM, "value": n.bsn}]}, patient_id, "Patient"))
    entries.append(_entry({"resourceType": "Organization", "id": org_id,
                           "identifier": [{"system": URA_SYSTEM, "value": n.holder_ura}],
                           "type": [{"coding": [{"system": ORG_TYPE_SYSTEM, "code": n.holder_type}]}]},
                          org_id, "Organization"))
    return {"resourceType": "Bundle", "id": bundle_id or str(uuid.uuid4()), "type": "transaction",
            "entry": entries}


def _obj(value: Any, what: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise MitzAnswerError(f"{what} must be a JSON object")
    return value


def _list(value: Any, what: str) -> list[Any]:
    if not isinstance(value, list):
        raise MitzAnswerError(f"{what} must be a JSON array")
    return value


def _single_coding(concept: Any, system: str, what: str) -> str:
    codings = _list(_obj(concept, what).get("coding"), f"{what}.coding")
    matching = [c for c in codings if isinstance(c, Mapping) and c.get("system") == system]
    if len(matching) != 1 or not isinstance(matching[0].get("code"), str) or not matching[0]["code"]:
        raise MitzAnswerError(f"{what} must hold one coding of {system}")
    code: str = matching[0]["code"]
    return code


def _single_identifier(resource: Mapping[str, Any], system: str, what: str) -> str:
    ids = [i for i in _list(resource.get("identifier"), f"{what}.identifier")
           if isinstance(i, Mapping) and i.get("system") == system]
    if len(ids) != 1 or not isinstance(ids[0].get("value"), str) or not ids[0]["value"]:
        raise MitzAnswerError(f"{what} must hold one identifier of {system}")
    value: str = ids[0]["value"]
    return value


def _parse_consent(consent: Mapping[str, Any], patient_url: str, org_url: str, i: int) -> ConsentStatement:
    where = f"Consent {i}"
    profiles = _obj(consent.get("meta"), f"{where}.meta").get("profile")
    if not isinstance(profiles, list) or CONSENT_NOTIFY_PROFILE not in profiles:
        raise MitzAnswerError(f"{where}: profile {CONSENT_NOTIFY_PROFILE} is required")
    categories: list[str] = []
    for ext in _list(consent.get("extension"), f"{where}.extension"):
        ext = _obj(ext, f"{where}.extension")
        if ext.get("url") != EXT_PROVIDER_CATEGORY:
            raise MitzAnswerError(f"{where}: unexpected extension {ext.get('url')!r}")
        categories.append(_single_coding(ext.get("valueCodeableConcept"), RPZAC_SYSTEM, f"{where} category"))
    if not categories:
        raise MitzAnswerError(f"{where}: at least one OTV-ProviderCategory is required")
    if _single_coding(consent.get("scope"), CONSENT_SCOPE_SYSTEM, f"{where}.scope") != "patient-privacy":
        raise MitzAnswerError(f"{where}: scope must be patient-privacy")
    data_categories = _list(consent.get("category"), f"{where}.category")
    if len(data_categories) != 1:
        raise MitzAnswerError(f"{where}: exactly one gegevenscategorie is required")
    data_category = _single_coding(data_categories[0], GGC_SYSTEM, f"{where}.category")
    if _obj(consent.get("patient"), f"{where}.patient").get("reference") != patient_url:
        raise MitzAnswerError(f"{where}: patient must reference the Patient entry")
    if not isinstance(consent.get("dateTime"), str):
        raise MitzAnswerError(f"{where}: dateTime is required")
    provision = _obj(consent.get("provision"), f"{where}.provision")
    actors = _list(provision.get("actor"), f"{where}.provision.actor")
    if len(actors) != 1:
        raise MitzAnswerError(f"{where}: exactly one provision.actor is required")
    actor = _obj(actors[0], f"{where}.provision.actor")
    if _single_coding(actor.get("role"), PARTICIPATION_SYSTEM, f"{where} actor role") != "CST":
        raise MitzAnswerError(f"{where}: actor role must be CST")
    if _obj(actor.get("reference"), f"{where} actor reference").get("reference") != org_url:
        raise MitzAnswerError(f"{where}: actor must reference the Organization entry")
    purposes = [p for p in _list(provision.get("purpose"), f"{where}.provision.purpose")
                if isinstance(p, Mapping) and p.get("system") == ACT_REASON_SYSTEM]
    if len(purposes) != 1 or not isinstance(purposes[0].get("code"), str):
        raise MitzAnswerError(f"{where}: one ActReason purpose is required")
    status, ptype = consent.get("status"), provision.get("type")
    if status == "active" and ptype == "permit":
        permit = True
    elif status == "inactive" and ptype is None:
        permit = False
    else:
        # Only the two documented shapes are understood; anything else must not be read as consent.
        raise MitzAnswerError(f"{where}: status {status!r} with provision.type {ptype!r} is not understood")
    return ConsentStatement(provider_categories=tuple(categories), permit=permit, category=data_category,
                            purpose=purposes[0]["code"])


def parse_notification(bundle: Mapping[str, Any]) -> Notification:
    """Strict reading of a notification; raises :class:`MitzAnswerError` on anything undocumented.

    The notification's date is the newest Consent ``dateTime``, so a receiver can order updates.
    """
    bundle = _obj(bundle, "notification")
    if bundle.get("resourceType") != "Bundle" or bundle.get("type") != "transaction":
        raise MitzAnswerError("notification must be a transaction Bundle")
    by_type: dict[str, list[tuple[str, Mapping[str, Any]]]] = {}
    for entry in _list(bundle.get("entry"), "Bundle.entry"):
        entry = _obj(entry, "Bundle.entry")
        full_url = entry.get("fullUrl")
        resource = _obj(entry.get("resource"), "Bundle.entry.resource")
        kind = resource.get("resourceType")
        if not isinstance(full_url, str) or kind not in ("Consent", "Patient", "Organization"):
            raise MitzAnswerError("Bundle entries must be Consent, Patient or Organization with a fullUrl")
        by_type.setdefault(kind, []).append((full_url, resource))
    for kind in ("Patient", "Organization"):
        if len(by_type.get(kind, [])) != 1:
            raise MitzAnswerError(f"notification must hold exactly one {kind}")
    if not by_type.get("Consent"):
        raise MitzAnswerError("notification holds no Consent")
    patient_url, patient = by_type["Patient"][0]
    org_url, org = by_type["Organization"][0]
    bsn = _single_identifier(patient, BSN_SYSTEM, "Patient")
    require_bsn(bsn, MitzAnswerError)
    holder_ura = _single_identifier(org, URA_SYSTEM, "Organization")
    types = _list(org.get("type"), "Organization.type")
    if len(types) != 1:
        raise MitzAnswerError("Organization must hold one type")
    holder_type = _single_coding(types[0], ORG_TYPE_SYSTEM, "Organization.type")
    statements = tuple(_parse_consent(c, patient_url, org_url, i)
                       for i, (_, c) in enumerate(by_type["Consent"]))
    times = [parse_time(c.get("dateTime"), "Consent.dateTime", MitzAnswerError)
             for _, c in by_type["Consent"]]
    return Notification(bsn=bsn, holder_ura=holder_ura, holder_type=holder_type, date_time=max(times),
                        statements=statements)
