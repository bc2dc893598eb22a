"""A simulated XCA / XCA-I Responding Gateway: one community holding generated imaging studies.

It speaks the same codec the real gateway uses (so wire bugs show up in both directions) and serves,
per study, a KOS manifest entry and, when the study has one, the report as a stand-alone DICOM SR
entry (netherlands.md §4: "reports stand alone"); images come through RAD-75. The metadata and the
KOS come from :mod:`duo_gateway.xca.metadata`, the mapping DUO applies to a TLB PACS, fed with what a
C-FIND on this study would return; so the sim's entries are DUO's for the same study, size and hash
left out included.

Simplifications, on purpose:

- No consent check. Real responding communities ask Mitz themselves (netherlands.md §2 step 6);
  the gateway under test is what must not forward data without consent, so the sim answers anyone.
- Only the network's patients are known; any other patient id gets an empty Success, the local
  policy xca.md §5 allows.
- No XUA/SAML validation; a ``wsse:Security`` header is ignored.
- A patient may be given thousands of studies cheaply (``manifest_only_studies``): those are listed
  by their KOS entry alone, made from the study headers, and generated in full only when retrieved.
  FindDocuments for ObjectRef and GetDocuments (by entryUUID or uniqueId) answer them like any other,
  which is how an Initiating Gateway gets such a patient (NIST 12306, 12307).
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import partial
from typing import Final

import structlog
from aiohttp import web
from lxml import etree
from pydicom.dataset import Dataset

from duo_gateway.bsn import BSN_OID
from duo_gateway.config.xca import DocumentCodes
from duo_gateway.dicom.kos import encode_part10
from duo_gateway.sim.behaviour import Misbehaviour, XcaMisbehaviour
from duo_gateway.sim.codecs import encoded, serving_syntax
from duo_gateway.sim.config import SimCommunity, SimInstitution, SimNetworkConfig, SimPatient
from duo_gateway.sim.http import current_behaviour, install_behaviour
from duo_gateway.sim.manifests import grow_manifest
from duo_gateway.sim.studies import (
    GeneratedStudy,
    StudyHeader,
    generate_studies,
    generate_study,
    study_headers,
)
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_NS,
    Addressing,
    SoapFault,
    build_envelope,
    build_fault,
    fault_http_status,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.soap.mtom import Attachment, build_mtom, parse_mtom
from duo_gateway.soap.xml import XmlError, parse_xml, to_bytes
from duo_gateway.sources.base import InstanceRecord, StudyRecord
from duo_gateway.xca.codes import (
    MIME_DICOM,
    Action,
    EntryType,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    StoredQuery,
)
from duo_gateway.xca.ebrim import DocumentEntry, ObjectRef, build_extrinsic_object, rim
from duo_gateway.xca.errors import RegistryError, RegistryErrorException, status_for
from duo_gateway.xca.hl7 import Code, Cx, Hl7FormatError, dtm_key, parse_reference_id
from duo_gateway.xca.metadata import KOS_FORMAT, MIME_PDF, is_report, kos_for_study, report_entry, study_entry
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_response,
    parse_adhoc_query_request,
    validate_stored_query,
)
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrievedDocument,
    RetrieveDocumentSetResponse,
    build_retrieve_response,
    composite_context,
    parse_imaging_retrieve_request,
    parse_retrieve_request,
)

log = structlog.get_logger(__name__)

#: Largest request body accepted; requests are metadata only, so this is generous.
MAX_REQUEST_BYTES: Final = 4 * 1024 * 1024
#: LeafClass answers of more entries are built in a worker thread (~1 ms an entry, ~0.1 s here).
INLINE_ENTRIES: Final = 100
#: Manifest-only studies kept generated after a retrieve (a transfer asks one study's instances in
#: several RAD-75 requests, so the last few are worth keeping; more would hold images for nothing).
MATERIALIZED_STUDIES: Final = 8

_ACTIONS: Final = {
    "/iti38": (Action.ITI38, Action.ITI38_RESPONSE),
    "/iti39": (Action.ITI39, Action.ITI39_RESPONSE),
    "/rad75": (Action.RAD75, Action.RAD75_RESPONSE),
}


@dataclass(frozen=True)
class SimDocument:
    """A registered document: its metadata, its bytes (or, for a manifest-only study, how to make them
    when retrieved), and the BSN it belongs to (never logged)."""

    entry: DocumentEntry
    content: bytes | Callable[[], bytes]
    bsn: str

    @property
    def data(self) -> bytes:
        return self.content if isinstance(self.content, bytes) else self.content()


@dataclass(frozen=True)
class _Reply:
    body: etree._Element
    attachments: Sequence[Attachment] = ()
    mtom: bool = False


def community_seed(net: SimNetworkConfig, community: SimCommunity) -> int:
    """Seed for a community's studies: stable across processes (unlike ``hash()``)."""
    digest = hashlib.sha256(community.home_community_id.encode()).digest()
    return net.seed + int.from_bytes(digest[:4], "big")


