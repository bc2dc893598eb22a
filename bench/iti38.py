"""ITI-38 FindDocuments through DUO against the codec floor and plain lxml, measured in the same run.

Measured: an XDS community's FindDocuments for one patient, answered by DUO from two TLB hospitals
(50 studies each) after a Mitz closed question per hospital: requests/s, p50/p99 latency and DUO's
CPU per request at 1 and 8 concurrent clients, once with the hospitals on SimPacs (pynetdicom, whose
~400 ms C-FIND hides much of DUO's own cost) and once on Orthanc (C++, loaded with the same studies
through storescu). DUO runs in its own process, Mitz (and SimPacs) in another, each Orthanc in its
own, the client in this one. Every request carries a fresh signed XUA assertion; all are built before
the clock starts (the signing time is printed, not counted), as a real initiating gateway signs on
its own CPU.

Floor: what no implementation of ITI-38 can skip, on this machine, with DUO's own codec and no I/O:
parse the very same request bytes, validate the XUA assertion (signature included), parse the
AdhocQuery, map the 100 study records to DocumentEntries and build + serialize the answer. The ratio
DUO latency ÷ floor says how much of a request is waiting on peers and plumbing rather than on
unavoidable CPU; /metrics deltas then say which peer (Mitz, C-FIND) the waiting is on.

Plain lxml: the answer-building stage of the floor (DocumentEntries to the serialized envelope) beside
the same answer built by plain lxml from the same entries, two ways (a SubElement tree, and an
etree.XML text template), interleaved request by request; ``build_ms_per_entry`` ÷
``lxml_ms_per_entry`` (the faster plain way) is the codec's overhead over lxml.

Correctness is checked on every answer (HTTP 200, Success, exactly one KOS entry per study), one
answer per network is compared entry by entry with the floor's, and the plain builds are compared with
DUO's (c14n), so a broken path cannot print a fast number. The last line is ``RESULT {json}``.

Usage: python -m bench.iti38 [--requests 50] [--clients 1 8] [--studies 50] [--pacs sim orthanc]
       [--reports]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from xml.sax.saxutils import escape as xml_escape

import aiohttp
from lxml import etree

from bench._harness import (
    Child,
    PreparedRequest,
    XdsCaller,
    bench_studies,
    consenting_patient,
    duo_config,
    exit_on_sigterm,
    histogram_deltas,
    median,
    network,
    parse_metrics,
    percentile,
    run_in_workdir,
    start_duo,
)
from duo_gateway.bsn import BSN_OID
from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.config.runtime import LoggingConfig
from duo_gateway.observability.logging import configure_logging
from duo_gateway.sim.config import SimHospital
from duo_gateway.sim.network import DUO_HOME_COMMUNITY_ID, HOST
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.studies import write_study
from duo_gateway.soap.envelope import (
    SOAP12_NS,
    WSA_NS,
    Addressing,
    new_message_id,
    parse_envelope,
    serialize_with,
)
from duo_gateway.soap.mtom import parse_mtom
from duo_gateway.soap.xml import parse_xml
from duo_gateway.sources.base import StudyRecord
from duo_gateway.xca.codes import (
    OBJECT_TYPE_CLASSIFICATION,
    OBJECT_TYPE_EXTERNAL_IDENTIFIER,
    QUERY_NS,
    REFERENCE_ID_LIST_SLOT,
    RS_NS,
    Action,
    ResponseStatus,
    Scheme,
)
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.entry_ids import name_uuid
from duo_gateway.xca.hl7 import Cx
from duo_gateway.xca.metadata import study_entry
from duo_gateway.xca.query import (
    AdhocQueryResponse,
    adhoc_query_response_bytes,
    build_adhoc_query_request,
    find_documents,
    parse_adhoc_query_request,
    parse_adhoc_query_response,
)
from duo_gateway.xmldsig import TrustStore
from duo_gateway.xua import peer_trust, validate_xua

SUCCESS = b'status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:Success"'
EXTRINSIC = b"<rim:ExtrinsicObject "
RIM = "urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
WARMUP = 10


class BrokenAnswer(AssertionError):
    """DUO answered, but not with the expected FindDocuments result: no number may be printed."""


@dataclass
class Run:
    clients: int
    latencies: list[float]
    wall_s: float
    last_body: bytes
    #: answers that were not the expected Success (count, first reason): the row then prints no rate
    failures: tuple[int, str]
    where: dict[tuple[str, ...], tuple[float, float]]
    handler: dict[tuple[str, ...], tuple[float, float]]
    #: CPU seconds (user + system, all threads) the DUO process and the peers process spent in the run
    duo_cpu_s: float = 0.0
    peers_cpu_s: float = 0.0


def cpu_s(pid: int) -> float:
    """User + system CPU time of a process so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def check(status: int, body: bytes, entries: int | None) -> None:
    """Cheap enough to run on every answer without delaying the other clients' requests."""
    if status != 200 or SUCCESS not in body[:4096]:
        start = body.find(b"status=", body.find(b"AdhocQueryResponse"))
        error = body.find(b"codeContext=")
        raise BrokenAnswer(f"HTTP {status}, not a Success answer: {body[start:start + 80]!r} "
                           f"{body[error:error + 300]!r}")
    got = body.count(EXTRINSIC)
    if entries is not None and got != entries:
        raise BrokenAnswer(f"{got} ExtrinsicObjects instead of {entries}")


