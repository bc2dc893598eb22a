"""The DICOMweb door without sources: CORS for the configured viewer origins only, and a root that is no
open view answers 404 with a problem body, preflight or not."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest_asyncio
from aiohttp import web

from duo_gateway.audit.messages import Peer
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.views import ViewsConfig
from duo_gateway.consent import ConsentGate
from duo_gateway.http.server import build_app
from duo_gateway.observability.metrics import Metrics
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.sources import StudySources
from duo_gateway.views.dicomweb import DicomWebDoor
from duo_gateway.views.service import ViewService
from tests.support.clients import plain_directory
from tests.support.gateway import make_config

VIEWER = "https://tijdlijn.example.nl"


class _NoMitz:
    async def closed_question(self, question: object) -> object:
        raise AssertionError("no view is made here")


@pytest_asyncio.fixture
async def base_url(tmp_path: Path) -> AsyncIterator[str]:
    config: DuoConfig = make_config(tmp_path, mitz_port=9)
    cfg = ViewsConfig(cors_origins=[VIEWER])
    gate = ConsentGate(_NoMitz(), categories=config.mitz.categories)  # type: ignore[arg-type]
    service = ViewService(cfg, study_ids=StudyIds(os.urandom(32)),
                          sources=StudySources(config, gate=gate, sources={}, retrievers={}),
                          root=tmp_path / "views", auditor=None,
                          identity=Peer(user_id="DUO", host="localhost"))
    app = build_app(Metrics(), lambda: [], 1.0, [DicomWebDoor(service, cfg)], clients=plain_directory())
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/dicomweb"
    finally:
        await runner.cleanup()


async def test_cors_answers_the_configured_viewer_origin_only(base_url: str) -> None:
    url = f"{base_url}/not-a-view/studies"
    async with aiohttp.ClientSession() as http:
        async with http.options(url, headers={"Origin": VIEWER,
                                              "Access-Control-Request-Method": "GET"}) as r:
            assert r.status == 204
            assert r.headers["Access-Control-Allow-Origin"] == VIEWER
            assert "GET" in r.headers["Access-Control-Allow-Methods"]
        async with http.get(url, headers={"Origin": VIEWER}) as r:
            assert r.status == 404 and r.content_type == "application/problem+json"
            assert r.headers["Access-Control-Allow-Origin"] == VIEWER  # the viewer may read the refusal
        async with http.get(url, headers={"Origin": "https://elsewhere.example"}) as r:
            assert r.status == 404
            assert "Access-Control-Allow-Origin" not in r.headers
