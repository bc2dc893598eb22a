"""The demo scenario behind ``duo-gateway demo --once``: prove the whole simulated network works.

Each step talks to a component over its real wire format (HTTP to DUO, DICOM C-FIND to every PACS,
ITI-38 SOAP to every community, XACML and XCPD to Mitz) and checks the answer against what the sim
config says should be there, so a green summary means "every component healthy and consistent".
The scenario grows with the gateway: timeline queries and transfers through DUO come with their issues.
"""

from __future__ import annotations

import asyncio
import email
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from io import BytesIO
from pathlib import Path
from typing import Any

import aiohttp
from lxml import etree
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.bsn import bsn_cx
from duo_gateway.dicom.qr import QrClient
from duo_gateway.mitz.xacml import ClosedQuestion
from duo_gateway.mitz.xcpd import OpenQuestion
from duo_gateway.sim.network import (
    DEMO_ROLE,
    DEMO_UZI,
    REQUESTER_PACS,
    REQUESTER_PACS_NAME,
    SECOND_TLB_URA,
    DemoXcaPeer,
    SimulatedNetwork,
)
from duo_gateway.soap.envelope import (
    SOAP12_CONTENT_TYPE,
    WSA_ANONYMOUS,
    Addressing,
    Envelope,
    build_envelope,
    new_message_id,
    parse_envelope,
    serialize,
)
from duo_gateway.soap.mtom import build_mtom, parse_mtom
from duo_gateway.xca.codes import KOS_SOP_CLASS, Action, ResponseStatus
from duo_gateway.xca.ebrim import DocumentEntry
from duo_gateway.xca.query import (
    AdhocQueryResponse,
    build_adhoc_query_request,
    find_documents,
    parse_adhoc_query_response,
)
from duo_gateway.xca.retrieve import (
    DocumentRequest,
    RetrieveDocumentSetRequest,
    RetrieveImagingDocumentSetRequest,
    SeriesRequest,
    StudyRequest,
    build_imaging_retrieve_request,
    build_retrieve_request,
    parse_retrieve_response,
)
from duo_gateway.xmldsig import load_signing_pair
from duo_gateway.xua import Claims, issue_assertion, security_header


@dataclass
class Step:
    name: str
    ok: bool
    detail: str
    elapsed_ms: float


@dataclass
class Report:
    steps: list[Step] = field(default_factory=list)
    #: Extra lines printed after the checks (the demo timelines).
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return bool(self.steps) and all(s.ok for s in self.steps)

    def render(self) -> str:
        width = max(len(s.name) for s in self.steps) if self.steps else 10
        lines = ["duo-gateway demo: simulated national network", ""]
        for s in self.steps:
            mark = "ok  " if s.ok else "FAIL"
            lines.append(f"  [{mark}] {s.name:<{width}}  {s.detail}  ({s.elapsed_ms:.0f} ms)")
        if self.details:
            lines += ["", "  timelines (date, modalities, description, institution, sources):", *self.details]
        passed = sum(s.ok for s in self.steps)
        lines += ["", f"{passed} of {len(self.steps)} checks passed: "
                      f"{'network healthy' if self.ok else 'NETWORK NOT HEALTHY'}"]
        return "\n".join(lines)


async def _step(report: Report, name: str, check: Callable[[], Awaitable[tuple[bool, str]]]) -> None:
    started = time.perf_counter()
    try:
        ok, detail = await check()
    except Exception as exc:  # a failed step is reported, the demo goes on to show the rest
        ok, detail = False, f"{type(exc).__name__}: {exc}"
    report.steps.append(Step(name, ok, detail, (time.perf_counter() - started) * 1000))


