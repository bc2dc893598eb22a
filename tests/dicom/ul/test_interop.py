"""The asyncio Upper Layer against DCMTK, an independent implementation: storescu and echoscu into
DUO's acceptor (through the real MoveRouter and Spool), DUO's requestor into storescp at a small PDU.

Orthanc, TLS and pynetdicom peers are covered where the UL is used: tests/dicom/test_store_scu.py
(StoreClient into Orthanc, storescp, pynetdicom SCPs, TLS), tests/dicom/test_qr.py (C-GET from
SimPacs and Orthanc), tests/http/test_daemon.py (the daemon's acceptor over mTLS).
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.uid import generate_uid

from duo_gateway.dicom.qr import MoveRouter, Spool, SpooledInstance, receiving_syntaxes
from duo_gateway.dicom.store_scu import _dataset_offset
from duo_gateway.dicom.ul import pdu
from duo_gateway.dicom.ul.association import AcceptorPolicy, UlServer, connect, verification_supported
from duo_gateway.dicom.ul.dimse import c_store_rq
from tests.support.dcmtk import require_tool
from tests.support.dicom_files import sample
from tests.support.storescp import run_storescp

HOST = "127.0.0.1"


def copies(n: int, out: Path) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for _ in range(n):
        ds = dcmread(sample("CT_small.dcm"))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        path = out / f"{ds.SOPInstanceUID}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


@pytest.fixture
async def acceptor() -> AsyncIterator[tuple[UlServer, MoveRouter]]:
    router = MoveRouter()
    supported = {**verification_supported(), **receiving_syntaxes()}
    server = UlServer(AcceptorPolicy("DUO", supported), router.ul_store)
    await server.start(HOST, 0)
    try:
        yield server, router
    finally:
        await server.close()


async def run(*args: str) -> tuple[int, str]:
    proc = await asyncio.create_subprocess_exec(*args, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT,
                                                env={**os.environ, "TCP_NODELAY": "1"})
    out, _ = await proc.communicate()
    return int(proc.returncode or 0), out.decode(errors="replace")


async def test_storescu_into_the_spool_with_a_window_and_an_unsolicited_instance(
        acceptor: tuple[UlServer, MoveRouter], tmp_path: Path) -> None:
    server, router = acceptor
    storescu = require_tool("storescu")
    files = copies(5, tmp_path / "in")
    stranger = copies(1, tmp_path / "other")[0]
    spool_dir = tmp_path / "spool"
    spool = Spool(spool_dir, window=2, store_wait_s=10)
    expected = {f.stem for f in files}
    msg_id = router.register(spool, expected)
    got: list[SpooledInstance] = []
    (tmp_path / "consumed").mkdir()
    most_on_disk = 0

    async def consume() -> None:
        nonlocal most_on_disk
        while len(got) < len(files):
            item = await spool._next(20)
            assert isinstance(item, SpooledInstance)
            most_on_disk = max(most_on_disk, len([p for p in spool_dir.iterdir() if p.suffix == ".dcm"]))
            spool._handed_over(item)
            got.append(item)
            await asyncio.sleep(0.1)  # a slow consumer: the sender must wait for the window
            item.path.rename(tmp_path / "consumed" / item.path.name)  # the consumer owns it, takes it away
            spool._consumed()

    consumer = asyncio.create_task(consume())
    rc, out = await run(storescu, "-aec", "DUO", "-aet", "PACS", HOST, str(server.port), *map(str, files))
    assert rc == 0, out
    await asyncio.wait_for(consumer, 30)
    assert most_on_disk <= 2  # the window held, with the sender waiting for our answers
    assert sorted(i.sop_instance_uid for i in got) == sorted(expected)
    for item in got:
        original = dcmread(tmp_path / "in" / f"{item.sop_instance_uid}.dcm")
        received = dcmread(tmp_path / "consumed" / item.path.name)
        syntax = original.file_meta.TransferSyntaxUID
        assert received.file_meta.TransferSyntaxUID == item.transfer_syntax_uid == syntax
        assert received.file_meta.SourceApplicationEntityTitle == "PACS"
        # every element, pixel data included (storescu drops the file's trailing padding on the wire)
        assert list(received) == [e for e in original if e.tag != 0xFFFCFFFC]
    # an instance nobody asked for is refused (0x0124) and never lands in the spool
    rc, out = await run(storescu, "-v", "-aec", "DUO", HOST, str(server.port), str(stranger))
    assert "Received Store Response (Unknown Status: 0x124)" in out, out
    assert not [p for p in spool_dir.iterdir() if stranger.stem in p.name]
    router.unregister(msg_id)
    await spool.close()
    assert not [p for p in spool_dir.iterdir() if p.name.startswith(".part-")]


async def test_echoscu_and_a_wrong_called_ae(acceptor: tuple[UlServer, MoveRouter]) -> None:
    server, _ = acceptor
    echoscu = require_tool("echoscu")
    rc, out = await run(echoscu, "-aec", "DUO", HOST, str(server.port))
    assert rc == 0, out
    rc, out = await run(echoscu, "-aec", "SOMEONE", HOST, str(server.port))
    assert rc != 0 and "Called AE Title Not Recognized" in out, out


async def test_requestor_into_storescp_in_pdus_of_its_maximum(tmp_path: Path) -> None:
    files = copies(2, tmp_path / "in")
    header = dcmread(files[0], stop_before_pixels=True)
    ts = str(header.file_meta.TransferSyntaxUID)
    with run_storescp(tmp_path / "scp", ae_title="DEST", options=["--max-pdu", "4096"]) as scp:
        assoc = await connect(scp.host, scp.port, calling_ae="DUO", called_ae="DEST",
                              contexts=[pdu.PresentationContextRQ(1, str(header.SOPClassUID), (ts,))])
        assert assoc.peer_max_pdu == 4096 and assoc.accepted[1].transfer_syntax == ts
        for path in files:
            uid = path.stem
            command = c_store_rq(assoc.next_message_id(), str(header.SOPClassUID), uid)
            rsp = await assoc.send_c_store_file(1, command, path, _dataset_offset(path))
            assert rsp.status == 0 and rsp.affected_sop_instance_uid == uid
        await assoc.release()
        assert assoc.closed
        assert sorted(scp.received()) == sorted(p.stem for p in files)
    stored = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, scp.directory.iterdir())}
    for path in files:
        assert stored[path.stem].PixelData == dcmread(path).PixelData
