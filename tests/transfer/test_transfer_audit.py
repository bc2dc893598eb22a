"""A transfer's audit records name on whose behalf the images moved (issue 11, part 5)."""

from __future__ import annotations

import base64
from typing import cast

from lxml import etree

from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import (
    STORED_AS_DETAIL,
    AuditMessage,
    AuditSourceIdentification,
    Peer,
    Requestor,
    to_xml,
)
from duo_gateway.config.peers import TlbHospital
from duo_gateway.config.transfer import DestinationPacs
from duo_gateway.transfer.audit import audit_study
from duo_gateway.xua import Claims

UZI_CX = "000095254^^^&2.16.528.1.1007.3.1&ISO"
URA_CX = "00010001^^^&2.16.528.1.1007.3.3&ISO"


class _Recorder:
    """Stands in for the Auditor: the records, not their transport, are under test."""

    audit_source = AuditSourceIdentification(source_id="duo-test")

    def __init__(self) -> None:
        self.records: list[AuditMessage] = []

    def record(self, message: AuditMessage) -> None:
        self.records.append(message)


def test_import_and_push_records_name_the_requester() -> None:
    recorder = _Recorder()
    claims = Claims(uzi="000095254", role="01.039", ura="00010001", purpose="TREAT")
    hospital = TlbHospital.model_validate({
        "ura": "00010002", "name": "Maas", "ae_title": "MAAS_PACS", "host": "127.0.0.1", "port": 11112,
        "repository_unique_id": "1.2.3.4"})
    destination = DestinationPacs(name="own", ae_title="OWN_PACS", host="127.0.0.1", port=11113,
                                  uras=["00010001"])
    audit_study(cast(Auditor, recorder), gateway=Peer("DUO_GATEWAY", host="127.0.0.1"), bsn="999911120",
                study_uid="1.2.840.9", state="partial", detail="2 missing", destination=destination,
                hospital=hospital, stored=3, requestor=Requestor.of(claims))
    assert len(recorder.records) == 2  # the import from the hospital and the push to the destination
    for message in recorder.records:
        root = etree.fromstring(to_xml(message))
        people = {p.get("UserID"): p.get("UserIsRequestor") for p in root.iter("ActiveParticipant")}
        assert people[UZI_CX] == "true" and people[URA_CX] == "false", people
        assert root.xpath("EventIdentification/PurposeOfUse/@csd-code") == ["TREAT"]
        assert root.xpath(f"ActiveParticipant[@UserID='{UZI_CX}']/RoleIDCode/@csd-code") == ["01.039"]


def test_a_relabelled_import_keeps_the_original_patient_id_with_the_local_one() -> None:
    recorder = _Recorder()
    claims = Claims(uzi="000095254", role="01.039", ura="00010001", purpose="TREAT")
    destination = DestinationPacs(name="own", ae_title="OWN_PACS", host="127.0.0.1", port=11113,
                                  uras=["00010001"])
    audit_study(cast(Auditor, recorder), gateway=Peer("DUO_GATEWAY", host="127.0.0.1"), bsn="999911120",
                study_uid="1.2.840.9", state="completed", detail="", destination=destination, hospital=None,
                stored=3, requestor=Requestor.of(claims, issuer="tlb:umc-timeline"), stored_as="EZ-0001")
    (message,) = recorder.records
    root = etree.fromstring(to_xml(message))
    (patient,) = root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']")
    assert patient.get("ParticipantObjectID").startswith("999911120^^^")  # the original, the BSN
    details = {d.get("type"): base64.b64decode(d.get("value")).decode()
               for d in patient.iter("ParticipantObjectDetail")}
    assert details[STORED_AS_DETAIL] == "EZ-0001"
