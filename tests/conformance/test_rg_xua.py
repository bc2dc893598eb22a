"""NIST XDS Toolkit Responding Gateway cases 12309 and 12312, each bare and with its nine XUA variants.

NIST sends the Responding Gateway one FindDocuments for ObjectRef (12309) and one Retrieve of a
single document (12312) per assertion its Gazelle STS issues: a valid one (the bare case), and one per
test user (``_expired``, ``_unsigned``, ...), for which it expects a SOAP Fault, except
``_withauthzconsent``, for which it expects a registry Failure. Here DUO's XCA responding door gets
the same request bodies (the toolkit's ``query.xml`` shapes, built literally, not with DUO's codec) and
each variant's assertion, and the answer is held to what NIST asserts, and a little more: the fault's
WS-Security subcode and reason, so it is the variant's defect that was refused.

Adaptations common to every case:

- **Dutch XUA**: the assertion is Twiin/Mitz's (UZI, URA, RoleCodeNL, purpose TREAT), issued by the
  calling peer's issuer and signed with its pinned key; each NIST variant is read into that vocabulary
  by ``tests/support/xua_variants.py`` (both readings where a name allows two).
- **BSN patient**: ``$patient_id$`` is a BSN in CX form; the patient is the simulator's "partial"
  patient, who consented for the first TLB hospital only.
- **A PACS behind the gateway**: NIST's registry is loaded by test 12318; here two SimPacs hospitals
  hold one study per patient, and the documents are DUO's entries (a KOS per study, stable once assembled, one
  per report). The retrieve cases learn their ids from a LeafClass FindDocuments first, as NIST's 12312
  takes them from 12318's query (an ITI-39 of a document never announced is unknown to DUO).

One network serves the module (DUO, two SimPacs, the Mitz simulator); every case only reads.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from xml.sax.saxutils import escape

import pytest
import pytest_asyncio
from lxml import etree
from pydicom import dcmread

from duo_gateway.bsn import bsn_cx
from duo_gateway.dicom.kos import parse_kos
from duo_gateway.soap.envelope import SOAP12_NS
from duo_gateway.soap.xml import parse_xml
from duo_gateway.xca.codes import (
    KOS_SOP_CLASS,
    QUERY_NS,
    RIM_NS,
    RS_NS,
    XDSB_NS,
    Action,
    ErrorCode,
    ResponseStatus,
)
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.query import parse_adhoc_query_response
from duo_gateway.xca.retrieve import inline_documents, parse_retrieve_response
from duo_gateway.xua import AUTHZ_DECISION_REFUSED
from tests.support.xua_variants import VARIANTS, variant_assertion
from tests.xca.responding_harness import CLAIMS, HOME, XUA_ISSUER, Network, Reply, running_network
from tests.xca.xsd import assert_valid

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The simulator's patient with consent for the first TLB hospital only.
PATIENT = "900186021"
WSSE = "http://docs.oasis-open.org/wss/2004/01/oasis-200401-wss-wssecurity-secext-1.0.xsd"
NS = {"q": QUERY_NS, "rim": RIM_NS, "rs": RS_NS, "xdsb": XDSB_NS, "s": SOAP12_NS}


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("rg-xua"), studies_per_patient=1) as network:
        yield network


# ------------------------------------------------------------------------------------------------
# NIST's request bodies
# ------------------------------------------------------------------------------------------------


def find_documents(return_type: str) -> etree._Element:
    """12309's ``finddocs/query.xml``: FindDocuments, one patient, Approved, for ``return_type``."""
    return parse_xml(f"""
<query:AdhocQueryRequest xmlns:query="{QUERY_NS}">
    <query:ResponseOption returnComposedObjects="true" returnType="{return_type}"/>
    <tag0:AdhocQuery xmlns:tag0="{RIM_NS}" id="urn:uuid:14d4debf-8f97-4251-9a74-a90016b0af0d">
        <tag0:Slot name="$XDSDocumentEntryPatientId">
            <tag0:ValueList><tag0:Value>'{escape(bsn_cx(PATIENT))}'</tag0:Value></tag0:ValueList>
        </tag0:Slot>
        <tag0:Slot name="$XDSDocumentEntryStatus">
            <tag0:ValueList>
                <tag0:Value>('urn:oasis:names:tc:ebxml-regrep:StatusType:Approved')</tag0:Value>
            </tag0:ValueList>
        </tag0:Slot>
    </tag0:AdhocQuery>
</query:AdhocQueryRequest>""".encode())


