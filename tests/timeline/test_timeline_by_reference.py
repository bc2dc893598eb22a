"""Issues 13 and 14: a community answering 5,000 entries (34 MB) for one patient still fills the timeline.

A TLB client POSTs /tlb/v1/timeline; DUO asks the community simulator, which holds 5,000 manifest-only
studies of the patient, LeafClass first. Two DUOs in front of the same community:

- ``duo`` with ``iti38_max_answer_bytes`` at 16 MiB (the limit before issue 14): the LeafClass answer
  is over it, the refusal names the key, and DUO asks again by reference: FindDocuments for
  ObjectRefs, then GetDocuments in batches of ``iti38_batch_size``;
- ``default``, configured as out of the box: the 34 MB answer is under the default limit and is read
  as it came, in one request.

The expected studies are the simulator's study headers, computed here from the same deterministic
generator, never from DUO's answer.
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Final

import pytest
import pytest_asyncio

from duo_gateway.sim.config import SimCommunity, SimInstitution, default_network
from duo_gateway.sim.studies import study_headers
from duo_gateway.sim.xca import community_seed
from duo_gateway.xca.codes import QueryParam, ReturnType, StoredQuery
from duo_gateway.xca.ebrim import ObjectRef
from duo_gateway.xca.query import parse_adhoc_query_response
from tests.conformance.ig_network import IgNetwork, running
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

ENTRIES: Final = 5_000
BASE = default_network()
PATIENT = next(p for p in BASE.patients if p.consent == "all")
BULK: Final = SimCommunity(
    home_community_id="urn:oid:2.16.528.1.1007.99.20077", name="XDS Groot",
    repository_unique_id="2.16.528.1.1007.99.20077.1",
    institutions=[SimInstitution(ura="00020771", name="Groot Ziekenhuis")], studies_per_patient=0,
    manifest_only_studies={PATIENT.bsn: ENTRIES})
NET: Final = BASE.model_copy(update={"communities": [BULK]})
#: The ITI-38 answer limit before issue 14, configured on ``duo``.
SMALL_LIMIT: Final = 16 * 1024 * 1024


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def network(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[IgNetwork]:
    # Generous limits: the simulator builds a 34 MB answer first, on a machine shared with others.
    settings = {BULK.home_community_id: {"timeout_s": 60.0, "iti38_max_answer_bytes": SMALL_LIMIT}}
    defaults = {BULK.home_community_id: {"timeout_s": 60.0}}
    async with running(tmp_path_factory.mktemp("by-reference"), NET,
                       gateways={"duo": settings, "default": defaults}, deadline_s=90.0) as net:
        yield net


def expected_studies() -> set[str]:
    return {h.study_instance_uid for h in study_headers(
        PATIENT, BULK.institutions[0], range(ENTRIES), community_seed(NET, BULK))}


async def test_a_5000_entry_answer_under_the_default_limit_is_read_as_it_came(network: IgNetwork) -> None:
    community = network.communities[0]
    mark = len(community.log)
    answer = await network.timeline(PATIENT.bsn, "default")

    uids = [s["study_instance_uid"] for s in answer["studies"]]
    assert len(uids) == ENTRIES and set(uids) == expected_studies()
    (source,) = answer["sources"]
    assert (source["id"], source["status"]) == (community.source_id, "ok")
    assert source["detail"].startswith(f"{ENTRIES} entries"), source["detail"]
    (leaf,) = community.log[mark:]  # one request: no second asking by reference
    assert leaf.query().return_type is ReturnType.LEAF_CLASS and leaf.answer_size > SMALL_LIMIT


async def test_a_5000_entry_answer_over_the_limit_yields_every_study_by_reference(network: IgNetwork,
                                                                                  wsdl_dir: Path) -> None:
    community = network.communities[0]
    mark = len(community.log)
    answer = await network.timeline(PATIENT.bsn, "duo")

    uids = [s["study_instance_uid"] for s in answer["studies"]]
    assert len(uids) == ENTRIES and set(uids) == expected_studies()
    assert all(s["sources"] == [community.source_id] for s in answer["studies"])
    (source,) = answer["sources"]
    assert (source["id"], source["status"]) == (community.source_id, "ok")
    assert ("asked by reference (the LeafClass answer was refused: answer over the size limit"
            in source["detail"])
    # The detail tells an integrator which setting to raise to have it in one answer.
    assert (f"the limit is xca_communities.iti38_max_answer_bytes = {SMALL_LIMIT} bytes (16 MiB)"
            in source["detail"]), source["detail"]

    leaf, refs, *gets = community.log[mark:]
    # The LeafClass answer the community sent really was over the limit: that is why DUO asked again.
    assert leaf.query().return_type is ReturnType.LEAF_CLASS and leaf.answer_size > SMALL_LIMIT
    ref_query = refs.query()
    assert (ref_query.query_id, ref_query.return_type) == (StoredQuery.FIND_DOCUMENTS, ReturnType.OBJECT_REF)
    objects = parse_adhoc_query_response(refs.response()).objects
    referenced = [o.id for o in objects if isinstance(o, ObjectRef)]
    assert len(referenced) == ENTRIES
    batch = network.gateways["duo"].config.xca_communities[0].iti38_batch_size
    assert len(gets) == math.ceil(ENTRIES / batch)
    asked: list[str] = []
    for exchange in gets:
        query = exchange.query()
        assert (query.query_id, query.home, query.return_type) == (
            StoredQuery.GET_DOCUMENTS, community.home, ReturnType.LEAF_CLASS)
        ids = query.values(QueryParam.ENTRY_UUID) or []
        assert 1 <= len(ids) <= batch
        assert exchange.answer_size <= SMALL_LIMIT  # each batch within the answer limit
        asked += ids
    assert sorted(asked) == sorted(referenced)  # every reference asked for, once
    for exchange in (leaf, refs, *gets):
        assert_valid(wsdl_dir, exchange.body())