class XcaCommunitySimulator:
    """Holds the community's generated studies and answers ITI-38, ITI-39 and RAD-75."""

    def __init__(self, community: SimCommunity, net: SimNetworkConfig, *,
                 studies: Sequence[tuple[SimPatient, SimInstitution, GeneratedStudy]] | None = None) -> None:
        """``studies`` replaces the generated ones, for a test whose case prescribes their shape (a
        conformance case's single-image study, six images in one series); they are served as given."""
        self.community = community
        self.home = community.home_community_id
        self.repository_unique_id = community.repository_unique_id
        #: The Dutch defaults a TLB hospital gets when its config names none (config/xca.py).
        self.codes = DocumentCodes()
        self._patients = {p.bsn: p for p in net.patients}
        self.studies: list[tuple[SimPatient, SimInstitution, GeneratedStudy]] = []
        seed = community_seed(net, community)
        #: (Study Instance UID, transfer syntax) of every study held other than Explicit VR LE.
        self.compressed: list[tuple[str, str]] = []
        if studies is not None:
            self.studies.extend(studies)
        else:
            for patient in net.patients:
                for institution in community.institutions:
                    encodings = community.encodings(patient.bsn, institution)
                    generated = generate_studies(patient, institution, community.studies_per_patient, seed,
                                                 net.image_size, encodings=encodings)
                    self.studies.extend((patient, institution, study) for study in generated)
                    self.compressed.extend((generated[i].study_instance_uid, ts)
                                           for i, ts in sorted(encodings.items()))
        self.documents: list[SimDocument] = []
        self._instances: dict[tuple[str, str, str], Dataset] = {}
        for patient, institution, study in self.studies:
            self.documents.extend(self._index(patient, institution, study))
            for ds in study.instances:
                key = (study.study_instance_uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
                self._instances[key] = ds
        #: Manifest-only studies by study UID: where to generate them from when one is retrieved.
        self._manifest_only: dict[str, tuple[SimPatient, SimInstitution, int]] = {}
        self._materialized: OrderedDict[str, GeneratedStudy] = OrderedDict()
        self._seed, self._image_size = seed, net.image_size
        for patient in net.patients:
            count = community.manifest_only_studies.get(patient.bsn, 0)
            first = community.studies_per_patient
            institution = community.institutions[0]
            for header in study_headers(patient, institution, range(first, first + count), seed):
                self.documents.append(self._manifest_only_document(patient, institution, header))
        self._by_unique_id = {d.entry.unique_id: d for d in self.documents}
        self._by_entry_uuid = {d.entry.entry_uuid.lower(): d for d in self.documents}
        #: Serialized ExtrinsicObjects by entryUUID (see _extrinsic_object).
        self._built: dict[str, bytes] = {}
        #: Oversized manifests by (uniqueId, size) (XcaMisbehaviour.oversized_manifest_bytes).
        self._grown: dict[tuple[str, int], bytes] = {}

    def instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        """An instance as the archive holds it now (RAD-75 serves it from this)."""
        return self._instance(study_uid, series_uid, sop_uid)

    def store_instance(self, ds: Dataset) -> None:
        """Hold ``ds`` instead of the instance with its UIDs, as a re-import into the archive would: how a
        test puts an encoding the simulators cannot make themselves (DCMTK's JPEG Lossless, say) in place.
        Only the encoding may change; the manifest and metadata stay what they were."""
        key = (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        if key not in self._instances:
            raise KeyError(f"{key[2]} is not an instance of this community")
        self._instances[key] = ds

    # --- the document index ---

    def _index(
        self, patient: SimPatient, institution: SimInstitution, study: GeneratedStudy
    ) -> list[SimDocument]:
        # The same mapping DUO applies to a TLB PACS's C-FIND answers, fed with what a C-FIND would
        # return for this study: a test that passes against the sim says something about DUO.
        record = study_record(patient, study)
        instances = [instance_record(ds) for ds in study.instances]
        kos = kos_for_study(record, instances, bsn=patient.bsn,
                            repository_unique_id=self.repository_unique_id, institution_name=institution.name)

        def entry_of(report: InstanceRecord | None) -> DocumentEntry:
            if report is None:
                return study_entry(record, bsn=patient.bsn, hospital_ura=institution.ura,
                                   hospital_name=institution.name, home=self.home, codes=self.codes,
                                   repository_unique_id=self.repository_unique_id)
            return report_entry(report, record, bsn=patient.bsn, hospital_ura=institution.ura,
                                hospital_name=institution.name, home=self.home, codes=self.codes,
                                repository_unique_id=self.repository_unique_id)

        docs = [SimDocument(entry_of(None), encode_part10(kos), patient.bsn)]
        by_uid = {str(ds.SOPInstanceUID): ds for ds in study.instances}
        for inst in instances:
            if is_report(inst):
                entry = entry_of(inst)
                data = _document_bytes(entry, by_uid[inst.sop_instance_uid])
                docs.append(SimDocument(entry, data, patient.bsn))
        return docs

    def _manifest_only_document(self, patient: SimPatient, institution: SimInstitution,
                                header: StudyHeader) -> SimDocument:
        """The KOS entry of a study known by its header; the KOS itself is made when retrieved."""
        uid = header.study_instance_uid
        self._manifest_only[uid] = (patient, institution, header.index)
        entry = study_entry(header_record(patient, header), codes=self.codes, bsn=patient.bsn,
                            hospital_ura=institution.ura, hospital_name=institution.name,
                            repository_unique_id=self.repository_unique_id, home=self.home)

        def kos() -> bytes:
            study = self._materialize(uid)
            instances = [instance_record(ds) for ds in study.instances]
            return encode_part10(kos_for_study(
                study_record(patient, study), instances, bsn=patient.bsn,
                repository_unique_id=self.repository_unique_id, institution_name=institution.name))

        return SimDocument(entry, kos, patient.bsn)

    def _materialize(self, study_uid: str) -> GeneratedStudy:
        """A manifest-only study in full, as :func:`generate_studies` would have made it."""
        study = self._materialized.get(study_uid)
        if study is None:
            patient, institution, index = self._manifest_only[study_uid]
            study = generate_study(patient, institution, index, self._seed, self._image_size)
            self._materialized[study_uid] = study
            while len(self._materialized) > MATERIALIZED_STUDIES:
                self._materialized.popitem(last=False)
        self._materialized.move_to_end(study_uid)
        return study

    def _instance(self, study_uid: str, series_uid: str, sop_uid: str) -> Dataset | None:
        ds = self._instances.get((study_uid, series_uid, sop_uid))
        if ds is None and study_uid in self._manifest_only:
            ds = next((d for d in self._materialize(study_uid).instances
                       if str(d.SeriesInstanceUID) == series_uid and str(d.SOPInstanceUID) == sop_uid), None)
        return ds

    # --- HTTP ---

    def app(self) -> web.Application:
        app = web.Application(client_max_size=MAX_REQUEST_BYTES)
        install_behaviour(app, self.community.behaviour)
        app.router.add_post("/iti38", self._handle)
        app.router.add_post("/iti39", self._handle)
        app.router.add_post("/rad75", self._handle)
        return app

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        expected, response_action = _ACTIONS[request.path]
        behaviour: Misbehaviour = current_behaviour(request.app)
        lost = frozenset(behaviour.lost_instances) if isinstance(behaviour, XcaMisbehaviour) else frozenset()
        try:
            raw = await request.read()
            root, parts = parse_mtom(request.headers.get("Content-Type", ""), raw, MAX_REQUEST_BYTES)
            env = parse_envelope(root)
        except SoapFault as fault:
            return _fault_response(fault, None)
        except (XmlError, ValueError) as exc:
            return _fault_response(SoapFault("Sender", f"not an acceptable SOAP 1.2 message: {exc}"), None)
        relates_to = env.addressing.message_id
        if behaviour.fault:
            log.info("xca_sim_fault", community=self.home, path=request.path)
            return _fault_response(SoapFault("Receiver", "simulated responding gateway failure"), relates_to)
        if behaviour.malformed:
            log.info("xca_sim_malformed", community=self.home, path=request.path)
            return web.Response(
                status=200, body=b'<?xml version="1.0"?><s:Envelope xmlns:s="http://www.w3.org/2003/05/soap-en',
                headers={"Content-Type": _soap_content_type(response_action)},
            )
        if env.addressing.action != expected:
            return _fault_response(SoapFault(
                "Sender", f"wsa:Action must be {expected} on {request.path}",
                subcode=(WSA_NS, "ActionNotSupported"),
            ), relates_to)
        if env.body is None:
            return _fault_response(SoapFault("Sender", "empty SOAP Body"), relates_to)
        addressing = Addressing(action=response_action, message_id=new_message_id(), relates_to=relates_to)
        if request.path == "/iti38":
            entries, build = self._iti38_answer(env.body)

            def answer() -> bytes:
                return serialize(build_envelope(addressing, build()))

            # A LeafClass answer of thousands of entries takes seconds to build: off the event loop,
            # as a remote community's work would be, so a gateway on the same loop keeps running.
            data = answer() if entries <= INLINE_ENTRIES else await asyncio.to_thread(answer)
            return web.Response(body=data, headers={"Content-Type": _soap_content_type(response_action)})
        grow = behaviour.oversized_manifest_bytes if isinstance(behaviour, XcaMisbehaviour) else 0
        grown = await self._grown_manifests(env.body, grow) if grow and request.path == "/iti39" else {}
        handlers: dict[str, Callable[[etree._Element, dict[str, bytes]], _Reply]] = {
            "/iti39": partial(self._iti39, grown=grown), "/rad75": partial(self._rad75, lost=lost),
        }
        handler = handlers[request.path]
        reply = handler(env.body, parts)
        envelope = build_envelope(addressing, reply.body)
        if not reply.mtom:
            headers = {"Content-Type": _soap_content_type(response_action)}
            return web.Response(body=serialize(envelope), headers=headers)
        content_type, body = build_mtom(envelope, reply.attachments, response_action)
        response = web.StreamResponse(status=200, headers={"Content-Type": content_type})
        response.content_length = body.content_length
        await response.prepare(request)
        try:
            for chunk in body:
                await response.write(chunk)
            await response.write_eof()
        except ConnectionError:
            # The gateway stopped reading, e.g. at its size limit: its business, not an error here.
            log.info("xca_sim_answer_abandoned", community=self.home, path=request.path)
        return response

    # --- ITI-38 ---

    def _iti38(self, body: etree._Element, parts: dict[str, bytes]) -> _Reply:
        del parts
        return _Reply(self._iti38_answer(body)[1]())

    def _iti38_answer(self, body: etree._Element) -> tuple[int, Callable[[], etree._Element]]:
        """The entries the answer holds, and how to build it (the caller decides where)."""
        try:
            req = parse_adhoc_query_request(body)
            query = validate_stored_query(req)
            if req.home is not None and req.home != self.home:
                raise RegistryErrorException.of(ErrorCode.UNKNOWN_COMMUNITY, req.home)
            docs = self._find(query, req)
        except RegistryErrorException as exc:
            errors = tuple(_located(e, self.home) for e in exc.errors)
            log.info("iti38", community=self.home, status="Failure", errors=[e.error_code for e in errors])
            failure = AdhocQueryResponse(ResponseStatus.FAILURE, (), errors)
            return 0, lambda: build_adhoc_query_response(failure)
        log.info("iti38", community=self.home, query=query.name, return_type=str(req.return_type),
                 results=len(docs))
        if req.return_type is ReturnType.OBJECT_REF:
            refs = tuple(ObjectRef(d.entry.entry_uuid, self.home) for d in docs)
            return 0, lambda: build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, refs))

        def leaf_class() -> etree._Element:
            answer = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, ()))
            objects = answer.find(rim("RegistryObjectList"))
            assert objects is not None
            objects.extend(self._extrinsic_object(d) for d in docs)
            return answer

        return len(docs), leaf_class

    def _extrinsic_object(self, doc: SimDocument) -> etree._Element:
        """The entry as the codec builds it, built once: a patient of thousands of entries is answered
        again and again (LeafClass, then GetDocuments in batches), and building is ~1 ms an entry."""
        key = doc.entry.entry_uuid
        cached = self._built.get(key)
        if cached is not None:
            return parse_xml(cached)
        element = build_extrinsic_object(doc.entry)
        self._built[key] = to_bytes(element)
        return element

    def _find(self, query: StoredQuery, req: AdhocQueryRequest) -> list[SimDocument]:
        if query is StoredQuery.GET_DOCUMENTS:
            # In the order asked, each once; whatever the patient or status (GetDocuments names entries).
            found = [self._by_unique_id.get(u) for u in req.values(QueryParam.UNIQUE_ID) or ()]
            found += [self._by_entry_uuid.get(u.lower()) for u in req.values(QueryParam.ENTRY_UUID) or ()]
            return list({id(d): d for d in found if d is not None}.values())
        if query not in (StoredQuery.FIND_DOCUMENTS, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID):
            return []  # folders, submission sets, associations: this community has none (xca.md §3)
        cx = Cx.parse(req.single(QueryParam.PATIENT_ID) or "")
        if cx.authority_oid != BSN_OID or cx.id not in self._patients:
            return []
        statuses = set(req.values(QueryParam.STATUS) or ())
        entry_types = req.values(QueryParam.ENTRY_TYPE)
        if entry_types is not None and EntryType.STABLE not in entry_types:
            return []
        predicates = _code_predicates(req) + _time_predicates(req)
        if query is StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID:
            predicates.append(_reference_predicate(req))
        return [
            d for d in self.documents
            if d.bsn == cx.id and d.entry.status in statuses and all(p(d.entry) for p in predicates)
        ]

    # --- ITI-39 ---

    def _check_request(self, doc: DocumentRequest, context: str) -> RegistryError | None:
        if doc.home is None:
            return RegistryError(ErrorCode.MISSING_HOME_COMMUNITY_ID, f"no HomeCommunityId for {context}",
                                 location=self.home)
        if doc.home != self.home:
            return RegistryError(ErrorCode.UNKNOWN_COMMUNITY, f"{doc.home} for {context}", location=self.home)
        if doc.repository_unique_id != self.repository_unique_id:
            return RegistryError(ErrorCode.UNKNOWN_REPOSITORY_ID, f"{doc.repository_unique_id} for {context}",
                                 location=self.home)
        return None

    async def _grown_manifests(self, body: etree._Element, size: int) -> dict[str, bytes]:
        """The asked manifests grown to ``size`` bytes, by uniqueId (see :meth:`grown_manifest`)."""
        try:
            asked = parse_retrieve_request(body).documents
        except RegistryErrorException:
            return {}
        return {doc.document_unique_id: grown for doc in asked
                if (grown := await self.grown_manifest(doc.document_unique_id, size)) is not None}

    async def grown_manifest(self, unique_id: str, size: int) -> bytes | None:
        """The KOS manifest ``unique_id`` grown to ``size`` bytes, as ITI-39 answers it under
        ``oversized_manifest_bytes`` (None: no such manifest). Written once, in a thread, since tens of
        MiB take seconds and a gateway under test may share this event loop; a test may call it first
        so that its measurements hold only the gateway's work."""
        found = self._by_unique_id.get(unique_id)
        code = found.entry.format_code if found is not None else None
        if found is None or code is None or not code.matches(KOS_FORMAT):
            return None
        key = (unique_id, size)
        if key not in self._grown:
            self._grown[key] = await asyncio.to_thread(grow_manifest, found.data, size)
        return self._grown[key]

    def _iti39(self, body: etree._Element, parts: dict[str, bytes], *,
               grown: dict[str, bytes] | None = None) -> _Reply:
        """``grown``: manifests to answer instead of the real ones (see :meth:`_grown_manifests`)."""
        del parts
        try:
            req = parse_retrieve_request(body)
        except RegistryErrorException as exc:
            return self._retrieve_reply(RetrieveDocumentSetResponse(
                ResponseStatus.FAILURE, (), tuple(_located(e, self.home) for e in exc.errors)), "iti39")
        documents: list[RetrievedDocument] = []
        errors: list[RegistryError] = []
        for doc in req.documents:
            error = self._check_request(doc, doc.document_unique_id)
            found = self._by_unique_id.get(doc.document_unique_id)
            if error is None and found is None:
                error = RegistryError(
                    ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, doc.document_unique_id, location=self.home
                )
            if error is not None:
                errors.append(error)
                continue
            assert found is not None
            data = (grown or {}).get(doc.document_unique_id) or found.data
            documents.append(RetrievedDocument(
                self.repository_unique_id, doc.document_unique_id, found.entry.mime_type, data, self.home,
            ))
        return self._retrieve_reply(
            RetrieveDocumentSetResponse(status_for(errors, bool(documents)), tuple(documents), tuple(errors)),
            "iti39",
        )

    # --- RAD-75 ---

    def _rad75(self, body: etree._Element, parts: dict[str, bytes], *,
               lost: frozenset[str] = frozenset()) -> _Reply:
        """Each instance in the first requested syntax the archive can give it in: as stored when that is
        listed, else converted without loss, else an XDSRepositoryError for that instance alone (NIST
        rig_2018-5424a: "cannot encode the pixel data using any of the requested transfer syntaxes").
        ``lost``: what the repository no longer holds (:class:`XcaMisbehaviour`), answered as unknown."""
        del parts
        try:
            req = parse_imaging_retrieve_request(body)
        except RegistryErrorException as exc:
            return self._retrieve_reply(RetrieveDocumentSetResponse(
                ResponseStatus.FAILURE, (), tuple(_located(e, self.home) for e in exc.errors)), "rad75")
        documents: list[RetrievedDocument] = []
        errors: list[RegistryError] = []
        for study_uid, series_uid, doc in req.instances():
            context = composite_context(study_uid, series_uid, doc.document_unique_id)
            error = self._check_request(doc, context)
            ds = (None if doc.document_unique_id in lost
                  else self._instance(study_uid, series_uid, doc.document_unique_id))
            if error is None and ds is None:
                error = RegistryError(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, context, location=self.home)
            if error is not None:
                errors.append(error)
                continue
            assert ds is not None
            data = _encode(ds, req.transfer_syntaxes, converts=self.community.converts)
            if data is None:
                errors.append(RegistryError(
                    ErrorCode.REPOSITORY_ERROR, f"{context}: cannot encode the pixel data (held as "
                    f"{ds.file_meta.TransferSyntaxUID}) in any of the requested transfer syntaxes",
                    location=self.home))
                continue
            documents.append(RetrievedDocument(
                self.repository_unique_id, doc.document_unique_id, MIME_DICOM, data, self.home,
            ))
        return self._retrieve_reply(
            RetrieveDocumentSetResponse(status_for(errors, bool(documents)), tuple(documents), tuple(errors)),
            "rad75",
        )

    def _retrieve_reply(self, resp: RetrieveDocumentSetResponse, transaction: str) -> _Reply:
        log.info(transaction, community=self.home, status=resp.status.rsplit(":", 1)[-1],
                 documents=len(resp.documents), errors=[e.error_code for e in resp.errors])
        body, attachments = build_retrieve_response(resp, mtom=True)
        return _Reply(body, attachments, mtom=True)


