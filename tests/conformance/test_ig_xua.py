"""NIST XDS Toolkit Initiating Gateway cases 15808_* and 15809_*: the XUA variants of "Query Single
Responding Gateway" and "Retrieve Single Responding Gateway".

What NIST checks: its test client sends the Initiating Gateway a Stored Query (15808: FindDocuments
and GetDocuments) or a Retrieve (15809) carrying the variant's assertion, while NIST's Responding
Gateway simulators stand behind it; the gateway, as the X-Service Provider of that client, must answer
a Fault for the eight defective assertions, and for ``_withauthzconsent`` NIST expects Success of the
query and a Failure of the retrieve.

DUO's Initiating Gateway is driven through the TLB API, so the adaptation is:

- **the client's assertion**: a TLB client configured with ``identity = "assertion"`` proves its
  professional with its own signed ITI-40 assertion (``Authorization: SAML <base64>``), checked by the
  same validator as an XCA peer's (``duo_gateway.tlb.identity``). That is where NIST's variants land.
  (A client with ``identity = "body"`` sends no assertion at all, so for it these cases are void.)
- **the requests**: 15808's FindDocuments is ``POST /tlb/v1/timeline`` for the patient (the TLB API has
  no GetDocuments; the timeline is the query), 15809's Retrieve is ``POST /tlb/v1/transfers`` of a
  study the timeline returned (the TLB API's way to retrieve).
- **NIST's Fault** is the TLB API's refusal of an assertion, 401 ``invalid-assertion`` whose detail is
  the validator's reason for the reading; the Failure of ``_withauthzconsent`` is 403 ``forbidden``
  naming the authorization decision, for the query too (DUO's one rule, duo_gateway.xua; NIST's own
  expectations differ between 15808 and 15809 here).
- **NIST's Responding Gateway** is the community simulator behind a request recorder: for every refusal
  it must have received nothing, since DUO asks a community only in its own name, with an assertion it
  signs itself (checked on the control request below).

One network serves the module (DUO, the Mitz simulator, one XCA community); no case changes it. Every
case asks for the control fixture (``study_id``) first, so a refusal is only ever counted against a
door that was shown to answer the same request with a valid assertion.
"""

from __future__ import annotations

import asyncio
import base64
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any, Final

import aiohttp
import pytest
import pytest_asyncio
from lxml import etree

from duo_gateway.config.loader import parse_config
from duo_gateway.config.xua import XuaConfig
from duo_gateway.daemon import Gateway, free_port
from duo_gateway.sim.config import default_network
from duo_gateway.sim.mitz import MitzSimulator
from duo_gateway.sim.pki import Pki, make_pki
from duo_gateway.sim.xca import XcaCommunitySimulator
from duo_gateway.xca.codes import Action
from duo_gateway.xmldsig import TrustStore, load_signing_pair
from duo_gateway.xua import Claims, issue_assertion, validate_xua
from tests.support.clients import plain_clients
from tests.support.peers import Peer, serve_peer
from tests.support.xua_variants import VARIANTS, Signer, variant_assertion
from tests.xca.recording import Recorder

pytestmark = pytest.mark.asyncio(loop_scope="module")

HOST: Final = "127.0.0.1"
HOME: Final = "urn:oid:2.16.528.1.1007.99.1"
#: The issuer of the TLB client's own assertions (a hospital's identity provider).
TLB_ISSUER: Final = "urn:oid:2.16.528.1.1007.99.10001.9"
REQUESTER: Final = {"ura": "00010001", "organization_type": "V6", "uzi": "000095254", "role": "01.039",
                    "purpose": "TREAT"}
CLAIMS: Final = Claims(uzi=REQUESTER["uzi"], role=REQUESTER["role"], ura=REQUESTER["ura"],
                       purpose=REQUESTER["purpose"], organisation_type=REQUESTER["organization_type"])
PERIOD: Final = (date(2015, 1, 1), date(2026, 12, 31))
NET = default_network()
NOORD = NET.communities[0]
#: The patient consented everywhere: the community holds studies of theirs and Mitz places them there.
PATIENT: Final = next(p.bsn for p in NET.patients if p.consent == "all")
INVALID_ASSERTION: Final = "urn:duo-gateway:problem:invalid-assertion"
FORBIDDEN: Final = "urn:duo-gateway:problem:forbidden"


