"""A Mitz simulator: closed and open question, subscriptions, notifications, and misbehaviour on demand.

Mitz's test environment changes real data that shows up in "Mijn Mitz" (mitz.md §6), so every
automated test and the demo talk to this instead. It speaks the exact wire formats of
:mod:`duo_gateway.mitz.xacml`, :mod:`~duo_gateway.mitz.xcpd` and :mod:`~duo_gateway.mitz.fhir` and is
deliberately strict about requests, so a gateway that drifts from the documented shape fails here
rather than in acceptance.

Consent model (a simplification, on purpose):

* A consent record is ``(bsn, holder_ura)`` for data category GGC002. Because consent for a higher
  category also gives Permit for a lower one (mitz.md §5), GGC012 and GGC013 are permitted too.
  The requester's category is not modelled: a consented holder is open to every requester.
* The closed answer is ``Permit`` for a consented pair, ``Deny`` for a known patient without that
  consent, ``NotApplicable`` for a BSN the simulator does not know, and ``Indeterminate`` for a
  data category it does not recognise (B365's meaning of Indeterminate).
* The open answer lists every consented holder the simulator can place: an institution of an XCA
  community is located at that community (``HomeCommunityId`` = its home community id, ``SourceId``
  = the community's repository unique id, which the default network makes the home OID + ``.1``);
  a TLB hospital is located at ``tlb_home_community_id`` (the DUO gateway's own community, since
  the gateway is what fronts TLB for XCA peers) with ``SourceId`` = the hospital's repository
  unique id. Without ``tlb_home_community_id`` TLB hospitals are not listed, which models a
  gateway that has not subscribed its hospitals. The corresponding patient id is the BSN.
* Subscriptions are deduplicated on (patient, provider URA, source system): the provider URA stands
  in for "the same connector", which real Mitz derives from the mTLS certificate.

Logs never carry a BSN: the holder URA, requester URA and decisions are enough to follow a test.
"""

from __future__ import annotations

import asyncio
import json
import ssl
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import Final, TypeVar

import aiohttp
import structlog
from aiohttp import web

from duo_gateway.bsn import BSN_OID, is_valid_bsn
from duo_gateway.mitz.codec import MitzRequestError, MitzSecurityError, bare_oid
from duo_gateway.mitz.fhir import (
    ALL_PROVIDER_CATEGORIES,
    FHIR_JSON,
    ConsentStatement,
    Notification,
    Subscription,
    build_notification,
    parse_subscription,
    subscription_resource,
)
from duo_gateway.mitz.xacml import (
    CLOSED_ACTION,
    ClosedQuestion,
    Decision,
    build_closed_answer,
    parse_closed_question,
)
from duo_gateway.mitz.xcpd import OPEN_ACTION, Location, OpenQuestion, build_open_answer, parse_open_question
from duo_gateway.saml import WSSE_NS
from duo_gateway.sim.behaviour import MitzMisbehaviour
from duo_gateway.sim.config import SimNetworkConfig
from duo_gateway.sim.http import current_behaviour, install_behaviour
from duo_gateway.soap.envelope import (
    SOAP11_NS,
    SOAP12_CONTENT_TYPE,
    SOAP12_NS,
    WSA_NS,
    Envelope,
    EnvelopeError,
    SoapFault,
    build_fault,
    fault_http_status,
    parse_envelope,
)
from duo_gateway.soap.xml import XmlError, parse_xml, to_bytes

_Q = TypeVar("_Q", ClosedQuestion, OpenQuestion)

log = structlog.get_logger("duo_gateway.sim.mitz")

CLOSED_ROUTE: Final = "/geslotenautorisatievraag/xacml3"
OPEN_ROUTE: Final = "/openautorisatievraag"
SUBSCRIPTION_ROUTE: Final = "/abonnementen/fhir/Subscription"
CONSENT_ADMIN_ROUTE: Final = "/admin/consent"

