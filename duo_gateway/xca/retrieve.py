"""ITI-39 Cross Gateway Retrieve and RAD-69/RAD-75 imaging retrieve messages (xca.md §8, §10).

Responses put each document in its own MTOM part by default; the element tree then only holds
``xop:Include`` references, so a study of hundreds of megabytes never becomes one base64 string.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping, Sequence
from copy import deepcopy
from dataclasses import dataclass, field, replace
from pathlib import Path

from lxml import etree

from duo_gateway.soap.mtom import (
    DEFAULT_MAX_PART_BYTES,
    Attachment,
    new_content_id,
    resolve_document,
    xop_include,
)
from duo_gateway.xca.codes import RS_NS, XDSB_NS, XDSIB_NS, ErrorCode, ResponseStatus
from duo_gateway.xca.ebrim import MetadataError
from duo_gateway.xca.entry_ids import HomeCommunityIdError, normalise_home
from duo_gateway.xca.errors import (
    RegistryError,
    RegistryErrorException,
    build_error_list,
    parse_error_list,
    parse_status,
)

_LONG_NAME = 256


def xdsb(local: str) -> str:
    return f"{{{XDSB_NS}}}{local}"


def xdsib(local: str) -> str:
    return f"{{{XDSIB_NS}}}{local}"


@dataclass(frozen=True)
class DocumentRequest:
    repository_unique_id: str
    document_unique_id: str
    home: str | None = None


@dataclass(frozen=True)
class RetrieveDocumentSetRequest:
    documents: tuple[DocumentRequest, ...]


@dataclass(frozen=True)
class SeriesRequest:
    series_instance_uid: str
    documents: tuple[DocumentRequest, ...]


@dataclass(frozen=True)
class StudyRequest:
    study_instance_uid: str
    series: tuple[SeriesRequest, ...]


@dataclass(frozen=True)
class RetrieveImagingDocumentSetRequest:
    studies: tuple[StudyRequest, ...]
    transfer_syntaxes: tuple[str, ...]

    def instances(self) -> list[tuple[str, str, DocumentRequest]]:
        """(study UID, series UID, request) for every requested SOP instance, in request order."""
        return [
            (st.study_instance_uid, se.series_instance_uid, doc)
            for st in self.studies for se in st.series for doc in se.documents
        ]


@dataclass(frozen=True)
class RetrievedDocument:
    repository_unique_id: str
    document_unique_id: str
    mime_type: str
    data: bytes | Path
    home: str | None = None
    new_repository_unique_id: str | None = None
    new_document_unique_id: str | None = None


def spent(document: RetrievedDocument) -> RetrievedDocument:
    """``document`` once its bytes were written out: what it was (ids, type) stays for the envelope
    and the audit, the bytes go, so an answer streamed from memory keeps none of them."""
    return replace(document, data=b"") if isinstance(document.data, bytes) else document


@dataclass(frozen=True)
class RetrieveDocumentSetResponse:
    status: ResponseStatus
    documents: tuple[RetrievedDocument, ...] = ()
    errors: tuple[RegistryError, ...] = field(default=())


# --- building ---


def _text(parent: etree._Element, tag: str, value: str) -> None:
    if len(value) > _LONG_NAME or not value:
        raise MetadataError(f"{tag} must be 1..{_LONG_NAME} characters")
    etree.SubElement(parent, tag).text = value


def _document_request(parent: etree._Element, tag: str, doc: DocumentRequest) -> None:
    dr = etree.SubElement(parent, tag)
    if doc.home is not None:
        _text(dr, xdsb("HomeCommunityId"), normalise_home(doc.home))
    _text(dr, xdsb("RepositoryUniqueId"), doc.repository_unique_id)
    _text(dr, xdsb("DocumentUniqueId"), doc.document_unique_id)


def build_retrieve_request(req: RetrieveDocumentSetRequest) -> etree._Element:
    """ITI-39 needs ``home`` in every DocumentRequest (xca.md §5); ITI-43 callers may omit it."""
    if not req.documents:
        raise MetadataError("RetrieveDocumentSetRequest needs at least one DocumentRequest")
    root = etree.Element(xdsb("RetrieveDocumentSetRequest"), nsmap={"xdsb": XDSB_NS})
    for doc in req.documents:
        _document_request(root, xdsb("DocumentRequest"), doc)
    return root


def build_imaging_retrieve_request(req: RetrieveImagingDocumentSetRequest) -> etree._Element:
    if not req.studies or not req.transfer_syntaxes:
        raise MetadataError("RAD-69/75 needs at least one StudyRequest and one TransferSyntaxUID")
    root = etree.Element(
        xdsib("RetrieveImagingDocumentSetRequest"), nsmap={"xdsiB": XDSIB_NS, "xdsb": XDSB_NS}
    )
    for study in req.studies:
        if not study.series:
            raise MetadataError("StudyRequest without SeriesRequest")
        st = etree.SubElement(root, xdsib("StudyRequest"), studyInstanceUID=study.study_instance_uid)
        for series in study.series:
            if not series.documents:
                raise MetadataError("SeriesRequest without DocumentRequest")
            se = etree.SubElement(st, xdsib("SeriesRequest"), seriesInstanceUID=series.series_instance_uid)
            for doc in series.documents:
                _document_request(se, xdsib("DocumentRequest"), doc)
    tsl = etree.SubElement(root, xdsib("TransferSyntaxUIDList"))
    for ts in req.transfer_syntaxes:
        _text(tsl, xdsib("TransferSyntaxUID"), ts)
    return root


def build_retrieve_response(
    resp: RetrieveDocumentSetResponse, *, mtom: bool = True, content_ids: Sequence[str] | None = None
) -> tuple[etree._Element, list[Attachment]]:
    """The response element plus the attachments its ``xop:Include``s name (empty when inline).

    ``content_ids``: one per document, for parts that were written already (a streamed answer names
    what it sent); otherwise each document gets a fresh one.
    """
    if resp.status == ResponseStatus.SUCCESS and any(e.is_error for e in resp.errors):
        raise MetadataError("a Success response cannot carry errors")
    if content_ids is not None and len(content_ids) != len(resp.documents):
        raise ValueError("one Content-ID per document")
    root = etree.Element(
        xdsb("RetrieveDocumentSetResponse"), nsmap={"xdsb": XDSB_NS, "rs": RS_NS}
    )
    rr = etree.SubElement(root, f"{{{RS_NS}}}RegistryResponse", status=resp.status)
    errors = build_error_list(resp.errors)
    if errors is not None:
        rr.append(errors)
    attachments: list[Attachment] = []
    for i, doc in enumerate(resp.documents):
        dr = etree.SubElement(root, xdsb("DocumentResponse"))
        if doc.home is not None:
            _text(dr, xdsb("HomeCommunityId"), normalise_home(doc.home))
        _text(dr, xdsb("RepositoryUniqueId"), doc.repository_unique_id)
        _text(dr, xdsb("DocumentUniqueId"), doc.document_unique_id)
        if doc.new_repository_unique_id:
            _text(dr, xdsb("NewRepositoryUniqueId"), doc.new_repository_unique_id)
        if doc.new_document_unique_id:
            _text(dr, xdsb("NewDocumentUniqueId"), doc.new_document_unique_id)
        _text(dr, xdsb("mimeType"), doc.mime_type)
        d = etree.SubElement(dr, xdsb("Document"))
        if mtom:
            cid = new_content_id() if content_ids is None else content_ids[i]
            d.append(xop_include(cid))
            attachments.append(Attachment(cid, doc.mime_type, doc.data))
        else:
            data = doc.data if isinstance(doc.data, bytes) else doc.data.read_bytes()
            d.text = base64.b64encode(data).decode("ascii")
    return root, attachments


# --- parsing ---


def _req_text(el: etree._Element, tag: str, what: str) -> str:
    value = (el.findtext(tag) or "").strip()
    if not value:
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, f"DocumentRequest without {what}")
    return value


def _parse_document_request(el: etree._Element) -> DocumentRequest:
    home_text = (el.findtext(xdsb("HomeCommunityId")) or "").strip()
    home: str | None = None
    if home_text:
        try:
            home = normalise_home(home_text)
        except HomeCommunityIdError:
            raise RegistryErrorException.of(
                ErrorCode.UNKNOWN_COMMUNITY, f"{home_text!r} is not a homeCommunityId"
            ) from None
    return DocumentRequest(
        repository_unique_id=_req_text(el, xdsb("RepositoryUniqueId"), "RepositoryUniqueId"),
        document_unique_id=_req_text(el, xdsb("DocumentUniqueId"), "DocumentUniqueId"),
        home=home,
    )


def parse_retrieve_request(el: etree._Element) -> RetrieveDocumentSetRequest:
    if el.tag != xdsb("RetrieveDocumentSetRequest"):
        raise RegistryErrorException.of(
            ErrorCode.REGISTRY_ERROR, f"expected RetrieveDocumentSetRequest, got {el.tag}"
        )
    docs = tuple(_parse_document_request(d) for d in el.iterfind(xdsb("DocumentRequest")))
    if not docs:
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, "no DocumentRequest")
    return RetrieveDocumentSetRequest(docs)


def parse_imaging_retrieve_request(el: etree._Element) -> RetrieveImagingDocumentSetRequest:
    """Lenient on DocumentRequest's namespace: some senders put it in xdsb, as RAD-69 examples do."""
    if el.tag != xdsib("RetrieveImagingDocumentSetRequest"):
        raise RegistryErrorException.of(
            ErrorCode.REGISTRY_ERROR, f"expected RetrieveImagingDocumentSetRequest, got {el.tag}"
        )
    studies: list[StudyRequest] = []
    for st in el.iterfind(xdsib("StudyRequest")):
        series: list[SeriesRequest] = []
        for se in st.iterfind(xdsib("SeriesRequest")):
            docs = [
                _parse_document_request(d) for d in se
                if isinstance(d.tag, str) and etree.QName(d).localname == "DocumentRequest"
            ]
            series.append(SeriesRequest((se.get("seriesInstanceUID") or "").strip(), tuple(docs)))
        studies.append(StudyRequest((st.get("studyInstanceUID") or "").strip(), tuple(series)))
    if not studies:
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, "no StudyRequest")
    syntaxes = tuple(
        (t.text or "").strip()
        for t in el.iterfind(f"{xdsib('TransferSyntaxUIDList')}/{xdsib('TransferSyntaxUID')}")
        if (t.text or "").strip()
    )
    return RetrieveImagingDocumentSetRequest(tuple(studies), syntaxes)


