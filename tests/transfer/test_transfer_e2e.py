"""Transfers end to end, over HTTP, with Orthanc as the TLB hospital's PACS and as the requester's PACS.

Each test takes study ids from DUO's own timeline (as the TLB app does), posts a transfer, and checks
the result at the destination Orthanc itself, not only in DUO's status: "completed" is only true if
every instance of the manifest is really there.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio
from lxml import etree
from pynetdicom import AE, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.dicom.qr import receiving_contexts
from duo_gateway.sim.behaviour import Misbehaviour, MitzMisbehaviour
from duo_gateway.sim.http import misbehaving
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.soap.xml import parse_xml
from duo_gateway.timeline.model import StudyRef
from tests.support.orthanc import Orthanc, run_orthanc
from tests.transfer.harness import (
    ALL,
    LOCAL_ISSUER,
    NONE,
    NOORD,
    REQUESTER,
    TLB,
    TransferNetwork,
    clear,
    destination_instances,
    kos_instances,
    running,
    tlb_source,
    tlb_studies,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with tlb_source(tmp_path_factory.mktemp("source")) as orthanc:
        yield orthanc


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("destination"), ae_title="OWN_PACS") as orthanc:
        yield orthanc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory, source: Orthanc,
                  destination: Orthanc) -> AsyncIterator[TransferNetwork]:
    async with running(tmp_path_factory.mktemp("net"), source, destination) as net:
        yield net


@pytest.fixture(autouse=True)
def empty_destination(destination: Orthanc) -> None:
    clear(destination)


async def test_a_tlb_study_lands_in_the_requesters_pacs_on_the_local_patient(network: TransferNetwork,
                                                                              destination: Orthanc) -> None:
    [(study_id, study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, accepted = await network.submit([study_id], local_patient_id="LOCAL-42")
    assert status == 202, accepted
    assert accepted["href"].endswith(accepted["id"])
    final = await network.wait(accepted["id"])
    assert final["state"] == "completed", final
    generated = next(s for s in tlb_studies() if s.study_instance_uid == study["study_instance_uid"])
    wanted = {str(ds.SOPInstanceUID) for ds in generated.instances}
    assert final["instances_expected"] == final["instances_stored"] == len(wanted)
    assert final["instances_failed"] == 0 and final["bytes"] > 0
    [detail] = final["studies"]
    assert detail["id"] == study_id and detail["state"] == "completed"

    arrived = await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"])
    assert set(arrived) == wanted
    for tags in arrived.values():
        # Import reconciliation: the local id is the patient id, the BSN is kept as another id.
        assert tags["PatientID"] == "LOCAL-42"
        assert tags["IssuerOfPatientID"] == LOCAL_ISSUER
        assert ALL.bsn in json.dumps(tags["OtherPatientIDsSequence"])


async def test_an_xca_study_lands_complete_as_its_manifest_lists_it(network: TransferNetwork,
                                                                     destination: Orthanc) -> None:
    studies = await network.study_ids(ALL.bsn, f"xca:{NOORD.home_community_id}")
    assert studies
    study_id, study = studies[0]
    status, accepted = await network.submit([study_id])
    assert status == 202, accepted
    final = await network.wait(accepted["id"])
    assert final["state"] == "completed", final
    wanted = kos_instances(network.community_sim, study["study_instance_uid"])
    assert final["instances_stored"] == final["instances_expected"] == len(wanted)
    arrived = await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"])
    assert set(arrived) == wanted
    # No local id asked: the study keeps the patient's own id.
    assert {tags["PatientID"] for tags in arrived.values()} == {ALL.bsn}


async def test_both_worlds_in_one_transfer_and_progress_as_server_sent_events(
        network: TransferNetwork, destination: Orthanc) -> None:
    [(tlb_id, _)] = await network.study_ids(ALL.bsn, "tlb:")
    xca_id, _ = (await network.study_ids(ALL.bsn, "xca:"))[0]
    status, accepted = await network.submit([tlb_id, xca_id])
    assert status == 202
    events: list[tuple[str, dict[str, object]]] = []
    async with network.session.get(f"{network.api}/transfers/{accepted['id']}/events") as r:
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        name = ""
        async for raw in r.content:
            line = raw.decode().rstrip("\n")
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                events.append((name, json.loads(line.removeprefix("data: "))))
    assert events[-1][0] == "end" and events[-1][1]["state"] == "completed"
    assert all(name == "progress" for name, _ in events[:-1]) and len(events) >= 2
    stored = [int(str(e["instances_stored"])) for _, e in events]
    assert stored == sorted(stored), "progress never goes backwards"


async def test_an_event_stream_whose_job_cannot_be_read_is_a_problem_not_a_200(
        network: TransferNetwork, monkeypatch: pytest.MonkeyPatch) -> None:
    """A store failure before the first event still gets an RFC 9457 answer: no 200 stream that dies."""
    [(study_id, _)] = await network.study_ids(ALL.bsn, "tlb:")
    _, accepted = await network.submit([study_id])
    await network.wait(accepted["id"])
    assert network.gateway.transfers is not None

    async def broken(job_id: str) -> int:
        raise OSError("disk gone")

    monkeypatch.setattr(network.gateway.transfers.store, "revision", broken)
    async with network.session.get(f"{network.api}/transfers/{accepted['id']}/events") as r:
        assert r.status == 500 and r.content_type == "application/problem+json"
        assert "could not be read" in (await r.json())["detail"]


async def test_refusals_are_problems_not_jobs(network: TransferNetwork) -> None:
    [(study_id, _)] = await network.study_ids(ALL.bsn, "tlb:")
    tampered = study_id[:-4] + ("AAAA" if not study_id.endswith("AAAA") else "BBBB")
    status, problem = await network.submit([tampered])
    assert status == 422 and problem["type"] == "urn:duo-gateway:problem:invalid-study", problem
    status, problem = await network.submit([study_id], destination="nowhere")
    assert status == 422 and problem["type"] == "urn:duo-gateway:problem:invalid-destination"
    status, problem = await network.submit([study_id], destination={"ae_title": "X", "host": "127.0.0.1",
                                                                    "port": 104})
    assert status == 403 and problem["type"] == "urn:duo-gateway:problem:destination-not-allowed"
    status, problem = await network.submit([study_id], local_patient_id="a\\b")
    assert status == 422 and problem["type"] == "urn:duo-gateway:problem:invalid-patient-id"
    async with network.session.get(f"{network.api}/transfers/00000000-0000-4000-8000-000000000000") as r:
        assert r.status == 404
        assert (await r.json())["type"] == "urn:duo-gateway:problem:not-found"


async def test_no_consent_fails_the_study_and_nothing_is_fetched(network: TransferNetwork,
                                                                  destination: Orthanc) -> None:
    """A study id issued while consent held, used after it is gone: Mitz is asked again, and wins."""
    [(study_id, study)] = await network.study_ids(ALL.bsn, "tlb:")
    with misbehaving(network.mitz.app, MitzMisbehaviour(force_decision="Deny")):
        _, accepted = await network.submit([study_id])
        final = await network.wait(accepted["id"])
    assert final["state"] == "failed", final
    assert "no consent" in final["studies"][0]["detail"]
    assert await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"]) == {}
    # The NONE patient has no timeline studies to send at all.
    assert (await network.timeline(NONE.bsn))["studies"] == []


def _failed_calls(network: TransferNetwork, peer: str) -> float:
    """DUO's calls to ``peer`` that got no HTTP answer or a non-2xx one, from its own metrics."""
    return sum(s.value for m in network.gateway.metrics.registry.collect() if m.name == "duo_peer_requests"
               for s in m.samples if s.name == "duo_peer_requests_total" and s.labels["peer"] == peer
               and not s.labels["outcome"].startswith("2"))