async def load(url: str, requests: Sequence[PreparedRequest], clients: int,
               entries: int | None) -> tuple[list[float], float, bytes, tuple[int, str]]:
    """``clients`` workers, each posting the next unsent request as soon as its previous answer is read.

    A wrong answer does not stop the run (a deadline missed under load is a result worth seeing), but
    it is counted and its reason kept, and the report then prints no rate for that row.
    """
    latencies: list[float] = []
    last = b""
    failed = 0
    reason = ""
    queue = list(reversed(requests))
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    timeout = aiohttp.ClientTimeout(total=120)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            nonlocal last, failed, reason
            while queue:
                req = queue.pop()
                started = time.perf_counter()
                async with session.post(url, data=req.body, headers={"Content-Type": req.content_type}) as r:
                    body = await r.read()
                latencies.append(time.perf_counter() - started)
                try:
                    check(r.status, body, entries)
                except BrokenAnswer as exc:
                    failed += 1
                    reason = reason or str(exc)
                    continue
                last = body

        started = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(clients)))
        wall = time.perf_counter() - started
    return latencies, wall, last, (failed, reason)


def findscu_baseline(hospitals: Sequence[dict[str, Any]], bsn: str, studies: int,
                     repeats: int) -> float | None:
    """The peers' share: DCMTK findscu asking every SimPacs the same study-level C-FIND, in parallel.

    Median wall time over ``repeats`` (process start included, ~10 ms); None without DCMTK.
    """
    if shutil.which("findscu") is None:
        return None
    env = {**os.environ, "TCP_NODELAY": "1"}
    times: list[float] = []
    for _ in range(repeats):
        started = time.perf_counter()
        procs = [subprocess.Popen(
            ["findscu", "-S", "-aet", "BENCH", "-aec", h["ae_title"], "-k", "QueryRetrieveLevel=STUDY",
             "-k", f"PatientID={bsn}", "-k", "StudyInstanceUID", "-k", "StudyDate", "-k", "StudyTime",
             "-k", "AccessionNumber", "-k", "StudyDescription", "-k", "ModalitiesInStudy",
             "-k", "NumberOfStudyRelatedInstances", HOST, str(h["port"])],
            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for h in hospitals]
        outputs = [p.communicate(timeout=60) for p in procs]
        times.append(time.perf_counter() - started)
        for p, (_out, err) in zip(procs, outputs, strict=True):
            if p.returncode != 0 or err.count("Find Response") != studies:
                raise BrokenAnswer(f"findscu: exit {p.returncode}, {err.count('Find Response')} answers")
    return median(times)


def start_orthancs(stack: contextlib.ExitStack, work: Path, hospitals: Sequence[SimHospital],
                   args: argparse.Namespace) -> list[dict[str, Any]]:
    """``--pacs orthanc``: each hospital an Orthanc (C++) holding the same studies, so the peers'
    share of a request is small and what remains is DUO's."""
    from tests.support.orthanc import run_orthanc  # the project's Orthanc runner (TCP_NODELAY=1)

    net = network()
    out = []
    for h in hospitals:
        orthanc = stack.enter_context(run_orthanc(work / f"orthanc-{h.ae_title}", ae_title=h.ae_title))
        folder = work / f"load-{h.ae_title}"
        for study in bench_studies(net, h, args.studies, args.image_size, args.reports):
            write_study(study, folder)
        subprocess.run(["storescu", "-aet", "BENCH", "-aec", h.ae_title, "+sd", HOST,
                        str(orthanc.dicom_port), str(folder)], check=True, capture_output=True,
                       env={**os.environ, "TCP_NODELAY": "1"})
        shutil.rmtree(folder)
        out.append({"ura": h.ura, "name": h.name, "ae_title": h.ae_title, "port": orthanc.dicom_port,
                    "repository_unique_id": h.repository_unique_id})
    return out


async def scrape(base: str) -> str:
    async with aiohttp.ClientSession() as session, session.get(f"{base}/metrics") as r:
        return await r.text()


# -- the floor -------------------------------------------------------------------------------------


def study_records(net_hospitals: Sequence[Any], studies: int, image_size: int,
                  reports: bool) -> list[tuple[Any, StudyRecord]]:
    """The StudyRecords a study-level C-FIND of the preloaded PACSes yields (same generator, same seed)."""
    net = network()
    bsn = consenting_patient(net).bsn
    out: list[tuple[Any, StudyRecord]] = []
    for hospital in net_hospitals:
        for s in bench_studies(net, hospital, studies, image_size, reports):
            first = s.instances[0]
            out.append((hospital, StudyRecord(
                study_instance_uid=s.study_instance_uid, patient_id=bsn, study_date=s.study_date,
                study_time=s.study_time, accession_number=s.accession_number, description=s.description,
                modalities=tuple(sorted({str(ds.Modality) for ds in s.instances})),
                body_part=s.body_part.upper() or None,
                series_count=len(s.series_instance_uids), instance_count=len(s.instances),
                study_id=s.study_id, patient_name=str(first.PatientName),
                patient_birth_date=str(first.PatientBirthDate), patient_sex=str(first.PatientSex),
                institution_name=str(first.get("InstitutionName", "")) or None,
                referring_physician=str(first.get("ReferringPhysicianName", "")) or None)))
    return out


@dataclass
class Floor:
    per_request_s: float
    stages_s: dict[str, float]
    body: bytes
    entries: int
    #: plain lxml building the same answer (median per request): "tree" and "template", see below
    plain_s: dict[str, float]


def floor(requests: Sequence[PreparedRequest], config: DuoConfig, trust: TrustStore, issuer: str,
          records: Sequence[tuple[Any, StudyRecord]]) -> Floor:
    """DUO's codec alone on the same request bytes; median per request and per stage.

    Each request's answer is also built by plain lxml, both ways, right after DUO's (same entries,
    same ids): interleaved, so machine noise falls on both alike. The first plain answers are checked
    against DUO's (c14n), so the ratio is of two builds of one answer.
    """
    bsn = consenting_patient(network()).bsn
    codes = {h.ura: h.document_codes for h in config.tlb_hospitals}
    limit = config.xca_responding.max_request_bytes
    stages: dict[str, list[float]] = {"parse": [], "xua": [], "query": [], "mapping": [], "answer": []}
    plain: dict[str, list[float]] = {"tree": [], "template": []}
    builders = {"tree": plain_tree_answer, "template": plain_template_answer}
    totals: list[float] = []
    body = b""
    entries: list[DocumentEntry] = []
    for req in requests:
        t0 = time.perf_counter()
        root, _parts = parse_mtom(req.content_type, req.body, limit)
        env = parse_envelope(root)
        t1 = time.perf_counter()
        requester = validate_xua(env, config.xua, issuer=issuer, trusted=trust,
                                 audiences=[DUO_HOME_COMMUNITY_ID], now=datetime.now(UTC))
        assert requester is not None and env.body is not None
        t2 = time.perf_counter()
        query = parse_adhoc_query_request(env.body)
        assert query.single("$XDSDocumentEntryPatientId") is not None
        t3 = time.perf_counter()
        entries = [
            study_entry(rec, bsn=bsn, hospital_ura=h.ura, hospital_name=h.name,
                        repository_unique_id=h.repository_unique_id, home=DUO_HOME_COMMUNITY_ID,
                        codes=codes[h.ura])
            for h, rec in records]
        t4 = time.perf_counter()
        message_id = new_message_id()
        body = duo_answer(entries, message_id, env.addressing.message_id or "")
        t5 = time.perf_counter()
        for name, secs in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4), strict=True):
            stages[name].append(secs)
        totals.append(t5 - t0)
        for name, build in builders.items():
            started = time.perf_counter()
            other = build(entries, message_id, env.addressing.message_id or "")
            plain[name].append(time.perf_counter() - started)
            if len(plain[name]) == 1 and _c14n(other) != _c14n(body):
                raise BrokenAnswer(f"plain lxml ({name}) did not build DUO's answer: no ratio to print")
    return Floor(median(totals), {k: median(v) for k, v in stages.items()}, body, len(entries),
                 {k: median(v) for k, v in plain.items()})


