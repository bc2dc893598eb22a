"""A transfer of a study in compressed syntaxes into a PACS that accepts only uncompressed data.

JobRunner with its real StoreClient and a DCMTK storescp in its default configuration (uncompressed
only); the source is a small StudyFetcher over files made in the test (the sources' own compressed
serving is tested with them). What must hold: lossless instances arrive decompressed, the lossy one
and the corrupt one are refused without a retry, each with its reason in the job's status (and "not
sent", since no destination answered them), the siblings are stored, the study ends partial.
"""

from __future__ import annotations

import asyncio
import dataclasses
import os
import random
import shutil
from collections.abc import AsyncGenerator, Sequence
from pathlib import Path

import numpy as np
from prometheus_client import CollectorRegistry
from pydicom import dcmread
from pydicom.pixels import pixel_array
from pydicom.uid import (
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
    generate_uid,
)

from duo_gateway.audit.messages import Peer
from duo_gateway.consent import ConsentGate
from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.transfer.fetch import Fetched, Missed, StudyFetcher
from duo_gateway.transfer.jobstore import ExpectedInstance, NewJob, TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.runner import JobRunner
from duo_gateway.xua import Claims
from tests.support.compressed import Made, encode, native, truncated
from tests.support.fakes import BSN, CLAIMS, HOME, FakeMitz, RecordingAuditor, hospital, unit_config
from tests.support.storescp import run_storescp

OWNER = "duo-a:1"
REF = StudyRef("tlb", "1.2.7.9", HOME, repository_unique_id=str(hospital(1)["repository_unique_id"]),
               hospital_ura=str(hospital(1)["ura"]))


@dataclasses.dataclass
class FileSource:
    """A study's source handing over copies of files on disk, as a fetcher's spool would."""

    files: list[Made]
    spool: Path
    series: str
    source: str = "tlb:files"
    fetches: int = 0

    async def manifest(self) -> list[ExpectedInstance]:
        return [ExpectedInstance(m.sop_instance_uid, self.series, m.sop_class_uid) for m in self.files]

    async def fetch(self, wanted: Sequence[ExpectedInstance], *,
                    in_memory: bool = False) -> AsyncGenerator[Fetched | Missed, None]:
        self.fetches += 1
        asked = {w.sop_instance_uid for w in wanted}
        for m in self.files:
            if m.sop_instance_uid in asked:
                path = self.spool / f"{m.sop_instance_uid}-{self.fetches}.dcm"
                await asyncio.to_thread(shutil.copyfile, m.path, path)
                yield Fetched(m.sop_instance_uid, path, path.stat().st_size, sop_class_uid=m.sop_class_uid,
                              transfer_syntax_uid=m.transfer_syntax_uid)


async def test_compressed_study_into_an_uncompressed_only_pacs(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    made = tmp_path / "made"
    j2k = [encode(native("CT_small.dcm", study_uid=study, series_uid=series), JPEG2000Lossless,
                  made / f"j2k-{n}.dcm") for n in range(3)]
    jls = encode(native("CT_small.dcm", study_uid=study, series_uid=series), JPEGLSLossless, made / "jls.dcm")
    lossy = encode(native("SC_rgb_rle_2frame.dcm", study_uid=study, series_uid=series), JPEGBaseline8Bit,
                   made / "lossy.dcm")
    corrupt = truncated(j2k[0], made / "corrupt.dcm", keep=4000)
    spool = tmp_path / "spool"
    spool.mkdir()
    source = FileSource([j2k[0], lossy, corrupt, j2k[1], jls, j2k[2]], spool, series)

    store = TransferStore.open(None, tmp_path)
    await store.start()
    try:
        with run_storescp(tmp_path / "scp", ae_title="PLAIN") as scp:
            config = unit_config(tmp_path, transfers={
                "destinations": [{"name": "home-pacs", "ae_title": scp.ae_title, "host": scp.host,
                                  "port": scp.port, "uras": [CLAIMS.ura], "max_associations": 1,
                                  "timeout_s": 10}],
                "retries": 2, "retry_backoff_s": 0.001})
            ids = StudyIds(os.urandom(32))

            def fetchers(ref: StudyRef, bsn: str, claims: Claims) -> StudyFetcher:
                return source

            runner = JobRunner(config, store=store, owner=OWNER, study_ids=ids,
                               gate=ConsentGate(FakeMitz(default="Deny"), categories=config.mitz.categories),
                               sources={}, retrievers={}, metrics=TransferMetrics(CollectorRegistry()),
                               changed=lambda: None, auditor=RecordingAuditor(tmp_path),
                               identity=Peer(user_id="DUO"), rng=random.Random(7), fetchers=fetchers)
            await store.create(NewJob(requester=dataclasses.asdict(CLAIMS), destination={"name": "home-pacs"},
                                      studies=(ids.seal([REF], BSN, ura=CLAIMS.ura),), client="tlb-viewer",
                                      client_ura=CLAIMS.ura))
            job = await store.claim(OWNER, 30.0)
            assert job is not None
            done = await runner.run(job)
            received = scp.received()
            files = {p.name: p for p in scp.directory.iterdir() if p.is_file()}
        rows = {r.sop_instance_uid: r for r in await store.instances(job.id, 0)}
    finally:
        await store.close()

    assert done.state == "partial" and done.studies[0].state == "partial"
    stored = [*j2k, jls]
    assert set(received) == {m.sop_instance_uid for m in stored} and set(received.values()) == {1}
    assert source.fetches == 1, "a refused instance is not worth another pass"
    for m in stored:
        assert rows[m.sop_instance_uid].state == "stored"
    assert rows[lossy.sop_instance_uid].attempts == rows[corrupt.sop_instance_uid].attempts == 1
    why_lossy = rows[lossy.sop_instance_uid].error or ""
    why_corrupt = rows[corrupt.sop_instance_uid].error or ""
    assert why_lossy.startswith("not sent: ") and "lossy" in why_lossy, why_lossy
    assert why_corrupt.startswith("not sent: ") and "could not decompress" in why_corrupt, why_corrupt
    detail = done.studies[0].detail or ""
    assert "2 of 6 instances missing" in detail and "lossy" in detail and "could not decompress" in detail
    # what arrived is uncompressed and pixel for pixel the original (all four are copies of one CT)
    for path in files.values():
        assert dcmread(path, stop_before_pixels=True).file_meta.TransferSyntaxUID == ExplicitVRLittleEndian
        assert np.array_equal(pixel_array(path, raw=True), j2k[0].pixels)
    assert list(spool.iterdir()) == [], "relayed and refused files alike leave the spool"
