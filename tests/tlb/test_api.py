"""The TLB timeline API's HTTP edge, over real HTTP on loopback, with a fake TimelineProvider.

The orchestration behind the provider is tested elsewhere; here: what reaches the provider, what the
caller gets back, and how every kind of bad input is refused.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import date
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from structlog.testing import capture_logs

from duo_gateway.config.timeline import TimelineConfig
from duo_gateway.daemon import Gateway
from duo_gateway.http.server import build_app
from duo_gateway.observability.metrics import Metrics
from duo_gateway.timeline.model import Report, SourceOutcome, TimelineRequest
from duo_gateway.timeline.result import MergedStudy, TimelineResult
from duo_gateway.tlb.api import DEFAULT_SCHEMA_PATH, TlbApiDoor
from duo_gateway.xua import Claims
from tests.support.clients import plain_clients, plain_directory
from tests.support.gateway import make_config

BSN = "999911120"
OTHER_BSN = "900186021"
#: Nine digits failing the 11-proef: refused, and must not be logged either.
BAD_BSN = "999911121"
URL = "/tlb/v1/timeline"
PROBLEM_JSON = "application/problem+json"


def valid_body() -> dict[str, Any]:
    """The contract's own example."""
    return {
        "patient": {"bsn": BSN},
        "period": {"from": "2015-01-01", "to": "2026-12-31"},
        "institutions": ["00000659"],
        "requester": {"ura": "00000666", "organization_type": "V6", "uzi": "000095254", "role": "01.015",
                      "purpose": "TREAT"},
    }


CANNED = TimelineResult(
    studies=[
        MergedStudy(
            study_uid="1.2.826.0.1.3680043.8.498.1", id="opaque-1", started="2024-03-01T10:12:00",
            accession_number="ACC-1", modalities=("CT", "SR"), description="CT thorax", body_part="CHEST",
            series_count=3, instance_count=120, institution_ura="00000659",
            institution_name="Ziekenhuis Oost",
            reports=(Report(id="1.2.3.4", title="Verslag CT thorax", mime_type="application/dicom"),
                     Report(id="1.2.3.5", title=None)),
            sources=("urn:oid:1.2.3", "tlb:00000659")),
        MergedStudy(study_uid="1.2.826.0.1.3680043.8.498.9", id="opaque-2"),
    ],
    sources=[
        SourceOutcome(id="urn:oid:1.2.3", kind="xca", name="Twiin", status="ok", elapsed_ms=41.4),
        SourceOutcome(id="tlb:00000659", kind="tlb", name="Ziekenhuis Oost", status="ok", elapsed_ms=62.6),
        SourceOutcome(id="tlb:00000777", kind="tlb", name="Ziekenhuis West", status="no-consent",
                      detail="Mitz gave no permission", elapsed_ms=0.2),
    ],
)

#: CANNED as the contract spells it, written out by hand so the conversion is checked, not repeated.
CANNED_JSON = {
    "studies": [
        {"id": "opaque-1", "study_instance_uid": "1.2.826.0.1.3680043.8.498.1", "accession_number": "ACC-1",
         "started": "2024-03-01T10:12:00", "modalities": ["CT", "SR"], "description": "CT thorax",
         "body_part": "CHEST", "series_count": 3, "instance_count": 120,
         "institution": {"ura": "00000659", "name": "Ziekenhuis Oost"},
         "reports": [{"id": "1.2.3.4", "title": "Verslag CT thorax", "mime_type": "application/dicom"},
                     {"id": "1.2.3.5", "title": None, "mime_type": None}],
         "sources": ["urn:oid:1.2.3", "tlb:00000659"]},
        {"id": "opaque-2", "study_instance_uid": "1.2.826.0.1.3680043.8.498.9", "accession_number": None,
         "started": None, "modalities": [], "description": None, "body_part": None, "series_count": None,
         "instance_count": None, "institution": {"ura": None, "name": None}, "reports": [], "sources": []},
    ],
    "sources": [
        {"id": "urn:oid:1.2.3", "kind": "xca", "name": "Twiin", "status": "ok", "detail": "",
         "elapsed_ms": 41},
        {"id": "tlb:00000659", "kind": "tlb", "name": "Ziekenhuis Oost", "status": "ok", "detail": "",
         "elapsed_ms": 63},
        {"id": "tlb:00000777", "kind": "tlb", "name": "Ziekenhuis West", "status": "no-consent",
         "detail": "Mitz gave no permission", "elapsed_ms": 0},
    ],
}