@dataclass
class Ig:
    gateway: Gateway
    recorder: Recorder
    session: aiohttp.ClientSession
    pki: Pki
    signer: Signer

    @property
    def api(self) -> str:
        return f"{self.gateway.http_url}{self.gateway.config.timeline.path_prefix}"

    async def post(self, route: str, body: dict[str, Any], assertion: etree._Element) -> tuple[int, Any]:
        headers = {"Authorization": "SAML " + base64.b64encode(etree.tostring(assertion)).decode()}
        async with self.session.post(f"{self.api}/{route}", json=body, headers=headers) as r:
            return r.status, await r.json(content_type=None)

    async def jobs(self) -> int:
        async with self.session.get(f"{self.api}/transfers") as r:
            assert r.status == 200, await r.text()
            return len((await r.json())["transfers"])


def timeline_body() -> dict[str, Any]:
    return {"patient": {"bsn": PATIENT}, "requester": REQUESTER,
            "period": {"from": PERIOD[0].isoformat(), "to": PERIOD[1].isoformat()}}


def transfer_body(study_id: str) -> dict[str, Any]:
    return {"studies": [study_id], "destination": "own-pacs", "requester": REQUESTER}


def raw_config(tmp: Path, mitz: str, community: str, pki: Pki) -> dict[str, Any]:
    return {
        "gateway": {"home_community_id": HOME, "ura": "00099001", "name": "DUO (IG XUA conformance)"},
        "listeners": {"http": {"host": HOST, "port": 0}, "dicom": {"host": HOST, "port": 0}},
        "xca_communities": [{
            "home_community_id": NOORD.home_community_id, "name": NOORD.name, "iti38": f"{community}/iti38",
            "iti39": f"{community}/iti39", "rad75": f"{community}/rad75",
            "uras": [i.ura for i in NOORD.institutions], "timeout_s": 10.0, "retries": 0}],
        "mitz": {"closed_url": f"{mitz}/geslotenautorisatievraag/xacml3",
                 "open_url": f"{mitz}/openautorisatievraag",
                 "subscriptions_url": f"{mitz}/abonnementen/fhir/Subscription", "timeout_s": 5.0},
        "xua": {"signing_key_file": str(pki.server.key), "signing_cert_file": str(pki.server.cert)},
        # Never reached: every transfer here is refused at the door. No process listens on the port.
        "transfers": {"destinations": [{"name": "own-pacs", "ae_title": "OWN_PACS", "host": HOST,
                                        "port": free_port(), "uras": [REQUESTER["ura"]]}]},
        "clients": plain_clients(tlb_uras=[REQUESTER["ura"]], identity="assertion",
                                 assertion_issuer=TLB_ISSUER, assertion_signing_certs=[str(pki.client.cert)]),
        "storage": {"path": str(tmp / "duo")},
        "logging": {"level": "WARNING"},
    }


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def ig(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Ig]:
    tmp = tmp_path_factory.mktemp("ig-xua")
    pki = await asyncio.to_thread(make_pki, tmp / "pki", "rsa")
    recorder = Recorder()
    community_app = XcaCommunitySimulator(NOORD, NET).app()
    community_app.middlewares.insert(0, recorder.middleware)
    peers: list[Peer] = []
    try:
        peers.append(await serve_peer(MitzSimulator(NET, tlb_home_community_id=HOME).app()))
        peers.append(await serve_peer(community_app))
        config = parse_config(raw_config(tmp, peers[0].url, peers[1].url, pki), base_dir=tmp,
                              source="ig xua conformance", env={})
        gateway = Gateway(config)
        await gateway.start()
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session:
                yield Ig(gateway, recorder, session, pki, load_signing_pair(pki.client.key, pki.client.cert))
        finally:
            await gateway.stop()
    finally:
        for peer in peers:
            await peer.runner.cleanup()