# --- helpers ---


def study_record(patient: SimPatient, study: GeneratedStudy) -> StudyRecord:
    """The study as a study-level C-FIND on the simulated PACS would describe it."""
    first = study.instances[0] if study.instances else None
    return StudyRecord(
        study_instance_uid=study.study_instance_uid,
        patient_id=study.patient_id,
        study_date=study.study_date,
        study_time=study.study_time,
        accession_number=study.accession_number,
        description=study.description,
        modalities=study.modalities,
        body_part=study.body_part,
        series_count=len(study.series_instance_uids),
        instance_count=len(study.instances),
        study_id=study.study_id,
        patient_name=patient.name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        institution_name=study.institution_name,
        referring_physician=str(first.ReferringPhysicianName) if first is not None else None,
    )


def header_record(patient: SimPatient, header: StudyHeader) -> StudyRecord:
    """A study known by its header as a study-level C-FIND would describe it: what
    :func:`study_record` gives for the generated study, less what only its instances know (the
    referring physician)."""
    return StudyRecord(
        study_instance_uid=header.study_instance_uid,
        patient_id=header.patient_id,
        study_date=header.study_date,
        study_time=header.study_time,
        accession_number=header.accession_number,
        description=header.description,
        modalities=header.modalities,
        body_part=header.body_part,
        study_id=header.study_id,
        series_count=header.series_count,
        instance_count=header.instance_count,
        patient_name=patient.name,
        patient_birth_date=patient.birth_date,
        patient_sex=patient.sex,
        institution_name=header.institution_name,
    )


