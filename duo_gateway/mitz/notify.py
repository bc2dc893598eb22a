"""The rest-hook endpoint Mitz posts consent notifications to (mitz.md §4).

Its one job is to make a consent change take effect at once: the closed-question client may cache a
decision for up to ``cache_ttl_s``, and a withdrawn consent must not be honoured for that long. So for
a valid notification the callback (the cache's eviction) runs *before* the answer: if it fails, Mitz
gets a 500 and retries, rather than a 200 for a change DUO never applied.

Security argument: the door only ever evicts. A notification cannot grant anything, because consent
is always decided by a fresh closed question; a forged or replayed notification costs at most one
extra question. That is why the door acts on any well-formed notification for a hospital DUO
represents, and relies on the listener's mTLS and Mitz's whitelisting (mitz.md §6) for who may post.

XML notifications (``application/fhir+xml``) are answered 415: every subscription DUO registers asks
for ``application/fhir+json`` (and the codec parses JSON only), so an XML notification means a
subscription registered by someone else, or a Mitz change worth noticing, not something to guess at.

Logs never carry the BSN: the holder URA, the Bundle id and the decisions suffice to follow a
notification; the BSN is in the audit record, where disclosures belong.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Callable, Mapping
from typing import Any, Final

import structlog
from aiohttp import web

from duo_gateway.access import Caller
from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import EventOutcome, Peer, mitz_consent_notification
from duo_gateway.config.loader import DuoConfig
from duo_gateway.http.access import RETRY_AFTER_S, register_denial, route_name
from duo_gateway.mitz.codec import MitzAnswerError
from duo_gateway.mitz.fhir import FHIR_JSON, Notification, parse_notification

log = structlog.get_logger(__name__)

JSON_TYPES: Final = frozenset({FHIR_JSON, "application/json"})
XML_TYPES: Final = frozenset({"application/fhir+xml", "application/xml", "text/xml"})
#: A notification is one patient's few Consent entries: a few KiB. Far below the listener's limit,
#: which is sized for XCA traffic.
DEFAULT_MAX_BODY_BYTES: Final = 256 * 1024

ConsentChange = Callable[[str, str], None]


def operation_outcome(severity: str, code: str, diagnostics: str) -> dict[str, Any]:
    return {"resourceType": "OperationOutcome",
            "issue": [{"severity": severity, "code": code, "diagnostics": diagnostics}]}


def _answer(status: int, severity: str, code: str, diagnostics: str) -> web.Response:
    body = json.dumps(operation_outcome(severity, code, diagnostics)).encode()
    return web.Response(status=status, body=body, content_type=FHIR_JSON, charset="utf-8")


def _denial(status: int, detail: str, _caller: Caller) -> web.Response:
    """The access middleware's refusals (not Mitz, or too many at once) as a FHIR OperationOutcome."""
    response = _answer(status, "error", "forbidden" if status == 403 else "throttled", detail)
    if status == 429:
        response.headers["Retry-After"] = str(RETRY_AFTER_S)
    return response


class _Rejected(Exception):
    """An answer decided before the notification could be read; carries the response to send."""

    def __init__(self, response: web.Response, reason: str) -> None:
        super().__init__(reason)
        self.response = response
        self.reason = reason


