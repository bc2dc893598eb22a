"""A study's KOS as a stable document assembled on first retrieve (Delayed Assembly), piece by piece.

The names (``kos_generation``, ``study_kos_unique_id``), the index's records of an assembly and of a
study's revision, and the responding service's rule that one uniqueId only ever delivers one byte
sequence, driven against fakes of the ports (no sockets); the end-to-end view through SOAP and a
simulated PACS, image added between two retrieves, is NIST 15829 in tests/conformance/test_rg.py.
"""

from __future__ import annotations

import hashlib
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime, timedelta
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from pydicom import dcmread

from duo_gateway.audit.messages import Peer
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.xca import DocumentCodes
from duo_gateway.consent import ConsentGate
from duo_gateway.dicom.kos import kos_series_instance_uid
from duo_gateway.sources.base import InstanceRecord, StudyRecord
from duo_gateway.xca.codes import KOS_SOP_CLASS, MIME_DICOM, ErrorCode, ResponseStatus
from duo_gateway.xca.docindex import DocumentIndex, IndexedDocument
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.metadata import (
    kos_for_study,
    kos_generation,
    kos_unique_id,
    study_entry,
    study_kos_unique_id,
)
from duo_gateway.xca.query import find_documents
from duo_gateway.xca.responding.service import CallContext, RespondingGateway
from duo_gateway.xca.retrieve import DocumentRequest, RetrieveDocumentSetRequest, RetrieveDocumentSetResponse
from duo_gateway.xua import Requester
from tests.support.fakes import (
    BSN,
    CLAIMS,
    HOME,
    FakeMitz,
    FakeSource,
    RecordingAuditor,
    hospital,
    unit_config,
)
from tests.support.nosockets import no_sockets  # noqa: F401 - the fixture, used by name below

pytestmark = pytest.mark.usefixtures("no_sockets")

URA, REPO = str(hospital(1)["ura"]), str(hospital(1)["repository_unique_id"])
CT = "1.2.840.10008.5.1.4.1.1.2"
STUDY_UID = "1.2.826.0.1.3680043.8.498.4242"
WHERE: dict[str, Any] = {"bsn": BSN, "hospital_ura": URA, "hospital_name": "Ziekenhuis 1",
                         "repository_unique_id": REPO, "home": HOME}


def image(n: int, series: int = 1) -> InstanceRecord:
    return InstanceRecord(STUDY_UID, f"{STUDY_UID}.{series}", CT, f"{STUDY_UID}.{series}.{n}", "CT")


def study(*, counted: bool) -> StudyRecord:
    """The study; ``counted``: the PACS returns NumberOfStudyRelatedInstances/-Series (as most do)."""
    base = StudyRecord(STUDY_UID, BSN, "20240301", "101500", modalities=("CT",), description="CT thorax")
    return replace(base, instance_count=2, series_count=1) if counted else base


# -- the names ----------------------------------------------------------------------------------


def test_the_generation_is_what_the_study_level_c_find_says_plus_the_revision() -> None:
    counted = study(counted=True)
    assert kos_generation(study(counted=False)) == ""
    assert kos_generation(counted) == "i2.s1"
    assert kos_generation(counted, revision=3) == "i2.s1.r3"
    with pytest.raises(ValueError):
        kos_generation(counted, revision=-1)
    # Without counts and never revised: the name DUO gave before generations existed (pinned there).
    assert study_kos_unique_id(study(counted=False), REPO) == kos_unique_id(STUDY_UID, REPO)
    names = {
        study_kos_unique_id(counted, REPO),
        study_kos_unique_id(replace(counted, instance_count=3), REPO),
        study_kos_unique_id(replace(counted, series_count=2), REPO),
        study_kos_unique_id(counted, REPO, revision=1),
        study_kos_unique_id(study(counted=False), REPO),
    }
    assert len(names) == 5, "every change of the study names another document"


def test_entry_and_manifest_agree_and_the_hash_appears_once_assembled() -> None:
    counted = study(counted=True)
    fresh = study_entry(counted, codes=DocumentCodes(), revision=2, **WHERE)
    assert fresh.unique_id == study_kos_unique_id(counted, REPO, 2)
    assert (fresh.hash, fresh.size) == (None, None)
    kos = kos_for_study(counted, [image(1), image(2)], bsn=BSN, repository_unique_id=REPO, revision=2)
    assert kos.SOPInstanceUID == fresh.unique_id
    known = study_entry(counted, codes=DocumentCodes(), revision=2, assembled=("ab" * 20, 1234), **WHERE)
    assert (known.hash, known.size) == ("ab" * 20, 1234)
    assert replace(known, hash=None, size=None) == fresh  # nothing else about the entry changes


def test_a_manifest_never_references_an_earlier_generation_of_itself() -> None:
    counted = study(counted=True)
    earlier = InstanceRecord(STUDY_UID, str(kos_series_instance_uid(STUDY_UID)), KOS_SOP_CLASS,
                             study_kos_unique_id(counted, REPO), "KO")
    kos = kos_for_study(replace(counted, instance_count=3), [image(1), image(2), earlier], bsn=BSN,
                        repository_unique_id=REPO)
    [evidence] = kos.CurrentRequestedProcedureEvidenceSequence
    referenced = {i.ReferencedSOPInstanceUID for s in evidence.ReferencedSeriesSequence
                  for i in s.ReferencedSOPSequence}
    assert referenced == {image(1).sop_instance_uid, image(2).sop_instance_uid}


