"""DicomPacsSource against the simulated PACS and a real Orthanc: what it finds and retrieves is
exactly what the PACS holds for the permitted patient, nothing of anyone else's, and every way the
PACS can fail becomes SourceUnavailable."""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import socket
import time
from collections.abc import AsyncGenerator, Callable, Iterator
from contextlib import aclosing, contextmanager
from datetime import date
from pathlib import Path

import pytest
import structlog
import structlog.testing
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import AE, evt
from pynetdicom.sop_class import StudyRootQueryRetrieveInformationModelFind  # type: ignore[attr-defined]
from pynetdicom.transport import ThreadedAssociationServer

from duo_gateway.config.peers import TlbHospital
from duo_gateway.consent import ConsentGate, Permit
from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.dicom.qr import MoveRouter, receiving_syntaxes
from duo_gateway.dicom.ul.association import AcceptorPolicy, UlServer, verification_supported
from duo_gateway.mitz.client import ConsentDecision
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.behaviour import Misbehaviour, PacsMisbehaviour
from duo_gateway.sim.config import default_network
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from duo_gateway.sources.base import InstanceRecord, NotCovered, RetrievedInstance, SourceUnavailable
from duo_gateway.sources.dicom_pacs import DicomPacsSource
from tests import test_bsn as bsn_shapes
from tests.support.gc import fixtures_frozen
from tests.support.orthanc import Orthanc, orthanc_moving_to, own_storage_scp
from tests.support.studies import big_study

NET = default_network()
HOSPITAL, OTHER_HOSPITAL = NET.hospitals
ANNA, BRAM, CARLA = NET.patients
HOST = "127.0.0.1"
DUO_AE = "DUO_TEST"




class _PermitAll:
    async def closed_question(self, question: ClosedQuestion) -> ConsentDecision:
        return ConsentDecision(True, ("Permit",), None, "mitz")  # type: ignore[arg-type]


async def permit(bsn: str, ura: str = HOSPITAL.ura) -> Permit:
    verdict = await ConsentGate(_PermitAll(), categories=("GGC002",)).check(ClosedQuestion(
        bsn=bsn, holder_ura=ura, holder_type="V6", requester_uzi="000095254", requester_role="01.039",
        requester_ura="00000666", requester_type="V6"))
    assert isinstance(verdict, Permit)
    return verdict


def hospital(port: int, **overrides: object) -> TlbHospital:
    fields: dict[str, object] = {"ura": HOSPITAL.ura, "name": HOSPITAL.name, "ae_title": HOSPITAL.ae_title,
                                 "host": HOST, "port": port, "timeout_s": 5,
                                 "repository_unique_id": HOSPITAL.repository_unique_id}
    return TlbHospital.model_validate({**fields, **overrides})


def source(port: int, spool: Path, window: int = 4, **overrides: object) -> DicomPacsSource:
    method = overrides.pop("retrieve_method", "c-get")
    router = overrides.pop("move_router", None)
    metrics = overrides.pop("metrics", None)
    return DicomPacsSource(hospital(port, **overrides), DUO_AE, spool, method, window,  # type: ignore[arg-type]
                           metrics, move_router=router)  # type: ignore[arg-type]


def records_of(study: GeneratedStudy) -> list[InstanceRecord]:
    return [InstanceRecord(study.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPClassUID),
                           str(ds.SOPInstanceUID)) for ds in study.instances]


async def collect(stream: AsyncGenerator[RetrievedInstance, None]) -> list[RetrievedInstance]:
    out: list[RetrievedInstance] = []
    async with aclosing(stream) as s:
        async for item in s:
            out.append(item)
    return out


def assert_identical(got: list[RetrievedInstance], expected: list[Dataset]) -> None:
    want = {str(ds.SOPInstanceUID): ds for ds in expected}
    assert sorted(i.record.sop_instance_uid for i in got) == sorted(want)
    for item in got:
        ds = dcmread(item.path)
        assert str(ds.SOPInstanceUID) == item.record.sop_instance_uid
        stored = want[item.record.sop_instance_uid]
        assert ds.get("PixelData") == stored.get("PixelData")
        assert ds == stored
        assert ds.file_meta.TransferSyntaxUID == stored.file_meta.TransferSyntaxUID  # not re-encoded
        assert item.size == item.path.stat().st_size