def client_assertion(ig: Ig, variant: str | None, index: int = 0) -> etree._Element:
    """The TLB client's assertion: valid (``variant`` None) or the reading of a NIST variant."""
    key, cert = ig.signer
    if variant is None:
        return issue_assertion(CLAIMS, issuer=TLB_ISSUER, audience=HOME, key=key, cert=cert,
                               now=datetime.now(UTC))
    return variant_assertion(VARIANTS[variant][index], claims=CLAIMS, issuer=TLB_ISSUER, audience=HOME,
                             signer=ig.signer, now=datetime.now(UTC))


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def study_id(ig: Ig) -> str:
    """The control: the same timeline with a valid client assertion is answered from the community, which
    DUO asked with an assertion of its own; its study id is what the 15809 variants try to retrieve.

    DUO's ITI-38 carries DUO's assertion (its issuer, its pinned key, the community as sole audience) for
    the client's professional: the client's assertion never travels, whatever it carried.
    """
    before = len(ig.recorder.bodies)
    status, answer = await ig.post("timeline", timeline_body(), client_assertion(ig, None))
    assert status == 200, answer
    community = f"xca:{NOORD.home_community_id}"
    ours = [s for s in answer["studies"] if community in s["sources"]]
    assert ours, answer
    sent = [e for e in ig.recorder.envelopes()[before:] if e.addressing.action == Action.ITI38]
    assert sent, "the community was not asked"
    trusted = TrustStore.from_pem_files([ig.pki.server.cert], pinned=True)
    for envelope in sent:
        requester = validate_xua(envelope, XuaConfig(), issuer=HOME, trusted=trusted,
                                 audiences=[NOORD.home_community_id], now=datetime.now(UTC))
        assert requester is not None and requester.authz_decisions == ()
        assert (requester.uzi, requester.role, requester.ura, requester.purpose) == (
            CLAIMS.uzi, CLAIMS.role, CLAIMS.ura, CLAIMS.purpose)
    return str(ours[0]["id"])


async def assert_refused(ig: Ig, variant: str, route: str, body: dict[str, Any]) -> None:
    """Every reading of ``variant`` is refused at the door: NIST's Fault as 401 with the validator's reason
    (the Failure of ``_withauthzconsent`` as 403 naming the decision); the community is not asked and no
    transfer is queued."""
    jobs = await ig.jobs()
    for index, reading in enumerate(VARIANTS[variant]):
        asked = len(ig.recorder.bodies)
        status, problem = await ig.post(route, body, client_assertion(ig, variant, index))
        expected = (401, INVALID_ASSERTION) if reading.subcode is not None else (403, FORBIDDEN)
        assert (status, problem.get("type")) == expected, (reading.label, problem)
        assert re.search(reading.reason, problem["detail"]), (reading.label, problem["detail"])
        assert "studies" not in problem and "id" not in problem, reading.label
        assert len(ig.recorder.bodies) == asked, f"{reading.label}: the community was asked"
    assert await ig.jobs() == jobs


# ------------------------------------------------------------------------------------------------
# 15808_*: Query Single Responding Gateway
# ------------------------------------------------------------------------------------------------


async def test_15808_expired(ig: Ig, study_id: str) -> None:
    """NIST 15808_expired: Fault. Adapted: the timeline with a client assertion expired ten minutes ago."""
    await assert_refused(ig, "expired", "timeline", timeline_body())


async def test_15808_invalidauthnstatement(ig: Ig, study_id: str) -> None:
    """NIST 15808_invalidauthnstatement: Fault. Adapted: an AuthnStatement without AuthnContext, and one
    whose AuthnInstant is no dateTime."""
    await assert_refused(ig, "invalidauthnstatement", "timeline", timeline_body())


async def test_15808_notyetvalid(ig: Ig, study_id: str) -> None:
    """NIST 15808_notyetvalid: Fault. Adapted: a client assertion valid only from ten minutes on."""
    await assert_refused(ig, "notyetvalid", "timeline", timeline_body())


async def test_15808_secondauthncontext(ig: Ig, study_id: str) -> None:
    """NIST 15808_secondauthncontext: Fault. Adapted: a second AuthnContext, and InternetProtocol
    authentication instead of the UZI pass."""
    await assert_refused(ig, "secondauthncontext", "timeline", timeline_body())


