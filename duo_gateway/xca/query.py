"""ITI-38 Cross Gateway Query: AdhocQueryRequest / AdhocQueryResponse (xca.md §3–§5, §14–§15).

Slot values use the stored-query mini syntax (``'x'``, ``('a','b')``, unquoted DTM). The tokenizer is
strict about structure, so an injection like ``'1' OR '1'='1'`` is a parse error rather than a value,
but lenient about what real peers vary on: quoted or unquoted times, bare OIDs for ``home``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field

from lxml import etree

from duo_gateway.soap.xml import parse_own
from duo_gateway.xca.codes import (
    QUERY_NS,
    REPEATABLE_PARAMS,
    RIM_NS,
    RS_NS,
    SINGLE_VALUE_PARAMS,
    TIME_PARAMS,
    EntryStatus,
    ErrorCode,
    QueryParam,
    ResponseStatus,
    ReturnType,
    StoredQuery,
)
from duo_gateway.xca.ebrim import (
    LONG_NAME,
    DocumentEntry,
    MetadataError,
    ObjectRef,
    add_slot,
    parse_extrinsic_object,
    parse_object_ref,
    rim,
    write_extrinsic_object,
    write_object_ref,
)
from duo_gateway.xca.entry_ids import HomeCommunityIdError, is_urn_uuid, normalise_home
from duo_gateway.xca.errors import (
    RegistryError,
    RegistryErrorException,
    build_error_list,
    parse_error_list,
    parse_status,
)
from duo_gateway.xca.hl7 import Code, Cx, Hl7FormatError, check_dtm


class QuerySyntaxError(ValueError):
    """A slot value that is not valid stored-query syntax."""


# --- value encoding ---


def quote(value: str) -> str:
    """``'value'`` with embedded quotes doubled (the SQL convention the stored-query syntax uses)."""
    return "'" + value.replace("'", "''") + "'"


def encode_list(values: Iterable[str]) -> str:
    return "(" + ",".join(quote(v) for v in values) + ")"


def encode_list_values(values: Iterable[str]) -> tuple[str, ...]:
    """One OR list as few ``rim:Value`` texts as fit the schema's 256 characters each.

    A Value is an ebRIM LongName, so a long list (a GetDocuments batch of entryUUIDs: five fit one
    Value) is spread over several Values of one Slot, each a list of its own, which the stored-query
    syntax ORs like one list (ITI TF-2 §3.18.4.1.2.3.5). A single atom too long for any Value is
    refused, never cut.
    """
    out: list[str] = []
    current: list[str] = []
    size = 2  # the parentheses
    for value in values:
        atom = quote(value)
        if len(atom) + 2 > LONG_NAME:
            raise ValueError(f"a value of {len(atom)} characters does not fit a rim:Value")
        if current and size + 1 + len(atom) > LONG_NAME:
            out.append("(" + ",".join(current) + ")")
            current, size = [], 2
        size += len(atom) + (1 if current else 0)
        current.append(atom)
    if current or not out:
        out.append("(" + ",".join(current) + ")")
    return tuple(out)


def decode_value(text: str) -> list[str]:
    """Atoms of one ``rim:Value``: a quoted string, a parenthesised list, or a bare token (a DTM)."""
    s = text.strip()
    if not s:
        raise QuerySyntaxError("empty value")
    if s.startswith("("):
        if not s.endswith(")"):
            raise QuerySyntaxError("unterminated list")
        atoms, pos = [], 1
        inner_end = len(s) - 1
        while True:
            pos = _skip_ws(s, pos, inner_end)
            atom, pos = _atom(s, pos, inner_end)
            atoms.append(atom)
            pos = _skip_ws(s, pos, inner_end)
            if pos == inner_end:
                return atoms
            if s[pos] != ",":
                raise QuerySyntaxError("expected ',' between list items")
            pos += 1
    atom, pos = _atom(s, 0, len(s))
    if pos != len(s):
        raise QuerySyntaxError("trailing characters after value")
    return [atom]


def decode_slot(values: Sequence[str]) -> list[str]:
    """Atoms of a whole slot. Each Value is normally complete, but some senders split one list over
    several Values (``('a',`` then ``'b')``); that is accepted by re-joining them."""
    try:
        return [atom for v in values for atom in decode_value(v)]
    except QuerySyntaxError:
        if len(values) < 2:
            raise
        try:
            return decode_value("".join(v.strip() for v in values))
        except QuerySyntaxError:
            pass
        raise


def _skip_ws(s: str, pos: int, end: int) -> int:
    while pos < end and s[pos].isspace():
        pos += 1
    return pos


#: A quoted atom: anything but a quote, or a doubled quote, up to the closing quote. Possessive, so a
#: doubled quote is never taken apart to end the string early (``'a''`` is unterminated).
_QUOTED = re.compile(r"'((?:[^']|'')*+)'")
#: A bare atom (a DTM, a bare OID): Unicode letters and digits (``\w`` is exactly ``str.isalnum`` plus
#: ``_`` in Python) and ``.-+:``.
_BARE = re.compile(r"[\w.+:-]+")


def _atom(s: str, pos: int, end: int) -> tuple[str, int]:
    """One atom at ``pos``, not reaching ``end``: its value and the position after it.

    Regular expressions instead of a character loop: every slot DUO sends is checked by this before
    it goes out, and every slot a peer sends is read by it.
    """
    if pos >= end:
        raise QuerySyntaxError("missing value")
    if s[pos] == "'":
        quoted = _QUOTED.match(s, pos, end)
        if quoted is None:
            raise QuerySyntaxError("unterminated quoted string")
        return quoted.group(1).replace("''", "'"), quoted.end()
    bare = _BARE.match(s, pos, end)
    if bare is None:
        raise QuerySyntaxError(f"unexpected character {s[pos]!r}")
    return bare.group(), bare.end()


# --- request ---


@dataclass(frozen=True)
class Slot:
    """One ``rim:Slot``: its values exactly as sent (encoded)."""

    name: str
    values: tuple[str, ...]


@dataclass(frozen=True)
class AdhocQueryRequest:
    query_id: str
    slots: tuple[Slot, ...]
    home: str | None = None
    return_type: ReturnType = ReturnType.LEAF_CLASS

    def slot_groups(self, name: str) -> list[list[str]]:
        """Decoded atoms per slot of ``name``: within a slot they OR, across slots they AND."""
        groups: list[list[str]] = []
        for slot in self.slots:
            if slot.name == name:
                groups.append(decode_slot(slot.values))
        return groups

    def values(self, name: str) -> list[str] | None:
        """All atoms of a non-repeatable parameter, or None when it is absent."""
        groups = self.slot_groups(name)
        if not groups:
            return None
        if len(groups) > 1 and name not in REPEATABLE_PARAMS:
            raise _repeated(name)
        return [a for g in groups for a in g]

    def single(self, name: str) -> str | None:
        values = self.values(name)
        if values is None:
            return None
        if len(values) != 1:
            raise RegistryErrorException.of(
                ErrorCode.STORED_QUERY_PARAM_NUMBER, f"{name} takes exactly one value"
            )
        return values[0]

    def time(self, name: str) -> str | None:
        value = self.single(name)
        if value is None:
            return None
        try:
            return check_dtm(value)
        except Hl7FormatError as exc:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, f"{name}: {exc}") from exc

    def codes(self, name: str) -> list[list[Code]]:
        """Code-list parameter as AND-of-OR groups (only EventCodeList/ConfidentialityCode repeat)."""
        groups = self.slot_groups(name)
        if len(groups) > 1 and name not in REPEATABLE_PARAMS:
            raise _repeated(name)
        try:
            return [[Code.parse_query_form(v) for v in g] for g in groups]
        except Hl7FormatError as exc:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, f"{name}: {exc}") from exc


def _repeated(name: str) -> RegistryErrorException:
    return RegistryErrorException.of(ErrorCode.STORED_QUERY_PARAM_NUMBER, f"{name} given more than once")


def _encode_param(name: str, value: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(value, str):
        if name in TIME_PARAMS:
            return (check_dtm(value),)  # unquoted, as xca.md §4 specifies
        return (quote(value),)
    if name in SINGLE_VALUE_PARAMS:
        raise ValueError(f"{name} takes a single value")
    return encode_list_values(value)


def make_slots(params: Mapping[str, str | Sequence[str] | Sequence[Sequence[str]]]) -> tuple[Slot, ...]:
    """Encode typed parameters: a str is one quoted value (a DTM unquoted), a list of str one OR list,
    a list of lists one slot per inner list (AND; only for the repeatable parameters)."""
    slots: list[Slot] = []
    for name, value in params.items():
        if isinstance(value, str):
            slots.append(Slot(name, _encode_param(name, value)))
            continue
        items = list(value)
        if items and not isinstance(items[0], str):
            if name not in REPEATABLE_PARAMS:
                raise ValueError(f"{name} cannot be repeated")
            for group in items:
                slots.append(Slot(name, encode_list_values([str(g) for g in group])))
        else:
            slots.append(Slot(name, _encode_param(name, [str(i) for i in items])))
    return tuple(slots)


def find_documents(
    patient_id: Cx | str,
    *,
    statuses: Sequence[str] = (EntryStatus.APPROVED,),
    format_codes: Sequence[Code] = (),
    class_codes: Sequence[Code] = (),
    type_codes: Sequence[Code] = (),
    event_codes: Sequence[Sequence[Code]] = (),
    service_start_from: str | None = None,
    service_start_to: str | None = None,
    creation_from: str | None = None,
    creation_to: str | None = None,
    reference_ids: Sequence[str] = (),
    home: str | None = None,
    return_type: ReturnType = ReturnType.LEAF_CLASS,
) -> AdhocQueryRequest:
    """FindDocuments, or FindDocumentsByReferenceId when ``reference_ids`` are given."""
    params: dict[str, str | Sequence[str] | Sequence[Sequence[str]]] = {
        QueryParam.PATIENT_ID: str(patient_id),
        QueryParam.STATUS: list(statuses),
    }
    for name, codes in ((QueryParam.FORMAT_CODE, format_codes), (QueryParam.CLASS_CODE, class_codes),
                        (QueryParam.TYPE_CODE, type_codes)):
        if codes:
            params[name] = [c.query_form() for c in codes]
    if event_codes:
        params[QueryParam.EVENT_CODE_LIST] = [[c.query_form() for c in g] for g in event_codes]
    for name, t in ((QueryParam.SERVICE_START_TIME_FROM, service_start_from),
                    (QueryParam.SERVICE_START_TIME_TO, service_start_to),
                    (QueryParam.CREATION_TIME_FROM, creation_from),
                    (QueryParam.CREATION_TIME_TO, creation_to)):
        if t is not None:
            params[name] = t
    query_id: str = StoredQuery.FIND_DOCUMENTS
    if reference_ids:
        query_id = StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID
        params[QueryParam.REFERENCE_ID_LIST] = list(reference_ids)
    return AdhocQueryRequest(query_id, make_slots(params), home, return_type)


def get_documents(
    home: str,
    *,
    unique_ids: Sequence[str] = (),
    entry_uuids: Sequence[str] = (),
    return_type: ReturnType = ReturnType.LEAF_CLASS,
) -> AdhocQueryRequest:
    """GetDocuments of the given entries; ``home`` is required (xca.md §5), entryUUIDs must be UUIDs."""
    if bool(unique_ids) == bool(entry_uuids):
        raise ValueError("GetDocuments takes either uniqueIds or entryUUIDs")
    if not all(is_urn_uuid(u) for u in entry_uuids):
        raise ValueError("an entryUUID is not a urn:uuid")
    params: dict[str, str | Sequence[str] | Sequence[Sequence[str]]] = (
        {QueryParam.UNIQUE_ID: list(unique_ids)} if unique_ids else {QueryParam.ENTRY_UUID: list(entry_uuids)}
    )
    return AdhocQueryRequest(StoredQuery.GET_DOCUMENTS, make_slots(params), home, return_type)


def get_documents_batches(refs: Iterable[ObjectRef], batch_size: int) -> list[AdhocQueryRequest]:
    """GetDocuments requests (LeafClass) for the entries behind ObjectRefs, as an Initiating Gateway
    asks for them after a FindDocuments for ObjectRef (NIST 12306, 12307).

    At most ``batch_size`` entryUUIDs per request and one ``home`` per request (GetDocuments has no
    patient id, so ``home`` says whose registry to read), in reference order; a reference repeated is
    asked once. Raises ValueError for a reference that cannot be asked for (no home, not a UUID):
    the caller decides what such a reference means.
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    by_home: dict[str, list[str]] = {}
    seen: set[str] = set()
    for ref in refs:
        if not ref.home:
            raise ValueError(f"ObjectRef {ref.id!r} has no home")
        if not is_urn_uuid(ref.id):
            raise ValueError(f"ObjectRef id {ref.id!r} is not a urn:uuid")
        key = ref.id.lower()
        if key not in seen:
            seen.add(key)
            by_home.setdefault(ref.home, []).append(ref.id)
    return [get_documents(home, entry_uuids=ids[i:i + batch_size])
            for home, ids in by_home.items() for i in range(0, len(ids), batch_size)]


