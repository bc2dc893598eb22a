"""IHE XCA / XCA-I (ITI-38, ITI-39, RAD-69/75): the wire codec at the top, DUO's two roles below it.

The top-level modules are the codec, pure element-tree builders and parsers with no I/O, so both of
DUO's roles and the simulator (:mod:`duo_gateway.sim.xca`) share one implementation of the wire rules
in ``docs/xca.md``: ``codes`` (namespaces, URNs, enums), ``hl7`` (CX/XON/DTM), the identifier rules
(homeCommunityId normalisation, deterministic entryUUIDs), ``ebrim`` (DocumentEntry), ``query``
(ITI-38), ``retrieve`` (ITI-39, RAD-69/75) and ``errors`` (RegistryError). ``metadata`` maps PACS
study records to DocumentEntries and KOS manifests built when retrieved, the one mapping DUO and the
simulator agree on; ``docindex`` is the durable memory of which announced uniqueId stands for which
study (and of each KOS's hash and size once built).
The SOAP envelope, WS-Addressing and MTOM are not here but in :mod:`duo_gateway.soap`.

- ``initiating/``: DUO asking other communities, ITI-38 for a TLB timeline and ITI-39 (the KOS) plus
  RAD-75 (the images) for a transfer, every request signed and bounded by the caller's deadline.
- ``responding/``: DUO answering the communities for the TLB hospitals, the meaning of each
  transaction (``service``, consent first) apart from its HTTP/SOAP edge (``transport``) and replay
  protection (``replay``).

The codec's public names are re-exported here so that a test or a script can speak XCA through
one import; DUO's own modules import the codec module they use.
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