async def test_a_community_down_for_a_while_is_retried_until_complete(network: TransferNetwork,
                                                                     destination: Orthanc) -> None:
    study_id, study = (await network.study_ids(ALL.bsn, "xca:"))[0]
    peer = f"xca:{NOORD.home_community_id}"
    before = _failed_calls(network, peer)
    with network.misbehaving(Misbehaviour(down=True)):
        status, accepted = await network.submit([study_id])
        assert status == 202
        # Down until DUO has hit the outage at least once (not for a fixed time, which its jittered
        # retries could outlast or not), then up again while the job still has retries left.
        deadline = time.monotonic() + 10
        while _failed_calls(network, peer) == before:
            assert time.monotonic() < deadline, "DUO never called the community"
            await asyncio.sleep(0.01)
        assert (await network.status(accepted["id"]))["state"] in ("queued", "running")
    final = await network.wait(accepted["id"])
    assert final["state"] == "completed", final
    arrived = await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"])
    assert set(arrived) == kos_instances(network.community_sim, study["study_instance_uid"])


async def test_cancel_stops_a_running_transfer(network: TransferNetwork) -> None:
    study_id, _ = (await network.study_ids(ALL.bsn, "xca:"))[0]
    with network.misbehaving(Misbehaviour(delay_ms=400)):
        status, accepted = await network.submit([study_id])
        assert status == 202
        deadline = time.monotonic() + 10
        while (await network.status(accepted["id"]))["state"] == "queued":
            assert time.monotonic() < deadline
            await asyncio.sleep(0.05)
        async with network.session.delete(f"{network.api}/transfers/{accepted['id']}") as r:
            assert r.status == 200
            assert (await r.json())["cancel_requested"] is True
        final = await network.wait(accepted["id"], timeout_s=20)
    assert final["state"] == "cancelled", final
    # Cancelled mid-way: part of the manifest may have arrived, never all of it; cancelled before the
    # manifest was read, the study counts 0 expected and nothing may have been stored.
    expected = final["instances_expected"]
    assert final["instances_stored"] < expected if expected else final["instances_stored"] == 0


