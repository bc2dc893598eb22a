from __future__ import annotations

import base64
from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from duo_gateway.soap.mtom import parse_mtom
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca import (
    AdhocQueryResponse,
    Author,
    Code,
    Cx,
    DocumentEntry,
    DocumentRequest,
    ErrorCode,
    MetadataError,
    ObjectRef,
    QueryParam,
    RegistryError,
    RegistryErrorException,
    ResponseStatus,
    RetrievedDocument,
    RetrieveDocumentSetRequest,
    RetrieveDocumentSetResponse,
    RetrieveImagingDocumentSetRequest,
    ReturnType,
    SeriesRequest,
    StoredQuery,
    StudyRequest,
    Xon,
    build_adhoc_query_request,
    build_adhoc_query_response,
    build_imaging_retrieve_request,
    build_retrieve_request,
    build_retrieve_response,
    find_documents,
    get_documents,
    parse_adhoc_query_request,
    parse_adhoc_query_response,
    parse_imaging_retrieve_request,
    parse_retrieve_request,
    parse_retrieve_response,
    status_for,
    validate_stored_query,
)
from duo_gateway.xca.codes import (
    DCM_SCHEME,
    DICOM_UID_REGISTRY,
    EXPLICIT_VR_LITTLE_ENDIAN,
    KOS_SOP_CLASS,
    STUDY_INSTANCE_UID_ID_TYPE,
    Scheme,
)
from duo_gateway.xca.entry_ids import document_entry_uuid, normalise_home
from duo_gateway.xca.hl7 import reference_id
from duo_gateway.xca.query import QuerySyntaxError, decode_slot, decode_value
from duo_gateway.xca.retrieve import inline_documents
from tests.xca.xsd import assert_valid

FIXTURES = Path(__file__).parent / "fixtures"
HOME = "urn:oid:2.16.528.1.1007.99.20001"
REPO = "2.16.528.1.1007.99.20001.1"
PATIENT = Cx("999911120", "2.16.840.1.113883.2.4.6.3")
STUDY = "1.2.3.4.5"


def kos_entry(**changes: object) -> DocumentEntry:
    entry = DocumentEntry(
        entry_uuid=document_entry_uuid(STUDY, HOME),
        unique_id="2.25.123",
        patient_id=str(PATIENT),
        mime_type="application/dicom",
        repository_unique_id=REPO,
        home=HOME,
        title="CT thorax",
        format_code=Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY, "Key Object Selection"),
        class_code=Code("363679005", "2.16.840.1.113883.6.96", "Imaging"),
        type_code=Code("18748-4", "2.16.840.1.113883.6.1", "Diagnostic imaging study"),
        practice_setting_code=Code("394914008", "2.16.840.1.113883.6.96", "Radiology"),
        healthcare_facility_type_code=Code("22232009", "2.16.840.1.113883.6.96", "Hospital"),
        confidentiality_codes=(Code("N", "2.16.840.1.113883.5.25", "normal"),),
        event_codes=(
            Code("CT", DCM_SCHEME, "Computed Tomography"),
            Code("43799004", "2.16.840.1.113883.6.96", "Chest"),
        ),
        service_start_time="20240102103000",
        creation_time="20240102103000",
        reference_ids=(reference_id(STUDY, STUDY_INSTANCE_UID_ID_TYPE),),
        authors=(Author(institutions=(Xon("Ziekenhuis st. Jansdal", "00010990"),)),),
        language_code="nl-NL",
        size=1234,
        hash="da39a3ee5e6b4b0d3255bfef95601890afd80709",
        source_patient_id=str(PATIENT),
    )
    return replace(entry, **changes)  # type: ignore[arg-type]


# --- requests validate and round-trip ---


