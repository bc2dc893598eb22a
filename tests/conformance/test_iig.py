"""NIST XDS Toolkit cases of the Initiating Imaging Gateway (``iig_2018-54xx``), DUO being the IIG.

NIST plays an Imaging Document Consumer that sends the IIG a RAD-69 request, and Responding Imaging
Gateways A and B that store the RAD-75 requests the IIG sends them; it then checks (1) those RAD-75
requests (``sameReqImgs``: the right study, series, home, repository and instance UIDs, the asked
transfer syntax), (2) the RAD-69 response's status and registry errors, and (3) that the returned
images were not altered (``sameDcmImgs`` over SOPClassUID, SOPInstanceUID, PatientID, PatientBirthDate,
PatientSex, StudyInstanceUID, SeriesInstanceUID).

What differs in DUO's profile, for every case here:

- **The consumer's request is a TLB API transfer**, not a RAD-69: the TLB app names studies by the ids
  DUO's timeline issued (never bare UIDs), DUO reads each study's KOS (ITI-39) and asks the community's
  RAD-75 for the instances the manifest lists, and the images land in the requester's PACS (an Orthanc)
  instead of coming back in a RAD-69 response. So (2) is checked on the job's status (Success:
  ``completed``; PartialSuccess: ``partial``; Failure: ``failed``; "registry error list not empty":
  the community's ebRS error code in the study's detail) and (3) on what the Orthanc holds.
- **The RIGs are the community simulator** with NIST's home community and repository ids, recording
  every request it receives (:mod:`tests.transfer.communities`); patient and study UIDs are the
  simulator's (a BSN patient), in the shapes NIST's cases prescribe (one image, two studies, six images
  in one series).
- **"Unknown UIDs"** cannot be typed into a transfer: an instance unknown to the repository is one the
  KOS still lists but the repository no longer has (``XcaMisbehaviour.lost_instances``), which makes
  the RIG answer exactly what NIST's RIG answers (``XDSDocumentUniqueIdError`` on the composite UID).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Final

import pytest
import pytest_asyncio
from pydicom.dataset import Dataset

from duo_gateway.sim.behaviour import XcaMisbehaviour
from duo_gateway.sim.studies import GeneratedStudy
from duo_gateway.timeline.model import StudyRef
from duo_gateway.xca.codes import EXPLICIT_VR_LITTLE_ENDIAN, Action, ErrorCode
from duo_gateway.xca.retrieve import composite_context, parse_imaging_retrieve_request
from tests.support.orthanc import Orthanc, run_orthanc
from tests.transfer.communities import (
    A_ONE,
    A_PAIR,
    A_TWO,
    B_ONE,
    B_SIX,
    PATIENT,
    REQUESTER,
    UNKNOWN_HOME,
    UNKNOWN_REPOSITORY,
    CommunitiesNetwork,
    SimulatedCommunity,
    running,
    sop_uids,
)
from tests.transfer.harness import clear, destination_instances
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The tags NIST's ``sameDcmImgs`` compares (``ValidateReturnedImages/testplan.xml``).
NIST_TAGS: Final = ("SOPClassUID", "SOPInstanceUID", "PatientID", "PatientBirthDate", "PatientSex",
                    "StudyInstanceUID", "SeriesInstanceUID")

Image = tuple[str, str, str | None, str, str]


@pytest.fixture(scope="module")
def destination(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("destination"), ae_title="OWN_PACS") as orthanc:
        yield orthanc


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory,
                  destination: Orthanc) -> AsyncIterator[CommunitiesNetwork]:
    async with running(tmp_path_factory.mktemp("net"), destination) as net:
        yield net


@pytest_asyncio.fixture(loop_scope="module")
async def ids(network: CommunitiesNetwork) -> dict[str, str]:
    """Study UID -> the id of a fresh timeline, as the TLB app holds them; the destination emptied."""
    await asyncio.to_thread(clear, network.destination)
    return await network.study_ids()


class Rigs:
    """What each RIG received from here on: NIST's ``SimTransaction`` of the case."""

    def __init__(self, network: CommunitiesNetwork, wsdl_dir: Path) -> None:
        self._network = network
        self._wsdl_dir = wsdl_dir
        self._since = {home: len(c.recorder.bodies) for home, c in network.communities.items()}

    def images(self, community: SimulatedCommunity) -> list[Image]:
        """Every image the RAD-75 requests to ``community`` asked for, in order; each request checked
        against the official IHEXDSIB.xsd and for NIST's transfer syntax."""
        asked: list[Image] = []
        for el in community.requests(Action.RAD75, self._since[community.home]):
            assert_valid(self._wsdl_dir, el)
            request = parse_imaging_retrieve_request(el)
            assert EXPLICIT_VR_LITTLE_ENDIAN in request.transfer_syntaxes, request.transfer_syntaxes
            asked += [(study, series, doc.home, doc.repository_unique_id, doc.document_unique_id)
                      for study, series, doc in request.instances()]
        return asked

    def rad75_count(self, community: SimulatedCommunity) -> int:
        return len(community.requests(Action.RAD75, self._since[community.home]))

    def received(self) -> int:
        return sum(len(c.recorder.bodies) - self._since[h] for h, c in self._network.communities.items())