async def test_a_destination_refusing_some_instances_makes_a_partial_with_the_missing_listed(
        tmp_path: Path, source: Orthanc) -> None:
    """A pynetdicom storage SCP that refuses every other instance (0xA900) and stores the rest."""
    received: list[str] = []
    refused: set[str] = set()

    def on_store(event: evt.Event) -> int:
        uid = str(event.request.AffectedSOPInstanceUID)
        if len(received) % 2:
            refused.add(uid)
            received.append(uid)
            return 0xA900
        received.append(uid)
        return 0x0000

    ae = AE(ae_title="PICKY_PACS")
    ae.supported_contexts = receiving_contexts()
    ae.add_supported_context(Verification)
    server = start_acceptor(ae, ("127.0.0.1", 0), evt_handlers=[(evt.EVT_C_STORE, on_store)])
    picky = Orthanc("PICKY_PACS", "127.0.0.1", int(server.server_address[1]), 0)
    try:
        async with running(tmp_path, source, picky) as net:
            [(study_id, study)] = await net.study_ids(ALL.bsn, "tlb:")
            status, accepted = await net.submit([study_id])
            assert status == 202
            final = await net.wait(accepted["id"])
    finally:
        server.shutdown()
    assert final["state"] == "partial", final
    assert final["instances_failed"] == len(refused) > 0
    assert final["instances_stored"] == final["instances_expected"] - len(refused)
    detail = final["studies"][0]["detail"]
    assert f"{len(refused)} of {final['instances_expected']} instances missing" in detail
    assert any(uid in detail for uid in refused)
    # Refused instances are not retried as if transient: each was offered exactly once.
    assert sorted(received) == sorted(set(received))
    generated = next(s for s in tlb_studies() if s.study_instance_uid == study["study_instance_uid"])
    assert set(received) == {str(ds.SOPInstanceUID) for ds in generated.instances}


async def test_transfers_are_audited_per_study_and_per_call(network: TransferNetwork) -> None:
    """TLB: the import from the hospital and the disclosure to the destination (DICOM Instances
    Transferred, 110104); XCA: the ITI-39 and RAD-75 Import records, then the disclosure."""
    [(tlb_id, tlb_study)] = await network.study_ids(ALL.bsn, "tlb:")
    xca_id, xca_study = (await network.study_ids(ALL.bsn, "xca:"))[0]
    _, accepted = await network.submit([tlb_id, xca_id])
    assert (await network.wait(accepted["id"]))["state"] == "completed"
    audit_file = network.gateway.config.storage.path / "audit" / "audit.log"

    def about(study_uid: str) -> list[etree._Element]:
        events = [parse_xml(parse_message(r).msg)
                  for r in parse_file_records(audit_file.read_bytes()).records] if audit_file.exists() else []
        return [e for e in events if study_uid in e.xpath(
            "ParticipantObjectIdentification/@ParticipantObjectID")]

    deadline = time.monotonic() + 10
    while len(about(tlb_study["study_instance_uid"])) < 2 and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the auditor writes behind a queue
    for study, kinds in ((tlb_study, {"110104"}), (xca_study, {"110104"})):
        events = about(study["study_instance_uid"])
        ids = {str(e.xpath("string(EventIdentification/EventID/@csd-code)")) for e in events}
        assert kinds <= ids, (study["sources"], ids)
        # Earlier tests of this module sent (or failed to send) the same studies: this transfer's record
        # is one of the successful ones.
        pushed = [e for e in events if "OWN_PACS" in e.xpath("ActiveParticipant/@UserID")
                  and str(e.xpath("string(EventIdentification/@EventOutcomeIndicator)")) == "0"]
        assert pushed, "the disclosure to the requester's PACS is recorded"
        patient = pushed[-1].xpath(
            "string(ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']/@ParticipantObjectID)")
        assert str(patient).startswith(f"{ALL.bsn}^^^"), patient
    # The XCA study's images came by RAD-75, recorded as an Import by DUO's initiating side.
    rad75 = [e for e in about(xca_study["study_instance_uid"])
             if e.xpath("string(EventIdentification/EventTypeCode/@csd-code)") == "RAD-75"]
    assert rad75