def instance_record(ds: Dataset) -> InstanceRecord:
    """One instance as an image-level C-FIND returns it (SOP class and UIDs, report dates, title)."""
    return InstanceRecord(
        study_instance_uid=str(ds.StudyInstanceUID),
        series_instance_uid=str(ds.SeriesInstanceUID),
        sop_class_uid=str(ds.SOPClassUID),
        sop_instance_uid=str(ds.SOPInstanceUID),
        modality=_text(ds, "Modality"),
        series_number=int(ds.SeriesNumber) if "SeriesNumber" in ds else None,
        instance_number=int(ds.InstanceNumber) if "InstanceNumber" in ds else None,
        content_date=_text(ds, "ContentDate"),
        content_time=_text(ds, "ContentTime"),
        mime_type=_text(ds, "MIMETypeOfEncapsulatedDocument"),
        title=_text(ds, "DocumentTitle"),
    )


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    return str(value) if value not in (None, "") else None


def _document_bytes(entry: DocumentEntry, ds: Dataset) -> bytes:
    """What ITI-39 returns for a report: the PDF itself when the entry says PDF, else the Part-10 file."""
    if entry.mime_type == MIME_PDF:
        data = bytes(ds.EncapsulatedDocument)
        return data[:-1] if data.endswith(b"\x00") else data  # the even-length pad byte
    return encode_part10(ds)


