"""schemas/tlb-api.openapi.yaml: valid OpenAPI 3.1, generated where it describes the models, and true of
the running API (schemathesis against a real loopback listener)."""

from __future__ import annotations

import asyncio
import copy
import json
import os
import threading
from collections.abc import Iterator
from typing import Any, get_args

import jsonschema_rs
import pytest
import requests
import schemathesis
import yaml
from aiohttp import web
from hypothesis import HealthCheck, settings
from prometheus_client import CollectorRegistry
from schemathesis.checks import not_a_server_error
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from duo_gateway.audit.messages import Peer
from duo_gateway.config.timeline import TimelineConfig
from duo_gateway.config.transfer import DestinationPacs, TransferConfig
from duo_gateway.config.views import ViewsConfig
from duo_gateway.consent import ConsentGate
from duo_gateway.http.server import build_app
from duo_gateway.mitz.client import ConsentDecision
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.observability.metrics import Metrics
from duo_gateway.saml import PURPOSES
from duo_gateway.timeline.model import SourceKind, SourceStatus
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.tlb.api import DEFAULT_SCHEMA_PATH, TlbApiDoor
from duo_gateway.tlb.models import (
    Problem,
    ProblemType,
    Requester,
    TimelineAnswer,
    TimelineQuery,
    openapi_component_schemas,
)
from duo_gateway.transfer.jobstore import TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.service import TransferService
from duo_gateway.transfer.sources import StudySources
from duo_gateway.views.service import ViewService
from tests.support.clients import plain_directory
from tests.support.gateway import make_config
from tests.tlb.test_api import CANNED, FakeProvider

DOC: dict[str, Any] = yaml.safe_load(DEFAULT_SCHEMA_PATH.read_text(encoding="utf-8"))
SCHEMA = schemathesis.openapi.from_path(DEFAULT_SCHEMA_PATH)
TIMELINE = DOC["paths"]["/timeline"]["post"]
#: Every status any operation documents.
STATUSES = {status for path in DOC["paths"].values() for op in path.values() if isinstance(op, dict)
            for status in op.get("responses", {})}


# --------------------------------------------------------------------------------------------------
# the document itself
# --------------------------------------------------------------------------------------------------


def test_the_document_is_valid_openapi_3_1() -> None:
    assert DOC["openapi"].startswith("3.1.")
    SCHEMA.validate()
    # The check is real: a broken copy is refused.
    broken = copy.deepcopy(DOC)
    broken["paths"]["/timeline"]["post"]["responses"]["200"].pop("description")
    with pytest.raises(jsonschema_rs.ValidationError):
        schemathesis.openapi.from_dict(broken).validate()


def test_every_component_schema_is_valid_json_schema() -> None:
    """OpenAPI 3.1's meta-schema leaves Schema Objects to JSON Schema 2020-12; check them against it."""
    for name, schema in DOC["components"]["schemas"].items():
        assert jsonschema_rs.meta.is_valid(schema), name
    assert not jsonschema_rs.meta.is_valid({"type": "text"})


def test_component_schemas_are_the_models() -> None:
    """The document cannot drift from the code: its schemas are what the models generate.

    On failure, regenerate ``components.schemas`` with the command at the top of the document.
    """
    assert DOC["components"]["schemas"] == openapi_component_schemas()


def test_the_contracts_enumerations_are_the_code_s() -> None:
    schemas = DOC["components"]["schemas"]
    assert set(schemas["Requester"]["properties"]["purpose"]["enum"]) == PURPOSES
    assert set(schemas["Source"]["properties"]["status"]["enum"]) == set(get_args(SourceStatus)) == {
        "ok", "no-consent", "not-localized", "timeout", "unavailable", "error"}
    assert set(schemas["Source"]["properties"]["kind"]["enum"]) == set(get_args(SourceKind)) == {"xca", "tlb"}
    # The contract's member names, fixed.
    assert set(schemas["TimelineQuery"]["required"]) == {"patient", "period", "requester"}
    assert set(schemas["TimelineQuery"]["properties"]) == {"patient", "period", "institutions", "requester"}
    assert set(schemas["Period"]["required"]) == {"from", "to"}
    assert set(schemas["Requester"]["required"]) == {"ura", "organization_type", "uzi", "role", "purpose"}
    assert set(Requester.model_fields) - {"mandated_uzi"} == set(schemas["Requester"]["required"])
    assert set(schemas["Study"]["required"]) >= {
        "id", "study_instance_uid", "accession_number", "started", "modalities", "description", "body_part",
        "series_count", "instance_count", "institution", "reports", "sources"}
    assert set(schemas["Source"]["required"]) == {"id", "kind", "name", "status", "detail", "elapsed_ms"}