def at(community: SimulatedCommunity, *studies: GeneratedStudy) -> list[Image]:
    """NIST's ``RequestBody``: each image of ``studies`` as the RIG of ``community`` must be asked it."""
    return [(s.study_instance_uid, str(ds.SeriesInstanceUID), community.home,
             community.config.repository_unique_id, str(ds.SOPInstanceUID))
            for s in studies for ds in s.instances]


async def same_images(network: CommunitiesNetwork, study: GeneratedStudy, instances: list[Dataset]) -> None:
    """NIST's ``sameDcmImgs``: exactly ``instances`` of ``study`` arrived, with NIST's tags unaltered."""
    arrived = await asyncio.to_thread(destination_instances, network.destination, study.study_instance_uid)
    assert set(arrived) == {str(ds.SOPInstanceUID) for ds in instances}
    for ds in instances:
        tags = arrived[str(ds.SOPInstanceUID)]
        assert {t: tags.get(t) for t in NIST_TAGS} == {t: str(ds.get(t)) for t in NIST_TAGS}


def study_of(job: dict[str, Any], study_id: str) -> dict[str, Any]:
    return next(s for s in job["studies"] if s["id"] == study_id)


def assert_success(job: dict[str, Any], *studies: GeneratedStudy) -> None:
    """RAD-69 Success with one DocumentResponse per image: the job completed, every image stored."""
    assert job["state"] == "completed", job
    assert [s["state"] for s in job["studies"]] == ["completed"] * len(studies)
    assert job["instances_stored"] == job["instances_expected"] == sum(len(s.instances) for s in studies)
    assert job["errors"] == []


