"""RAD-75 answered as it fetches (issue 14): streamed, spool within its window, failures told at the end.

One network for the module: DUO with a 1 MiB ``retrieve_window`` in front of two SimPacs, one of them
holding a study of 48 instances of ~130 kB (6 MB, six windows). The PACS writes what it sends into
the same event log the test's client writes what it received, so "the first part was out before the
last instance was fetched" is an order of events, never a time. The answer's envelope is the last
MIME part (named by ``start``): every reader here finds it by that, as RFC 2387 says, and DUO's own
initiating retriever reads the answer as a community's.
"""

from __future__ import annotations

import asyncio
import email
import email.policy
import threading
from collections.abc import AsyncIterator, Iterator
from io import BytesIO
from pathlib import Path
from typing import Any, ClassVar

import pytest
import pytest_asyncio
from lxml import etree
from pydicom import dcmread

from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.behaviour import PacsMisbehaviour
from duo_gateway.sim.pacs import SimPacs
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from duo_gateway.soap.envelope import parse_envelope
from duo_gateway.soap.mtom import (
    MessageEnd,
    MtomParser,
    NeedData,
    PartData,
    PartEnd,
    PartStart,
    multipart_related,
    normalise_cid,
    parse_mtom,
)
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca.codes import EXPLICIT_VR_LITTLE_ENDIAN, MIME_DICOM, Action, ErrorCode, ResponseStatus
from duo_gateway.xca.initiating.exchange import CommunitySigner
from duo_gateway.xca.initiating.retriever import CommunityRetriever, PartFailure, RetrievedPart
from duo_gateway.xca.retrieve import (
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    build_imaging_retrieve_request,
    inline_documents,
    parse_retrieve_response,
)
from duo_gateway.xmldsig import load_signing_pair
from tests.support.studies import big_study
from tests.xca.responding_harness import CLAIMS, HOME, XUA_ISSUER, Network, running_network
from tests.xca.test_responding import ALL, H1, dataset_bytes, pacs_index, rad75, repo, study_request
from tests.xca.test_responding_audit import records_of
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

WINDOW = 1024 * 1024
COUNT = 48
XDSB = "urn:ihe:iti:xds-b:2007"


class LoggingPacs(SimPacs):
    """A SimPacs that writes each instance it is about to send into a shared event log."""

    events: ClassVar[list[tuple[str, str]]] = []
    lock: ClassVar[threading.Lock] = threading.Lock()

    def _send(self, event: Any, entries: Any, contexts: Any) -> Iterator[Any]:
        for status, ds in super()._send(event, entries, contexts):
            if ds is not None:
                with self.lock:
                    self.events.append(("pacs-sends", str(ds.SOPInstanceUID)))
            yield status, ds


def log(event: str, uid: str) -> None:
    with LoggingPacs.lock:
        LoggingPacs.events.append((event, uid))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("duo"), studies_per_patient=1, pacs_class=LoggingPacs,
                               xca_responding={"retrieve_window": "1MiB"}) as network:
        pacs = network.pacs[pacs_index(network, H1)]
        patient = next(p for p in network.net.patients if p.bsn == ALL)
        template = generate_studies(patient, network.net.hospitals[pacs_index(network, H1)], 1,
                                    network.net.seed, image_size=256)[0]
        big = big_study(template, COUNT)
        await asyncio.to_thread(pacs.preload, [big])
        network.studies[H1].append(big)
        yield network


@pytest.fixture
def big(duo: Network) -> Iterator[GeneratedStudy]:
    """The 48-instance study; its PACS back to normal behaviour and the event log empty afterwards."""
    study = duo.studies[H1][-1]
    assert len(study.instances) == COUNT
    with LoggingPacs.lock:
        LoggingPacs.events.clear()
    yield study
    duo.pacs[pacs_index(duo, H1)].set_behaviour(PacsMisbehaviour())


def request_of(duo: Network, study: GeneratedStudy) -> RetrieveImagingDocumentSetRequest:
    return RetrieveImagingDocumentSetRequest((study_request(study, repo(duo, H1)),),
                                             (EXPLICIT_VR_LITTLE_ENDIAN,))