def _c14n(body: bytes) -> bytes:
    return etree.tostring(parse_xml(body, max_bytes=1 << 30), method="c14n", exclusive=True)


def duo_answer(entries: Sequence[DocumentEntry], message_id: str, relates_to: str) -> bytes:
    """DUO's ITI-38 Success envelope for ``entries``, made as the responding transport makes it."""
    return serialize_with(
        Addressing(action=Action.ITI38_RESPONSE, message_id=message_id, relates_to=relates_to),
        adhoc_query_response_bytes(AdhocQueryResponse(ResponseStatus.SUCCESS, tuple(entries))))

# -- plain lxml: the same answer without DUO's codec ----------------------------------------------
#
# What the fastest straightforward lxml code takes to build and serialize exactly DUO's answer from the
# same DocumentEntries, two ways: a tree made element by element (Clark names computed once, attribute
# dicts handed to SubElement, every element made in place, no checks), and a text template per
# element filled with escaped values, parsed with etree.XML and serialized (the fastest of the two on
# this machine). The child ids come from the same entry_ids.name_uuid as DUO's, so what is compared is
# the building. tests/xca/test_plain_answer.py holds both to DUO's output (c14n- and byte-equal), so
# the ratio stays honest.

_S, _A = f"{{{SOAP12_NS}}}", f"{{{WSA_NS}}}"
_P_ENVELOPE, _P_HEADER, _P_BODY = _S + "Envelope", _S + "Header", _S + "Body"
_P_ACTION, _P_MESSAGE_ID, _P_RELATES_TO = _A + "Action", _A + "MessageID", _A + "RelatesTo"
_P_MUST_UNDERSTAND = _S + "mustUnderstand"
_P_RESPONSE = f"{{{QUERY_NS}}}AdhocQueryResponse"
_R = f"{{{RIM}}}"
(_P_ROL, _P_EO, _P_SLOT, _P_VALUE_LIST, _P_VALUE, _P_NAME, _P_LOCALIZED, _P_VERSION, _P_CLASSIFICATION,
 _P_EXTERNAL) = (_R + n for n in ("RegistryObjectList", "ExtrinsicObject", "Slot", "ValueList", "Value",
                                  "Name", "LocalizedString", "VersionInfo", "Classification",
                                  "ExternalIdentifier"))


