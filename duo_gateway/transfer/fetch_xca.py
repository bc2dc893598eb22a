"""A study in an XCA community: its KOS manifest by ITI-39, then its images by RAD-75, per series.

The manifest is the community's statement of what the study holds, so it is also what the transfer
is verified against. Batches stay inside one series (RAD-75 groups by study and series anyway, and a
series is where a PACS behind the community keeps its instances together) and are as large as the
community's ``rad75_batch_size``: one request per instance would pay a round trip each, one request
per study would make one slow instance hold up the rest and one failure lose them all.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator, Sequence
from contextlib import aclosing
from typing import Final

from duo_gateway.config.peers import XcaCommunity
from duo_gateway.dicom.kos import parse_kos
from duo_gateway.dicom.syntaxes import PREFERRED
from duo_gateway.timeline.model import StudyRef
from duo_gateway.transfer.fetch import Fetched, FetchFailed, Missed
from duo_gateway.transfer.jobstore import ExpectedInstance
from duo_gateway.xca.initiating.exchange import ExchangeFailed
from duo_gateway.xca.initiating.retriever import CommunityRetriever, PartFailure, RetrievedPart
from duo_gateway.xua import Claims

#: The lossless compressed syntaxes first, then uncompressed little endian, lossy last
#: (dicom/syntaxes.py says why in that order): a community that serves what it stores (RAD-69 lets an
#: Imaging Document Source answer in any listed syntax; NIST iig_2018-5402b expects the stored one when
#: it is listed) is never made to fail an instance it holds compressed, nor to decompress it. Asking
#: uncompressed only failed exactly those communities whose archive has no decoder for what it stores.
TRANSFER_SYNTAXES: Final = PREFERRED


class XcaStudyFetcher:
    def __init__(self, *, community: XcaCommunity, retriever: CommunityRetriever, claims: Claims, bsn: str,
                 ref: StudyRef) -> None:
        self.source = f"xca:{community.home_community_id}"
        self._community = community
        self._retriever = retriever
        self._claims = claims
        self._bsn = bsn
        self._ref = ref
        #: Series UID -> the repository its instances are retrieved from (the KOS says, per series).
        self._repositories: dict[str, str] = {}

    async def manifest(self) -> list[ExpectedInstance]:
        ref = self._ref
        if ref.document_unique_id is None or ref.repository_unique_id is None:
            raise FetchFailed("error", f"{self.source} holds only a report of this study, no image manifest",
                              retryable=False)
        try:
            data = await self._retriever.retrieve_document(
                self._claims, self._bsn, home_community_id=ref.home_community_id,
                repository_unique_id=ref.repository_unique_id, document_unique_id=ref.document_unique_id,
                deadline_s=self._community.timeout_s)
        except ExchangeFailed as exc:
            raise FetchFailed(exc.kind, f"{self.source} ITI-39 of the manifest: {exc.detail}",
                              retryable=exc.retryable) from exc
        try:
            kos = await asyncio.to_thread(parse_kos, data)  # a manifest may be megabytes of DICOM
        except ValueError as exc:
            raise FetchFailed("error", f"{self.source} returned a manifest DUO cannot read: {exc}",
                              retryable=False) from exc
        if kos.study_instance_uid != ref.study_uid:
            raise FetchFailed("error", f"{self.source} returned the manifest of another study",
                              retryable=False)
        expected: list[ExpectedInstance] = []
        for series in kos.series:
            self._repositories[series.series_instance_uid] = (
                series.retrieve_location_uid or ref.repository_unique_id)
            expected.extend(ExpectedInstance(uid, series.series_instance_uid, sop_class)
                            for sop_class, uid in series.instances)
        if not expected:
            raise FetchFailed("error", f"{self.source} returned a manifest that references no instances",
                              retryable=False)
        return expected

    async def fetch(self, wanted: Sequence[ExpectedInstance], *,
                    in_memory: bool = False) -> AsyncGenerator[Fetched | Missed, None]:
        # RAD-75 answers arrive as MTOM parts spooled by the retriever: files, whatever ``in_memory``.
        by_series: dict[str, list[str]] = {}
        for w in wanted:
            by_series.setdefault(w.series_instance_uid, []).append(w.sop_instance_uid)
        size = self._community.rad75_batch_size
        for series_uid, uids in by_series.items():
            repository = self._repositories[series_uid]  # every manifest series has one (see manifest)
            for start in range(0, len(uids), size):
                batch = uids[start:start + size]
                seen: set[str] = set()
                try:
                    async with aclosing(self._retriever.retrieve_images(
                            self._claims, self._bsn, home_community_id=self._ref.home_community_id,
                            study_uid=self._ref.study_uid, series_uid=series_uid,
                            repository_unique_id=repository, sop_instance_uids=batch,
                            transfer_syntaxes=TRANSFER_SYNTAXES,
                            deadline_s=self._community.timeout_s)) as stream:
                        async for item in stream:
                            if isinstance(item, RetrievedPart):
                                seen.add(item.sop_instance_uid)
                                yield Fetched(item.sop_instance_uid, item.path, item.size)
                            elif isinstance(item, PartFailure):
                                seen.add(item.sop_instance_uid)
                                yield Missed(item.sop_instance_uid, f"{self.source}: {item.detail}",
                                             item.retryable)
                except ExchangeFailed as exc:
                    # Nothing usable came (the retriever yields a PartFailure per instance otherwise).
                    for uid in batch:
                        if uid not in seen:
                            yield Missed(uid, f"{self.source} RAD-75: {exc.detail}", exc.retryable)


__all__ = ["TRANSFER_SYNTAXES", "XcaStudyFetcher"]
