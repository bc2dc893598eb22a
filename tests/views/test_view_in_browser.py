"""A real web viewer (cornerstone and its DICOMweb image loader, from npm) in headless Chromium shows a
study through a DUO view: the timeline app's way, study id from the timeline, a view made for it, the
viewer pointed at the view's DICOMweb root through the app's backend.

The same page and the same pixel assertions pass against Orthanc's own DICOMweb plugin
(tests/viewer/test_viewer_orthanc.py): the study's CT images each carry one bright quadrant, the named
image a different one, so only the right image, the right way up, windowed by its header, passes.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterator
from pathlib import Path

import pytest

from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from tests.support.browser import Browser, headless_chromium
from tests.support.orthanc import Orthanc, run_orthanc
from tests.support.viewer_app import ProxiedRequest, viewer_app
from tests.transfer.harness import ALL, NET, REQUESTER, TLB, TransferNetwork
from tests.viewer.test_viewer_orthanc import (
    BRIGHT_HU,
    IMAGE_SIZE,
    _paint,
    _part10,
    assert_one_bright_quadrant,
    expected_grey,
    page_url,
    show,
)

pytestmark = [pytest.mark.slow, pytest.mark.asyncio(loop_scope="module")]


def painted_ct() -> tuple[GeneratedStudy, str, str]:
    """A CT study of the consenting patient at the TLB hospital, painted: the last image top-left
    bright, every other one top-right. Returns it with the named image's series and instance UIDs."""
    study = next(s for s in generate_studies(ALL, TLB, 8, NET.seed, image_size=IMAGE_SIZE)
                 if "CT" in s.modalities)
    images = [ds for ds in study.instances if ds.Modality == "CT"]
    named = max(images, key=lambda ds: (int(ds.SeriesNumber), int(ds.InstanceNumber)))
    instances = []
    for ds in study.instances:
        if ds.Modality == "CT":
            bright = "top-left" if ds.SOPInstanceUID == named.SOPInstanceUID else "top-right"
            ds = copy.deepcopy(ds)
            _paint(ds, bright)
        instances.append(ds)
    return (dataclasses.replace(study, instances=instances), str(named.SeriesInstanceUID),
            str(named.SOPInstanceUID))


@pytest.fixture(scope="module")
def study() -> tuple[GeneratedStudy, str, str]:
    return painted_ct()


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory,
           study: tuple[GeneratedStudy, str, str]) -> Iterator[Orthanc]:
    with run_orthanc(tmp_path_factory.mktemp("source"), ae_title="ORTHANC_SRC") as orthanc:
        for ds in study[0].instances:
            orthanc.upload(_part10(ds))
        yield orthanc


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with headless_chromium() as b:
        yield b


async def test_the_viewer_shows_the_named_image_through_a_view(
        network: TransferNetwork, browser: Browser, study: tuple[GeneratedStudy, str, str],
        tmp_path: Path) -> None:
    generated, series, instance = study
    [(study_id, entry)] = [(i, s) for i, s in await network.study_ids(ALL.bsn, "tlb:")
                           if s["study_instance_uid"] == generated.study_instance_uid]
    async with network.session.post(f"{network.api}/views",
                                    json={"studies": [study_id], "requester": REQUESTER}) as r:
        assert r.status == 201, await r.text()
        view = await r.json()
    log: list[ProxiedRequest] = []
    async with viewer_app(view["dicomweb"], log=log) as base_url:
        state, png = await show(browser, page_url(base_url, entry["study_instance_uid"], series, instance))
    assert state == "rendered", f"{state}\n{browser.console()}\n{log}"
    (tmp_path / "screen.png").write_bytes(png)
    assert_one_bright_quadrant(png, "top-left", expected_grey(generated.instances[0], BRIGHT_HU))
    # The viewer asked DUO what it asks Orthanc: series metadata, then the frame.
    assert [(r.path.rsplit("/", 1)[-1], r.status) for r in log] == [("metadata", 200), ("1", 200)]
