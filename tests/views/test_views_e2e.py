"""Views end to end: a study from a TLB hospital's Orthanc and one from an XCA community, shown through a
view's DICOMweb root to `dicomweb-client` (a DICOMweb client nobody here wrote).

Study ids come from DUO's own timeline, as the TLB app gets them; every instance a view serves is
compared with what the source holds: SOP Instance UID and pixel data. Consent, expiry, deletion and a
Mitz notification each close the view: its root then answers 404.
"""

from __future__ import annotations

import asyncio
import email
from collections.abc import Iterator
from datetime import UTC, datetime
from io import BytesIO
from typing import Any

import pytest
from dicomweb_client.api import DICOMwebClient
from PIL import Image
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.mitz.fhir import FHIR_JSON, ConsentStatement, Notification, build_notification
from duo_gateway.sim.behaviour import MitzMisbehaviour
from duo_gateway.sim.http import misbehaving
from tests.support.orthanc import Orthanc
from tests.transfer.harness import (
    ALL,
    REQUESTER,
    TLB,
    TransferNetwork,
    kos_instances,
    tlb_source,
    tlb_studies,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Orthanc]:
    with tlb_source(tmp_path_factory.mktemp("source")) as orthanc:
        yield orthanc


async def make_view(network: TransferNetwork, study_ids: list[str]) -> tuple[int, dict[str, Any]]:
    async with network.session.post(f"{network.api}/views",
                                    json={"studies": study_ids, "requester": REQUESTER}) as r:
        return r.status, await r.json()


async def status_of(url: str, network: TransferNetwork) -> int:
    async with network.session.get(url) as r:
        await r.read()
        return r.status


def assert_same(got: Dataset, original: Dataset) -> None:
    """The instance as the source holds it: pixel data byte for byte, and every other element."""
    assert str(got.SOPInstanceUID) == str(original.SOPInstanceUID)
    assert got.get("PixelData") == original.get("PixelData")
    # Values, not VRs: a generated file may leave Pixel Data's VR ambiguous ("OB or OW"), a PACS not.
    assert {e.tag: e.value for e in got} == {e.tag: e.value for e in original}


