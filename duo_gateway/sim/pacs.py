"""The simulated PACS of one TLB hospital: a pynetdicom Query/Retrieve SCP over a folder of files.

The gateway must be proven against something that speaks DICOM the way a hospital PACS does (and the
way DCMTK's tools expect), so this is a real network peer: C-ECHO, C-FIND (Patient Root and Study
Root, PATIENT to IMAGE level), C-MOVE, C-GET and C-STORE. It is deliberately simple where realism does
not matter (files in a folder, an in-memory index, no database) and strict where the gateway could
go wrong (called AE title checked, unknown move destinations refused with 0xA801, exact/ wildcard/
range/list matching, only the requested keys returned).

**Transfer syntaxes** as a PACS negotiates them (:mod:`duo_gateway.sim.codecs`): each instance goes as
stored when the receiver accepted that syntax, else decompressed or re-encoded without loss when the
receiver accepted only other syntaxes, else that C-STORE sub-operation fails; a C-MOVE proposes each
held syntax in a context of its own, plus uncompressed for a class held losslessly compressed.

**Threads, not asyncio.** pynetdicom runs every association in its own thread and calls the handlers
there, so all state is behind one lock and :meth:`SimPacs.start`, :meth:`SimPacs.stop` and
:meth:`SimPacs.set_behaviour` are synchronous. Async callers wrap them:
``await asyncio.to_thread(pacs.start)``.

**Misbehaviour** (:class:`~duo_gateway.sim.behaviour.Misbehaviour`, switchable at run time):

- ``delay_ms``: a C-FIND, C-MOVE or C-GET waits this long before its first response, as a slow
  PACS does. C-ECHO and C-STORE stay fast, so "alive but slow" is distinguishable from "down".
- ``down``: the PACS stops listening and aborts open associations (connection refused, as a crashed
  PACS); switching it back listens again on the same port.
- ``malformed``: C-FIND answers Pending responses whose identifiers lack QueryRetrieveLevel and the
  unique key of the queried level (e.g. StudyInstanceUID), then Success. This is the nasty case, a
  status that says "here is a match" with a match nobody can retrieve or de-duplicate; a blunt
  failure status would be too easy on the gateway.
- ``abort_after_instances`` (:class:`~duo_gateway.sim.behaviour.PacsMisbehaviour`): a C-GET or
  C-MOVE sends that many instances, then aborts the association, as a PACS crashing mid-study.
- ``omit_keys`` (the same): C-FIND answers leave those optional attributes out, as a PACS that does
  not compute SOPClassesInStudy does.
- ``fault`` has no DICOM meaning and is ignored.

Logs carry counts and UIDs only, never patient names or BSNs.
"""

from __future__ import annotations

import copy
import fnmatch
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import structlog
from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import (
    AE,
    ALL_TRANSFER_SYNTAXES,
    AllStoragePresentationContexts,
    _config,
    build_context,
    evt,
)
from pynetdicom.presentation import PresentationContext
from pynetdicom.sop_class import (  # type: ignore[attr-defined]
    PatientRootQueryRetrieveInformationModelFind,
    PatientRootQueryRetrieveInformationModelGet,
    PatientRootQueryRetrieveInformationModelMove,
    StudyRootQueryRetrieveInformationModelFind,
    StudyRootQueryRetrieveInformationModelGet,
    StudyRootQueryRetrieveInformationModelMove,
    Verification,
)
from pynetdicom.transport import ThreadedAssociationServer

from duo_gateway.dicom.acceptor import start_acceptor
from duo_gateway.dicom.nodelay import ensure_tcp_nodelay
from duo_gateway.dicom.status import (
    CANCEL,
    IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
    OUT_OF_RESOURCES,
    PENDING,
    SUBOPERATIONS_FAILED,
    SUCCESS,
    UNABLE_TO_PROCESS,
)
from duo_gateway.dicom.syntaxes import syntax_class
from duo_gateway.dicom.teardown import install_fast_teardown
from duo_gateway.sim.behaviour import Misbehaviour, PacsMisbehaviour
from duo_gateway.sim.codecs import encoded, serving_syntax
from duo_gateway.sim.config import SimHospital
from duo_gateway.sim.studies import GeneratedStudy, write_study