def retrieve(entry: DocumentEntry, *, home: str | None) -> etree._Element:
    """12312's ``correct/query1.xml`` (with ``home``) or ``missing_home/query.xml`` (``home`` None)."""
    home_el = "" if home is None else f"<tag0:HomeCommunityId>{home}</tag0:HomeCommunityId>"
    return parse_xml(f"""
<tag0:RetrieveDocumentSetRequest xmlns:tag0="{XDSB_NS}">
    <tag0:DocumentRequest>
        {home_el}
        <tag0:RepositoryUniqueId>{entry.repository_unique_id}</tag0:RepositoryUniqueId>
        <tag0:DocumentUniqueId>{entry.unique_id}</tag0:DocumentUniqueId>
    </tag0:DocumentRequest>
</tag0:RetrieveDocumentSetRequest>""".encode())


# ------------------------------------------------------------------------------------------------
# Calls and NIST's checks
# ------------------------------------------------------------------------------------------------


async def iti38(duo: Network, body: etree._Element, assertion: etree._Element | None = None) -> Reply:
    return await duo.call(duo.gateway.config.xca_responding.iti38_path, Action.ITI38, body,
                          assertion=assertion)


async def iti39(duo: Network, body: etree._Element, assertion: etree._Element | None = None) -> Reply:
    # NIST's XCR transactions are MTOM, and DUO answers in kind.
    return await duo.call(duo.gateway.config.xca_responding.iti39_path, Action.ITI39, body,
                          assertion=assertion, mtom=True)


def answer_body(reply: Reply, action: str, wsdl_dir: Path) -> etree._Element:
    """The answer's SOAP Body child, checked as NIST's toolkit does before its assertions: HTTP 200,
    the response Action, valid against the official schema (attachments inlined, the XOP infoset)."""
    assert reply.status == 200, reply.raw[:500]
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.addressing.action == action
    assert_valid(wsdl_dir, inline_documents(reply.envelope.body, reply.parts))
    return reply.envelope.body


def status_of(body: etree._Element) -> ResponseStatus:
    """AdhocQueryResponse/@status, or RetrieveDocumentSetResponse/RegistryResponse/@status."""
    if body.tag == f"{{{QUERY_NS}}}AdhocQueryResponse":
        return ResponseStatus(body.get("status"))
    [status] = body.xpath("rs:RegistryResponse/@status", namespaces=NS)
    return ResponseStatus(str(status))


def error_codes(body: etree._Element) -> list[str]:
    return [str(c) for c in body.xpath(".//rs:RegistryErrorList/rs:RegistryError/@errorCode", namespaces=NS)]


def fault_of(reply: Reply) -> tuple[str, str | None, str]:
    """(Code, wsse Subcode, Reason) of a SOAP 1.2 fault answer; the subcode must be in the wsse namespace."""
    root = parse_xml(reply.raw)
    code = root.findtext("s:Body/s:Fault/s:Code/s:Value", namespaces=NS) or ""
    sub = root.find("s:Body/s:Fault/s:Code/s:Subcode/s:Value", namespaces=NS)
    sub_local: str | None = None
    if sub is not None and sub.text:
        prefix, _, sub_local = sub.text.strip().rpartition(":")
        assert sub.nsmap.get(prefix or None) == WSSE, "the subcode is not a WS-Security one"
    reason = root.findtext("s:Body/s:Fault/s:Reason/s:Text", namespaces=NS) or ""
    return code.rpartition(":")[2], sub_local, reason


def assertion(duo: Network, variant: str, index: int = 0) -> etree._Element:
    return variant_assertion(VARIANTS[variant][index], claims=CLAIMS, issuer=XUA_ISSUER, audience=HOME,
                             signer=(duo.key, duo.cert), now=datetime.now(UTC))


