"""SubscriptionManager against the real Mitz simulator (HTTP on 127.0.0.1) and simulated PACSes (DICOM)."""

from __future__ import annotations

import asyncio
import base64
import json
import stat
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from datetime import date, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from multidict import CIMultiDict, CIMultiDictProxy
from structlog.testing import capture_logs

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.mitz import MitzConfig
from duo_gateway.config.peers import TlbHospital
from duo_gateway.http.client import PeerResponse
from duo_gateway.mitz.subscriptions import (
    KEY_FILE,
    STORE_DIR,
    SubscriptionManager,
    subscription_id_from,
)
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.config import SimHospital, SimPatient, default_network
from duo_gateway.sim.mitz import SUBSCRIPTION_ROUTE, MitzSimulator
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.soap.xml import parse_xml
from duo_gateway.sources.base import SourceUnavailable
from duo_gateway.sources.dicom_pacs import DicomPacsSource
from tests.support.gateway import make_config

NET = default_network()
H1, H2 = NET.hospitals
ANNA, BRAM, CARLA = NET.patients
BSNS = [p.bsn for p in NET.patients]
GW_OID = "2.16.528.1.1007.99.1"  # make_config's home community id
NOTIFY_URL = "http://127.0.0.1:9/mitz/notify"
LONG_AGO = date(2000, 1, 1)


# ------------------------------------------------------------------------------------------ Mitz


@dataclass
class MitzHarness:
    sim: MitzSimulator
    server: TestServer
    #: (Content-Type, body) of every subscription POST that reached the simulator.
    posts: list[tuple[str, bytes]]
    #: Status codes to answer the next POSTs with instead of the simulator (business-rule, throttle).
    forced: list[int]

    @property
    def url(self) -> str:
        return str(self.server.make_url(SUBSCRIPTION_ROUTE))

    @property
    def port(self) -> int:
        assert self.server.port is not None
        return self.server.port

    async def behave(self, **kwargs: Any) -> None:
        async with aiohttp.ClientSession() as session, session.put(
                self.server.make_url("/admin/behaviour"), json=kwargs) as resp:
            assert resp.status == 200, await resp.text()

    def posted_bsns(self) -> list[str]:
        return [json.loads(body)["criteria"].split("patientid=")[1].split("&")[0] for _, body in self.posts]


_CODES = {422: "business-rule", 429: "throttled"}


@pytest.fixture
async def mitz() -> AsyncIterator[MitzHarness]:
    sim = MitzSimulator(NET, tlb_home_community_id=f"urn:oid:{GW_OID}")
    app = sim.app()
    posts: list[tuple[str, bytes]] = []
    forced: list[int] = []

    # Appended after the simulator's behaviour middleware: a "down" Mitz never sees the POST.
    @web.middleware
    async def record(request: web.Request, handler: Any) -> web.StreamResponse:
        if request.method == "POST" and request.path == SUBSCRIPTION_ROUTE:
            posts.append((request.headers.get("Content-Type", ""), await request.read()))
            if forced:
                status = forced.pop(0)
                # Diagnostics quoting the BSN, as a careless server might: it must not reach DUO's logs.
                issue = {"severity": "error", "code": _CODES[status],
                         "diagnostics": f"patient {ANNA.bsn} refused"}
                outcome = {"resourceType": "OperationOutcome", "issue": [issue]}
                return web.json_response(outcome, status=status, content_type="application/fhir+json",
                                         headers={"Retry-After": "60"} if status == 429 else None)
        response: web.StreamResponse = await handler(request)
        return response

    app.middlewares.append(record)
    server = TestServer(app, host="127.0.0.1", port=0)
    await server.start_server()
    try:
        yield MitzHarness(sim, server, posts, forced)
    finally:
        await server.close()


# ------------------------------------------------------------------------------------------ PACS


def dated(studies: list[GeneratedStudy], study_date: str) -> list[GeneratedStudy]:
    for study in studies:
        for ds in study.instances:
            ds.StudyDate = study_date
    return studies


@dataclass
class Pacses:
    tmp: Path
    by_ura: dict[str, SimPacs] = field(default_factory=dict)

    def start(self, hospital: SimHospital, studies: list[GeneratedStudy]) -> SimPacs:
        pacs = SimPacs(hospital, self.tmp / "pacs" / hospital.ae_title)
        pacs.preload(studies)
        pacs.start()
        self.by_ura[hospital.ura] = pacs
        return pacs