async def run_scenario(network: SimulatedNetwork) -> Report:
    assert network.gateway is not None and network.mitz is not None
    gw = network.gateway
    mitz = network.mitz
    net = network.net
    report = Report()
    assert network.pki is not None and gw.ops_url is not None
    ca = network.pki.ca_cert
    timeout = aiohttp.ClientTimeout(total=30)
    # The ops listener (health, metrics) is plain HTTP; everything else is DUO's mTLS listener, where the
    # demo calls as the first TLB client (the requester's own timeline app).
    own_app = aiohttp.TCPConnector(ssl=network.tlb_clients[0].ssl_context(ca))
    async with aiohttp.ClientSession(timeout=timeout) as ops, aiohttp.ClientSession(
            timeout=timeout, connector=own_app) as http:

        async def healthz() -> tuple[bool, str]:
            async with ops.get(f"{gw.ops_url}/healthz") as r:
                return r.status == 200, f"HTTP {r.status}"

        async def readyz() -> tuple[bool, str]:
            async with ops.get(f"{gw.ops_url}/readyz") as r:
                body = await r.json()
            bad = [c["peer"] for c in body["checks"] if not c["ok"]]
            detail = f"{body['status']}, {len(body['checks'])} peers probed"
            return body["status"] == "ready", detail + (f"; failing: {', '.join(bad)}" if bad else "")

        await _step(report, "DUO /healthz", healthz)
        await _step(report, "DUO /readyz (every peer reachable)", readyz)

        for hospital, pacs in network.iter_pacs():
            async def pacs_check(hospital: Any = hospital, port: int = pacs.port) -> tuple[bool, str]:
                counts = []
                for patient in net.patients:
                    query = Dataset()
                    query.QueryRetrieveLevel = "STUDY"
                    query.PatientID = patient.bsn
                    query.StudyInstanceUID = ""
                    query.ModalitiesInStudy = ""
                    found = await QrClient("DUO_DEMO", "127.0.0.1", port, hospital.ae_title).find_all(query)
                    counts.append(len(found))
                expected = [hospital.studies_per_patient] * len(net.patients)
                return counts == expected, f"C-FIND studies per patient {counts} (expected {expected})"

            await _step(report, f"PACS {hospital.ae_title} ({hospital.name})", pacs_check)

        for community, peer in zip(net.communities, network.communities, strict=True):
            async def xca_check(community: Any = community,
                                url: str = f"{peer.url}/iti38") -> tuple[bool, str]:
                counts = []
                for patient in net.patients:
                    message_id = new_message_id()
                    body = build_adhoc_query_request(find_documents(bsn_cx(patient.bsn)))
                    env = build_envelope(Addressing(action=Action.ITI38, message_id=message_id, to=url,
                                                    reply_to=WSA_ANONYMOUS), body)
                    content_type = f'{SOAP12_CONTENT_TYPE}; charset=UTF-8; action="{Action.ITI38}"'
                    async with http.post(url, data=serialize(env),
                                         headers={"Content-Type": content_type}) as r:
                        data = await r.read()
                    answer = parse_envelope(data)
                    if answer.body is None or answer.addressing.relates_to != message_id:
                        return False, "ITI-38 answer without body or with a wrong RelatesTo"
                    response = parse_adhoc_query_response(answer.body)
                    if response.objects_missing_home():
                        return False, "objects without home"
                    counts.append(len(response.entries))
                studies = community.studies_per_patient * len(community.institutions)
                ok = all(c >= studies for c in counts)
                return ok, f"ITI-38 FindDocuments entries per patient {counts} (>= {studies} studies each)"

            await _step(report, f"XCA {community.name} ({community.home_community_id})", xca_check)

        async def closed_matrix() -> tuple[bool, str]:
            """DUO's own Mitz client (the one every disclosure goes through) against the Mitz sim."""
            holders = [(h.ura, h.organisation_type) for h in net.hospitals] + [
                (i.ura, i.organisation_type) for c in net.communities for i in c.institutions]
            mismatches, asked = [], 0
            for patient in net.patients:
                expected = net.consent_holders(patient)
                for ura, org_type in holders:
                    decision = await gw.mitz.closed_question(ClosedQuestion(
                        bsn=patient.bsn, holder_ura=ura, holder_type=org_type, requester_uzi=DEMO_UZI,
                        requester_role=DEMO_ROLE, requester_ura=gw.config.gateway.ura,
                        requester_type=gw.config.gateway.organisation_type))
                    asked += 1
                    if decision.source == "error" or decision.permitted != (ura in expected):
                        mismatches.append(f"{patient.consent}/{ura}:{decision.summary}")
            detail = f"{asked} closed questions, decisions match consent profiles"
            return not mismatches, detail if not mismatches else f"mismatches: {', '.join(mismatches)}"

        async def open_question() -> tuple[bool, str]:
            counts = {}
            for patient in net.patients:
                located = await gw.mitz.open_question(OpenQuestion(
                    bsn=patient.bsn, requester_uzi=DEMO_UZI, requester_role=DEMO_ROLE,
                    requester_ura=gw.config.gateway.ura, requester_type=gw.config.gateway.organisation_type,
                    issuer=gw.config.gateway.home_community_id))
                if not located.ok:
                    return False, f"open question failed: {located.reason}"
                counts[patient.consent] = len(located.locations)
            ok = counts.get("none", 0) == 0 and counts.get("all", 0) > counts.get("partial", 0) > 0
            return ok, "locations per consent profile " + ", ".join(f"{k}={v}" for k, v in counts.items())

        async def subscriptions() -> tuple[bool, str]:
            """DUO's subscription sync registered every TLB patient at Mitz for its hospital."""
            assert network.mitz_sim is not None
            expected = {(p.bsn, h.ura) for p in net.patients for h in net.hospitals
                        if h.studies_per_patient > 0}
            deadline = time.monotonic() + 15
            while True:
                have = {(s.bsn, s.provider_ura) for s in network.mitz_sim.subscriptions}
                if expected <= have or time.monotonic() > deadline:
                    break
                await asyncio.sleep(0.1)
            found = len(have & expected)
            return expected <= have, f"{found} of {len(expected)} patient/hospital subscriptions"

        async def withdrawal() -> tuple[bool, str]:
            """Consent withdrawn in Mitz reaches DUO as a notification and the next answer is fresh."""
            patient = next(p for p in net.patients if p.consent == "all")
            hospital = net.hospitals[0]
            q = ClosedQuestion(bsn=patient.bsn, holder_ura=hospital.ura,
                               holder_type=hospital.organisation_type, requester_uzi=DEMO_UZI,
                               requester_role=DEMO_ROLE,
                               requester_ura=gw.config.gateway.ura,
                               requester_type=gw.config.gateway.organisation_type)
            admin = f"{mitz.url}/admin/consent"
            steps = []
            for permit in (False, True):
                before = await gw.mitz.closed_question(q)
                async with http.put(admin, json={"bsn": patient.bsn, "holder_ura": hospital.ura,
                                                 "permit": permit}) as r:
                    notified = (await r.json())["notified"]
                after = await gw.mitz.closed_question(q)
                steps.append((before.permitted, notified, after.permitted, after.source))
            ok = steps == [(True, 1, False, "mitz"), (False, 1, True, "mitz")]
            return ok, ("withdraw: Permit -> notified -> Deny; restore: Deny -> notified -> Permit" if ok
                        else f"unexpected {steps}")

        await _step(report, "Mitz closed question via DUO (XACML)", closed_matrix)
        await _step(report, "Mitz open question via DUO (XCPD ITI-56)", open_question)
        await _step(report, "Mitz subscriptions by DUO (FHIR)", subscriptions)
        await _step(report, "Mitz notification evicts DUO's cache", withdrawal)

        async def xds_asks_duo() -> tuple[bool, str]:
            """An XDS community queries DUO (ITI-38), fetches a KOS (ITI-39) and its images (RAD-75)."""
            caller = XdsCaller(network, network.xca_peers[0])
            per_profile: dict[str, set[str]] = {}
            first_kos: DocumentEntry | None = None
            for patient in net.patients:
                found = await caller.find(patient.bsn)
                if found.status != ResponseStatus.SUCCESS:
                    return False, f"ITI-38 for a {patient.consent} patient: {found.status}"
                per_profile[patient.consent] = {u for e in found.entries for u in e.author_uras}
                kos = [e for e in found.entries if e.format_code and e.format_code.code == KOS_SOP_CLASS]
                if patient.consent == "all" and kos:
                    first_kos = kos[0]
            expected = {p.consent: {h.ura for h in net.hospitals if h.ura in net.consent_holders(p)}
                        for p in net.patients}
            if per_profile != expected or first_kos is None:
                return False, f"hospitals per consent profile {per_profile}, expected {expected}"
            kos_ds = await caller.kos(first_kos)
            refs = [(str(s.SeriesInstanceUID), str(i.ReferencedSOPInstanceUID))
                    for st in kos_ds.CurrentRequestedProcedureEvidenceSequence
                    for s in st.ReferencedSeriesSequence for i in s.ReferencedSOPSequence]
            delivered = await caller.images(first_kos, str(kos_ds.StudyInstanceUID), refs)
            ok = delivered == len(refs) > 0 and str(kos_ds.SOPInstanceUID) == first_kos.unique_id
            return ok, (f"hospitals per consent: all={len(per_profile['all'])}, "
                        f"partial={len(per_profile['partial'])}, none={len(per_profile['none'])}; "
                        f"KOS of {len(refs)} instances, RAD-75 delivered {delivered}")

        await _step(report, "XDS community asks DUO (ITI-38/39, RAD-75)", xds_asks_duo)

        async def timelines() -> tuple[bool, str]:
            """A TLB clinician's timeline for each demo patient, through DUO's TLB API."""
            url = f"{gw.http_url}{gw.config.timeline.path_prefix}/timeline"
            lines: list[str] = []
            problems: list[str] = []
            for patient in net.patients:
                body = {"patient": {"bsn": patient.bsn}, "period": {"from": "2015-01-01", "to": "2026-12-31"},
                        "requester": {"ura": REQUESTER_PACS.ura, "organization_type": "V6", "uzi": DEMO_UZI,
                                      "role": DEMO_ROLE, "purpose": "TREAT"}}
                async with http.post(url, json=body) as r:
                    answer = await r.json()
                    if r.status != 200:
                        return False, f"HTTP {r.status}: {answer.get('title')}"
                found = {s["institution"]["ura"] for s in answer["studies"]}
                expected = net.consent_holders(patient)
                if found != expected:
                    problems.append(f"{patient.consent}: institutions {sorted(found)} != {sorted(expected)}")
                statuses = ", ".join(f"{s['id']}={s['status']}" for s in answer["sources"])
                lines.append(f"      {patient.consent} consent: {len(answer['studies'])} studies; {statuses}")
                for s in answer["studies"]:
                    when, what = (s.get("started") or "")[:10], ",".join(s["modalities"])
                    about, where = (s.get("description") or "")[:28], s["institution"]["name"][:24]
                    sources = ",".join(s["sources"])
                    lines.append(f"        {when:<10}  {what:<6} {about:<28} {where:<24} {sources}")
            report.details.extend(lines)
            ok = not problems
            return ok, "consent honoured for all/partial/none" if ok else "; ".join(problems)

        await _step(report, "TLB timelines through DUO (national)", timelines)

        async def transfers() -> tuple[bool, str]:
            """One study from a TLB hospital and one from an XCA community into the requester's PACS,
            checked at that PACS: every instance of each manifest, on the requester's local patient id, in
            the transfer syntax its source holds it in (the demo's compressed studies are the ones taken)."""
            assert network.requester_pacs is not None
            api = f"{gw.http_url}{gw.config.timeline.path_prefix}"
            patient = next(p for p in net.patients if p.consent == "all")
            requester = {"ura": REQUESTER_PACS.ura, "organization_type": "V6", "uzi": DEMO_UZI,
                         "role": DEMO_ROLE, "purpose": "TREAT"}
            body: dict[str, Any] = {"patient": {"bsn": patient.bsn}, "requester": requester,
                                    "period": {"from": "2015-01-01", "to": "2026-12-31"}}
            async with http.post(f"{api}/timeline", json=body) as r:
                studies = (await r.json())["studies"]
            compressed = {c.study_instance_uid for c in network.compressed_studies}
            chosen = [next((s for s in studies if s["sources"][0].startswith(kind)
                            and s["study_instance_uid"] in compressed),
                           next(s for s in studies if s["sources"][0].startswith(kind)))
                      for kind in ("tlb:", "xca:")]
            local_id = "EZ-0001"
            order = {"studies": [s["id"] for s in chosen], "destination": REQUESTER_PACS_NAME,
                     "requester": requester, "local_patient_id": local_id}
            async with http.post(f"{api}/transfers", json=order) as r:
                accepted = await r.json()
                if r.status != 202:
                    return False, f"HTTP {r.status}: {accepted.get('detail')}"
            deadline = asyncio.get_running_loop().time() + 60
            while True:
                async with http.get(f"{api}/transfers/{accepted['id']}") as r:
                    status = await r.json()
                if status["state"] not in ("queued", "running"):
                    break
                if asyncio.get_running_loop().time() > deadline:
                    return False, f"transfer still {status['state']} after 60 s"
                await asyncio.sleep(0.2)
            problems: list[str] = []
            for study, progress in zip(chosen, status["studies"], strict=True):
                uid = study["study_instance_uid"]
                paths = network.requester_pacs.instance_paths(uid)
                arrived = await asyncio.to_thread(_headers, paths)
                held = await asyncio.to_thread(_held_syntaxes, network, uid)
                patient_ids = {pid for pid, _ in arrived.values()}
                syntaxes = {ts for _, ts in arrived.values()}
                report.details.append(
                    f"      {study['sources'][0]:<40} {progress['state']:<9} {progress['instances_stored']}/"
                    f"{progress['instances_expected']} instances, {progress['bytes'] / 1e6:.1f} MB; "
                    f"in the requester's PACS: {len(paths)} on patient {','.join(sorted(patient_ids))}, "
                    f"as {', '.join(sorted(syntaxes))}")
                if progress["state"] != "completed" or len(paths) != progress["instances_expected"]:
                    problems.append(f"{study['sources'][0]}: {progress['state']}, {len(paths)} at the PACS")
                if patient_ids != {local_id}:
                    problems.append(f"{study['sources'][0]}: patient ids {sorted(patient_ids)}")
                changed = sorted({f"{held.get(sop)} -> {ts}" for sop, (_, ts) in arrived.items()
                                  if held.get(sop) != ts})
                if changed:
                    problems.append(f"{study['sources'][0]}: transfer syntax changed: {', '.join(changed)}")
            ok = status["state"] == "completed" and not problems
            return ok, (f"{status['instances_stored']} instances, {status['bytes'] / 1e6:.1f} MB, verified "
                        "at the requester's PACS" if ok else "; ".join(problems) or status["state"])

        await _step(report, "Transfers into the requester's PACS (TLB and XCA)", transfers)

        async def views() -> tuple[bool, str]:
            """One TLB and one XCA study of the same patient in a view, read back over its DICOMweb root:
            QIDO lists both, a WADO-RS retrieve of each gives every instance its source holds."""
            made = await make_demo_view(gw.http_url, gw.config.timeline.path_prefix,
                                        next(p for p in net.patients if p.consent == "all").bsn, http)
            if isinstance(made, str):
                return False, made
            root, chosen, manifests = made
            problems: list[str] = []
            async with http.get(f"{root}/studies", headers={"Accept": "application/dicom+json"}) as r:
                listed = {s["0020000D"]["Value"][0] for s in await r.json()} if r.status == 200 else set()
            if listed != {s["study_instance_uid"] for s in chosen}:
                problems.append(f"QIDO listed {len(listed)} of {len(chosen)} studies")
            for study in chosen:
                uid = study["study_instance_uid"]
                async with http.get(f"{root}/studies/{uid}",
                                    headers={"Accept": 'multipart/related; type="application/dicom"'}) as r:
                    body = await r.read()
                    content_type = r.headers.get("Content-Type", "")
                got = await asyncio.to_thread(_dicom_parts, content_type, body)
                held = await asyncio.to_thread(_held_syntaxes, network, uid)
                report.details.append(f"      {study['sources'][0]:<40} {len(got)}/{manifests[uid]} "
                                      f"instances of its manifest over WADO-RS, {len(body) / 1e6:.1f} MB")
                # every instance of the source's manifest (a KOS lists images, not reports), as held there
                if len(set(got)) != manifests[uid] or len(got) != manifests[uid] or not set(got) <= set(held):
                    problems.append(f"{study['sources'][0]}: {len(got)} of {manifests[uid]} instances")
            # The capability is the first client's: the second TLB client (its own certificate) gets a 404.
            other = aiohttp.TCPConnector(ssl=network.tlb_clients[1].ssl_context(ca))
            async with aiohttp.ClientSession(timeout=timeout, connector=other) as stranger, \
                    stranger.get(f"{root}/studies") as r:
                if r.status != 404:
                    problems.append(f"another TLB client read the view: HTTP {r.status}")
            report.details.append(f"      DICOMweb root (valid {gw.config.views.ttl_s:.0f} s): {root}; "
                                  f"{network.tlb_clients[1].name} gets 404 there")
            return not problems, "QIDO and WADO-RS through one view" if not problems else "; ".join(problems)

        await _step(report, "A view over DICOMweb (TLB and XCA)", views)

        async def trust() -> tuple[bool, str]:
            """Every door knows who calls: each identity works for itself and for nobody else."""
            api = f"{gw.http_url}{gw.config.timeline.path_prefix}/timeline"
            patient = next(p for p in net.patients if p.consent == "all")

            def body(ura: str) -> dict[str, Any]:
                return {"patient": {"bsn": patient.bsn}, "period": {"from": "2015-01-01", "to": "2026-12-31"},
                        "requester": {"ura": ura, "organization_type": "V6", "uzi": DEMO_UZI,
                                      "role": DEMO_ROLE, "purpose": "TREAT"}}

            async with http.post(api, json=body(SECOND_TLB_URA)) as r:
                forged = r.status
            second = network.tlb_clients[1]
            async with aiohttp.ClientSession(timeout=timeout) as other, other.post(
                    api, json=body(SECOND_TLB_URA), ssl=second.ssl_context(ca)) as r:
                own = r.status
            zuid, noord = network.xca_peers[1], network.xca_peers[0]
            found = await XdsCaller(network, zuid).find(patient.bsn)
            # xds-zuid presenting xds-noord's (valid, signed) assertion over its own TLS identity.
            borrowed = XdsCaller(network, zuid, signing=noord)
            stolen: str
            try:
                stolen = str((await borrowed.find(patient.bsn)).status)
            except SoapFaultAnswer as fault:
                stolen = f"fault {fault.status}"
            ok = forged == 403 and own == 200 and found.status == ResponseStatus.SUCCESS \
                and str(stolen).startswith("fault 4")
            return ok, (f"forged requester URA: HTTP {forged}; {second.name} for itself: HTTP {own}; "
                        f"{zuid.name} for itself: {found.status.rsplit(':', 1)[-1]}; "
                        f"{zuid.name} with {noord.name}'s assertion: {stolen}")

        await _step(report, "Trust: callers bound to their certificates", trust)

        async def metrics() -> tuple[bool, str]:
            async with ops.get(f"{gw.ops_url}/metrics") as r:
                text = await r.text()
            return "duo_http_requests_total" in text, f"HTTP {r.status}, {len(text.splitlines())} lines"

        await _step(report, "DUO /metrics (Prometheus)", metrics)
    return report


