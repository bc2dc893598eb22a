"""TimelineService's decisions, driven directly against fakes of Mitz, the TLB PACSes and the XCA
communities: no HTTP, no DICOM, no simulators (test_timeline_e2e.py covers the wiring).

What is pinned down here: localization decides who is asked; each TLB hospital is only queried on a
Permit and reports no-consent/error/timeout otherwise; only the chosen institutions' studies leave;
the same study from several sources is one timeline row listing them all (TLB copy first); a source
that does not answer is cut at the deadline without holding the rest; and the disclosure is audited.
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import pytest

from duo_gateway.audit.messages import TLB_TIMELINE, EventOutcome, Peer
from duo_gateway.config.xca import DocumentCodes
from duo_gateway.consent import ConsentGate
from duo_gateway.mitz.client import Localization
from duo_gateway.mitz.xcpd import Location
from duo_gateway.sources.base import SourceUnavailable, StudyRecord
from duo_gateway.timeline.model import TimelineRequest
from duo_gateway.timeline.result import TimelineResult
from duo_gateway.timeline.service import TimelineService
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.xca.initiating.finder import CommunityResponse, CommunityStatus
from duo_gateway.xca.metadata import study_entry
from tests.support.fakes import (
    BSN,
    CLAIMS,
    HOME,
    ClosedScript,
    FakeCommunity,
    FakeMitz,
    FakeSource,
    RecordingAuditor,
    community,
    hospital,
    unit_config,
)
from tests.support.nosockets import no_sockets  # noqa: F401 - the fixture, used by name below

pytestmark = pytest.mark.usefixtures("no_sockets")

H1, H2 = str(hospital(1)["ura"]), str(hospital(2)["ura"])
C1, C2 = str(community(1)["home_community_id"]), str(community(2)["home_community_id"])
#: The institutions behind community 1 and 2.
U1, U1B, U2 = "00020011", "00020012", "00020021"
SHARED, ONLY_H1, ONLY_H2, ONLY_C1, ONLY_C2, OTHER_INST = (f"1.2.9.{n}" for n in range(1, 7))
PERIOD = (date(2020, 1, 1), date(2024, 12, 31))


def record(uid: str, day: str, modality: str = "CT") -> StudyRecord:
    return StudyRecord(uid, BSN, day, "120000", modalities=(modality,), description=f"study {uid}")


def answer(home: str, name: str, institution: str, *uids: str, status: CommunityStatus = "ok",
           detail: str = "") -> CommunityResponse:
    """A community's ITI-38 answer holding a KOS entry per study, authored by ``institution``."""
    entries = tuple(study_entry(record(uid, "20220601"), bsn=BSN, hospital_ura=institution,
                                hospital_name=f"Institution {institution}",
                                repository_unique_id=f"{home.removeprefix('urn:oid:')}.1", home=home,
                                codes=DocumentCodes()) for uid in uids)
    return CommunityResponse(home, name, status, entries, detail=detail)


def located(*holders: tuple[str, str]) -> Localization:
    return Localization(True, tuple(
        Location(home_community_id=home, source_id="2.16.528.1.1007.99.5",
                 patient_root="2.16.840.1.113883.2.4.6.3", patient_extension=BSN, holder_ura=ura)
        for home, ura in holders))


#: Mitz located consented data at both hospitals and at both communities' institutions.
EVERYWHERE = located((HOME, H1), (HOME, H2), (C1, U1), (C1, U1B), (C2, U2))


@dataclass
class Rig:
    service: TimelineService
    mitz: FakeMitz
    sources: dict[str, FakeSource]
    communities: dict[str, FakeCommunity]
    auditor: RecordingAuditor
    ids: StudyIds

    async def ask(self, *institutions: str) -> TimelineResult:
        return await self.service.timeline(TimelineRequest(BSN, *PERIOD, institutions=institutions,
                                                           requester=CLAIMS, client="tlb-viewer"))