#: GGC002 is the high category the simulated consent covers; the low ones follow from it (mitz.md §5).
KNOWN_CATEGORIES: Final = frozenset({"GGC002", "GGC012", "GGC013"})
_SOAP_CONTENT_TYPE: Final = f"{SOAP12_CONTENT_TYPE}; charset=UTF-8"
_UNDERSTOOD_WSA: Final = frozenset(f"{{{WSA_NS}}}{n}" for n in ("Action", "MessageID", "To", "ReplyTo",
                                                                 "RelatesTo"))
_SESSION_KEY: Final = web.AppKey("mitz_sim_client_session", aiohttp.ClientSession)


@dataclass(frozen=True)
class _Placement:
    """Where the open answer says a data holder's data lives."""

    home_community_id: str
    source_id: str


class MitzSimulator:
    """Serves the Mitz endpoints for a :class:`SimNetworkConfig`; state lives on the instance.

    One instance can back several ``app()`` objects (they share consent and subscriptions), which
    keeps a test's handle on the consent records stable across restarts of the HTTP server.
    """

    def __init__(self, net: SimNetworkConfig, *, tlb_home_community_id: str | None = None,
                 notify_timeout_s: float = 5.0, notify_ssl: ssl.SSLContext | None = None) -> None:
        self._net = net
        self._notify_timeout_s = notify_timeout_s
        #: Mitz's client certificate towards a notify endpoint under mTLS (mitz.md §6).
        self._notify_ssl = notify_ssl
        self._known_bsns: set[str] = {p.bsn for p in net.patients}
        self._consents: set[tuple[str, str]] = {
            (p.bsn, ura) for p in net.patients for ura in net.consent_holders(p)}
        self._subscriptions: dict[str, Subscription] = {}
        self._placements: dict[str, _Placement] = {}
        for community in net.communities:
            for inst in community.institutions:
                self._placements[inst.ura] = _Placement(community.home_community_id,
                                                        bare_oid(community.repository_unique_id))
        if tlb_home_community_id is not None:
            for hospital in net.hospitals:
                self._placements[hospital.ura] = _Placement(tlb_home_community_id,
                                                            bare_oid(hospital.repository_unique_id))

    # ---------------------------------------------------------------------------------- state

    def is_consented(self, bsn: str, holder_ura: str) -> bool:
        return (bsn, holder_ura) in self._consents

    def set_consent(self, bsn: str, holder_ura: str, permit: bool) -> bool:
        """Record a consent decision; returns whether anything changed. A new BSN becomes known."""
        if not is_valid_bsn(bsn):
            raise ValueError("not a valid BSN")
        self._known_bsns.add(bsn)
        key = (bsn, holder_ura)
        before = key in self._consents
        if permit:
            self._consents.add(key)
        else:
            self._consents.discard(key)
        return before != permit

    @property
    def subscriptions(self) -> list[Subscription]:
        return list(self._subscriptions.values())

    def decide(self, bsn: str, holder_ura: str, category: str) -> Decision:
        if bsn not in self._known_bsns:
            return "NotApplicable"
        if category not in KNOWN_CATEGORIES:
            return "Indeterminate"
        return "Permit" if self.is_consented(bsn, holder_ura) else "Deny"

    def locate(self, bsn: str) -> list[Location]:
        locations = []
        for ura in sorted(u for b, u in self._consents if b == bsn):
            placement = self._placements.get(ura)
            if placement is None:
                continue
            locations.append(Location(home_community_id=placement.home_community_id,
                                      source_id=placement.source_id, patient_root=BSN_OID,
                                      patient_extension=bsn, holder_ura=ura))
        return locations

    # ---------------------------------------------------------------------------------- app

    def app(self) -> web.Application:
        app = web.Application()
        install_behaviour(app, self._net.mitz.behaviour)
        app.cleanup_ctx.append(self._client_session)
        app.router.add_post(CLOSED_ROUTE, self._closed)
        app.router.add_post(OPEN_ROUTE, self._open)
        app.router.add_post(SUBSCRIPTION_ROUTE, self._subscribe)
        app.router.add_get(SUBSCRIPTION_ROUTE, self._list_subscriptions)
        app.router.add_get(SUBSCRIPTION_ROUTE + "/{id}", self._get_subscription)
        app.router.add_put(CONSENT_ADMIN_ROUTE, self._put_consent)
        app.router.add_get(CONSENT_ADMIN_ROUTE, self._get_consent)
        return app

    async def _client_session(self, app: web.Application) -> AsyncIterator[None]:
        timeout = aiohttp.ClientTimeout(total=self._notify_timeout_s)
        connector = aiohttp.TCPConnector(ssl=self._notify_ssl) if self._notify_ssl is not None else None
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
            app[_SESSION_KEY] = session
            yield

    # ---------------------------------------------------------------------------------- SOAP

    async def _closed(self, request: web.Request) -> web.Response:
        env: Envelope | None = None
        try:
            env = await _read_soap(request, CLOSED_ACTION, understood=_UNDERSTOOD_WSA)
            question = _question(parse_closed_question, env)
        except SoapFault as fault:
            return _fault_response(fault, env)
        behaviour = _mitz_behaviour(request.app)
        if behaviour.fault:
            return _fault_response(SoapFault("Receiver", "simulated Mitz failure"), env)
        decisions: list[Decision]
        if behaviour.force_decision is not None:
            decisions = [behaviour.force_decision] * len(question.categories)
        else:
            decisions = [self.decide(question.bsn, question.holder_ura, c) for c in question.categories]
        log.info("mitz.closed", holder_ura=question.holder_ura, requester_ura=question.requester_ura,
                 decisions=decisions, forced=behaviour.force_decision is not None)
        answer = build_closed_answer(decisions, relates_to=_message_id(env))
        return _soap_response(answer, malformed=behaviour.malformed)

    async def _open(self, request: web.Request) -> web.Response:
        env: Envelope | None = None
        try:
            env = await _read_soap(request, OPEN_ACTION,
                                   understood=_UNDERSTOOD_WSA | {f"{{{WSSE_NS}}}Security"})
            now = datetime.now(UTC)
            question: OpenQuestion = _question(lambda e: parse_open_question(e, now=now), env)
        except SoapFault as fault:
            return _fault_response(fault, env)
        behaviour = _mitz_behaviour(request.app)
        if behaviour.fault:
            return _fault_response(SoapFault("Receiver", "simulated Mitz failure"), env)
        locations = self.locate(question.bsn)
        log.info("mitz.open", requester_ura=question.requester_ura,
                 holder_uras=[loc.holder_ura for loc in locations])
        answer = build_open_answer(locations, relates_to=_message_id(env))
        return _soap_response(answer, malformed=behaviour.malformed)

    # ---------------------------------------------------------------------------------- FHIR

    async def _subscribe(self, request: web.Request) -> web.Response:
        behaviour = _mitz_behaviour(request.app)
        if behaviour.fault:
            return _outcome(500, "exception", "simulated Mitz failure")
        if request.content_type not in (FHIR_JSON, "application/json"):
            return _outcome(400, "structure", "Content-Type must be application/fhir+json")
        try:
            resource = json.loads(await request.read())
        except (ValueError, UnicodeDecodeError):
            return _outcome(400, "structure", "body is not JSON")
        if isinstance(resource, dict) and "id" in resource:
            return _outcome(400, "structure", "id must be absent when creating a Subscription")
        try:
            sub = parse_subscription(resource)
        except MitzRequestError as exc:
            return _outcome(400, "invalid", str(exc))
        if sub.payload != FHIR_JSON:
            return _outcome(422, "business-rule", "this simulator only notifies with application/fhir+json")
        existing = next((s for s in self._subscriptions.values()
                         if (s.bsn, s.provider_ura, s.source_oid) == (sub.bsn, sub.provider_ura,
                                                                      sub.source_oid)), None)
        if existing is not None:
            status, stored = 202, existing
        else:
            status, stored = 201, replace(sub, id=str(uuid.uuid4()), status="active")
            assert stored.id is not None
            self._subscriptions[stored.id] = stored
        log.info("mitz.subscription", provider_ura=stored.provider_ura, subscription_id=stored.id,
                 existing=existing is not None)
        body = json.dumps(subscription_resource(stored)).encode()
        if behaviour.malformed:
            body = body[: len(body) // 2]
        return web.Response(status=status, body=body, content_type=FHIR_JSON,
                            headers={"Location": f"{SUBSCRIPTION_ROUTE}/{stored.id}"})

    async def _list_subscriptions(self, request: web.Request) -> web.Response:
        entries = [{"fullUrl": f"{SUBSCRIPTION_ROUTE}/{s.id}", "resource": subscription_resource(s)}
                   for s in self._subscriptions.values()]
        bundle = {"resourceType": "Bundle", "type": "searchset", "total": len(entries), "entry": entries}
        return web.Response(body=json.dumps(bundle).encode(), content_type=FHIR_JSON)

    async def _get_subscription(self, request: web.Request) -> web.Response:
        sub = self._subscriptions.get(request.match_info["id"])
        if sub is None:
            return _outcome(404, "not-found", "no such Subscription")
        return web.Response(body=json.dumps(subscription_resource(sub)).encode(), content_type=FHIR_JSON)

    # ---------------------------------------------------------------------------------- admin

    async def _get_consent(self, request: web.Request) -> web.Response:
        records = [{"bsn": b, "holder_ura": u, "permit": True} for b, u in sorted(self._consents)]
        return web.json_response({"consents": records})

    async def _put_consent(self, request: web.Request) -> web.Response:
        try:
            data = await request.json()
        except ValueError:
            return _problem("body is not JSON")
        if not isinstance(data, dict) or set(data) != {"bsn", "holder_ura", "permit"}:
            return _problem("expected exactly {bsn, holder_ura, permit}")
        bsn, holder_ura, permit = data["bsn"], data["holder_ura"], data["permit"]
        if not isinstance(bsn, str) or not is_valid_bsn(bsn):
            return _problem("bsn must be a valid BSN")
        if not isinstance(holder_ura, str) or not holder_ura.isdigit() or len(holder_ura) != 8:
            return _problem("holder_ura must be eight digits")
        if not isinstance(permit, bool):
            return _problem("permit must be a boolean")
        changed = self.set_consent(bsn, holder_ura, permit)
        log.info("mitz.consent_changed", holder_ura=holder_ura, permit=permit, changed=changed)
        delivered, failed = await self._notify(request.app, bsn, holder_ura, permit)
        return web.json_response({"holder_ura": holder_ura, "permit": permit, "changed": changed,
                                  "notified": delivered, "failed": failed})

    async def _notify(self, app: web.Application, bsn: str, holder_ura: str, permit: bool) -> tuple[int, int]:
        """POST a notification to every subscriber for this patient and holder, before answering the
        admin call, so a test can assert on the receiver as soon as the PUT returns."""
        targets = [s for s in self._subscriptions.values() if s.bsn == bsn and s.provider_ura == holder_ura]
        if not targets:
            return 0, 0
        session = app[_SESSION_KEY]
        now = datetime.now(UTC)
        results = await asyncio.gather(*(self._deliver(session, sub, permit, now) for sub in targets))
        delivered = sum(results)
        return delivered, len(results) - delivered

    async def _deliver(self, session: aiohttp.ClientSession, sub: Subscription, permit: bool,
                       now: datetime) -> bool:
        notification = Notification(
            bsn=sub.bsn, holder_ura=sub.provider_ura, holder_type=sub.provider_type, date_time=now,
            statements=(ConsentStatement(provider_categories=ALL_PROVIDER_CATEGORIES, permit=permit),))
        body = json.dumps(build_notification(notification)).encode()
        try:
            async with session.post(sub.endpoint, data=body, headers={"Content-Type": FHIR_JSON}) as resp:
                ok = 200 <= resp.status < 300
                if not ok:
                    log.warning("mitz.notify_rejected", subscription_id=sub.id, holder_ura=sub.provider_ura,
                                status=resp.status)
                return ok
        except (aiohttp.ClientError, TimeoutError) as exc:
            # A subscriber being away must not break Mitz; real Mitz retries, the sim just reports.
            log.warning("mitz.notify_failed", subscription_id=sub.id, holder_ura=sub.provider_ura,
                        error=type(exc).__name__)
            return False


# -------------------------------------------------------------------------------------- helpers


def _mitz_behaviour(app: web.Application) -> MitzMisbehaviour:
    behaviour = current_behaviour(app)
    if isinstance(behaviour, MitzMisbehaviour):
        return behaviour
    return MitzMisbehaviour.model_validate(behaviour.model_dump())


async def _read_soap(request: web.Request, action: str, understood: frozenset[str]) -> Envelope:
    """Validate transport and envelope; every refusal is a SoapFault to answer with.

    SOAP 1.1 is recognised before the Content-Type check so a 1.1 client gets the VersionMismatch
    it can act on, rather than a generic Sender fault about its ``text/xml``.
    """
    data = await request.read()
    try:
        root = parse_xml(data)
    except XmlError as exc:
        raise SoapFault("Sender", f"request is not acceptable XML: {exc}"[:300]) from exc
    if root.tag == f"{{{SOAP11_NS}}}Envelope":
        raise SoapFault("VersionMismatch", "SOAP 1.1 is not supported; use SOAP 1.2")
    if request.content_type != SOAP12_CONTENT_TYPE:
        raise SoapFault("Sender", f"Content-Type must be {SOAP12_CONTENT_TYPE}")
    try:
        env = parse_envelope(root)
    except EnvelopeError as exc:
        raise SoapFault("Sender", str(exc)[:300]) from exc
    except SoapFault as exc:
        raise SoapFault("Sender", "a request must not carry a Fault") from exc
    for header in env.headers:
        if header.get(f"{{{SOAP12_NS}}}mustUnderstand") in ("1", "true") and header.tag not in understood:
            raise SoapFault("MustUnderstand", f"header {header.tag} is not understood")
    if not env.addressing.message_id:
        raise SoapFault("Sender", "wsa:MessageID is required",
                        subcode=(WSA_NS, "MessageAddressingHeaderRequired"))
    if env.addressing.action != action:
        raise SoapFault("Sender", f"wsa:Action {env.addressing.action!r} is not supported here",
                        subcode=(WSA_NS, "ActionNotSupported"))
    return env


def _question(parse: Callable[[Envelope], _Q], env: Envelope) -> _Q:
    """Map codec refusals to the Sender faults Mitz would answer with."""
    try:
        return parse(env)
    except MitzSecurityError as exc:
        raise SoapFault("Sender", str(exc), subcode=(WSSE_NS, "InvalidSecurity")) from exc
    except MitzRequestError as exc:
        raise SoapFault("Sender", str(exc)) from exc


def _message_id(env: Envelope | None) -> str:
    assert env is not None and env.addressing.message_id is not None  # _read_soap guarantees both
    return env.addressing.message_id


def _fault_response(fault: SoapFault, env: Envelope | None) -> web.Response:
    relates_to = env.addressing.message_id if env is not None else None
    envelope = build_fault(fault, relates_to=relates_to)
    log.info("mitz.fault", code=fault.code, reason=fault.reason)
    return web.Response(status=fault_http_status(fault), body=to_bytes(envelope),
                        headers={"Content-Type": _SOAP_CONTENT_TYPE})


def _soap_response(answer: bytes, malformed: bool) -> web.Response:
    if malformed:
        # Truncated mid-element: well-formedness fails, as with a proxy cutting a response short.
        answer = answer[: len(answer) // 2]
    return web.Response(status=200, body=answer, headers={"Content-Type": _SOAP_CONTENT_TYPE})


def _outcome(status: int, code: str, diagnostics: str) -> web.Response:
    outcome = {"resourceType": "OperationOutcome",
               "issue": [{"severity": "error", "code": code, "diagnostics": diagnostics}]}
    return web.Response(status=status, body=json.dumps(outcome).encode(), content_type=FHIR_JSON)


def _problem(detail: str) -> web.Response:
    return web.json_response({"title": "invalid consent change", "detail": detail}, status=400,
                             content_type="application/problem+json")


__all__ = ["CLOSED_ROUTE", "CONSENT_ADMIN_ROUTE", "OPEN_ROUTE", "SUBSCRIPTION_ROUTE", "MitzSimulator"]