DemoView = tuple[str, list[dict[str, Any]], dict[str, int]]


async def make_demo_view(http_url: str, prefix: str, bsn: str, http: aiohttp.ClientSession) -> DemoView | str:
    """A view of the patient's first TLB and first XCA study from a fresh timeline: its DICOMweb root,
    the two timeline entries and the instances each source's manifest lists, or why not."""
    requester = {"ura": REQUESTER_PACS.ura, "organization_type": "V6", "uzi": DEMO_UZI, "role": DEMO_ROLE,
                 "purpose": "TREAT"}
    body = {"patient": {"bsn": bsn}, "requester": requester,
            "period": {"from": "2015-01-01", "to": "2026-12-31"}}
    async with http.post(f"{http_url}{prefix}/timeline", json=body) as r:
        studies = (await r.json()).get("studies", [])
    firsts = [next((s for s in studies if s["sources"][0].startswith(kind)), None)
              for kind in ("tlb:", "xca:")]
    chosen = [s for s in firsts if s is not None]
    async with http.post(f"{http_url}{prefix}/views",
                         json={"studies": [s["id"] for s in chosen], "requester": requester}) as r:
        view = await r.json()
        if r.status != 201:
            return f"HTTP {r.status}: {view.get('detail')}"
    manifests = {s["study_instance_uid"]: int(s["instances"]) for s in view["studies"]}
    return str(view["dicomweb"]), chosen, manifests