def _soap_content_type(action: str) -> str:
    return f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"'


def _fault_response(fault: SoapFault, relates_to: str | None) -> web.Response:
    envelope = build_fault(fault, relates_to)
    return web.Response(
        status=fault_http_status(fault),
        body=serialize(envelope),
        headers={"Content-Type": _soap_content_type("http://www.w3.org/2005/08/addressing/soap/fault")},
    )


def _located(error: RegistryError, home: str) -> RegistryError:
    """ITI-39 and ITI-38 errors name the responding community as their location (GZ ITI39-012)."""
    return error if error.location else replace(error, location=home)


def _encode(ds: Dataset, requested: Sequence[str], *, converts: bool) -> bytes | None:
    """The Part-10 file in the syntax to serve it in; None when there is none. A request without a
    syntax list (the schema makes it mandatory; a lenient reading) gets what is stored."""
    stored = str(ds.file_meta.TransferSyntaxUID)
    syntax = serving_syntax(stored, requested, converts=converts) if requested else stored
    if syntax is None:
        return None
    try:
        return encode_part10(ds if syntax == stored else encoded(ds, syntax))
    except Exception as exc:  # a stream its own decoder rejects: that instance cannot be served
        log.warning("xca_sim_conversion_failed", stored=stored, target=syntax, error=type(exc).__name__)
        return None


