"""The long-running gateway process: listeners up, dependencies wired, graceful down.

``Gateway`` is used both by ``duo-gateway serve`` and in-process by the simulated network and the
tests, so all three run exactly the same start and stop sequence.
"""

from __future__ import annotations

import asyncio
import gc
import os
import shutil
import signal
import socket
from collections.abc import Sequence
from typing import Any

import structlog
from aiohttp import web

from duo_gateway.access import AccessConfigError, ClientDirectory, access_problems
from duo_gateway.audit.auditor import Auditor
from duo_gateway.audit.messages import Peer, application_activity
from duo_gateway.config.loader import DuoConfig
from duo_gateway.consent import ConsentGate
from duo_gateway.dicom.nodelay import install_tcp_nodelay
from duo_gateway.dicom.qr import MemoryBudget, MoveRouter, receiving_syntaxes
from duo_gateway.dicom.ul.association import AcceptorPolicy, Timeouts, UlServer, verification_supported
from duo_gateway.health import Probe, build_probes
from duo_gateway.http.server import FrontDoor, build_app, build_ops_app
from duo_gateway.http.slow import HeaderTimeoutSite
from duo_gateway.mitz.client import MitzClient
from duo_gateway.mitz.notify import MitzNotifyDoor
from duo_gateway.mitz.signing import request_signer
from duo_gateway.mitz.subscriptions import SubscriptionManager
from duo_gateway.observability.metrics import Metrics
from duo_gateway.sources.dicom_pacs import RETRIEVE_WINDOW_FILES, DicomPacsSource
from duo_gateway.timeline.service import TimelineService
from duo_gateway.timeline.study_ids import StudyIds
from duo_gateway.tlb.api import TlbApiDoor
from duo_gateway.tlb.identity import AssertionIdentity
from duo_gateway.tls import server_context
from duo_gateway.transfer.jobstore import TransferStore
from duo_gateway.transfer.metrics import TransferMetrics
from duo_gateway.transfer.service import TransferService
from duo_gateway.transfer.sources import StudySources
from duo_gateway.views.dicomweb import DicomWebDoor
from duo_gateway.views.service import ViewService
from duo_gateway.xca.docindex import DocumentIndex
from duo_gateway.xca.initiating.finder import CommunityClient
from duo_gateway.xca.initiating.retriever import CommunityRetriever
from duo_gateway.xca.responding.service import RespondingGateway
from duo_gateway.xca.responding.transport import XcaRespondingDoor
from duo_gateway.xmldsig import load_signing_pair

log = structlog.get_logger(__name__)


