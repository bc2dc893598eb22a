"""One transfer across two XCA communities: what one community's trouble does to the other's images.

DUO fetches each study from its own community (ITI-39 for the KOS, then RAD-75), so a community that
fails (a RIG answering Failure, down, or answering only part of a RAD-75) costs only its own studies:
the other community's images still land in the requester's PACS, the job ends ``partial``, and the
failing community's registry error (code and context) is in the study's detail, not swallowed. A study
whose homeCommunityId DUO has no configuration for is refused at submit, before any peer is called.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio

from duo_gateway.sim.behaviour import XcaMisbehaviour
from duo_gateway.timeline.model import StudyRef
from duo_gateway.xca.codes import ErrorCode
from duo_gateway.xca.retrieve import composite_context
from tests.support.orthanc import Orthanc, run_orthanc
from tests.transfer.communities import (
    A_ONE,
    B_SIX,
    PATIENT,
    REQUESTER,
    UNKNOWN_HOME,
    UNKNOWN_REPOSITORY,
    CommunitiesNetwork,
    running,
    sop_uids,
)
from tests.transfer.harness import clear, destination_instances

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("destination"), ae_title="OWN_PACS") as orthanc:
        yield orthanc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory,
                  destination: Orthanc) -> AsyncIterator[CommunitiesNetwork]:
    async with running(tmp_path_factory.mktemp("net"), destination) as net:
        yield net


@pytest.fixture(autouse=True)
def empty_destination(destination: Orthanc) -> None:
    clear(destination)


async def landed(network: CommunitiesNetwork, study_uid: str) -> set[str]:
    return set(await asyncio.to_thread(destination_instances, network.destination, study_uid))


def study_of(job: dict[str, Any], study_id: str) -> dict[str, Any]:
    return next(s for s in job["studies"] if s["id"] == study_id)


async def test_a_rig_failure_is_passed_on_while_the_other_communitys_images_land(
        network: CommunitiesNetwork) -> None:
    """B's imaging document source has none of the study's images any more: B answers Failure with
    XDSDocumentUniqueIdError per image, and that is what the study's detail says."""
    ids = await network.study_ids()
    since_b = len(network.b.recorder.bodies)
    with network.b.misbehaving(XcaMisbehaviour(lost_instances=sop_uids(B_SIX))):
        job = await network.transfer([ids[B_SIX.study_instance_uid], ids[A_ONE.study_instance_uid]])
    assert job["state"] == "partial", job
    a = study_of(job, ids[A_ONE.study_instance_uid])
    assert a["state"] == "completed" and a["instances_stored"] == 1
    b = study_of(job, ids[B_SIX.study_instance_uid])
    assert b["state"] == "failed" and b["instances_stored"] == 0 and b["instances_failed"] == 6
    first = B_SIX.instances[0]
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in b["detail"]
    assert composite_context(B_SIX.study_instance_uid, str(first.SeriesInstanceUID),
                             str(first.SOPInstanceUID)) in b["detail"]
    assert network.b.home in b["detail"]
    assert any(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in e for e in job["errors"])
    assert PATIENT.bsn not in repr(job)
    # B was asked once (an unknown UID is no transient error, so no retry pass); A's image landed.
    assert len(network.b.rad75(since_b)) == 1
    assert await landed(network, A_ONE.study_instance_uid) == set(sop_uids(A_ONE))
    assert await landed(network, B_SIX.study_instance_uid) == set()


async def test_a_community_that_is_down_costs_only_its_own_study(network: CommunitiesNetwork) -> None:
    """A is down for the whole job: its study fails once its manifest retries are spent, naming A and
    the ITI-39 that could not be made, and B's study, asked after it, still completes."""
    ids = await network.study_ids()
    since = {c.home: len(c.recorder.bodies) for c in network.communities.values()}
    with network.a.misbehaving(XcaMisbehaviour(down=True)):
        job = await network.transfer([ids[A_ONE.study_instance_uid], ids[B_SIX.study_instance_uid]])
    assert job["state"] == "partial", job
    a = study_of(job, ids[A_ONE.study_instance_uid])
    assert a["state"] == "failed" and a["instances_stored"] == 0
    assert network.a.home in a["detail"] and "ITI-39" in a["detail"], a
    b = study_of(job, ids[B_SIX.study_instance_uid])
    assert b["state"] == "completed" and b["instances_stored"] == b["instances_expected"] == 6
    # A was tried (its ITI-39, retried) and never got as far as a RAD-75.
    assert len(network.a.recorder.bodies) > since[network.a.home]
    assert network.a.rad75(since[network.a.home]) == []
    assert await landed(network, B_SIX.study_instance_uid) == set(sop_uids(B_SIX))
    assert await landed(network, A_ONE.study_instance_uid) == set()


async def test_a_partial_rad75_answer_keeps_what_came_and_names_what_did_not(
        network: CommunitiesNetwork) -> None:
    """B answers PartialSuccess (four of six images, XDSDocumentUniqueIdError for two): the four are
    stored, the two named missing with B's error, and A's study is unaffected."""
    ids = await network.study_ids()
    lost = sop_uids(B_SIX)[1:3]
    with network.b.misbehaving(XcaMisbehaviour(lost_instances=lost)):
        job = await network.transfer([ids[A_ONE.study_instance_uid], ids[B_SIX.study_instance_uid]])
    assert job["state"] == "partial", job
    assert study_of(job, ids[A_ONE.study_instance_uid])["state"] == "completed"
    b = study_of(job, ids[B_SIX.study_instance_uid])
    assert b["state"] == "partial" and b["instances_stored"] == 4 and b["instances_failed"] == 2, b
    assert b["detail"].startswith("2 of 6 instances missing"), b
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in b["detail"] and all(uid in b["detail"] for uid in lost)
    assert await landed(network, B_SIX.study_instance_uid) == set(sop_uids(B_SIX)) - set(lost)
    assert await landed(network, A_ONE.study_instance_uid) == set(sop_uids(A_ONE))


async def test_a_study_at_an_unknown_home_is_refused_before_anyone_is_called(
        network: CommunitiesNetwork) -> None:
    """The id is DUO's own (sealed with its key, as a timeline would for an entry a community announced
    under another community's homeCommunityId, or for a community since removed from the
    configuration), so only the home makes it unusable."""
    ids = await network.study_ids()
    kos = next(d.entry for d in network.a.sim.documents
               if any(A_ONE.study_instance_uid in r for r in d.entry.reference_ids))
    unknown = network.gateway.study_ids.seal(
        StudyRef("xca", A_ONE.study_instance_uid, UNKNOWN_HOME, UNKNOWN_REPOSITORY, kos.unique_id),
        PATIENT.bsn, ura=REQUESTER["ura"])
    before, jobs = network.received(), len(await network.jobs())
    for request, n in (([unknown], 0), ([ids[B_SIX.study_instance_uid], unknown], 1)):
        status, problem = await network.submit(request)
        assert status == 422 and problem["type"] == "urn:duo-gateway:problem:invalid-study", problem
        assert f"studies[{n}]" in problem["detail"] and UNKNOWN_HOME in problem["detail"], problem
        assert "not (or no longer) configured" in problem["detail"]
    # No ITI-39, no RAD-75, nothing at all went to either community, and no job exists.
    await asyncio.sleep(0.2)
    assert network.received() == before
    assert len(await network.jobs()) == jobs
    assert await landed(network, A_ONE.study_instance_uid) == set()
    assert await landed(network, B_SIX.study_instance_uid) == set()