def demo_studies(hospital: SimHospital, count: int = 1) -> list[GeneratedStudy]:
    return [s for p in NET.patients for s in generate_studies(p, hospital, count, NET.seed, image_size=16)]


@pytest.fixture
def pacses(tmp_path: Path) -> Iterator[Pacses]:
    """Both demo hospitals' PACSes, each holding one study of every demo patient."""
    p = Pacses(tmp_path)
    for hospital in NET.hospitals:
        p.start(hospital, demo_studies(hospital))
    yield p
    for pacs in p.by_ura.values():
        pacs.stop()


@pytest.fixture
def empty_pacses(tmp_path: Path) -> Iterator[Pacses]:
    p = Pacses(tmp_path)
    yield p
    for pacs in p.by_ura.values():
        pacs.stop()


# ------------------------------------------------------------------------------------------ DUO


def duo_config(tmp_path: Path, mitz: MitzHarness, pacses: Pacses, *, notify_url: str | None = NOTIFY_URL,
               hospital_extra: dict[str, dict[str, Any]] | None = None, **mitz_updates: Any) -> DuoConfig:
    hospitals = [{"ura": h.ura, "name": h.name, "ae_title": h.ae_title, "host": "127.0.0.1",
                  "port": pacs.port, "repository_unique_id": h.repository_unique_id,
                  "organisation_type": h.organisation_type, "timeout_s": 5.0,
                  **(hospital_extra or {}).get(h.ura, {})}
                 for h in NET.hospitals if (pacs := pacses.by_ura.get(h.ura)) is not None]
    cfg = make_config(tmp_path, mitz_port=mitz.port, hospitals=hospitals)
    mitz_cfg = MitzConfig.model_validate({**cfg.mitz.model_dump(mode="json"), "subscriptions_url": mitz.url,
                                          "notify_url": notify_url, "timeout_s": 2.0, **mitz_updates})
    return cfg.model_copy(update={"mitz": mitz_cfg})


ManagerFactory = Callable[..., SubscriptionManager]


@pytest.fixture
async def managers() -> AsyncIterator[ManagerFactory]:
    made: list[SubscriptionManager] = []

    def make(config: DuoConfig, **kwargs: Any) -> SubscriptionManager:
        """A manager reading each configured PACS through a DicomPacsSource, as the daemon wires it."""
        kwargs.setdefault("pacses", {
            h.ura: DicomPacsSource(h, config.listeners.dicom.ae_title, config.storage.path / "spool",
                                   metrics=kwargs.get("metrics"))
            for h in config.tlb_hospitals})
        manager = SubscriptionManager(config, **kwargs)
        made.append(manager)
        return manager

    yield make
    for manager in made:
        await manager.close()


def hospital(cfg: DuoConfig, ura: str) -> TlbHospital:
    found = cfg.hospital_by_ura(ura)
    assert found is not None
    return found


# ------------------------------------------------------------------------------------------ ensure