def test_find_documents_request_validates_and_round_trips(wsdl_dir: Path) -> None:
    req = find_documents(
        PATIENT,
        format_codes=[Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY)],
        event_codes=[
            [Code("CT", DCM_SCHEME), Code("MR", DCM_SCHEME)],
            [Code("43799004", "2.16.840.1.113883.6.96")],
        ],
        service_start_from="20240101000000",
        service_start_to="20250101",
        home=HOME,
    )
    el = build_adhoc_query_request(req)
    assert_valid(wsdl_dir, el)
    parsed = parse_adhoc_query_request(parse_xml(etree.tostring(el)))
    assert parsed == req
    assert validate_stored_query(parsed) is StoredQuery.FIND_DOCUMENTS
    assert parsed.single(QueryParam.PATIENT_ID) == str(PATIENT)
    assert parsed.codes(QueryParam.EVENT_CODE_LIST) == [
        [Code("CT", DCM_SCHEME), Code("MR", DCM_SCHEME)],
        [Code("43799004", "2.16.840.1.113883.6.96")],
    ]
    assert parsed.time(QueryParam.SERVICE_START_TIME_TO) == "20250101"


def test_golden_find_documents_request_bytes() -> None:
    """The exact bytes we put on the wire for FindDocuments; a diff here is a wire change to review."""
    req = find_documents(
        PATIENT,
        format_codes=[
            Code(KOS_SOP_CLASS, DICOM_UID_REGISTRY),
            Code("urn:ihe:rad:PDF", "1.3.6.1.4.1.19376.1.2.3"),
        ],
        service_start_from="20240101000000",
        home=HOME,
    )
    golden = (FIXTURES / "iti38_find_documents_request.xml").read_bytes()
    assert etree.tostring(build_adhoc_query_request(req), encoding="UTF-8", xml_declaration=True) == golden


def test_golden_fixture_parses_to_the_same_request() -> None:
    parsed = parse_adhoc_query_request(
        parse_xml((FIXTURES / "iti38_find_documents_request.xml").read_bytes())
    )
    assert parsed.home == HOME
    assert parsed.values(QueryParam.STATUS) == ["urn:oasis:names:tc:ebxml-regrep:StatusType:Approved"]
    assert [c.code for g in parsed.codes(QueryParam.FORMAT_CODE) for c in g] == [
        KOS_SOP_CLASS,
        "urn:ihe:rad:PDF",
    ]


def _lenient_request(home: str, time_value: str) -> bytes:
    return f"""<query:AdhocQueryRequest xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
        xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0">
      <query:ResponseOption returnType="ObjectRef" returnComposedObjects="true"/>
      <rim:AdhocQuery id="urn:uuid:14D4DEBF-8F97-4251-9A74-A90016B0AF0D" home="{home}">
        <rim:Slot name="$XDSDocumentEntryPatientId"><rim:ValueList>
          <rim:Value> '999911120^^^&amp;2.16.840.1.113883.2.4.6.3&amp;ISO' </rim:Value>
        </rim:ValueList></rim:Slot>
        <rim:Slot name="$XDSDocumentEntryStatus"><rim:ValueList>
          <rim:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved',</rim:Value>
          <rim:Value>'urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated')</rim:Value>
        </rim:ValueList></rim:Slot>
        <rim:Slot name="$XDSDocumentEntryServiceStartTimeFrom"><rim:ValueList>
          <rim:Value>{time_value}</rim:Value></rim:ValueList></rim:Slot>
      </rim:AdhocQuery>
    </query:AdhocQueryRequest>""".encode()


@pytest.mark.parametrize("time_value", ["20221015151515", "'20221015151515'"])
def test_lenient_times_and_bare_home_oid(time_value: str) -> None:
    req = parse_adhoc_query_request(parse_xml(_lenient_request("2.16.528.1.1007.99.20001", time_value)))
    assert req.home == HOME
    assert req.return_type is ReturnType.OBJECT_REF
    assert validate_stored_query(req) is StoredQuery.FIND_DOCUMENTS
    assert req.time(QueryParam.SERVICE_START_TIME_FROM) == "20221015151515"
    assert req.single(QueryParam.PATIENT_ID) == str(PATIENT)


def test_list_split_over_several_values_is_rejoined() -> None:
    req = parse_adhoc_query_request(parse_xml(_lenient_request(HOME, "20221015")))
    assert req.values(QueryParam.STATUS) == [
        "urn:oasis:names:tc:ebxml-regrep:StatusType:Approved",
        "urn:oasis:names:tc:ebxml-regrep:StatusType:Deprecated",
    ]
    assert decode_slot(["('a')", "('b','c')"]) == ["a", "b", "c"]  # the other multi-Value form
    with pytest.raises(QuerySyntaxError):
        decode_slot(["('a',", "'b'"])