def parse_retrieve_response(
    el: etree._Element, parts: Mapping[str, bytes], *, max_document_bytes: int = DEFAULT_MAX_PART_BYTES
) -> RetrieveDocumentSetResponse:
    """Documents may be MTOM parts or inline base64, even mixed within one response."""
    if el.tag != xdsb("RetrieveDocumentSetResponse"):
        raise ValueError(f"expected RetrieveDocumentSetResponse, got {el.tag}")
    rr = el.find(f"{{{RS_NS}}}RegistryResponse")
    if rr is None:
        raise ValueError("RetrieveDocumentSetResponse without RegistryResponse")
    docs: list[RetrievedDocument] = []
    for dr in el.iterfind(xdsb("DocumentResponse")):
        doc_el = dr.find(xdsb("Document"))
        if doc_el is None:
            raise ValueError("DocumentResponse without Document")
        home_text = (dr.findtext(xdsb("HomeCommunityId")) or "").strip()
        try:
            home = normalise_home(home_text) if home_text else None
        except HomeCommunityIdError:
            home = home_text
        docs.append(RetrievedDocument(
            repository_unique_id=(dr.findtext(xdsb("RepositoryUniqueId")) or "").strip(),
            document_unique_id=(dr.findtext(xdsb("DocumentUniqueId")) or "").strip(),
            mime_type=(dr.findtext(xdsb("mimeType")) or "").strip(),
            data=resolve_document(doc_el, parts, max_bytes=max_document_bytes),
            home=home,
            new_repository_unique_id=(dr.findtext(xdsb("NewRepositoryUniqueId")) or "").strip() or None,
            new_document_unique_id=(dr.findtext(xdsb("NewDocumentUniqueId")) or "").strip() or None,
        ))
    return RetrieveDocumentSetResponse(parse_status(rr.get("status")), tuple(docs), parse_error_list(rr))


def inline_documents(el: etree._Element, parts: Mapping[str, bytes]) -> etree._Element:
    """A copy with every ``xop:Include`` replaced by base64: the XOP infoset that XSDs validate."""
    copy = deepcopy(el)
    for doc in copy.iter(xdsb("Document")):
        data = resolve_document(doc, parts)
        for child in list(doc):
            doc.remove(child)
        doc.text = base64.b64encode(data).decode("ascii")
    return copy


def composite_context(study_uid: str, series_uid: str, instance_uid: str) -> str:
    """RAD-75 codeContext for a missing instance (xca.md §9)."""
    return f"{study_uid}:{series_uid}:{instance_uid}"


def documents_by_uid(docs: Sequence[RetrievedDocument]) -> dict[str, RetrievedDocument]:
    return {d.document_unique_id: d for d in docs}
