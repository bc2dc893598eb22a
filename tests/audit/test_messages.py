"""The audit XML, checked element by element against PS3.15 A.5.1 and the IHE/IPF conventions."""

from __future__ import annotations

import base64
import hashlib
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Literal

import pytest
from lxml import etree

from duo_gateway.audit.messages import (
    MAX_FIELD_CHARS,
    MAX_QUERY_BYTES,
    MAX_TEXT_CHARS,
    ActiveParticipant,
    AuditMessage,
    AuditSourceIdentification,
    Code,
    DocumentRef,
    EventAction,
    EventIdentification,
    EventOutcome,
    NetworkAccessPointType,
    ObjectRole,
    ObjectType,
    ParticipantObjectIdentification,
    Peer,
    Requestor,
    SopClassCount,
    StudyTransfer,
    capped,
    dicom_instances_transferred,
    dicom_query,
    iti38_query,
    iti39_retrieve,
    mitz_consent_question,
    rad75_retrieve,
    timeline_disclosure,
    to_xml,
)
from duo_gateway.bsn import bsn_cx
from duo_gateway.xua import Claims, Requester

FIXTURES = Path(__file__).parent / "fixtures"
WHEN = datetime(2024, 5, 1, 12, 30, 45, 123456, tzinfo=UTC)
BSN = "999911120"
SOURCE = AuditSourceIdentification(source_id="duo-gw-1", enterprise_site_id="DUO")
LOCAL = Peer("http://www.w3.org/2005/08/addressing/anonymous", host="10.0.0.5", alternative_user_id="4242")
REMOTE = Peer("https://rg.example.org/xca/iti38", host="rg.example.org")


def parse(message: AuditMessage) -> etree._Element:
    return etree.fromstring(to_xml(message))


def one(root: etree._Element, path: str) -> etree._Element:
    found = root.xpath(path)
    assert isinstance(found, list) and len(found) == 1, (path, found)
    element = found[0]
    assert isinstance(element, etree._Element)
    return element


def code_of(element: etree._Element) -> tuple[str | None, str | None, str | None]:
    return element.get("csd-code"), element.get("codeSystemName"), element.get("originalText")


def attrs(element: etree._Element) -> dict[str, str]:
    return {str(k): str(v) for k, v in element.attrib.items()}


def details_of(element: etree._Element) -> dict[str | None, bytes]:
    return {d.get("type"): base64.b64decode(d.get("value") or "")
            for d in element.iterfind("ParticipantObjectDetail")}


def b64_attr(element: etree._Element, path: str) -> bytes:
    return base64.b64decode(one(element, path).get("value") or "")


def golden_iti38() -> AuditMessage:
    return iti38_query(
        initiating=LOCAL, responding=REMOTE, audit_source=SOURCE,
        query_id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d",
        query_request=b"<query:AdhocQueryRequest/>", patient_id=bsn_cx(BSN),
        home_community_id="urn:oid:1.2.3.4", when=WHEN)


def test_golden_iti38_bytes() -> None:
    """The exact bytes are pinned: an accidental change of the wire form must show up in review."""
    assert to_xml(golden_iti38()) == (FIXTURES / "iti38_query.xml").read_bytes()


def test_document_shape_and_declaration() -> None:
    data = to_xml(golden_iti38())
    assert data.startswith(b'<?xml version="1.0" encoding="UTF-8"?><AuditMessage>')
    assert data.count(b"<?xml") == 1
    root = etree.fromstring(data)
    assert [child.tag for child in root] == [
        "EventIdentification", "ActiveParticipant", "ActiveParticipant", "AuditSourceIdentification",
        "ParticipantObjectIdentification", "ParticipantObjectIdentification"]
    # Every coded value carries the three attributes the DICOM schema's CodedValueType requires.
    coded = root.xpath("//*[@csd-code]")
    assert isinstance(coded, list) and len(coded) == 7
    for element in coded:
        assert isinstance(element, etree._Element)
        assert all(code_of(element)), element.tag
    assert root.xpath("//*[@code or @displayName]") == []