def build(tmp_path: Path, *, closed: dict[str, ClosedScript] | None = None,
          localization: Localization | None = None, deadline_s: float = 0.3,
          c2: dict[str, Any] | None = None, categories: tuple[str, ...] | None = None) -> Rig:
    communities_config = [community(1, uras=[U1, U1B]), community(2, uras=[U2], **(c2 or {}))]
    config = unit_config(tmp_path, communities=communities_config, timeline={"deadline_s": deadline_s})
    if categories is not None:
        mitz_config = config.mitz.model_copy(update={"categories": list(categories)})
        config = config.model_copy(update={"mitz": mitz_config})
    mitz = FakeMitz(closed or {}, default="Permit", localization=localization or EVERYWHERE)
    sources = {H1: FakeSource(H1, studies=[record(SHARED, "20230301"), record(ONLY_H1, "20210101")]),
               H2: FakeSource(H2, studies=[record(ONLY_H2, "20240101")])}
    communities = {C1: FakeCommunity(answer(C1, "Community 1", U1, SHARED, ONLY_C1)),
                   C2: FakeCommunity(answer(C2, "Community 2", U2, ONLY_C2))}
    auditor = RecordingAuditor(tmp_path)
    ids = StudyIds(os.urandom(32))
    gate = ConsentGate(mitz, categories=config.mitz.categories)
    service = TimelineService(config, mitz=mitz, gate=gate, communities=communities,
                              sources=sources, auditor=auditor, identity=Peer(user_id="DUO"), study_ids=ids)
    return Rig(service, mitz, sources, communities, auditor, ids)


def statuses(result: TimelineResult) -> dict[str, str]:
    return {o.id: o.status for o in result.sources}


async def test_one_row_per_study_listing_every_source_tlb_copy_first(tmp_path: Path) -> None:
    rig = build(tmp_path)
    result = await rig.ask()

    assert statuses(result) == {f"tlb:{H1}": "ok", f"tlb:{H2}": "ok", f"xca:{C1}": "ok", f"xca:{C2}": "ok"}
    uids = [s.study_uid for s in result.studies]
    assert sorted(uids) == sorted({SHARED, ONLY_H1, ONLY_H2, ONLY_C1, ONLY_C2})
    assert len(uids) == len(set(uids)), "a study held by several sources is one row"
    [shared] = [s for s in result.studies if s.study_uid == SHARED]
    assert shared.sources == (f"tlb:{H1}", f"xca:{C1}")
    assert shared.institution_ura == H1
    sealed = rig.ids.open(shared.id)
    assert [r.kind for r in sealed.refs] == ["tlb", "xca"], "a transfer falls back from the TLB copy"
    assert sealed.bsn == BSN and sealed.ura == CLAIMS.ura
    starts = [s.started or "" for s in result.studies]
    assert starts == sorted(starts, reverse=True), "newest first"