# -- fixtures ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Sim:
    pacs: SimPacs
    anna: list[GeneratedStudy]
    bram: list[GeneratedStudy]
    foreign: Dataset  # Bram's image filed under Anna's third study
    big: GeneratedStudy


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    pacs = SimPacs(HOSPITAL, tmp_path_factory.mktemp("pacs"))
    studies = {p.bsn: generate_studies(p, HOSPITAL, 3, NET.seed) for p in NET.patients}
    for s in studies.values():
        pacs.preload(s)
    anna, bram = studies[ANNA.bsn], studies[BRAM.bsn]
    foreign = copy.deepcopy(bram[0].instances[0])
    foreign.StudyInstanceUID = anna[2].study_instance_uid
    foreign.SeriesInstanceUID = anna[2].instances[0].SeriesInstanceUID
    foreign.SOPInstanceUID = foreign.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    pacs.preload([dataclasses.replace(anna[2], instances=[foreign])])
    big = big_study(anna[0], 40)
    pacs.preload([big])
    pacs.start()
    try:
        yield Sim(pacs, anna, bram, foreign, big)
    finally:
        pacs.stop()


@pytest.fixture
def pacs(sim: Sim) -> Iterator[SimPacs]:
    yield sim.pacs
    sim.pacs.set_behaviour(Misbehaviour())


# -- find ---------------------------------------------------------------------------------------------