def build_adhoc_query_request(req: AdhocQueryRequest) -> etree._Element:
    root = etree.Element(f"{{{QUERY_NS}}}AdhocQueryRequest", nsmap={"query": QUERY_NS, "rim": RIM_NS})
    etree.SubElement(
        root, f"{{{QUERY_NS}}}ResponseOption", returnType=str(req.return_type), returnComposedObjects="true"
    )
    aq = etree.SubElement(root, rim("AdhocQuery"), id=req.query_id)
    if req.home is not None:
        aq.set("home", normalise_home(req.home))
    for slot in req.slots:
        decode_slot(slot.values)  # never emit what we would refuse to parse
        add_slot(aq, slot.name, slot.values)
    return root


def parse_adhoc_query_request(el: etree._Element) -> AdhocQueryRequest:
    """Structure only; stored-query rules are checked by :func:`validate_stored_query`.

    Raises RegistryErrorException for problems XDS answers with a Failure response.
    """
    if el.tag != f"{{{QUERY_NS}}}AdhocQueryRequest":
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, f"expected AdhocQueryRequest, got {el.tag}")
    option = el.find(f"{{{QUERY_NS}}}ResponseOption")
    raw_type = option.get("returnType", "LeafClass") if option is not None else "LeafClass"
    try:
        return_type = ReturnType(raw_type)
    except ValueError:
        raise RegistryErrorException.of(
            ErrorCode.REGISTRY_ERROR, f"returnType {raw_type!r} is not LeafClass or ObjectRef"
        ) from None
    queries = el.findall(rim("AdhocQuery"))
    if len(queries) != 1:
        raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, "exactly one rim:AdhocQuery is required")
    aq = queries[0]
    home_attr = aq.get("home")
    home = None
    if home_attr:
        try:
            home = normalise_home(home_attr)
        except HomeCommunityIdError:
            raise RegistryErrorException.of(
                ErrorCode.UNKNOWN_COMMUNITY, f"home {home_attr!r} is not a homeCommunityId"
            ) from None
    slots = tuple(
        Slot(s.get("name") or "", tuple((v.text or "") for v in s.iterfind(_VALUES)))
        for s in aq.iterfind(rim("Slot"))
    )
    return AdhocQueryRequest((aq.get("id") or "").strip(), slots, home, return_type)


