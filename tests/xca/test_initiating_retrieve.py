"""DUO pulling a study from an XCA community for a transfer: ITI-39 KOS, parse_kos, RAD-75 batches.

The community is the real simulator on a loopback port, behind the recording middleware of
``tests.xca.recording`` (every request DUO sends is kept, XSD-validated and its XUA assertion checked).
"""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import aclosing
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import structlog
from aiohttp import web
from lxml import etree
from pydicom import dcmread

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.audit import AuditConfig
from duo_gateway.config.peers import XcaCommunity
from duo_gateway.config.xua import XuaConfig
from duo_gateway.dicom.kos import parse_kos
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sim.behaviour import XcaMisbehaviour
from duo_gateway.sim.config import SimNetworkConfig, default_network
from duo_gateway.sim.http import BEHAVIOUR_KEY
from duo_gateway.sim.pki import Pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.soap.envelope import Addressing, build_envelope, new_message_id, parse_envelope
from duo_gateway.soap.mtom import build_mtom, parse_mtom
from duo_gateway.xca.codes import EXPLICIT_VR_LITTLE_ENDIAN, Action, ErrorCode, ResponseStatus
from duo_gateway.xca.initiating.exchange import AnswerTooLarge, CommunitySigner, ExchangeFailed
from duo_gateway.xca.initiating.retriever import (
    CommunityRetriever,
    PartFailure,
    RetrievedPart,
    manifest_limit,
)
from duo_gateway.xca.metadata import KOS_FORMAT
from duo_gateway.xca.retrieve import (
    RetrievedDocument,
    RetrieveDocumentSetResponse,
    build_retrieve_response,
    parse_imaging_retrieve_request,
    parse_retrieve_request,
)
from duo_gateway.xmldsig import TrustStore, load_signing_pair
from duo_gateway.xua import validate_xua
from tests.xca.recording import BSN, CLAIMS, DUO_HOME, IDENTITY, Community, Recorder, serve
from tests.xca.xsd import assert_valid

TS = (EXPLICIT_VR_LITTLE_ENDIAN,)


@pytest.fixture(scope="module")
def net() -> SimNetworkConfig:
    return default_network()


def _config(c: Community, **kw: Any) -> XcaCommunity:
    return c.config(**{"rad75": f"{c.url}/rad75", "retries": 1, "rad75_batch_size": 3, **kw})


@dataclass
class Retrievers:
    pki: Pki
    spool: Path
    made: list[CommunityRetriever] = field(default_factory=list)

    def __call__(self, cfg: XcaCommunity, *, signed: bool = True, auditor: Auditor | None = None,
                 rng: random.Random | None = None) -> CommunityRetriever:
        signing = load_signing_pair(self.pki.client.key, self.pki.client.cert) if signed else None
        signer = CommunitySigner(cfg, issuer=DUO_HOME, signing=signing, keep=XuaConfig().reuse_assertions)
        r = CommunityRetriever(cfg, signer=signer, metrics=Metrics(), auditor=auditor, identity=IDENTITY,
                               spool_dir=self.spool, rng=rng)
        self.made.append(r)
        return r


@pytest.fixture
async def retrievers(rsa_pki: Pki, tmp_path: Path) -> AsyncIterator[Retrievers]:
    made = Retrievers(rsa_pki, tmp_path / "spool")
    yield made
    for r in made.made:
        await r.close()


def _files(directory: Path) -> list[Path]:
    return sorted(directory.iterdir()) if directory.exists() else []


def _kos_doc(sim: XcaCommunitySimulator) -> tuple[str, str]:
    doc = next(d for d in sim.documents if d.bsn == BSN and d.entry.format_code == KOS_FORMAT)
    assert doc.entry.repository_unique_id is not None
    return doc.entry.repository_unique_id, doc.entry.unique_id


Items = AsyncGenerator[RetrievedPart | PartFailure, None]


class _Longest(random.Random):
    """Jitter that always picks the longest backoff allowed, so a test knows how long a retry waits."""

    def uniform(self, a: float, b: float) -> float:
        return b