@dataclass
class FakeProvider:
    """Records what it is asked and answers with a canned result, an exception, or not at all."""

    result: TimelineResult = CANNED
    error: BaseException | None = None
    hang: bool = False
    requests: list[TimelineRequest] = field(default_factory=list)

    async def timeline(self, request: TimelineRequest) -> TimelineResult:
        self.requests.append(request)
        if self.hang:
            await asyncio.Event().wait()
        if self.error is not None:
            raise self.error
        return self.result


Api = tuple[TestClient[web.Request, web.Application], FakeProvider]


@pytest.fixture
async def make_api() -> AsyncIterator[Callable[..., Any]]:
    """Starts the door in DUO's real HTTP app (middleware included) on a loopback port."""
    clients: list[TestClient[web.Request, web.Application]] = []

    async def start(provider: FakeProvider | None = None, config: TimelineConfig | None = None,
                    **door_kwargs: Any) -> Api:
        provider = provider or FakeProvider()
        door = TlbApiDoor(provider, config or TimelineConfig(), **door_kwargs)
        app = build_app(Metrics(), lambda: [], 1.0, [door], clients=plain_directory(tlb_uras=("00000666",)))
        server = TestServer(app, host="127.0.0.1", port=0)
        client: TestClient[web.Request, web.Application] = TestClient(server)
        await client.start_server()
        clients.append(client)
        return client, provider

    yield start
    for client in clients:
        await client.close()


@pytest.fixture
async def api(make_api: Callable[..., Any]) -> Api:
    result: Api = await make_api()
    return result


async def post_json(client: TestClient[web.Request, web.Application], body: Any,
                    **headers: str) -> tuple[aiohttp.ClientResponse, Any]:
    resp = await client.post(URL, data=json.dumps(body),
                             headers={"Content-Type": "application/json", **headers})
    return resp, await resp.json(content_type=None)


def assert_problem(resp: aiohttp.ClientResponse, problem: Any, status: int, type_suffix: str) -> None:
    assert resp.status == status, problem
    assert resp.content_type == PROBLEM_JSON
    assert problem["type"] == f"urn:duo-gateway:problem:{type_suffix}", problem
    assert problem["status"] == status
    assert problem["title"] and problem["detail"]
    # The request id in the body is the one in the header, so a caller can quote either.
    assert problem["request_id"] == resp.headers["X-Request-ID"]


# --------------------------------------------------------------------------------------------------
# the happy path
# --------------------------------------------------------------------------------------------------


async def test_valid_request_answers_the_contract_and_passes_the_converted_request(api: Api) -> None:
    client, provider = api
    resp, body = await post_json(client, valid_body())
    assert resp.status == 200
    assert resp.content_type == "application/json"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Request-ID"]
    assert body == CANNED_JSON
    assert provider.requests == [TimelineRequest(
        bsn=BSN, date_from=date(2015, 1, 1), date_to=date(2026, 12, 31), institutions=("00000659",),
        requester=Claims(uzi="000095254", role="01.015", ura="00000666", purpose="TREAT",
                         organisation_type="V6", mandated_uzi=None),
        client="tlb:test-tlb")]  # the calling system, as its certificate (here: none) identified it


