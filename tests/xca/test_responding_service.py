"""RespondingGateway's decisions, driven directly against fakes of its ports (no HTTP, SOAP or DICOM).

The end-to-end tests (test_responding*.py) show the door works through sockets and simulators; these
pin down, one by one and in milliseconds, the rules in between: consent is asked per TLB hospital
with that hospital as data holder, anything but Permit keeps that hospital's PACS untouched, a
hospital that is down or late degrades the answer to PartialSuccess naming it, a study of another
patient is refused before consent is even asked, request limits refuse before any lookup, and every
answer is audited with the requester.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from duo_gateway.audit.messages import ITI_38, ITI_39, RAD_75, AuditMessage, Code, EventOutcome, Peer
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.loader import DuoConfig
from duo_gateway.consent import ConsentGate
from duo_gateway.saml import AuthzDecision
from duo_gateway.soap.envelope import SoapFault
from duo_gateway.sources.base import InstanceRecord, SourceUnavailable, StudyRecord
from duo_gateway.xca.codes import MIME_DICOM, ErrorCode, ResponseStatus
from duo_gateway.xca.docindex import DocumentIndex, IndexedDocument
from duo_gateway.xca.errors import RegistryErrorException
from duo_gateway.xca.metadata import kos_unique_id
from duo_gateway.xca.query import AdhocQueryRequest, find_documents
from duo_gateway.xca.responding.service import CallContext, ImagingRetrieval, RespondingGateway
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
)
from duo_gateway.xua import AUTHZ_DECISION_REFUSED, Requester
from tests.support.fakes import (
    BSN,
    CLAIMS,
    HOME,
    OTHER_BSN,
    ClosedScript,
    FakeMitz,
    FakeSource,
    RecordingAuditor,
    hospital,
    unit_config,
)
from tests.support.nosockets import no_sockets  # noqa: F401 - the fixture, used by name below

pytestmark = pytest.mark.usefixtures("no_sockets")

H1, H2 = str(hospital(1)["ura"]), str(hospital(2)["ura"])
REPO1, REPO2 = str(hospital(1)["repository_unique_id"]), str(hospital(2)["repository_unique_id"])
CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT_LE = "1.2.840.10008.1.2.1"

#: The patient's study at hospital 1 (2024), at hospital 2 (2023), and another patient's at hospital 1.
S1, S2, S3 = "1.2.3.1", "1.2.3.2", "1.2.3.3"
STUDIES = {
    H1: [StudyRecord(S1, BSN, "20240301", "101500", modalities=("CT",), description="CT thorax"),
         StudyRecord(S3, OTHER_BSN, "20240302", modalities=("CT",))],
    H2: [StudyRecord(S2, BSN, "20230115", "090000", modalities=("MR",), description="MR knie")],
}
INSTANCES = {uid: [InstanceRecord(uid, f"{uid}.1", CT, f"{uid}.1.{n}", "CT") for n in (1, 2)]
             for uid in (S1, S2, S3)}


def requester(patient_bsn: str | None = None) -> Requester:
    now = datetime.now(UTC)
    return Requester(uzi=CLAIMS.uzi, role=CLAIMS.role, ura=CLAIMS.ura, organisation_type="V6",
                     purpose="TREAT", issuer="urn:oid:2.16.528.1.1007.99.777", assertion_id="_assertion-1",
                     issue_instant=now,
                     not_on_or_after=now + timedelta(minutes=5), signer="CN=peer", patient_bsn=patient_bsn)


def context(patient_bsn: str | None = None) -> CallContext:
    return CallContext(requester(patient_bsn), Peer(user_id="https://peer.example/reply", host="192.0.2.9"))


@dataclass
class Rig:
    service: RespondingGateway
    mitz: FakeMitz
    sources: dict[str, FakeSource]
    auditor: RecordingAuditor
    index: DocumentIndex
    spool: Path
    config: DuoConfig

    def audits(self, transaction: Code) -> list[AuditMessage]:
        return [r for r in self.auditor.records if transaction in r.event.type_codes]


@dataclass
class Builder:
    tmp_path: Path
    opened: list[DocumentIndex] = field(default_factory=list)

    async def __call__(self, closed: dict[str, ClosedScript] | None = None, **xca: Any) -> Rig:
        config = unit_config(self.tmp_path, xca_responding={"hospital_deadline_s": 0.3, **xca})
        mitz = FakeMitz(closed or {}, default="Permit")
        pacs_spool = self.tmp_path / "pacs"
        pacs_spool.mkdir(exist_ok=True)
        sources = {ura: FakeSource(ura, studies=STUDIES[ura], instances=INSTANCES, spool=pacs_spool)
                   for ura in (H1, H2)}
        auditor = RecordingAuditor(self.tmp_path)
        index = await DocumentIndex.open(self.tmp_path)
        self.opened.append(index)
        spool = self.tmp_path / "spool"
        spool.mkdir(exist_ok=True)
        gate = ConsentGate(mitz, categories=config.mitz.categories)
        service = RespondingGateway(config, sources=sources, gate=gate, index=index,
                                    auditor=auditor, identity=Peer(user_id="DUO"), spool_dir=spool)
        return Rig(service, mitz, sources, auditor, index, spool, config)


@pytest.fixture
async def build(tmp_path: Path) -> AsyncIterator[Callable[..., Awaitable[Rig]]]:
    builder = Builder(tmp_path)
    yield builder
    for index in builder.opened:
        await index.close()


def query(bsn: str = BSN, **params: Any) -> AdhocQueryRequest:
    return find_documents(bsn_cx(bsn), **params)


def study_uids(entries: Any) -> set[str]:
    return {ref.split("^")[0] for e in entries for ref in e.reference_ids}


def imaging(*studies: tuple[str, str]) -> RetrieveImagingDocumentSetRequest:
    """A RAD-75 request for every instance of each (study, repository)."""
    requested = []
    for uid, repo in studies:
        documents = tuple(DocumentRequest(repo, i.sop_instance_uid, HOME) for i in INSTANCES[uid])
        requested.append(StudyRequest(uid, (SeriesRequest(f"{uid}.1", documents),)))
    return RetrieveImagingDocumentSetRequest(tuple(requested), (EXPLICIT_LE,))


# -- ITI-38 -----------------------------------------------------------------------------------------


async def test_consent_is_asked_per_hospital_as_data_holder_and_permits_answer(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    answer = await rig.service.query(query(), context())

    assert answer.status == ResponseStatus.SUCCESS
    assert study_uids(answer.objects) == {S1, S2}
    asked = sorted((q.holder_ura, q.bsn, q.requester_ura, q.requester_uzi) for q in rig.mitz.closed_asked)
    assert asked == [(H1, BSN, CLAIMS.ura, CLAIMS.uzi), (H2, BSN, CLAIMS.ura, CLAIMS.uzi)]
    [audit] = rig.audits(ITI_38)
    assert audit.event.outcome == EventOutcome.SUCCESS
    assert any(p.user_is_requestor and p.user_id.startswith(CLAIMS.uzi) for p in audit.participants)


@pytest.mark.parametrize("refusal", ["Deny", "NotApplicable", "Indeterminate", "error"])
async def test_a_hospital_without_permit_is_never_queried_and_the_others_still_answer(
        build: Callable[..., Awaitable[Rig]], refusal: ClosedScript) -> None:
    rig = await build({H1: refusal})
    answer = await rig.service.query(query(), context())

    assert rig.sources[H1].calls == [], "a PACS may only be touched with a Permit for it"
    assert study_uids(answer.objects) == {S2}
    # Nothing tells the requester whether a hospital without consent holds anything.
    assert answer.status == ResponseStatus.SUCCESS
    assert answer.errors == ()


async def test_mitz_that_does_not_answer_in_time_costs_that_hospital_only(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build({H1: "hang"})
    answer = await rig.service.query(query(), context())

    assert rig.sources[H1].calls == []
    assert [q.holder_ura for q in rig.mitz.abandoned] == [H1]
    assert answer.status == ResponseStatus.PARTIAL_SUCCESS
    assert study_uids(answer.objects) == {S2}
    [error] = answer.errors
    assert error.error_code == ErrorCode.REGISTRY_NOT_AVAILABLE
    assert H1 in error.code_context


async def test_a_hospital_down_makes_partial_success_naming_it(build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    rig.sources[H2].fail = SourceUnavailable(rig.sources[H2].name, "association refused")
    answer = await rig.service.query(query(), context())

    assert answer.status == ResponseStatus.PARTIAL_SUCCESS
    assert study_uids(answer.objects) == {S1}
    [error] = answer.errors
    assert error.error_code == ErrorCode.REGISTRY_NOT_AVAILABLE
    assert H2 in error.code_context and "association refused" in error.code_context
    assert error.location == HOME
    [audit] = rig.audits(ITI_38)
    assert audit.event.outcome == EventOutcome.MINOR_FAILURE


async def test_every_hospital_down_or_late_is_a_failure_with_an_error_each(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    rig.sources[H1].hang = True
    rig.sources[H2].fail = SourceUnavailable(rig.sources[H2].name, "aborted")
    answer = await rig.service.query(query(), context())

    assert answer.status == ResponseStatus.FAILURE
    assert answer.objects == ()
    assert sorted(e.error_code for e in answer.errors) == [ErrorCode.REGISTRY_NOT_AVAILABLE] * 2
    assert rig.sources[H1].cancelled == 1, "a late C-FIND is abandoned, not left running"


async def test_a_query_for_another_patient_than_the_assertion_is_refused_before_any_lookup(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    with pytest.raises(SoapFault):
        await rig.service.query(query(OTHER_BSN), context(patient_bsn=BSN))

    assert rig.mitz.closed_asked == []
    assert all(s.calls == [] for s in rig.sources.values())
    [audit] = rig.audits(ITI_38)
    assert audit.event.outcome == EventOutcome.SERIOUS_FAILURE


async def test_the_service_period_selects_studies_and_is_passed_to_the_pacs_by_day(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    answer = await rig.service.query(query(service_start_from="20240101", service_start_to="20250101"),
                                     context())

    assert study_uids(answer.objects) == {S1}
    [find] = [c for c in rig.sources[H2].calls if c.method == "find_studies"]
    assert str(find.args["date_from"]) == "2024-01-01"


# -- RAD-75 -----------------------------------------------------------------------------------------


async def answered(service: RespondingGateway, request: RetrieveImagingDocumentSetRequest,
                   ctx: CallContext) -> ImagingRetrieval:
    """The answer driven as the door drives it: every document taken and disclosed, in turn."""
    result = await service.retrieve_imaging(request, ctx)
    async with aclosing(result.stream()) as documents:
        async for document in documents:
            result.disclosing(document)
    return result




async def test_rad75_with_permit_delivers_the_instances_and_audits_the_disclosure(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    result = await answered(rig.service, imaging((S1, REPO1)), context())
    try:
        assert result.status == ResponseStatus.SUCCESS
        assert sorted(d.document_unique_id for d in result.handed) == [f"{S1}.1.1", f"{S1}.1.2"]
        assert all(isinstance(d.data, Path) and d.data.is_file() for d in result.handed)
        assert rig.audits(RAD_75) == [], "the disclosure is recorded once the answer is over"
    finally:
        await result.aclose()
    # Only the series the request names are walked (a batch per series must not C-FIND the others).
    [walk] = [c for c in rig.sources[H1].calls if c.method == "find_instances"]
    assert walk.args["series"] == (f"{S1}.1",)
    [audit] = rig.audits(RAD_75)
    assert audit.event.outcome == EventOutcome.SUCCESS, audit.event.outcome_description
    assert sorted(o.object_id for o in audit.objects if o.object_id.startswith(f"{S1}.1.")) == [
        f"{S1}.1.1", f"{S1}.1.2"]
    assert any(p.user_is_requestor and p.user_id.startswith(CLAIMS.uzi) for p in audit.participants)
    assert result.spool is None and not any((rig.spool).iterdir()), "the spool goes with the answer"


async def test_rad75_fetch_waits_while_the_consumer_holds_a_document(
        build: Callable[..., Awaitable[Rig]]) -> None:
    """The consumer paces the fetch: the PACS is not asked for the next instance while the answer is
    still writing the last one, which is what keeps the spool within the PACS window."""
    rig = await build()
    result = await rig.service.retrieve_imaging(imaging((S1, REPO1)), context())
    try:
        async with aclosing(result.stream()) as documents:
            first = await anext(documents)
            result.disclosing(first)
            for _ in range(10):
                await asyncio.sleep(0.01)  # room for a fetch that did not wait to run ahead
            assert result.spool is not None
            assert sorted(p.name for p in result.spool.iterdir()) == [f"{S1}.1.1.dcm"], "fetched ahead"
            assert not any((rig.spool.parent / "pacs").iterdir()), "the PACS was asked for the next one"
            second = await anext(documents)
            assert second.document_unique_id == f"{S1}.1.2"
            result.disclosing(second)
            assert [d async for d in documents] == []
        assert result.status == ResponseStatus.SUCCESS
    finally:
        await result.aclose()


async def test_rad75_of_a_study_of_another_patient_is_refused_without_asking_consent(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    result = await answered(rig.service, imaging((S3, REPO1)), context(patient_bsn=BSN))
    try:
        assert result.status == ResponseStatus.FAILURE
        assert result.handed == []
        assert [e.error_code for e in result.errors] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR] * 2
        assert rig.mitz.closed_asked == []
        assert rig.sources[H1].methods() == ["patient_of_study"]
        [audit] = rig.audits(RAD_75)
        assert audit.event.outcome == EventOutcome.SERIOUS_FAILURE
    finally:
        await result.aclose()


@pytest.mark.parametrize("refusal", ["Deny", "error"])
async def test_rad75_without_permit_reads_nothing_and_says_only_not_available(
        build: Callable[..., Awaitable[Rig]], refusal: ClosedScript) -> None:
    rig = await build({H1: refusal})
    result = await answered(rig.service, imaging((S1, REPO1), (S2, REPO2)), context())
    try:
        assert rig.sources[H1].methods() == ["patient_of_study"]
        assert result.status == ResponseStatus.PARTIAL_SUCCESS
        assert sorted(d.document_unique_id for d in result.handed) == [f"{S2}.1.1", f"{S2}.1.2"]
        refused = [e for e in result.errors if S1 in e.code_context]
        assert [e.error_code for e in refused] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR] * 2
    finally:
        await result.aclose()
    outcomes = sorted(a.event.outcome for a in rig.audits(RAD_75))
    assert outcomes == [EventOutcome.SUCCESS, EventOutcome.MINOR_FAILURE]


async def test_rad75_names_each_instance_the_pacs_did_not_deliver(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    rig.sources[H1].undeliverable = {f"{S1}.1.2"}
    result = await answered(rig.service, imaging((S1, REPO1)), context())
    try:
        assert result.status == ResponseStatus.PARTIAL_SUCCESS
        assert [d.document_unique_id for d in result.handed] == [f"{S1}.1.1"]
        [error] = result.errors
        assert error.error_code == ErrorCode.REPOSITORY_ERROR
        assert error.code_context == f"{S1}:{S1}.1:{S1}.1.2"
    finally:
        await result.aclose()


async def test_rad75_over_the_study_cap_is_refused_whole_before_any_lookup(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build(max_studies_per_request=1)
    result = await answered(rig.service, imaging((S1, REPO1), (S2, REPO2)), context())

    assert result.status == ResponseStatus.FAILURE
    [error] = result.errors
    assert error.error_code == ErrorCode.REGISTRY_ERROR and "max_studies_per_request" in error.code_context
    assert rig.mitz.closed_asked == []
    assert all(s.calls == [] for s in rig.sources.values())


async def test_rad75_request_deadline_cuts_the_slow_study_and_names_the_unstarted_one_late(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build(request_deadline_s=0.2, max_parallel_lookups=1, hospital_deadline_s=5.0)
    rig.sources[H1].hang = True
    loop = asyncio.get_running_loop()
    started = loop.time()
    result = await answered(rig.service, imaging((S1, REPO1), (S2, REPO2)), context())
    try:
        assert loop.time() - started < 1.0
        assert result.status == ResponseStatus.FAILURE
        assert rig.sources[H2].calls == [], "a study still waiting for a slot at the deadline is not started"
        late = [e for e in result.errors if S2 in e.code_context]
        assert len(late) == 2 and all("request deadline" in e.code_context for e in late)
        cut = [e for e in result.errors if S1 in e.code_context]
        assert [e.error_code for e in cut] == [ErrorCode.REPOSITORY_ERROR] * 2
    finally:
        await result.aclose()
    [audit] = rig.audits(RAD_75)  # the late study was never asked about: nothing to audit
    assert audit.event.outcome == EventOutcome.SERIOUS_FAILURE


# -- ITI-39 -----------------------------------------------------------------------------------------


async def _announce(rig: Rig, study_uid: str, ura: str, repo: str) -> str:
    """Put a study's KOS in the document index, as an earlier ITI-38 answer would have."""
    unique_id = kos_unique_id(study_uid, repo)
    await rig.index.record([IndexedDocument(unique_id, "kos", ura, repo, study_uid, None, MIME_DICOM)])
    return unique_id