def _plain_slot(parent: etree._Element, name: str, values: Sequence[str]) -> etree._Element:
    vl = etree.SubElement(etree.SubElement(parent, _P_SLOT, name=name), _P_VALUE_LIST)
    for v in values:
        etree.SubElement(vl, _P_VALUE).text = v
    return parent


def _plain_name(parent: etree._Element, text: str) -> None:
    etree.SubElement(etree.SubElement(parent, _P_NAME), _P_LOCALIZED, value=text)


# What both baselines write for an entry, in DUO's order: one list, two encoders of it.


def _entry_slots(e: DocumentEntry) -> list[tuple[str, Sequence[str]]]:
    single = (("creationTime", e.creation_time), ("hash", e.hash), ("languageCode", e.language_code),
              ("repositoryUniqueId", e.repository_unique_id), ("serviceStartTime", e.service_start_time),
              ("serviceStopTime", e.service_stop_time), ("size", None if e.size is None else str(e.size)),
              ("sourcePatientId", e.source_patient_id or e.patient_id))
    slots: list[tuple[str, Sequence[str]]] = [(name, (value,)) for name, value in single if value]
    if e.reference_ids:
        slots.append((REFERENCE_ID_LIST_SLOT, e.reference_ids))
    slots.extend(e.extra_slots)
    return slots


def _author_slots(author: Any) -> list[tuple[str, Sequence[str]]]:
    return [(name, values) for name, values in (
        ("authorPerson", (author.person,) if author.person else ()),
        ("authorInstitution", [str(x) for x in author.institutions]),
        ("authorRole", author.roles), ("authorSpecialty", author.specialties)) if values]


def _coded(e: DocumentEntry) -> tuple[tuple[Scheme, str, Sequence[Any]], ...]:
    return ((Scheme.CLASS_CODE, "classCode", (e.class_code,)),
            (Scheme.CONFIDENTIALITY_CODE, "confidentialityCode", e.confidentiality_codes),
            (Scheme.EVENT_CODE_LIST, "eventCode", e.event_codes),
            (Scheme.FORMAT_CODE, "formatCode", (e.format_code,)),
            (Scheme.HEALTHCARE_FACILITY_TYPE_CODE, "facilityCode", (e.healthcare_facility_type_code,)),
            (Scheme.PRACTICE_SETTING_CODE, "practiceCode", (e.practice_setting_code,)),
            (Scheme.TYPE_CODE, "typeCode", (e.type_code,)))


def _identifiers(e: DocumentEntry) -> tuple[tuple[Scheme, str, str], ...]:
    return ((Scheme.PATIENT_ID, e.patient_id, "XDSDocumentEntry.patientId"),
            (Scheme.UNIQUE_ID, e.unique_id, "XDSDocumentEntry.uniqueId"))