class Gateway:
    def __init__(self, config: DuoConfig, *, front_doors: Sequence[FrontDoor] = (),
                 extra_probes: Sequence[Probe] = ()) -> None:
        self.config = config
        #: Who may call which route (``[clients]``); an entry that cannot match anything stops start-up.
        problems = access_problems(config)
        if problems:
            raise AccessConfigError("; ".join(problems))
        self.clients = ClientDirectory.build(config.clients)
        self.metrics = Metrics()
        self.auditor = Auditor(config.audit, storage_dir=config.storage.path)
        self.identity = Peer(user_id=config.listeners.dicom.ae_title, host=socket.gethostname(),
                             alternative_user_id=str(os.getpid()), user_name=config.gateway.name)
        self.mitz = MitzClient(config.mitz, gateway=self.identity, auditor=self.auditor, metrics=self.metrics,
                               signer=request_signer(config.mitz))
        #: Every front door that discloses data asks this gate; see duo_gateway.consent.
        self.consent = ConsentGate(self.mitz, categories=config.mitz.categories)
        # Mitz notifications evict cached decisions before they are acknowledged.
        self._front_doors = [
            MitzNotifyDoor(config, self._consent_changed, self.auditor),
            *front_doors,
        ]
        self._responding: RespondingGateway | None = None
        self._sync_stop = asyncio.Event()
        self._sync_task: asyncio.Task[None] | None = None
        self.spool_dir = config.storage.path / "spool"
        #: Each TLB hospital's PACS, as an ImagingSource (DICOM today).
        window_bytes = int(config.xca_responding.retrieve_window)
        method = config.xca_responding.retrieve_method
        memory = MemoryBudget(int(config.xca_responding.retrieve_memory))
        #: Routes C-STOREs that PACSes send to DUO's AE back to the C-MOVE that asked for them.
        self.move_router = MoveRouter()
        self.sources: dict[str, DicomPacsSource] = {
            h.ura: DicomPacsSource(h, config.listeners.dicom.ae_title, self.spool_dir, retrieve_method=method,
                                   retrieve_window=RETRIEVE_WINDOW_FILES, retrieve_window_bytes=window_bytes,
                                   metrics=self.metrics, move_router=self.move_router, memory=memory)
            for h in config.tlb_hospitals}
        #: Keeps Mitz subscriptions complete, reading each PACS through the same source as the queries.
        self.subscriptions = SubscriptionManager(config, pacses=self.sources, auditor=self.auditor,
                                                 metrics=self.metrics, gateway=self.identity)
        signing = None
        if config.xua.signing_key_file is not None and config.xua.signing_cert_file is not None:
            signing = load_signing_pair(config.xua.signing_key_file, config.xua.signing_cert_file)
        #: DUO as XCA Initiating Gateway: one client per community (it owns that peer's concurrency).
        self.communities = {
            c.home_community_id: CommunityClient(c, home_community_id=config.gateway.home_community_id,
                                                 xua=config.xua, signing=signing, metrics=self.metrics,
                                                 auditor=self.auditor, identity=self.identity)
            for c in config.xca_communities}
        key = config.timeline.study_id_key
        #: Seals the opaque study ids the timeline hands out and transfers take back.
        self.study_ids = StudyIds.from_settings(key.get_secret_value() if key else None, config.storage.path,
                                                ttl_s=config.timeline.study_id_ttl_s)
        self.timeline = TimelineService(config, mitz=self.mitz, gate=self.consent,
                                        communities=self.communities, sources=self.sources,
                                        auditor=self.auditor, identity=self.identity,
                                        study_ids=self.study_ids)
        #: DUO as XCA Initiating Gateway for retrieval (ITI-39, RAD-75): transfers from communities.
        self.retrievers = {
            c.home_community_id: CommunityRetriever(c, signer=self.communities[c.home_community_id].signer,
                                                    metrics=self.metrics, auditor=self.auditor,
                                                    identity=self.identity,
                                                    spool_dir=self.spool_dir / "rad75")
            for c in config.xca_communities}
        self.transfers: TransferService | None = None
        if config.transfers.enabled:
            self.transfers = TransferService(
                config, store=TransferStore.open(config.storage.url, config.storage.path),
                study_ids=self.study_ids, gate=self.consent, sources=self.sources, retrievers=self.retrievers,
                metrics=TransferMetrics(self.metrics.registry), auditor=self.auditor, identity=self.identity)
        #: Remote studies shown to a viewer over DICOMweb before import (duo_gateway.views).
        self.views: ViewService | None = None
        if config.views.enabled:
            self.views = ViewService(
                config.views, study_ids=self.study_ids,
                sources=StudySources(config, gate=self.consent, sources=self.sources,
                                     retrievers=self.retrievers),
                root=config.storage.path / "views", auditor=self.auditor, identity=self.identity)
            self._front_doors.append(DicomWebDoor(self.views, config.views))
        if config.timeline.enabled:
            self._front_doors.append(TlbApiDoor(self.timeline, config.timeline, transfers=self.transfers,
                                                views=self.views,
                                                identity=AssertionIdentity.from_config(config)))
        self.index: DocumentIndex | None = None
        self._extra_probes = list(extra_probes)
        self._runner: web.AppRunner | None = None
        self._ops_runner: web.AppRunner | None = None
        self._site: web.TCPSite | None = None
        self._dicom_server: UlServer | None = None
        self.app: web.Application | None = None

    def _consent_changed(self, bsn: str, holder_ura: str) -> None:
        """A Mitz notification: cached decisions go, and so does every view it concerns."""
        self.mitz.consent_changed(bsn, holder_ura)
        if self.views is not None:
            self.views.consent_changed(bsn, holder_ura)

    # -- lifecycle -----------------------------------------------------------------------------
    async def start(self) -> None:
        cfg = self.config
        cfg.storage.path.mkdir(parents=True, exist_ok=True)
        await self.auditor.start()
        self._audit_activity(started=True)
        await self.subscriptions.start()
        await asyncio.to_thread(self._clear_spool)
        self.index = await DocumentIndex.open(cfg.storage.path)
        if cfg.xca_responding.enabled:
            if not cfg.clients.xca:
                log.error("xca responding gateway has no XCA peers: every request will be refused",
                          hint="add [[clients.xca]] entries with their issuer and signing_certs")
            service = RespondingGateway(cfg, sources=self.sources, gate=self.consent, index=self.index,
                                        auditor=self.auditor, identity=self.identity,
                                        spool_dir=self.spool_dir, metrics=self.metrics)
            self._responding = service
            self._front_doors.append(XcaRespondingDoor(cfg, service))
        if self.transfers is not None:
            await self.transfers.open()
        if self.views is not None:
            await self.views.start()
        self.app = build_app(
            self.metrics,
            lambda: build_probes(cfg, self._extra_probes),
            cfg.daemon.readiness_timeout_s,
            self._front_doors,
            clients=self.clients,
            max_request_bytes=cfg.listeners.http.max_request_bytes,
            local_checks=self._local_checks,
            ops_routes=cfg.listeners.ops is None,
        )
        # access_log=None: the correlate middleware writes the access line, with request id and caller.
        self._runner = web.AppRunner(self.app, shutdown_timeout=cfg.daemon.shutdown_grace_s, access_log=None)
        await self._runner.setup()
        http = cfg.listeners.http
        ssl_ctx = server_context(http.tls) if http.tls else None
        # HeaderTimeoutSite: connections that never finish their request headers (or TLS handshake) close.
        self._site = HeaderTimeoutSite(self._runner, http.host, http.port, ssl_context=ssl_ctx,
                                       header_timeout_s=http.header_timeout_s)
        await self._site.start()
        if cfg.listeners.ops is not None:
            ops_app = build_ops_app(self.metrics, lambda: build_probes(cfg, self._extra_probes),
                                    cfg.daemon.readiness_timeout_s, self._local_checks)
            self._ops_runner = web.AppRunner(ops_app, shutdown_timeout=1.0)
            await self._ops_runner.setup()
            await HeaderTimeoutSite(self._ops_runner, cfg.listeners.ops.host, cfg.listeners.ops.port,
                                    header_timeout_s=http.header_timeout_s).start()
        await self._start_dicom()
        if self.transfers is not None:
            # After DUO's AE is up: a resumed job may C-MOVE to it at once.
            (self.spool_dir / "rad75").mkdir(parents=True, exist_ok=True)
            await self.transfers.start()
        self._sync_task = asyncio.create_task(self.subscriptions.run(self._sync_stop))
        log.info("gateway started", http=self.http_url, dicom_port=self.dicom_port,
                 home_community_id=cfg.gateway.home_community_id,
                 hospitals=len(cfg.tlb_hospitals), communities=len(cfg.xca_communities))

    async def stop(self) -> None:
        """Stop accepting, let in-flight requests finish up to the grace period, then close."""
        log.info("gateway stopping", grace_s=self.config.daemon.shutdown_grace_s)
        # HTTP stops first (aiohttp's cleanup waits for in-flight handlers), then transfers, then DICOM.
        if self.transfers is not None:
            self.transfers.end_watches()  # open event streams end now instead of holding the shutdown
        await self._stop_http()
        if self.views is not None:
            await self.views.stop()
        if self.transfers is not None:
            # Jobs stop where they are and go back to the queue, to resume here or on another replica.
            await self.transfers.stop(timeout_s=self.config.daemon.shutdown_grace_s)
        await self._stop_dicom()
        if self._responding is not None:
            await asyncio.to_thread(self._responding.close)
        self._sync_stop.set()
        if self._sync_task is not None:
            try:
                await asyncio.wait_for(self._sync_task, timeout=min(5.0, self.config.daemon.shutdown_grace_s))
            except TimeoutError:
                log.warning("subscription sync did not stop in time; cancelled")
            self._sync_task = None
        await self.subscriptions.close()
        for community in self.communities.values():
            await community.close()
        for retriever in self.retrievers.values():
            await retriever.close()
        await self.mitz.close()
        if self.index is not None:
            await self.index.close()
        self._audit_activity(started=False)
        await self.auditor.stop(timeout=min(5.0, self.config.daemon.shutdown_grace_s))
        log.info("gateway stopped")

    def _clear_spool(self) -> None:
        """Nothing is in flight before start, so whatever the spool holds was left by a process that
        died mid-transfer: patient data with no owner. It goes before anything new is fetched. (The
        spool is this instance's own: storage.path is never shared between replicas.)"""
        removed = 0
        if self.spool_dir.exists():
            for entry in self.spool_dir.iterdir():
                if entry.is_dir() and not entry.is_symlink():
                    removed += sum(1 for p in entry.rglob("*") if p.is_file())
                    shutil.rmtree(entry, ignore_errors=True)
                else:
                    entry.unlink(missing_ok=True)
                    removed += 1
        self.spool_dir.mkdir(parents=True, exist_ok=True)
        if removed:
            log.warning("spool_cleared_at_start", files=removed)

    # -- endpoints -----------------------------------------------------------------------------
    @property
    def http_port(self) -> int:
        assert self._runner is not None, "gateway not started"
        for addr in self._runner.addresses:
            return int(addr[1])
        raise RuntimeError("HTTP listener has no address")

    @property
    def http_url(self) -> str:
        scheme = "https" if self.config.listeners.http.tls else "http"
        return f"{scheme}://{self.config.listeners.http.host}:{self.http_port}"

    @property
    def ops_url(self) -> str | None:
        if self._ops_runner is None or self.config.listeners.ops is None:
            return None
        port = int(self._ops_runner.addresses[0][1])
        return f"http://{self.config.listeners.ops.host}:{port}"

    @property
    def dicom_port(self) -> int:
        assert self._dicom_server is not None, "gateway not started"
        return self._dicom_server.port

    # -- internals -----------------------------------------------------------------------------
    async def _start_dicom(self) -> None:
        """DUO's own AE: C-ECHO, and C-STORE for instances PACSes send because DUO asked (C-MOVE).

        Unsolicited C-STOREs are refused by the router: DUO is not an archive anyone may push to.
        It runs on the event loop (:mod:`duo_gateway.dicom.ul`): each received dataset goes from the
        socket into its spool file PDV by PDV, with no pynetdicom thread on the bulk path.
        """
        listener = self.config.listeners.dicom
        install_tcp_nodelay(listener.tcp_nodelay)
        policy = AcceptorPolicy(listener.ae_title, {**verification_supported(), **receiving_syntaxes()},
                                max_associations=listener.max_associations,
                                max_pdu=listener.max_pdu_length, send_pdu=listener.max_pdu_length,
                                timeouts=Timeouts(acse_s=listener.timeout_s, dimse_s=listener.idle_timeout_s,
                                                  network_s=listener.timeout_s))
        ssl_ctx = server_context(listener.tls) if listener.tls else None
        server = UlServer(policy, self.move_router.ul_store, ssl_context=ssl_ctx)
        await server.start(listener.host, listener.port)
        self._dicom_server = server

    def _audit_activity(self, *, started: bool) -> None:
        self.auditor.record(application_activity(started=started, application=self.identity,
                                                 audit_source=self.auditor.audit_source))

    async def _stop_dicom(self) -> None:
        if self._dicom_server is not None:
            server, self._dicom_server = self._dicom_server, None
            await server.close()

    async def _stop_http(self) -> None:
        runners = [r for r in (self._runner, self._ops_runner) if r is not None]
        self._runner = self._ops_runner = None
        await asyncio.gather(*(r.cleanup() for r in runners))

    def _local_checks(self) -> list[dict[str, Any]]:
        audit = self.auditor.health()
        return [{"peer": "audit", "kind": "audit", "essential": True, "ok": bool(audit.get("ok", True)),
                 "detail": audit, "elapsed_ms": 0.0}]


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT, so the caller can shut down in order instead of dying."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop


def settle_heap() -> None:
    """Collect once, then freeze what survived start-up, so the garbage collector stops rescanning it.

    Why: after start the heap holds ~110k tracked objects that live as long as the process
    (pynetdicom's presentation contexts, the pydantic config, the SOAP and audit machinery). Each
    full (generation 2) collection walks all of them, ~50 ms during which the event loop stands
    still; under ``bench.timeline`` about one timeline in ten paid that. Frozen objects are never
    collected, so only a process that runs one gateway for its whole life calls this (``serve``, the
    benchmark's DUO process), never a test suite starting many gateways in one interpreter.
    """
    gc.collect()
    gc.freeze()


async def serve(config: DuoConfig) -> int:
    """Run until SIGTERM/SIGINT, then shut down gracefully; exit code 0 on a clean stop."""
    try:
        gateway = Gateway(config)
    except AccessConfigError as exc:
        log.error("refusing to start", problems=str(exc))
        return 2
    stop = stop_on_signals()
    try:
        await gateway.start()
    except OSError as exc:
        log.error("cannot start listeners", error=str(exc))
        await gateway.stop()
        return 1
    settle_heap()
    await stop.wait()
    await gateway.stop()
    return 0


def free_port(host: str = "127.0.0.1") -> int:
    """A port that was free a moment ago; only for tests and the demo's --base-port-less mode."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])