async def test_iti39_kos_is_built_only_on_permit_and_audited(build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build({H2: "Deny"})
    mine = await _announce(rig, S1, H1, REPO1)
    denied = await _announce(rig, S2, H2, REPO2)
    answer = await rig.service.retrieve(RetrieveDocumentSetRequest((
        DocumentRequest(REPO1, mine, HOME), DocumentRequest(REPO2, denied, HOME))), context())

    assert answer.status == ResponseStatus.PARTIAL_SUCCESS
    [doc] = answer.documents
    assert doc.document_unique_id == mine and doc.mime_type == MIME_DICOM
    [error] = answer.errors
    assert error.error_code == ErrorCode.DOCUMENT_UNIQUE_ID_ERROR
    assert rig.sources[H2].methods() == ["patient_of_study"]
    outcomes = sorted(a.event.outcome for a in rig.audits(ITI_39))
    assert outcomes == [EventOutcome.SUCCESS, EventOutcome.MINOR_FAILURE]


async def test_iti39_of_another_patients_document_is_unknown_without_asking_consent(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build()
    theirs = await _announce(rig, S3, H1, REPO1)
    answer = await rig.service.retrieve(RetrieveDocumentSetRequest((DocumentRequest(REPO1, theirs, HOME),)),
                                        context(patient_bsn=BSN))

    assert answer.status == ResponseStatus.FAILURE
    assert [e.error_code for e in answer.errors] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR]
    assert rig.mitz.closed_asked == []
    assert rig.sources[H1].methods() == ["patient_of_study"]


async def test_iti39_over_the_document_cap_is_refused_before_any_lookup(
        build: Callable[..., Awaitable[Rig]]) -> None:
    rig = await build(max_studies_per_request=1)
    first = await _announce(rig, S1, H1, REPO1)
    second = await _announce(rig, S2, H2, REPO2)
    with pytest.raises(RegistryErrorException) as refused:
        await rig.service.retrieve(RetrieveDocumentSetRequest((
            DocumentRequest(REPO1, first, HOME), DocumentRequest(REPO2, second, HOME))), context())

    assert "max_studies_per_request" in str(refused.value)
    assert all(s.calls == [] for s in rig.sources.values())
    assert rig.mitz.closed_asked == []


# -- an assertion carrying an authorization decision ------------------------------------------------


@pytest.mark.parametrize("transaction", ["iti38", "iti39", "rad75"])
async def test_an_authorization_decision_in_the_assertion_refuses_the_request_before_anyone_is_asked(
        transaction: str, build: Callable[..., Awaitable[Rig]]) -> None:
    """Every transaction: a Failure with LocalPolicyRestrictionError naming the decision, no Mitz
    question, no PACS touched, and the refusal audited with the requester."""
    rig = await build()
    announced = await _announce(rig, S1, H1, REPO1)
    ctx = CallContext(replace(requester(), authz_decisions=(AuthzDecision("Permit", "https://duo/xca"),)),
                      Peer(user_id="https://peer.example/reply", host="192.0.2.9"))
    if transaction == "iti38":
        answer: Any = await rig.service.query(query(), ctx)
        audit_code = ITI_38
    elif transaction == "iti39":
        # Without HomeCommunityId, as NIST's 12312_withauthzconsent asks: refused before that is read.
        request = RetrieveDocumentSetRequest((DocumentRequest(REPO1, announced, None),))
        answer = await rig.service.retrieve(request, ctx)
        audit_code = ITI_39
    else:
        answer = await answered(rig.service, imaging((S1, REPO1)), ctx)
        await answer.aclose()
        audit_code = RAD_75

    assert answer.status == ResponseStatus.FAILURE
    [error] = answer.errors
    assert (error.error_code, error.location) == (ErrorCode.LOCAL_POLICY_RESTRICTION, HOME)
    assert error.code_context == f"{AUTHZ_DECISION_REFUSED} (Decision Permit)"
    assert rig.mitz.closed_asked == []
    assert all(s.calls == [] for s in rig.sources.values())
    [audit] = rig.audits(audit_code)
    assert audit.event.outcome == EventOutcome.MINOR_FAILURE
    assert audit.event.outcome_description == error.code_context
    assert any(p.user_is_requestor and p.user_id.startswith(CLAIMS.uzi) for p in audit.participants)


async def test_the_socket_guard_is_armed() -> None:
    """The no_sockets fixture really refuses: otherwise every 'no sockets' claim here is hollow."""
    import socket

    with pytest.raises(AssertionError, match="must not use sockets"):
        socket.create_connection(("127.0.0.1", 9), timeout=0.1)