@pytest.mark.parametrize(
    "value",
    ["'999911120' OR '1'='1'", "('a','b'", "'unterminated", "('a' 'b')", "20240101; DROP TABLE x", ""],
)
def test_hostile_or_malformed_values_are_refused(value: str) -> None:
    with pytest.raises(QuerySyntaxError):
        decode_value(value)


def test_value_decoding() -> None:
    assert decode_value("('a','b''c' , 'd')") == ["a", "b'c", "d"]
    assert decode_value("'x^^^&1.2&ISO'") == ["x^^^&1.2&ISO"]
    assert decode_value(" 20240101 ") == ["20240101"]


def test_unknown_stored_query_and_missing_params() -> None:
    req = replace(find_documents(PATIENT), query_id="urn:uuid:00000000-0000-0000-0000-000000000000")
    with pytest.raises(RegistryErrorException) as exc:
        validate_stored_query(req)
    assert exc.value.errors[0].error_code == ErrorCode.UNKNOWN_STORED_QUERY
    no_status = replace(find_documents(PATIENT), slots=find_documents(PATIENT).slots[:1])
    with pytest.raises(RegistryErrorException) as exc:
        validate_stored_query(no_status)
    assert exc.value.errors[0].error_code == ErrorCode.STORED_QUERY_MISSING_PARAM
    assert "$XDSDocumentEntryStatus" in exc.value.errors[0].code_context
    by_ref = replace(find_documents(PATIENT), query_id=StoredQuery.FIND_DOCUMENTS_BY_REFERENCE_ID)
    with pytest.raises(RegistryErrorException) as exc:
        validate_stored_query(by_ref)
    assert exc.value.errors[0].error_code == ErrorCode.STORED_QUERY_MISSING_PARAM


def test_repeated_non_repeatable_param_and_two_patient_ids() -> None:
    req = find_documents(PATIENT)
    doubled = replace(req, slots=req.slots + req.slots[:1])
    with pytest.raises(RegistryErrorException) as exc:
        validate_stored_query(doubled)
    assert exc.value.errors[0].error_code == ErrorCode.STORED_QUERY_PARAM_NUMBER


def test_get_documents_needs_home(wsdl_dir: Path) -> None:
    req = get_documents(HOME, unique_ids=["2.25.1", "2.25.2"])
    assert_valid(wsdl_dir, build_adhoc_query_request(req))
    assert validate_stored_query(req) is StoredQuery.GET_DOCUMENTS
    with pytest.raises(RegistryErrorException) as exc:
        validate_stored_query(replace(req, home=None))
    assert exc.value.errors[0].error_code == ErrorCode.MISSING_HOME_COMMUNITY_ID


def test_home_is_always_emitted_as_urn_oid() -> None:
    el = build_adhoc_query_request(find_documents(PATIENT, home="2.16.528.1.1007.99.20001"))
    assert el.find("{*}AdhocQuery").get("home") == HOME  # type: ignore[union-attr]
    assert normalise_home("URN:OID:1.2.3") == "urn:oid:1.2.3"
    with pytest.raises(ValueError):
        normalise_home("urn:oid:1.2." + "3" * 70)


# --- responses ---


def test_leafclass_response_validates_and_round_trips(wsdl_dir: Path) -> None:
    entry = kos_entry()
    resp = AdhocQueryResponse(ResponseStatus.SUCCESS, (entry,))
    el = build_adhoc_query_response(resp)
    assert_valid(wsdl_dir, el)
    eo = el.find("{*}RegistryObjectList/{*}ExtrinsicObject")
    assert eo is not None and eo.get("home") == HOME
    schemes = [c.get("classificationScheme") for c in eo.iterfind("{*}Classification")]
    assert Scheme.FORMAT_CODE in schemes and Scheme.AUTHOR in schemes
    parsed = parse_adhoc_query_response(parse_xml(etree.tostring(el)))
    assert parsed.status is ResponseStatus.SUCCESS
    assert parsed.entries == [entry]
    assert parsed.entries[0].author_uras == {"00010990"}
    assert parsed.objects_missing_home() == []
    # Re-building gives identical bytes: nested ids are deterministic.
    assert etree.tostring(build_adhoc_query_response(resp)) == etree.tostring(el)


