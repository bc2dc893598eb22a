"""SimPacs against the real DCMTK tools: if echoscu/findscu/movescu/getscu/storescu accept it, so will
the hospital-side software the gateway meets. All traffic is on loopback; DCMTK runs with
TCP_NODELAY=1 like every peer in the test harness (docs/dicom.md §10)."""

from __future__ import annotations

import os
import socket
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset
from pynetdicom import _config

from duo_gateway.sim.behaviour import Misbehaviour
from duo_gateway.sim.config import SimHospital, SimPatient, default_network
from duo_gateway.sim.pacs import SimPacs, _answer, _matching_groups
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from tests.support.dcmtk import require_tool

NET = default_network()
HOSPITAL = NET.hospitals[0]
AET = HOSPITAL.ae_title
ANNA, BRAM, CARLA = NET.patients
HOST = "127.0.0.1"
DCMTK_ENV = {**os.environ, "TCP_NODELAY": "1"}


def _tool(name: str) -> str:
    return require_tool(name)


def _run(name: str, *args: str, timeout: float = 15) -> subprocess.CompletedProcess[str]:
    return subprocess.run([_tool(name), *args], capture_output=True, text=True, env=DCMTK_ENV,
                          timeout=timeout, check=False)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 5) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "storescp exited early"
        with socket.socket() as s:
            if s.connect_ex((HOST, port)) == 0:
                return
        time.sleep(0.02)
    raise AssertionError(f"nothing listening on {port}")


@dataclass
class Setup:
    pacs: SimPacs
    anna: list[GeneratedStudy]
    bram: list[GeneratedStudy]
    tmp: Path

    def find(self, *keys: str, root: str = "-S", called: str = AET) -> list[Dataset]:
        """findscu with responses extracted to files, read back with pydicom."""
        out = self.tmp / f"find{time.monotonic_ns()}"
        out.mkdir()
        args = [root, "-aec", called, "-X", "-od", str(out)]
        for key in keys:
            args += ["-k", key]
        result = _run("findscu", *args, HOST, str(self.pacs.port))
        assert result.returncode == 0, result.stderr
        return [dcmread(p) for p in sorted(out.glob("rsp*.dcm"))]


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Setup]:
    tmp = tmp_path_factory.mktemp("pacs")
    pacs = SimPacs(HOSPITAL, tmp / "storage")
    anna = generate_studies(ANNA, HOSPITAL, 3, NET.seed)
    bram = generate_studies(BRAM, HOSPITAL, 2, NET.seed)
    pacs.preload(anna + bram)
    pacs.start()
    yield Setup(pacs, anna, bram, tmp)
    pacs.stop()


@pytest.fixture
def small_pacs(tmp_path: Path) -> Iterator[SimPacs]:
    """A PACS of its own for tests that switch misbehaviour, so nothing leaks into other tests."""
    hospital = SimHospital(ura="00010009", name="Testziekenhuis", ae_title="TEST_PACS",
                           repository_unique_id="2.16.528.1.1007.99.10009.1")
    pacs = SimPacs(hospital, tmp_path / "storage")
    pacs.preload(generate_studies(ANNA, hospital, 1, seed=5, image_size=16))
    pacs.start()
    yield pacs
    pacs.stop()


def test_echoscu_succeeds_and_called_ae_title_is_checked(setup: Setup) -> None:
    ok = _run("echoscu", "-aet", "ANY_CALLER", "-aec", AET, HOST, str(setup.pacs.port))
    assert ok.returncode == 0, ok.stderr
    wrong = _run("echoscu", "-aec", "NOT_THIS_PACS", HOST, str(setup.pacs.port))
    assert wrong.returncode != 0
    assert "Called AE Title Not Recognized" in wrong.stderr + wrong.stdout


