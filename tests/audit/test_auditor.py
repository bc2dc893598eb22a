"""The Auditor against a real syslog-over-TLS receiver on loopback: durability, order, outages, mTLS."""

from __future__ import annotations

import asyncio
import os
import ssl
import stat
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest
from lxml import etree

from duo_gateway.audit import Auditor
from duo_gateway.audit.messages import AuditMessage, AuditSourceIdentification, Peer, iti38_query, to_xml
from duo_gateway.audit.sink import parse_file_records
from duo_gateway.audit.syslog import FrameDecoder, parse_message
from duo_gateway.bsn import bsn_cx
from duo_gateway.config.audit import AuditConfig, SyslogConfig
from duo_gateway.config.tls import ClientTls, ServerTls
from duo_gateway.tls import server_context
from tests.support.pki import Pki

SOURCE = AuditSourceIdentification("duo-test", "DUO")


def message(i: int) -> AuditMessage:
    return iti38_query(initiating=Peer("ig", host="127.0.0.1", alternative_user_id="1"),
                       responding=Peer("rg"), audit_source=SOURCE, query_id=f"q-{i:04d}",
                       query_request=b"<q/>", patient_id=bsn_cx("999911120"),
                       when=datetime(2024, 5, 1, tzinfo=UTC))


def ids(n: int, start: int = 0) -> list[str]:
    return [f"q-{i:04d}" for i in range(start, start + n)]


def query_id(syslog_message: bytes) -> str:
    root = etree.fromstring(parse_message(syslog_message).msg)
    value = root.xpath("string(ParticipantObjectIdentification[@ParticipantObjectTypeCodeRole='24']"
                       "/@ParticipantObjectID)")
    assert isinstance(value, str)
    return value


async def eventually(predicate: Callable[[], bool], what: str, within: float = 2.0) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


class SyslogReceiver:
    """An Audit Record Repository stand-in: reads octet-counted frames from every connection.

    ``abort_after`` makes it crash after that many frames, dropping whatever else it had buffered,
    which is what a repository going down mid-stream does to records in flight.
    """

    def __init__(self, ctx: ssl.SSLContext | None, port: int = 0, abort_after: int | None = None) -> None:
        self._ctx = ctx
        self.port = port
        self._abort_after = abort_after
        self.received: list[bytes] = []
        self.peer_cns: list[str] = []
        self.aborted = asyncio.Event()
        self._writers: set[asyncio.StreamWriter] = set()
        self._server: asyncio.Server | None = None

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", self.port, ssl=self._ctx)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._writers.add(writer)
        cert = writer.get_extra_info("peercert")
        if cert:
            self.peer_cns += [v for rdn in cert["subject"] for k, v in rdn if k == "commonName"]
        decoder = FrameDecoder()
        try:
            while data := await reader.read(65536):
                for frame in decoder.feed(data):
                    if self._abort_after is not None and len(self.received) >= self._abort_after:
                        writer.transport.abort()
                        self.aborted.set()
                        return
                    self.received.append(frame)
        except OSError:
            pass
        finally:
            self._writers.discard(writer)
            writer.close()

    async def close(self) -> None:
        """Go down hard: stop listening and drop every connection (idempotent, for ``finally``)."""
        server, self._server = self._server, None
        if server is None:
            return
        server.close()
        for writer in list(self._writers):
            writer.transport.abort()
        await server.wait_closed()


async def closed_port() -> int:
    """A loopback port nobody listens on (bound once by the kernel, then released)."""
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port: int = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    return port


@pytest.fixture
def server_tls(pki: Pki) -> ssl.SSLContext:
    return server_context(ServerTls(cert_file=pki.server.cert, key_file=pki.server.key, ca_file=pki.ca_cert,
                                    client_auth="required"))


@pytest.fixture
def client_tls(pki: Pki) -> ClientTls:
    return ClientTls(ca_file=pki.ca_cert, cert_file=pki.client.cert, key_file=pki.client.key)


def syslog_config(port: int, tls: ClientTls | None) -> AuditConfig:
    return AuditConfig(syslog=SyslogConfig(host="127.0.0.1", port=port, tls=tls, reconnect_initial_s=0.02,
                                           reconnect_max_s=0.1, connect_timeout_s=1.0, confirm_grace_s=0.1))


def outbox(tmp_path: Path) -> list[str]:
    return sorted(os.listdir(tmp_path / "audit" / "queue"))


def file_records(tmp_path: Path) -> list[bytes]:
    parsed = parse_file_records((tmp_path / "audit" / "audit.log").read_bytes())
    assert parsed.damaged == 0
    return parsed.records


# --- local file --------------------------------------------------------------------------------------