def test_author_institution_xon_carries_ura_in_xon10() -> None:
    el = build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, (kos_entry(),)))
    values = [v.text for v in el.iter("{*}Value")]
    assert "Ziekenhuis st. Jansdal^^^^^&2.16.528.1.1007.3.3&ISO^^^^00010990" in values
    assert Xon.parse("Ziekenhuis^^10990").ura == "00010990"  # legacy XON.3 form, unpadded


def test_partial_success_with_errors_and_object_refs(wsdl_dir: Path) -> None:
    errors = (
        RegistryError(ErrorCode.UNAVAILABLE_COMMUNITY, "urn:oid:1.2.3 timed out", location="urn:oid:1.2.3"),
    )
    resp = AdhocQueryResponse(
        ResponseStatus.PARTIAL_SUCCESS, (ObjectRef(kos_entry().entry_uuid, HOME),), errors
    )
    el = build_adhoc_query_response(resp)
    assert_valid(wsdl_dir, el)
    assert el.get("status") == "urn:ihe:iti:2007:ResponseStatusType:PartialSuccess"
    parsed = parse_adhoc_query_response(el)
    assert parsed == resp


def test_failure_response_validates(wsdl_dir: Path) -> None:
    errors = (RegistryError(ErrorCode.UNKNOWN_STORED_QUERY, "urn:uuid:x"),)
    el = build_adhoc_query_response(AdhocQueryResponse(status_for(errors, False), (), errors))
    assert_valid(wsdl_dir, el)
    assert el.get("status") == ResponseStatus.FAILURE


def test_strict_output_refuses_incomplete_metadata() -> None:
    with pytest.raises(MetadataError, match="home"):
        build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, (kos_entry(home=None),)))
    with pytest.raises(MetadataError, match="format_code"):
        build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, (kos_entry(format_code=None),)))
    with pytest.raises(MetadataError, match="256"):
        build_adhoc_query_response(AdhocQueryResponse(ResponseStatus.SUCCESS, (kos_entry(hash="x" * 300),)))
    with pytest.raises(MetadataError):
        build_adhoc_query_response(
            AdhocQueryResponse(ResponseStatus.SUCCESS, (ObjectRef("urn:uuid:1", None),))
        )
    with pytest.raises(MetadataError, match="Success"):
        build_adhoc_query_response(
            AdhocQueryResponse(ResponseStatus.SUCCESS, (), (RegistryError(ErrorCode.REGISTRY_ERROR, "x"),))
        )


def test_lenient_response_parsing_of_peer_quirks() -> None:
    xml = b"""<query:AdhocQueryResponse xmlns:query="urn:oasis:names:tc:ebxml-regrep:xsd:query:3.0"
        xmlns:rim="urn:oasis:names:tc:ebxml-regrep:xsd:rim:3.0"
        xmlns:rs="urn:oasis:names:tc:ebxml-regrep:xsd:rs:3.0"
        status="urn:oasis:names:tc:ebxml-regrep:ResponseStatusType:PartialSuccess">
      <rs:RegistryErrorList>
        <rs:RegistryError errorCode="XDSRegistryError" codeContext="busy" severity="Warning"/>
      </rs:RegistryErrorList>
      <rim:RegistryObjectList>
        <rim:ExtrinsicObject id="urn:uuid:9e0110f8-4748-4f1e-b0a8-cecae32209c7" home="1.2.840.114350.1">
          <rim:ExternalIdentifier id="e1" registryObject="x" value="2.25.9"
            identificationScheme="urn:uuid:2e82c1f6-a085-4c72-9da3-8640a32e42ab"/>
        </rim:ExtrinsicObject>
        <rim:ObjectRef id="urn:uuid:9e0110f8-4748-4f1e-b0a8-cecae32209c8"/>
        <rim:RegistryPackage id="urn:uuid:skipped"/>
      </rim:RegistryObjectList>
    </query:AdhocQueryResponse>"""
    parsed = parse_adhoc_query_response(parse_xml(xml))
    assert parsed.status is ResponseStatus.PARTIAL_SUCCESS  # PartialSuccess sent in the OASIS namespace
    assert parsed.errors[0].severity.endswith("Warning")
    entry = parsed.entries[0]
    assert entry.home == "urn:oid:1.2.840.114350.1" and entry.unique_id == "2.25.9"
    assert entry.format_code is None and entry.repository_unique_id is None
    assert parsed.objects_missing_home() == ["urn:uuid:9e0110f8-4748-4f1e-b0a8-cecae32209c8"]