async def test_transfer_metrics_count_what_was_stored(network: TransferNetwork,
                                                      destination: Orthanc) -> None:
    """One transfer's bytes and instances are counted exactly once, as /metrics shows them to ops."""
    [(study_id, _)] = await network.study_ids(ALL.bsn, "tlb:")
    await asyncio.to_thread(clear, destination)

    async def scraped() -> dict[str, float]:
        async with network.session.get(f"{network.gateway.http_url}/metrics") as r:
            text = await r.text()
        return {line.split(" ")[0]: float(line.split(" ")[1]) for line in text.splitlines()
                if line.startswith("duo_transfer_") and " " in line}

    before = await scraped()
    _, accepted = await network.submit([study_id])
    final = await network.wait(accepted["id"])
    assert final["state"] == "completed", final
    after = await scraped()

    def delta(key: str) -> float:
        return after.get(key, 0.0) - before.get(key, 0.0)

    assert final["instances_stored"] == final["instances_expected"] > 0
    assert delta('duo_transfer_instances_total{outcome="stored"}') == final["instances_stored"]
    assert delta("duo_transfer_bytes_total") == final["bytes"] > 0
    assert delta('duo_transfer_jobs_total{state="completed"}') == 1
    assert after["duo_transfer_jobs_running"] == 0


async def test_a_tlb_pacs_down_for_a_while_is_retried_until_complete(tmp_path: Path,
                                                                     destination: Orthanc) -> None:
    """The hospital's PACS (a SimPacs here, since it can stop listening and come back on the same
    port) is down when the transfer starts: the manifest C-FIND is retried with backoff until it is up."""
    pacs = SimPacs(TLB, tmp_path / "pacs", host="127.0.0.1")
    await asyncio.to_thread(pacs.preload, tlb_studies())
    await asyncio.to_thread(pacs.start)
    try:
        as_peer = Orthanc(pacs.ae_title, "127.0.0.1", pacs.port, 0)
        async with running(tmp_path / "net", as_peer, destination, retries=6, retry_backoff_s=0.2) as net:
            [(study_id, study)] = await net.study_ids(ALL.bsn, "tlb:")
            await asyncio.to_thread(pacs.set_behaviour, Misbehaviour(down=True))
            status, accepted = await net.submit([study_id])
            assert status == 202
            await asyncio.sleep(0.5)
            assert (await net.status(accepted["id"]))["state"] in ("queued", "running")
            await asyncio.to_thread(pacs.set_behaviour, Misbehaviour())
            final = await net.wait(accepted["id"])
    finally:
        await asyncio.to_thread(pacs.stop)
    assert final["state"] == "completed", final
    arrived = await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"])
    generated = next(s for s in tlb_studies() if s.study_instance_uid == study["study_instance_uid"])
    assert set(arrived) == {str(ds.SOPInstanceUID) for ds in generated.instances}


async def test_a_copy_that_is_gone_falls_back_to_the_next_source(network: TransferNetwork,
                                                                 destination: Orthanc) -> None:
    """The timeline saw the study at a TLB hospital (primary) and in a community; by transfer time
    the hospital's PACS no longer has it, so DUO fetches the community's copy instead."""
    xca_id, study = (await network.study_ids(ALL.bsn, "xca:"))[0]
    ids = network.gateway.study_ids
    community_copy = ids.open(xca_id).ref
    gone = StudyRef("tlb", community_copy.study_uid, network.gateway.config.gateway.home_community_id,
                    repository_unique_id=TLB.repository_unique_id, hospital_ura=TLB.ura)
    sealed = ids.seal([gone, community_copy], ALL.bsn, ura=REQUESTER["ura"])
    status, accepted = await network.submit([sealed])
    assert status == 202, accepted
    final = await network.wait(accepted["id"])
    assert final["state"] == "completed", final
    arrived = await asyncio.to_thread(destination_instances, destination, study["study_instance_uid"])
    assert set(arrived) == kos_instances(network.community_sim, study["study_instance_uid"])