def test_iti38_structure() -> None:
    root = parse(golden_iti38())
    event = one(root, "/AuditMessage/EventIdentification")
    assert attrs(event) == {"EventActionCode": "E", "EventDateTime": "2024-05-01T12:30:45.123Z",
                            "EventOutcomeIndicator": "0"}
    assert code_of(one(event, "EventID")) == ("110112", "DCM", "Query")
    assert code_of(one(event, "EventTypeCode")) == ("ITI-38", "IHE Transactions", "Cross Gateway Query")

    source = one(root, "ActiveParticipant[RoleIDCode/@csd-code='110153']")
    assert attrs(source) == {"UserID": LOCAL.user_id, "AlternativeUserID": "4242", "UserIsRequestor": "true",
                             "NetworkAccessPointID": "10.0.0.5", "NetworkAccessPointTypeCode": "2"}
    dest = one(root, "ActiveParticipant[RoleIDCode/@csd-code='110152']")
    assert attrs(dest) == {"UserID": REMOTE.user_id, "UserIsRequestor": "false",
                           "NetworkAccessPointID": "rg.example.org", "NetworkAccessPointTypeCode": "1"}
    assert code_of(one(dest, "RoleIDCode")) == ("110152", "DCM", "Destination Role ID")

    audit_source = one(root, "AuditSourceIdentification")
    assert attrs(audit_source) == {"AuditEnterpriseSiteID": "DUO", "AuditSourceID": "duo-gw-1"}
    assert one(audit_source, "AuditSourceTypeCode").get("csd-code") == "4"

    query = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']")
    assert query.get("ParticipantObjectTypeCode") == "2"
    assert query.get("ParticipantObjectID") == "urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d"
    assert code_of(one(query, "ParticipantObjectIDTypeCode"))[0] == "ITI-38"
    assert base64.b64decode(one(query, "ParticipantObjectQuery").text or "") == b"<query:AdhocQueryRequest/>"
    assert details_of(query) == {"QueryEncoding": b"UTF-8",
                                 "urn:ihe:iti:xca:2010:homeCommunityId": b"urn:oid:1.2.3.4"}
    assert [c.tag for c in query] == ["ParticipantObjectIDTypeCode", "ParticipantObjectQuery",
                                      "ParticipantObjectDetail", "ParticipantObjectDetail"]

    patient = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectTypeCode") == "1"
    assert patient.get("ParticipantObjectID") == f"{BSN}^^^&2.16.840.1.113883.2.4.6.3&ISO"
    assert code_of(one(patient, "ParticipantObjectIDTypeCode")) == ("2", "RFC-3881", "Patient Number")


def test_human_requestor_and_failure_outcome() -> None:
    human = ActiveParticipant("<saml:NameID>uzi-123</saml:NameID>", True, user_name="Dr. Jansen")
    msg = iti38_query(initiating=LOCAL, responding=REMOTE, audit_source=SOURCE, query_id="q",
                      query_request=b"", patient_id=None, outcome=EventOutcome.SERIOUS_FAILURE,
                      outcome_description="timeout", when=WHEN, extra_participants=[human])
    root = parse(msg)
    assert one(root, "EventIdentification").get("EventOutcomeIndicator") == "8"
    assert one(root, "EventIdentification/EventOutcomeDescription").text == "timeout"
    assert one(root, "ActiveParticipant[@UserName='Dr. Jansen']").get("UserIsRequestor") == "true"
    assert root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']") == []


@pytest.mark.parametrize(("side", "event", "action"),
                         [("responding", "110106", "R"), ("initiating", "110107", "C")])
def test_iti39(side: Literal["initiating", "responding"], event: str, action: str) -> None:
    docs = [DocumentRef("1.2.3.1", "1.9.9", "urn:oid:1.2.3.4"), DocumentRef("1.2.3.2", "1.9.9")]
    msg = iti39_retrieve(side=side, initiating=LOCAL, responding=REMOTE, audit_source=SOURCE,
                         documents=docs, patient_id=bsn_cx(BSN), when=WHEN)
    root = parse(msg)
    assert one(root, "EventIdentification").get("EventActionCode") == action
    assert one(root, "EventIdentification/EventID").get("csd-code") == event
    assert one(root, "EventIdentification/EventTypeCode").get("csd-code") == "ITI-39"
    # The responding gateway is the Source of the documents, the initiating one requested them.
    assert one(root, "ActiveParticipant[RoleIDCode/@csd-code='110153']").get("UserID") == REMOTE.user_id
    assert one(root, "ActiveParticipant[@UserIsRequestor='true']").get("UserID") == LOCAL.user_id
    first = one(root, "ParticipantObjectIdentification[@ParticipantObjectID='1.2.3.1']")
    assert (first.get("ParticipantObjectTypeCode"), first.get("ParticipantObjectTypeCodeRole")) == ("2", "3")
    assert code_of(one(first, "ParticipantObjectIDTypeCode")) == ("9", "RFC-3881", "Report Number")
    assert details_of(first) == {"Repository Unique Id": b"1.9.9", "ihe:homeCommunityID": b"urn:oid:1.2.3.4"}
    second = one(root, "ParticipantObjectIdentification[@ParticipantObjectID='1.2.3.2']")
    assert len(second.findall("ParticipantObjectDetail")) == 1


