"""Who asked, in the audit trail of DUO's responding gateway (issue 11, part 5), end to end.

Requests go through the real HTTP route with a signed XUA assertion; the ATNA records are read back
from the audit file sink, found by the assertion's own ID (one fresh assertion per request), so
records of other requests cannot stand in for the one under test.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import pytest
import pytest_asyncio
from lxml import etree

from duo_gateway.access import Caller, PeerCertificate
from duo_gateway.audit.messages import MAX_FIELD_CHARS, Peer
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    Addressing,
    build_envelope,
    new_message_id,
    serialize,
)
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca.codes import BASIC_TEXT_SR_SOP_CLASS, KOS_SOP_CLASS, Action
from duo_gateway.xca.query import build_adhoc_query_request, find_documents, parse_adhoc_query_response
from duo_gateway.xca.responding.service import CallContext
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
)
from duo_gateway.xua import Requester, security_header
from tests.xca.responding_harness import CLAIMS, HOME, Network, Reply, running_network

ALL = "999911120"
EXPLICIT_VR_LE = "1.2.840.10008.1.2.1"
SAML = "urn:oasis:names:tc:SAML:2.0:assertion"
UZI_CX = f"{CLAIMS.uzi}^^^&2.16.528.1.1007.3.1&ISO"
URA_CX = f"{CLAIMS.ura}^^^&2.16.528.1.1007.3.3&ISO"

#: One network for the module; the unit test at the end needs no loop.
on_network = pytest.mark.asyncio(loop_scope="module")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("duo"), studies_per_patient=1) as network:
        yield network


async def send(duo: Network, path: str, action: str, body: etree._Element, *,
               reply_to: str = "http://www.w3.org/2005/08/addressing/anonymous") -> tuple[Reply, str]:
    """One request with a fresh assertion; returns the reply and that assertion's ID."""
    assertion = duo.assertion()
    assertion_id = assertion.get("ID")
    assert assertion_id
    env = build_envelope(
        Addressing(action=action, message_id=new_message_id(), to=duo.url + path, reply_to=reply_to),
        body, [security_header(assertion, datetime.now(UTC))])
    reply = await duo.post(path, serialize(env), f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{action}"')
    assert reply.status == 200, reply.raw[:500]
    return reply, assertion_id


async def records_of(duo: Network, assertion_id: str, transaction: str) -> list[tuple[etree._Element, int]]:
    """The records (and their sizes) made on ``assertion_id`` for ``transaction``, once written."""
    audit_file = duo.gateway.config.storage.path / "audit" / "audit.log"

    def found() -> list[tuple[etree._Element, int]]:
        out = []
        if audit_file.exists():
            for record in parse_file_records(audit_file.read_bytes()).records:
                xml = parse_message(record).msg
                root = parse_xml(xml)
                if (root.xpath("string(EventIdentification/EventTypeCode/@csd-code)") == transaction
                        and assertion_id in root.xpath(
                            "ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='13']"
                            "/@ParticipantObjectID")):
                    out.append((root, len(xml)))
        return out

    deadline = time.monotonic() + 10
    while not found() and time.monotonic() < deadline:  # noqa: ASYNC110
        await asyncio.sleep(0.1)  # the auditor writes behind a queue; the file is all we can watch
    return found()


def issuer_of(duo: Network) -> str:
    return duo.assertion().findtext(f"{{{SAML}}}Issuer") or ""


def assert_who_asked(root: etree._Element, assertion_id: str, issuer: str) -> None:
    person = root.xpath(f"ActiveParticipant[@UserID='{UZI_CX}']")
    assert len(person) == 1, etree.tostring(root)[:2000]
    assert person[0].get("UserIsRequestor") == "true"
    assert person[0].get("UserName") == f"<{CLAIMS.uzi}@{issuer}>"
    assert person[0].xpath("RoleIDCode/@csd-code") == [CLAIMS.role]
    assert person[0].xpath("RoleIDCode/@codeSystemName") == ["2.16.840.1.113883.2.4.15.111"]
    organisation = root.xpath(f"ActiveParticipant[@UserID='{URA_CX}']")
    assert len(organisation) == 1 and organisation[0].xpath("RoleIDCode/@csd-code") == ["V6"]
    assert root.xpath("EventIdentification/PurposeOfUse/@csd-code") == [CLAIMS.purpose]
    assertion = root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='13']")
    assert [a.get("ParticipantObjectID") for a in assertion] == [assertion_id]
    assert root.xpath("ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='1']"
                      "/@ParticipantObjectID") == [bsn_cx(ALL)]


async def find_all(duo: Network, **send_args: str) -> tuple[Reply, str]:
    body = build_adhoc_query_request(find_documents(bsn_cx(ALL)))
    return await send(duo, duo.gateway.config.xca_responding.iti38_path, Action.ITI38, body, **send_args)