_VALUES = f"{rim('ValueList')}/{rim('Value')}"

#: Required parameters per supported stored query; a tuple inside means "one of".
_REQUIRED: dict[str, tuple[str | tuple[str, ...], ...]] = {
    StoredQuery.FIND_DOCUMENTS: (QueryParam.PATIENT_ID, QueryParam.STATUS),
    StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID: (
        QueryParam.PATIENT_ID, QueryParam.STATUS, QueryParam.REFERENCE_ID_LIST,
    ),
    StoredQuery.GET_DOCUMENTS: ((QueryParam.ENTRY_UUID, QueryParam.UNIQUE_ID),),
}
#: Stored queries that have no patient id and therefore need ``home`` (xca.md §5).
NEEDS_HOME = frozenset(q for q in StoredQuery if q not in {
    StoredQuery.FIND_DOCUMENTS, StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID, StoredQuery.FIND_SUBMISSION_SETS,
    StoredQuery.FIND_FOLDERS, StoredQuery.GET_ALL, StoredQuery.FIND_DOCUMENTS_MULTI_PATIENT,
})


def validate_stored_query(req: AdhocQueryRequest) -> StoredQuery:
    """Check the id, required parameters, value syntax and counts; return the known query."""
    try:
        query = StoredQuery(req.query_id.lower())
    except ValueError:
        raise RegistryErrorException.of(ErrorCode.UNKNOWN_STORED_QUERY, req.query_id) from None
    for slot in req.slots:
        try:
            decode_slot(slot.values)
        except QuerySyntaxError as exc:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, f"{slot.name}: {exc}") from exc
    for required in _REQUIRED.get(query, ()):
        names = required if isinstance(required, tuple) else (required,)
        present = [n for n in names if req.slot_groups(n)]
        if not present:
            raise RegistryErrorException.of(ErrorCode.STORED_QUERY_MISSING_PARAM, " or ".join(names))
        if len(present) > 1:
            raise RegistryErrorException.of(
                ErrorCode.STORED_QUERY_PARAM_NUMBER, f"only one of {', '.join(names)} is allowed"
            )
    if query in NEEDS_HOME and req.home is None:
        raise RegistryErrorException.of(ErrorCode.MISSING_HOME_COMMUNITY_ID, f"{query.name} needs home")
    patient = req.single(QueryParam.PATIENT_ID)
    if patient is not None:
        try:
            Cx.parse(patient)
        except Hl7FormatError as exc:
            raise RegistryErrorException.of(ErrorCode.REGISTRY_ERROR, str(exc)) from exc
    for name in TIME_PARAMS:
        req.time(name)
    return query