async def test_a_tlb_study_is_searched_and_retrieved_through_a_view(network: TransferNetwork) -> None:
    [(study_id, study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    uid = study["study_instance_uid"]
    assert [s["study_instance_uid"] for s in view["studies"]] == [uid]
    assert view["studies"][0]["source"] == f"tlb:{TLB.ura}"
    generated = next(s for s in tlb_studies() if s.study_instance_uid == uid)
    stored = {str(ds.SOPInstanceUID): ds for ds in generated.instances}
    client = DICOMwebClient(url=view["dicomweb"])

    studies = await asyncio.to_thread(client.search_for_studies)
    assert [s["0020000D"]["Value"][0] for s in studies] == [uid]
    assert studies[0]["00201208"]["Value"][0] == len(stored)  # NumberOfStudyRelatedInstances
    series = await asyncio.to_thread(client.search_for_series, uid)
    assert {s["0020000E"]["Value"][0] for s in series} == {
        str(ds.SeriesInstanceUID) for ds in stored.values()}

    got = await asyncio.to_thread(client.retrieve_study, uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(stored)
    for ds in got:
        assert_same(ds, stored[str(ds.SOPInstanceUID)])

    first = next(ds for ds in generated.instances if "PixelData" in ds)
    series_uid, sop_uid = str(first.SeriesInstanceUID), str(first.SOPInstanceUID)
    metadata = await asyncio.to_thread(client.retrieve_series_metadata, uid, series_uid)
    assert {m["00080018"]["Value"][0] for m in metadata} == {
        str(ds.SOPInstanceUID) for ds in generated.instances if str(ds.SeriesInstanceUID) == series_uid}
    assert all("BulkDataURI" in m["7FE00010"] for m in metadata)
    [frame] = await asyncio.to_thread(client.retrieve_instance_frames, uid, series_uid, sop_uid, [1])
    assert frame == first.PixelData
    jpeg = await asyncio.to_thread(client.retrieve_instance_rendered, uid, series_uid, sop_uid,
                                   media_types=("image/jpeg",))
    image = Image.open(BytesIO(jpeg))
    assert image.format == "JPEG" and image.size == (first.Columns, first.Rows)


async def test_an_xca_study_is_retrieved_through_a_view(network: TransferNetwork) -> None:
    studies = await network.study_ids(ALL.bsn, "xca:")
    study_id, study = studies[0]
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    uid = study["study_instance_uid"]
    wanted = kos_instances(network.community_sim, uid)
    client = DICOMwebClient(url=view["dicomweb"])
    got = await asyncio.to_thread(client.retrieve_study, uid)
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(wanted)
    for ds in got:
        original = network.community_sim.instance(uid, str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
        assert original is not None
        assert_same(ds, original)


async def test_no_permit_no_view_and_the_refusal_names_the_source(network: TransferNetwork) -> None:
    [(study_id, _study)] = await network.study_ids(ALL.bsn, "tlb:")
    with misbehaving(network.mitz.app, MitzMisbehaviour(force_decision="Deny")):
        status, problem = await make_view(network, [study_id])
    assert status == 403, problem
    assert problem["type"].endswith(":no-consent") and f"tlb:{TLB.ura}" in problem["detail"]


async def test_a_deleted_view_and_another_clients_request_answer_404(network: TransferNetwork) -> None:
    [(study_id, study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    studies_url = f"{view['dicomweb']}/studies"
    assert await status_of(studies_url, network) == 200
    guessed = view["dicomweb"][:-4] + ("aaaa" if not view["dicomweb"].endswith("aaaa") else "bbbb")
    assert await status_of(f"{guessed}/studies", network) == 404
    async with network.session.delete(f"{network.api}/views/{view['id']}") as r:
        assert r.status == 204
    assert await status_of(studies_url, network) == 404
    assert await status_of(f"{view['dicomweb']}/studies/{study['study_instance_uid']}/series", network) == 404
    async with network.session.delete(f"{network.api}/views/{view['id']}") as r:
        assert r.status == 404


async def test_a_mitz_notification_closes_the_patients_views(network: TransferNetwork) -> None:
    [(study_id, _study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    notification = build_notification(Notification(
        bsn=ALL.bsn, holder_ura=TLB.ura, holder_type="V6", date_time=datetime.now(UTC),
        statements=(ConsentStatement(provider_categories=("RPZAC104",), permit=False),)))
    notify = f"{network.gateway.http_url}{network.gateway.config.mitz.notify_path}"
    async with network.session.post(notify, json=notification, headers={"Content-Type": FHIR_JSON}) as r:
        assert r.status == 200, await r.text()
    assert await status_of(f"{view['dicomweb']}/studies", network) == 404


async def test_an_expired_view_answers_404(network: TransferNetwork) -> None:
    [(study_id, _study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    service = network.gateway.views
    assert service is not None
    opened = service.get(view["id"], "test-tlb")
    assert opened is not None
    opened.expires_at = 0  # the clock of this one view, moved past its end
    assert await status_of(f"{view['dicomweb']}/studies", network) == 404


async def test_a_retrieve_asked_in_another_syntax_is_converted_losslessly(network: TransferNetwork) -> None:
    """The source holds Explicit VR Little Endian; asked for Implicit, the view converts (dicom/convert's
    rule) and every value stays as stored."""
    [(study_id, study)] = await network.study_ids(ALL.bsn, "tlb:")
    status, view = await make_view(network, [study_id])
    assert status == 201, view
    uid = study["study_instance_uid"]
    generated = next(s for s in tlb_studies() if s.study_instance_uid == uid)
    stored = {str(ds.SOPInstanceUID): ds for ds in generated.instances}
    assert {str(ds.file_meta.TransferSyntaxUID) for ds in stored.values()} == {"1.2.840.10008.1.2.1"}
    # dicomweb-client does not ask for Implicit VR (PS3.18 dropped it from its list): asked by hand
    accept = 'multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2'
    async with network.session.get(f"{view['dicomweb']}/studies/{uid}", headers={"Accept": accept}) as r:
        assert r.status == 200, await r.text()
        message = email.message_from_bytes(
            f"Content-Type: {r.headers['Content-Type']}\r\n\r\n".encode() + await r.read())
    got = [dcmread(BytesIO(part.get_payload(decode=True))) for part in message.walk()
           if part.get_content_type() == "application/dicom"]
    assert sorted(str(ds.SOPInstanceUID) for ds in got) == sorted(stored)
    for ds in got:
        assert str(ds.file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2"
        assert_same(ds, stored[str(ds.SOPInstanceUID)])