async def test_created_then_known_without_a_second_post(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                                        managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    manager = managers(cfg)
    h1 = hospital(cfg, H1.ura)

    first = await manager.ensure(ANNA.bsn, h1)
    assert first.status == "created" and first.http_status == 201
    assert [s.id for s in mitz.sim.subscriptions] == [first.subscription_id]
    again = await manager.ensure(ANNA.bsn, h1)
    assert again.status == "known" and again.subscription_id == first.subscription_id
    assert len(mitz.posts) == 1

    report = await manager.sync_hospital(h1, LONG_AGO)
    assert report.ok, report
    assert (report.studies, report.patients, report.known, report.created) == (3, 3, 1, 2)
    assert sorted(mitz.posted_bsns()) == sorted(BSNS)
    later = await manager.sync_hospital(h1, LONG_AGO)
    assert (later.ok, later.known, later.created) == (True, 3, 0)
    assert len(mitz.posts) == 3
    registered = sorted((s.bsn, s.provider_ura) for s in mitz.sim.subscriptions)
    assert registered == sorted((b, H1.ura) for b in BSNS)


async def test_lost_memory_is_answered_202_and_recorded_as_exists(tmp_path: Path, mitz: MitzHarness,
                                                                 pacses: Pacses,
                                                                 managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    created = await managers(cfg).ensure(BRAM.bsn, hospital(cfg, H2.ura))
    other = managers(cfg, store_dir=tmp_path / "another-store")
    exists = await other.ensure(BRAM.bsn, hospital(cfg, H2.ura))
    assert exists.status == "exists" and exists.http_status == 202
    assert exists.subscription_id == created.subscription_id
    assert len(mitz.sim.subscriptions) == 1
    assert (await other.ensure(BRAM.bsn, hospital(cfg, H2.ura))).status == "known"
    assert len(mitz.posts) == 2


async def test_memory_survives_restart_and_holds_no_bsn(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                                       managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    first = managers(cfg, today=lambda: date(2026, 11, 25))
    assert (await first.sync_hospital(hospital(cfg, H1.ura), LONG_AGO)).created == 3
    await first.close()

    restarted = managers(cfg, today=lambda: date(2026, 11, 30))
    h1 = hospital(cfg, H1.ura)
    report = await restarted.sync_hospital(h1, await restarted.next_since(h1))
    assert report.since == date(2026, 11, 25)  # remembered last successful sync
    assert (await restarted.ensure(ANNA.bsn, hospital(cfg, H1.ura))).status == "known"
    assert len(mitz.posts) == 3
    await restarted.close()

    store = cfg.storage.path / STORE_DIR
    files = [p for p in store.iterdir() if p.is_file()]
    assert files
    for path in files:
        data = path.read_bytes()
        for bsn in BSNS:
            assert bsn.encode() not in data, path.name
    assert stat.S_IMODE((store / KEY_FILE).stat().st_mode) == 0o600


async def test_lost_key_resets_the_memory(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                          managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    first = managers(cfg)
    assert (await first.ensure(ANNA.bsn, hospital(cfg, H1.ura))).status == "created"
    await first.close()
    (cfg.storage.path / STORE_DIR / KEY_FILE).unlink()
    with capture_logs() as logs:
        again = await managers(cfg).ensure(ANNA.bsn, hospital(cfg, H1.ura))
    assert again.status == "exists"
    assert "mitz_subscription_store_reset" in [e["event"] for e in logs]


async def test_concurrent_ensure_posts_once(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                            managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    await mitz.behave(delay_ms=100)  # keep the first POST in flight while the others arrive
    manager = managers(cfg)
    outcomes = await asyncio.gather(*(manager.ensure(CARLA.bsn, hospital(cfg, H1.ura)) for _ in range(10)))
    assert len(mitz.posts) == 1
    assert {(o.status, o.subscription_id) for o in outcomes} == {("created", mitz.sim.subscriptions[0].id)}


async def test_posted_subscription_is_exactly_as_documented(tmp_path: Path, mitz: MitzHarness,
                                                            pacses: Pacses, managers: ManagerFactory) -> None:
    source = "2.16.528.1.1007.99.10002.7"
    cfg = duo_config(tmp_path, mitz, pacses, notify_url="https://duo.example.nl:8443/mitz/notify",
                     hospital_extra={H2.ura: {"mitz_source_id": source, "organisation_type": "V5"}})
    outcome = await managers(cfg).ensure(BRAM.bsn, hospital(cfg, H2.ura))
    assert outcome.status == "created"
    [(content_type, body)] = mitz.posts
    assert content_type == "application/fhir+json"
    assert json.loads(body) == {
        "resourceType": "Subscription",
        "extension": [
            {"url": "http://fhir.nl/StructureDefinition/GatewaySystem", "valueOid": f"urn:oid:{GW_OID}"},
            {"url": "http://fhir.nl/StructureDefinition/SourceSystem", "valueOid": f"urn:oid:{source}"},
        ],
        "status": "requested",
        "reason": "OTV",
        "criteria": f"Consent?_query=otv&patientid={BRAM.bsn}&providerid={H2.ura}&providertype=V5",
        "channel": {"type": "rest-hook", "endpoint": "https://duo.example.nl:8443/mitz/notify",
                    "payload": "application/fhir+json"},
    }


async def test_invalid_bsn_is_never_posted(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                           managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    outcome = await managers(cfg).ensure("123456789", hospital(cfg, H1.ura))
    assert (outcome.status, outcome.reason) == ("failed", "not a valid BSN")
    assert mitz.posts == []


async def test_disabled_without_notify_url(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                           managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, notify_url=None, subscription_sync_interval_s=0.05)
    manager = managers(cfg)
    assert (await manager.ensure(ANNA.bsn, hospital(cfg, H1.ura))).status == "disabled"
    report = await manager.sync_hospital(hospital(cfg, H1.ura), LONG_AGO)
    assert not report.ok and report.reason is not None and "disabled" in report.reason
    await asyncio.wait_for(manager.run(asyncio.Event()), 2)  # returns at once instead of looping
    assert mitz.posts == []


# ------------------------------------------------------------------------------------------ failures


@pytest.mark.parametrize("failure,reason", [
    ("down", "Mitz unreachable"),
    ("fault", "HTTP 500 Mitz error"),
    ("timeout", "Mitz unreachable (timeout"),
    ("422", "HTTP 422 business rule [business-rule]"),
    ("429", "HTTP 429 throttled, retry later [throttled] (Retry-After 60)"),
])
async def test_mitz_failure_fails_and_is_retried_on_the_next_sync(
        tmp_path: Path, mitz: MitzHarness, pacses: Pacses, managers: ManagerFactory, failure: str,
        reason: str) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, timeout_s=0.3)
    manager = managers(cfg, today=lambda: date(2026, 11, 25))
    h1 = hospital(cfg, H1.ura)
    if failure in ("down", "fault"):
        await mitz.behave(**{failure: True})
    elif failure == "timeout":
        await mitz.behave(delay_ms=700)
    else:
        mitz.forced.append(int(failure))

    report = await manager.sync_hospital(h1, LONG_AGO)
    assert not report.ok
    assert report.failures[0].startswith(reason), report.failures
    if failure == "422":  # one patient refused, the others go ahead
        assert (report.failed, report.created, report.deferred) == (1, 2, 0)
    elif failure == "429":  # throttled: the rest waits instead of hammering Mitz
        assert (report.failed, report.created, report.deferred) == (1, 0, 2)
        assert report.reason is not None and report.reason.startswith("Mitz throttled")
    else:
        assert report.failed == 3
    assert await manager.next_since(h1) == date(2026, 10, 26)  # not advanced: lookback still applies

    await mitz.behave()  # healthy again
    retry = await manager.sync_hospital(h1, LONG_AGO)
    assert retry.ok, retry
    assert retry.failed == 0 and retry.created + retry.exists + retry.known == 3
    assert retry.known == 3 - report.failed - report.deferred
    assert sorted(s.bsn for s in mitz.sim.subscriptions) == sorted(BSNS)
    assert await manager.next_since(h1) == date(2026, 11, 25)


async def test_pacs_down_fails_that_hospital_only(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                                  managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, subscription_lookback_days=36500)
    manager = managers(cfg, today=lambda: date(2026, 11, 25))
    pacses.by_ura[H1.ura].set_behaviour(Misbehaviour(down=True))
    with capture_logs() as logs:
        down, up = await manager.sync_all()
    assert (down.hospital_ura, down.ok) == (H1.ura, False)
    assert down.reason is not None and down.reason.startswith(f"PACS C-FIND failed: tlb:{H1.ura}: c-find")
    assert (up.hospital_ura, up.ok, up.created) == (H2.ura, True, 3)
    assert {s.provider_ura for s in mitz.sim.subscriptions} == {H2.ura}
    assert any(e["event"] == "mitz_sync_failed" and e["hospital_ura"] == H1.ura for e in logs)
    # H1 did not advance (its patients will be looked for again), H2 did.
    assert await manager.next_since(hospital(cfg, H1.ura)) == date(2026, 11, 25) - timedelta(days=36500)
    assert await manager.next_since(hospital(cfg, H2.ura)) == date(2026, 11, 25)

    pacses.by_ura[H1.ura].set_behaviour(Misbehaviour())
    again, steady = await manager.sync_all()
    assert (again.since, again.ok, again.created) == (date(2026, 11, 25) - timedelta(days=36500), True, 3)
    assert (steady.since, steady.ok, steady.studies) == (date(2026, 11, 25), True, 0)
    assert len(mitz.posts) == 6


# ------------------------------------------------------------------------------------------ PACS data


async def test_invalid_bsns_in_the_pacs_are_skipped(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                                    managers: ManagerFactory) -> None:
    # The sim config refuses invalid BSNs; a real PACS holds whatever was typed in.
    typo = SimPatient.model_construct(bsn="123456789", name="Fout^Nummer", birth_date="19900101", sex="M",
                                      consent="none")
    pacses.by_ura[H1.ura].preload(generate_studies(typo, H1, 1, NET.seed, image_size=16))
    cfg = duo_config(tmp_path, mitz, pacses)
    report = await managers(cfg).sync_hospital(hospital(cfg, H1.ura), LONG_AGO)
    assert report.ok
    assert (report.studies, report.patients, report.invalid, report.created) == (4, 3, 1, 3)
    assert "123456789" not in mitz.posted_bsns()


@dataclass
class FakePacs:
    """A HospitalPacs that answers from a list: what the sync does with what a PACS reads."""

    patients: list[str | None]
    asked: list[date] = field(default_factory=list)
    unavailable: bool = False

    async def study_patients_since(self, since: date) -> list[str | None]:
        self.asked.append(since)
        if self.unavailable:
            raise SourceUnavailable(f"tlb:{H1.ura}", "c-find timeout: no answer within 5 s", "timeout")
        return list(self.patients)


async def test_sync_counts_studies_patients_and_unnamed_studies(tmp_path: Path, mitz: MitzHarness,
                                                                pacses: Pacses,
                                                                managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    fake = FakePacs([BRAM.bsn, None, ANNA.bsn, BRAM.bsn, None])
    manager = managers(cfg, pacses={H1.ura: fake})
    report = await manager.sync_hospital(hospital(cfg, H1.ura), date(2026, 11, 1))
    assert fake.asked == [date(2026, 11, 1)]
    assert (report.ok, report.studies, report.invalid, report.patients, report.created) == (True, 5, 2, 2, 2)
    assert mitz.posted_bsns() == [BRAM.bsn, ANNA.bsn]  # PACS order, each patient once

    fake.unavailable = True
    failed = await manager.sync_hospital(hospital(cfg, H1.ura), date(2026, 11, 1))
    assert not failed.ok and failed.reason == (
        f"PACS C-FIND failed: tlb:{H1.ura}: c-find timeout: no answer within 5 s")
    # A hospital the daemon built no source for fails its round instead of being skipped silently.
    unwired = await manager.sync_hospital(hospital(cfg, H2.ura), date(2026, 11, 1))
    assert not unwired.ok and unwired.reason is not None and "no PACS source" in unwired.reason
    assert len(mitz.posts) == 2


async def test_sync_reads_the_pacs_through_its_source(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                                      managers: ManagerFactory) -> None:
    """The sync's C-FIND is one of the source's operations: counted in the same metric, under the
    source's name, like the XCA and timeline queries it shares the PACS with."""
    cfg = duo_config(tmp_path, mitz, pacses)
    metrics = Metrics()
    manager = managers(cfg, metrics=metrics)
    assert (await manager.sync_hospital(hospital(cfg, H1.ura), LONG_AGO)).created == 3
    pacses.by_ura[H2.ura].set_behaviour(Misbehaviour(down=True))
    assert not (await manager.sync_hospital(hospital(cfg, H2.ura), LONG_AGO)).ok
    calls = {(s.labels["peer"], s.labels["operation"], s.labels["outcome"]): s.value
             for m in metrics.registry.collect() if m.name == "duo_peer_requests"
             for s in m.samples if s.name.endswith("_total") and s.labels["peer"].startswith("tlb:")}
    assert calls == {(f"tlb:{H1.ura}", "c-find", "ok"): 1, (f"tlb:{H2.ura}", "c-find", "connect"): 1}


def _with_local_mrn(studies: list[GeneratedStudy], mrn: str, *, issuer: str | None = None,
                    drop_qualifiers: bool = False) -> list[GeneratedStudy]:
    """The hospital's own number in PatientID; the BSN only in OtherPatientIDsSequence."""
    for study in studies:
        for ds in study.instances:
            ds.PatientID = mrn
            ds.IssuerOfPatientID = "LOCALHIS"
            item = ds.OtherPatientIDsSequence[0]
            if issuer is not None:
                item.IssuerOfPatientID = issuer
            if drop_qualifiers:
                del item.IssuerOfPatientIDQualifiersSequence
    return studies


async def test_bsn_from_other_patient_ids_sequence(tmp_path: Path, mitz: MitzHarness, empty_pacses: Pacses,
                                                   managers: ManagerFactory) -> None:
    def one(patient: SimPatient) -> list[GeneratedStudy]:
        return generate_studies(patient, H1, 1, NET.seed, image_size=16)

    empty_pacses.start(H1, [
        *_with_local_mrn(one(ANNA), "MRN1"),  # NLMINBIZA, as the generator writes it
        *_with_local_mrn(one(BRAM), "MRN2", issuer=""),  # only the universal entity id names the BSN OID
        *_with_local_mrn(one(CARLA), "MRN3", issuer="LOCALHIS", drop_qualifiers=True),  # not a BSN
    ])
    cfg = duo_config(tmp_path, mitz, empty_pacses,
                     hospital_extra={H1.ura: {"bsn_attribute": "OtherPatientIDsSequence"}})
    report = await managers(cfg).sync_hospital(hospital(cfg, H1.ura), LONG_AGO)
    assert (report.ok, report.patients, report.invalid, report.created) == (True, 2, 1, 2)
    assert sorted(mitz.posted_bsns()) == sorted([ANNA.bsn, BRAM.bsn])

    # The same PACS read as if the BSN were in PatientID: only hospital numbers, nothing to subscribe.
    plain = duo_config(tmp_path / "plain", mitz, empty_pacses)
    report = await managers(plain).sync_hospital(hospital(plain, H1.ura), LONG_AGO)
    assert (report.ok, report.patients, report.invalid) == (True, 0, 3)


# ------------------------------------------------------------------------------------------ the job


async def test_incremental_since(tmp_path: Path, mitz: MitzHarness, empty_pacses: Pacses,
                                 managers: ManagerFactory) -> None:
    pacs = empty_pacses.start(H1, [
        *dated(generate_studies(ANNA, H1, 1, NET.seed, image_size=16), "20261120"),
        *dated(generate_studies(BRAM, H1, 1, NET.seed, image_size=16), "20261020"),
        *dated(generate_studies(CARLA, H1, 1, NET.seed, image_size=16), "20260101"),
    ])
    cfg = duo_config(tmp_path, mitz, empty_pacses, subscription_lookback_days=30)
    today = [date(2026, 11, 25)]
    manager = managers(cfg, today=lambda: today[0])

    [first] = await manager.sync_all()
    assert (first.since, first.ok, first.patients, first.created) == (date(2026, 10, 26), True, 1, 1)
    assert mitz.posted_bsns() == [ANNA.bsn]

    # Bram comes back for a new study; Carla's old one stays outside every later window.
    pacs.preload(dated(generate_studies(BRAM, H1, 2, NET.seed, image_size=16)[1:], "20261126"))
    today[0] = date(2026, 11, 27)
    [second] = await manager.sync_all()
    assert (second.since, second.ok, second.studies, second.created) == (date(2026, 11, 25), True, 1, 1)
    assert mitz.posted_bsns() == [ANNA.bsn, BRAM.bsn]
    assert await manager.next_since(hospital(cfg, H1.ura)) == date(2026, 11, 27)


async def _until(predicate: Callable[[], bool]) -> None:
    """Poll state owned by the simulator, which offers no event to wait on."""
    async with asyncio.timeout(10):
        while not predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_run_survives_a_down_pacs_and_stops_on_request(tmp_path: Path, mitz: MitzHarness,
                                                            pacses: Pacses, managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, subscription_sync_interval_s=0.05,
                     subscription_lookback_days=36500)
    manager = managers(cfg)
    pacses.by_ura[H1.ura].set_behaviour(Misbehaviour(down=True))
    stop = asyncio.Event()
    task = asyncio.create_task(manager.run(stop))
    await _until(lambda: len(mitz.sim.subscriptions) == 3)
    await asyncio.sleep(0.2)  # a few more rounds with H1 still down
    assert not task.done()
    assert {s.provider_ura for s in mitz.sim.subscriptions} == {H2.ura}

    pacses.by_ura[H1.ura].set_behaviour(Misbehaviour())
    await _until(lambda: len(mitz.sim.subscriptions) == 6)
    await asyncio.sleep(0.2)  # later rounds find everybody registered: no new POSTs
    assert len(mitz.posts) == 6
    stop.set()
    await asyncio.wait_for(task, 5)


async def test_interval_zero_never_runs(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                        managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, subscription_sync_interval_s=0)
    await asyncio.wait_for(managers(cfg).run(asyncio.Event()), 2)
    assert mitz.posts == []


# ------------------------------------------------------------------------------------------ audit, logs


async def test_each_post_is_audited_as_a_patient_record_create(tmp_path: Path, mitz: MitzHarness,
                                                               pacses: Pacses,
                                                               managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses)
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path / "audit-home")
    await auditor.start()
    manager = managers(cfg, auditor=auditor)
    h1 = hospital(cfg, H1.ura)
    created = await manager.ensure(ANNA.bsn, h1)
    mitz.forced.append(422)
    await manager.ensure(BRAM.bsn, h1)
    await manager.ensure(ANNA.bsn, h1)  # known: no POST, no record
    await auditor.stop()

    raw = (tmp_path / "audit-home" / "audit" / "audit.log").read_bytes()
    events = [parse_xml(parse_message(r).msg) for r in parse_file_records(raw).records]
    assert len(events) == 2
    for event in events:
        assert event.xpath("string(EventIdentification/EventID/@csd-code)") == "110110"
        assert event.xpath("string(EventIdentification/@EventActionCode)") == "C"
        assert event.xpath("string(EventIdentification/EventTypeCode/@csd-code)") == "MITZ-SUB"
        assert event.xpath("ActiveParticipant[@UserIsRequestor='true']/@UserID") == [
            "urn:oid:2.16.528.1.1007.99.1"]
        assert event.xpath("ActiveParticipant[@UserIsRequestor='false']/@UserID") == [mitz.url]
    ok, refused = events
    assert ok.xpath("string(EventIdentification/@EventOutcomeIndicator)") == "0"
    assert refused.xpath("string(EventIdentification/@EventOutcomeIndicator)") == "4"
    patient = "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']/@ParticipantObjectID"
    assert ok.xpath(patient) == [bsn_cx(ANNA.bsn)]
    assert refused.xpath(patient) == [bsn_cx(BRAM.bsn)]
    sub = "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='4']"
    assert ok.xpath(f"string({sub}/@ParticipantObjectID)") == created.subscription_id
    assert base64.b64decode(str(ok.xpath(f"string({sub}/ParticipantObjectQuery)"))) == mitz.posts[0][1]


async def test_logs_never_carry_a_bsn(tmp_path: Path, mitz: MitzHarness, pacses: Pacses,
                                      managers: ManagerFactory) -> None:
    cfg = duo_config(tmp_path, mitz, pacses, subscription_lookback_days=36500)
    manager = managers(cfg)
    with capture_logs() as logs:
        mitz.forced.extend([422, 429])
        await manager.sync_all()
        pacses.by_ura[H2.ura].set_behaviour(Misbehaviour(down=True))
        await manager.sync_all()
        await mitz.behave(fault=True)
        await manager.ensure(CARLA.bsn, hospital(cfg, H2.ura))
    assert {"mitz_subscription", "mitz_sync", "mitz_sync_failed"} <= {e["event"] for e in logs}
    text = repr(logs)
    for bsn in BSNS:
        assert bsn not in text


# ------------------------------------------------------------------------------------------ id parsing


@pytest.mark.parametrize("location,body,expected", [
    ("/abonnementen/fhir/Subscription/abc-1", b"", "abc-1"),
    ("https://mitz.example/abonnementen/fhir/Subscription/abc-2/_history/1", b"", "abc-2"),
    ("abc-3", b"", "abc-3"),
    ("", b'{"resourceType": "Subscription", "id": "abc-4"}', "abc-4"),
    ("", b"not json", None),
])
def test_subscription_id_from_location_or_body(location: str, body: bytes, expected: str | None) -> None:
    headers = CIMultiDict({"Location": location} if location else {})
    assert subscription_id_from(PeerResponse(201, CIMultiDictProxy(headers), body, 0.0)) == expected
