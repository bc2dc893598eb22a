"""The asyncio Q/R SCU against the simulated PACS and a real Orthanc: streaming, spooling with
back-pressure, C-MOVE routing, typed failures, cancellation, and a loop that keeps ticking."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from io import BytesIO
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLosslessSV1,
)
from pynetdicom import AE

from duo_gateway.dicom.qr import (
    _HEAD_BYTES,
    MAX_CONTEXTS,
    AssociationFailed,
    AssociationRejected,
    MemoryBudget,
    MoveRouter,
    QrClient,
    QrError,
    QrStatusError,
    QrTimeout,
    Spool,
    SpooledInstance,
    SpoolSink,
    _header_from,
    receiving_syntaxes,
    storage_contexts,
)
from duo_gateway.dicom.syntaxes import LOSSLESS_PREFERRED, LOSSY_PREFERRED, PREFERRED
from duo_gateway.dicom.ul.association import AcceptorPolicy, UlServer, verification_supported
from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.config import default_network
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from tests.support.gc import fixtures_frozen
from tests.support.orthanc import Orthanc, orthanc_moving_to, own_storage_scp
from tests.support.studies import big_study

NET = default_network()
HOSPITAL = NET.hospitals[0]
ANNA, BRAM, CARLA = NET.patients
HOST = "127.0.0.1"
DUO_AE = "DUO_TEST"




@dataclasses.dataclass
class Sim:
    pacs: SimPacs
    anna: list[GeneratedStudy]
    big: GeneratedStudy


@pytest.fixture(scope="module")
def sim(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Sim]:
    pacs = SimPacs(HOSPITAL, tmp_path_factory.mktemp("pacs"))
    studies = {p.bsn: generate_studies(p, HOSPITAL, 3, NET.seed) for p in NET.patients}
    for patient_studies in studies.values():
        pacs.preload(patient_studies)
    big = big_study(generate_studies(ANNA, HOSPITAL, 1, NET.seed, image_size=96)[0], 80)
    pacs.preload([big])
    pacs.start()
    try:
        yield Sim(pacs, studies[ANNA.bsn], big)
    finally:
        pacs.stop()


@pytest.fixture
def pacs(sim: Sim) -> Iterator[SimPacs]:
    """The module's PACS, put back to normal behaviour after each test."""
    yield sim.pacs
    sim.pacs.set_behaviour(Misbehaviour())


def client(port: int, called: str = HOSPITAL.ae_title, timeout_s: float = 5, **kw: object) -> QrClient:
    return QrClient(DUO_AE, HOST, port, called, timeout_s=timeout_s, **kw)  # type: ignore[arg-type]


def study_query(**keys: object) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = ""
    for k, v in keys.items():
        setattr(q, k, v)
    return q


def retrieve_query(study_uid: str) -> Dataset:
    q = Dataset()
    q.QueryRetrieveLevel = "STUDY"
    q.StudyInstanceUID = study_uid
    return q


def sop_classes(study: GeneratedStudy) -> list[str]:
    return sorted({str(ds.SOPClassUID) for ds in study.instances})


def assert_identical(items: list[SpooledInstance], study: GeneratedStudy) -> None:
    stored = {str(ds.SOPInstanceUID): ds for ds in study.instances}
    assert sorted(i.sop_instance_uid for i in items) == sorted(stored)
    for item in items:
        got = dcmread(item.path)
        want = stored[item.sop_instance_uid]
        assert str(got.SOPInstanceUID) == item.sop_instance_uid
        assert got.get("PixelData") == want.get("PixelData")
        assert got == want  # every element
        # as stored, not re-encoded by the PACS into a syntax of its choosing
        assert got.file_meta.TransferSyntaxUID == want.file_meta.TransferSyntaxUID == item.transfer_syntax_uid
        assert item.size == item.path.stat().st_size


# -- C-FIND ---------------------------------------------------------------------------------------


async def test_find_streams_matches_of_one_patient(pacs: SimPacs, sim: Sim) -> None:
    found = await client(pacs.port).find_all(study_query(PatientID=ANNA.bsn, ModalitiesInStudy=""))
    assert sorted(str(d.StudyInstanceUID) for d in found) == sorted(
        [s.study_instance_uid for s in sim.anna] + [sim.big.study_instance_uid])