# -- the index ----------------------------------------------------------------------------------


@pytest.fixture
async def index(tmp_path: Path) -> AsyncIterator[DocumentIndex]:
    idx = await DocumentIndex.open(tmp_path)
    try:
        yield idx
    finally:
        await idx.close()


def announced(unique_id: str) -> IndexedDocument:
    return IndexedDocument(unique_id, "kos", URA, REPO, STUDY_UID, None, MIME_DICOM)


async def test_the_first_assembly_is_recorded_and_kept(index: DocumentIndex) -> None:
    uid = study_kos_unique_id(study(counted=True), REPO)
    assert await index.record_assembly(uid, "a" * 40, 10) is None, "only announced documents are assembled"
    await index.record([announced(uid)])
    assert await index.record_assembly(uid, "a" * 40, 10) == ("a" * 40, 10)
    # First writer wins: a second, different assembly learns what the document is.
    assert await index.record_assembly(uid, "b" * 40, 11) == ("a" * 40, 10)
    await index.record([announced(uid)])  # announced again: the assembly stays
    got = await index.lookup(uid)
    assert got is not None and (got.hash, got.size) == ("a" * 40, 10)
    for digest, size in (("A" * 40, 1), ("a" * 39, 1), ("a" * 40, -1)):
        with pytest.raises(ValueError):
            await index.record_assembly(uid, digest, size)
    with pytest.raises(ValueError):
        IndexedDocument(uid, "kos", URA, REPO, STUDY_UID, None, MIME_DICOM, hash="a" * 40)


async def test_revisions_move_once_per_noticed_change(index: DocumentIndex) -> None:
    key = (STUDY_UID, REPO)
    assert await index.revisions([key]) == {}
    assert await index.bump_revision(*key, seen=0) == 1
    assert await index.bump_revision(*key, seen=0) == 1, "a second notice of the same change is no new one"
    assert await index.bump_revision(*key, seen=1) == 2
    assert await index.revisions([key, ("1.2.3", REPO)]) == {key: 2}
    assert await index.prune(timedelta(0)) == 0 and await index.revisions([key]) == {key: 2}
    with pytest.raises(ValueError):
        await index.revisions([(BSN, REPO)])  # a BSN is no UID: never stored, never looked up


async def test_an_index_of_schema_1_is_migrated_in_place(tmp_path: Path) -> None:
    uid = kos_unique_id(STUDY_UID, REPO)
    with sqlite3.connect(tmp_path / "documents.sqlite3") as conn:
        conn.execute("""CREATE TABLE documents (unique_id TEXT PRIMARY KEY, entry_uuid TEXT,
            kind TEXT NOT NULL CHECK (kind IN ('kos', 'report')), hospital_ura TEXT NOT NULL,
            repository_unique_id TEXT NOT NULL, study_uid TEXT NOT NULL, sop_instance_uid TEXT,
            mime_type TEXT NOT NULL, first_seen REAL NOT NULL, last_seen REAL NOT NULL) WITHOUT ROWID""")
        now = datetime.now(UTC).timestamp()
        conn.execute("INSERT INTO documents VALUES (?, NULL, 'kos', ?, ?, ?, NULL, ?, ?, ?)",
                     (uid, URA, REPO, STUDY_UID, MIME_DICOM, now, now))
        conn.execute("PRAGMA user_version=1")
    conn.close()
    idx = await DocumentIndex.open(tmp_path)
    try:
        got = await idx.lookup(uid)
        assert got is not None and got.study_uid == STUDY_UID and got.hash is None
        assert await idx.record_assembly(uid, "c" * 40, 5) == ("c" * 40, 5)
        assert await idx.bump_revision(STUDY_UID, REPO, seen=0) == 1
    finally:
        await idx.close()
    with sqlite3.connect(tmp_path / "documents.sqlite3") as conn:
        assert conn.execute("PRAGMA user_version").fetchone() == (2,)
    conn.close()


# -- the service ----------------------------------------------------------------------------------