_Predicate = Callable[[DocumentEntry], bool]


def _one_of(getter: Callable[[DocumentEntry], Code | None], group: list[Code]) -> _Predicate:
    def match(e: DocumentEntry) -> bool:
        code = getter(e)
        return code is not None and any(code.matches(x) for x in group)
    return match


def _any_of(getter: Callable[[DocumentEntry], tuple[Code, ...]], group: list[Code]) -> _Predicate:
    def match(e: DocumentEntry) -> bool:
        return any(c.matches(x) for c in getter(e) for x in group)
    return match


def _bound(getter: Callable[[DocumentEntry], str | None], bound: str, lower: bool) -> _Predicate:
    key = dtm_key(bound)

    def match(e: DocumentEntry) -> bool:
        t = getter(e)
        if t is None:
            return False
        return dtm_key(t) >= key if lower else dtm_key(t) < key
    return match


def _code_predicates(req: AdhocQueryRequest) -> list[_Predicate]:
    single: list[tuple[str, Callable[[DocumentEntry], Code | None]]] = [
        (QueryParam.CLASS_CODE, lambda e: e.class_code),
        (QueryParam.TYPE_CODE, lambda e: e.type_code),
        (QueryParam.FORMAT_CODE, lambda e: e.format_code),
        (QueryParam.PRACTICE_SETTING_CODE, lambda e: e.practice_setting_code),
        (QueryParam.HEALTHCARE_FACILITY_TYPE_CODE, lambda e: e.healthcare_facility_type_code),
    ]
    predicates = [_one_of(getter, group) for name, getter in single for group in req.codes(name)]
    multi: list[tuple[str, Callable[[DocumentEntry], tuple[Code, ...]]]] = [
        (QueryParam.EVENT_CODE_LIST, lambda e: e.event_codes),
        (QueryParam.CONFIDENTIALITY_CODE, lambda e: e.confidentiality_codes),
    ]
    # Repeated slots AND, the codes within one slot OR.
    predicates += [_any_of(getter, group) for name, getter in multi for group in req.codes(name)]
    return predicates