def plain_tree_answer(entries: Sequence[DocumentEntry], message_id: str, relates_to: str) -> bytes:
    """The serialized ITI-38 Success envelope DUO sends for ``entries``, one SubElement per element."""
    sub = etree.SubElement
    env = etree.Element(_P_ENVELOPE, nsmap={"s": SOAP12_NS, "a": WSA_NS})
    header = sub(env, _P_HEADER)
    sub(header, _P_ACTION, {_P_MUST_UNDERSTAND: "1"}).text = Action.ITI38_RESPONSE
    sub(header, _P_MESSAGE_ID).text = message_id
    sub(header, _P_RELATES_TO).text = relates_to
    resp = sub(sub(env, _P_BODY), _P_RESPONSE, {"status": ResponseStatus.SUCCESS.value},
               nsmap={"query": QUERY_NS, "rim": RIM, "rs": RS_NS})
    rol = sub(resp, _P_ROL)
    for e in entries:
        uid = e.entry_uuid
        eo = sub(rol, _P_EO, {"id": uid, "lid": uid, "home": e.home or "", "objectType": e.object_type,
                              "status": e.status, "mimeType": e.mime_type, "isOpaque": "false"})
        for name, values in _entry_slots(e):
            _plain_slot(eo, name, values)
        if e.title:
            _plain_name(eo, e.title)
        sub(eo, _P_VERSION, versionName=e.version)
        for i, author in enumerate(e.authors):
            cl = sub(eo, _P_CLASSIFICATION, {
                "id": name_uuid(uid, "author", str(i)), "objectType": OBJECT_TYPE_CLASSIFICATION,
                "classificationScheme": Scheme.AUTHOR, "classifiedObject": uid, "nodeRepresentation": ""})
            for name, values in _author_slots(author):
                _plain_slot(cl, name, values)
        for scheme, role, codes in _coded(e):
            for i, code in enumerate(codes):
                if code is None:
                    continue
                cl = sub(eo, _P_CLASSIFICATION, {
                    "id": name_uuid(uid, role, str(i)), "objectType": OBJECT_TYPE_CLASSIFICATION,
                    "classificationScheme": scheme, "classifiedObject": uid,
                    "nodeRepresentation": code.code})
                _plain_slot(cl, "codingScheme", (code.scheme,))
                _plain_name(cl, code.display or code.code)
        for scheme, value, name in _identifiers(e):
            ei = sub(eo, _P_EXTERNAL, {
                "id": name_uuid(uid, name, "0"), "objectType": OBJECT_TYPE_EXTERNAL_IDENTIFIER,
                "registryObject": uid, "identificationScheme": scheme, "value": value})
            _plain_name(ei, name)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


_ATTRIBUTE_ENTITIES = {'"': "&quot;", "\t": "&#9;", "\n": "&#10;", "\r": "&#13;"}
_TEXT_ENTITIES = {"\r": "&#13;"}


def _tpl_slot(out: list[str], name: str, values: Sequence[str]) -> None:
    out.append(f'<rim:Slot name="{xml_escape(name, _ATTRIBUTE_ENTITIES)}"><rim:ValueList>')
    out.extend(f"<rim:Value>{xml_escape(v, _TEXT_ENTITIES)}</rim:Value>" for v in values)
    out.append("</rim:ValueList></rim:Slot>")


def _tpl_name(out: list[str], text: str) -> None:
    out.append(f'<rim:Name><rim:LocalizedString value="{xml_escape(text, _ATTRIBUTE_ENTITIES)}"/></rim:Name>')


def plain_template_answer(entries: Sequence[DocumentEntry], message_id: str, relates_to: str) -> bytes:
    """The same envelope as :func:`plain_tree_answer`: the response as text, etree.XML, one tostring."""
    def a(value: str) -> str:
        return xml_escape(value, _ATTRIBUTE_ENTITIES)

    out = [f'<query:AdhocQueryResponse xmlns:query="{QUERY_NS}" xmlns:rim="{RIM}" xmlns:rs="{RS_NS}" '
           f'status="{ResponseStatus.SUCCESS.value}"><rim:RegistryObjectList>']
    for e in entries:
        uid = a(e.entry_uuid)
        out.append(f'<rim:ExtrinsicObject id="{uid}" lid="{uid}" home="{a(e.home or "")}" '
                   f'objectType="{a(e.object_type)}" status="{a(e.status)}" mimeType="{a(e.mime_type)}" '
                   'isOpaque="false">')
        for name, values in _entry_slots(e):
            _tpl_slot(out, name, values)
        if e.title:
            _tpl_name(out, e.title)
        out.append(f'<rim:VersionInfo versionName="{a(e.version)}"/>')
        for i, author in enumerate(e.authors):
            out.append(f'<rim:Classification id="{name_uuid(e.entry_uuid, "author", str(i))}" '
                       f'objectType="{OBJECT_TYPE_CLASSIFICATION}" '
                       f'classificationScheme="{Scheme.AUTHOR.value}" classifiedObject="{uid}" '
                       'nodeRepresentation="">')
            for name, values in _author_slots(author):
                _tpl_slot(out, name, values)
            out.append("</rim:Classification>")
        for scheme, role, codes in _coded(e):
            for i, code in enumerate(codes):
                if code is None:
                    continue
                out.append(f'<rim:Classification id="{name_uuid(e.entry_uuid, role, str(i))}" '
                           f'objectType="{OBJECT_TYPE_CLASSIFICATION}" classificationScheme="{scheme.value}" '
                           f'classifiedObject="{uid}" nodeRepresentation="{a(code.code)}">')
                _tpl_slot(out, "codingScheme", (code.scheme,))
                _tpl_name(out, code.display or code.code)
                out.append("</rim:Classification>")
        for scheme, value, name in _identifiers(e):
            out.append(f'<rim:ExternalIdentifier id="{name_uuid(e.entry_uuid, name, "0")}" '
                       f'objectType="{OBJECT_TYPE_EXTERNAL_IDENTIFIER}" registryObject="{uid}" '
                       f'identificationScheme="{scheme.value}" value="{a(value)}">')
            _tpl_name(out, name)
            out.append("</rim:ExternalIdentifier>")
        out.append("</rim:ExtrinsicObject>")
    out.append("</rim:RegistryObjectList></query:AdhocQueryResponse>")
    response = etree.XML("".join(out).encode(), _TEMPLATE_PARSER)
    env = etree.Element(_P_ENVELOPE, nsmap={"s": SOAP12_NS, "a": WSA_NS})
    header = etree.SubElement(env, _P_HEADER)
    etree.SubElement(header, _P_ACTION, {_P_MUST_UNDERSTAND: "1"}).text = Action.ITI38_RESPONSE
    etree.SubElement(header, _P_MESSAGE_ID).text = message_id
    etree.SubElement(header, _P_RELATES_TO).text = relates_to
    etree.SubElement(env, _P_BODY).append(response)
    return etree.tostring(env, xml_declaration=True, encoding="UTF-8")