class Answer:
    """A streamed MTOM answer read with DUO's own incremental MIME reader, parts kept in memory (the
    test study is small), the moment each part completes logged."""

    def __init__(self, content_type: str) -> None:
        related = multipart_related(content_type)
        assert related is not None, content_type
        self.start = related.start
        self.parser = MtomParser(related, max_part_bytes=1 << 30)
        self.parts: list[tuple[str, bool, bytes]] = []  # (content id, is root, bytes), in wire order
        self._chunks: list[bytes] = []
        self._part: PartStart | None = None
        self.complete = False

    def feed(self, data: bytes | None) -> None:
        if data is None:
            self.parser.end()
        else:
            self.parser.feed(data)
        while not isinstance(event := self.parser.next_event(), NeedData):
            if isinstance(event, PartStart):
                self._part, self._chunks = event, []
            elif isinstance(event, PartData):
                self._chunks.append(event.data)
            elif isinstance(event, PartEnd):
                assert self._part is not None
                self.parts.append((self._part.content_id, self._part.is_root, b"".join(self._chunks)))
                if not self._part.is_root:
                    log("client-has-part", self._part.content_id)
            else:
                assert isinstance(event, MessageEnd)
                self.complete = True
                return

    def response(self, wsdl_dir: Path) -> RetrieveDocumentSetResponse:
        roots = [data for _cid, is_root, data in self.parts if is_root]
        assert len(roots) == 1
        env = parse_envelope(parse_xml(roots[0]))
        assert env.body is not None and env.addressing.action == Action.RAD75_RESPONSE
        attachments = {cid: data for cid, is_root, data in self.parts if not is_root}
        assert_valid(wsdl_dir, inline_documents(env.body, attachments))
        return parse_retrieve_response(env.body, attachments)


async def post_streamed(duo: Network, req: RetrieveImagingDocumentSetRequest, *,
                        stop_after_parts: int | None = None) -> tuple[Answer, str]:
    """The RAD-75 as MTOM, its answer read as it arrives; returns it and the assertion's ID."""
    assertion = duo.assertion()
    data, content_type = duo.message(duo.gateway.config.xca_responding.rad75_path, Action.RAD75,
                                     build_imaging_retrieve_request(req), assertion=assertion, mtom=True)
    async with duo.session.post(duo.url + duo.gateway.config.xca_responding.rad75_path, data=data,
                                headers={"Content-Type": content_type}) as r:
        assert r.status == 200
        assert r.headers.get("Transfer-Encoding", "").lower() == "chunked"
        answer = Answer(r.headers["Content-Type"])
        async for chunk in r.content.iter_any():
            answer.feed(chunk)
            if stop_after_parts is not None and len(answer.parts) >= stop_after_parts:
                r.close()  # the caller goes away mid-answer
                break
        else:
            answer.feed(None)
    return answer, str(assertion.get("ID"))


async def disclosed(duo: Network, assertion_id: str) -> tuple[set[str], list[str]]:
    """The instances the RAD-75 record(s) of this request name, and their outcomes."""
    records = await records_of(duo, assertion_id, "RAD-75")
    uids = {uid for root, _ in records for uid in root.xpath(
        "ParticipantObjectIdentification[ParticipantObjectDetail/@type='Repository Unique Id']"
        "/@ParticipantObjectID")}
    outcomes = [str(root.xpath("string(EventIdentification/@EventOutcomeIndicator)")) for root, _ in records]
    return uids, outcomes


def spool_high_water(duo: Network) -> float:
    metrics = duo.gateway.metrics.render().decode()
    line = next(line for line in metrics.splitlines()
                if line.startswith("duo_retrieve_spool_last_high_water_bytes") and "tlb:" + H1 in line)
    return float(line.rsplit(" ", 1)[1])