async def assert_faults(duo: Network, variant: str, send: str, body: etree._Element) -> None:
    """NIST's ``<ExpectedStatus>Fault</ExpectedStatus>``, for every reading of ``variant``: HTTP 400, a
    SOAP 1.2 Sender fault with the reading's wsse subcode and reason, and nothing of the patient."""
    call = iti38 if send == "iti38" else iti39
    for index, reading in enumerate(VARIANTS[variant]):
        reply = await call(duo, body, assertion(duo, variant, index))
        assert reply.status == 400, (reading.label, reply.raw[:500])
        code, sub, reason = fault_of(reply)
        assert (code, sub) == ("Sender", reading.subcode), (reading.label, reason)
        assert re.search(reading.reason, reason), (reading.label, reason)
        assert PATIENT.encode() not in reply.raw, reading.label


def assert_authz_refused(body: etree._Element) -> None:
    """NIST's ``<ExpectedStatus>Failure</ExpectedStatus>`` for ``_withauthzconsent``: the assertion is
    accepted as authentication and the request refused by DUO's policy on authorization decisions."""
    assert status_of(body) == ResponseStatus.FAILURE
    [error] = body.xpath(".//rs:RegistryErrorList/rs:RegistryError", namespaces=NS)
    assert (error.get("errorCode"), error.get("location")) == (ErrorCode.LOCAL_POLICY_RESTRICTION, HOME)
    assert re.search(VARIANTS["withauthzconsent"][0].reason, error.get("codeContext", ""))
    assert AUTHZ_DECISION_REFUSED in error.get("codeContext", "")


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def announced(duo: Network, wsdl_dir: Path) -> dict[str, DocumentEntry]:
    """The patient's documents by kind ("kos", "report"), from a LeafClass FindDocuments: what NIST's
    12312 takes from 12318 (``Document01_uid``, ``repuid``) and 12311 (the metadata it checks)."""
    body = answer_body(await iti38(duo, find_documents("LeafClass")), Action.ITI38_RESPONSE, wsdl_dir)
    entries = parse_adhoc_query_response(body).entries
    kinds = {("kos" if e.format_code is not None and e.format_code.code == KOS_SOP_CLASS else "report"): e
             for e in entries}
    assert len(entries) == len(kinds) == 2, [e.unique_id for e in entries]
    return kinds


# ------------------------------------------------------------------------------------------------
# 12309: FindDocuments for ObjectRef
# ------------------------------------------------------------------------------------------------


async def test_12309(duo: Network, wsdl_dir: Path) -> None:
    """NIST 12309 (FindDocuments for ObjectRef): Success, 2 ObjectRefs, each with the configured home.

    Adapted: NIST's 2 are the Approved entries 12318 registered; here they are what the PACSes hold
    for the patient where Mitz permits: one study at the first hospital, so its KOS and its report
    (the second hospital's study has no consent). The count is derived from the PACS content and Mitz.
    """
    body = answer_body(await iti38(duo, find_documents("ObjectRef")), Action.ITI38_RESPONSE, wsdl_dir)
    assert status_of(body) == ResponseStatus.SUCCESS, error_codes(body)
    expected = sum(1 + study.has_report for h in duo.net.hospitals if duo.mitz.is_consented(PATIENT, h.ura)
                   for study in duo.studies[h.ura] if study.patient_id == PATIENT)
    assert expected == 2  # the data is NIST's shape: otherwise this case would test something else
    refs = body.xpath("rim:RegistryObjectList/rim:ObjectRef", namespaces=NS)
    assert len(refs) == expected
    assert [r.get("home") for r in refs] == [HOME] * expected
    assert not body.xpath("rim:RegistryObjectList/rim:ExtrinsicObject", namespaces=NS)


async def test_12309_expired(duo: Network) -> None:
    """NIST 12309_expired: Fault. Adapted: an assertion that expired ten minutes ago (MessageExpired)."""
    await assert_faults(duo, "expired", "iti38", find_documents("ObjectRef"))