#: Own text of any size: the limits of the hardened parser are for peer bytes.
_TEMPLATE_PARSER = etree.XMLParser(resolve_entities=False, no_network=True, huge_tree=True)


def entries_of(body: bytes) -> dict[str, bytes]:
    """uniqueId → canonical ExtrinsicObject, to compare DUO's answer with the floor's."""
    root, _ = parse_mtom("application/soap+xml", body, 1 << 26)
    env = parse_envelope(root)
    assert env.body is not None
    resp = parse_adhoc_query_response(env.body)
    if resp.status != ResponseStatus.SUCCESS:
        raise BrokenAnswer(f"status {resp.status}")
    out = {}
    for eo in env.body.iter(f"{{{RIM}}}ExtrinsicObject"):
        unique = next(e.get("value") for e in eo.iter(f"{{{RIM}}}ExternalIdentifier")
                      if e.get("identificationScheme") == "urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab")
        out[str(unique)] = etree.tostring(eo, method="c14n", exclusive=True)
    return out


# -- main -------------------------------------------------------------------------------------------


@dataclass
class PacsRun:
    """One network (Mitz, the hospitals on one kind of PACS, DUO) and what was measured against it."""

    pacs: str
    runs: list[Run]
    #: DCMTK findscu's study-level C-FIND of every hospital in parallel (the peers' share), if DCMTK
    pacs_s: float | None
    #: DUO's answer byte size and how many of its entries equal the floor's (c14n)
    size: int
    same: int
    entries: int


_PACS_NAME = {"sim": "SimPacs", "orthanc": "Orthanc"}