async def test_file_sink_appends_across_restarts(tmp_path: Path) -> None:
    first = Auditor(AuditConfig(), storage_dir=tmp_path, hostname="gw1")
    await first.start()
    for i in range(3):
        first.record(message(i))
    await first.stop(2.0)
    assert first.health()["file_written"] == 3

    second = Auditor(AuditConfig(), storage_dir=tmp_path, hostname="gw1")
    await second.start()
    for i in range(3, 5):
        second.record(message(i))
    await second.stop(2.0)

    records = [parse_message(r) for r in file_records(tmp_path)]
    assert [r.msg for r in records] == [to_xml(message(i)) for i in range(5)]
    assert {(r.pri, r.hostname, r.app_name, r.procid, r.msgid) for r in records} == {
        (85, "gw1", "duo-gateway", str(os.getpid()), "IHE+RFC-3881")}
    # The trail holds BSNs: only the gateway's own user may read it.
    assert stat.S_IMODE((tmp_path / "audit" / "audit.log").stat().st_mode) == 0o600


async def test_torn_record_from_a_crash_is_isolated(tmp_path: Path) -> None:
    first = Auditor(AuditConfig(), storage_dir=tmp_path)
    await first.start()
    first.record(message(0))
    await first.stop(2.0)
    with (tmp_path / "audit" / "audit.log").open("ab") as f:
        f.write(b"900 <85>1 2024-05-01T00:00:00.000Z torn")  # what a crash mid-write leaves

    second = Auditor(AuditConfig(), storage_dir=tmp_path)
    await second.start()
    second.record(message(1))
    await second.stop(2.0)

    parsed = parse_file_records((tmp_path / "audit" / "audit.log").read_bytes())
    assert parsed.damaged == 1
    assert [query_id(r) for r in parsed.records] == ids(2)


async def test_stop_flushes_everything_and_later_records_are_counted_as_dropped(tmp_path: Path) -> None:
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path)
    await auditor.start()
    assert auditor.health()["ok"] is True
    for i in range(300):
        auditor.record(message(i))
    await auditor.stop(2.0)
    assert [query_id(r) for r in file_records(tmp_path)] == ids(300)

    auditor.record(message(300))
    health = auditor.health()
    assert (health["dropped"], health["ok"]) == (1, False)


async def test_a_burst_is_written_as_one_batch_after_the_linger(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path, linger_s=1.0)
    batches: list[int] = []
    persist = auditor._persist

    def counting(items: Sequence[tuple[AuditMessage, datetime]]) -> list[Path]:
        batches.append(len(items))
        return persist(items)

    monkeypatch.setattr(auditor, "_persist", counting)
    await auditor.start()
    for i in range(50):
        auditor.record(message(i))
        await asyncio.sleep(0.001)  # a timeline's answers arrive one by one
    assert auditor.health()["file_written"] == 0  # still lingering
    await eventually(lambda: auditor.health()["file_written"] == 50, "the burst on disk", within=5.0)
    assert batches == [50]
    await auditor.stop(2.0)
    assert [query_id(r) for r in file_records(tmp_path)] == ids(50)


async def test_stop_does_not_wait_for_the_linger(tmp_path: Path) -> None:
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path, linger_s=30.0)
    await auditor.start()
    auditor.record(message(0))
    await asyncio.sleep(0.01)
    started = time.monotonic()
    await auditor.stop(5.0)
    assert time.monotonic() - started < 2.0
    assert [query_id(r) for r in file_records(tmp_path)] == ids(1)


async def test_record_from_a_worker_thread(tmp_path: Path) -> None:
    """pynetdicom calls its handlers in threads; their records must arrive like any other."""
    auditor = Auditor(AuditConfig(), storage_dir=tmp_path)
    await auditor.start()
    def from_thread() -> None:
        for i in range(3):
            auditor.record(message(i))

    await asyncio.to_thread(from_thread)
    await eventually(lambda: auditor.health()["file_written"] == 3, "records from a thread")
    await auditor.stop(2.0)
    assert [query_id(r) for r in file_records(tmp_path)] == ids(3)


# --- syslog over TLS ---------------------------------------------------------------------------------


async def test_peer_down_at_start_records_wait_on_disk_then_arrive_in_order(
        tmp_path: Path, server_tls: ssl.SSLContext, client_tls: ClientTls) -> None:
    port = await closed_port()
    auditor = Auditor(syslog_config(port, client_tls), storage_dir=tmp_path)
    await auditor.start()

    started = time.perf_counter()
    for i in range(20):
        auditor.record(message(i))
    assert time.perf_counter() - started < 0.05  # record() only enqueues, whatever the peer does

    await eventually(lambda: len(outbox(tmp_path)) == 20, "records in the outbox")
    await eventually(lambda: auditor.health()["syslog_last_error"] is not None, "a failed connect")
    health = auditor.health()
    assert (health["syslog_queued"], health["syslog_sent"], health["syslog_connected"]) == (20, 0, False)
    assert "ConnectionRefused" in str(health["syslog_last_error"])

    receiver = SyslogReceiver(server_tls, port=port)
    await receiver.start()
    try:
        await eventually(lambda: auditor.health()["syslog_queued"] == 0 and not outbox(tmp_path),
                         "delivery after the peer came up")
        assert [query_id(m) for m in receiver.received] == ids(20)
        assert receiver.received == file_records(tmp_path)  # the same bytes as the local trail
        assert outbox(tmp_path) == []
        assert auditor.health()["syslog_sent"] == 20
    finally:
        await auditor.stop(1.0)
        await receiver.close()


