"""DUO as XCA(-I) Responding Gateway, end to end: signed XUA in, Mitz per hospital, DICOM behind."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from duo_gateway.bsn import bsn_cx
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.xca.codes import KOS_SOP_CLASS, Action, ErrorCode, ResponseStatus, ReturnType
from duo_gateway.xca.query import (
    AdhocQueryResponse,
    build_adhoc_query_request,
    find_documents,
    parse_adhoc_query_response,
)
from tests.xca.responding_harness import HOME, Network, running_network
from tests.xca.xsd import assert_valid

ALL, PARTIAL, NONE = "999911120", "900186021", "123456782"
H1, H2 = "00010001", "00010002"


@pytest.fixture
async def duo(tmp_path: Path) -> AsyncIterator[Network]:
    async with running_network(tmp_path) as network:
        yield network


async def iti38(duo: Network, request: object, wsdl_dir: Path | None = None) -> AdhocQueryResponse:
    body = build_adhoc_query_request(request)  # type: ignore[arg-type]
    reply = await duo.call(duo.gateway.config.xca_responding.iti38_path, Action.ITI38, body)
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == Action.ITI38_RESPONSE
    if wsdl_dir is not None:
        assert_valid(wsdl_dir, reply.envelope.body)
    return parse_adhoc_query_response(reply.envelope.body)


async def test_find_documents_honours_consent_per_hospital(duo: Network, wsdl_dir: Path) -> None:
    everywhere = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    assert everywhere.status == ResponseStatus.SUCCESS
    kos = [e for e in everywhere.entries if e.format_code and e.format_code.code == KOS_SOP_CLASS]
    assert {u for e in kos for u in e.author_uras} == {H1, H2}
    assert len(kos) == 4  # 2 studies x 2 hospitals
    assert all(e.home == HOME for e in everywhere.entries)
    reports = [e for e in everywhere.entries if e not in kos]
    assert reports and all(e.reference_ids for e in reports)

    partial = await iti38(duo, find_documents(bsn_cx(PARTIAL)), wsdl_dir)
    assert partial.status == ResponseStatus.SUCCESS
    assert {u for e in partial.entries for u in e.author_uras} == {H1}

    nothing = await iti38(duo, find_documents(bsn_cx(NONE)), wsdl_dir)
    assert (nothing.status, nothing.entries) == (ResponseStatus.SUCCESS, [])


async def test_a_hospital_that_is_down_makes_partial_success(duo: Network, wsdl_dir: Path) -> None:
    await asyncio.to_thread(duo.pacs[1].set_behaviour, Misbehaviour(down=True))
    resp = await iti38(duo, find_documents(bsn_cx(ALL)), wsdl_dir)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    assert {u for e in resp.entries for u in e.author_uras} == {H1}
    assert [e.error_code for e in resp.errors] == [ErrorCode.REGISTRY_NOT_AVAILABLE]
    assert H2 in resp.errors[0].code_context and resp.errors[0].location == HOME


async def test_object_ref(duo: Network, wsdl_dir: Path) -> None:
    resp = await iti38(duo, find_documents(bsn_cx(ALL), return_type=ReturnType.OBJECT_REF), wsdl_dir)
    assert resp.objects and all(getattr(o, "home", None) == HOME for o in resp.objects)