def test_every_status_the_api_sends_is_documented_as_a_problem() -> None:
    responses = TIMELINE["responses"]
    assert set(responses) == {"200", "400", "401", "403", "413", "415", "422", "429", "500", "504"}
    components = DOC["components"]["responses"]
    for status, response in responses.items():
        if status == "200":
            continue
        resolved = components[response["$ref"].rsplit("/", 1)[1]]
        assert resolved["content"]["application/problem+json"]["schema"] == {
            "$ref": "#/components/schemas/Problem"}, status
    description = DOC["info"]["description"]
    for problem_type in ProblemType:
        assert f"`{problem_type.value}`" in description, problem_type


def test_the_examples_are_what_the_models_accept() -> None:
    requests_ = TIMELINE["requestBody"]["content"]["application/json"]["examples"]
    assert requests_
    for example in requests_.values():
        TimelineQuery.model_validate_json(json.dumps(example["value"]))
    answers = TIMELINE["responses"]["200"]["content"]["application/json"]["examples"]
    for example in answers.values():
        answer = TimelineAnswer.model_validate(example["value"])
        assert answer.model_dump(mode="json") == example["value"]
    problems = 0
    for response in DOC["components"]["responses"].values():
        content = response["content"]["application/problem+json"]
        for value in [content.get("example"), *(e["value"] for e in content.get("examples", {}).values())]:
            if value is not None:
                problem = Problem.model_validate(value)
                assert problem.type in {t.value for t in ProblemType}
                assert str(problem.status) in STATUSES
                problems += 1
    assert problems >= 6


# --------------------------------------------------------------------------------------------------
# the document against the running API
# --------------------------------------------------------------------------------------------------


class _NoMitz:
    """Schemathesis cannot forge a sealed study id, so no job ever runs and Mitz is never asked."""

    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        raise AssertionError("no transfer job can exist in this test")


@pytest.fixture(scope="module")
def live_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The door in DUO's HTTP app on a loopback port, served from its own thread and event loop, since
    schemathesis calls it synchronously. Transfers are served by the real service over SQLite."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="tlb-api-live", daemon=True)
    thread.start()
    storage = tmp_path_factory.mktemp("transfers")
    config = make_config(storage, mitz_port=9)
    config = config.model_copy(update={"transfers": TransferConfig(destinations=[DestinationPacs(
        name="own-pacs", ae_title="OWN_PACS", host="127.0.0.1", port=9,
        uras=["00000666"])])})
    ids = StudyIds(os.urandom(32))

    async def start() -> tuple[web.AppRunner, TransferService]:
        gate = ConsentGate(_NoMitz(), categories=config.mitz.categories)
        transfers = TransferService(config, store=TransferStore.open(None, storage), study_ids=ids,
                                    gate=gate, sources={}, retrievers={},
                                    metrics=TransferMetrics(CollectorRegistry()), auditor=None)
        await transfers.start()
        # Schemathesis cannot forge a study id either, so no view is ever made: its refusals are checked.
        views = ViewService(ViewsConfig(), study_ids=ids,
                            sources=StudySources(config, gate=gate, sources={}, retrievers={}),
                            root=storage / "views", auditor=None,
                            identity=Peer(user_id="DUO", host="localhost"))
        door = TlbApiDoor(FakeProvider(result=CANNED), TimelineConfig(), transfers=transfers, views=views)
        clients = plain_directory(tlb_uras=("00000666", "00000659"))
        runner = web.AppRunner(build_app(Metrics(), lambda: [], 1.0, [door], clients=clients))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        return runner, transfers

    runner, transfers = asyncio.run_coroutine_threadsafe(start(), loop).result(timeout=10)
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/tlb/v1"
    finally:
        asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(timeout=10)
        asyncio.run_coroutine_threadsafe(transfers.stop(), loop).result(timeout=10)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=10)
        loop.close()


def test_the_documented_examples_get_documented_answers(live_url: str) -> None:
    operation = SCHEMA["/timeline"]["POST"]
    examples = TIMELINE["requestBody"]["content"]["application/json"]["examples"]
    for example in examples.values():
        response = requests.post(f"{live_url}/timeline", json=example["value"], timeout=10)
        assert response.status_code == 200, response.text
        operation.validate_response(response)
    # Every problem the API sends conforms too (the ones schemathesis rarely provokes on its own).
    refused = ((b"{", "application/json", 400), (b"{}", "text/plain", 415),
               (b" " * 70_000, "application/json", 413))
    for data, content_type, status in refused:
        response = requests.post(f"{live_url}/timeline", data=data, headers={"Content-Type": content_type},
                                 timeout=10)
        assert response.status_code == status
        operation.validate_response(response)


CHECKS = [not_a_server_error, response_schema_conformance, status_code_conformance, content_type_conformance]


@SCHEMA.parametrize()
@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), database=None)
def test_the_running_api_conforms_to_the_document(case: schemathesis.Case[Any], live_url: str) -> None:
    case.call_and_validate(base_url=live_url, checks=CHECKS, timeout=10)