async def test_the_answer_streams_within_the_window_and_the_envelope_comes_last(
        duo: Network, big: GeneratedStudy, wsdl_dir: Path) -> None:
    answer, assertion_id = await post_streamed(duo, request_of(duo, big))
    assert answer.complete
    events = list(LoggingPacs.events)
    first_out = events.index(next(e for e in events if e[0] == "client-has-part"))
    last_fetched = max(i for i, e in enumerate(events) if e[0] == "pacs-sends")
    assert first_out < last_fetched, "the first instance reached the caller before the last was fetched"
    # The root is the part named by start, and it is the last one: status and errors come at the end.
    (last_cid, last_is_root, _) = answer.parts[-1]
    assert last_is_root and last_cid == answer.start and not any(r for _c, r, _d in answer.parts[:-1])
    resp = answer.response(wsdl_dir)
    assert resp.status == ResponseStatus.SUCCESS and not resp.errors
    stored = {str(ds.SOPInstanceUID): ds for ds in big.instances}
    assert sorted(d.document_unique_id for d in resp.documents) == sorted(stored)
    for doc in resp.documents:
        assert isinstance(doc.data, bytes) and doc.mime_type == MIME_DICOM
        assert dcmread(BytesIO(doc.data)).SOPInstanceUID == doc.document_unique_id
    # The spool never held more than its window, read from DUO's own metric; and it is empty now.
    high_water = spool_high_water(duo)
    assert 0 < high_water <= WINDOW
    assert not any(p.is_file() for p in duo.gateway.spool_dir.rglob("*"))
    uids, outcomes = await disclosed(duo, assertion_id)
    assert uids == set(stored) and outcomes == ["0"]


async def test_a_streamed_answer_holds_the_instances_in_memory_and_an_inline_one_spools_files(
        duo: Network, big: GeneratedStudy, wsdl_dir: Path) -> None:
    """Streamed, each instance goes out from memory (no spool file is ever made) within the budget
    and the window; an inline answer, which must have every instance before its first byte, keeps
    using files, so its memory does not grow with the study."""
    budget = duo.gateway.sources[H1].memory
    assert budget is not None
    spool_dir = duo.gateway.spool_dir

    async def sampled(call: Any) -> tuple[int, int]:
        peak_memory = peak_files = 0
        task = asyncio.ensure_future(call)
        while not task.done():
            peak_memory = max(peak_memory, budget.used)
            peak_files = max(peak_files, sum(1 for _ in spool_dir.rglob("*.dcm")))
            await asyncio.sleep(0.001)
        await task
        return peak_memory, peak_files

    memory, files = await sampled(post_streamed(duo, request_of(duo, big)))
    assert files == 0
    assert 0 < memory <= WINDOW * 5 // 4  # the window bounds the bytes; a reservation may round up
    assert budget.used == 0
    memory, files = await sampled(rad75(duo, request_of(duo, big), wsdl_dir, mtom=False))
    assert memory == 0 and files > 0
    assert budget.used == 0


async def test_a_pacs_failing_mid_study_ends_the_answer_with_the_standard_error_and_audits_what_went_out(
        duo: Network, big: GeneratedStudy, wsdl_dir: Path) -> None:
    duo.pacs[pacs_index(duo, H1)].set_behaviour(PacsMisbehaviour(abort_after_instances=5))
    answer, assertion_id = await post_streamed(duo, request_of(duo, big))
    assert answer.complete, "a PACS failure is told in the envelope, not by cutting the message"
    resp = answer.response(wsdl_dir)
    assert resp.status == ResponseStatus.PARTIAL_SUCCESS
    delivered = {d.document_unique_id for d in resp.documents}
    assert 1 <= len(delivered) <= 5
    assert {cid for cid, is_root, _ in answer.parts if not is_root} == {
        normalise_cid(inc.get("href", "")) for inc in _includes(answer)}, "every part sent is named"
    wanted = {str(ds.SOPInstanceUID) for ds in big.instances}
    assert {e.error_code for e in resp.errors} == {ErrorCode.REPOSITORY_ERROR}
    named = {e.code_context.split(":")[2] for e in resp.errors}
    assert named == wanted - delivered and len(resp.errors) == len(named), "each missing instance once"
    assert all(e.code_context.startswith(f"{big.study_instance_uid}:") for e in resp.errors)
    uids, outcomes = await disclosed(duo, assertion_id)
    assert uids == delivered and outcomes == ["4"]  # what went out, a minor failure