async def _collect(it: Items) -> tuple[list[RetrievedPart], list[PartFailure]]:
    parts: list[RetrievedPart] = []
    failures: list[PartFailure] = []
    async with aclosing(it):
        async for item in it:
            if isinstance(item, RetrievedPart):
                parts.append(item)
            else:
                failures.append(item)
    return parts, failures


def _images(r: CommunityRetriever, sim: XcaCommunitySimulator, study: str, series: str, repo: str,
            uids: Sequence[str], deadline_s: float = 10.0) -> Items:
    return r.retrieve_images(CLAIMS, BSN, home_community_id=sim.home, study_uid=study, series_uid=series,
                             repository_unique_id=repo, sop_instance_uids=uids, transfer_syntaxes=TS,
                             deadline_s=deadline_s)


def _check_requests(c: Community, rsa_pki: Pki, wsdl_dir: Path) -> None:
    trust = TrustStore.from_pem_files([rsa_pki.client.cert], pinned=True)
    for env in c.recorder.envelopes():
        assert env.body is not None
        assert_valid(wsdl_dir, env.body)
        requester = validate_xua(env, XuaConfig(), issuer=DUO_HOME, trusted=trust,
                                 audiences=[c.home], now=datetime.now(UTC))
        assert requester is not None and requester.patient_bsn == BSN and requester.uzi == CLAIMS.uzi


# --- the whole path ---------------------------------------------------------------------------------


async def test_kos_then_every_series_in_batches(community: Community, sim: XcaCommunitySimulator,
                                               retrievers: Retrievers, rsa_pki: Pki, wsdl_dir: Path) -> None:
    cfg = _config(community)
    r = retrievers(cfg)
    repo, kos_uid = _kos_doc(sim)
    data = await r.retrieve_document(CLAIMS, BSN, home_community_id=sim.home, repository_unique_id=repo,
                                     document_unique_id=kos_uid, deadline_s=10)
    manifest = parse_kos(data)
    assert manifest.sop_instance_uid == kos_uid and manifest.patient_id == BSN
    requested = 0
    for series in manifest.series:
        assert series.retrieve_location_uid == sim.repository_unique_id
        uids = series.sop_instance_uids
        for i in range(0, len(uids), cfg.rad75_batch_size):
            batch = uids[i:i + cfg.rad75_batch_size]
            requested += 1
            parts, failures = await _collect(_images(r, sim, manifest.study_instance_uid,
                                                     series.series_instance_uid,
                                                     series.retrieve_location_uid, batch))
            assert failures == []
            assert sorted(p.sop_instance_uid for p in parts) == sorted(batch)
            for part in parts:
                assert part.mime_type == "application/dicom" and part.size == part.path.stat().st_size
                ds = dcmread(BytesIO(part.path.read_bytes()))  # a valid Part 10 file...
                assert str(ds.SOPInstanceUID) == part.sop_instance_uid  # ...of the instance asked for
                assert str(ds.SeriesInstanceUID) == series.series_instance_uid
                part.path.unlink()  # the consumer's job
    assert requested >= 2 and _files(retrievers.spool) == []
    envs = community.recorder.envelopes()
    assert [e.addressing.action for e in envs] == [Action.ITI39] + [Action.RAD75] * requested
    # RAD-75 goes as MTOM, so a gateway answering in kind streams its images as MTOM parts.
    kinds = [t.split(";")[0] for t in community.recorder.content_types]
    assert kinds == ["application/soap+xml"] + ["multipart/related"] * requested
    assert all(f'action="{Action.RAD75}"' in t for t in community.recorder.content_types[1:])
    # One requester, one patient, one community: every request carries the same (reused) assertion.
    saml = "{urn:oasis:names:tc:SAML:2.0:assertion}Assertion"
    assert len({a.get("ID") for e in envs for a in e.headers[-1].iter(saml)}) == 1
    assert envs[0].body is not None
    assert parse_retrieve_request(envs[0].body).documents[0].home == sim.home
    for env in envs[1:]:
        assert env.body is not None
        req = parse_imaging_retrieve_request(env.body)
        assert len(req.instances()) <= cfg.rad75_batch_size and req.transfer_syntaxes == TS
    _check_requests(community, rsa_pki, wsdl_dir)