log = structlog.get_logger(__name__)

# DIMSE statuses (PS3.4 C.4)

LEVELS = ("PATIENT", "STUDY", "SERIES", "IMAGE")
UNIQUE_KEYS = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
_PATIENT_ROOT = {
    str(PatientRootQueryRetrieveInformationModelFind),
    str(PatientRootQueryRetrieveInformationModelMove),
    str(PatientRootQueryRetrieveInformationModelGet),
}
_NOT_MATCHED = frozenset({"QueryRetrieveLevel", "SpecificCharacterSet", "QueryRetrieveView"})
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian,
                 DeflatedExplicitVRLittleEndian)
_UID_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

_Find: TypeAlias = Iterator[tuple[int, Dataset | None]]
#: A C-MOVE handler yields the destination, then the sub-operation count, then (status, dataset).
_MoveYield: TypeAlias = (
    tuple[None, None] | tuple[str, int, dict[str, Any]] | int | tuple[int, Dataset | None]
)
_GetYield: TypeAlias = int | tuple[int, Dataset | None]
_Sent: TypeAlias = tuple[int, Dataset | None]


@dataclass(frozen=True)
class _Entry:
    """One stored instance: where it is, and its header (no pixels) for matching and answering."""

    path: Path
    header: Dataset
    sop_class_uid: str
    transfer_syntax: str
    #: (mtime_ns, size) of the file when it was read: a restart re-reads only files that changed.
    stamp: tuple[int, int] | None = None


def _stamp(path: Path) -> tuple[int, int]:
    st = path.stat()
    return st.st_mtime_ns, st.st_size


