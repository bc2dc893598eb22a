"""A TLB hospital's PACS as an :class:`~duo_gateway.sources.base.ImagingSource`, over DICOM Q/R.

Two things a PACS cannot be trusted with, so this module does them itself:

- **Which patient an answer belongs to.** A PACS that ignores or mis-implements the patient key (an
  unsupported sequence match, a misconfigured query view) answers with *other* patients' studies.
  Every study-level answer must carry the BSN where this hospital keeps it (``bsn_attribute``, read
  by the one rule in :mod:`duo_gateway.bsn`) or it is dropped and counted in the log; every
  retrieved file is checked the same way before the C-STORE is acknowledged, so a wrong instance
  never reaches the spool's consumer.
- **Consent.** Every method that reads patient data first checks the Permit against this hospital
  and BSN, before any network traffic.

Where the BSN lives (``PatientID`` or an ``OtherPatientIDsSequence`` item) is per hospital because the
Dutch guideline is not settled. Sequence matching is optional in DICOM (PS3.4 C.2.2.2.6) and Orthanc
1.10 ignores a sequence key: such a PACS then answers with every study (also filtered by date/UID when
given) and the BSN check drops the rest. That is correct but costs a full scan per query; a PACS where
this matters should be configured with ``PatientID`` or fixed to support sequence matching.

BodyPartExamined is a series attribute: filling :attr:`StudyRecord.body_part` would cost one more
C-FIND per study, so it stays None here (find_instances does ask the series level).
"""

from __future__ import annotations

import asyncio
import dataclasses
import ssl
import time
from collections.abc import AsyncGenerator, Awaitable, Collection, Iterator, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, aclosing
from datetime import date
from pathlib import Path
from typing import Literal, TypeVar

import structlog
from pydicom.dataset import Dataset

from duo_gateway.bsn import bsn_of, bsn_query, bsns_in, names_bsn, names_other_patient, reading_key
from duo_gateway.config.peers import TlbHospital
from duo_gateway.consent import Permit
from duo_gateway.dicom.qr import (
    MemoryBudget,
    MoveRouter,
    QrAssociation,
    QrClient,
    QrError,
    QrStatusError,
    QrTimeout,
    Spool,
    SpooledInstance,
    Validator,
)
from duo_gateway.dicom.syntaxes import PREFERRED
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sources.base import (
    InstanceRecord,
    NotCovered,
    RetrievedInstance,
    SourceUnavailable,
    StudyRecord,
    retrieve_named_by_walk,
)
from duo_gateway.tls import client_context

log = structlog.get_logger(__name__)

T = TypeVar("T")

_STUDY_RETURN_KEYS = ("StudyDate", "StudyTime", "AccessionNumber", "StudyDescription", "ModalitiesInStudy",
                      "NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "StudyID",
                      "PatientName", "PatientBirthDate", "PatientSex", "ReferringPhysicianName",
                      "InstitutionName")
#: Patient readings one retrieve's validator remembers (see bsn.reading_key).
_READINGS_KEPT = 16
_SERIES_RETURN_KEYS = ("Modality", "SeriesNumber", "BodyPartExamined", "NumberOfSeriesRelatedInstances")
_IMAGE_RETURN_KEYS = ("SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime",
                      "MIMETypeOfEncapsulatedDocument", "DocumentTitle")
#: study_patients_since's deadline, in per-operation deadlines (``timeout_s``).
_SYNC_DEADLINE_FACTOR = 6
#: SOP Instance UIDs per IMAGE-level retrieve: keeps identifiers well under any PDU/PACS limit.
_UIDS_PER_RETRIEVE = 200


#: The file count that goes with a byte window: a backstop only (the bridge queue's size), so the
#: configured bytes are what bounds a retrieve of ordinary instances, not 16 of them.
RETRIEVE_WINDOW_FILES = 1024