class Rig:
    def __init__(self, tmp_path: Path, index: DocumentIndex, record: StudyRecord,
                 instances: list[InstanceRecord]) -> None:
        config = unit_config(tmp_path, hospitals=(1,), xca_responding={"hospital_deadline_s": 1.0})
        (tmp_path / "pacs").mkdir(exist_ok=True)
        (tmp_path / "spool").mkdir(exist_ok=True)
        self.source = FakeSource(URA, studies=[record], instances={STUDY_UID: instances},
                                 spool=tmp_path / "pacs")
        self.service = RespondingGateway(
            config, sources={URA: self.source}, gate=ConsentGate(FakeMitz({}, default="Permit"),
                                                                 categories=config.mitz.categories),
            index=index, auditor=RecordingAuditor(tmp_path), identity=Peer(user_id="DUO"),
            spool_dir=tmp_path / "spool")
        now = datetime.now(UTC)
        self.ctx = CallContext(
            Requester(uzi=CLAIMS.uzi, role=CLAIMS.role, ura=CLAIMS.ura, organisation_type="V6",
                      purpose="TREAT", issuer="urn:oid:2.16.528.1.1007.99.777", assertion_id="_a1",
                      issue_instant=now, not_on_or_after=now + timedelta(minutes=5), signer="CN=peer"),
            Peer(user_id="https://peer.example/reply", host="192.0.2.9"))

    def change(self, record: StudyRecord, instances: list[InstanceRecord]) -> None:
        """What the PACS holds from now on (an image acquired late, a correction)."""
        self.source.studies = [record]
        self.source.instances = {STUDY_UID: instances}

    async def kos_entry(self) -> DocumentEntry:
        answer = await self.service.query(find_documents(bsn_cx(BSN)), self.ctx)
        assert answer.status == ResponseStatus.SUCCESS
        [entry] = answer.entries
        return entry

    async def retrieve(self, unique_id: str) -> RetrieveDocumentSetResponse:
        return await self.service.retrieve(
            RetrieveDocumentSetRequest((DocumentRequest(REPO, unique_id, HOME),)), self.ctx)


def referenced(data: bytes | Path) -> set[str]:
    assert isinstance(data, bytes)
    [evidence] = dcmread(BytesIO(data)).CurrentRequestedProcedureEvidenceSequence
    return {str(i.ReferencedSOPInstanceUID) for s in evidence.ReferencedSeriesSequence
            for i in s.ReferencedSOPSequence}


async def test_a_kos_is_assembled_once_then_announced_with_its_hash_and_delivered_unchanged(
        tmp_path: Path, index: DocumentIndex) -> None:
    rig = Rig(tmp_path, index, study(counted=True), [image(1), image(2)])
    first = await rig.kos_entry()
    assert (first.hash, first.size) == (None, None), "not assembled yet: nothing to announce"

    got = await rig.retrieve(first.unique_id)
    assert got.status == ResponseStatus.SUCCESS
    [doc] = got.documents
    assert isinstance(doc.data, bytes)
    again = await rig.kos_entry()
    assert again.unique_id == first.unique_id
    assert (again.hash, again.size) == (hashlib.sha1(doc.data).hexdigest(), len(doc.data))
    [repeat] = (await rig.retrieve(first.unique_id)).documents
    assert repeat.data == doc.data


async def test_a_study_whose_counts_change_is_a_new_document(tmp_path: Path, index: DocumentIndex) -> None:
    rig = Rig(tmp_path, index, study(counted=True), [image(1), image(2)])
    old = await rig.kos_entry()
    await rig.retrieve(old.unique_id)
    rig.change(replace(study(counted=True), instance_count=3), [image(1), image(2), image(3)])

    new = await rig.kos_entry()
    assert new.unique_id != old.unique_id and new.entry_uuid != old.entry_uuid
    assert (new.hash, new.size) == (None, None)
    gone = await rig.retrieve(old.unique_id)
    assert (gone.status, [e.error_code for e in gone.errors]) == (
        ResponseStatus.FAILURE, [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR])
    [doc] = (await rig.retrieve(new.unique_id)).documents
    assert referenced(doc.data) == {image(n).sop_instance_uid for n in (1, 2, 3)}
    assert await index.revisions([(STUDY_UID, REPO)]) == {}, "the counts said it: no revision needed"


async def test_a_change_the_counts_do_not_show_is_caught_at_retrieve_and_starts_a_revision(
        tmp_path: Path, index: DocumentIndex) -> None:
    rig = Rig(tmp_path, index, study(counted=False), [image(1), image(2)])
    old = await rig.kos_entry()
    [first] = (await rig.retrieve(old.unique_id)).documents
    rig.change(study(counted=False), [image(1), image(3)])  # one image replaced by another

    refused = await rig.retrieve(old.unique_id)
    assert (refused.status, [e.error_code for e in refused.errors]) == (
        ResponseStatus.FAILURE, [ErrorCode.DOCUMENT_UNIQUE_ID_ERROR])
    assert await index.revisions([(STUDY_UID, REPO)]) == {(STUDY_UID, REPO): 1}
    stored = await index.lookup(old.unique_id)
    assert stored is not None and stored.hash == hashlib.sha1(first.data).hexdigest()  # type: ignore[arg-type]

    new = await rig.kos_entry()
    assert new.unique_id == study_kos_unique_id(study(counted=False), REPO, revision=1) != old.unique_id
    [doc] = (await rig.retrieve(new.unique_id)).documents
    assert referenced(doc.data) == {image(1).sop_instance_uid, image(3).sop_instance_uid}
    assert (await rig.retrieve(old.unique_id)).status == ResponseStatus.FAILURE, "never other bytes"
    assert await index.revisions([(STUDY_UID, REPO)]) == {(STUDY_UID, REPO): 1}, "one change, one revision"