def test_rad75_adds_study_objects() -> None:
    msg = rad75_retrieve(side="initiating", initiating=LOCAL, responding=REMOTE, audit_source=SOURCE,
                         studies=[StudyTransfer("1.2.840.1")],
                         documents=[DocumentRef("1.2.840.1.1.1", "1.9.9")],
                         patient_id=bsn_cx(BSN), when=WHEN)
    root = parse(msg)
    assert code_of(one(root, "EventIdentification/EventID")) == (
        "110104", "DCM", "DICOM Instances Transferred")
    assert one(root, "EventIdentification").get("EventActionCode") == "C"
    assert code_of(one(root, "EventIdentification/EventTypeCode")) == (
        "RAD-75", "IHE Transactions", "Cross Gateway Retrieve Imaging Document Set")
    study = one(root, "ParticipantObjectIdentification[ParticipantObjectIDTypeCode/@csd-code='110180']")
    assert study.get("ParticipantObjectID") == "1.2.840.1"
    assert len(root.findall("ParticipantObjectIdentification")) == 3


@pytest.mark.parametrize(("question", "code"), [("closed", "MITZ-GAV"), ("open", "MITZ-OAV")])
def test_mitz_question_records_the_bsn(question: Literal["closed", "open"], code: str) -> None:
    mitz = Peer("https://tst-api.mijn-mitz.nl/geslotenautorisatievraag/xacml3", host="tst-api.mijn-mitz.nl")
    msg = mitz_consent_question(question=question, gateway=LOCAL, mitz=mitz, audit_source=SOURCE, bsn=BSN,
                                request_id="urn:uuid:1", request=b"<Request/>", result="Deny", when=WHEN)
    root = parse(msg)
    assert code_of(one(root, "EventIdentification/EventID"))[0] == "110112"
    assert one(root, "EventIdentification").get("EventActionCode") == "E"
    assert one(root, "EventIdentification").get("EventOutcomeIndicator") == "0"  # a Deny is an answer
    assert code_of(one(root, "EventIdentification/EventTypeCode"))[:2] == (code, "DUO Transactions")
    assert one(root, "ActiveParticipant[@UserIsRequestor='false']").get("UserID") == mitz.user_id
    patient = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == bsn_cx(BSN)
    query = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']")
    assert b64_attr(query, "ParticipantObjectDetail[@type='MitzResult']") == b"Deny"


def test_dicom_query() -> None:
    pacs = Peer("PACS_AE", host="192.0.2.10")
    msg = dicom_query(requestor=LOCAL, responder=pacs, audit_source=SOURCE,
                      sop_class_uid="1.2.840.10008.5.1.4.1.2.2.1", identifier=b"\x08\x00\x52\x00",
                      transfer_syntax_uid="1.2.840.10008.1.2.1", patient_id="PAT1", when=WHEN)
    root = parse(msg)
    assert code_of(one(root, "EventIdentification/EventID"))[0] == "110112"
    assert root.xpath("EventIdentification/EventTypeCode") == []
    query = one(root, "ParticipantObjectIdentification[ParticipantObjectIDTypeCode/@csd-code='110181']")
    assert query.get("ParticipantObjectID") == "1.2.840.10008.5.1.4.1.2.2.1"
    assert base64.b64decode(one(query, "ParticipantObjectQuery").text or "") == b"\x08\x00\x52\x00"
    assert b64_attr(query, "ParticipantObjectDetail[@type='TransferSyntax']") == b"1.2.840.10008.1.2.1"