async def test_the_period_is_what_every_source_is_asked_for(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.ask()

    for source in rig.sources.values():
        [find] = [c for c in source.calls if c.method == "find_studies"]
        assert (find.args["date_from"], find.args["date_to"]) == PERIOD
    for fake in rig.communities.values():
        [call] = fake.calls
        assert (call.args["date_from"], call.args["date_to"]) == PERIOD
        assert call.args["claims"] == CLAIMS


@pytest.mark.parametrize(("script", "status"), [("Deny", "no-consent"), ("NotApplicable", "no-consent"),
                                                ("Indeterminate", "no-consent"), ("error", "error"),
                                                ("hang", "timeout")])
async def test_a_hospital_without_permit_is_not_queried_and_says_why(
        tmp_path: Path, script: ClosedScript, status: str) -> None:
    rig = build(tmp_path, closed={H1: script})
    result = await rig.ask()

    assert rig.sources[H1].calls == []
    assert statuses(result)[f"tlb:{H1}"] == status
    assert all(f"tlb:{H1}" not in s.sources for s in result.studies)
    assert ONLY_H1 not in {s.study_uid for s in result.studies}
    assert statuses(result)[f"tlb:{H2}"] == "ok"
    [audit] = rig.auditor.records
    # No consent is an answer, not a failure; Mitz unreachable is.
    expected = EventOutcome.SUCCESS if status == "no-consent" else EventOutcome.MINOR_FAILURE
    assert audit.event.outcome == expected


async def test_consent_is_asked_about_each_hospital_for_this_requester(tmp_path: Path) -> None:
    rig = build(tmp_path)
    await rig.ask()

    asked = sorted((q.holder_ura, q.bsn, q.requester_ura, q.requester_uzi) for q in rig.mitz.closed_asked)
    assert asked == [(H1, BSN, CLAIMS.ura, CLAIMS.uzi), (H2, BSN, CLAIMS.ura, CLAIMS.uzi)]


async def test_consent_is_asked_for_the_configured_data_categories(tmp_path: Path) -> None:
    """The timeline once asked GGC002 whatever ``mitz.categories`` said; the XCA door asked the list."""
    rig = build(tmp_path, categories=("GGC002", "GGC013"))
    await rig.ask()

    assert {q.categories for q in rig.mitz.closed_asked} == {("GGC002", "GGC013")}


async def test_a_pacs_that_fails_or_times_out_is_reported_as_such(tmp_path: Path) -> None:
    rig = build(tmp_path)
    rig.sources[H1].fail = SourceUnavailable(rig.sources[H1].name, "no C-FIND answer", kind="timeout")
    rig.sources[H2].fail = SourceUnavailable(rig.sources[H2].name, "association rejected")
    result = await rig.ask()

    assert statuses(result)[f"tlb:{H1}"] == "timeout"
    assert statuses(result)[f"tlb:{H2}"] == "unavailable"
    [shared] = [s for s in result.studies if s.study_uid == SHARED]
    assert shared.sources == (f"xca:{C1}",)


async def test_a_slow_source_is_cut_at_the_deadline_and_does_not_hold_the_answer(tmp_path: Path) -> None:
    rig = build(tmp_path, deadline_s=0.3)
    rig.communities[C2].hang = True
    rig.sources[H2].hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await rig.ask()

    assert loop.time() - started < 0.8
    assert statuses(result)[f"xca:{C2}"] == "timeout"
    assert statuses(result)[f"tlb:{H2}"] == "timeout"
    assert rig.communities[C2].cancelled == 1 and rig.sources[H2].cancelled == 1, "nobody works for nobody"
    assert {SHARED, ONLY_H1, ONLY_C1} == {s.study_uid for s in result.studies}
    [audit] = rig.auditor.records
    assert audit.event.outcome == EventOutcome.MINOR_FAILURE


async def test_only_the_chosen_institutions_are_asked_and_shown(tmp_path: Path) -> None:
    rig = build(tmp_path)
    rig.communities[C1].response = answer(C1, "Community 1", U1B, OTHER_INST)  # another institution there
    result = await rig.ask(H2, U1)

    assert rig.sources[H1].calls == []
    assert rig.mitz.asked_about(H1) == []
    assert statuses(result)[f"tlb:{H1}"] == "not-localized"
    assert rig.communities[C2].calls == [], "community 2 serves none of the chosen institutions"
    assert statuses(result)[f"xca:{C2}"] == "not-localized"
    assert {s.study_uid for s in result.studies} == {ONLY_H2}, "community 1's other institution stays out"


async def test_communities_mitz_did_not_locate_are_not_asked(tmp_path: Path) -> None:
    rig = build(tmp_path, localization=located((HOME, H1), (HOME, H2), (C1, U1)))
    result = await rig.ask()

    assert rig.communities[C2].calls == []
    assert statuses(result)[f"xca:{C2}"] == "not-localized"
    assert ONLY_C2 not in {s.study_uid for s in result.studies}


async def test_studies_of_institutions_mitz_did_not_locate_are_dropped(tmp_path: Path) -> None:
    rig = build(tmp_path, localization=located((HOME, H1), (HOME, H2), (C1, U1B), (C2, U2)))
    result = await rig.ask()

    # Community 1 answered with U1's studies although Mitz named only U1B there.
    assert len(rig.communities[C1].calls) == 1
    assert ONLY_C1 not in {s.study_uid for s in result.studies}
    [shared] = [s for s in result.studies if s.study_uid == SHARED]
    assert shared.sources == (f"tlb:{H1}",)


async def test_without_localization_no_community_is_asked_but_hospitals_still_ask_consent(
        tmp_path: Path) -> None:
    rig = build(tmp_path, localization=Localization(False, (), "Mitz unreachable"),
                c2={"query_without_localization": True})
    result = await rig.ask()

    assert rig.communities[C1].calls == []
    assert statuses(result)[f"xca:{C1}"] == "not-localized"
    # A community configured to be asked anyway is, and the detail says so.
    assert len(rig.communities[C2].calls) == 1
    [c2] = [o for o in result.sources if o.id == f"xca:{C2}"]
    assert "without Mitz localization" in c2.detail
    assert sorted(q.holder_ura for q in rig.mitz.closed_asked) == [H1, H2]


async def test_the_disclosure_is_audited_with_requester_studies_and_sources(tmp_path: Path) -> None:
    rig = build(tmp_path, closed={H2: "Deny"})
    result = await rig.ask()

    [audit] = rig.auditor.records
    assert TLB_TIMELINE in audit.event.type_codes
    assert audit.event.outcome == EventOutcome.SUCCESS
    assert any(p.user_is_requestor and p.user_id.startswith(CLAIMS.uzi) for p in audit.participants)
    disclosed = {o.object_id for o in audit.objects}
    assert {s.study_uid for s in result.studies} <= disclosed
    [sources] = [o for o in audit.objects if o.object_id == "timeline-sources"]
    assert f"tlb:{H2}=no-consent".encode() in sources.details[0].value