async def test_partial_success_gives_parts_and_a_failure_per_unknown_uid(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers, tmp_path: Path) -> None:
    study = next(g for p, _, g in sim.studies if p.bsn == BSN)
    ds = study.instances[0]
    series = str(ds.SeriesInstanceUID)
    known = [str(d.SOPInstanceUID) for d in study.instances if str(d.SeriesInstanceUID) == series][:2]
    unknown = f"{series}.999999"
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path / "audit-store")
    await auditor.start()
    r = retrievers(_config(community), auditor=auditor)
    parts, failures = await _collect(_images(r, sim, study.study_instance_uid, series,
                                             sim.repository_unique_id, [known[0], unknown, *known[1:]]))
    await auditor.stop()
    assert sorted(p.sop_instance_uid for p in parts) == sorted(known)
    assert [(f.sop_instance_uid, f.retryable) for f in failures] == [(unknown, False)]
    assert ErrorCode.DOCUMENT_UNIQUE_ID_ERROR in failures[0].detail
    for part in parts:
        part.path.unlink()

    records = parse_file_records((tmp_path / "audit-store" / "audit" / "audit.log").read_bytes()).records
    roots = [etree.fromstring(parse_message(rec).msg) for rec in records]
    outcomes = sorted(str(root.xpath("string(EventIdentification/@EventOutcomeIndicator)")) for root in roots)
    assert outcomes == ["0", "4"]  # one Success record, one with the failed instance
    for root in roots:
        assert root.find("EventIdentification/EventID[@csd-code='110104']") is not None
        assert root.find("EventIdentification/EventTypeCode[@csd-code='RAD-75']") is not None
        patient = root.find("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
        assert patient is not None and patient.get("ParticipantObjectID") == bsn_cx(BSN)
        ids = {o.get("ParticipantObjectID") for o in root.iter("ParticipantObjectIdentification")}
        assert study.study_instance_uid in ids


async def test_a_retried_rad75_stopped_during_its_backoff_is_audited_once(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers, tmp_path: Path) -> None:
    """The first attempt (a 503) is recorded before the retry; stopping the download while the retry
    waits sends nothing more, so no second record may claim a disclosure that never happened."""
    study = next(g for p, _, g in sim.studies if p.bsn == BSN)
    ds = study.instances[0]
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path / "audit-store")
    await auditor.start()
    # Full jitter at its upper bound: the retry waits exactly 5 s, well inside the 10 s deadline.
    r = retrievers(_config(community, retry_backoff_s=5.0), auditor=auditor, rng=_Longest())
    community.recorder.status_first = 1
    consumer = asyncio.create_task(_collect(_images(
        r, sim, study.study_instance_uid, str(ds.SeriesInstanceUID), sim.repository_unique_id,
        [str(ds.SOPInstanceUID)])))
    for _ in range(200):
        if community.recorder.bodies and community.recorder.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)  # the 503 is in; the retry now sleeps its backoff
    consumer.cancel()
    with pytest.raises(asyncio.CancelledError):
        await consumer
    await auditor.stop()
    assert len(community.recorder.bodies) == 1
    records = parse_file_records((tmp_path / "audit-store" / "audit" / "audit.log").read_bytes()).records
    roots = [etree.fromstring(parse_message(rec).msg) for rec in records]
    assert [str(root.xpath("string(EventIdentification/EventTypeCode/@csd-code)")) for root in roots] == [
        "RAD-75"]
    assert "retried" in str(roots[0].xpath("string(EventIdentification/EventOutcomeDescription)"))


async def test_unknown_kos_is_a_failed_retrieve_with_the_registry_error(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers) -> None:
    r = retrievers(_config(community))
    with pytest.raises(ExchangeFailed) as info:
        await r.retrieve_document(CLAIMS, BSN, home_community_id=sim.home,
                                  repository_unique_id=sim.repository_unique_id,
                                  document_unique_id="1.2.3.4.5.6.7", deadline_s=5)
    assert (info.value.kind, info.value.retryable) == ("error", False)
    assert [e.error_code for e in info.value.errors] == [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR]