def test_c_move_pull_is_requested_by_the_receiver() -> None:
    pacs = Peer("PACS_AE", host="192.0.2.10")
    msg = dicom_instances_transferred(
        side="destination", source=pacs, destination=LOCAL, requestor="destination", audit_source=SOURCE,
        studies=[StudyTransfer("1.2.3", (SopClassCount("1.2.840.10008.5.1.4.1.1.2", 120),))],
        patient_id="PAT1", when=WHEN)
    root = parse(msg)
    assert code_of(one(root, "EventIdentification/EventID"))[0] == "110104"
    assert one(root, "EventIdentification").get("EventActionCode") == "C"
    assert one(root, "ActiveParticipant[@UserIsRequestor='true']/RoleIDCode").get("csd-code") == "110152"
    assert one(root, "ActiveParticipant[@UserIsRequestor='false']").get("UserID") == "PACS_AE"
    sop = one(root, "ParticipantObjectIdentification/ParticipantObjectDescription/SOPClass")
    assert attrs(sop) == {"UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": "120"}


def test_event_time_is_rendered_in_utc() -> None:
    cet = datetime(2024, 5, 1, 14, 30, 45, tzinfo=timezone(timedelta(hours=2)))
    event = EventIdentification(Code("110112", "DCM", "Query"), EventAction.EXECUTE, cet,
                                EventOutcome.SUCCESS)
    msg = AuditMessage(event, (ActiveParticipant("x", True),), SOURCE)
    assert one(parse(msg), "EventIdentification").get("EventDateTime") == "2024-05-01T12:30:45.000Z"


def test_peer_supplied_control_characters_cannot_break_or_evade_the_record() -> None:
    evil = Peer("user\x00\x1b[31m", host="10.0.0.9")
    msg = iti38_query(initiating=evil, responding=REMOTE, audit_source=SOURCE, query_id="q\x07",
                      query_request=b"\x00", patient_id=None, when=WHEN)
    root = parse(msg)
    assert one(root, "ActiveParticipant[@UserIsRequestor='true']").get("UserID") == "user\ufffd\ufffd[31m"
    assert one(root, "ParticipantObjectIdentification").get("ParticipantObjectID") == "q\ufffd"


def test_invalid_models_are_refused() -> None:
    code = Code("110112", "DCM", "Query")
    with pytest.raises(ValueError, match="timezone"):
        EventIdentification(code, EventAction.EXECUTE, datetime(2024, 1, 1), EventOutcome.SUCCESS)
    with pytest.raises(ValueError, match="mutually exclusive"):
        ParticipantObjectIdentification("x", ObjectType.PERSON, ObjectRole.PATIENT, code,
                                        name="n", query=b"q")
    with pytest.raises(ValueError, match="go together"):
        ActiveParticipant("x", True, network_access_point_id="10.0.0.1")
    with pytest.raises(ValueError, match="ActiveParticipant"):
        AuditMessage(EventIdentification(code, EventAction.EXECUTE, WHEN, EventOutcome.SUCCESS), (), SOURCE)
    assert ActiveParticipant("x", True, network_access_point_id="h",
                             network_access_point_type=NetworkAccessPointType.MACHINE_NAME).user_id == "x"


# --- DUO as Initiating Gateway importing for a transfer ----------------------------------------------


def test_iti39_import_is_a_110107_create_with_the_documents_and_patient() -> None:
    human = ActiveParticipant("000095254", True, alternative_user_id="00000666", user_name="01.039")
    msg = iti39_retrieve(side="initiating", initiating=LOCAL, responding=REMOTE, audit_source=SOURCE,
                         documents=[DocumentRef("1.2.3.9", "1.9.9", "urn:oid:1.2.3.4")],
                         patient_id=bsn_cx(BSN),
                         outcome=EventOutcome.SERIOUS_FAILURE, outcome_description="XDSDocumentUniqueIdError",
                         when=WHEN, extra_participants=[human])
    root = parse(msg)
    event = one(root, "EventIdentification")
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == ("C", "8")
    assert code_of(one(event, "EventID")) == ("110107", "DCM", "Import")
    assert one(event, "EventTypeCode").get("csd-code") == "ITI-39"
    assert one(event, "EventOutcomeDescription").text == "XDSDocumentUniqueIdError"
    assert one(root, "ActiveParticipant[RoleIDCode/@csd-code='110153']").get("UserID") == REMOTE.user_id
    assert one(root, "ActiveParticipant[RoleIDCode/@csd-code='110152']").get("UserID") == LOCAL.user_id
    assert one(root, "ActiveParticipant[@UserName='01.039']").get("UserID") == "000095254"
    doc = one(root, "ParticipantObjectIdentification[@ParticipantObjectID='1.2.3.9']")
    assert details_of(doc) == {"Repository Unique Id": b"1.9.9", "ihe:homeCommunityID": b"urn:oid:1.2.3.4"}
    patient = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID") == bsn_cx(BSN)


