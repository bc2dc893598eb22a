"""DUO's DICOM client side against Orthanc, an independently written PACS, loaded by DCMTK storescu."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from pydicom.dataset import Dataset

from duo_gateway.daemon import Gateway, free_port
from duo_gateway.dicom.echo import c_echo
from duo_gateway.dicom.qr import AssociationRejected, QrClient
from duo_gateway.sim.config import default_network
from duo_gateway.sim.studies import GeneratedStudy, generate_studies, write_study
from tests.support.gateway import make_config
from tests.support.orthanc import Orthanc, load_with_storescu, run_orthanc

NET = default_network()


Loaded = tuple[Orthanc, list[GeneratedStudy]]


@pytest.fixture
def loaded_orthanc(tmp_path: Path) -> Iterator[Loaded]:
    studies = generate_studies(NET.patients[0], NET.hospitals[0], 2, NET.seed)
    files = [str(p) for s in studies for p in write_study(s, tmp_path / "send" / s.study_instance_uid)]
    with run_orthanc(tmp_path / "orthanc") as orthanc:
        load_with_storescu(orthanc, files)
        yield orthanc, studies


async def test_c_find_and_c_echo_against_orthanc(loaded_orthanc: Loaded) -> None:
    orthanc, studies = loaded_orthanc
    assert (await c_echo("DUO_GATEWAY", orthanc.host, orthanc.dicom_port, orthanc.ae_title, 5)).ok
    query = Dataset()
    query.QueryRetrieveLevel = "STUDY"
    query.PatientID = NET.patients[0].bsn
    query.StudyInstanceUID = ""
    query.NumberOfStudyRelatedInstances = ""
    found = await QrClient("DUO_GATEWAY", orthanc.host, orthanc.dicom_port, orthanc.ae_title).find_all(query)
    assert sorted(str(d.StudyInstanceUID) for d in found) == sorted(s.study_instance_uid for s in studies)
    counts = {str(d.StudyInstanceUID): int(d.NumberOfStudyRelatedInstances) for d in found}
    assert counts == {s.study_instance_uid: len(s.instances) for s in studies}
    # a wrong called AE title is refused by Orthanc (DicomCheckCalledAet): reported, not raised raw
    assert not (await c_echo("DUO_GATEWAY", orthanc.host, orthanc.dicom_port, "NOT_ORTHANC", 5)).ok
    with pytest.raises(AssociationRejected):
        await QrClient("DUO_GATEWAY", orthanc.host, orthanc.dicom_port, "NOT_ORTHANC").find_all(query)


async def test_readiness_probes_orthanc_as_a_tlb_hospital(loaded_orthanc: Loaded, tmp_path: Path) -> None:
    orthanc, _ = loaded_orthanc
    hospital = {"ura": "00010001", "name": "Orthanc hospital", "ae_title": orthanc.ae_title,
                "host": orthanc.host, "port": orthanc.dicom_port,
                "repository_unique_id": "2.16.528.1.1007.99.10001.1"}
    gw = Gateway(make_config(tmp_path, mitz_port=free_port(), hospitals=[hospital]))
    await gw.start()
    try:
        async with aiohttp.ClientSession() as s, s.get(f"{gw.http_url}/readyz") as r:
            body = await r.json()
    finally:
        await gw.stop()
    check = next(c for c in body["checks"] if c["peer"] == "tlb:00010001")
    assert check == {**check, "ok": True, "kind": "dicom", "detail": "C-ECHO success"}