async def test_15808_secondpurposeofuse(ig: Ig, study_id: str) -> None:
    """NIST 15808_secondpurposeofuse: Fault. Adapted: a second purposeofuse, and purpose COC where only
    TREAT is granted."""
    await assert_refused(ig, "secondpurposeofuse", "timeline", timeline_body())


async def test_15808_secondrole(ig: Ig, study_id: str) -> None:
    """NIST 15808_secondrole: Fault. Adapted: a second RoleCodeNL role, and role 99.999."""
    await assert_refused(ig, "secondrole", "timeline", timeline_body())


async def test_15808_unknownaudience(ig: Ig, study_id: str) -> None:
    """NIST 15808_unknownaudience: Fault. Adapted: Gazelle's unknown audience instead of DUO's home."""
    await assert_refused(ig, "unknownaudience", "timeline", timeline_body())


async def test_15808_unsigned(ig: Ig, study_id: str) -> None:
    """NIST 15808_unsigned: Fault. Adapted: the client assertion without a signature."""
    await assert_refused(ig, "unsigned", "timeline", timeline_body())


async def test_15808_withauthzconsent(ig: Ig, study_id: str) -> None:
    """NIST 15808_withauthzconsent: Success. Adapted, and deliberately different: 403 naming the
    authorization decision, with the community not asked. DUO does not act on a caller's own
    authorization decisions, at either door (duo_gateway.xua): consent is Mitz's."""
    await assert_refused(ig, "withauthzconsent", "timeline", timeline_body())


# ------------------------------------------------------------------------------------------------
# 15809_*: Retrieve Single Responding Gateway
# ------------------------------------------------------------------------------------------------


async def test_15809_expired(ig: Ig, study_id: str) -> None:
    """NIST 15809_expired: Fault. Adapted: a transfer of a timeline study, with an expired assertion."""
    await assert_refused(ig, "expired", "transfers", transfer_body(study_id))


async def test_15809_invalidauthnstatement(ig: Ig, study_id: str) -> None:
    """NIST 15809_invalidauthnstatement: Fault. Readings as 15808_invalidauthnstatement, on a transfer."""
    await assert_refused(ig, "invalidauthnstatement", "transfers", transfer_body(study_id))


async def test_15809_notyetvalid(ig: Ig, study_id: str) -> None:
    """NIST 15809_notyetvalid: Fault. As 15808_notyetvalid, on a transfer."""
    await assert_refused(ig, "notyetvalid", "transfers", transfer_body(study_id))


async def test_15809_secondauthncontext(ig: Ig, study_id: str) -> None:
    """NIST 15809_secondauthncontext: Fault. Readings as 15808_secondauthncontext, on a transfer."""
    await assert_refused(ig, "secondauthncontext", "transfers", transfer_body(study_id))


async def test_15809_secondpurposeofuse(ig: Ig, study_id: str) -> None:
    """NIST 15809_secondpurposeofuse: Fault. Readings as 15808_secondpurposeofuse, on a transfer."""
    await assert_refused(ig, "secondpurposeofuse", "transfers", transfer_body(study_id))


async def test_15809_secondrole(ig: Ig, study_id: str) -> None:
    """NIST 15809_secondrole: Fault. Readings as 15808_secondrole, on a transfer."""
    await assert_refused(ig, "secondrole", "transfers", transfer_body(study_id))


async def test_15809_unknownaudience(ig: Ig, study_id: str) -> None:
    """NIST 15809_unknownaudience: Fault. As 15808_unknownaudience, on a transfer."""
    await assert_refused(ig, "unknownaudience", "transfers", transfer_body(study_id))


async def test_15809_unsigned(ig: Ig, study_id: str) -> None:
    """NIST 15809_unsigned: Fault. As 15808_unsigned, on a transfer."""
    await assert_refused(ig, "unsigned", "transfers", transfer_body(study_id))


async def test_15809_withauthzconsent(ig: Ig, study_id: str) -> None:
    """NIST 15809_withauthzconsent: Failure. Adapted: 403 naming the authorization decision, no transfer
    queued, the community not asked."""
    await assert_refused(ig, "withauthzconsent", "transfers", transfer_body(study_id))