async def test_find_studies_of_the_patient(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    found = await source(pacs.port, tmp_path).find_studies(await permit(ANNA.bsn), ANNA.bsn)
    by_uid = {r.study_instance_uid: r for r in found}
    assert set(by_uid) == {s.study_instance_uid for s in sim.anna} | {sim.big.study_instance_uid}
    for study in sim.anna[:2]:
        record = by_uid[study.study_instance_uid]
        assert record.patient_id == ANNA.bsn
        assert (record.study_date, record.accession_number, record.description) == (
            study.study_date, study.accession_number, study.description)
        assert set(record.modalities) == set(study.modalities)
        assert record.instance_count == len(study.instances)
        assert record.series_count == len(study.series_instance_uids)
        assert record.patient_sex == ANNA.sex and record.patient_birth_date == ANNA.birth_date
        assert record.body_part == study.body_part  # from one series-level UID-list C-FIND


async def test_date_ranges_and_uid_lists(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    src = source(pacs.port, tmp_path)
    p = await permit(ANNA.bsn)
    studies = sorted(sim.anna, key=lambda s: s.study_date)
    assert len({s.study_date for s in studies}) == 3
    middle = date.fromisoformat(f"{studies[1].study_date[:4]}-{studies[1].study_date[4:6]}-"
                                f"{studies[1].study_date[6:]}")

    def uids(records: list) -> set[str]:  # type: ignore[type-arg]
        return {r.study_instance_uid for r in records} - {sim.big.study_instance_uid}

    assert uids(await src.find_studies(p, ANNA.bsn, date_from=middle)) == {
        s.study_instance_uid for s in studies[1:]}
    assert uids(await src.find_studies(p, ANNA.bsn, date_to=middle)) == {
        s.study_instance_uid for s in studies[:2]}
    assert uids(await src.find_studies(p, ANNA.bsn, date_from=middle, date_to=middle)) == {
        studies[1].study_instance_uid}
    wanted = [studies[0].study_instance_uid, studies[2].study_instance_uid]
    assert uids(await src.find_studies(p, ANNA.bsn, study_uids=wanted)) == set(wanted)
    # another patient's UID in the list is not a way in
    assert await src.find_studies(p, ANNA.bsn, study_uids=[sim.bram[0].study_instance_uid]) == []


async def test_find_instances_match_what_is_stored(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    src = source(pacs.port, tmp_path)
    p = await permit(ANNA.bsn)
    study = sim.anna[0]
    found = await src.find_instances(p, ANNA.bsn, study.study_instance_uid)
    assert sorted(r.sop_instance_uid for r in found) == sorted(
        str(ds.SOPInstanceUID) for ds in study.instances)
    stored = {str(ds.SOPInstanceUID): ds for ds in study.instances}
    for r in found:
        ds = stored[r.sop_instance_uid]
        assert (r.series_instance_uid, r.sop_class_uid, r.modality, r.instance_number) == (
            str(ds.SeriesInstanceUID), str(ds.SOPClassUID), str(ds.Modality), int(ds.InstanceNumber))
    report_study = next(s for s in sim.anna if s.has_report)
    only_sr = await src.find_instances(p, ANNA.bsn, report_study.study_instance_uid, modalities=["SR"])
    assert [r.modality for r in only_sr] == ["SR"]
    # Bram's image filed under Anna's study is not listed as hers
    third = await src.find_instances(p, ANNA.bsn, sim.anna[2].study_instance_uid)
    assert str(sim.foreign.SOPInstanceUID) not in {r.sop_instance_uid for r in third}
    assert len(third) == len(sim.anna[2].instances)
    # a study of someone else yields nothing for this patient's Permit
    assert await src.find_instances(p, ANNA.bsn, sim.bram[1].study_instance_uid) == []


async def test_patient_of_study(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    src = source(pacs.port, tmp_path)
    assert await src.patient_of_study(sim.bram[1].study_instance_uid) == BRAM.bsn
    assert await src.patient_of_study(str(generate_uid())) is None
    seq = source(pacs.port, tmp_path, bsn_attribute="OtherPatientIDsSequence")
    assert await seq.patient_of_study(sim.anna[1].study_instance_uid) == ANNA.bsn


async def test_other_patient_ids_sequence_mode_drops_what_the_pacs_does_not_filter(
        pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    # SimPacs, like Orthanc, ignores sequence matching and so answers with every patient's studies;
    # Anna's third study legitimately shows up for Bram too: it holds one of his images (misfiled)
    src = source(pacs.port, tmp_path, bsn_attribute="OtherPatientIDsSequence")
    found = await src.find_studies(await permit(BRAM.bsn), BRAM.bsn)
    assert {r.study_instance_uid for r in found} == {s.study_instance_uid for s in sim.bram} | {
        sim.anna[2].study_instance_uid}
    found = await src.find_studies(await permit(CARLA.bsn), CARLA.bsn)
    assert len(found) == 3 and all(r.patient_id == CARLA.bsn for r in found)
    instances = await src.find_instances(await permit(BRAM.bsn), BRAM.bsn, sim.bram[0].study_instance_uid)
    assert len(instances) == len(sim.bram[0].instances)


async def test_pacs_ignoring_the_patient_key_does_not_leak() -> None:
    """A PACS that answers every C-FIND with everyone's studies (or with broken identifiers)."""
    answers: list[Dataset] = []
    for pid, uid in ((ANNA.bsn, "1.2.3.1"), (BRAM.bsn, "1.2.3.2"), ("", "1.2.3.3")):
        ds = Dataset()
        ds.QueryRetrieveLevel = "STUDY"
        ds.PatientID = pid
        ds.StudyInstanceUID = uid
        answers.append(ds)

    def on_find(event: object) -> Iterator[tuple[int, Dataset | None]]:
        for ds in answers:
            yield 0xFF00, ds
        yield 0x0000, None

    with scripted_find_scp(on_find) as port:
        src = source(port, Path("/nonexistent"))
        found = await src.find_studies(await permit(ANNA.bsn), ANNA.bsn)
        assert [r.study_instance_uid for r in found] == ["1.2.3.1"]
        del answers[0]["StudyInstanceUID"]  # a "match" nobody can retrieve is a broken answer
        with pytest.raises(SourceUnavailable, match="without StudyInstanceUID"):
            await src.find_studies(await permit(ANNA.bsn), ANNA.bsn)


async def test_a_walk_that_lists_less_than_the_pacs_counts_is_refused_as_transient(tmp_path: Path) -> None:
    """A C-FIND answer that lost responses (pynetdicom's reactor can take one off the queue before the
    find reads it) must not become a manifest: a transfer of the rest would be "complete and verified"."""
    study = "1.2.826.0.1.3680043.10.7"
    layout = {f"{study}.{n}": [f"{study}.{n}.{i}" for i in range(1, 4)] for n in (1, 2)}
    answer = {"series": list(layout), "instances": {k: list(v) for k, v in layout.items()}, "counts": True}

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        q = event.identifier
        if q.QueryRetrieveLevel == "STUDY":
            ds = Dataset()
            ds.QueryRetrieveLevel, ds.PatientID, ds.StudyInstanceUID = "STUDY", ANNA.bsn, study
            if answer["counts"]:
                ds.NumberOfStudyRelatedSeries = len(layout)
            yield 0xFF00, ds
        elif q.QueryRetrieveLevel == "SERIES":
            for uid in answer["series"]:
                ds = Dataset()
                ds.QueryRetrieveLevel, ds.StudyInstanceUID, ds.SeriesInstanceUID = "SERIES", study, uid
                ds.Modality = "CT"
                if answer["counts"]:
                    ds.NumberOfSeriesRelatedInstances = len(layout[uid])
                yield 0xFF00, ds
        else:
            for uid in answer["instances"][q.SeriesInstanceUID]:
                ds = Dataset()
                ds.QueryRetrieveLevel, ds.StudyInstanceUID = "IMAGE", study
                ds.SeriesInstanceUID, ds.SOPInstanceUID = q.SeriesInstanceUID, uid
                ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
                yield 0xFF00, ds
        yield 0x0000, None

    with scripted_find_scp(on_find) as port:
        src = source(port, tmp_path)
        ok = await permit(ANNA.bsn)
        assert len(await src.find_instances(ok, ANNA.bsn, study)) == 6
        answer["series"] = answer["series"][1:]  # a series response lost
        series_lost = "listed 1 series of the study, the PACS counts 2"
        with pytest.raises(SourceUnavailable, match=series_lost) as lost:
            await src.find_instances(ok, ANNA.bsn, study)
        assert lost.value.retryable
        answer["series"] = list(layout)
        answer["instances"][f"{study}.2"] = answer["instances"][f"{study}.2"][:2]  # an instance response lost
        instance_lost = f"listed 2 instances of series {study}.2, the PACS counts 3"
        with pytest.raises(SourceUnavailable, match=instance_lost):
            await src.find_instances(ok, ANNA.bsn, study)
        answer["counts"] = False  # a PACS that does not count: nothing to hold the answer to
        assert len(await src.find_instances(ok, ANNA.bsn, study)) == 5


# -- the BSN rule, as each consumer reads it through a PACS --------------------------------------------


@contextmanager
def scripted_find_scp(on_find: Callable[[evt.Event], Iterator[tuple[int, Dataset | None]]]) -> Iterator[int]:
    """A C-FIND SCP answering with ``on_find`` (pynetdicom: a PACS scripted to misbehave exactly as a
    test needs); yields its port on loopback."""
    ae = AE(ae_title=HOSPITAL.ae_title)
    ae.add_supported_context(StudyRootQueryRetrieveInformationModelFind)
    server = start_acceptor(ae, (HOST, 0), evt_handlers=[(evt.EVT_C_FIND, on_find)])
    assert isinstance(server, ThreadedAssociationServer)
    try:
        yield int(server.server_address[1])
    finally:
        server.shutdown()


@dataclasses.dataclass
class FakePacs:
    """A PACS that answers every STUDY-level C-FIND with ``answers``, whatever the keys asked."""

    port: int
    answers: list[Dataset]


@pytest.fixture(scope="module")
def fake_pacs() -> Iterator[FakePacs]:
    fake = FakePacs(0, [])

    def on_find(event: evt.Event) -> Iterator[tuple[int, Dataset | None]]:
        if event.identifier.QueryRetrieveLevel == "STUDY":
            for ds in fake.answers:
                yield 0xFF00, ds
        yield 0x0000, None

    with scripted_find_scp(on_find) as fake.port:
        yield fake


#: Every number a shape mentions: none but the shape's own patient may read it as theirs.
_SHAPE_NUMBERS = (bsn_shapes.ANNA, bsn_shapes.BRAM, bsn_shapes.CARLA, bsn_shapes.LOCAL_ELEVEN)


@pytest.mark.parametrize("consumer", ["subscription-sync", "query"])
@pytest.mark.parametrize("shape", bsn_shapes.SHAPES, ids=[s.id for s in bsn_shapes.SHAPES])
async def test_every_path_reads_a_record_as_the_same_patient(fake_pacs: FakePacs, tmp_path: Path,
                                                             shape: bsn_shapes.Shape, consumer: str) -> None:
    """One PACS answer, as each consumer of the BSN rule sees it: the Mitz subscription sync (which
    patient to subscribe) and the query path (whose studies to list, whose study a UID is)."""
    answer = copy.deepcopy(shape.record)
    answer.QueryRetrieveLevel = "STUDY"
    answer.StudyInstanceUID = uid = "1.2.826.0.1.3680043.10.1"
    answer.StudyDate = "20261101"
    fake_pacs.answers = [answer]
    src = source(fake_pacs.port, tmp_path, bsn_attribute=shape.attribute)
    if consumer == "subscription-sync":
        assert await src.study_patients_since(date(2026, 1, 1)) == [shape.patient]
        return
    assert await src.patient_of_study(uid) == shape.patient
    for bsn in _SHAPE_NUMBERS:
        found = await src.find_studies(await permit(bsn), bsn)
        assert [r.study_instance_uid for r in found] == ([uid] if bsn == shape.patient else []), bsn


async def test_study_patients_since(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    """The sync's listing: one entry per study in the window, read the same wherever the BSN is kept."""
    src = source(pacs.port, tmp_path)
    everyone = await src.study_patients_since(date(2000, 1, 1))
    assert set(everyone) == {ANNA.bsn, BRAM.bsn, CARLA.bsn}
    assert len(everyone) == 3 * 3 + 1  # three studies per patient and Anna's big one
    seq = source(pacs.port, tmp_path, bsn_attribute="OtherPatientIDsSequence")
    assert await seq.study_patients_since(date(2000, 1, 1)) == everyone
    newest = max(s.study_date for s in [*sim.anna, *sim.bram])
    day = date(int(newest[:4]), int(newest[4:6]), int(newest[6:]))
    recent = await src.study_patients_since(day)
    assert 1 <= len(recent) < len(everyone)
    assert await src.study_patients_since(date(2099, 1, 1)) == []


async def test_study_patients_since_is_bounded_and_counted(pacs: SimPacs, tmp_path: Path) -> None:
    metrics = Metrics()
    src = source(pacs.port, tmp_path, timeout_s=0.5, metrics=metrics)
    pacs.set_behaviour(Misbehaviour(down=True))
    with pytest.raises(SourceUnavailable):
        await src.study_patients_since(date(2000, 1, 1))
    pacs.set_behaviour(Misbehaviour(delay_ms=5000))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable):
        await src.study_patients_since(date(2000, 1, 1))
    assert time.monotonic() - started < 4.5  # DIMSE timeout or deadline, not the PACS's 5 s delay
    samples = {(s.labels["peer"], s.labels["operation"], s.labels["outcome"]): s.value
               for m in metrics.registry.collect() if m.name == "duo_peer_requests"
               for s in m.samples if s.name.endswith("_total")}
    # Under load a 0.5 s association can itself time out, so the slow PACS may count as either.
    assert samples[(f"tlb:{HOSPITAL.ura}", "c-find", "connect")] >= 1
    assert sum(samples.values()) == 2
    assert {outcome for _, _, outcome in samples} <= {"connect", "timeout"}


async def test_malformed_pacs_is_unavailable(pacs: SimPacs, tmp_path: Path) -> None:
    pacs.set_behaviour(Misbehaviour(malformed=True))
    with pytest.raises(SourceUnavailable):
        await source(pacs.port, tmp_path).find_studies(await permit(ANNA.bsn), ANNA.bsn)


# -- consent and failures ---------------------------------------------------------------------------


async def test_wrong_permit_is_refused_before_any_network_traffic(sim: Sim, tmp_path: Path) -> None:
    with socket.socket() as listener:
        listener.bind((HOST, 0))
        listener.listen()
        listener.setblocking(False)
        src = source(listener.getsockname()[1], tmp_path)
        study = sim.anna[0]
        for p in (await permit(BRAM.bsn), await permit(ANNA.bsn, OTHER_HOSPITAL.ura)):
            with pytest.raises(NotCovered):
                await src.find_studies(p, ANNA.bsn)
            with pytest.raises(NotCovered):
                await src.find_instances(p, ANNA.bsn, study.study_instance_uid)
            with pytest.raises(NotCovered):
                src.retrieve(p, ANNA.bsn, study.study_instance_uid, records_of(study))
        with pytest.raises(BlockingIOError):
            listener.accept()  # nobody connected


async def test_down_and_slow_pacs_are_unavailable(pacs: SimPacs, tmp_path: Path) -> None:
    metrics = Metrics()
    src = source(pacs.port, tmp_path, timeout_s=0.5, metrics=metrics)
    p = await permit(ANNA.bsn)
    pacs.set_behaviour(Misbehaviour(down=True))
    started = time.monotonic()
    with pytest.raises(SourceUnavailable) as info:
        await src.find_studies(p, ANNA.bsn)
    assert info.value.source == f"tlb:{HOSPITAL.ura}"
    pacs.set_behaviour(Misbehaviour(delay_ms=5000))
    with pytest.raises(SourceUnavailable, match="within"):
        await src.find_studies(p, ANNA.bsn)
    with pytest.raises(SourceUnavailable):
        await src.patient_of_study("1.2.3")
    assert time.monotonic() - started < 3
    samples = {(s.labels["operation"], s.labels["outcome"]): s.value
               for m in metrics.registry.collect() if m.name == "duo_peer_requests"
               for s in m.samples if s.name.endswith("_total")}
    assert samples[("c-find", "connect")] == 1
    assert samples[("c-find", "timeout")] == 2


# -- retrieve -----------------------------------------------------------------------------------------


async def test_retrieve_whole_study_and_subset(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    src = source(pacs.port, spool)
    p = await permit(ANNA.bsn)
    study = sim.anna[0]
    got = await collect(src.retrieve(p, ANNA.bsn, study.study_instance_uid, records_of(study)))
    assert_identical(got, study.instances)
    # subset: a whole series plus part of another (SERIES- and IMAGE-level retrieves)
    series = study.series_instance_uids
    whole = [ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[0]]
    part = [ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[1]][:1]
    wanted = {str(ds.SOPInstanceUID) for ds in whole + part}
    subset = [r for r in records_of(study) if r.sop_instance_uid in wanted]
    got = await collect(src.retrieve(p, ANNA.bsn, study.study_instance_uid, subset))
    assert_identical(got, whole + part)
    assert not list(spool.glob(".part-*"))


async def test_retrieve_refuses_an_instance_of_another_patient(pacs: SimPacs, sim: Sim,
                                                               tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    study = sim.anna[2]
    foreign = InstanceRecord(study.study_instance_uid, str(sim.foreign.SeriesInstanceUID),
                             str(sim.foreign.SOPClassUID), str(sim.foreign.SOPInstanceUID))
    got = await collect(source(pacs.port, spool).retrieve(
        await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid, [*records_of(study), foreign]))
    assert_identical(got, study.instances)
    assert sorted(spool.iterdir()) == sorted(i.path for i in got)


async def test_retrieve_by_c_move_to_own_scp(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    router = MoveRouter()  # DUO's storage SCP as the daemon runs it: the asyncio UL acceptor
    server = UlServer(AcceptorPolicy(DUO_AE, {**verification_supported(), **receiving_syntaxes()}),
                      router.ul_store)
    await server.start(HOST, 0)
    pacs.add_move_destination(DUO_AE, HOST, server.port)
    try:
        src = source(pacs.port, tmp_path, retrieve_method="c-move", move_router=router)
        study = sim.anna[1]
        got = await collect(src.retrieve(await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid,
                                         records_of(study)))
        assert_identical(got, study.instances)
    finally:
        await server.close()


async def test_retrieve_window_bounds_the_spool_and_cancel_cleans_up(pacs: SimPacs, sim: Sim,
                                                                     tmp_path: Path) -> None:
    spool = tmp_path / "spool"
    src = source(pacs.port, spool, window=3)
    p = await permit(ANNA.bsn)
    records = records_of(sim.big)
    peak = 0
    lateness = 0.0
    taken: list[Path] = []
    holding = asyncio.Event()

    async def watch() -> None:
        nonlocal peak, lateness
        while True:
            before = time.perf_counter()
            await asyncio.sleep(0.005)
            lateness = max(lateness, time.perf_counter() - before - 0.005)
            if spool.exists():
                peak = max(peak, sum(1 for _ in spool.iterdir()))

    async def consume(stop_after: int | None) -> None:
        async with aclosing(src.retrieve(p, ANNA.bsn, sim.big.study_instance_uid, records)) as stream:
            async for item in stream:
                taken.append(item.path)
                await asyncio.sleep(0.01)  # slower than the PACS
                if stop_after is not None and len(taken) >= stop_after:
                    holding.set()
                    await asyncio.sleep(30)
                item.path.unlink()

    watcher = asyncio.create_task(watch())
    with fixtures_frozen():
        await consume(None)
    assert len(taken) == len(records)
    assert 1 <= peak <= 3
    assert lateness < 0.1, lateness
    assert list(spool.iterdir()) == []

    taken.clear()
    task = asyncio.create_task(consume(stop_after=5))
    await asyncio.wait_for(holding.wait(), 10)
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    watcher.cancel()
    assert [p.name for p in spool.iterdir()] == [taken[-1].name]  # only the file the consumer held
    assert peak <= 3


# -- Orthanc --------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    orthanc: Orthanc
    anna: list[GeneratedStudy]
    router: MoveRouter
    #: Where Orthanc sends its C-MOVEs: DUO's storage SCP, started by the test that moves.
    scp_port: int


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    tmp = tmp_path_factory.mktemp("orthanc")
    anna = generate_studies(ANNA, HOSPITAL, 3, NET.seed)
    studies = anna + generate_studies(BRAM, HOSPITAL, 1, NET.seed)
    files = [str(p) for s in studies for p in write_study(s, tmp / "send" / s.study_instance_uid)]
    router = MoveRouter()
    with orthanc_moving_to(tmp / "db", DUO_AE, files) as (orthanc, scp_port):
        yield Loaded(orthanc, anna, router, scp_port)


def orthanc_source(o: Loaded, spool: Path, **kw: object) -> DicomPacsSource:
    return source(o.orthanc.dicom_port, spool, ae_title=o.orthanc.ae_title, move_router=o.router, **kw)


async def test_orthanc_find(orthanc: Loaded, tmp_path: Path) -> None:
    src = orthanc_source(orthanc, tmp_path)
    p = await permit(ANNA.bsn)
    found = await src.find_studies(p, ANNA.bsn)
    assert {r.study_instance_uid for r in found} == {s.study_instance_uid for s in orthanc.anna}
    # Orthanc answers the series-level UID-list query too, so the body part is known
    assert {r.study_instance_uid: r.body_part for r in found} == {
        s.study_instance_uid: s.body_part for s in orthanc.anna}
    first = sorted(orthanc.anna, key=lambda s: s.study_date)[0]
    day = date(int(first.study_date[:4]), int(first.study_date[4:6]), int(first.study_date[6:]))
    assert [r.study_instance_uid for r in await src.find_studies(p, ANNA.bsn, date_to=day)] == [
        first.study_instance_uid]
    wanted = [s.study_instance_uid for s in orthanc.anna[1:]]
    found = await src.find_studies(p, ANNA.bsn, study_uids=wanted)
    assert {r.study_instance_uid for r in found} == set(wanted)
    study = orthanc.anna[0]
    instances = await src.find_instances(p, ANNA.bsn, study.study_instance_uid)
    assert sorted(r.sop_instance_uid for r in instances) == sorted(
        str(d.SOPInstanceUID) for d in study.instances)
    assert await src.patient_of_study(study.study_instance_uid) == ANNA.bsn


@pytest.mark.parametrize("method", ["c-get", "c-move"])
async def test_orthanc_retrieve_whole_and_subset(orthanc: Loaded, tmp_path: Path, method: str) -> None:
    src = orthanc_source(orthanc, tmp_path, retrieve_method=method)
    p = await permit(ANNA.bsn)
    study = orthanc.anna[1]
    subset = records_of(study)[::2]
    async with own_storage_scp(orthanc.router, DUO_AE, orthanc.scp_port):
        got = await collect(src.retrieve(p, ANNA.bsn, study.study_instance_uid, records_of(study)))
        assert_identical(got, study.instances)
        got = await collect(src.retrieve(p, ANNA.bsn, study.study_instance_uid, subset))
    wanted = {r.sop_instance_uid for r in subset}
    assert_identical(got, [ds for ds in study.instances if str(ds.SOPInstanceUID) in wanted])


# -- retrieve what a request names ------------------------------------------------------------------


def named_with_strays(study: GeneratedStudy, sim: Sim) -> tuple[dict[str, str], list[Dataset]]:
    """Every instance of ``study`` named under its own series, plus three a RAD-75 request may name
    that must not come back: an unknown UID, a real instance named under another series of the study,
    and another patient's image filed under this study. Returns the names and what must arrive."""
    series = study.series_instance_uids
    misfiled = next(ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[1])
    named = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in study.instances}
    named[str(misfiled.SOPInstanceUID)] = series[0]
    named[generate_uid()] = series[0]
    named[str(sim.foreign.SOPInstanceUID)] = str(sim.foreign.SeriesInstanceUID)
    return named, [ds for ds in study.instances if ds is not misfiled]


def find_levels(logs: list[dict[str, object]]) -> list[object]:
    return [e["level"] for e in logs if e["event"] == "sim_pacs_find"]


async def test_retrieve_named_skips_the_image_walk(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    study = sim.anna[1]
    series = study.series_instance_uids
    # a whole series and part of another, both by UID list
    chosen = [ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[0]] + [
        ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[1]][:1]
    with structlog.testing.capture_logs() as logs:
        got = await collect(source(pacs.port, tmp_path / "spool").retrieve_named(
            await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid,
            {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in chosen}))
    assert_identical(got, chosen)
    assert {i.record.sop_class_uid for i in got} == {str(ds.SOPClassUID) for ds in chosen}
    # The sim PACS logs from its own threads, so a late line of an earlier test may show up here: what
    # matters is that this retrieve asked the study level and nothing below it.
    levels = find_levels(logs)
    assert "STUDY" in levels and "SERIES" not in levels and "IMAGE" not in levels


async def test_retrieve_named_delivers_only_what_is_named_and_walks_for_the_rest(
        pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    study = sim.anna[2]  # holds the foreign image too
    named, expected = named_with_strays(study, sim)
    with structlog.testing.capture_logs() as logs:
        got = await collect(source(pacs.port, tmp_path / "spool").retrieve_named(
            await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid, named))
    assert_identical(got, expected)
    # what did not come was looked for, and only then
    assert "IMAGE" in find_levels(logs)
    assert [e["undelivered"] for e in logs if e["event"] == "pacs_retrieve_named_walk"] == [3]


async def test_retrieve_named_walks_a_pacs_that_does_not_list_sop_classes(
        pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    study = sim.anna[2]
    named, expected = named_with_strays(study, sim)
    pacs.set_behaviour(PacsMisbehaviour(omit_keys=["SOPClassesInStudy"]))
    with structlog.testing.capture_logs() as logs:
        got = await collect(source(pacs.port, tmp_path / "spool").retrieve_named(
            await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid, named))
    assert_identical(got, expected)
    assert "IMAGE" in find_levels(logs)


async def test_retrieve_named_checks_the_permit_at_the_call(sim: Sim, tmp_path: Path) -> None:
    with pytest.raises(NotCovered):
        source(sim.pacs.port, tmp_path).retrieve_named(await permit(BRAM.bsn), ANNA.bsn, "1.2.3", {})


@pytest.mark.parametrize("method", ["c-get", "c-move"])
async def test_orthanc_retrieve_named(orthanc: Loaded, tmp_path: Path, method: str) -> None:
    """Orthanc answers SOPClassesInStudy: the named instances come without an image-level walk, and a
    name that is unknown, or under the wrong series, brings nothing."""
    study = orthanc.anna[2]
    series = study.series_instance_uids
    misfiled = next(ds for ds in study.instances if str(ds.SeriesInstanceUID) == series[1])
    named = {str(ds.SOPInstanceUID): str(ds.SeriesInstanceUID) for ds in study.instances}
    named[str(misfiled.SOPInstanceUID)] = series[0]
    named[generate_uid()] = series[0]
    src = orthanc_source(orthanc, tmp_path, retrieve_method=method)
    async with own_storage_scp(orthanc.router, DUO_AE, orthanc.scp_port):
        got = await collect(src.retrieve_named(await permit(ANNA.bsn), ANNA.bsn, study.study_instance_uid,
                                               named))
    assert_identical(got, [ds for ds in study.instances if ds is not misfiled])


async def test_orthanc_lean_walk_names_the_same_instances(orthanc: Loaded, tmp_path: Path) -> None:
    """A lean walk (identities only, for a view) lists exactly what the full walk lists, with the same
    series and SOP classes, whether the study holds one SOP class (image level asked for main tags
    only) or several (the full walk)."""
    src = orthanc_source(orthanc, tmp_path)
    p = await permit(ANNA.bsn)
    for study in orthanc.anna:
        full = await src.find_instances(p, ANNA.bsn, study.study_instance_uid)
        lean = await src.find_instances(p, ANNA.bsn, study.study_instance_uid, lean=True)
        key = sorted((r.sop_instance_uid, r.series_instance_uid, r.sop_class_uid, r.instance_number)
                     for r in full)
        assert sorted((r.sop_instance_uid, r.series_instance_uid, r.sop_class_uid, r.instance_number)
                      for r in lean) == key
        assert {r.sop_instance_uid for r in full} == {str(ds.SOPInstanceUID) for ds in study.instances}