async def test_12309_invalidauthnstatement(duo: Network) -> None:
    """NIST 12309_invalidauthnstatement: Fault. Adapted: an AuthnStatement without its AuthnContext, and
    one whose AuthnInstant is no dateTime (both InvalidSecurityToken)."""
    await assert_faults(duo, "invalidauthnstatement", "iti38", find_documents("ObjectRef"))


async def test_12309_notyetvalid(duo: Network) -> None:
    """NIST 12309_notyetvalid: Fault. Adapted: valid only from ten minutes on (InvalidSecurityToken)."""
    await assert_faults(duo, "notyetvalid", "iti38", find_documents("ObjectRef"))


async def test_12309_secondauthncontext(duo: Network) -> None:
    """NIST 12309_secondauthncontext: Fault. Adapted: a second AuthnContext (InvalidSecurityToken), and
    Gazelle's InternetProtocol authentication instead of the UZI pass (FailedAuthentication)."""
    await assert_faults(duo, "secondauthncontext", "iti38", find_documents("ObjectRef"))


async def test_12309_secondpurposeofuse(duo: Network) -> None:
    """NIST 12309_secondpurposeofuse: Fault. Adapted: a second purposeofuse (InvalidSecurityToken), and
    purpose COC where only TREAT is granted (FailedAuthentication)."""
    await assert_faults(duo, "secondpurposeofuse", "iti38", find_documents("ObjectRef"))


async def test_12309_secondrole(duo: Network) -> None:
    """NIST 12309_secondrole: Fault. Adapted: a second RoleCodeNL role (InvalidSecurityToken), and role
    99.999, which may not consult imaging (FailedAuthentication)."""
    await assert_faults(duo, "secondrole", "iti38", find_documents("ObjectRef"))


async def test_12309_unknownaudience(duo: Network) -> None:
    """NIST 12309_unknownaudience: Fault. Gazelle's unknown audience (FailedAuthentication)."""
    await assert_faults(duo, "unknownaudience", "iti38", find_documents("ObjectRef"))


async def test_12309_unsigned(duo: Network) -> None:
    """NIST 12309_unsigned: Fault. The assertion without a signature (InvalidSecurityToken)."""
    await assert_faults(duo, "unsigned", "iti38", find_documents("ObjectRef"))


async def test_12309_withauthzconsent(duo: Network, wsdl_dir: Path) -> None:
    """NIST 12309_withauthzconsent: Failure. Adapted: the toolkit's AuthzDecisionStatement (Permit,
    consent evidence) in the Dutch assertion; DUO answers Failure with LocalPolicyRestrictionError and
    no ObjectRef, because it does not act on a caller's own authorization decisions (duo_gateway.xua)."""
    reply = await iti38(duo, find_documents("ObjectRef"), assertion(duo, "withauthzconsent"))
    body = answer_body(reply, Action.ITI38_RESPONSE, wsdl_dir)
    assert_authz_refused(body)
    assert not body.xpath("rim:RegistryObjectList/*", namespaces=NS)


# ------------------------------------------------------------------------------------------------
# 12312: Retrieve single document
# ------------------------------------------------------------------------------------------------


