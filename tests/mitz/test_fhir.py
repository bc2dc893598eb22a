"""The Mitz FHIR codec against mitz.md §4: the Subscription DUO registers, the notification it reads."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, date, datetime
from typing import Any

import pytest

from duo_gateway.mitz.codec import MitzAnswerError, MitzRequestError
from duo_gateway.mitz.fhir import (
    ALL_PROVIDER_CATEGORIES,
    ConsentStatement,
    Notification,
    build_notification,
    build_subscription,
    parse_notification,
    parse_subscription,
)

# ------------------------------------------------------------------------------ subscription


def test_subscription_json_shape() -> None:
    sub = build_subscription(
        "900186021",
        "00000659",
        "V6",
        "https://gw.example/mitz/notify",
        gateway_oid="urn:oid:2.16.840.1.113883.2.4.6.6.1",
        source_oid="2.16.840.1.113883.2.4.6.6.90000017",
        birth_date=date(1958, 11, 2),
    )
    assert sub == {
        "resourceType": "Subscription",
        "extension": [
            {"url": "http://fhir.nl/StructureDefinition/Patient.birthDate", "valueDate": "1958-11-02"},
            {
                "url": "http://fhir.nl/StructureDefinition/GatewaySystem",
                "valueOid": "urn:oid:2.16.840.1.113883.2.4.6.6.1",
            },
            {
                "url": "http://fhir.nl/StructureDefinition/SourceSystem",
                "valueOid": "urn:oid:2.16.840.1.113883.2.4.6.6.90000017",
            },
        ],
        "status": "requested",
        "reason": "OTV",
        "criteria": "Consent?_query=otv&patientid=900186021&providerid=00000659&providertype=V6",
        "channel": {
            "type": "rest-hook",
            "endpoint": "https://gw.example/mitz/notify",
            "payload": "application/fhir+json",
        },
    }
    assert "id" not in sub
    parsed = parse_subscription(sub)
    assert (parsed.bsn, parsed.provider_ura, parsed.provider_type, parsed.endpoint) == (
        "900186021",
        "00000659",
        "V6",
        "https://gw.example/mitz/notify",
    )
    assert (parsed.gateway_oid, parsed.source_oid, parsed.birth_date) == (
        "2.16.840.1.113883.2.4.6.6.1",
        "2.16.840.1.113883.2.4.6.6.90000017",
        date(1958, 11, 2),
    )


def test_subscription_without_birth_date_has_two_extensions() -> None:
    sub = build_subscription("900186021", "00000659", "V6", "https://gw/n", "1.2.3", "1.2.3.1")
    assert [e["url"] for e in sub["extension"]] == [
        "http://fhir.nl/StructureDefinition/GatewaySystem",
        "http://fhir.nl/StructureDefinition/SourceSystem",
    ]
    assert parse_subscription(sub).birth_date is None


def _sub() -> dict[str, Any]:
    return build_subscription("900186021", "00000659", "V6", "https://gw/n", "1.2.3", "1.2.3.1")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s["extension"].append({"url": "http://example.org/other", "valueString": "x"}),
        lambda s: s["extension"].append(dict(s["extension"][0])),
        lambda s: s["extension"].pop(0),
        lambda s: s["extension"][1].update(valueOid="1.2.3.1"),
        lambda s: s.update(criteria="Consent?_query=otv&patientid=900186021&providerid=00000659"),
        lambda s: s.update(
            criteria="Consent?_query=otv&patientid=900186022&providerid=00000659&providertype=V6"
        ),
        lambda s: s.update(
            criteria="Patient?_query=otv&patientid=900186021&providerid=00000659&providertype=V6"
        ),
        lambda s: s.update(criteria=s["criteria"] + "&extra=1"),
        lambda s: s.update(reason="other"),
        lambda s: s.update(status="off"),
        lambda s: s["channel"].update(type="websocket"),
        lambda s: s["channel"].update(payload="text/plain"),
        lambda s: s["channel"].update(endpoint="ftp://x/"),
        lambda s: s.update(contained=[]),
        lambda s: s.update(resourceType="Consent"),
    ],
)
def test_parse_subscription_is_strict(mutate: Any) -> None:
    sub = _sub()
    parse_subscription(sub)  # the unmutated control is accepted
    mutate(sub)
    with pytest.raises(MitzRequestError):
        parse_subscription(sub)


# ------------------------------------------------------------------------------ notification

NOTIFICATION = Notification(
    bsn="900186021",
    holder_ura="00000659",
    holder_type="V6",
    date_time=datetime(2026, 3, 4, 10, 15, 30, tzinfo=UTC),
    statements=(
        ConsentStatement(provider_categories=("RPZAC005",), permit=True),
        ConsentStatement(provider_categories=("RPZAC001", "RPZAC104"), permit=False),
    ),
)


def test_notification_shape() -> None:
    bundle = build_notification(NOTIFICATION, bundle_id="b1")
    assert (bundle["resourceType"], bundle["id"], bundle["type"]) == ("Bundle", "b1", "transaction")
    kinds = [e["resource"]["resourceType"] for e in bundle["entry"]]
    assert kinds == ["Consent", "Consent", "Patient", "Organization"]
    for e in bundle["entry"]:
        assert e["fullUrl"] == f"urn:uuid:{e['resource']['id']}"
        assert e["request"] == {"method": "POST", "url": e["resource"]["resourceType"]}
    patient_url, org_url = bundle["entry"][2]["fullUrl"], bundle["entry"][3]["fullUrl"]
    given, refused = bundle["entry"][0]["resource"], bundle["entry"][1]["resource"]
    assert given["meta"] == {"profile": ["http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"]}
    assert given["extension"] == [
        {
            "url": "http://fhir.nl/StructureDefinition/OTV-ProviderCategory",
            "valueCodeableConcept": {
                "coding": [
                    {
                        "system": "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie",
                        "code": "RPZAC005",
                    }
                ]
            },
        }
    ]
    assert given["status"] == "active"
    assert given["scope"] == {
        "coding": [
            {"system": "http://terminology.hl7.org/CodeSystem/consentscope", "code": "patient-privacy"}
        ]
    }
    assert given["category"] == [
        {"coding": [{"system": "http://fhir.nl/otv/CodeSystem/gegevenscategorie", "code": "GGC002"}]}
    ]
    assert given["patient"] == {"reference": patient_url}
    assert given["dateTime"] == "2026-03-04T10:15:30.000Z"
    assert given["provision"] == {
        "type": "permit",
        "actor": [
            {
                "role": {
                    "coding": [
                        {
                            "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                            "code": "CST",
                        }
                    ]
                },
                "reference": {"reference": org_url},
            }
        ],
        "purpose": [{"system": "http://hl7.org/fhir/v3/ActReason", "code": "TREAT"}],
    }
    assert refused["status"] == "inactive"
    assert "type" not in refused["provision"]
    assert len(refused["extension"]) == 2
    assert bundle["entry"][2]["resource"]["identifier"] == [
        {"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "900186021"}
    ]
    org = bundle["entry"][3]["resource"]
    assert org["identifier"] == [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00000659"}]
    assert org["type"] == [
        {"coding": [{"system": "http://nictiz.nl/fhir/NamingSystem/organization-type", "code": "V6"}]}
    ]


def test_notification_round_trip() -> None:
    parsed = parse_notification(build_notification(NOTIFICATION))
    assert parsed == NOTIFICATION
    assert parsed.permits("RPZAC005")
    assert not parsed.permits("RPZAC104")
    assert not parsed.permits("RPZAC005", category="GGC013")
    revoked = replace(
        NOTIFICATION,
        **{"statements": (ConsentStatement(provider_categories=ALL_PROVIDER_CATEGORIES, permit=False),)},
    )
    assert not any(
        parse_notification(build_notification(revoked)).permits(c) for c in ALL_PROVIDER_CATEGORIES
    )


def test_parse_notification_reads_a_hand_written_mitz_style_bundle() -> None:
    """Independent of the builder: extra coding fields (version, display), text, 7-digit fractions."""
    consent: dict[str, Any] = {
        "resourceType": "Consent",
        "id": "c1",
        "meta": {"profile": ["http://vzvz.nl/fhir/StructureDefinition/Consent-Mitz-Notify|3.8.0"]},
        "text": {"status": "generated", "div": '<div xmlns="http://www.w3.org/1999/xhtml">toestemming</div>'},
        "extension": [
            {
                "url": "http://fhir.nl/StructureDefinition/OTV-ProviderCategory",
                "valueCodeableConcept": {
                    "coding": [
                        {
                            "system": "http://fhir.nl/otv/CodeSystem/raadplegende-zorgaanbiedercategorie",
                            "version": "3960100",
                            "code": "RPZAC104",
                            "display": "Ziekenhuizen",
                        }
                    ]
                },
            }
        ],
        "status": "active",
        "scope": {
            "coding": [
                {
                    "system": "http://terminology.hl7.org/CodeSystem/consentscope",
                    "version": "3960100",
                    "code": "patient-privacy",
                }
            ]
        },
        "category": [
            {
                "coding": [
                    {
                        "system": "http://fhir.nl/otv/CodeSystem/gegevenscategorie",
                        "code": "GGC002",
                        "display": "Behandelgegevens",
                    }
                ]
            }
        ],
        "patient": {"reference": "urn:uuid:p"},
        "dateTime": "2024-11-18T10:51:16.8967927Z",
        "provision": {
            "type": "permit",
            "actor": [
                {
                    "role": {
                        "coding": [
                            {
                                "system": "http://terminology.hl7.org/CodeSystem/v3-ParticipationType",
                                "code": "CST",
                            }
                        ]
                    },
                    "reference": {"reference": "urn:uuid:o"},
                }
            ],
            "purpose": [{"system": "http://hl7.org/fhir/v3/ActReason", "code": "TREAT"}],
        },
    }
    bundle = {
        "resourceType": "Bundle",
        "id": "b",
        "type": "transaction",
        "entry": [
            {"fullUrl": "urn:uuid:c1", "resource": consent},
            {
                "fullUrl": "urn:uuid:p",
                "resource": {
                    "resourceType": "Patient",
                    "id": "p",
                    "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/bsn", "value": "900186021"}],
                },
            },
            {
                "fullUrl": "urn:uuid:o",
                "resource": {
                    "resourceType": "Organization",
                    "id": "o",
                    "identifier": [{"system": "http://fhir.nl/fhir/NamingSystem/ura", "value": "00000659"}],
                    "type": [
                        {
                            "coding": [
                                {
                                    "system": "http://nictiz.nl/fhir/NamingSystem/organization-type",
                                    "code": "Z3",
                                }
                            ]
                        }
                    ],
                },
            },
        ],
    }
    parsed = parse_notification(bundle)
    assert (parsed.bsn, parsed.holder_ura, parsed.holder_type) == ("900186021", "00000659", "Z3")
    assert parsed.date_time == datetime(2024, 11, 18, 10, 51, 16, 896792, tzinfo=UTC)
    assert parsed.permits("RPZAC104")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda b: b["entry"][0]["resource"]["provision"].pop("type"),  # active without permit
        lambda b: b["entry"][1]["resource"]["provision"].update(type="permit"),  # inactive with permit
        lambda b: b["entry"][0]["resource"].update(status="proposed"),
        lambda b: b["entry"][0]["resource"].update(patient={"reference": "urn:uuid:someone-else"}),
        lambda b: b["entry"][0]["resource"]["provision"]["actor"][0]["role"]["coding"][0].update(code="PRCP"),
        lambda b: b["entry"][0]["resource"]["extension"].append(
            {"url": "http://example.org/x", "valueString": "y"}
        ),
        lambda b: b["entry"][0]["resource"].update(meta={"profile": []}),
        lambda b: b.update(type="batch"),
        lambda b: b["entry"].pop(2),  # no Patient
        lambda b: b["entry"][2]["resource"]["identifier"][0].update(value="900186022"),
    ],
)
def test_parse_notification_is_strict(mutate: Any) -> None:
    bundle = build_notification(NOTIFICATION)
    parse_notification(bundle)  # control
    mutate(bundle)
    with pytest.raises(MitzAnswerError):
        parse_notification(bundle)