async def test_a_caller_that_goes_away_is_audited_with_what_it_was_sent(
        duo: Network, big: GeneratedStudy) -> None:
    answer, assertion_id = await post_streamed(duo, request_of(duo, big), stop_after_parts=2)
    received = {cid for cid, _r, _d in answer.parts}
    assert len(received) >= 2 and not answer.complete
    records = await records_of(duo, assertion_id, "RAD-75")
    assert len(records) == 1
    uids, outcomes = await disclosed(duo, assertion_id)
    # The caller got at least what it read; what DUO wrote into the socket after that is disclosed
    # too (the audit counts what left DUO), but never the whole study nor anything not sent.
    assert len(received) <= len(uids) < COUNT
    assert uids <= {str(ds.SOPInstanceUID) for ds in big.instances}
    assert outcomes == ["4"]
    why = str(records[0][0].xpath("string(EventIdentification/EventOutcomeDescription)"))
    assert "stopped reading" in why, why
    for _ in range(100):  # the fetch is stopped and the spool removed once the handler notices
        if not any(p.is_file() for p in duo.gateway.spool_dir.rglob("*")):
            break
        await asyncio.sleep(0.05)
    assert not any(p.is_file() for p in duo.gateway.spool_dir.rglob("*"))
    # DUO is fine afterwards: the same study again, whole.
    again, _ = await post_streamed(duo, request_of(duo, big))
    assert again.complete and len(again.parts) == COUNT + 1


async def test_duo_initiating_retriever_and_a_plain_multipart_reader_read_the_streamed_answer(
        duo: Network, big: GeneratedStudy, tmp_path: Path) -> None:
    cfg = duo.gateway.config.xca_responding
    community = XcaCommunity(home_community_id=HOME, name="DUO itself", iti38=duo.url + cfg.iti38_path,
                             iti39=duo.url + cfg.iti39_path, rad75=duo.url + cfg.rad75_path, retries=0)
    signer = CommunitySigner(community, issuer=XUA_ISSUER, signing=load_signing_pair(
        duo.pki.client.key, duo.pki.client.cert), keep=XuaConfig().reuse_assertions)
    retriever = CommunityRetriever(community, signer=signer, metrics=Metrics(), auditor=None,
                                   identity=duo.gateway.identity, spool_dir=tmp_path / "spool")
    series = str(big.instances[0].SeriesInstanceUID)
    wanted = [str(ds.SOPInstanceUID) for ds in big.instances][:12]
    stored = duo.pacs[pacs_index(duo, H1)].instance_paths(big.study_instance_uid)
    got: dict[str, bytes] = {}
    try:
        async for item in retriever.retrieve_images(
                CLAIMS, ALL, home_community_id=HOME, study_uid=big.study_instance_uid, series_uid=series,
                repository_unique_id=repo(duo, H1), sop_instance_uids=wanted,
                transfer_syntaxes=[EXPLICIT_VR_LITTLE_ENDIAN], deadline_s=30):
            assert not isinstance(item, PartFailure), item
            assert isinstance(item, RetrievedPart)
            got[item.sop_instance_uid] = item.path.read_bytes()
            item.path.unlink()
    finally:
        await retriever.close()
    assert sorted(got) == sorted(wanted)
    originals = {str(dcmread(p, stop_before_pixels=True).SOPInstanceUID): p.read_bytes() for p in stored}
    assert all(dataset_bytes(got[uid]) == dataset_bytes(originals[uid]) for uid in wanted)

    # A plain multipart reader (the standard library's MIME parser): the envelope is the part whose
    # Content-ID is the start parameter, each xop:Include names a part by Content-ID.
    reply = await duo.call(cfg.rad75_path, Action.RAD75, build_imaging_retrieve_request(
        request_of(duo, big)), mtom=True)
    message = email.message_from_bytes(
        f"Content-Type: {reply.content_type}\r\n\r\n".encode() + reply.raw, policy=email.policy.HTTP)
    parts = {normalise_cid(str(p["Content-ID"])): p for p in message.iter_parts()}
    related = multipart_related(reply.content_type)
    assert related is not None and related.start is not None
    envelope = parse_xml(parts.pop(related.start).get_payload(decode=True))
    includes = envelope.iter("{http://www.w3.org/2004/08/xop/include}Include")
    assert {normalise_cid(i.get("href", "")) for i in includes} == set(parts) and len(parts) == COUNT
    # ...and the whole-body reader every DUO test uses agrees.
    root, attachments = parse_mtom(reply.content_type, reply.raw, 1 << 30)
    assert etree.tostring(root) == etree.tostring(envelope) and set(attachments) == set(parts)


def _includes(answer: Answer) -> list[etree._Element]:
    root = next(data for _cid, is_root, data in answer.parts if is_root)
    return list(parse_xml(root).iter("{http://www.w3.org/2004/08/xop/include}Include"))