async def test_optional_members_and_repeated_institutions(api: Api) -> None:
    client, provider = api
    body = valid_body()
    body["institutions"] = ["00000659", "00000777", "00000659"]
    body["requester"] |= {"purpose": "COC", "mandated_uzi": "000054321"}
    body["patient"]["bsn"] = OTHER_BSN
    resp, _ = await post_json(client, body)
    assert resp.status == 200
    request = provider.requests[-1]
    assert request.bsn == OTHER_BSN
    assert request.institutions == ("00000659", "00000777")
    assert request.requester.purpose == "COC" and request.requester.mandated_uzi == "000054321"

    del body["institutions"]
    resp, _ = await post_json(client, body)
    assert resp.status == 200
    assert provider.requests[-1].institutions == ()


async def test_the_period_bound_is_inclusive_and_configurable(make_api: Callable[..., Any]) -> None:
    client, provider = await make_api(config=TimelineConfig(max_period_days=31))
    body = valid_body()
    body["period"] = {"from": "2024-01-01", "to": "2024-01-31"}
    resp, _ = await post_json(client, body)
    assert resp.status == 200
    body["period"] = {"from": "2024-01-01", "to": "2024-02-01"}
    resp, problem = await post_json(client, body)
    assert_problem(resp, problem, 422, "invalid-period")
    assert problem["errors"] == [{"pointer": "/period", "code": "period_too_long",
                                  "detail": "the period covers 32 days; at most 31 are allowed"}]
    # A single day is a period too.
    body["period"] = {"from": "2024-02-29", "to": "2024-02-29"}
    resp, _ = await post_json(client, body)
    assert resp.status == 200
    assert len(provider.requests) == 2


# --------------------------------------------------------------------------------------------------
# bad input: 422 with the member to fix
# --------------------------------------------------------------------------------------------------