def test_find_studies_of_a_patient(setup: Setup) -> None:
    answers = setup.find("QueryRetrieveLevel=STUDY", f"PatientID={ANNA.bsn}", "StudyInstanceUID",
                         "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
                         "AccessionNumber")
    expected = {s.study_instance_uid: s for s in setup.anna}
    assert {a.StudyInstanceUID for a in answers} == set(expected)
    for answer in answers:
        study = expected[answer.StudyInstanceUID]
        assert answer.QueryRetrieveLevel == "STUDY"
        assert answer.PatientID == ANNA.bsn
        assert answer.AccessionNumber == study.accession_number
        assert int(answer.NumberOfStudyRelatedInstances) == len(study.instances)
        assert int(answer.NumberOfStudyRelatedSeries) == len({i.SeriesInstanceUID for i in study.instances})
        modalities = answer["ModalitiesInStudy"]
        listed = modalities.value if modalities.VM > 1 else [modalities.value]
        assert sorted(listed) == sorted(study.modalities)
        # only the requested keys (plus the character set the values are in)
        assert {e.keyword for e in answer} == {
            "SpecificCharacterSet", "QueryRetrieveLevel", "PatientID", "StudyInstanceUID",
            "ModalitiesInStudy", "NumberOfStudyRelatedInstances", "NumberOfStudyRelatedSeries",
            "AccessionNumber",
        }