def test_rad75_import_is_a_110104_create_with_one_study_and_its_instances() -> None:
    docs = [DocumentRef(f"1.2.840.1.1.{i}", "1.9.9", "urn:oid:1.2.3.4") for i in (1, 2)]
    msg = rad75_retrieve(side="initiating", initiating=LOCAL, responding=REMOTE, audit_source=SOURCE,
                         studies=[StudyTransfer("1.2.840.1",
                                                (SopClassCount("1.2.840.10008.5.1.4.1.1.2", 2),))],
                         documents=docs, patient_id=bsn_cx(BSN), when=WHEN)
    root = parse(msg)
    event = one(root, "EventIdentification")
    assert (event.get("EventActionCode"), event.get("EventOutcomeIndicator")) == ("C", "0")
    assert code_of(one(event, "EventID")) == ("110104", "DCM", "DICOM Instances Transferred")
    assert one(event, "EventTypeCode").get("csd-code") == "RAD-75"
    study = one(root, "ParticipantObjectIdentification[ParticipantObjectIDTypeCode/@csd-code='110180']")
    assert study.get("ParticipantObjectID") == "1.2.840.1"
    assert attrs(one(study, "ParticipantObjectDescription/SOPClass")) == {
        "UID": "1.2.840.10008.5.1.4.1.1.2", "NumberOfInstances": "2"}
    ids = [o.get("ParticipantObjectID") for o in root.findall("ParticipantObjectIdentification")]
    assert ids == ["1.2.840.1", "1.2.840.1.1.1", "1.2.840.1.1.2", bsn_cx(BSN)]


# --- who asked: the XUA requester in every disclosure (issue 11, part 5) -----------------------------

UZI_CX = "000095254^^^&2.16.528.1.1007.3.1&ISO"
URA_CX = "00000666^^^&2.16.528.1.1007.3.3&ISO"
ISSUER = "urn:oid:2.16.528.1.1007.99.777"
ASSERTION_ID = "_5f1c0c6e-4b5e-4a57-9a1b-3d2f0e7c9a11"
WHO = Requestor(uzi="000095254", role="01.039", ura="00000666", purpose="TREAT", organisation_type="V6",
                assertion_id=ASSERTION_ID, issuer=ISSUER)


def assert_names_requestor(root: etree._Element, who: Requestor = WHO) -> None:
    """The person (UZI, role, alias<user@issuer>), the organisation (URA, type), purpose and assertion."""
    person = one(root, f"ActiveParticipant[@UserID='{UZI_CX}']")
    assert person.get("UserIsRequestor") == "true"
    assert person.get("UserName") == f"<{who.uzi}@{who.issuer}>"
    assert code_of(one(person, "RoleIDCode")) == (who.role, "2.16.840.1.113883.2.4.15.111", "Radioloog")
    organisation = one(root, f"ActiveParticipant[@UserID='{URA_CX}']")
    assert organisation.get("UserIsRequestor") == "false"
    assert code_of(one(organisation, "RoleIDCode")) == ("V6", "2.16.840.1.113883.2.4.15.1060",
                                                        "Algemeen ziekenhuis")
    assert code_of(one(root, "EventIdentification/PurposeOfUse")) == (
        "TREAT", "2.16.840.1.113883.1.11.20448", "Treatment")
    assertion = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='13']")
    assert assertion.get("ParticipantObjectID") == who.assertion_id
    assert assertion.get("ParticipantObjectTypeCode") == "2"
    assert code_of(one(assertion, "ParticipantObjectIDTypeCode"))[0] == "XUA-ASSERTION"
    assert details_of(assertion) == {"Issuer": (who.issuer or "").encode()}


