"""Which configured source serves a study reference, and the :class:`StudyFetcher` that fetches it.

One home for the rule, because transfers (into the requester's PACS) and views (to the viewer) fetch
the same studies from the same places behind the same consent: a TLB hospital's PACS asked only
within a Mitz Permit for that hospital, or an XCA community's retriever (consent being that
community's business, XUA telling it who asks). A reference whose hospital or community is no longer
configured is a LookupError saying which.
"""

from __future__ import annotations

from collections.abc import Mapping

from duo_gateway.config.loader import DuoConfig
from duo_gateway.config.peers import TlbHospital, XcaCommunity
from duo_gateway.consent import ConsentGate
from duo_gateway.sources.base import ImagingSource
from duo_gateway.timeline.model import StudyRef
from duo_gateway.transfer.fetch import StudyFetcher
from duo_gateway.transfer.fetch_tlb import TlbStudyFetcher
from duo_gateway.transfer.fetch_xca import XcaStudyFetcher
from duo_gateway.xca.initiating.retriever import CommunityRetriever
from duo_gateway.xua import Claims


class StudySources:
    def __init__(self, cfg: DuoConfig, *, gate: ConsentGate, sources: Mapping[str, ImagingSource],
                 retrievers: Mapping[str, CommunityRetriever]) -> None:
        self.cfg = cfg
        self._gate = gate
        self._sources = dict(sources)
        self._retrievers = dict(retrievers)

    def check(self, ref: StudyRef) -> None:
        """Raises LookupError unless DUO still knows the reference's source."""
        if ref.kind == "tlb":
            self.hospital(ref)
        else:
            self.community(ref)

    def hospital(self, ref: StudyRef) -> tuple[TlbHospital, ImagingSource]:
        hospital = next((h for h in self.cfg.tlb_hospitals if h.ura == ref.hospital_ura), None)
        source = self._sources.get(ref.hospital_ura or "")
        if hospital is None or source is None:
            raise LookupError(f"TLB hospital {ref.hospital_ura} is not (or no longer) configured")
        return hospital, source

    def community(self, ref: StudyRef) -> tuple[XcaCommunity, CommunityRetriever]:
        community = next((c for c in self.cfg.xca_communities
                          if c.home_community_id == ref.home_community_id), None)
        retriever = self._retrievers.get(ref.home_community_id)
        if community is None or retriever is None:
            raise LookupError(f"community {ref.home_community_id} is not (or no longer) configured")
        return community, retriever

    def fetcher(self, ref: StudyRef, bsn: str, claims: Claims, *, lean: bool = False) -> StudyFetcher:
        """The configured TLB hospital's PACS behind the consent gate, or the community's retriever.
        ``lean``: a manifest of identities only will do (a view; see ImagingSource.find_instances)."""
        if ref.kind == "tlb":
            hospital, source = self.hospital(ref)
            return TlbStudyFetcher(hospital=hospital, source=source, gate=self._gate, claims=claims, bsn=bsn,
                                   study_uid=ref.study_uid, lean=lean)
        community, retriever = self.community(ref)
        return XcaStudyFetcher(community=community, retriever=retriever, claims=claims, bsn=bsn, ref=ref)