# --- a misbehaving community ------------------------------------------------------------------------


@pytest.mark.parametrize(("behaviour", "kind", "retryable"), [
    ({"fault": True}, "error", False),
    ({"malformed": True}, "error", False),
    ({"down": True}, "unavailable", True),
    ({"delay_ms": 3000}, "timeout", True),
])
async def test_misbehaving_community_is_a_retrieve_failed(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers,
        behaviour: dict[str, Any], kind: str, retryable: bool) -> None:
    community.behave(**behaviour)
    r = retrievers(_config(community))
    repo, kos_uid = _kos_doc(sim)
    with structlog.testing.capture_logs() as logs:
        with pytest.raises(ExchangeFailed) as doc_info:
            await r.retrieve_document(CLAIMS, BSN, home_community_id=sim.home, repository_unique_id=repo,
                                      document_unique_id=kos_uid, deadline_s=1.0)
        study = next(g for p, _, g in sim.studies if p.bsn == BSN)
        ds = study.instances[0]
        with pytest.raises(ExchangeFailed) as img_info:
            await _collect(_images(r, sim, study.study_instance_uid, str(ds.SeriesInstanceUID), repo,
                                   [str(ds.SOPInstanceUID)], deadline_s=1.0))
    for info in (doc_info, img_info):
        assert (info.value.kind, info.value.retryable) == (kind, retryable), info.value
    assert BSN not in repr(logs)
    assert _files(retrievers.spool) == []


async def test_without_rad75_endpoint_or_signing_pair_nothing_is_sent(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers) -> None:
    no_rad75 = retrievers(_config(community, rad75=None))
    with pytest.raises(ExchangeFailed, match="no RAD-75 endpoint"):
        await _collect(_images(no_rad75, sim, "1.2", "1.2.3", sim.repository_unique_id, ["1.2.3.4"]))
    unsigned = retrievers(_config(community), signed=False)
    with pytest.raises(ExchangeFailed, match="signing key"):
        await _collect(_images(unsigned, sim, "1.2", "1.2.3", sim.repository_unique_id, ["1.2.3.4"]))
    assert community.recorder.bodies == []


async def test_stopping_early_leaves_only_the_files_handed_over(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers) -> None:
    study = next(g for p, _, g in sim.studies if p.bsn == BSN)
    series = str(study.instances[0].SeriesInstanceUID)
    uids = [str(d.SOPInstanceUID) for d in study.instances if str(d.SeriesInstanceUID) == series]
    assert len(uids) >= 2
    r = retrievers(_config(community))
    async with aclosing(_images(r, sim, study.study_instance_uid, series, sim.repository_unique_id,
                                uids)) as it:
        first = await anext(it)
    assert isinstance(first, RetrievedPart)
    assert _files(retrievers.spool) == [first.path]
    parse_envelope(community.recorder.bodies[-1])  # the request went out whole


# --- an answer about another document ---------------------------------------------------------------


@pytest.mark.parametrize("field", ["repository", "home"])
async def test_a_document_answered_from_another_repository_or_home_is_not_taken(
        sim: XcaCommunitySimulator, retrievers: Retrievers, field: str) -> None:
    """ITI-43 answers echo the RepositoryUniqueId and HomeCommunityId asked for (NIST 12308/15809 assert
    both): the same DocumentUniqueId under another repository or community is another document."""
    wrong = "1.2.3.4.999"

    async def iti39(request: web.Request) -> web.StreamResponse:
        root, _ = parse_mtom(request.headers["Content-Type"], await request.read())
        env = parse_envelope(root)
        assert env.body is not None
        [asked] = parse_retrieve_request(env.body).documents
        doc = RetrievedDocument(wrong if field == "repository" else asked.repository_unique_id,
                                asked.document_unique_id, "application/dicom", b"not the document",
                                wrong if field == "home" else asked.home)
        body, attachments = build_retrieve_response(
            RetrieveDocumentSetResponse(ResponseStatus.SUCCESS, (doc,), ()), mtom=True)
        envelope = build_envelope(Addressing(action=Action.ITI39_RESPONSE, message_id=new_message_id(),
                                             relates_to=env.addressing.message_id), body)
        content_type, payload = build_mtom(envelope, attachments, Action.ITI39_RESPONSE)
        return web.Response(body=b"".join(payload), headers={"Content-Type": content_type})

    app = web.Application()
    app.router.add_post("/iti39", iti39)
    server = await serve(app)
    try:
        c = Community(str(server.make_url("")).rstrip("/"), app, Recorder(), sim.home)
        r = retrievers(_config(c))
        with pytest.raises(ExchangeFailed) as info:
            await r.retrieve_document(CLAIMS, BSN, home_community_id=sim.home,
                                      repository_unique_id=sim.repository_unique_id,
                                      document_unique_id="1.2.3.4.5.6.7", deadline_s=5)
        assert "without the document" in info.value.detail
    finally:
        await server.close()


