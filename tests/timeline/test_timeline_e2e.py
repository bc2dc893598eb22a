"""The national timeline end to end: a TLB client POSTs /tlb/v1/timeline and DUO asks the network.

Everything runs for real on loopback (see :mod:`tests.timeline.harness`): the Mitz simulator, two
SimPacs hospitals and an Orthanc one, two XCA community simulators, a PartialSuccess community and a
community outside Mitz. The expected timeline is computed from the simulators' deterministic studies
and Mitz's consent profiles, never from DUO's answer, so a wrong merge, a leaked study or a lost report
fails here. Misbehaviour is switched on the running peers and always switched back.

One network serves the whole module (startup is the expensive part); tests that misbehave restore
the peer in ``finally`` (``TimelineNetwork.misbehaving``), so their order does not matter.
"""

from __future__ import annotations

import asyncio
import base64
import time
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import structlog
from lxml import etree
from pydicom.uid import BasicTextSRStorage

from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.daemon import Gateway
from duo_gateway.sim.behaviour import Misbehaviour, MitzMisbehaviour
from duo_gateway.sim.config import SimHospital, SimPatient
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from duo_gateway.sim.xca import community_seed
from duo_gateway.soap.xml import format_datetime, parse_xml
from duo_gateway.timeline.model import StudyRef
from tests.support.orthanc import load_with_storescu, run_orthanc
from tests.timeline.harness import (
    ALL,
    BUITEN,
    H1,
    H2,
    H3,
    NET,
    NONE,
    NOORD,
    PARTIAL,
    PARTIAL_ERROR,
    PARTIEEL,
    ZUID,
    ZUID_TIMEOUT_S,
    TimelineNetwork,
    duplicate_at_partieel,
    duplicate_in_orthanc,
    hospital_studies,
    partieel_studies,
    running,
    source_id,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOSPITALS = (H1, H2, H3)
#: Communities whose data holders Mitz places; BUITEN is asked on configuration alone.
LOCALIZED = (NOORD, ZUID, PARTIEEL)
COMMUNITIES = (*LOCALIZED, BUITEN)
MARKED_UNLOCALIZED = "asked without Mitz localization"


# -------------------------------------------------------------------------------------------------
# fixtures
# -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, int]]:
    """Orthanc holding H3's studies plus a copy of one H1 study, loaded with DCMTK's storescu."""
    tmp = tmp_path_factory.mktemp("orthanc")
    studies = [*hospital_studies(H3), duplicate_in_orthanc()]
    files = [str(p) for s in studies for p in write_study(s, tmp / "send" / s.study_instance_uid)]
    with run_orthanc(tmp / "db", ae_title=H3.ae_title) as server:
        load_with_storescu(server, files)
        yield server.ae_title, server.dicom_port


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(orthanc: tuple[str, int],
                  tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[TimelineNetwork]:
    async with running(tmp_path_factory.mktemp("timeline"), orthanc) as net:
        yield net


# -------------------------------------------------------------------------------------------------
# what the network holds, independent of DUO
# -------------------------------------------------------------------------------------------------


def _generated(patient: SimPatient) -> dict[str, GeneratedStudy]:
    """Every study of ``patient`` anywhere in the network, by study instance UID."""
    studies: list[GeneratedStudy] = []
    for hospital in HOSPITALS:
        studies += generate_studies(patient, hospital, hospital.studies_per_patient, NET.seed, NET.image_size)
    for community in (NOORD, ZUID, BUITEN):
        for inst in community.institutions:
            studies += generate_studies(patient, inst, community.studies_per_patient,
                                        community_seed(NET, community), NET.image_size)
    studies += partieel_studies(patient.bsn)
    return {s.study_instance_uid: s for s in studies}


def _expected_uids(patient: SimPatient, uras: set[str] | None = None) -> set[str]:
    """Study UIDs a correct timeline shows: consented holders, plus the unlocalized community's own.

    ``uras`` narrows to the chosen institutions (an institution filter); it then also decides which
    copy of a duplicated study survives.
    """
    holders = NET.consent_holders(patient) | {BUITEN.institutions[0].ura}
    wanted = holders if uras is None else holders & uras
    uids: set[str] = set()

    def add(ura: str, studies: list[GeneratedStudy]) -> None:
        if ura in wanted:
            uids.update(s.study_instance_uid for s in studies)

    for hospital in HOSPITALS:
        add(hospital.ura, generate_studies(patient, hospital, hospital.studies_per_patient, NET.seed,
                                           NET.image_size))
    if patient.bsn == ALL.bsn:
        add(H3.ura, [duplicate_in_orthanc()])
    for community in (NOORD, ZUID, BUITEN):
        for inst in community.institutions:
            add(inst.ura, generate_studies(patient, inst, community.studies_per_patient,
                                           community_seed(NET, community), NET.image_size))
    add(PARTIEEL.institutions[0].ura, partieel_studies(patient.bsn))
    return uids


def _tlb_id(hospital: SimHospital) -> str:
    return f"tlb:{hospital.ura}"


def _sources(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["id"]: s for s in answer["sources"]}


def _by_uid(answer: dict[str, Any]) -> dict[str, dict[str, Any]]:
    uids = [s["study_instance_uid"] for s in answer["studies"]]
    assert len(uids) == len(set(uids)), "a study appears more than once"
    return {s["study_instance_uid"]: s for s in answer["studies"]}


def _counts(network: TimelineNetwork) -> dict[str, int]:
    return {c.home_community_id: network.requests[c.home_community_id] for c in COMMUNITIES}


def _asked(before: dict[str, int], network: TimelineNetwork) -> dict[str, int]:
    """ITI-38 requests each community received since ``before``, by community name."""
    after = _counts(network)
    return {c.name: after[c.home_community_id] - before[c.home_community_id] for c in COMMUNITIES}


# -------------------------------------------------------------------------------------------------
# consent profiles, merge, reports, order
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("patient", [ALL, PARTIAL, NONE], ids=lambda p: p.consent)
async def test_consent_profile_decides_what_the_timeline_shows(network: TimelineNetwork,
                                                              patient: SimPatient) -> None:
    """Exactly the studies of consented holders (plus the unlocalized community's), each source's
    status following Mitz: asked where Mitz located data, ``not-localized`` elsewhere."""
    before = _counts(network)
    status, answer, _ = await network.timeline(patient.bsn)
    assert status == 200, answer
    holders = NET.consent_holders(patient)
    sources = _sources(answer)

    expected_status = {_tlb_id(h): "ok" if h.ura in holders else "not-localized" for h in HOSPITALS}
    expected_status |= {source_id(c): "ok" if any(i.ura in holders for i in c.institutions)
                        else "not-localized" for c in LOCALIZED}
    expected_status[source_id(BUITEN)] = "ok"
    assert {k: v["status"] for k, v in sources.items()} == expected_status
    for sid, wanted in expected_status.items():
        if wanted == "not-localized":
            assert sources[sid]["detail"] == "Mitz located no consented data here"
    assert MARKED_UNLOCALIZED in sources[source_id(BUITEN)]["detail"]

    # Communities Mitz did not place anything at were not asked at all; the fallback one always was.
    asked = _asked(before, network)
    assert asked == {c.name: int(c is BUITEN or any(i.ura in holders for i in c.institutions))
                     for c in COMMUNITIES}

    studies = _by_uid(answer)
    assert set(studies) == _expected_uids(patient)
    # XDS Noord's simulator answers for both its institutions whatever the consent (it checks none):
    # for the partial patient only UMC Noord was located, so Martini Noord's study must not get through.
    institutions = {s["institution"]["ura"] for s in answer["studies"]}
    assert institutions == holders | {BUITEN.institutions[0].ura}


async def test_orthanc_hospital_reports_newest_first(network: TimelineNetwork) -> None:
    """The Orthanc hospital is on the timeline like the others; every study carries exactly its own
    reports; the order is newest first; fields come from the source that holds the study."""
    status, answer, _ = await network.timeline(ALL.bsn)
    assert status == 200, answer
    generated = _generated(ALL)
    studies = _by_uid(answer)

    orthanc_uids = {s.study_instance_uid for s in hospital_studies(H3) if s.patient_id == ALL.bsn}
    assert orthanc_uids and orthanc_uids <= set(studies)
    for uid in orthanc_uids:
        assert studies[uid]["sources"] == [_tlb_id(H3)]
        assert studies[uid]["institution"] == {"ura": H3.ura, "name": H3.name}
    assert _sources(answer)[_tlb_id(H3)]["status"] == "ok"

    started = [s["started"] for s in answer["studies"]]
    assert all(isinstance(t, str) for t in started)
    assert started == sorted(started, reverse=True)

    reported_by: set[str] = set()
    for uid, study in studies.items():
        source = generated[uid]
        primary = study["sources"][0]
        assert study["started"].replace("-", "").replace("T", "").replace(":", "") == \
            source.study_date + source.study_time[:6]
        # A PACS's C-FIND carries the accession number; the XCA metadata DUO and the sims write does not.
        assert study["accession_number"] == (source.accession_number if primary.startswith("tlb:") else None)
        reports = study["reports"]
        assert bool(reports) == source.has_report, (uid, study["sources"])
        if not reports:
            continue
        reported_by.add(primary)
        if primary.startswith("tlb:"):
            sr = {str(ds.SOPInstanceUID) for ds in source.instances if ds.SOPClassUID == BasicTextSRStorage}
            assert {r["id"] for r in reports} == sr
        else:
            refs = [StudyRef.decode(r["id"]) for r in reports]
            assert {r.study_uid for r in refs} == {uid} and all(r.document_unique_id for r in refs)
        assert all(r["title"] for r in reports)
    # Reports came through every path: a SimPacs, Orthanc, a community simulator and XDS Partieel.
    assert {_tlb_id(H3), source_id(PARTIEEL)} <= reported_by
    assert reported_by & {_tlb_id(H1), _tlb_id(H2)} and reported_by & {source_id(NOORD), source_id(ZUID)}


async def test_same_study_at_two_sources_appears_once_with_both(network: TimelineNetwork) -> None:
    """De-duplication by study UID across two PACSes (SimPacs and Orthanc) and across TLB and XCA;
    the TLB copy is primary, so the study's id fetches it from the hospital DUO speaks DICOM to."""
    status, answer, _ = await network.timeline(ALL.bsn)
    assert status == 200, answer
    studies = _by_uid(answer)

    in_orthanc = studies[duplicate_in_orthanc().study_instance_uid]
    assert in_orthanc["sources"] == [_tlb_id(H1), _tlb_id(H3)]
    assert in_orthanc["institution"]["ura"] == H1.ura
    at_partieel = studies[duplicate_at_partieel().study_instance_uid]
    assert at_partieel["sources"] == [_tlb_id(H1), source_id(PARTIEEL)]
    for study in (in_orthanc, at_partieel):
        sealed = network.gateway.study_ids.open(study["id"])
        ref = sealed.ref
        assert sealed.bsn == ALL.bsn
        assert (ref.kind, ref.hospital_ura, ref.study_uid) == ("tlb", H1.ura, study["study_instance_uid"])
    # Both copies were really delivered: each source counts the duplicate among its studies.
    sources = _sources(answer)
    assert sources[_tlb_id(H3)]["detail"] == "3 studies"
    assert sources[source_id(PARTIEEL)]["detail"].endswith("; 2 studies")


async def test_partial_success_keeps_results_and_notes_the_error(network: TimelineNetwork) -> None:
    """A community that found some documents but not all: its studies are shown (status ok) and the
    RegistryError it reported is in the source's detail, so the clinician knows the list is incomplete."""
    status, answer, _ = await network.timeline(ALL.bsn)
    assert status == 200, answer
    partieel = _sources(answer)[source_id(PARTIEEL)]
    assert partieel["status"] == "ok"
    assert "PartialSuccess" in partieel["detail"]
    assert PARTIAL_ERROR.error_code in partieel["detail"] and PARTIAL_ERROR.code_context in partieel["detail"]
    own = {s.study_instance_uid for s in partieel_studies(ALL.bsn)}
    shown = {s["study_instance_uid"] for s in answer["studies"] if source_id(PARTIEEL) in s["sources"]}
    assert shown == own


# -------------------------------------------------------------------------------------------------
# institution filter
# -------------------------------------------------------------------------------------------------


async def test_institution_filter_asks_only_sources_of_chosen_institutions(network: TimelineNetwork) -> None:
    """Only the chosen URAs' studies leave DUO, and sources that cannot hold them are not even asked."""
    umc_noord = NOORD.institutions[0].ura
    chosen = {H3.ura, umc_noord}
    before = _counts(network)
    status, answer, _ = await network.timeline(ALL.bsn, institutions=sorted(chosen))
    assert status == 200, answer

    assert _asked(before, network) == {NOORD.name: 1, ZUID.name: 0, PARTIEEL.name: 0, BUITEN.name: 0}
    sources = _sources(answer)
    assert {k: v["status"] for k, v in sources.items()} == {
        _tlb_id(H1): "not-localized", _tlb_id(H2): "not-localized", _tlb_id(H3): "ok",
        source_id(NOORD): "ok", source_id(ZUID): "not-localized", source_id(PARTIEEL): "not-localized",
        source_id(BUITEN): "not-localized"}
    assert sources[_tlb_id(H1)]["detail"] == "not among the chosen institutions"
    assert sources[source_id(ZUID)]["detail"] == "Mitz located data here, but none at the chosen institutions"
    assert sources[source_id(BUITEN)]["detail"] == (
        "none of the chosen institutions is served by this community")

    studies = _by_uid(answer)
    assert set(studies) == _expected_uids(ALL, chosen)
    assert {s["institution"]["ura"] for s in answer["studies"]} == chosen
    # XDS Noord answered for Martini Noord too; only UMC Noord's study is shown.
    assert all(s["institution"]["ura"] == umc_noord for s in answer["studies"]
               if s["sources"] == [source_id(NOORD)])
    # H1 was not asked, so the study both H1 and Orthanc hold comes from Orthanc alone.
    duplicate = studies[duplicate_in_orthanc().study_instance_uid]
    assert duplicate["sources"] == [_tlb_id(H3)] and duplicate["institution"]["ura"] == H3.ura


async def test_chosen_institution_mitz_did_not_locate_is_not_asked(network: TimelineNetwork) -> None:
    """The partial patient consented for UMC Noord only: choosing Martini Noord (same community) must
    not make DUO ask XDS Noord, and the timeline is empty rather than showing the other institution."""
    martini = NOORD.institutions[1].ura
    before = _counts(network)
    status, answer, _ = await network.timeline(PARTIAL.bsn, institutions=[martini])
    assert status == 200, answer
    assert answer["studies"] == []
    assert sum(_asked(before, network).values()) == 0
    assert {s["status"] for s in answer["sources"]} == {"not-localized"}


# -------------------------------------------------------------------------------------------------
# misbehaving sources
# -------------------------------------------------------------------------------------------------


async def test_misbehaving_sources_are_reported_and_the_rest_is_shown(network: TimelineNetwork) -> None:
    """Garbage is ``error``, a SOAP Fault is ``error``, a community that drops connections and a PACS
    that is down are ``unavailable``; the healthy sources' studies are still all there."""
    noord, zuid = network.communities[NOORD.home_community_id], network.communities[ZUID.home_community_id]
    partieel = network.communities[PARTIEEL.home_community_id]
    maas = network.pacs[H2.ura]
    before = _counts(network)
    with network.misbehaving(noord, Misbehaviour(malformed=True)), \
            network.misbehaving(zuid, Misbehaviour(fault=True)), \
            network.misbehaving(partieel, Misbehaviour(down=True)):
        await asyncio.to_thread(maas.set_behaviour, Misbehaviour(down=True))
        try:
            status, answer, _ = await network.timeline(ALL.bsn)
        finally:
            await asyncio.to_thread(maas.set_behaviour, Misbehaviour())
    assert status == 200, answer
    sources = _sources(answer)
    assert {k: v["status"] for k, v in sources.items()} == {
        _tlb_id(H1): "ok", _tlb_id(H2): "unavailable", _tlb_id(H3): "ok",
        source_id(NOORD): "error", source_id(ZUID): "error", source_id(PARTIEEL): "unavailable",
        source_id(BUITEN): "ok"}
    assert "malformed answer" in sources[source_id(NOORD)]["detail"]
    assert "SOAP fault" in sources[source_id(ZUID)]["detail"]
    # Transient failures are retried (once, as configured), answers that would come back the same not.
    assert _asked(before, network) == {NOORD.name: 1, ZUID.name: 1, PARTIEEL.name: 2, BUITEN.name: 1}

    healthy = {_tlb_id(H1), _tlb_id(H3), source_id(BUITEN)}
    for study in answer["studies"]:
        assert set(study["sources"]) <= healthy
    wanted = {u for h in (H1, H3) for u in _expected_uids(ALL, {h.ura})} | _expected_uids(
        ALL, {BUITEN.institutions[0].ura})
    assert set(_by_uid(answer)) == wanted


async def test_hanging_community_costs_only_its_own_timeout(network: TimelineNetwork) -> None:
    """XDS Zuid answers after 6 s; its own timeout is 1.5 s (no retries), the timeline's 8 s. The
    answer comes after Zuid's timeout, not after its delay and not at the timeline deadline."""
    zuid = network.communities[ZUID.home_community_id]
    with network.misbehaving(zuid, Misbehaviour(delay_ms=6000)):
        status, answer, elapsed = await network.timeline(ALL.bsn)
    assert status == 200, answer
    zuid_source = _sources(answer)[source_id(ZUID)]
    assert zuid_source["status"] == "timeout"
    assert zuid_source["detail"] == f"no answer within {ZUID_TIMEOUT_S:g} s"
    assert ZUID_TIMEOUT_S <= elapsed < ZUID_TIMEOUT_S + 1.5
    assert {s["status"] for k, s in _sources(answer).items() if k != source_id(ZUID)} == {"ok"}
    assert set(_by_uid(answer)) == _expected_uids(ALL) - _expected_uids(ALL, {ZUID.institutions[0].ura})


async def test_overall_deadline_bounds_the_answer(network: TimelineNetwork) -> None:
    """With ``timeline.deadline_s`` 3 s and XDS Noord hanging (its own timeout 5 s), the answer
    still arrives about at the deadline, with Noord ``timeout`` and everything else shown.

    3 s, not less: a TLB hospital's consent question plus C-FIND takes 1.2-1.6 s on this 2-core machine
    (measured, also before issue 11), so a 1.5 s budget made the test fail about one run in three."""
    deadline = 3.0
    gateway = Gateway(network.duo_config("duo-deadline", deadline_s=deadline))
    await gateway.start()
    noord = network.communities[NOORD.home_community_id]
    try:
        await network.timeline(ALL.bsn, gateway=gateway)  # warm up this gateway's first connections
        with network.misbehaving(noord, Misbehaviour(delay_ms=5000)):
            status, answer, elapsed = await network.timeline(ALL.bsn, gateway=gateway)
    finally:
        await gateway.stop()
    assert status == 200, answer
    assert elapsed < deadline + 1.0
    noord_source = _sources(answer)[source_id(NOORD)]
    assert noord_source["status"] == "timeout", noord_source
    assert {s["status"] for k, s in _sources(answer).items() if k != source_id(NOORD)} == {"ok"}, \
        _sources(answer)
    noord_uids = {u for i in NOORD.institutions for u in _expected_uids(ALL, {i.ura})}
    assert set(_by_uid(answer)) == _expected_uids(ALL) - noord_uids


# -------------------------------------------------------------------------------------------------
# Mitz
# -------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("outage", [MitzMisbehaviour(down=True), MitzMisbehaviour(fault=True)],
                         ids=["down", "fault"])
async def test_mitz_outage_asks_no_localized_community(network: TimelineNetwork,
                                                       outage: MitzMisbehaviour) -> None:
    """Without Mitz nobody can say where consented data is: no localized community is asked (counted
    at the communities themselves), each says why, and TLB hospitals are ``error`` because their
    closed question cannot be answered either. Only the community configured to be asked without
    localization is asked, and says so."""
    before = _counts(network)
    with network.misbehaving(network.mitz, outage):
        status, answer, _ = await network.timeline(ALL.bsn)
    assert status == 200, answer
    assert _asked(before, network) == {NOORD.name: 0, ZUID.name: 0, PARTIEEL.name: 0, BUITEN.name: 1}
    sources = _sources(answer)
    for community in LOCALIZED:
        source = sources[source_id(community)]
        assert source["status"] == "not-localized"
        assert source["detail"].startswith("Mitz localization failed, nothing asked:"), source
    for hospital in HOSPITALS:
        source = sources[_tlb_id(hospital)]
        assert source["status"] == "error"
        assert source["detail"].startswith("consent could not be established"), source
    assert sources[source_id(BUITEN)]["status"] == "ok"
    assert MARKED_UNLOCALIZED in sources[source_id(BUITEN)]["detail"]
    assert {s["institution"]["ura"] for s in answer["studies"]} == {BUITEN.institutions[0].ura}


async def test_closed_question_deny_is_no_consent(network: TimelineNetwork) -> None:
    """Mitz locates the data but denies the closed question: TLB hospitals are ``no-consent`` and none
    of their studies is shown, while the communities (which check consent themselves) still answer."""
    with network.misbehaving(network.mitz, MitzMisbehaviour(force_decision="Deny")):
        status, answer, _ = await network.timeline(ALL.bsn)
    assert status == 200, answer
    sources = _sources(answer)
    for hospital in HOSPITALS:
        assert sources[_tlb_id(hospital)]["status"] == "no-consent"
        assert "Deny" in sources[_tlb_id(hospital)]["detail"]
    assert {sources[source_id(c)]["status"] for c in COMMUNITIES} == {"ok"}
    assert not any(s["sources"][0].startswith("tlb:") for s in answer["studies"])
    hospital_uids = {u for h in HOSPITALS for u in _expected_uids(ALL, {h.ura})}
    assert set(_by_uid(answer)) == _expected_uids(ALL) - hospital_uids | {
        duplicate_at_partieel().study_instance_uid}


# -------------------------------------------------------------------------------------------------
# audit and logs
# -------------------------------------------------------------------------------------------------


def _audit_events(path: Path, since: datetime | None = None) -> list[etree._Element]:
    """Records in the audit file, those of events at or after ``since`` when given."""
    if not path.exists():
        return []
    events = [parse_xml(parse_message(r).msg) for r in parse_file_records(path.read_bytes()).records]
    if since is None:
        return events
    # EventDateTime is UTC with milliseconds and a Z: sortable as text (format_datetime).
    floor = format_datetime(since)
    return [e for e in events if _value(e, "EventIdentification/@EventDateTime") >= floor]


async def test_timeline_disclosure_and_outbound_queries_are_audited(network: TimelineNetwork) -> None:
    """Each timeline is an Export (110106, TLB-TIMELINE) naming the requester, the patient, every study
    disclosed and each source's status; each ITI-38 DUO sent is a Query (110112) naming the community."""
    audit_file = network.gateway.config.storage.path / "audit" / "audit.log"
    # Milliseconds are all a record's time has: it may read as up to 1 ms before this reading.
    started = datetime.now(UTC) - timedelta(milliseconds=1)
    status, answer, _ = await network.timeline(PARTIAL.bsn)
    assert status == 200, answer
    disclosed = set(_by_uid(answer))
    expected_sources = {f"{s['id']}={s['status']}" for s in answer["sources"]}

    def this_timeline() -> list[etree._Element]:
        # Other tests' timelines are in the file too: this one is the record with exactly its studies.
        return [e for e in _audit_events(audit_file) if _type(e) == "TLB-TIMELINE" and set(_values(
            e, "ParticipantObjectIdentification[ParticipantObjectIDTypeCode/@csd-code='110180']"
            "/@ParticipantObjectID")) == disclosed]

    deadline = time.monotonic() + 10
    while not this_timeline() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the auditor writes behind a queue; the file is all we can watch
    records = this_timeline()
    assert records, "no TLB-TIMELINE record naming exactly the disclosed studies"
    event = records[-1]
    assert _value(event, "EventIdentification/EventID/@csd-code") == "110106"
    patient = _value(event, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']"
                     "/@ParticipantObjectID")
    assert patient.startswith(f"{PARTIAL.bsn}^^^")
    # The professional (UZI) asked; their organisation (URA) is named beside them, not as requestor.
    people = {r.get("UserID"): r.get("UserIsRequestor") for r in event.iter("ActiveParticipant")}
    assert people["000095254^^^&2.16.528.1.1007.3.1&ISO"] == "true"
    assert people[f"{H1.ura}^^^&2.16.528.1.1007.3.3&ISO"] == "false"
    # The TLB system that carried the request, as its certificate (here: none, a plain test) matched.
    assert "tlb:test-tlb" in people
    detail = _value(event, "ParticipantObjectIdentification[@ParticipantObjectID='timeline-sources']"
                    "/ParticipantObjectDetail[@type='Sources']/@value")
    assert set(base64.b64decode(detail).decode().split(",")) == expected_sources

    urls = {f"{network.communities[c.home_community_id].url}/iti38" for c in COMMUNITIES}
    # Only this timeline's records: events from when it began (no other timeline runs meanwhile).
    queries = [e for e in _audit_events(audit_file, started) if _type(e) == "ITI-38"]
    assert {_value(e, "EventIdentification/EventID/@csd-code") for e in queries} == {"110112"}
    asked = {u for e in queries for u in _values(e, "ActiveParticipant/@UserID") if u in urls}
    assert asked == urls  # every community this timeline asked left a record
    assert all("000095254^^^&2.16.528.1.1007.3.1&ISO" in _values(e, "ActiveParticipant/@UserID")
               for e in queries)


def _values(event: etree._Element, path: str) -> list[str]:
    found = event.xpath(path)
    assert isinstance(found, list)
    return [str(v) for v in found]


def _value(event: etree._Element, path: str) -> str:
    return str(event.xpath(f"string({path})"))


def _type(event: etree._Element) -> str:
    return _value(event, "EventIdentification/EventTypeCode/@csd-code")


async def test_no_bsn_in_logs(network: TimelineNetwork) -> None:
    """Timelines that succeed, fail and partly fail log plenty (counts, statuses, URAs), never a BSN."""
    noord = network.communities[NOORD.home_community_id]
    with structlog.testing.capture_logs() as logs:
        for patient in (ALL, PARTIAL, NONE):
            await network.timeline(patient.bsn)
        with network.misbehaving(noord, Misbehaviour(fault=True)):
            await network.timeline(ALL.bsn)
        with network.misbehaving(network.mitz, MitzMisbehaviour(fault=True)):
            await network.timeline(PARTIAL.bsn)
    answered = [e for e in logs if e.get("event") == "timeline answered"]
    assert len(answered) == 5
    assert any(e.get("event") == "xca query" and e.get("status") == "error" for e in logs)
    text = repr(logs)
    for patient in NET.patients:
        assert patient.bsn not in text
        assert patient.name.split("^")[0] not in text



async def test_a_pacs_answering_garbage_is_error_and_a_slow_one_is_timeout(network: TimelineNetwork) -> None:
    """TLB hospitals are classified like communities: broken identifiers are ``error`` (SimPacs
    ``malformed`` answers C-FIND without the unique key), a PACS past its timeout is ``timeout``."""
    amstel, maas = network.pacs[H1.ura], network.pacs[H2.ura]
    await asyncio.to_thread(amstel.set_behaviour, Misbehaviour(malformed=True))
    await asyncio.to_thread(maas.set_behaviour, Misbehaviour(delay_ms=7000))  # hospital timeout_s is 5
    try:
        status, answer, _ = await network.timeline(ALL.bsn)
    finally:
        await asyncio.to_thread(amstel.set_behaviour, Misbehaviour())
        await asyncio.to_thread(maas.set_behaviour, Misbehaviour())
    assert status == 200, answer
    sources = _sources(answer)
    assert sources[_tlb_id(H1)]["status"] == "error", sources[_tlb_id(H1)]
    assert sources[_tlb_id(H2)]["status"] == "timeout", sources[_tlb_id(H2)]
    assert sources[_tlb_id(H3)]["status"] == "ok"