async def test_concurrent_finds_respect_max_associations(pacs: SimPacs) -> None:
    pacs.set_behaviour(Misbehaviour(delay_ms=150))  # keep each association open a while
    qr = client(pacs.port, max_associations=2)
    peak = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            assert pacs._server is not None
            peak = max(peak, len(pacs._server.active_associations))
            await asyncio.sleep(0.005)

    sampler = asyncio.create_task(sample())
    results = await asyncio.gather(*(qr.find_all(study_query(PatientID=ANNA.bsn)) for _ in range(6)))
    done.set()
    await sampler
    assert all(len(r) == 4 for r in results)
    assert peak == 2


async def test_failures_are_typed(pacs: SimPacs) -> None:
    with pytest.raises(AssociationRejected):
        await client(pacs.port, called="NOT_THE_PACS").find_all(study_query(PatientID=ANNA.bsn))
    bad = Dataset()
    bad.QueryRetrieveLevel = "FRAME"
    with pytest.raises(QrStatusError) as info:
        await client(pacs.port).find_all(bad)
    assert info.value.status == 0xA900
    pacs.set_behaviour(Misbehaviour(down=True))
    started = time.monotonic()
    with pytest.raises(AssociationFailed):
        await client(pacs.port).find_all(study_query(PatientID=ANNA.bsn))
    assert time.monotonic() - started < 2


async def test_slow_pacs_times_out_and_cancel_is_prompt(pacs: SimPacs) -> None:
    pacs.set_behaviour(Misbehaviour(delay_ms=5000))
    started = time.monotonic()
    with pytest.raises(QrTimeout):
        await client(pacs.port, timeout_s=0.5).find_all(study_query(PatientID=ANNA.bsn))
    assert time.monotonic() - started < 2
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(client(pacs.port, timeout_s=10).find_all(study_query(PatientID=ANNA.bsn)), 0.3)
    assert time.monotonic() - started < 1.5  # aborted, not waiting out the 10 s DIMSE timeout


async def test_breaking_off_a_find_leaves_the_pacs_usable(pacs: SimPacs, sim: Sim) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = sim.big.study_instance_uid
    q.SeriesInstanceUID = str(sim.big.instances[0].SeriesInstanceUID)
    q.SOPInstanceUID = ""
    qr = client(pacs.port)
    stream = qr.find(q)
    async for _ in stream:
        break
    await stream.aclose()  # type: ignore[attr-defined]
    assert qr._slots._value == 4
    assert len(await qr.find_all(q)) == len(sim.big.instances)


# -- C-GET ----------------------------------------------------------------------------------------