def _time_predicates(req: AdhocQueryRequest) -> list[_Predicate]:
    """From is inclusive, To exclusive (ITI TF-2 §3.18.4.1.2.3.6.1); an entry without the time fails."""
    ranges: list[tuple[str, str, Callable[[DocumentEntry], str | None]]] = [
        (QueryParam.SERVICE_START_TIME_FROM, QueryParam.SERVICE_START_TIME_TO,
         lambda e: e.service_start_time),
        (QueryParam.CREATION_TIME_FROM, QueryParam.CREATION_TIME_TO, lambda e: e.creation_time),
        (QueryParam.SERVICE_STOP_TIME_FROM, QueryParam.SERVICE_STOP_TIME_TO, lambda e: e.service_stop_time),
    ]
    predicates: list[_Predicate] = []
    for from_name, to_name, getter in ranges:
        low, high = req.time(from_name), req.time(to_name)
        if low is not None:
            predicates.append(_bound(getter, low, lower=True))
        if high is not None:
            predicates.append(_bound(getter, high, lower=False))
    return predicates


def _reference_predicate(req: AdhocQueryRequest) -> _Predicate:
    groups = req.slot_groups(QueryParam.REFERENCE_ID_LIST)
    try:
        wanted = [{parse_reference_id(v) for v in g} for g in groups]
    except Hl7FormatError as exc:
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, str(exc)) from exc

    def match(e: DocumentEntry) -> bool:
        have = {parse_reference_id(r) for r in e.reference_ids}
        return all(have & g for g in wanted)

    return match