class QueryError(Exception):
    """The identifier cannot be answered; carries the DIMSE failure status to send."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(reason)
        self.status = status


class SimPacs:
    """One hospital PACS. Storage layout: ``<storage>/<StudyInstanceUID>/<SOPInstanceUID>.dcm``."""

    def __init__(
        self,
        hospital: SimHospital,
        storage: Path,
        host: str = "127.0.0.1",
        port: int = 0,
        move_destinations: dict[str, tuple[str, int]] | None = None,
    ) -> None:
        self.hospital = hospital
        self.ae_title = hospital.ae_title
        self.storage = storage
        self.host = host
        self.port = port
        self._destinations: dict[str, tuple[str, int]] = dict(move_destinations or {})
        self._behaviour: Misbehaviour = hospital.behaviour
        self._lock = threading.RLock()
        self._index: dict[str, _Entry] = {}
        self._ae: AE | None = None
        self._server: ThreadedAssociationServer | None = None
        self._started = False

    # -- lifecycle -------------------------------------------------------------------------------

    def start(self) -> None:
        """Index the storage folder and listen (unless the behaviour says down). Returns at once."""
        ensure_tcp_nodelay()  # on, unless the process (e.g. the daemon's config) already chose
        install_fast_teardown()
        with self._lock:
            if self._started:
                return
            self.storage.mkdir(parents=True, exist_ok=True)
            self._index = dict(self._scan())
            self._ae = self._make_ae()
            self._started = True
            # Always bind once, even when starting "down": a port asked as 0 must become a real,
            # stable port that a later "up" can listen on again.
            self._listen()
            if self._behaviour.down:
                self._unlisten()
        log.info("sim_pacs_started", ae_title=self.ae_title, port=self.port, instances=len(self._index),
                 down=self._behaviour.down)

    def stop(self) -> None:
        with self._lock:
            if not self._started:
                return
            self._unlisten()
            self._started = False
            self._ae = None
        log.info("sim_pacs_stopped", ae_title=self.ae_title, port=self.port)

    def __enter__(self) -> SimPacs:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def listening(self) -> bool:
        return self._server is not None

    @property
    def behaviour(self) -> Misbehaviour:
        return self._behaviour

    def set_behaviour(self, behaviour: Misbehaviour) -> None:
        """Switch misbehaviour at run time; ``down`` takes effect immediately, both ways."""
        with self._lock:
            self._behaviour = behaviour
            if self._started:
                if behaviour.down and self._server is not None:
                    self._unlisten()
                elif not behaviour.down and self._server is None:
                    self._listen()
        log.info("sim_pacs_behaviour", ae_title=self.ae_title, delay_ms=behaviour.delay_ms,
                 down=behaviour.down, malformed=behaviour.malformed)

    def add_move_destination(self, ae_title: str, host: str, port: int) -> None:
        with self._lock:
            self._destinations[ae_title.strip()] = (host, port)

    # -- content ---------------------------------------------------------------------------------

    def preload(self, studies: Iterable[GeneratedStudy]) -> int:
        """Write the studies into storage and index them; returns the number of instances added."""
        added = 0
        for study in studies:
            paths = write_study(study, self.storage / study.study_instance_uid)
            for path, ds in zip(paths, study.instances, strict=True):
                self._add(path, ds)
                added += 1
        log.info("sim_pacs_preloaded", ae_title=self.ae_title, instances=added)
        return added

    def instance_count(self) -> int:
        with self._lock:
            return len(self._index)

    def instance_paths(self, study_instance_uid: str) -> list[Path]:
        return [e.path for e in self._entries() if e.header.get("StudyInstanceUID") == study_instance_uid]

    def _entries(self) -> list[_Entry]:
        with self._lock:
            return list(self._index.values())

    def _add(self, path: Path, ds: Dataset) -> None:
        header = Dataset({e.tag: e for e in ds if e.tag < 0x7FE00010})
        header.file_meta = ds.file_meta
        entry = _Entry(path, header, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID),
                       _stamp(path))
        with self._lock:
            self._index[str(ds.SOPInstanceUID)] = entry

    def _scan(self) -> Iterator[tuple[str, _Entry]]:
        """Every readable file in storage; one already indexed (preloaded, stored, or seen by an
        earlier start) and unchanged since is not parsed again."""
        known = {entry.path: (uid, entry) for uid, entry in self._index.items()}
        unreadable = 0
        for path in sorted(self.storage.rglob("*")):
            if not path.is_file() or path.name.startswith("."):
                continue
            try:
                stamp = _stamp(path)
                uid, entry = known.get(path, ("", None))
                if entry is not None and entry.stamp == stamp:
                    yield uid, entry
                    continue
                ds = dcmread(path, stop_before_pixels=True)
                entry = _Entry(path, ds, str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID), stamp)
                yield str(ds.SOPInstanceUID), entry
            except Exception:
                unreadable += 1
        if unreadable:
            log.warning("sim_pacs_unreadable_files", ae_title=self.ae_title, count=unreadable)

    # -- network ---------------------------------------------------------------------------------

    def _make_ae(self) -> AE:
        ae = AE(ae_title=self.ae_title)
        # Any calling AE may connect (a TLB gateway, DCMTK in a test), but it must call *this* PACS.
        ae.require_calling_aet = []
        ae.require_called_aet = True
        ae.acse_timeout = 10
        ae.dimse_timeout = 30
        ae.network_timeout = 30
        ae.maximum_associations = 16
        ae.add_supported_context(Verification, ALL_TRANSFER_SYNTAXES)
        for model in (
            PatientRootQueryRetrieveInformationModelFind, PatientRootQueryRetrieveInformationModelMove,
            PatientRootQueryRetrieveInformationModelGet, StudyRootQueryRetrieveInformationModelFind,
            StudyRootQueryRetrieveInformationModelMove, StudyRootQueryRetrieveInformationModelGet,
        ):
            ae.add_supported_context(model)
        # scp_role=True lets a C-GET requestor act as Storage SCP on this association; requestors that
        # do not negotiate roles (storescu) keep the default roles and can still store here.
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES, scp_role=True,
                                     scu_role=False)
        return ae

    def _listen(self) -> None:
        assert self._ae is not None
        server = start_acceptor(
            self._ae,
            (self.host, self.port),
            evt_handlers=[
                (evt.EVT_C_FIND, self._on_find),
                (evt.EVT_C_MOVE, self._on_move),
                (evt.EVT_C_GET, self._on_get),
                (evt.EVT_C_STORE, self._on_store),
            ],
        )
        self._server = server
        self.port = int(server.server_address[1])

    def _unlisten(self) -> None:
        server, self._server = self._server, None
        if server is None:
            return
        for assoc in server.active_associations:
            assoc.abort()
        server.shutdown()

    def _wait(self, event: Any) -> bool:
        """Apply ``delay_ms``; False when the requestor cancelled meanwhile."""
        deadline = time.monotonic() + self._behaviour.delay_ms / 1000
        while (left := deadline - time.monotonic()) > 0:
            if event.is_cancelled:
                return False
            time.sleep(min(left, 0.05))
        return True

    # -- C-FIND ------------------------------------------------------------------------------------

    def _on_find(self, event: Any) -> _Find:
        if not self._wait(event):
            yield CANCEL, None
            return
        model = str(event.request.AffectedSOPClassUID)
        identifier: Dataset = event.identifier
        try:
            level = _level(identifier, model)
            groups = _matching_groups(self._entries(), identifier, level)
        except QueryError as exc:
            log.info("sim_pacs_find_refused", ae_title=self.ae_title, status=hex(exc.status), reason=str(exc))
            yield exc.status, None
            return
        malformed = self._behaviour.malformed
        omit = set(self._behaviour.omit_keys if isinstance(self._behaviour, PacsMisbehaviour) else ())
        omit.discard(UNIQUE_KEYS[level])
        log.info("sim_pacs_find", ae_title=self.ae_title, level=level, matches=len(groups),
                 malformed=malformed)
        for group in groups:
            if event.is_cancelled:
                yield CANCEL, None
                return
            answer = _answer(identifier, level, group, self.ae_title)
            for keyword in omit & set(answer.dir()):
                del answer[keyword]
            if malformed:
                for keyword in ("QueryRetrieveLevel", UNIQUE_KEYS[level]):
                    if keyword in answer:
                        del answer[keyword]
            yield PENDING, answer
        yield SUCCESS, None

    # -- C-MOVE / C-GET ----------------------------------------------------------------------------

    def _retrieve_entries(self, event: Any) -> list[_Entry]:
        identifier: Dataset = event.identifier
        level = _level(identifier, str(event.request.AffectedSOPClassUID))
        key = UNIQUE_KEYS[level]
        if not str(identifier.get(key, "") or ""):
            raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"retrieve at {level} level needs {key}")
        groups = _matching_groups(self._entries(), identifier, level)
        return [entry for group in groups for entry in group.entries]

    def _on_move(self, event: Any) -> Iterator[_MoveYield]:
        destination = str(event.move_destination or "").strip()
        with self._lock:
            address = self._destinations.get(destination)
        if address is None:
            log.info("sim_pacs_move_unknown_destination", ae_title=self.ae_title, destination=destination)
            yield None, None  # pynetdicom answers 0xA801 Move Destination Unknown
            return
        if not self._wait(event):
            yield CANCEL, None
            return
        try:
            entries = self._retrieve_entries(event)
        except QueryError as exc:
            yield exc.status, None
            return
        log.info("sim_pacs_move", ae_title=self.ae_title, destination=destination, instances=len(entries))
        # The destination decides which of the proposed contexts it accepts: remember its association
        # so each instance can go in a syntax it accepted.
        store: list[Any] = []
        handlers = [(evt.EVT_ACCEPTED, lambda accepted: store.append(accepted.assoc))]
        yield address[0], address[1], {"contexts": _contexts_for(entries), "evt_handlers": handlers}
        yield len(entries)
        yield from self._send(event, entries, lambda: store[0].accepted_contexts if store else None)

    def _on_get(self, event: Any) -> Iterator[_GetYield]:
        if not self._wait(event):
            yield CANCEL, None
            return
        try:
            entries = self._retrieve_entries(event)
        except QueryError as exc:
            yield exc.status, None
            return
        log.info("sim_pacs_get", ae_title=self.ae_title, instances=len(entries))
        yield len(entries)
        yield from self._send(event, entries, lambda: event.assoc.accepted_contexts)

    def _send(self, event: Any, entries: list[_Entry],
              contexts: Callable[[], list[PresentationContext] | None]) -> Iterator[_Sent]:
        """Each instance as stored when the receiver accepted that syntax, else converted without loss
        when a codec can (a compressed file decompressed, say), else as stored all the same: pynetdicom
        then finds no context for it and counts that one sub-operation failed, as a PACS would."""
        behaviour = self._behaviour
        abort_after = behaviour.abort_after_instances if isinstance(behaviour, PacsMisbehaviour) else None
        for sent, entry in enumerate(entries):
            if event.is_cancelled:
                yield CANCEL, None
                return
            if abort_after is not None and sent >= abort_after:
                log.info("sim_pacs_abort_mid_retrieve", ae_title=self.ae_title, sent=sent)
                event.assoc.abort()
                return
            try:
                ds: Dataset = dcmread(entry.path)
            except Exception:
                log.error("sim_pacs_unreadable_instance", ae_title=self.ae_title,
                          sop_instance_uid=entry.header.get("SOPInstanceUID"))
                yield SUBOPERATIONS_FAILED, None
                return
            accepted = contexts()
            if accepted is not None:
                acceptable = [str(cx.transfer_syntax[0]) for cx in accepted
                              if cx.abstract_syntax == entry.sop_class_uid and cx.as_scu]
                syntax = serving_syntax(entry.transfer_syntax, acceptable)
                if syntax is None:
                    log.info("sim_pacs_no_acceptable_syntax", ae_title=self.ae_title,
                             sop_instance_uid=entry.header.get("SOPInstanceUID"),
                             stored=entry.transfer_syntax)
                elif syntax != entry.transfer_syntax:
                    try:
                        ds = encoded(ds, syntax)
                    except Exception as exc:  # a corrupt stored stream: this sub-operation fails alone
                        log.warning("sim_pacs_conversion_failed", ae_title=self.ae_title,
                                    sop_instance_uid=entry.header.get("SOPInstanceUID"),
                                    error=type(exc).__name__)
            yield PENDING, ds

    # -- C-STORE -----------------------------------------------------------------------------------

    def _on_store(self, event: Any) -> int:
        sop_uid = str(event.request.AffectedSOPInstanceUID)
        if not _UID_RE.match(sop_uid) or len(sop_uid) > 64:
            # The UID becomes a file name: never let a peer choose a path.
            log.warning("sim_pacs_store_bad_uid", ae_title=self.ae_title)
            return UNABLE_TO_PROCESS
        incoming = self.storage / ".incoming"
        incoming.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=incoming, suffix=".dcm")
        tmp = Path(tmp_name)
        try:
            if _config.STORE_RECV_CHUNKED_DATASET:
                # pynetdicom wrote a complete Part-10 file and deletes it when we return: take it.
                os.close(fd)
                shutil.move(event.dataset_path, tmp)
            else:
                with os.fdopen(fd, "wb") as fh:
                    fh.write(event.encoded_dataset(include_meta=True))
            header = dcmread(tmp, stop_before_pixels=True)
            study_uid = str(header.StudyInstanceUID)
            if str(header.SOPInstanceUID) != sop_uid or not _UID_RE.match(study_uid):
                raise ValueError("dataset UIDs do not match the request or are invalid")
        except OSError:
            log.exception("sim_pacs_store_failed", ae_title=self.ae_title, sop_instance_uid=sop_uid)
            tmp.unlink(missing_ok=True)
            return OUT_OF_RESOURCES
        except Exception:
            log.warning("sim_pacs_store_undecodable", ae_title=self.ae_title, sop_instance_uid=sop_uid)
            tmp.unlink(missing_ok=True)
            return UNABLE_TO_PROCESS
        target_dir = self.storage / study_uid
        target_dir.mkdir(exist_ok=True)
        target = target_dir / f"{sop_uid}.dcm"
        os.replace(tmp, target)
        entry = _Entry(target, header, str(header.SOPClassUID), str(header.file_meta.TransferSyntaxUID),
                       _stamp(target))
        with self._lock:
            self._index[sop_uid] = entry
        log.info("sim_pacs_stored", ae_title=self.ae_title, sop_instance_uid=sop_uid,
                 study_instance_uid=study_uid)
        return SUCCESS


# -- matching ------------------------------------------------------------------------------------


@dataclass
class _Group:
    """The instances below one PATIENT/STUDY/SERIES/IMAGE entity, with its first matching instance."""

    key: str
    entries: list[_Entry]
    representative: Dataset | None = None
    #: :func:`_computed` for the group, kept from matching for the answer.
    computed: dict[str, Any] | None = None


def _level(identifier: Dataset, model: str) -> str:
    level = str(identifier.get("QueryRetrieveLevel", "") or "").strip().upper()
    if level not in LEVELS:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, f"QueryRetrieveLevel {level!r} unsupported")
    if level == "PATIENT" and model not in _PATIENT_ROOT:
        raise QueryError(IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS, "PATIENT level needs the Patient Root model")
    return level


def _matching_groups(entries: list[_Entry], identifier: Dataset, level: str) -> list[_Group]:
    """Entities at ``level`` having at least one instance that matches every key.

    Matching per instance (not per entity attribute) gives the relational answer for keys below the
    level, e.g. Modality=CT at STUDY level finds studies that contain a CT series.
    """
    unique = UNIQUE_KEYS[level]
    groups: dict[str, _Group] = {}
    for entry in entries:
        key = str(entry.header.get(unique, "") or "")
        groups.setdefault(key, _Group(key, [])).entries.append(entry)
    keys = [e for e in identifier if e.keyword not in _NOT_MATCHED and e.VR != "SQ" and not _empty(e)]
    matched: list[_Group] = []
    for group in groups.values():
        computed = _computed(level, group.entries)
        for entry in group.entries:
            if all(_matches(elem, entry.header, computed) for elem in keys):
                group.representative = entry.header
                group.computed = computed
                matched.append(group)
                break
    # stable, reproducible answer order (oldest study first), whatever order files were indexed in
    matched.sort(key=_sort_key)
    return matched


def _sort_key(group: _Group) -> tuple[str, str]:
    rep = group.representative
    return (str(rep.get("StudyDate", "") if rep is not None else ""), group.key)


def _computed(level: str, entries: list[_Entry]) -> dict[str, Any]:
    """Attributes a PACS derives from what it holds rather than reads from any one instance."""
    studies = {str(e.header.get("StudyInstanceUID", "")) for e in entries}
    series = {str(e.header.get("SeriesInstanceUID", "")) for e in entries}
    values: dict[str, Any] = {"InstanceAvailability": "ONLINE"}
    if level == "PATIENT":
        values.update(NumberOfPatientRelatedStudies=len(studies), NumberOfPatientRelatedSeries=len(series),
                      NumberOfPatientRelatedInstances=len(entries))
    elif level == "STUDY":
        values.update(
            NumberOfStudyRelatedSeries=len(series),
            NumberOfStudyRelatedInstances=len(entries),
            ModalitiesInStudy=sorted({str(e.header.get("Modality", "")) for e in entries} - {""}),
            SOPClassesInStudy=sorted({e.sop_class_uid for e in entries}),
        )
    elif level == "SERIES":
        values["NumberOfSeriesRelatedInstances"] = len(entries)
    return values


def _empty(elem: DataElement) -> bool:
    return elem.value is None or elem.value == "" or elem.value == []


def _strings(value: Any) -> list[str]:
    if value is None:
        return []
    if isinstance(value, MultiValue | list | tuple):
        return [str(v).strip() for v in value]
    return [str(value).strip()]


def _matches(elem: DataElement, header: Dataset, computed: dict[str, Any]) -> bool:
    if elem.keyword in computed:
        have = _strings(computed[elem.keyword])
    elif elem.tag in header:
        have = _strings(header[elem.tag].value)
    else:
        return False
    wanted = _strings(elem.value)
    vr = elem.VR
    return any(_match_one(w, h, vr) for w in wanted for h in have)


def _match_one(wanted: str, have: str, vr: str) -> bool:
    if vr in ("DA", "TM", "DT") and "-" in wanted:
        low, _, high = wanted.partition("-")
        width = {"DA": 8, "TM": 6, "DT": 14}[vr]
        value = have.replace(":", "")
        low = low.replace(":", "").ljust(width, "0") if low else ""
        high = high.replace(":", "").ljust(width, "9") if high else ""
        return (not low or value >= low) and (not high or value[: len(high)] <= high)
    if vr != "UI" and ("*" in wanted or "?" in wanted):
        pattern = wanted.replace("[", "[[]")
        if vr == "PN":
            return fnmatch.fnmatchcase(have.upper(), pattern.upper())
        return fnmatch.fnmatchcase(have, pattern)
    if vr == "PN":
        return have.upper() == wanted.upper()
    return have == wanted


def _answer(identifier: Dataset, level: str, group: _Group, ae_title: str) -> Dataset:
    """Exactly the requested keys (filled or left empty), plus QueryRetrieveLevel and the level's
    unique key, which a requestor needs to retrieve what it found."""
    rep = group.representative
    assert rep is not None
    computed = dict(group.computed if group.computed is not None else _computed(level, group.entries))
    computed["RetrieveAETitle"] = ae_title
    out = Dataset()
    if "SpecificCharacterSet" in rep:
        out.SpecificCharacterSet = rep.SpecificCharacterSet
    out.QueryRetrieveLevel = level
    for elem in identifier:
        if elem.keyword in ("QueryRetrieveLevel", "SpecificCharacterSet"):
            continue
        if elem.keyword in computed:
            out.add_new(elem.tag, elem.VR, computed[elem.keyword])
        elif elem.tag in rep:
            out[elem.tag] = _copy_element(rep[elem.tag])
        else:
            out.add_new(elem.tag, elem.VR, None)
    unique = UNIQUE_KEYS[level]
    if unique not in out:
        setattr(out, unique, rep.get(unique, ""))
    return out


def _copy_element(elem: DataElement) -> DataElement:
    """An answer's own copy of an indexed element, so editing an answer never edits the index.

    Deep only where the value is mutable (sequences, multi-values): a plain value (str, number,
    PersonName) is immutable and shared, which spares pydicom re-validating it in a deep copy, half
    of what answering a C-FIND match cost the simulator.
    """
    if elem.VR == "SQ" or isinstance(elem.value, MultiValue | list):
        return copy.deepcopy(elem)
    return copy.copy(elem)


def _contexts_for(entries: list[_Entry]) -> list[PresentationContext]:
    """One context per (SOP class, transfer syntax) held, so every file can go as stored; uncompressed
    ones also offer the other uncompressed syntaxes, which pynetdicom converts between, and a class
    held compressed also gets an uncompressed context, for a destination that declines compression."""
    wanted: dict[tuple[str, str], list[str | UID]] = {}
    for entry in entries:
        ts = UID(entry.transfer_syntax)
        syntaxes: list[str | UID] = [ts]
        if ts in _UNCOMPRESSED:
            syntaxes.extend(t for t in _UNCOMPRESSED if t != ts)
        wanted.setdefault((entry.sop_class_uid, ts), syntaxes)
        if ts not in _UNCOMPRESSED and syntax_class(ts) != "lossy":
            wanted.setdefault((entry.sop_class_uid, ExplicitVRLittleEndian),
                              [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    contexts = [build_context(sop_class, syntaxes) for (sop_class, _), syntaxes in wanted.items()]
    if len(contexts) > 128:
        log.warning("sim_pacs_too_many_contexts", count=len(contexts))
    return contexts[:128]