def test_iti38_names_the_requester_of_the_assertion() -> None:
    msg = iti38_query(initiating=REMOTE, responding=LOCAL, audit_source=SOURCE, query_id="q",
                      query_request=b"<q/>", patient_id=bsn_cx(BSN), when=WHEN, requestor=WHO)
    root = parse(msg)
    assert_names_requestor(root)
    # The calling system stays the requesting Source; the people follow it; the patient stays last.
    assert [p.get("UserID") for p in root.iterfind("ActiveParticipant")] == [
        REMOTE.user_id, UZI_CX, URA_CX, LOCAL.user_id]
    assert root.findall("ParticipantObjectIdentification")[-1].get("ParticipantObjectID") == bsn_cx(BSN)
    # The schema's element order inside EventIdentification: PurposeOfUse comes last.
    assert [c.tag for c in one(root, "EventIdentification")] == ["EventID", "EventTypeCode", "PurposeOfUse"]


def test_requestor_of_a_validated_assertion_takes_its_id_issuer_and_subject() -> None:
    now = datetime.now(UTC)
    requester = Requester(uzi="000095254", role="01.039", ura="00000666", purpose="COC",
                          issuer=ISSUER, assertion_id=ASSERTION_ID, issue_instant=now,
                          not_on_or_after=now + timedelta(minutes=5), subject="dr.jansen", signer="CN=x",
                          mandated_uzi="000012345")
    who = Requestor.of(requester, assertion_id="ignored", issuer="ignored")
    assert (who.assertion_id, who.issuer, who.subject) == (ASSERTION_ID, ISSUER, "dr.jansen")
    root = parse(iti38_query(initiating=REMOTE, responding=LOCAL, audit_source=SOURCE, query_id="q",
                             query_request=b"", patient_id=None, when=WHEN, requestor=who))
    assert one(root, f"ActiveParticipant[@UserID='{UZI_CX}']").get("UserName") == f"<dr.jansen@{ISSUER}>"
    mandated = one(root, "ActiveParticipant[@UserID='000012345^^^&2.16.528.1.1007.3.1&ISO']")
    assert mandated.get("UserIsRequestor") == "true"
    assert code_of(one(root, "EventIdentification/PurposeOfUse"))[0] == "COC"
    # No organisation type in the token: the organisation is named without a role, not with a guess.
    assert one(root, f"ActiveParticipant[@UserID='{URA_CX}']").findall("RoleIDCode") == []


def test_claims_without_an_assertion_name_people_but_no_assertion() -> None:
    """The TLB API's requester (no XUA): named all the same, with no invented assertion or issuer."""
    claims = Claims(uzi="000095254", role="99.999", ura="00000666", purpose="TREAT")
    who = Requestor.of(claims)
    root = parse(timeline_disclosure(gateway=LOCAL, requestor=who, audit_source=SOURCE, bsn=BSN,
                                     study_uids=["1.2.3"], sources=["tlb:1=ok"], when=WHEN))
    person = one(root, f"ActiveParticipant[@UserID='{UZI_CX}']")
    assert person.get("UserName") is None
    assert code_of(one(person, "RoleIDCode")) == ("99.999", "2.16.840.1.113883.2.4.15.111", "99.999")
    assert one(root, "EventIdentification/PurposeOfUse").get("csd-code") == "TREAT"
    assert root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='13']") == []


@pytest.mark.parametrize(("side", "action"), [("responding", "R"), ("initiating", "C")])
def test_iti39_and_rad75_name_the_requester(side: Literal["initiating", "responding"], action: str) -> None:
    iti39 = parse(iti39_retrieve(side=side, initiating=REMOTE, responding=LOCAL, audit_source=SOURCE,
                                 documents=[DocumentRef("1.2.3.1", "1.9.9", "urn:oid:1.2.3.4")],
                                 patient_id=bsn_cx(BSN), when=WHEN, requestor=WHO))
    rad75 = parse(rad75_retrieve(side=side, initiating=REMOTE, responding=LOCAL, audit_source=SOURCE,
                                 studies=[StudyTransfer("1.2.840.1")], documents=[], patient_id=bsn_cx(BSN),
                                 when=WHEN, requestor=WHO))
    for root in (iti39, rad75):
        assert one(root, "EventIdentification").get("EventActionCode") == action
        assert_names_requestor(root)
        # The requesting gateway keeps its Destination role; the people come right after it.
        users = [p.get("UserID") for p in root.iterfind("ActiveParticipant")]
        assert users == [LOCAL.user_id, REMOTE.user_id, UZI_CX, URA_CX]


