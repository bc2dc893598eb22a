"""IHE XCA / XCA-I codec (ITI-38, ITI-39, RAD-69/75): pure element-tree builders and parsers.

Transport (SOAP envelope, MTOM, HTTP) lives in :mod:`duo_gateway.soap`; this package only turns
typed messages into ebXML/IHE elements and back, so the Initiating and Responding roles and the
simulator share one implementation of the wire rules in ``docs/xca.md``.
"""

from duo_gateway.xca.codes import (
    Action,
    EntryStatus,
    EntryType,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    Scheme,
    Severity,
    StoredQuery,
)
from duo_gateway.xca.ebrim import Author, DocumentEntry, MetadataError, ObjectRef
from duo_gateway.xca.errors import RegistryError, RegistryErrorException, status_for
from duo_gateway.xca.hl7 import Code, Cx, Xon
from duo_gateway.xca.query import (
    AdhocQueryRequest,
    AdhocQueryResponse,
    build_adhoc_query_request,
    build_adhoc_query_response,
    find_documents,
    get_documents,
    parse_adhoc_query_request,
    parse_adhoc_query_response,
    validate_stored_query,
)
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
    build_retrieve_response,
    parse_imaging_retrieve_request,
    parse_retrieve_request,
    parse_retrieve_response,
)

__all__ = [
    "Action",
    "AdhocQueryRequest",
    "AdhocQueryResponse",
    "Author",
    "Code",
    "Cx",
    "DocumentEntry",
    "DocumentRequest",
    "EntryStatus",
    "EntryType",
    "ErrorCode",
    "MetadataError",
    "ObjectRef",
    "QueryParam",
    "RegistryError",
    "RegistryErrorException",
    "ResponseStatus",
    "RetrieveDocumentSetRequest",
    "RetrieveDocumentSetResponse",
    "RetrieveImagingDocumentSetRequest",
    "RetrievedDocument",
    "ReturnType",
    "Scheme",
    "SeriesRequest",
    "Severity",
    "StoredQuery",
    "StudyRequest",
    "Xon",
    "build_adhoc_query_request",
    "build_adhoc_query_response",
    "build_imaging_retrieve_request",
    "build_retrieve_request",
    "build_retrieve_response",
    "find_documents",
    "get_documents",
    "parse_adhoc_query_request",
    "parse_adhoc_query_response",
    "parse_imaging_retrieve_request",
    "parse_retrieve_request",
    "parse_retrieve_response",
    "status_for",
    "validate_stored_query",
]