@on_network
async def test_iti38_disclosure_names_uzi_ura_role_purpose_and_assertion(duo: Network) -> None:
    reply, assertion_id = await find_all(duo)
    assert reply.envelope is not None and reply.envelope.body is not None
    assert parse_adhoc_query_response(reply.envelope.body).entries, "nothing disclosed: nothing to audit"
    records = await records_of(duo, assertion_id, "ITI-38")
    assert len(records) == 1
    root, _size = records[0]
    assert root.xpath("string(EventIdentification/EventOutcomeIndicator)") in ("", "0")
    assert_who_asked(root, assertion_id, issuer_of(duo))


@on_network
async def test_iti39_and_rad75_disclosures_name_the_requester(duo: Network) -> None:
    reply, _ = await find_all(duo)
    assert reply.envelope is not None and reply.envelope.body is not None
    entries = parse_adhoc_query_response(reply.envelope.body).entries
    kos = next(e for e in entries if e.format_code is not None and e.format_code.code == KOS_SOP_CLASS)
    assert kos.repository_unique_id is not None
    cfg = duo.gateway.config.xca_responding

    body = build_retrieve_request(RetrieveDocumentSetRequest(
        (DocumentRequest(kos.repository_unique_id, kos.unique_id, HOME),)))
    _, iti39_assertion = await send(duo, cfg.iti39_path, Action.ITI39, body)
    [(iti39_record, _)] = await records_of(duo, iti39_assertion, "ITI-39")
    assert_who_asked(iti39_record, iti39_assertion, issuer_of(duo))

    hospital = next(h for h in duo.net.hospitals if h.repository_unique_id == kos.repository_unique_id)
    study = next(s for s in duo.studies[hospital.ura] if s.patient_id == ALL)
    by_series: dict[str, list[DocumentRequest]] = {}
    for ds in study.instances:
        if ds.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS:
            by_series.setdefault(str(ds.SeriesInstanceUID), []).append(
                DocumentRequest(hospital.repository_unique_id, str(ds.SOPInstanceUID), HOME))
    request = RetrieveImagingDocumentSetRequest((StudyRequest(study.study_instance_uid, tuple(
        SeriesRequest(se, tuple(docs)) for se, docs in by_series.items())),), (EXPLICIT_VR_LE,))
    body = build_imaging_retrieve_request(request)
    _, rad75_assertion = await send(duo, cfg.rad75_path, Action.RAD75, body)
    [(rad75_record, _)] = await records_of(duo, rad75_assertion, "RAD-75")
    assert_who_asked(rad75_record, rad75_assertion, issuer_of(duo))


@on_network
async def test_a_100_kb_reply_to_makes_a_bounded_record(duo: Network) -> None:
    """The attack of issue 11 (a 100 KB ReplyTo made a 103 KB record), through the real route."""
    huge = "http://evil.example/" + "a" * 100_000
    _, assertion_id = await find_all(duo, reply_to=huge)
    [(root, size)] = await records_of(duo, assertion_id, "ITI-38")
    assert size < 12 * 1024, size  # the query itself (base64) is most of what is left
    # Whether the ReplyTo is recorded (cut) or the transport names the caller by its certificate
    # instead, no attribute of the record is longer than the bound.
    longest = max(len(str(v)) for v in root.xpath("//@*"))
    assert longest <= MAX_FIELD_CHARS, longest
    assert_who_asked(root, assertion_id, issuer_of(duo))  # cutting the caller's text never costs who asked


def test_the_calling_system_is_named_by_its_certificate() -> None:
    """What transport.py passes as ``system`` ends up next to the ReplyTo IHE makes the UserID."""
    now = datetime.now(UTC)
    requester = Requester(uzi=CLAIMS.uzi, role=CLAIMS.role, ura=CLAIMS.ura, issuer="urn:oid:1.2.3",
                          assertion_id="_a1", issue_instant=now, not_on_or_after=now, signer="CN=s")
    reply_to = Peer("http://www.w3.org/2005/08/addressing/anonymous", host="127.0.0.1")
    certificate = PeerCertificate(sha256="ab" * 32, subject="CN=peer.example,O=Peer", issuer="CN=CA")
    with_system = CallContext(requester, reply_to, b"", Caller(certificate))
    caller = with_system.audit_caller()
    assert (caller.user_id, caller.host) == (reply_to.user_id, "127.0.0.1")
    assert caller.alternative_user_id == f"unknown:{'ab' * 8}"  # a certificate no client entry matched
    assert caller.user_name == certificate.label
    assert CallContext(requester, reply_to).audit_caller() == reply_to  # before transport.py passes it
    # A transport that already names the caller in UserID does not get it twice.
    named = CallContext(requester, Peer(f"unknown:{'ab' * 8}", host="127.0.0.1"), b"", Caller(certificate))
    assert named.audit_caller().alternative_user_id is None
    assert named.audit_caller().user_name == certificate.label
    assert with_system.audit_requestor().assertion_id == "_a1"