def test_transfer_and_timeline_records_name_the_requester() -> None:
    pacs = Peer("PACS_AE", host="192.0.2.10")
    pushed = parse(dicom_instances_transferred(
        side="source", source=LOCAL, destination=pacs, requestor="source", audit_source=SOURCE,
        studies=[StudyTransfer("1.2.3")], patient_id=bsn_cx(BSN), when=WHEN, on_behalf_of=WHO))
    assert_names_requestor(pushed)
    timeline = parse(timeline_disclosure(gateway=LOCAL, requestor=WHO, audit_source=SOURCE, bsn=BSN,
                                         study_uids=["1.2.3"], sources=[], when=WHEN,
                                         client=Peer("tlb:hospital-app", host="192.0.2.7")))
    assert_names_requestor(timeline)
    client = one(timeline, "ActiveParticipant[@UserID='tlb:hospital-app']")
    assert (client.get("UserIsRequestor"), one(client, "RoleIDCode").get("csd-code")) == ("true", "110152")


# --- bounded records ---------------------------------------------------------------------------------


def test_capped_keeps_short_values_and_marks_cut_ones() -> None:
    assert capped("x" * MAX_FIELD_CHARS) == "x" * MAX_FIELD_CHARS
    cut = capped("y" * 100_000)
    assert len(cut) == MAX_FIELD_CHARS
    assert cut.startswith("yyyy") and cut.endswith("[cut, 100000 chars]")
    assert capped("abcdefgh", 4) == "abcd"  # a limit too small for the marker is still never exceeded


def test_a_100_kb_reply_to_makes_a_small_record() -> None:
    """The attack of issue 11: a 100 KB ReplyTo made a 103 KB record. Every caller-supplied text is cut."""
    huge = "http://evil.example/" + "a" * 100_000
    caller = Peer(huge, host="10.0.0.9", alternative_user_id=huge, user_name=huge)
    msg = iti38_query(initiating=caller, responding=LOCAL, audit_source=SOURCE, query_id=huge,
                      query_request=b"<q/>", patient_id=bsn_cx(BSN), home_community_id=huge,
                      outcome=EventOutcome.MINOR_FAILURE, outcome_description=huge, when=WHEN, requestor=WHO)
    data = to_xml(msg)
    assert len(data) < 8 * 1024, len(data)
    root = etree.fromstring(data)
    source = one(root, "ActiveParticipant[RoleIDCode/@csd-code='110153']")
    for name in ("UserID", "AlternativeUserID", "UserName"):
        value = source.get(name) or ""
        assert len(value) == MAX_FIELD_CHARS and value.startswith("http://evil.example/aaa"), name
        assert value.endswith(f"[cut, {len(huge)} chars]")
    assert len(one(root, "EventIdentification/EventOutcomeDescription").text or "") == MAX_TEXT_CHARS
    assert_names_requestor(root)  # cutting the caller's text never costs the requester's identity


def test_a_huge_query_is_cut_but_identifiable() -> None:
    query = b"<q>" + b"z" * 1_000_000 + b"</q>"
    root = parse(iti38_query(initiating=REMOTE, responding=LOCAL, audit_source=SOURCE, query_id="q",
                             query_request=query, patient_id=None, when=WHEN))
    obj = one(root, "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']")
    kept = base64.b64decode(one(obj, "ParticipantObjectQuery").text or "")
    assert len(kept) == MAX_QUERY_BYTES and kept.startswith(b"<q>zzz")
    assert details_of(obj)["QueryCut"] == (
        f"{len(query)} bytes, sha256 {hashlib.sha256(query).hexdigest()}".encode())
    assert len(to_xml(iti38_query(initiating=REMOTE, responding=LOCAL, audit_source=SOURCE, query_id="q",
                                  query_request=query, patient_id=None, when=WHEN))) < 32 * 1024