def _dicom_parts(content_type: str, body: bytes) -> list[str]:
    """The SOP Instance UIDs of a multipart/related answer's application/dicom parts."""
    message = email.message_from_bytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    uids = []
    for part in message.walk():
        if part.get_content_type() == "application/dicom":
            payload = part.get_payload(decode=True)
            assert isinstance(payload, bytes)
            uids.append(str(dcmread(BytesIO(payload), stop_before_pixels=True).SOPInstanceUID))
    return uids


def _headers(paths: list[Path]) -> dict[str, tuple[str, str]]:
    """SOP Instance UID -> (patient id, transfer syntax) of these files."""
    headers = [dcmread(p, stop_before_pixels=True) for p in paths]
    return {str(ds.SOPInstanceUID): (str(ds.PatientID), str(ds.file_meta.TransferSyntaxUID))
            for ds in headers}


def _held_syntaxes(network: SimulatedNetwork, study_uid: str) -> dict[str, str]:
    """SOP Instance UID -> the transfer syntax its source (a PACS or a community) holds it in."""
    for pacs in network.pacs:
        paths = pacs.instance_paths(study_uid)
        if paths:
            return {sop: ts for sop, (_, ts) in _headers(paths).items()}
    return {str(ds.SOPInstanceUID): str(ds.file_meta.TransferSyntaxUID) for sim in network.community_sims
            for _, _, study in sim.studies if study.study_instance_uid == study_uid for ds in study.instances}


