"""RAD-75 with retrieve_method = "c-move": the PACS pushes to DUO's own AE, which routes each C-STORE
back to the request that caused it and refuses anything unsolicited."""

from __future__ import annotations

import asyncio
import os
import subprocess
from io import BytesIO
from pathlib import Path

import numpy
from pydicom import dcmread
from pydicom.uid import JPEG2000Lossless

from duo_gateway.xca.codes import ResponseStatus
from duo_gateway.xca.retrieve import RetrieveImagingDocumentSetRequest
from tests.support.dcmtk import require_tool
from tests.xca.responding_harness import running_network
from tests.xca.test_responding import (
    ALL,
    EXPLICIT_VR_LITTLE_ENDIAN,
    H1,
    rad75,
    repo,
    stored_files,
    studies_of,
    study_request,
)


async def test_rad75_through_c_move(tmp_path: Path, wsdl_dir: Path) -> None:
    async with running_network(tmp_path, xca_responding={"retrieve_method": "c-move"}) as duo:
        gw = duo.gateway
        for pacs in duo.pacs:
            pacs.add_move_destination(gw.config.listeners.dicom.ae_title, "127.0.0.1", gw.dicom_port)
        study = studies_of(duo, H1, ALL)[0]
        stored = stored_files(duo, H1, study.study_instance_uid)
        request = study_request(study, repo(duo, H1), images_only=False)
        _, resp = await rad75(
            duo, RetrieveImagingDocumentSetRequest((request,), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir
        )
        assert resp.status == ResponseStatus.SUCCESS, resp.errors
        assert sorted(d.document_unique_id for d in resp.documents) == sorted(stored)
        assert all(
            isinstance(d.data, bytes) and dcmread_uid(d.data) == d.document_unique_id for d in resp.documents
        )

        # Nobody may push to DUO's AE outside a C-MOVE DUO asked for.
        storescu = require_tool("storescu")
        one = next(iter(stored.values()))
        path = tmp_path / "push.dcm"
        path.write_bytes(one)
        push = await asyncio.to_thread(
            subprocess.run,
            [
                storescu,
                "-v",
                "-aet",
                "INTRUDER",
                "-aec",
                gw.config.listeners.dicom.ae_title,
                "127.0.0.1",
                str(gw.dicom_port),
                str(path),
            ],
            capture_output=True,
            text=True,
            timeout=30,
            env={**os.environ, "TCP_NODELAY": "1"},
        )
        # 0x0124 Refused: Not Authorized (PS3.7 C.5), which DCMTK prints as an unknown C-STORE status.
        assert "Store Response (Unknown Status: 0x124)" in push.stderr, push.stdout + push.stderr


async def test_rad75_through_c_move_decompresses_what_was_not_asked_for(
        tmp_path: Path, wsdl_dir: Path) -> None:
    """A C-MOVE cannot negotiate: the PACS pushes its JPEG 2000 Lossless files as stored. Asked only for
    Explicit VR LE, DUO decompresses them (losslessly, in its decoder helper) instead of failing each."""
    async with running_network(tmp_path, xca_responding={"retrieve_method": "c-move"},
                               compressed=True) as duo:
        gw = duo.gateway
        for pacs in duo.pacs:
            pacs.add_move_destination(gw.config.listeners.dicom.ae_title, "127.0.0.1", gw.dicom_port)
        study = next(s for s in studies_of(duo, H1, ALL)
                     if str(s.instances[0].file_meta.TransferSyntaxUID) == JPEG2000Lossless)
        request = study_request(study, repo(duo, H1), images_only=True)
        _, resp = await rad75(
            duo, RetrieveImagingDocumentSetRequest((request,), (EXPLICIT_VR_LITTLE_ENDIAN,)), wsdl_dir
        )
        assert resp.status == ResponseStatus.SUCCESS, resp.errors
        held = {str(ds.SOPInstanceUID): ds for ds in study.instances}
        images = [uid for uid, ds in held.items() if "PixelData" in ds]
        assert sorted(d.document_unique_id for d in resp.documents) == sorted(images)
        for doc in resp.documents:
            assert isinstance(doc.data, bytes)
            got = dcmread(BytesIO(doc.data))
            assert got.file_meta.TransferSyntaxUID == EXPLICIT_VR_LITTLE_ENDIAN
            assert numpy.array_equal(got.pixel_array, held[doc.document_unique_id].pixel_array)


def dcmread_uid(data: bytes) -> str:
    return str(dcmread(BytesIO(data)).SOPInstanceUID)