async def test_12312(duo: Network, announced: dict[str, DocumentEntry], wsdl_dir: Path) -> None:
    """NIST 12312 (Retrieve single document): ``correct`` retrieves two documents one at a time (Success,
    one DocumentResponse, HomeCommunityId and RepositoryUniqueId as configured, the mimeType of the
    metadata, the document's bytes); ``missing_home`` without HomeCommunityId is a Failure with
    XDSMissingHomeCommunityId and no document.

    Adapted: NIST's small text and big XML documents are the study's KOS and its report. NIST checks
    the bytes against the hash in the metadata. A KOS entry carries its hash and size only once its
    first ITI-39 assembled it (docs/kos-manifests.md), so the KOS is checked against the hash and size
    a FindDocuments announces after the retrieve; a report entry never carries them, so its bytes are
    checked to be the report with the entry's uniqueId. Both are also checked to be that document.
    """
    for kind, entry in announced.items():
        reply = await iti39(duo, retrieve(entry, home=HOME))
        body = answer_body(reply, Action.ITI39_RESPONSE, wsdl_dir)
        assert status_of(body) == ResponseStatus.SUCCESS, (kind, error_codes(body))
        [response] = body.xpath("xdsb:DocumentResponse", namespaces=NS)
        assert response.findtext("xdsb:HomeCommunityId", namespaces=NS) == HOME
        assert response.findtext("xdsb:RepositoryUniqueId", namespaces=NS) == entry.repository_unique_id
        assert response.findtext("xdsb:DocumentUniqueId", namespaces=NS) == entry.unique_id
        assert response.findtext("xdsb:mimeType", namespaces=NS) == entry.mime_type
        [document] = parse_retrieve_response(body, reply.parts).documents
        assert isinstance(document.data, bytes)
        if kind == "kos":
            study_uids = {ref.split("^")[0] for ref in entry.reference_ids}
            assert {parse_kos(document.data).study_instance_uid} == study_uids
            again = answer_body(await iti38(duo, find_documents("LeafClass")), Action.ITI38_RESPONSE,
                                wsdl_dir)
            [now] = [e for e in parse_adhoc_query_response(again).entries if e.unique_id == entry.unique_id]
            assert now.hash == hashlib.sha1(document.data).hexdigest()
            assert now.size == len(document.data)
        else:
            assert dcmread(BytesIO(document.data)).SOPInstanceUID == entry.unique_id

    reply = await iti39(duo, retrieve(announced["kos"], home=None))
    body = answer_body(reply, Action.ITI39_RESPONSE, wsdl_dir)
    assert status_of(body) == ResponseStatus.FAILURE
    assert error_codes(body) == [ErrorCode.MISSING_HOME_COMMUNITY_ID]
    assert not body.xpath("xdsb:DocumentResponse", namespaces=NS)


async def test_12312_expired(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_expired (missing_home): Fault. As 12309_expired, before the missing home is read."""
    await assert_faults(duo, "expired", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_invalidauthnstatement(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_invalidauthnstatement (missing_home): Fault. Readings as 12309_invalidauthnstatement."""
    await assert_faults(duo, "invalidauthnstatement", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_notyetvalid(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_notyetvalid (missing_home): Fault. As 12309_notyetvalid."""
    await assert_faults(duo, "notyetvalid", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_secondauthncontext(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_secondauthncontext (missing_home): Fault. Readings as 12309_secondauthncontext."""
    await assert_faults(duo, "secondauthncontext", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_secondpurposeofuse(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_secondpurposeofuse (missing_home): Fault. Readings as 12309_secondpurposeofuse."""
    await assert_faults(duo, "secondpurposeofuse", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_secondrole(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_secondrole (missing_home): Fault. Readings as 12309_secondrole."""
    await assert_faults(duo, "secondrole", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_unknownaudience(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_unknownaudience (missing_home): Fault. As 12309_unknownaudience."""
    await assert_faults(duo, "unknownaudience", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_unsigned(duo: Network, announced: dict[str, DocumentEntry]) -> None:
    """NIST 12312_unsigned (missing_home): Fault. As 12309_unsigned."""
    await assert_faults(duo, "unsigned", "iti39", retrieve(announced["kos"], home=None))


async def test_12312_withauthzconsent(duo: Network, announced: dict[str, DocumentEntry],
                                      wsdl_dir: Path) -> None:
    """NIST 12312_withauthzconsent (missing_home): Failure, no document. Adapted: the Failure is DUO's
    LocalPolicyRestrictionError for the authorization decision, given before the missing home is read
    (NIST checks the status only, which XDSMissingHomeCommunityId would also give)."""
    reply = await iti39(duo, retrieve(announced["kos"], home=None), assertion(duo, "withauthzconsent"))
    body = answer_body(reply, Action.ITI39_RESPONSE, wsdl_dir)
    assert_authz_refused(body)
    assert not body.xpath("xdsb:DocumentResponse", namespaces=NS)