__all__ = ["Report", "run_scenario"]


class SoapFaultAnswer(Exception):
    """DUO answered with a SOAP Fault (HTTP ``status``)."""

    def __init__(self, status: int, reason: str) -> None:
        super().__init__(f"HTTP {status}: {reason}")
        self.status = status


class XdsCaller:
    """An XDS community's Initiating Gateway: its TLS identity, one signed XUA assertion reused for every
    message (as real gateways keep a session's assertion; each message has its own MessageID and
    Timestamp), WS-Addressing, DUO's own codec. ``signing`` is whose assertion it presents (its own
    unless a check wants to show a borrowed one refused)."""

    def __init__(self, network: SimulatedNetwork, peer: DemoXcaPeer, *,
                 signing: DemoXcaPeer | None = None) -> None:
        assert network.gateway is not None and network.pki is not None
        self._gw = network.gateway
        self._ssl = peer.ssl_context(network.pki.ca_cert)
        signer = signing or peer
        key, cert = load_signing_pair(signer.signing.key, signer.signing.cert)
        self._home = network.gateway.config.gateway.home_community_id
        self._assertion = issue_assertion(
            Claims(uzi=DEMO_UZI, role=DEMO_ROLE, ura="00020011", organisation_type="V6"),
            issuer=signer.issuer, audience=self._home, key=key, cert=cert, now=datetime.now(UTC))

    async def _call(self, path: str, action: str, body: etree._Element) -> tuple[Envelope, dict[str, bytes]]:
        now = datetime.now(UTC)
        url = self._gw.http_url + path
        addressing = Addressing(action=action, message_id=new_message_id(), to=url, reply_to=WSA_ANONYMOUS)
        env = build_envelope(addressing, body, [security_header(self._assertion, now)])
        content_type, mtom = build_mtom(env, [], action)
        async with aiohttp.ClientSession() as http, http.post(
                url, data=bytes(mtom), headers={"Content-Type": content_type}, ssl=self._ssl) as r:
            data, reply_type, status = await r.read(), r.headers.get("Content-Type", ""), r.status
        if status != 200:
            raise SoapFaultAnswer(status, data[:300].decode("utf-8", "replace"))
        root, parts = parse_mtom(reply_type, data, 1 << 30)
        answer = parse_envelope(root)
        if answer.body is None:
            raise ValueError(f"{action}: empty answer")
        return answer, parts

    async def find(self, bsn: str) -> AdhocQueryResponse:
        env, _ = await self._call(self._gw.config.xca_responding.iti38_path, Action.ITI38,
                                  build_adhoc_query_request(find_documents(bsn_cx(bsn))))
        assert env.body is not None
        return parse_adhoc_query_response(env.body)

    async def kos(self, entry: DocumentEntry) -> Dataset:
        assert entry.repository_unique_id is not None
        request = RetrieveDocumentSetRequest((DocumentRequest(entry.repository_unique_id, entry.unique_id,
                                                              self._home),))
        env, parts = await self._call(self._gw.config.xca_responding.iti39_path, Action.ITI39,
                                      build_retrieve_request(request))
        assert env.body is not None
        docs = parse_retrieve_response(env.body, parts).documents
        if not docs or not isinstance(docs[0].data, bytes):
            raise ValueError("ITI-39 delivered no KOS")
        return dcmread(BytesIO(docs[0].data))

    async def images(self, entry: DocumentEntry, study_uid: str, refs: list[tuple[str, str]]) -> int:
        assert entry.repository_unique_id is not None
        repo = entry.repository_unique_id
        by_series: dict[str, list[str]] = {}
        for series, sop in refs:
            by_series.setdefault(series, []).append(sop)
        request = RetrieveImagingDocumentSetRequest(
            (StudyRequest(study_uid, tuple(SeriesRequest(se, tuple(DocumentRequest(repo, sop, self._home)
                                                                    for sop in sops))
                                          for se, sops in by_series.items())),),
            ("1.2.840.10008.1.2.1",))
        env, parts = await self._call(self._gw.config.xca_responding.rad75_path, Action.RAD75,
                                      build_imaging_retrieve_request(request))
        assert env.body is not None
        return len(parse_retrieve_response(env.body, parts).documents)