def report(args: argparse.Namespace, results: list[PacsRun], fl: Floor, signing: tuple[int, float],
           hospitals: int) -> dict[str, Any]:
    """Print the tables; return the RESULT line's content."""
    signed, secs = signing
    print(f"ITI-38 FindDocuments, 1 patient, {hospitals} TLB hospitals × {args.studies} studies"
          f"{' with reports' if args.reports else ''}, Mitz simulator (no consent cache); "
          "DUO, peers and client in 3 processes, loopback")
    print(f"XUA: {signed} requests signed up front in {secs:.2f} s ({secs / signed * 1e3:.1f} ms each, "
          "RSA), excluded from the timings")
    stage_txt = ", ".join(f"{k} {v * 1e3:.2f}" for k, v in fl.stages_s.items())
    print(f"floor (DUO's codec only, no I/O, median of {args.requests}): {fl.per_request_s * 1e3:.2f} ms"
          f"/request = {1 / fl.per_request_s:.0f} req/s on one core  [{stage_txt} ms]")
    n = fl.entries
    build = fl.stages_s["answer"] / n
    lxml_best = min(fl.plain_s.values()) / n
    entry_bytes = len(fl.body) / n
    print(f"answer building, {n} entries of {entry_bytes / 1e3:.1f} kB (envelope included, serialized): "
          f"DUO {build * 1e3:.3f} ms/entry; plain lxml, same answer, same run: "
          + ", ".join(f"{k} {v / n * 1e3:.3f}" for k, v in fl.plain_s.items())
          + f" ms/entry; DUO ÷ fastest plain lxml = {build / lxml_best:.2f}")
    result: dict[str, Any] = {
        "build_ms_per_entry": round(build * 1e3, 4), "lxml_ms_per_entry": round(lxml_best * 1e3, 4),
        "build_ratio_lxml": round(build / lxml_best, 3),
        "lxml_ms_per_entry_by_way": {k: round(v / n * 1e3, 4) for k, v in fl.plain_s.items()},
        "mapping_ms_per_entry": round(fl.stages_s["mapping"] / n * 1e3, 4),
        "floor_ms": round(fl.per_request_s * 1e3, 3), "entries": n, "entry_bytes": round(entry_bytes),
        "pacs": {},
    }
    for pr in results:
        pacs = _PACS_NAME[pr.pacs]
        print(f"-- {pacs}: answer {pr.entries} entries, {pr.size / 1e3:.0f} kB from DUO; "
              f"{pr.same}/{pr.entries} entries byte-identical to the floor's (c14n)")
        if pr.pacs_s is not None:
            print(f"peers alone: DCMTK findscu, same study-level C-FIND to the {hospitals} {pacs} in "
                  f"parallel: {pr.pacs_s * 1e3:.0f} ms (median of 20, process start included)")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>8} {'p50 ms':>8} {'p99 ms':>8} {'p50÷floor':>10}"
              f" {'req/s ÷ floor rate':>19} {'DUO CPU ms/req':>15} {'DUO cores':>10}")
        per_clients: dict[str, Any] = {}
        for r in pr.runs:
            if r.failures[0]:
                print(f"{r.clients:>7} {len(r.latencies):>8}  FAILED: {r.failures[0]} answers not a full "
                      f"Success, e.g. {r.failures[1][:300]}")
                per_clients[str(r.clients)] = {"failed": r.failures[0], "requests": len(r.latencies)}
                continue
            rate = len(r.latencies) / r.wall_s
            p50, p99 = percentile(r.latencies, 50), percentile(r.latencies, 99)
            duo_cpu = r.duo_cpu_s / len(r.latencies)
            print(f"{r.clients:>7} {len(r.latencies):>8} {rate:>8.1f} {p50 * 1e3:>8.1f} {p99 * 1e3:>8.1f}"
                  f" {p50 / fl.per_request_s:>10.1f} {rate * fl.per_request_s:>19.2f}"
                  f" {duo_cpu * 1e3:>15.0f} {r.duo_cpu_s / r.wall_s:>10.2f}")
            per_clients[str(r.clients)] = {"p50_ms": round(p50 * 1e3, 1), "p99_ms": round(p99 * 1e3, 1),
                                           "req_s": round(rate, 2),
                                           "duo_cpu_ms_per_request": round(duo_cpu * 1e3),
                                           "duo_cores": round(r.duo_cpu_s / r.wall_s, 2)}
            if pr.pacs == "sim":
                per_clients[str(r.clients)]["peers_cpu_ms_per_request"] = round(
                    r.peers_cpu_s / len(r.latencies) * 1e3)
        if pr.pacs_s is not None and pr.runs and pr.runs[0].clients == 1 and not pr.runs[0].failures[0]:
            own = percentile(pr.runs[0].latencies, 50) - pr.pacs_s
            print(f"beyond the peers' study-level C-FIND at 1 client: p50 − peers alone = {own * 1e3:.0f} ms"
                  f" = {own / fl.per_request_s:.1f}× the floor (DUO's work plus any further PACS queries)")
        print("where DUO's time goes (server-side means from its /metrics; hospitals are asked in parallel):")
        for r in pr.runs:
            count_requests = len(r.latencies)
            parts = []
            for (route, _m), (count, total) in sorted(r.handler.items()):
                if "iti38" in route:
                    parts.append(f"handler {total / count * 1e3:.1f} ms")
            for (peer, op), (count, total) in sorted(r.where.items()):
                parts.append(f"{peer} {op} {count / count_requests:.1f}×{total / count * 1e3:.1f} ms")
            print(f"  {r.clients} client(s): " + "; ".join(parts))
        result["pacs"][pr.pacs] = {
            "clients": per_clients,
            "findscu_ms": None if pr.pacs_s is None else round(pr.pacs_s * 1e3, 1)}
    return result