async def test_iig_2018_5401a(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5401a, Single Image, Single Responding Gateway: a one-image study in community A.

    Adapted (see the module docstring): a TLB API transfer of the study instead of a RAD-69; the image
    is checked in the requester's PACS."""
    rigs = Rigs(network, wsdl_dir)
    job = await network.transfer([ids[A_ONE.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_ONE)
    assert rigs.rad75_count(network.a) == 1 and rigs.rad75_count(network.b) == 0
    assert_success(job, A_ONE)
    await same_images(network, A_ONE, A_ONE.instances)


async def test_iig_2018_5401b(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5401b, Two Imaging Studies, Single Responding Gateway: two one-image studies in A.

    Adapted: NIST's RAD-69 (and so its RAD-75) carries both StudyRequests in one message; DUO works a
    transfer study by study, so A receives one RAD-75 per study, and the two together name exactly
    NIST's set of images."""
    rigs = Rigs(network, wsdl_dir)
    job = await network.transfer([ids[A_ONE.study_instance_uid], ids[A_TWO.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_ONE, A_TWO)
    assert rigs.rad75_count(network.a) == 2 and rigs.rad75_count(network.b) == 0
    assert_success(job, A_ONE, A_TWO)
    await same_images(network, A_ONE, A_ONE.instances)
    await same_images(network, A_TWO, A_TWO.instances)


async def test_iig_2018_5401c(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5401c, Multi-Image Study, Single Responding Gateway: six images of one series, from
    community B. As NIST's, one RAD-75 asks for all six (DUO's RAD-75 batch is a series, up to the
    community's ``rad75_batch_size``, 50 here). Adapted only as the module docstring says."""
    rigs = Rigs(network, wsdl_dir)
    job = await network.transfer([ids[B_SIX.study_instance_uid]])
    assert rigs.images(network.b) == at(network.b, B_SIX)
    assert rigs.rad75_count(network.b) == 1 and rigs.rad75_count(network.a) == 0
    assert_success(job, B_SIX)
    await same_images(network, B_SIX, B_SIX.instances)


async def test_iig_2018_5403a(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5403a, Multiple Responding Gateways: one image in A and six in B, one request, one
    consolidated result. Adapted: the consolidated result is one transfer job, ``completed`` when both
    communities delivered; each RIG receives a RAD-75 for its own study only."""
    rigs = Rigs(network, wsdl_dir)
    job = await network.transfer([ids[A_ONE.study_instance_uid], ids[B_SIX.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_ONE)
    assert rigs.images(network.b) == at(network.b, B_SIX)
    assert_success(job, A_ONE, B_SIX)
    await same_images(network, A_ONE, A_ONE.instances)
    await same_images(network, B_SIX, B_SIX.instances)


async def test_iig_2018_5404b(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5404b, Unknown DICOM UIDs, Single Responding Gateway: the RAD-75 still goes to A as
    asked, A answers Failure (XDSDocumentUniqueIdError), no image is returned and the errors are passed
    on. Adapted: the unknown image is one A's KOS lists and its repository no longer holds (module
    docstring); Failure is the study and the job ``failed``, A's error code and composite UID in the
    study's detail."""
    rigs = Rigs(network, wsdl_dir)
    [image] = A_ONE.instances
    with network.a.misbehaving(XcaMisbehaviour(lost_instances=sop_uids(A_ONE))):
        job = await network.transfer([ids[A_ONE.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_ONE)
    assert job["state"] == "failed" and job["instances_stored"] == 0, job
    detail = study_of(job, ids[A_ONE.study_instance_uid])["detail"]
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in detail
    assert composite_context(A_ONE.study_instance_uid, str(image.SeriesInstanceUID),
                             str(image.SOPInstanceUID)) in detail
    await same_images(network, A_ONE, [])


async def test_iig_2018_5404c(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5404c, Unknown Responding Gateway: an image at homeCommunityId ``…13.70.102.999``,
    which the IIG has no configuration for; NIST expects Failure with a registry error and no image,
    and has no RAD-75 step to validate. Adapted: a TLB app can only name a study by an id DUO issued,
    so the test has DUO's own key seal one at that home (what a timeline issues for an entry a
    community announced under another homeCommunityId, or for a community since removed from the
    configuration); the Failure is the transfer refused at submit (HTTP 422 problem naming the home),
    no job is made and no request at all reaches either RIG."""
    rigs = Rigs(network, wsdl_dir)
    kos = next(d.entry for d in network.a.sim.documents
               if any(A_ONE.study_instance_uid in r for r in d.entry.reference_ids))
    study_id = network.gateway.study_ids.seal(
        StudyRef("xca", A_ONE.study_instance_uid, UNKNOWN_HOME, UNKNOWN_REPOSITORY, kos.unique_id),
        PATIENT.bsn, ura=REQUESTER["ura"])
    jobs = len(await network.jobs())
    status, problem = await network.submit([study_id])
    assert status == 422 and problem["type"] == "urn:duo-gateway:problem:invalid-study", problem
    assert UNKNOWN_HOME in problem["detail"] and "not (or no longer) configured" in problem["detail"]
    await asyncio.sleep(0.2)  # nothing is queued, so nothing can still be on its way
    assert rigs.received() == 0
    assert len(await network.jobs()) == jobs
    await same_images(network, A_ONE, [])


async def test_iig_2018_5405a(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5405a, Partial Success, Single Responding Gateway: two images asked of A, one of
    which A does not have; A answers PartialSuccess with XDSDocumentUniqueIdError, and the one image is
    returned. Adapted: a two-image study whose second image A's repository no longer holds (module
    docstring); PartialSuccess is the study and the job ``partial``, the image that came is stored,
    A's error in the study's detail."""
    rigs = Rigs(network, wsdl_dir)
    kept, lost = A_PAIR.instances
    with network.a.misbehaving(XcaMisbehaviour(lost_instances=[str(lost.SOPInstanceUID)])):
        job = await network.transfer([ids[A_PAIR.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_PAIR)
    assert rigs.rad75_count(network.a) == 1
    assert job["state"] == "partial" and job["instances_stored"] == 1 and job["instances_failed"] == 1, job
    study = study_of(job, ids[A_PAIR.study_instance_uid])
    assert study["state"] == "partial"
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in study["detail"]
    assert composite_context(A_PAIR.study_instance_uid, str(lost.SeriesInstanceUID),
                             str(lost.SOPInstanceUID)) in study["detail"]
    await same_images(network, A_PAIR, [kept])


async def test_iig_2018_5405b(network: CommunitiesNetwork, ids: dict[str, str], wsdl_dir: Path) -> None:
    """NIST iig_2018-5405b, Partial Success, Multiple Responding Gateways: one study in A, one asked of B
    that B does not have; both RIGs get their RAD-75, and the consolidated result is PartialSuccess
    with B's XDSDocumentUniqueIdError and A's image. Adapted: B's study is one its KOS lists and its
    repository no longer holds (module docstring); the consolidated result is the job, ``partial``,
    with A's study completed and B's failed with B's error in its detail."""
    rigs = Rigs(network, wsdl_dir)
    [missing] = B_ONE.instances
    with network.b.misbehaving(XcaMisbehaviour(lost_instances=sop_uids(B_ONE))):
        job = await network.transfer([ids[A_ONE.study_instance_uid], ids[B_ONE.study_instance_uid]])
    assert rigs.images(network.a) == at(network.a, A_ONE)
    assert rigs.images(network.b) == at(network.b, B_ONE)
    assert job["state"] == "partial", job
    assert study_of(job, ids[A_ONE.study_instance_uid])["state"] == "completed"
    b = study_of(job, ids[B_ONE.study_instance_uid])
    assert b["state"] == "failed" and network.b.home in b["detail"]
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in b["detail"]
    assert composite_context(B_ONE.study_instance_uid, str(missing.SeriesInstanceUID),
                             str(missing.SOPInstanceUID)) in b["detail"]
    assert any(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in e for e in job["errors"])
    await same_images(network, A_ONE, A_ONE.instances)
    await same_images(network, B_ONE, [])