# --- the manifest limit (issue 14) ------------------------------------------------------------------


async def test_a_manifest_over_the_limit_is_refused_naming_the_setting(
        community: Community, sim: XcaCommunitySimulator, retrievers: Retrievers) -> None:
    """Under the HTTP body bound (which leaves room for base64) but over the manifest limit: the MTOM
    part is refused as it passes the limit, and the detail names the key to raise."""
    community.app[BEHAVIOUR_KEY].value = XcaMisbehaviour(oversized_manifest_bytes=200_000)
    r = retrievers(_config(community, iti39_max_manifest_bytes=65_536))
    repo, kos_uid = _kos_doc(sim)
    with pytest.raises(AnswerTooLarge) as info:
        await r.retrieve_document(CLAIMS, BSN, home_community_id=sim.home, repository_unique_id=repo,
                                  document_unique_id=kos_uid, deadline_s=5)
    assert (info.value.kind, info.value.retryable) == ("error", False)
    assert info.value.detail.startswith("manifest over the size limit (MIME part exceeds the limit of 65536")
    assert info.value.detail.endswith("the limit is xca_communities.iti39_max_manifest_bytes = 65536 bytes")
    assert len(community.recorder.bodies) == 1  # the same request would bring the same answer


async def test_reading_an_unannounced_oversized_answer_stops_at_the_limit(retrievers: Retrievers) -> None:
    """A chunked answer without Content-Length that would run to 256 MiB: DUO stops reading at its
    bound (the manifest limit plus room for base64 and the envelope) and hangs up; what the peer got
    onto the wire before that is the bound plus the loopback socket buffers, far from the whole."""
    written = 0

    async def endless(request: web.Request) -> web.StreamResponse:
        nonlocal written
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "application/soap+xml"})
        await response.prepare(request)
        chunk = b"<x>" + b"A" * (64 * 1024 - 7) + b"</x>"
        try:
            while written < 256 * 1024 * 1024:
                await response.write(chunk)
                written += len(chunk)
        except ConnectionError:
            pass
        return response

    app = web.Application()
    app.router.add_post("/iti39", endless)
    server = await serve(app)
    try:
        url = f"http://127.0.0.1:{server.port}"
        cfg = XcaCommunity.model_validate({"home_community_id": "urn:oid:1.2.3.4", "name": "Endless",
                                           "iti38": f"{url}/iti38", "iti39": f"{url}/iti39",
                                           "iti39_max_manifest_bytes": 65_536, "retries": 0})
        r = retrievers(cfg)
        with pytest.raises(AnswerTooLarge) as info:
            await r.retrieve_document(CLAIMS, BSN, home_community_id=cfg.home_community_id,
                                      repository_unique_id="1.2.3", document_unique_id="1.2.3.4",
                                      deadline_s=10)
        bound = manifest_limit(cfg).body_bytes
        assert f"more than {bound} bytes" in info.value.detail
        assert "xca_communities.iti39_max_manifest_bytes = 65536 bytes" in info.value.detail
        await asyncio.sleep(0.2)  # the peer notices the hang-up
        assert written < 32 * 1024 * 1024, written
    finally:
        await server.close()