async def test_get_spools_identical_files(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    study = sim.anna[0]
    qr = client(pacs.port)
    spool = qr.spool(tmp_path / "spool", 4)
    items = [i async for i in qr.get(retrieve_query(study.study_instance_uid), spool, sop_classes(study))]
    assert_identical(items, study)
    assert not list((tmp_path / "spool").glob(".part-*"))


def _part10(ds: Dataset) -> bytes:
    buffer = BytesIO()
    ds.save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def test_the_header_is_read_from_the_first_bytes_only_when_they_hold_all_of_it(sim: Sim) -> None:
    """A received file's header comes from the bytes the sink kept; a header longer than those (a large
    private element before the pixels) is read from the file, never taken half."""
    instance = sim.big.instances[0]
    ts = str(instance.file_meta.TransferSyntaxUID)
    whole = _part10(instance)
    meta = 144 + int.from_bytes(whole[140:144], "little")  # preamble, DICM, group length, group 0002
    header = _header_from(whole[:_HEAD_BYTES], meta, ts, whole=False)
    assert header is not None and header.SOPInstanceUID == instance.SOPInstanceUID
    assert "PixelData" not in header
    padded = copy.deepcopy(instance)  # the fixture is shared: never change it
    padded.add_new(0x00111010, "OB", b"\0" * (2 * _HEAD_BYTES))  # a private blob before the pixels
    padded.add_new(0x00110010, "LO", "DUO TEST")
    data = _part10(padded)
    assert _header_from(data[:_HEAD_BYTES], meta, ts, whole=False) is None


async def test_validator_refusals_never_reach_the_consumer(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    study = sim.anna[0]
    keep = {str(ds.SOPInstanceUID) for ds in study.instances[:2]}
    qr = client(pacs.port)
    spool = qr.spool(tmp_path, 2, validate=lambda h: None if str(h.SOPInstanceUID) in keep else "no")
    items = [i async for i in qr.get(retrieve_query(study.study_instance_uid), spool, sop_classes(study))]
    assert {i.sop_instance_uid for i in items} == keep
    assert spool.refused == len(study.instances) - 2
    assert sorted(os.listdir(tmp_path)) == sorted(i.path.name for i in items)


async def test_get_failure_status_is_typed(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"  # without SOPInstanceUID: the PACS refuses (0xA900)
    q.StudyInstanceUID = sim.anna[0].study_instance_uid
    qr = client(pacs.port)
    with pytest.raises(QrStatusError):
        async for _ in qr.get(q, qr.spool(tmp_path, 2), sop_classes(sim.anna[0])):
            pass


async def test_slow_consumer_back_pressure_and_responsive_loop(pacs: SimPacs, sim: Sim,
                                                               tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    window = 3
    peak = 0
    lateness = 0.0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak
        while not done.is_set():
            peak = max(peak, sum(1 for _ in spool_dir.iterdir()) if spool_dir.exists() else 0)
            await asyncio.sleep(0.002)

    async def tick() -> None:
        nonlocal lateness
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lateness = max(lateness, time.perf_counter() - before - 0.01)

    qr = client(pacs.port)
    received = 0
    with fixtures_frozen():
        tasks = [asyncio.create_task(sample()), asyncio.create_task(tick())]
        async for item in qr.get(retrieve_query(sim.big.study_instance_uid), qr.spool(spool_dir, window),
                                 sop_classes(sim.big)):
            received += 1
            await asyncio.sleep(0.005)  # a consumer slower than the PACS
            item.path.unlink()
        done.set()
        await asyncio.gather(*tasks)
    assert received == len(sim.big.instances)
    assert 1 <= peak <= window
    # Generous on purpose: the suite must not time things (2 busy cores in CI); a DIMSE exchange run
    # on the loop would stall it for the whole transfer, seconds, not a scheduling hiccup.
    assert lateness < 1.0, lateness
    assert list(spool_dir.iterdir()) == []


async def test_byte_window_bounds_the_spool_and_lets_a_larger_instance_pass_alone(
        pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    """The byte window holds what is on disk, sampled from outside, and records its high-water mark;
    an instance larger than the window still passes, alone."""
    spool_dir = tmp_path / "spool"
    largest = max(len(write_study(sim.big, tmp_path / "sizes")[0].read_bytes()), 1)
    window_bytes = largest * 5 // 2  # room for two instances, never three
    peak_bytes = peak_files = 0
    done = asyncio.Event()

    async def sample() -> None:
        nonlocal peak_bytes, peak_files
        while not done.is_set():
            sizes = []
            for f in spool_dir.iterdir() if spool_dir.exists() else ():
                with contextlib.suppress(FileNotFoundError):  # consumed meanwhile
                    sizes.append(f.stat().st_size)
            peak_bytes, peak_files = max(peak_bytes, sum(sizes)), max(peak_files, len(sizes))
            await asyncio.sleep(0.002)

    qr = client(pacs.port)
    spool = qr.spool(spool_dir, 100, window_bytes=window_bytes)
    received = 0
    with fixtures_frozen():
        sampler = asyncio.create_task(sample())
        async for item in qr.get(retrieve_query(sim.big.study_instance_uid), spool, sop_classes(sim.big)):
            received += 1
            if received in (1, 40):
                await asyncio.sleep(0.3)  # a consumer that stalls: the PACS fills the window meanwhile
            item.path.unlink()
        done.set()
        await sampler
    assert received == len(sim.big.instances)
    assert window_bytes // 2 < spool.high_water_bytes <= window_bytes  # two instances: filled, not overrun
    assert peak_files == 2 and peak_bytes <= window_bytes
    assert spool.bytes_held == 0 and list(spool_dir.iterdir()) == []

    tiny = qr.spool(tmp_path / "tiny", 100, window_bytes=1)
    got = [i async for i in qr.get(retrieve_query(sim.anna[0].study_instance_uid), tiny,
                                   sop_classes(sim.anna[0]))]
    assert len(got) == len(sim.anna[0].instances)
    assert tiny.high_water_bytes == max(i.size for i in got)  # one at a time, whatever its size


async def test_a_memory_budget_holds_instances_without_files_and_spills_beyond_it(
        pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    """With room in the budget each instance comes as its Part 10 bytes, exactly what the file would
    hold, and no file is made; the budget is given back as each is consumed. A budget too small for
    the study spills: the instances that do not fit (or outgrow their reservation mid-write) come as
    files, identical too, and nothing is refused for want of memory."""
    study = sim.big
    qr = client(pacs.port)
    largest = max(len(p.read_bytes()) for p in write_study(study, tmp_path / "sizes"))

    def as_file(item: SpooledInstance, where: Path) -> SpooledInstance:
        if item.data is None:
            return item
        assert item.path is None and item.size == len(item.data) and item.reserved >= item.size
        where.write_bytes(item.data)
        return dataclasses.replace(item, path=where, data=None)

    for limit, in_memory in ((64 * largest, len(study.instances)), (5 * largest // 2, None), (0, 0)):
        budget = MemoryBudget(limit)
        spool_dir = tmp_path / f"spool-{limit}"
        spool = qr.spool(spool_dir, 4, memory=budget)
        got: list[SpooledInstance] = []
        async for item in qr.get(retrieve_query(study.study_instance_uid), spool, sop_classes(study)):
            assert budget.used <= limit
            got.append(as_file(item, tmp_path / f"{limit}-{item.sop_instance_uid}.dcm"))
            if len(got) == 1:
                await asyncio.sleep(0.3)  # a consumer that stalls: the window fills past the budget
        held = sum(1 for i in got if i.path is not None and i.path.parent == tmp_path)
        if in_memory is None:
            assert 0 < held < len(study.instances)  # some in memory, the rest spilled to files
        else:
            assert held == in_memory
        assert budget.used == 0
        assert not list(spool_dir.glob(".part-*"))
        assert_identical(got, study)


async def test_an_instance_that_outgrows_the_budget_spills_mid_write(sim: Sim, tmp_path: Path) -> None:
    """The receive path as dicom/ul drives it, without a PACS: an instance starts in memory, the budget
    runs out halfway, and it ends as a file with every byte, the budget given back."""
    instance = sim.big.instances[0]
    whole = _part10(instance)
    dataset = whole[144 + int.from_bytes(whole[140:144], "little"):]
    budget = MemoryBudget(len(dataset) // 2)
    spool = Spool(tmp_path, 4, memory=budget)
    sink = await spool.receive(str(instance.SOPClassUID), str(instance.SOPInstanceUID),
                               str(instance.file_meta.TransferSyntaxUID))
    assert isinstance(sink, SpoolSink)
    for start in range(0, len(dataset), 4096):
        sink.write(memoryview(dataset)[start:start + 4096])
    assert await sink.finish() == 0
    item = await spool._next(1)
    assert isinstance(item, SpooledInstance) and item.data is None and item.path is not None
    assert dcmread(item.path) == instance and item.size == item.path.stat().st_size
    assert budget.used == 0 and item.reserved == 0
    await spool.close()


async def test_a_memory_budget_is_given_back_when_a_retrieve_is_cut(pacs: SimPacs, sim: Sim,
                                                                    tmp_path: Path) -> None:
    budget = MemoryBudget(1 << 30)
    qr = client(pacs.port)
    stream = qr.get(retrieve_query(sim.big.study_instance_uid), qr.spool(tmp_path, 8, memory=budget),
                    sop_classes(sim.big))
    async with aclosing(stream):
        async for _item in stream:
            await asyncio.sleep(0.2)  # the PACS fills the window meanwhile
            break
    assert budget.used == 0


async def test_cancel_mid_get_aborts_and_cleans_up(pacs: SimPacs, sim: Sim, tmp_path: Path) -> None:
    spool_dir = tmp_path / "spool"
    taken: list[Path] = []
    five = asyncio.Event()
    qr = client(pacs.port)

    async def consume() -> None:
        stream = qr.get(retrieve_query(sim.big.study_instance_uid), qr.spool(spool_dir, 4),
                        sop_classes(sim.big))
        async with aclosing(stream):
            async for item in stream:
                taken.append(item.path)
                if len(taken) == 5:
                    five.set()
                    await asyncio.sleep(10)  # cancelled here, in the consumer's own code

    task = asyncio.create_task(consume())
    await asyncio.wait_for(five.wait(), 10)
    await asyncio.sleep(0.1)  # let the PACS fill the window
    started = time.monotonic()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert time.monotonic() - started < 2
    # only what the consumer took remains: no queued, half-written or temp files
    assert sorted(spool_dir.iterdir()) == sorted(taken)
    assert qr._slots._value == 4
    assert len(await qr.find_all(study_query(PatientID=ANNA.bsn))) == 4  # PACS fine afterwards


async def test_event_loop_ticks_during_large_find(pacs: SimPacs, sim: Sim) -> None:
    lateness = 0.0
    done = asyncio.Event()

    async def tick() -> None:
        nonlocal lateness
        while not done.is_set():
            before = time.perf_counter()
            await asyncio.sleep(0.01)
            lateness = max(lateness, time.perf_counter() - before - 0.01)

    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = sim.big.study_instance_uid
    q.SeriesInstanceUID = str(sim.big.instances[0].SeriesInstanceUID)
    q.SOPInstanceUID = ""
    q.InstanceNumber = ""
    with fixtures_frozen():
        ticker = asyncio.create_task(tick())
        for _ in range(3):
            assert len(await client(pacs.port).find_all(q)) == len(sim.big.instances)
        done.set()
        await ticker
    # Generous on purpose: the suite must not time things (2 busy cores in CI); a DIMSE exchange run
    # on the loop would stall it for the whole transfer, seconds, not a scheduling hiccup.
    assert lateness < 1.0, lateness


def test_storage_contexts_fit_the_128_limit() -> None:
    few = storage_contexts(["1.2.3.1", "1.2.3.2"])
    assert [str(cx.transfer_syntax[0]) for cx in few] == [*PREFERRED, *PREFERRED]  # every one, in order
    assert all(len(cx.transfer_syntax) == 1 for cx in few)  # the PACS cannot re-encode
    classes = [f"1.2.3.{i}" for i in range(12)]
    contexts = storage_contexts(classes)  # 12 x all does not fit: the lossy ones go first
    kept = [ts for ts in PREFERRED if ts not in LOSSY_PREFERRED]
    assert [str(cx.transfer_syntax[0]) for cx in contexts] == kept * 12 and len(contexts) < MAX_CONTEXTS
    many = storage_contexts([f"1.2.3.{i}" for i in range(100)])
    assert len(many) == 100  # one context each once that no longer fits, the PACS choosing among kept
    assert all([str(ts) for ts in cx.transfer_syntax] == kept for cx in many)
    with pytest.raises(QrError):
        storage_contexts([f"1.2.3.{i}" for i in range(MAX_CONTEXTS)])


def test_storage_contexts_in_the_requesters_syntaxes_and_order() -> None:
    """What a RAD-75 request accepts, in its order; uncompressed little endian brings its sibling, which
    DUO converts to itself, and nothing else is proposed."""
    asked = storage_contexts(["1.2.3.1"], syntaxes=[str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian)])
    assert [str(cx.transfer_syntax[0]) for cx in asked] == [
        str(JPEGBaseline8Bit), str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)]
    only = storage_contexts(["1.2.3.1"], syntaxes=[str(JPEGLosslessSV1), str(JPEG2000Lossless)])
    assert [str(cx.transfer_syntax[0]) for cx in only] == [str(JPEGLosslessSV1), str(JPEG2000Lossless)]


# -- C-MOVE ---------------------------------------------------------------------------------------


@pytest.fixture
async def move_scp() -> AsyncIterator[tuple[MoveRouter, int]]:
    """DUO's storage SCP as the daemon runs it (the asyncio UL acceptor): every C-STORE goes through
    the router into the move's spool."""
    router = MoveRouter()
    server = UlServer(AcceptorPolicy(DUO_AE, {**verification_supported(), **receiving_syntaxes()}),
                      router.ul_store)
    await server.start(HOST, 0)
    try:
        yield router, server.port
    finally:
        await server.close()


async def test_move_to_own_scp_routes_by_originator(pacs: SimPacs, sim: Sim, tmp_path: Path,
                                                    move_scp: tuple[MoveRouter, int]) -> None:
    router, port = move_scp
    pacs.add_move_destination(DUO_AE, HOST, port)
    qr = client(pacs.port)
    study = sim.anna[2]
    items = [i async for i in qr.move(retrieve_query(study.study_instance_uid), DUO_AE, router,
                                      qr.spool(tmp_path, 2))]
    assert_identical(items, study)
    assert router.active == 0


async def test_unsolicited_store_at_own_scp_is_refused(move_scp: tuple[MoveRouter, int], sim: Sim) -> None:
    _, port = move_scp
    ds = sim.anna[0].instances[0]

    def intrude() -> int:
        ae = AE(ae_title="INTRUDER")
        ae.add_requested_context(ds.SOPClassUID, ds.file_meta.TransferSyntaxUID)
        assoc = ae.associate(HOST, port, ae_title=DUO_AE)
        assert assoc.is_established
        try:
            return int(assoc.send_c_store(ds).Status)
        finally:
            assoc.release()

    assert await asyncio.to_thread(intrude) == 0x0124  # no move asked for it: DUO takes no unsolicited data


# -- Orthanc --------------------------------------------------------------------------------------


@dataclasses.dataclass
class Loaded:
    orthanc: Orthanc
    studies: list[GeneratedStudy]
    router: MoveRouter
    #: Where Orthanc sends its C-MOVEs: DUO's storage SCP, started by the test that moves.
    scp_port: int


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    tmp = tmp_path_factory.mktemp("orthanc")
    studies = generate_studies(ANNA, HOSPITAL, 2, NET.seed) + generate_studies(BRAM, HOSPITAL, 1, NET.seed)
    files = [str(p) for s in studies for p in write_study(s, tmp / "send" / s.study_instance_uid)]
    router = MoveRouter()
    with orthanc_moving_to(tmp / "db", DUO_AE, files) as (orthanc, scp_port):
        yield Loaded(orthanc, studies, router, scp_port)


def orthanc_client(o: Orthanc) -> QrClient:
    return QrClient(DUO_AE, o.host, o.dicom_port, o.ae_title, timeout_s=10)


async def test_orthanc_find_get_and_move(orthanc: Loaded, tmp_path: Path) -> None:
    qr = orthanc_client(orthanc.orthanc)
    found = await qr.find_all(study_query(PatientID=ANNA.bsn, NumberOfStudyRelatedInstances=""))
    anna = orthanc.studies[:2]
    assert sorted(str(d.StudyInstanceUID) for d in found) == sorted(s.study_instance_uid for s in anna)

    got = [i async for i in qr.get(retrieve_query(anna[0].study_instance_uid), qr.spool(tmp_path / "g", 2),
                                   sop_classes(anna[0]))]
    assert_identical(got, anna[0])

    async with own_storage_scp(orthanc.router, DUO_AE, orthanc.scp_port):
        moved = [i async for i in qr.move(retrieve_query(anna[1].study_instance_uid), DUO_AE, orthanc.router,
                                          qr.spool(tmp_path / "m", 2),
                                          expected={str(ds.SOPInstanceUID) for ds in anna[1].instances})]
    assert_identical(moved, anna[1])


async def test_orthanc_image_level_get_with_uid_list(orthanc: Loaded, tmp_path: Path) -> None:
    study = orthanc.studies[0]
    subset = study.instances[:3]
    q = Dataset()
    q.QueryRetrieveLevel = "IMAGE"
    q.StudyInstanceUID = study.study_instance_uid
    q.SOPInstanceUID = [str(ds.SOPInstanceUID) for ds in subset]
    qr = orthanc_client(orthanc.orthanc)
    got = [i async for i in qr.get(q, qr.spool(tmp_path, 2), sop_classes(study))]
    assert sorted(i.sop_instance_uid for i in got) == sorted(str(ds.SOPInstanceUID) for ds in subset)




def test_duo_can_decompress_every_lossless_syntax_it_asks_for() -> None:
    """LOSSLESS_PREFERRED's promise: a destination that declines one still gets the pixels (a syntax
    without a decoder here is for its source, which holds the codec, to decompress)."""
    from pydicom.pixels.decoders.base import get_decoder

    missing = [ts for ts in LOSSLESS_PREFERRED if not get_decoder(ts).is_available]
    assert not missing, f"no pixel data decoder installed for {missing}"