# --- response ---

QueryResult = DocumentEntry | ObjectRef


@dataclass(frozen=True)
class AdhocQueryResponse:
    status: ResponseStatus
    objects: tuple[QueryResult, ...] = ()
    errors: tuple[RegistryError, ...] = field(default=())

    @property
    def entries(self) -> list[DocumentEntry]:
        return [o for o in self.objects if isinstance(o, DocumentEntry)]

    def objects_missing_home(self) -> list[str]:
        """Ids of returned objects without ``home``: an initiator reports XDSMissingHomeCommunityId."""
        return [o.entry_uuid if isinstance(o, DocumentEntry) else o.id for o in self.objects if not o.home]


def build_adhoc_query_response(resp: AdhocQueryResponse) -> etree._Element:
    """The tree of :func:`adhoc_query_response_bytes` (for callers that add to it or validate it)."""
    return parse_own(adhoc_query_response_bytes(resp))


_EMPTY_OBJECT_LIST = b"<rim:RegistryObjectList/></query:AdhocQueryResponse>"


def adhoc_query_response_bytes(resp: AdhocQueryResponse) -> bytes:
    """The serialized ``query:AdhocQueryResponse`` (UTF-8, no XML declaration), as it goes into a SOAP
    Body (``soap.envelope.serialize_with``).

    The registry objects are written as text (``xca.ebrim``: a tree costs ~3x the CPU of the same
    markup written out, and an answer can hold thousands of entries); the response element and its
    error list, few and rare, are an lxml tree serialized once and the objects spliced into it.
    """
    if resp.status == ResponseStatus.SUCCESS and any(e.is_error for e in resp.errors):
        raise MetadataError("a Success response cannot carry errors")
    root = etree.Element(
        f"{{{QUERY_NS}}}AdhocQueryResponse", nsmap={"query": QUERY_NS, "rim": RIM_NS, "rs": RS_NS}
    )
    root.set("status", resp.status)
    errors = build_error_list(resp.errors)
    if errors is not None:
        root.append(errors)
    etree.SubElement(root, rim("RegistryObjectList"))
    head = etree.tostring(root, encoding="UTF-8", xml_declaration=False)
    if not resp.objects:
        return head
    if not head.endswith(_EMPTY_OBJECT_LIST):
        raise AssertionError("unexpected AdhocQueryResponse serialization")
    out: list[str] = ["<rim:RegistryObjectList>"]
    for obj in resp.objects:
        if isinstance(obj, DocumentEntry):
            write_extrinsic_object(obj, out)
        else:
            write_object_ref(obj, out)
    out.append("</rim:RegistryObjectList></query:AdhocQueryResponse>")
    return head[: -len(_EMPTY_OBJECT_LIST)] + "".join(out).encode()


def parse_adhoc_query_response(el: etree._Element) -> AdhocQueryResponse:
    """Lenient: unknown registry object kinds (folders, associations) are skipped, not fatal."""
    if el.tag != f"{{{QUERY_NS}}}AdhocQueryResponse":
        raise ValueError(f"expected AdhocQueryResponse, got {el.tag}")
    objects: list[QueryResult] = []
    rol = el.find(rim("RegistryObjectList"))
    if rol is not None:
        for child in rol:
            if child.tag == rim("ExtrinsicObject"):
                objects.append(parse_extrinsic_object(child))
            elif child.tag == rim("ObjectRef"):
                objects.append(parse_object_ref(child))
    return AdhocQueryResponse(parse_status(el.get("status")), tuple(objects), parse_error_list(el))