def test_find_matching_rules(setup: Setup) -> None:
    everyone = setup.anna + setup.bram
    by_date = sorted(everyone, key=lambda s: s.study_date)
    middle = by_date[len(by_date) // 2]

    def uids(*keys: str) -> set[str]:
        return {a.StudyInstanceUID for a in setup.find("QueryRetrieveLevel=STUDY", "StudyInstanceUID", *keys)}

    assert uids() == {s.study_instance_uid for s in everyone}
    assert uids(f"StudyDate={middle.study_date}-") == {
        s.study_instance_uid for s in everyone if s.study_date >= middle.study_date}
    assert uids(f"StudyDate=-{middle.study_date}") == {
        s.study_instance_uid for s in everyone if s.study_date <= middle.study_date}
    assert uids(f"StudyDate={middle.study_date}") == {
        s.study_instance_uid for s in everyone if s.study_date == middle.study_date}
    assert uids(f"AccessionNumber={middle.accession_number}") == {middle.study_instance_uid}
    assert uids("PatientName=jans*") == {s.study_instance_uid for s in setup.anna}
    assert uids(f"PatientID={BRAM.bsn[:-1]}?") == {s.study_instance_uid for s in setup.bram}
    assert uids("PatientID=000000000") == set()
    modality = middle.modalities[0]
    assert uids(f"ModalitiesInStudy={modality}") == {
        s.study_instance_uid for s in everyone if modality in s.modalities}
    assert uids("ModalitiesInStudy=SR") == {s.study_instance_uid for s in everyone if s.has_report}
    two = [s.study_instance_uid for s in everyone[:2]]
    assert uids("StudyInstanceUID=" + "\\".join(two)) == set(two)


def test_find_series_image_and_patient_levels(setup: Setup) -> None:
    study = setup.anna[0]
    series = setup.find("QueryRetrieveLevel=SERIES", f"StudyInstanceUID={study.study_instance_uid}",
                        "SeriesInstanceUID", "Modality", "NumberOfSeriesRelatedInstances")
    assert {s.SeriesInstanceUID for s in series} == set(study.series_instance_uids)
    for answer in series:
        members = [i for i in study.instances if i.SeriesInstanceUID == answer.SeriesInstanceUID]
        assert int(answer.NumberOfSeriesRelatedInstances) == len(members)
        assert answer.Modality == members[0].Modality
    one_series = study.instances[0].SeriesInstanceUID
    images = setup.find("QueryRetrieveLevel=IMAGE", f"StudyInstanceUID={study.study_instance_uid}",
                        f"SeriesInstanceUID={one_series}", "SOPInstanceUID", "InstanceNumber")
    assert {i.SOPInstanceUID for i in images} == {
        i.SOPInstanceUID for i in study.instances if i.SeriesInstanceUID == one_series}
    sop = study.instances[-1].SOPInstanceUID
    only = setup.find("QueryRetrieveLevel=IMAGE", f"SOPInstanceUID={sop}")
    assert [i.SOPInstanceUID for i in only] == [sop]

    patients = setup.find("QueryRetrieveLevel=PATIENT", "PatientID", "PatientBirthDate",
                          "NumberOfPatientRelatedStudies", root="-P")
    by_id = {p.PatientID: p for p in patients}
    assert set(by_id) == {ANNA.bsn, BRAM.bsn}
    assert int(by_id[ANNA.bsn].NumberOfPatientRelatedStudies) == len(setup.anna)
    assert by_id[BRAM.bsn].PatientBirthDate == BRAM.birth_date
    # PATIENT level exists only in the Patient Root model
    assert setup.find("QueryRetrieveLevel=PATIENT", "PatientID", root="-S") == []


def test_movescu_delivers_every_instance_to_storescp(setup: Setup, tmp_path: Path) -> None:
    port = _free_port()
    received = tmp_path / "received"
    received.mkdir()
    proc = subprocess.Popen([_tool("storescp"), "-aet", "STORESCP", "-od", str(received), "+uf", str(port)],
                            env=DCMTK_ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        setup.pacs.add_move_destination("STORESCP", HOST, port)
        study = setup.anna[2]
        result = _run("movescu", "-S", "-aec", AET, "-aem", "STORESCP", "-k", "QueryRetrieveLevel=STUDY",
                      "-k", f"StudyInstanceUID={study.study_instance_uid}", HOST, str(setup.pacs.port))
        assert result.returncode == 0, result.stderr
        files = list(received.iterdir())
        assert len(files) == len(study.instances)
        assert {dcmread(f).SOPInstanceUID for f in files} == {i.SOPInstanceUID for i in study.instances}

        unknown = _run("movescu", "-S", "-aec", AET, "-aem", "NOBODY", "-k", "QueryRetrieveLevel=STUDY",
                       "-k", f"StudyInstanceUID={study.study_instance_uid}", HOST, str(setup.pacs.port))
        # DCMTK names status 0xA801 "Refused: MoveDestinationUnknown"
        assert unknown.returncode != 0
        assert "MoveDestinationUnknown" in unknown.stdout + unknown.stderr
        assert len(list(received.iterdir())) == len(study.instances)
    finally:
        proc.terminate()
        proc.wait(5)


def test_getscu_retrieves_a_study(setup: Setup, tmp_path: Path) -> None:
    study = setup.bram[0]
    result = _run("getscu", "-S", "-aec", AET, "-od", str(tmp_path), "-k", "QueryRetrieveLevel=STUDY",
                  "-k", f"StudyInstanceUID={study.study_instance_uid}", HOST, str(setup.pacs.port))
    assert result.returncode == 0, result.stderr
    got = {dcmread(f).SOPInstanceUID: dcmread(f) for f in tmp_path.iterdir()}
    assert set(got) == {i.SOPInstanceUID for i in study.instances}
    original = study.instances[0]
    assert got[original.SOPInstanceUID].PixelData == original.PixelData


@pytest.mark.parametrize("chunked", [False, True], ids=["encoded", "chunked"])
def test_storescu_then_find_and_survives_restart(
    setup: Setup, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, chunked: bool
) -> None:
    monkeypatch.setattr(_config, "STORE_RECV_CHUNKED_DATASET", chunked)
    newcomer = SimPatient(bsn="123456782", name="Bakker^Carla", birth_date="19851224", sex="F",
                          consent="all")
    study = generate_studies(newcomer, HOSPITAL, 1, seed=1000 + int(chunked), image_size=16)[0]
    files = write_study(study, tmp_path / "outgoing")
    before = setup.pacs.instance_count()
    result = _run("storescu", "-aec", AET, HOST, str(setup.pacs.port), *map(str, files))
    assert result.returncode == 0, result.stderr
    assert setup.pacs.instance_count() == before + len(files)

    answers = setup.find("QueryRetrieveLevel=STUDY", f"StudyInstanceUID={study.study_instance_uid}",
                         "NumberOfStudyRelatedInstances", "PatientID")
    assert len(answers) == 1
    assert int(answers[0].NumberOfStudyRelatedInstances) == len(files)
    stored = setup.pacs.instance_paths(study.study_instance_uid)
    assert dcmread(stored[0]).PatientID == newcomer.bsn

    # a fresh PACS over the same folder finds what was stored over the network
    again = SimPacs(HOSPITAL, setup.pacs.storage)
    again.start()
    try:
        assert again.instance_count() == setup.pacs.instance_count()
    finally:
        again.stop()


def test_down_refuses_connections_and_comes_back_on_the_same_port(small_pacs: SimPacs) -> None:
    port = small_pacs.port
    assert _run("echoscu", "-aec", "TEST_PACS", HOST, str(port)).returncode == 0
    small_pacs.set_behaviour(Misbehaviour(down=True))
    assert not small_pacs.listening
    down = _run("echoscu", "-aec", "TEST_PACS", HOST, str(port))
    assert down.returncode != 0
    small_pacs.set_behaviour(Misbehaviour())
    assert small_pacs.port == port
    assert _run("echoscu", "-aec", "TEST_PACS", HOST, str(port)).returncode == 0


def test_delay_slows_find_but_not_echo(small_pacs: SimPacs) -> None:
    args = ["-S", "-aec", "TEST_PACS", "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID",
            HOST, str(small_pacs.port)]
    start = time.monotonic()
    assert _run("findscu", *args).returncode == 0
    fast = time.monotonic() - start
    small_pacs.set_behaviour(Misbehaviour(delay_ms=700))
    start = time.monotonic()
    slow_find = _run("findscu", *args)
    slow = time.monotonic() - start
    assert slow_find.returncode == 0
    assert slow >= 0.7 > fast
    start = time.monotonic()
    assert _run("echoscu", "-aec", "TEST_PACS", HOST, str(small_pacs.port)).returncode == 0
    assert time.monotonic() - start < 0.7


def test_malformed_find_answers_lack_required_keys(small_pacs: SimPacs, tmp_path: Path) -> None:
    small_pacs.set_behaviour(Misbehaviour(malformed=True))
    result = _run("findscu", "-S", "-aec", "TEST_PACS", "-X", "-od", str(tmp_path),
                  "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID", "-k", "StudyDate",
                  HOST, str(small_pacs.port))
    assert result.returncode == 0, result.stderr
    answers = [dcmread(p) for p in tmp_path.glob("rsp*.dcm")]
    assert len(answers) == 1
    assert "StudyInstanceUID" not in answers[0]
    assert "QueryRetrieveLevel" not in answers[0]
    assert "StudyDate" in answers[0]


def test_an_answer_is_a_copy_and_editing_it_leaves_the_index_alone(tmp_path: Path) -> None:
    """Answers share the index's immutable values (cheap) but never its elements or sequences."""
    pacs = SimPacs(HOSPITAL, tmp_path / "pacs")
    pacs.preload(generate_studies(ANNA, HOSPITAL, 1, NET.seed, image_size=8))
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientName = ""
    query.OtherPatientIDsSequence = []
    query.ModalitiesInStudy = ""

    def answer() -> Dataset:
        [group] = _matching_groups(pacs._entries(), query, "STUDY")
        return _answer(query, "STUDY", group, AET)

    first = answer()
    before = answer()
    first.PatientName = "Edited^Name"
    first.OtherPatientIDsSequence[0].PatientID = "000000000"
    first.ModalitiesInStudy = ["XX"]
    assert answer() == before
    assert str(before.PatientName) == ANNA.name and before.OtherPatientIDsSequence[0].PatientID == ANNA.bsn


def test_start_parses_only_files_it_has_not_seen_unchanged(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    """Preloaded or stored files are indexed already; a restart re-reads new and changed ones only."""
    import duo_gateway.sim.pacs as pacs_module

    parsed: list[Path] = []
    real = pacs_module.dcmread

    def counting(path: Path, **kwargs: object) -> Dataset:
        parsed.append(Path(path))
        return real(path, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(pacs_module, "dcmread", counting)
    studies = generate_studies(ANNA, HOSPITAL, 2, NET.seed, image_size=8)
    pacs = SimPacs(HOSPITAL, tmp_path / "pacs")
    pacs.preload(studies[:1])
    with pacs:
        assert parsed == [] and pacs.instance_count() == len(studies[0].instances)
    # another study written behind its back, and one indexed file rewritten with another description
    added = write_study(studies[1], tmp_path / "pacs" / studies[1].study_instance_uid)
    changed = pacs.instance_paths(studies[0].study_instance_uid)[0]
    ds = real(changed)
    ds.StudyDescription = "Herschreven"
    ds.save_as(changed)
    with pacs:
        assert sorted(parsed) == sorted([*added, changed])
        assert pacs.instance_count() == len(studies[0].instances) + len(studies[1].instances)
        descriptions = {str(e.header.StudyDescription) for e in pacs._entries() if e.path == changed}
        assert descriptions == {"Herschreven"}