async def bench_pacs(args: argparse.Namespace, work: Path, pacs: str, pki: Pki,
                     records: Sequence[tuple[Any, StudyRecord]], want_floor: bool
                     ) -> tuple[PacsRun, Floor | None, tuple[int, float]]:
    """Start Mitz, the hospitals on ``pacs`` and DUO; load them; measure the floor too if asked."""
    net = network()
    hospitals = net.hospitals[: args.hospitals]
    sim_hospitals = 0 if pacs == "orthanc" else args.hospitals
    work = work / pacs
    work.mkdir()
    peers = Child("bench._peers", ["--workdir", str(work / "peers"), "--hospitals", str(sim_hospitals),
                                   "--studies", str(args.studies), "--image-size", str(args.image_size),
                                   *(["--reports"] if args.reports else [])], work, "peers")
    duo: Child | None = None
    orthancs = contextlib.ExitStack()
    try:
        if pacs == "orthanc":
            pacs_list = await asyncio.to_thread(start_orthancs, orthancs, work, hospitals, args)
        info = await asyncio.to_thread(peers.wait_ready)
        if pacs != "orthanc":
            pacs_list = info["hospitals"]
        tlb = [{"ura": h["ura"], "name": h["name"], "ae_title": h["ae_title"], "host": HOST,
                "port": h["port"], "repository_unique_id": h["repository_unique_id"]}
               for h in pacs_list]
        raw = duo_config(work, tlb, info["mitz_url"], pki.ca_cert)
        started_duo, ready = await asyncio.to_thread(start_duo, work, raw)
        duo, duo_pid = started_duo, started_duo.pid
        base = ready["http_url"]
        config = parse_config(raw, base_dir=work, source="bench", env={})
        url = base + config.xca_responding.iti38_path

        bsn = consenting_patient(net).bsn
        query = build_adhoc_query_request(find_documents(Cx(bsn, BSN_OID)))
        caller = XdsCaller(pki)
        total = WARMUP + args.requests * len(args.clients)
        started = time.perf_counter()
        prepared = [caller.request(url, Action.ITI38, query) for _ in range(total)]
        signing = (total, time.perf_counter() - started)

        expected = len(records)
        if args.reports:
            # One KOS per study plus one entry per report: learn the count from a first answer.
            # A request of its own: DUO refuses a MessageID it has seen (replay), so none is sent twice.
            _lat, _wall, first, _failed = await load(url, [caller.request(url, Action.ITI38, query)], 1, None)
            expected = first.count(EXTRINSIC)
            if expected <= len(records):
                raise BrokenAnswer(f"with reports expected more than {len(records)} entries, got {expected}")
        _lat, _wall, _last, (failed, reason) = await load(url, prepared[:WARMUP], 1, expected)
        if failed:
            raise BrokenAnswer(f"{pacs} warm-up: {failed}/{WARMUP} wrong answers: {reason}")
        pacs_s = await asyncio.to_thread(findscu_baseline, pacs_list, bsn, args.studies, 20)

        runs: list[Run] = []
        offset = WARMUP
        for clients in args.clients:
            batch = prepared[offset:offset + args.requests]
            offset += args.requests
            before = parse_metrics(await scrape(base))
            cpu_before = cpu_s(duo_pid), cpu_s(peers.pid)
            lat, wall, last, failures = await load(url, batch, clients, expected)
            cpu_after = cpu_s(duo_pid), cpu_s(peers.pid)
            after = parse_metrics(await scrape(base))
            runs.append(Run(clients, lat, wall, last, failures,
                            histogram_deltas(before, after, "duo_peer_request_duration_seconds",
                                             ("peer", "operation")),
                            histogram_deltas(before, after, "duo_http_request_duration_seconds",
                                             ("route", "method")),
                            cpu_after[0] - cpu_before[0], cpu_after[1] - cpu_before[1]))
        fl = None
        if want_floor:
            peer = config.clients.xca[0]
            fl = floor(prepared[WARMUP:WARMUP + args.requests], config, peer_trust(peer), peer.issuer,
                       records)
        good = [r for r in runs if r.last_body]
        if not good:
            raise BrokenAnswer(f"{pacs}: no correct answer in any run: {runs[0].failures[1]}")
        duo_entries = entries_of(good[-1].last_body)
        return (PacsRun(pacs, runs, pacs_s, len(good[-1].last_body), 0, len(duo_entries)), fl, signing)
    finally:
        if duo is not None:
            await asyncio.to_thread(duo.stop)
        await asyncio.to_thread(peers.stop)
        await asyncio.to_thread(orthancs.close)


async def amain(args: argparse.Namespace, work: Path) -> int:
    net = network()
    hospitals = net.hospitals[: args.hospitals]
    pki = make_pki(work / "pki", key_type="rsa")
    records = study_records(hospitals, args.studies, args.image_size, args.reports)
    results: list[PacsRun] = []
    fl: Floor | None = None
    signing = (0, 0.0)
    bodies: dict[str, bytes] = {}
    for pacs in args.pacs:
        pr, got_floor, signing = await bench_pacs(args, work, pacs, pki, records, fl is None)
        fl = fl or got_floor
        results.append(pr)
        bodies[pacs] = next(r.last_body for r in reversed(pr.runs) if r.last_body)
    assert fl is not None
    floor_entries = entries_of(fl.body)
    for pr in results:
        duo_entries = entries_of(bodies[pr.pacs])
        if not args.reports and set(duo_entries) != set(floor_entries):
            raise BrokenAnswer(f"DUO's answer ({pr.pacs}) and the floor's name different documents")
        pr.same = sum(1 for k, v in floor_entries.items() if duo_entries.get(k) == v)
    result = report(args, results, fl, signing, len(hospitals))
    print("RESULT " + json.dumps(result, sort_keys=True))
    return 1 if any(r.failures[0] for pr in results for r in pr.runs) else 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=50, help="timed requests per client count")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8], help="concurrent clients")
    parser.add_argument("--hospitals", type=int, default=2, choices=[1, 2])
    parser.add_argument("--studies", type=int, default=50, help="studies per hospital")
    parser.add_argument("--image-size", type=int, default=8)
    parser.add_argument("--pacs", choices=["sim", "orthanc"], nargs="+", default=["sim", "orthanc"],
                        help="the hospitals' PACS, one network after the other: SimPacs (pynetdicom, one "
                             "peers process) and/or Orthanc (C++, one process per hospital)")
    parser.add_argument("--reports", action="store_true",
                        help="keep the report (SR) of every other study: DUO then walks those studies too")
    args = parser.parse_args(argv)
    configure_logging(LoggingConfig(level="WARNING"))
    exit_on_sigterm()
    return run_in_workdir("duo-bench-iti38-", lambda work: asyncio.run(amain(args, work)))


if __name__ == "__main__":
    raise SystemExit(main())