async def test_peer_crash_mid_stream_loses_nothing(
        tmp_path: Path, server_tls: ssl.SSLContext, client_tls: ClientTls) -> None:
    first = SyslogReceiver(server_tls, abort_after=5)
    port = await first.start()
    auditor = Auditor(syslog_config(port, client_tls), storage_dir=tmp_path)
    await auditor.start()
    second = SyslogReceiver(server_tls, port=port)
    try:
        for i in range(10):
            auditor.record(message(i))
        await asyncio.wait_for(first.aborted.wait(), 2.0)
        await first.close()
        for i in range(10, 20):
            auditor.record(message(i))
        await eventually(lambda: len(outbox(tmp_path)) == 20, "all records in the outbox while down")
        assert auditor.health()["syslog_sent"] == 0  # the crash came inside the confirmation window

        await second.start()
        await eventually(lambda: auditor.health()["syslog_queued"] == 0 and not outbox(tmp_path),
                         "delivery after the restart")
    finally:
        await auditor.stop(1.0)
        await first.close()
        await second.close()

    got = [query_id(m) for m in first.received + second.received]
    assert first.received and len(first.received) == 5
    # No loss, order kept; records the crashed peer may or may not have stored come again (at-least-once).
    assert list(dict.fromkeys(got)) == ids(20)
    assert [query_id(m) for m in second.received] == ids(20)
    assert max(got.count(x) for x in ids(20)) == 2


async def test_restart_sends_leftover_outbox_before_new_records(
        tmp_path: Path, server_tls: ssl.SSLContext, client_tls: ClientTls) -> None:
    port = await closed_port()
    first = Auditor(syslog_config(port, client_tls), storage_dir=tmp_path)
    await first.start()
    for i in range(5):
        first.record(message(i))
    await eventually(lambda: len(outbox(tmp_path)) == 5, "outbox")
    started = time.monotonic()
    await first.stop(1.0)
    assert time.monotonic() - started < 0.5  # an unreachable peer does not hold up shutdown
    assert len(outbox(tmp_path)) == 5

    receiver = SyslogReceiver(server_tls, port=port)
    await receiver.start()
    second = Auditor(syslog_config(port, client_tls), storage_dir=tmp_path)
    try:
        await second.start()
        for i in range(5, 8):
            second.record(message(i))
        await eventually(lambda: second.health()["syslog_sent"] == 8 and not outbox(tmp_path),
                         "leftovers and new records")
        assert [query_id(m) for m in receiver.received] == ids(8)
        assert outbox(tmp_path) == []
    finally:
        await second.stop(1.0)
        await receiver.close()


async def test_mtls_presents_the_client_certificate(
        tmp_path: Path, server_tls: ssl.SSLContext, client_tls: ClientTls) -> None:
    receiver = SyslogReceiver(server_tls)
    auditor = Auditor(syslog_config(await receiver.start(), client_tls), storage_dir=tmp_path)
    await auditor.start()
    try:
        auditor.record(message(0))
        await eventually(lambda: auditor.health()["syslog_sent"] == 1, "delivery")
        assert receiver.peer_cns == ["client"]
        assert [query_id(m) for m in receiver.received] == ids(1)
    finally:
        await auditor.stop(1.0)
        await receiver.close()


@pytest.mark.parametrize("certificate", ["none", "rogue"])
async def test_repository_refusing_the_client_keeps_records_queued(
        tmp_path: Path, pki: Pki, server_tls: ssl.SSLContext, certificate: str) -> None:
    tls = ClientTls(ca_file=pki.ca_cert) if certificate == "none" else ClientTls(
        ca_file=pki.ca_cert, cert_file=pki.rogue_client.cert, key_file=pki.rogue_client.key)
    receiver = SyslogReceiver(server_tls)
    auditor = Auditor(syslog_config(await receiver.start(), tls), storage_dir=tmp_path)
    await auditor.start()
    try:
        for i in range(3):
            auditor.record(message(i))
        await eventually(lambda: auditor.health()["syslog_last_error"] is not None, "the refusal")
        await asyncio.sleep(0.3)  # several reconnect attempts and grace periods
        health = auditor.health()
        assert (health["syslog_queued"], health["syslog_sent"]) == (3, 0)
        assert receiver.received == []
        assert len(outbox(tmp_path)) == 3
        started = time.monotonic()
        await auditor.stop(2.0)
        assert time.monotonic() - started < 1.0  # a refusing peer does not hold up shutdown
        assert len(outbox(tmp_path)) == 3
    finally:
        await auditor.stop(0.5)
        await receiver.close()


async def test_plain_tcp_for_development(tmp_path: Path) -> None:
    receiver = SyslogReceiver(None)
    auditor = Auditor(syslog_config(await receiver.start(), None), storage_dir=tmp_path)
    await auditor.start()
    try:
        auditor.record(message(0))
        await eventually(lambda: auditor.health()["syslog_sent"] == 1, "delivery over TCP")
        assert [query_id(m) for m in receiver.received] == ids(1)
    finally:
        await auditor.stop(1.0)
        await receiver.close()