class MitzNotifyDoor:
    """FrontDoor for ``POST {mitz.notify_path}``. Mounted whether or not ``notify_url`` is set:
    subscriptions registered earlier keep sending notifications after subscribing is switched off."""

    name = "mitz-notify"

    def __init__(self, config: DuoConfig, on_consent_change: ConsentChange, auditor: Auditor, *,
                 max_body_bytes: int = DEFAULT_MAX_BODY_BYTES) -> None:
        self._config = config
        self._on_consent_change = on_consent_change
        self._auditor = auditor
        self._max_body = max_body_bytes
        self._represented = frozenset(h.ura for h in config.tlb_hospitals)
        mitz_cfg = config.mitz
        endpoint = str(mitz_cfg.notify_url) if mitz_cfg.notify_url is not None else mitz_cfg.notify_path
        self._gateway = Peer(user_id=endpoint, host=socket.gethostname(),
                             alternative_user_id=str(os.getpid()), user_name=config.gateway.name)

    def mount(self, app: web.Application) -> None:
        register_denial(app, "mitz", _denial)
        app.router.add_post(self._config.mitz.notify_path, self._handle, name=route_name("mitz", "notify"))

    # -- request ---------------------------------------------------------------------------------

    async def _handle(self, request: web.Request) -> web.Response:
        mitz = Peer(user_id=request.remote or "unknown", host=request.remote)
        try:
            body = await self._read(request)
            notification, bundle_id = self._parse(body)
        except _Rejected as rejected:
            log.warning("mitz_notification_rejected", status=rejected.response.status, reason=rejected.reason)
            self._audit(mitz, None, None, None, "rejected", EventOutcome.MINOR_FAILURE, rejected.reason)
            return rejected.response

        holder = notification.holder_ura
        summary = ",".join(sorted({"permit" if s.permit else "deny" for s in notification.statements}))
        if holder not in self._represented:
            log.info("mitz_notification_ignored", holder_ura=holder, bundle_id=bundle_id,
                     reason="holder is not a TLB hospital this gateway represents")
            self._audit(mitz, bundle_id, notification.bsn, holder, "ignored", EventOutcome.SUCCESS, None)
            return _answer(200, "information", "informational",
                           "notification acknowledged; the data holder is not represented by this gateway")
        try:
            # parse_notification guarantees one Patient and one Organization per Bundle, so every
            # Consent in it concerns this same pair: one eviction covers all of them.
            self._on_consent_change(notification.bsn, holder)
        except Exception as exc:
            log.error("mitz_notification_not_applied", holder_ura=holder, bundle_id=bundle_id,
                      error=type(exc).__name__)
            self._audit(mitz, bundle_id, notification.bsn, holder, "not-applied",
                        EventOutcome.SERIOUS_FAILURE,
                        f"consent change could not be applied: {type(exc).__name__}")
            return _answer(500, "error", "exception", "the consent change could not be applied; retry")
        log.info("mitz_notification", holder_ura=holder, bundle_id=bundle_id,
                 consents=len(notification.statements), decisions=summary)
        self._audit(mitz, bundle_id, notification.bsn, holder, summary, EventOutcome.SUCCESS, None)
        return _answer(200, "information", "informational", "notification processed")

    async def _read(self, request: web.Request) -> bytes:
        content_type = request.content_type.lower()
        if content_type in XML_TYPES:
            raise _Rejected(_answer(415, "error", "not-supported",
                                    "XML notifications are not supported; send application/fhir+json"),
                            "XML notification")
        if content_type not in JSON_TYPES:
            raise _Rejected(_answer(415, "error", "not-supported",
                                    "Content-Type must be application/fhir+json"), "unsupported content type")
        charset = request.charset
        if charset is not None and charset.lower().replace("-", "") != "utf8":
            raise _Rejected(_answer(415, "error", "not-supported", "FHIR JSON must be UTF-8"),
                            "unsupported charset")
        too_large = _Rejected(_answer(413, "error", "too-costly",
                                      f"a notification must not exceed {self._max_body} bytes"), "too large")
        if request.content_length is not None and request.content_length > self._max_body:
            raise too_large
        body = bytearray()
        async for chunk in request.content.iter_chunked(64 * 1024):
            body += chunk
            if len(body) > self._max_body:
                raise too_large
        return bytes(body)

    @staticmethod
    def _parse(body: bytes) -> tuple[Notification, str | None]:
        try:
            data = json.loads(body.decode("utf-8"))
        except (ValueError, UnicodeDecodeError):
            raise _Rejected(_answer(400, "error", "structure", "body is not UTF-8 JSON"),
                            "not JSON") from None
        if not isinstance(data, Mapping) or data.get("resourceType") != "Bundle":
            raise _Rejected(_answer(400, "error", "structure", "body is not a FHIR Bundle"), "not a Bundle")
        try:
            notification = parse_notification(data)
        except MitzAnswerError as exc:
            # Codec messages never contain a BSN (MitzError), so they can go back and into the log.
            raise _Rejected(_answer(400, "error", "invalid", f"invalid notification: {exc}"),
                            f"invalid notification: {exc}") from None
        bundle_id = data.get("id")
        return notification, bundle_id if isinstance(bundle_id, str) and bundle_id else None

    def _audit(self, mitz: Peer, bundle_id: str | None, bsn: str | None, holder_ura: str | None, result: str,
               outcome: EventOutcome, description: str | None) -> None:
        self._auditor.record(mitz_consent_notification(
            mitz=mitz, gateway=self._gateway, audit_source=self._auditor.audit_source,
            notification_id=bundle_id, bsn=bsn, holder_ura=holder_ura, result=result, outcome=outcome,
            outcome_description=description))


__all__ = ["DEFAULT_MAX_BODY_BYTES", "MitzNotifyDoor", "operation_outcome"]