def edit(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """Set (or, with ``...``, delete) the member at a slash path of the valid body."""

    def apply(body: dict[str, Any]) -> None:
        *parents, last = path.split("/")
        target: Any = body
        for part in parents:
            target = target[part]
        if value is ...:
            del target[last]
        else:
            target[last] = value

    return apply


INVALID = [
    # (id, edit, problem type, [(pointer, code)])
    ("bsn-11-proef", edit("patient/bsn", BAD_BSN), "invalid-bsn", [("/patient/bsn", "bsn_eleven_test")]),
    ("bsn-all-zeros", edit("patient/bsn", "000000000"), "invalid-bsn", [("/patient/bsn", "bsn_eleven_test")]),
    ("bsn-eight-digits", edit("patient/bsn", "99991112"), "invalid-bsn",
     [("/patient/bsn", "string_pattern_mismatch")]),
    ("bsn-trailing-newline", edit("patient/bsn", BSN + "\n"), "invalid-bsn",
     [("/patient/bsn", "string_pattern_mismatch")]),
    ("bsn-fullwidth-digits", edit("patient/bsn", "９９９９１１１２０"), "invalid-bsn",
     [("/patient/bsn", "string_pattern_mismatch")]),
    ("bsn-as-number", edit("patient/bsn", 999911120), "invalid-bsn", [("/patient/bsn", "string_type")]),
    ("bsn-missing", edit("patient/bsn", ...), "invalid-bsn", [("/patient/bsn", "missing")]),
    ("patient-missing", edit("patient", ...), "invalid-bsn", [("/patient", "missing")]),
    ("period-reversed", edit("period", {"from": "2024-02-01", "to": "2024-01-31"}), "invalid-period",
     [("/period", "period_order")]),
    ("period-unparseable", edit("period/from", "2024-13-01"), "invalid-period",
     [("/period/from", "date_parsing")]),
    ("period-not-a-date", edit("period/to", "gisteren"), "invalid-period", [("/period/to", "date_parsing")]),
    ("period-with-time", edit("period/to", "2024-01-31T00:00:00"), "invalid-period",
     [("/period/to", "date_parsing")]),
    ("period-too-long", edit("period", {"from": "1900-01-01", "to": "2026-12-31"}), "invalid-period",
     [("/period", "period_too_long")]),
    ("period-to-missing", edit("period/to", ...), "invalid-period", [("/period/to", "missing")]),
    ("institution-seven-digits", edit("institutions", ["00000659", "0000065"]), "invalid-institution",
     [("/institutions/1", "string_pattern_mismatch")]),
    ("institution-letters", edit("institutions", ["ZKH-OOST"]), "invalid-institution",
     [("/institutions/0", "string_pattern_mismatch")]),
    ("institutions-not-a-list", edit("institutions", "00000659"), "invalid-institution",
     [("/institutions", "list_type")]),
    ("institutions-too-many", edit("institutions", [f"{i:08d}" for i in range(501)]), "invalid-institution",
     [("/institutions", "too_long")]),
    ("requester-missing", edit("requester", ...), "invalid-requester", [("/requester", "missing")]),
    ("requester-ura", edit("requester/ura", "0000666"), "invalid-requester",
     [("/requester/ura", "string_pattern_mismatch")]),
    ("requester-purpose", edit("requester/purpose", "RESEARCH"), "invalid-requester",
     [("/requester/purpose", "literal_error")]),
    ("requester-role", edit("requester/role", "01015"), "invalid-requester",
     [("/requester/role", "string_pattern_mismatch")]),
    ("requester-org-type-empty", edit("requester/organization_type", ""), "invalid-requester",
     [("/requester/organization_type", "string_pattern_mismatch")]),
    ("requester-uzi-missing", edit("requester/uzi", ...), "invalid-requester",
     [("/requester/uzi", "missing")]),
    ("requester-not-an-object", edit("requester", "dr. Jansen"), "invalid-requester",
     [("/requester", "model_type")]),
    ("unknown-member", edit("bsn", BSN), "invalid-request", [("/bsn", "extra_forbidden")]),
    ("unknown-requester-member", edit("requester/name", "dr. Jansen"), "invalid-request",
     [("/requester/name", "extra_forbidden")]),
    ("member-name-with-slash", lambda b: b.update({"a/b~": 1}), "invalid-request",
     [("/a~1b~0", "extra_forbidden")]),
    ("several-kinds", lambda b: (edit("patient/bsn", BAD_BSN)(b), edit("period/from", "x")(b)),
     "invalid-request", [("/patient/bsn", "bsn_eleven_test"), ("/period/from", "date_parsing")]),
]


@pytest.mark.parametrize(("apply", "type_suffix", "expected"), [case[1:] for case in INVALID],
                         ids=[case[0] for case in INVALID])
async def test_invalid_requests_are_422_problems_naming_the_member(
        api: Api, apply: Callable[[dict[str, Any]], None], type_suffix: str,
        expected: list[tuple[str, str]]) -> None:
    client, provider = api
    body = valid_body()
    apply(body)
    resp, problem = await post_json(client, body)
    assert_problem(resp, problem, 422, type_suffix)
    assert [(e["pointer"], e["code"]) for e in problem["errors"]] == expected
    assert all(e["detail"] for e in problem["errors"])
    assert expected[0][0] in problem["detail"]
    # Nothing the caller sent is echoed back, the BSN least of all.
    assert BAD_BSN not in json.dumps(problem)
    assert provider.requests == []


async def test_claims_have_the_last_word_on_the_requester(api: Api, monkeypatch: pytest.MonkeyPatch) -> None:
    """Should the XUA claim rules grow stricter than the documented patterns, the API refuses with a 422
    naming the requester, not a 500 from deep inside the consent gate."""
    client, provider = api

    def stricter(*_args: object) -> None:
        raise ValueError("role code 01.015 is not accepted here")

    monkeypatch.setattr("duo_gateway.xua._check_claims", stricter)
    resp, problem = await post_json(client, valid_body())
    assert_problem(resp, problem, 422, "invalid-requester")
    assert problem["errors"] == [{"pointer": "/requester", "code": "requester_claims",
                                  "detail": "not acceptable as requester claims: role code 01.015 is not "
                                            "accepted here"}]
    assert provider.requests == []


async def test_a_body_that_is_not_an_object(api: Api) -> None:
    client, _ = api
    for body in ([valid_body()], "timeline", None, 42):
        resp, problem = await post_json(client, body)
        assert_problem(resp, problem, 422, "invalid-request")
        assert [(e["pointer"], e["code"]) for e in problem["errors"]] == [("", "model_type")]


async def test_many_refusals_are_all_listed_but_the_detail_stays_short(api: Api) -> None:
    client, _ = api
    body = valid_body()
    body["institutions"] = ["x"] * 5
    resp, problem = await post_json(client, body)
    assert_problem(resp, problem, 422, "invalid-institution")
    assert [e["pointer"] for e in problem["errors"]] == [f"/institutions/{i}" for i in range(5)]
    assert problem["detail"].endswith("(and 2 more)")


# --------------------------------------------------------------------------------------------------
# bad input: not JSON, wrong media type, too large, wrong path or method
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("raw", [
    b"", b"{", b"{'patient': 1}", b"\xff\xfe{}", "\ufeff{}".encode(),
    json.dumps(valid_body())[:-1].encode() + b', "x": NaN}',
    # Two BSNs in one patient: which one a parser keeps must not decide whose images are shown.
    json.dumps(valid_body()).replace(f'"bsn": "{BSN}"', f'"bsn": "{OTHER_BSN}", "bsn": "{BSN}"').encode(),
    b"[" * 20_000 + b"]" * 20_000,
    b'{"patient": {"bsn": 1' + b"0" * 5000 + b"}}",
    # Python's json takes a lone surrogate escape, pydantic's parser does not: still the caller's fault.
    b'{"patient": {"bsn": "\\ud800"}}',
], ids=["empty", "truncated", "single-quotes", "not-utf8", "bom", "nan", "duplicate-bsn", "deep-nesting",
        "huge-number", "lone-surrogate"])
async def test_malformed_json_is_400(api: Api, raw: bytes) -> None:
    client, provider = api
    resp = await client.post(URL, data=raw, headers={"Content-Type": "application/json"})
    problem = await resp.json(content_type=None)
    assert_problem(resp, problem, 400, "malformed-json")
    assert provider.requests == []


@pytest.mark.parametrize("content_type", [
    None, "text/plain", "application/x-www-form-urlencoded", "application/json; charset=iso-8859-1",
    "application/jsonp", "application/problem+json"])
async def test_other_media_types_are_415(api: Api, content_type: str | None) -> None:
    client, provider = api
    headers = {"Content-Type": content_type} if content_type else {}
    resp = await client.post(URL, data=json.dumps(valid_body()).encode(), headers=headers,
                             skip_auto_headers=["Content-Type"])
    assert_problem(resp, await resp.json(content_type=None), 415, "unsupported-media-type")
    assert provider.requests == []


async def test_json_media_type_parameters_that_change_nothing_are_accepted(api: Api) -> None:
    client, _ = api
    for content_type in ("application/json; charset=utf-8", "Application/JSON; charset=UTF-8"):
        resp = await client.post(URL, data=json.dumps(valid_body()), headers={"Content-Type": content_type})
        assert resp.status == 200, content_type


async def test_bodies_over_the_limit_are_413_whether_or_not_the_length_is_announced(
        make_api: Callable[..., Any]) -> None:
    client, provider = await make_api(max_body_bytes=1024)
    body = valid_body()
    body["institutions"] = ["00000659"] * 100  # about 1.2 KB
    data = json.dumps(body).encode()
    resp = await client.post(URL, data=data, headers={"Content-Type": "application/json"})
    assert_problem(resp, await resp.json(content_type=None), 413, "payload-too-large")

    async def chunks() -> AsyncIterator[bytes]:
        for i in range(0, len(data), 100):
            yield data[i:i + 100]

    resp = await client.post(URL, data=chunks(), headers={"Content-Type": "application/json"})
    assert "Content-Length" not in resp.request_info.headers
    assert_problem(resp, await resp.json(content_type=None), 413, "payload-too-large")
    assert provider.requests == []
    # Just under the limit is fine.
    body["institutions"] = ["00000659"] * 40
    resp, _ = await post_json(client, body)
    assert resp.status == 200


async def test_other_paths_and_methods_are_left_to_the_server(api: Api) -> None:
    client, _ = api
    assert (await client.get(URL)).status == 405
    assert (await client.put(URL, json=valid_body())).status == 405
    assert (await client.post("/tlb/v1/timelines", json=valid_body())).status == 404
    assert (await client.post("/tlb/v2/timeline", json=valid_body())).status == 404


# --------------------------------------------------------------------------------------------------
# DUO's own failures: 500 and 504, without internals
# --------------------------------------------------------------------------------------------------


async def test_a_provider_exception_is_a_500_without_internals(make_api: Callable[..., Any]) -> None:
    provider = FakeProvider(error=RuntimeError(f"pacs exploded while asking for {BSN}"))
    client, _ = await make_api(provider)
    with capture_logs() as logs:
        resp, problem = await post_json(client, valid_body())
    assert_problem(resp, problem, 500, "internal")
    text = json.dumps(problem)
    assert "exploded" not in text and "RuntimeError" not in text and BSN not in text
    assert len(provider.requests) == 1
    failures = [e for e in logs if e["event"] == "tlb_timeline_failed"]
    assert len(failures) == 1 and failures[0]["log_level"] == "error" and failures[0]["exc_info"]
    assert failures[0]["reason"] == "the provider raised"


async def test_a_result_the_api_cannot_express_is_a_500(make_api: Callable[..., Any]) -> None:
    odd = TimelineResult(studies=[MergedStudy(study_uid="1.2.3", id="x", series_count=-1)], sources=[])
    client, _ = await make_api(FakeProvider(result=odd))
    with capture_logs() as logs:
        resp, problem = await post_json(client, valid_body())
    assert_problem(resp, problem, 500, "internal")
    assert [e["reason"] for e in logs if e["event"] == "tlb_timeline_failed"] == [
        "the result does not fit the API's answer"]


async def test_a_provider_overrunning_its_deadline_is_a_504(make_api: Callable[..., Any]) -> None:
    client, provider = await make_api(FakeProvider(hang=True), config=TimelineConfig(deadline_s=0.05),
                                      deadline_grace_s=0.05)
    resp, problem = await post_json(client, valid_body())
    assert_problem(resp, problem, 504, "timeout")
    assert len(provider.requests) == 1


async def test_a_timeout_error_from_inside_the_provider_is_not_mistaken_for_the_deadline(
        make_api: Callable[..., Any]) -> None:
    client, _ = await make_api(FakeProvider(error=TimeoutError("a socket timed out")))
    with capture_logs() as logs:
        resp, problem = await post_json(client, valid_body())
    assert_problem(resp, problem, 500, "internal")
    assert [e["reason"] for e in logs if e["event"] == "tlb_timeline_failed"] == [
        "the provider raised TimeoutError"]


# --------------------------------------------------------------------------------------------------
# logs, mounting, the document
# --------------------------------------------------------------------------------------------------


async def test_no_bsn_in_logs(make_api: Callable[..., Any], caplog: pytest.LogCaptureFixture) -> None:
    """Raw records (structlog events before any scrubbing, stdlib records): the door must not rely on the
    PHI scrubber to keep BSNs out."""
    client, provider = await make_api()
    caplog.set_level(logging.DEBUG)
    with capture_logs() as logs:
        resp, _ = await post_json(client, valid_body())
        assert resp.status == 200
        bad = valid_body()
        bad["patient"]["bsn"] = BAD_BSN
        resp, _ = await post_json(client, bad)
        assert resp.status == 422
        provider.error = RuntimeError("boom")
        resp, _ = await post_json(client, valid_body())
        assert resp.status == 500
    events = [e["event"] for e in logs]
    assert events.count("tlb_timeline") == 1 and events.count("tlb_timeline_refused") == 1
    served = next(e for e in logs if e["event"] == "tlb_timeline")
    assert served["studies"] == 2 and served["requester_ura"] == "00000666"
    refused = next(e for e in logs if e["event"] == "tlb_timeline_refused")
    assert refused["codes"] == ["bsn_eleven_test"] and refused["problem"].endswith("invalid-bsn")
    text = repr(logs) + caplog.text
    assert BSN not in text and BAD_BSN not in text


async def test_disabled_api_is_not_mounted(make_api: Callable[..., Any]) -> None:
    client, _ = await make_api(config=TimelineConfig(enabled=False))
    assert (await client.post(URL, json=valid_body())).status == 404
    assert (await client.get("/tlb/v1/openapi.yaml")).status == 404


async def test_the_document_is_served_with_the_prefix_in_force(make_api: Callable[..., Any]) -> None:
    client, _ = await make_api()
    resp = await client.get("/tlb/v1/openapi.yaml")
    assert resp.status == 200 and resp.content_type == "application/yaml"
    assert await resp.read() == DEFAULT_SCHEMA_PATH.read_bytes()

    client, provider = await make_api(config=TimelineConfig(path_prefix="/api/tlb/v2"))
    resp = await client.get("/api/tlb/v2/openapi.yaml")
    served = yaml.safe_load(await resp.text())
    original = yaml.safe_load(DEFAULT_SCHEMA_PATH.read_text())
    assert served["servers"][0]["url"] == "/api/tlb/v2"
    served["servers"][0]["url"] = original["servers"][0]["url"]
    assert served == original
    resp = await client.post("/api/tlb/v2/timeline", json=valid_body())
    assert resp.status == 200 and len(provider.requests) == 1
    assert (await client.post(URL, json=valid_body())).status == 404


async def test_a_missing_document_does_not_stop_the_api(make_api: Callable[..., Any], tmp_path: Path) -> None:
    with capture_logs() as logs:
        client, _ = await make_api(schema_path=tmp_path / "absent.yaml")
    assert any(e["event"].startswith("tlb api document unreadable") for e in logs)
    assert (await client.get("/tlb/v1/openapi.yaml")).status == 404
    assert (await client.post(URL, json=valid_body())).status == 200


@pytest.fixture
async def any_http_server() -> AsyncIterator[int]:
    """Stands for Mitz: the gateway only needs something listening to start."""
    runner = web.AppRunner(web.Application())
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    yield int(runner.addresses[0][1])
    await runner.cleanup()


async def test_mounted_in_the_gateway(tmp_path: Path, any_http_server: int) -> None:
    provider = FakeProvider()
    # The gateway's own TLB door is off, so the one under test serves the prefix.
    config = make_config(tmp_path, mitz_port=any_http_server, clients=plain_clients(tlb_uras=("00000666",)))
    config = config.model_copy(update={"timeline": TimelineConfig(enabled=False)})
    gateway = Gateway(config, front_doors=[TlbApiDoor(provider, TimelineConfig())])
    await gateway.start()
    try:
        async with aiohttp.ClientSession() as session:
            async with session.post(f"{gateway.http_url}{URL}", json=valid_body()) as resp:
                assert resp.status == 200
                assert await resp.json() == CANNED_JSON
            async with session.post(f"{gateway.http_url}{URL}", data=b"{",
                                    headers={"Content-Type": "application/json"}) as resp:
                assert resp.status == 400 and resp.content_type == PROBLEM_JSON
    finally:
        await gateway.stop()
    assert [r.bsn for r in provider.requests] == [BSN]