class DicomPacsSource:
    """One TLB hospital's PACS; answers only within a Permit for that hospital and patient."""

    def __init__(self, hospital: TlbHospital, calling_ae: str, spool_dir: Path,
                 retrieve_method: Literal["c-get", "c-move"] = "c-get", retrieve_window: int = 16,
                 metrics: Metrics | None = None, *, move_router: MoveRouter | None = None,
                 tls: ssl.SSLContext | None = None, retrieve_window_bytes: int | None = None,
                 memory: MemoryBudget | None = None) -> None:
        if retrieve_method == "c-move" and move_router is None:
            raise ValueError("C-MOVE needs the move_router of DUO's storage SCP (AE title = calling_ae)")
        self.hospital = hospital
        self.name = f"tlb:{hospital.ura}"
        self.holder_ura = hospital.ura
        self.calling_ae = calling_ae
        self.spool_dir = spool_dir
        self.retrieve_method = retrieve_method
        #: Files, and bytes, a retrieve may hold spooled ahead of its consumer (qr.Spool's windows).
        self.retrieve_window = retrieve_window
        self.retrieve_window_bytes = retrieve_window_bytes
        #: Where retrieve_named(in_memory=True) holds instances (the daemon's, shared); None: files.
        self.memory = memory
        self._metrics = metrics
        self._router = move_router
        if tls is None and hospital.tls is not None:
            tls = client_context(hospital.tls)
        self._qr = QrClient(calling_ae, hospital.host, hospital.port, hospital.ae_title,
                            timeout_s=hospital.timeout_s, tls=tls,
                            max_associations=hospital.max_associations)

    # -- ImagingSource -----------------------------------------------------------------------------

    async def find_studies(self, permit: Permit, bsn: str, *, date_from: date | None = None,
                           date_to: date | None = None,
                           study_uids: Sequence[str] = ()) -> list[StudyRecord]:
        self._check(permit, bsn)
        query = bsn_query("STUDY", self.hospital.bsn_attribute, bsn)
        query.StudyInstanceUID = list(study_uids) if study_uids else ""
        query.StudyDate = _date_range(date_from, date_to)
        for keyword in _STUDY_RETURN_KEYS:
            if keyword not in query:
                setattr(query, keyword, "")
        answers = await self._deadline("c-find", self._find(query), self.hospital.timeout_s)
        wanted = set(study_uids)
        low, high = (d.strftime("%Y%m%d") if d else None for d in (date_from, date_to))
        records: dict[str, StudyRecord] = {}
        foreign = outside = 0
        for ds in answers:
            uid = self._unique(ds, "StudyInstanceUID")
            if not self._belongs(ds, bsn):
                foreign += 1
                continue
            study_date = _text(ds, "StudyDate")
            if (wanted and uid not in wanted) or not _in_range(study_date, low, high):
                outside += 1  # a PACS that ignored the UID list or date range: same patient, not asked
                continue
            records.setdefault(uid, self._study_record(ds, bsn))
        if foreign:
            log.warning("pacs_foreign_studies_dropped", source=self.name, count=foreign)
        log.info("pacs_find_studies", source=self.name, studies=len(records), dropped_outside=outside)
        if records:
            parts = await self._deadline("c-find", self._body_parts(list(records)), self.hospital.timeout_s)
            for uid, part in parts.items():
                records[uid] = dataclasses.replace(records[uid], body_part=part)
        return list(records.values())

    async def _body_parts(self, study_uids: list[str]) -> dict[str, str]:
        """BodyPartExamined is a series attribute: series-level C-FINDs with the study UIDs as a UID
        list (list matching on a unique key, PS3.4 C.2.2.2.2), 200 per query, so the KOS entry's
        anatomic-region event code (xca.md §7) costs one query per hospital, not one per study.
        A PACS that refuses UID lists leaves the body part unknown rather than failing the query."""
        found: dict[str, str] = {}
        async with self._qr.associate() as qa:
            for start in range(0, len(study_uids), 200):
                query = Dataset()
                query.QueryRetrieveLevel = "SERIES"
                query.StudyInstanceUID = study_uids[start:start + 200]
                query.SeriesInstanceUID = ""
                query.Modality = ""
                query.BodyPartExamined = ""
                try:
                    answers = await _collect(qa.find(query))
                except QrStatusError as exc:
                    log.info("pacs_body_part_unavailable", source=self.name, status=exc.status)
                    return found
                for ds in answers:
                    part = _text(ds, "BodyPartExamined")
                    uid = _text(ds, "StudyInstanceUID")
                    if part and uid and (_text(ds, "Modality") or "") not in ("SR", "KO", "PR", "DOC"):
                        found.setdefault(uid, part.upper())
        return found

    async def find_instances(self, permit: Permit, bsn: str, study_uid: str, *,
                             modalities: Sequence[str] = (),
                             series: Collection[str] = (), lean: bool = False) -> list[InstanceRecord]:
        self._check(permit, bsn)
        # One association for the whole walk; its deadline grows with the series it has to visit.
        return await self._deadline("c-find", self._walk_study(bsn, study_uid, modalities, series, lean),
                                    self.hospital.timeout_s * 4)

    async def patient_of_study(self, study_uid: str) -> str | None:
        query = bsn_query("STUDY", self.hospital.bsn_attribute)
        query.StudyInstanceUID = study_uid
        answers = await self._deadline("c-find", self._find(query), self.hospital.timeout_s)
        candidates: set[str] = set()
        for ds in answers:
            if self._unique(ds, "StudyInstanceUID") != study_uid:
                continue  # a PACS that ignored the UID key
            candidates.update(bsns_in(ds, self.hospital.bsn_attribute))
        if len(candidates) > 1:
            log.warning("pacs_study_patient_ambiguous", source=self.name, study_instance_uid=study_uid,
                        candidates=len(candidates))
            return None
        return next(iter(candidates), None)

    # -- the Mitz subscription sync ----------------------------------------------------------------

    async def study_patients_since(self, since: date) -> list[str | None]:
        """The patient of each study dated ``since`` or later, oldest first as the PACS answers; None
        for a study that names no valid BSN, or two, where this hospital keeps it.

        Not part of ImagingSource and takes no Permit: it lists which patients the hospital has
        imaging for so that DUO can subscribe them at Mitz on the hospital's behalf (mitz.md §4),
        which discloses nothing to any requester. It runs here rather than beside the sync so that it
        shares the PACS's association limit, metrics and thread bridging with the online queries it
        competes with, and reads the BSN by the same rule. Its deadline is a multiple of the
        per-operation one because it answers a whole window of studies (a first sync looks back a
        month), where a patient query answers a handful; a stalled PACS still fails it within the
        per-message DIMSE timeout.
        """
        query = bsn_query("STUDY", self.hospital.bsn_attribute)
        query.StudyDate = f"{since:%Y%m%d}-"
        query.StudyInstanceUID = ""
        answers = await self._deadline("c-find", self._find(query),
                                       self.hospital.timeout_s * _SYNC_DEADLINE_FACTOR)
        return [bsn_of(ds, self.hospital.bsn_attribute) for ds in answers]

    def retrieve(self, permit: Permit, bsn: str, study_uid: str, instances: Sequence[InstanceRecord], *,
                 transfer_syntaxes: Sequence[str] = PREFERRED,
                 in_memory: bool = False) -> AsyncGenerator[RetrievedInstance, None]:
        """Stream the instances; consume inside ``contextlib.aclosing`` so that stopping early (an
        error, a cancelled consumer) aborts the PACS and empties the spool at once.

        A C-GET proposes storage contexts in ``transfer_syntaxes`` only, in that order, so the PACS sends
        each instance as stored when that is acceptable and otherwise converts it or fails that
        sub-operation, as only it can. A C-MOVE cannot negotiate: the PACS opens the association to DUO's
        storage SCP, which accepts every syntax, so instances come as the PACS chooses.
        """
        # Checked here, not inside the generator, so a wrong Permit fails at the call, before anything.
        self._check(permit, bsn)
        return self._retrieve_records(bsn, study_uid, list(instances), tuple(transfer_syntaxes),
                                      self.memory if in_memory else None)

    def retrieve_named(
        self, permit: Permit, bsn: str, study_uid: str, named: Mapping[str, str], *,
        transfer_syntaxes: Sequence[str] = PREFERRED, in_memory: bool = False,
    ) -> AsyncGenerator[RetrievedInstance, None]:
        """The named instances without an image-level walk: the study level answers the SOP classes to
        propose (SOPClassesInStudy), and the instances are asked for by UID list only, never as a
        whole series, so the PACS sends nothing that was not named (a request may name a UID the
        series lacks beside all it holds). The receive path's validator refuses anything not named,
        not in the named series, or not this patient's. A PACS that does not answer
        SOPClassesInStudy is walked as before (:func:`retrieve_named_by_walk`)."""
        self._check(permit, bsn)
        return self._retrieve_named(permit, bsn, study_uid, dict(named), tuple(transfer_syntaxes),
                                    self.memory if in_memory else None)

    # -- retrieve ----------------------------------------------------------------------------------

    async def _retrieve_named(self, permit: Permit, bsn: str, study_uid: str, named: dict[str, str],
                              syntaxes: tuple[str, ...],
                              memory: MemoryBudget | None) -> AsyncGenerator[RetrievedInstance, None]:
        if not named:
            return
        classes = await self._deadline("c-find", self._sop_classes(bsn, study_uid), self.hospital.timeout_s)
        rest = named
        if classes:
            # The class is the object's to say: each delivered instance's record takes it on receipt.
            wanted = {uid: InstanceRecord(study_instance_uid=study_uid, series_instance_uid=series_uid,
                                          sop_class_uid="", sop_instance_uid=uid)
                      for uid, series_uid in named.items()}
            rest = dict(named)
            async with aclosing(self._retrieve(bsn, study_uid, wanted, classes, {}, syntaxes,
                                               memory=memory)) as items:
                async for item in items:
                    rest.pop(item.record.sop_instance_uid, None)
                    yield item
            if rest:
                # One unknown UID in a list fails the whole C-GET at some PACSes (Orthanc: 0xC000), so
                # what did not come is asked again the long way, which names only instances that exist.
                log.info("pacs_retrieve_named_walk", source=self.name, study_instance_uid=study_uid,
                         undelivered=len(rest))
        if rest:
            async with aclosing(retrieve_named_by_walk(self, permit, bsn, study_uid, rest,
                                                       transfer_syntaxes=syntaxes)) as items:
                async for item in items:
                    yield item

    async def _sop_classes(self, bsn: str, study_uid: str) -> list[str]:
        """The study's SOP classes (SOPClassesInStudy); none when the PACS does not list them (the key
        is optional), or the study is not this patient's."""
        query = bsn_query("STUDY", self.hospital.bsn_attribute, bsn)
        query.StudyInstanceUID = study_uid
        query.SOPClassesInStudy = ""
        own = [ds for ds in await self._find(query)
               if self._unique(ds, "StudyInstanceUID") == study_uid and self._belongs(ds, bsn)]
        if not own:
            log.warning("pacs_study_not_of_patient", source=self.name, study_instance_uid=study_uid)
            return []
        return sorted(set(_values(own[0], "SOPClassesInStudy")))

    async def _retrieve_records(
        self, bsn: str, study_uid: str, instances: list[InstanceRecord], syntaxes: tuple[str, ...],
        memory: MemoryBudget | None = None,
    ) -> AsyncGenerator[RetrievedInstance, None]:
        wanted = {i.sop_instance_uid: i for i in instances if i.study_instance_uid == study_uid}
        if len(wanted) != len(instances):
            log.warning("pacs_retrieve_foreign_records_ignored", source=self.name,
                        count=len(instances) - len(wanted))
        if not wanted:
            return
        counts = await self._deadline("c-find", self._series_counts(study_uid), self.hospital.timeout_s)
        classes = sorted({r.sop_class_uid for r in wanted.values()})
        async with aclosing(self._retrieve(bsn, study_uid, wanted, classes, counts, syntaxes,
                                           memory=memory)) as items:
            async for item in items:
                yield item

    async def _retrieve(self, bsn: str, study_uid: str, wanted: dict[str, InstanceRecord], classes: list[str],
                        counts: dict[str, int | None], syntaxes: tuple[str, ...], *,
                        memory: MemoryBudget | None = None) -> AsyncGenerator[RetrievedInstance, None]:
        """``wanted``'s instances, a series whole where all of it is wanted (``counts``; empty: never),
        proposing storage for ``classes`` (C-GET), held in ``memory`` while it has room."""
        by_series: dict[str, list[InstanceRecord]] = {}
        for record in wanted.values():
            by_series.setdefault(record.series_instance_uid, []).append(record)
        operation = self.retrieve_method
        spool = self._qr.spool(self.spool_dir, self.retrieve_window,
                               self._validator(bsn, study_uid,
                                               {uid: r.series_instance_uid for uid, r in wanted.items()}),
                               window_bytes=self.retrieve_window_bytes, memory=memory)
        delivered = 0
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            async with self._association(operation, classes, syntaxes) as qa:
                for series_uid, members in by_series.items():
                    whole = counts.get(series_uid) == len(members)
                    for query in _retrieve_queries(study_uid, series_uid, members, whole):
                        try:
                            # aclosing: leaving early must close the C-GET/C-MOVE stream (abort, clean
                            # spool) now, before the association is torn down, not at garbage collection.
                            async with aclosing(self._retrieve_one(qa, query, spool, members)) as stream:
                                async for item in stream:
                                    delivered += 1
                                    record = wanted[item.sop_instance_uid]
                                    if record.sop_class_uid != item.sop_class_uid:
                                        # The object is the authority on its own class, not the C-FIND.
                                        record = dataclasses.replace(record, sop_class_uid=item.sop_class_uid)
                                    yield RetrievedInstance(record, item.path, item.transfer_syntax_uid,
                                                            item.size, item.data)
                        except QrStatusError as exc:
                            # This series failed at the PACS; the others may still come. The caller
                            # compares what arrived with what it asked for.
                            log.warning("pacs_retrieve_status", source=self.name,
                                        series_instance_uid=series_uid, status=f"0x{exc.status:04X}")
            outcome = "ok" if delivered == len(wanted) else "partial"
        except QrError as exc:
            outcome = exc.label
            raise SourceUnavailable(self.name, f"{operation} {exc.label}: {exc}") from exc
        finally:
            await spool.close()
            self._observe(operation, outcome, time.perf_counter() - started)
            if self._metrics is not None:
                self._metrics.observe_spool(self.name, spool.high_water_bytes, spool.window_bytes)
            log.info("pacs_retrieve", source=self.name, study_instance_uid=study_uid, method=operation,
                     asked=len(wanted), delivered=delivered, refused=spool.refused, outcome=outcome,
                     spool_high_water_bytes=spool.high_water_bytes)

    def _association(self, operation: str, sop_classes: list[str],
                     syntaxes: tuple[str, ...]) -> AbstractAsyncContextManager[QrAssociation]:
        if operation == "c-move":
            return self._qr.associate(find=False, move=True, dimse_timeout_s=self._qr.move_idle_s)
        return self._qr.associate(find=False, get_sop_classes=sop_classes, transfer_syntaxes=syntaxes)

    def _retrieve_one(self, qa: QrAssociation, query: Dataset, spool: Spool,
                      members: list[InstanceRecord]) -> AsyncGenerator[SpooledInstance, None]:
        if self.retrieve_method == "c-move":
            assert self._router is not None
            return qa.move(query, self.calling_ae, self._router, spool,
                           expected={m.sop_instance_uid for m in members})
        return qa.get(query, spool)

    async def _series_counts(self, study_uid: str) -> dict[str, int | None]:
        """Instances per series, to retrieve a series whole when all of it is asked for."""
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = ""
        query.NumberOfSeriesRelatedInstances = ""
        counts: dict[str, int | None] = {}
        for ds in await self._find(query):
            counts[self._unique(ds, "SeriesInstanceUID")] = _int(ds, "NumberOfSeriesRelatedInstances")
        return counts

    def _validator(self, bsn: str, study_uid: str, wanted: Mapping[str, str]) -> Validator:
        """Refuse on receipt what was not asked for (SOP Instance UID → its series) or is not this
        patient's."""

        readings: dict[tuple[object, ...], bool] = {}  # reading_key → is this patient's

        def belongs(header: Dataset) -> bool:
            key = reading_key(header)
            if key is None:
                return self._belongs(header, bsn)
            verdict = readings.get(key)
            if verdict is None:
                verdict = self._belongs(header, bsn)
                if len(readings) < _READINGS_KEPT:  # a study names one patient: a few keys at most
                    readings[key] = verdict
            return verdict

        def validate(header: Dataset) -> str | None:
            series_uid = wanted.get(str(header.get("SOPInstanceUID", "")))
            if series_uid is None:
                return "instance not requested"
            if str(header.get("StudyInstanceUID", "")) != study_uid:
                return "instance of another study"
            if str(header.get("SeriesInstanceUID", "")) != series_uid:
                return "instance of another series"
            if not belongs(header):
                return "instance of another patient"
            return None

        return validate

    # -- find helpers ------------------------------------------------------------------------------

    async def _walk_study(self, bsn: str, study_uid: str, modalities: Sequence[str],
                          only_series: Collection[str] = (), lean: bool = False) -> list[InstanceRecord]:
        wanted_modalities = {m.upper() for m in modalities}
        async with self._qr.associate() as qa:
            check = bsn_query("STUDY", self.hospital.bsn_attribute, bsn)
            check.StudyInstanceUID = study_uid
            check.NumberOfStudyRelatedSeries = ""
            if lean:
                check.SOPClassesInStudy = ""
            own = [ds for ds in await _collect(qa.find(check))
                   if self._unique(ds, "StudyInstanceUID") == study_uid and self._belongs(ds, bsn)]
            if not own:
                log.warning("pacs_study_not_of_patient", source=self.name, study_instance_uid=study_uid)
                return []
            classes = sorted(set(_values(own[0], "SOPClassesInStudy"))) if lean else []
            # One class in the study: every instance has it, so the image level is asked for its
            # identity only (main tags; Orthanc answers without reading each file). The per-instance
            # patient check then happens on receipt (the retrieve's validator), not here.
            only_class = classes[0] if len(classes) == 1 else None
            counted_series = _int(own[0], "NumberOfStudyRelatedSeries")
            series_query = Dataset()
            series_query.QueryRetrieveLevel = "SERIES"
            series_query.StudyInstanceUID = study_uid
            series_query.SeriesInstanceUID = ""
            for keyword in _SERIES_RETURN_KEYS:
                setattr(series_query, keyword, "")
            series: dict[str, Dataset] = {}
            listed: set[str] = set()
            for ds in await _collect(qa.find(series_query)):
                modality = _text(ds, "Modality")
                listed.add(uid := self._unique(ds, "SeriesInstanceUID"))
                if wanted_modalities and (modality or "").upper() not in wanted_modalities:
                    continue
                if only_series and uid not in only_series:
                    continue
                series.setdefault(uid, ds)
            self._complete("series", counted_series, len(listed), study_uid)
            records: dict[str, InstanceRecord] = {}
            foreign = 0
            for series_uid, sds in series.items():
                # Patient keys as return keys: a PACS that names a patient per instance gets checked
                # per instance too (one that files a foreign instance under this study, say).
                if only_class is not None:
                    image_query = Dataset()
                    image_query.QueryRetrieveLevel = "IMAGE"
                else:
                    image_query = bsn_query("IMAGE", self.hospital.bsn_attribute)
                image_query.StudyInstanceUID = study_uid
                image_query.SeriesInstanceUID = series_uid
                image_query.SOPInstanceUID = ""
                for keyword in _IMAGE_RETURN_KEYS if only_class is None else ("InstanceNumber",):
                    setattr(image_query, keyword, "")
                answers = await _collect(qa.find(image_query))
                found = {self._unique(ds, "SOPInstanceUID") for ds in answers}
                counted = _int(sds, "NumberOfSeriesRelatedInstances")
                self._complete("instances", counted, len(found), study_uid, series_uid)
                for ds in answers:
                    sop_uid = self._unique(ds, "SOPInstanceUID")
                    if names_other_patient(ds, self.hospital.bsn_attribute, bsn):
                        foreign += 1
                        continue
                    sop_class = only_class or _text(ds, "SOPClassUID")
                    if not sop_class:
                        raise SourceUnavailable(self.name, "IMAGE-level answer without SOPClassUID", "error")
                    records.setdefault(sop_uid, InstanceRecord(
                        study_instance_uid=study_uid, series_instance_uid=series_uid,
                        sop_class_uid=sop_class, sop_instance_uid=sop_uid, modality=_text(sds, "Modality"),
                        series_number=_int(sds, "SeriesNumber"), instance_number=_int(ds, "InstanceNumber"),
                        content_date=_text(ds, "ContentDate"), content_time=_text(ds, "ContentTime"),
                        mime_type=_text(ds, "MIMETypeOfEncapsulatedDocument"),
                        title=_text(ds, "DocumentTitle")))
        result = sorted(records.values(), key=lambda r: (r.series_number or 0, r.series_instance_uid,
                                                         r.instance_number or 0, r.sop_instance_uid))
        if foreign:
            log.warning("pacs_foreign_instances_dropped", source=self.name, study_instance_uid=study_uid,
                        count=foreign)
        log.info("pacs_find_instances", source=self.name, study_instance_uid=study_uid, series=len(series),
                 instances=len(result))
        return result

    def _complete(self, what: str, counted: int | None, listed: int, study_uid: str,
                  series_uid: str | None = None) -> None:
        """A manifest must be the whole study: fewer answers than the PACS's own count of them (a
        dropped C-FIND response, as pynetdicom's reactor once took one off the queue before the find
        read it, or a PACS that stops early) would make a transfer of the rest "complete and
        verified". Refused as transient, so the runner walks the study again; a PACS that lists more
        than it counts is not refused."""
        if counted is not None and listed < counted:
            log.warning("pacs_find_incomplete", source=self.name, study_instance_uid=study_uid,
                        series_instance_uid=series_uid, level=what, counted=counted, listed=listed)
            where = "the study" if series_uid is None else f"series {series_uid}"
            raise SourceUnavailable(self.name, f"C-FIND listed {listed} {what} of {where}, the PACS counts "
                                    f"{counted}: an incomplete answer")

    async def _find(self, query: Dataset) -> list[Dataset]:
        return await self._qr.find_all(query)

    async def _deadline(self, operation: str, work: Awaitable[T], seconds: float) -> T:
        """Run one source operation under a deadline, mapping every failure to SourceUnavailable."""
        started = time.perf_counter()
        outcome = "cancelled"
        try:
            async with asyncio.timeout(seconds):
                result = await work
            outcome = "ok"
            return result
        except TimeoutError as exc:
            outcome = "timeout"
            detail = f"{operation}: no answer within {seconds:g} s"
            raise SourceUnavailable(self.name, detail, "timeout") from exc
        except QrTimeout as exc:
            outcome = "timeout"
            raise SourceUnavailable(self.name, f"{operation}: {exc}", "timeout") from exc
        except QrStatusError as exc:
            outcome = exc.label
            raise SourceUnavailable(self.name, f"{operation} {exc.label}: {exc}", "error") from exc
        except QrError as exc:
            outcome = exc.label
            raise SourceUnavailable(self.name, f"{operation} {exc.label}: {exc}") from exc
        except SourceUnavailable:
            outcome = "malformed"
            raise
        except OSError as exc:  # e.g. TLS material unreadable
            outcome = "connect"
            raise SourceUnavailable(self.name, f"{operation}: {type(exc).__name__}") from exc
        finally:
            self._observe(operation, outcome, time.perf_counter() - started)

    def _observe(self, operation: str, outcome: str, seconds: float) -> None:
        if self._metrics is not None:
            self._metrics.observe_peer(self.name, operation, outcome, seconds)

    # -- identity ----------------------------------------------------------------------------------

    def _check(self, permit: Permit, bsn: str) -> None:
        if not permit.covers(bsn, self.holder_ura):
            raise NotCovered(f"the Permit does not cover this patient's data at {self.name}")

    def _belongs(self, ds: Dataset, bsn: str) -> bool:
        return names_bsn(ds, self.hospital.bsn_attribute, bsn)

    def _unique(self, ds: Dataset, keyword: str) -> str:
        """The level's unique key; an answer without it is a broken answer, not a smaller one."""
        value = _text(ds, keyword)
        if not value:
            raise SourceUnavailable(self.name, f"C-FIND answer without {keyword}", "error")
        return value

    def _study_record(self, ds: Dataset, bsn: str) -> StudyRecord:
        mods = _values(ds, "ModalitiesInStudy")
        return StudyRecord(
            study_instance_uid=self._unique(ds, "StudyInstanceUID"), patient_id=bsn,
            study_date=_text(ds, "StudyDate"), study_time=_text(ds, "StudyTime"),
            accession_number=_text(ds, "AccessionNumber"), description=_text(ds, "StudyDescription"),
            modalities=mods, series_count=_int(ds, "NumberOfStudyRelatedSeries"),
            instance_count=_int(ds, "NumberOfStudyRelatedInstances"), study_id=_text(ds, "StudyID"),
            patient_name=_text(ds, "PatientName"), patient_birth_date=_text(ds, "PatientBirthDate"),
            patient_sex=_text(ds, "PatientSex"), institution_name=_text(ds, "InstitutionName"),
            referring_physician=_text(ds, "ReferringPhysicianName"))