# --- ITI-39 / RAD-75 ---


def test_retrieve_request_validates_and_round_trips(wsdl_dir: Path) -> None:
    req = RetrieveDocumentSetRequest(
        (DocumentRequest(REPO, "2.25.1", HOME), DocumentRequest(REPO, "2.25.2", HOME))
    )
    el = build_retrieve_request(req)
    assert_valid(wsdl_dir, el)
    assert parse_retrieve_request(el) == req


def test_retrieve_request_without_home_parses_for_the_responder_to_refuse() -> None:
    el = build_retrieve_request(RetrieveDocumentSetRequest((DocumentRequest(REPO, "2.25.1"),)))
    assert parse_retrieve_request(el).documents[0].home is None


def test_imaging_retrieve_request_validates_and_round_trips(wsdl_dir: Path) -> None:
    req = RetrieveImagingDocumentSetRequest(
        (
            StudyRequest(
                STUDY,
                (
                    SeriesRequest(
                        "1.2.3.4.5.1",
                        (
                            DocumentRequest(REPO, "1.2.3.4.5.1.1", HOME),
                            DocumentRequest(REPO, "1.2.3.4.5.1.2", HOME),
                        ),
                    ),
                ),
            ),
        ),
        (EXPLICIT_VR_LITTLE_ENDIAN,),
    )
    el = build_imaging_retrieve_request(req)
    assert_valid(wsdl_dir, el)
    parsed = parse_imaging_retrieve_request(el)
    assert parsed == req
    assert [i[2].document_unique_id for i in parsed.instances()] == ["1.2.3.4.5.1.1", "1.2.3.4.5.1.2"]
    with pytest.raises(MetadataError):
        build_imaging_retrieve_request(replace(req, transfer_syntaxes=()))


def _response() -> RetrieveDocumentSetResponse:
    return RetrieveDocumentSetResponse(
        ResponseStatus.PARTIAL_SUCCESS,
        (RetrievedDocument(REPO, "2.25.1", "application/dicom", b"DICM\x00\xff" * 50, HOME),),
        (RegistryError(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, "2.25.2", location=HOME),),
    )


def test_retrieve_response_inline_validates_and_round_trips(wsdl_dir: Path) -> None:
    el, attachments = build_retrieve_response(_response(), mtom=False)
    assert attachments == []
    assert_valid(wsdl_dir, el)
    assert parse_retrieve_response(el, {}) == _response()


def test_retrieve_response_mtom_round_trip_and_xop_infoset_validates(wsdl_dir: Path) -> None:
    from duo_gateway.soap.envelope import Addressing, build_envelope, parse_envelope
    from duo_gateway.soap.mtom import build_mtom

    el, attachments = build_retrieve_response(_response())
    assert len(attachments) == 1 and el.find(".//{*}Include") is not None
    env = build_envelope(Addressing("urn:ihe:iti:2007:CrossGatewayRetrieveResponse"), el)
    ctype, body = build_mtom(env, attachments, "urn:ihe:iti:2007:CrossGatewayRetrieveResponse")
    root, parts = parse_mtom(ctype, bytes(body))
    payload = parse_envelope(root).body
    assert payload is not None
    assert parse_retrieve_response(payload, parts) == _response()
    inlined = inline_documents(payload, parts)
    assert_valid(wsdl_dir, inlined)
    doc = inlined.find(".//{*}Document")
    assert doc is not None and base64.b64decode(doc.text or "") == b"DICM\x00\xff" * 50