# -- helpers -----------------------------------------------------------------------------------------


async def _collect(stream: AsyncGenerator[Dataset, None]) -> list[Dataset]:
    async with aclosing(stream) as matches:
        return [ds async for ds in matches]


def _retrieve_queries(study_uid: str, series_uid: str, members: list[InstanceRecord],
                      whole: bool) -> Iterator[Dataset]:
    if whole:
        query = Dataset()
        query.QueryRetrieveLevel = "SERIES"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        yield query
        return
    uids = [m.sop_instance_uid for m in members]
    for start in range(0, len(uids), _UIDS_PER_RETRIEVE):
        query = Dataset()
        query.QueryRetrieveLevel = "IMAGE"
        query.StudyInstanceUID = study_uid
        query.SeriesInstanceUID = series_uid
        chunk = uids[start:start + _UIDS_PER_RETRIEVE]
        query.SOPInstanceUID = chunk if len(chunk) > 1 else chunk[0]
        yield query


def _date_range(date_from: date | None, date_to: date | None) -> str:
    if date_from is None and date_to is None:
        return ""
    low = date_from.strftime("%Y%m%d") if date_from else ""
    high = date_to.strftime("%Y%m%d") if date_to else ""
    return f"{low}-{high}"


def _in_range(value: str | None, low: str | None, high: str | None) -> bool:
    if low is None and high is None:
        return True
    if not value:
        return False
    day = value[:8]
    return (low is None or day >= low) and (high is None or day <= high)


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword, None)
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _values(ds: Dataset, keyword: str) -> tuple[str, ...]:
    """A multi-valued attribute's non-empty values, whether pydicom decoded it as one or many."""
    value = ds.get(keyword, None)
    if value is None or value == "":
        return ()
    if isinstance(value, str):
        return tuple(v for v in value.split("\\") if v)
    return tuple(str(v) for v in value if str(v))


def _int(ds: Dataset, keyword: str) -> int | None:
    value = _text(ds, keyword)
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None
