"""A real web viewer (cornerstone and its DICOMweb image loader, from npm) in headless Chromium shows a
study Orthanc serves over its DICOMweb plugin, through the timeline app's backend proxy.

Orthanc is the reference: the same page pointed at a DUO view's DICOMweb root must pass the same
assertions. The assertions are on the screenshot's pixels, not on the page having loaded: each CT
image carries one bright quadrant on a dark background, a different quadrant for the image the test
expects, so the right image, the right way up, with the header's window applied is the only way to
pass; a blank canvas, a mirrored image or the wrong instance fails.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import io
from collections.abc import Iterator
from dataclasses import dataclass
from urllib.parse import urlencode

import numpy as np
import pytest
from PIL import Image
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from pydicom.uid import JPEG2000Lossless, JPEGLSLossless, RLELossless, generate_uid

from duo_gateway.sim.codecs import stored_as
from duo_gateway.sim.config import SimInstitution, SimPatient
from duo_gateway.sim.studies import GeneratedStudy, generate_studies
from tests.support.browser import Browser, headless_chromium
from tests.support.orthanc import Orthanc, run_orthanc
from tests.support.viewer_app import DICOMWEB_PREFIX, ProxiedRequest, viewer_app

pytestmark = pytest.mark.slow

#: The page's viewport, in CSS pixels (index.html) = screenshot pixels (device scale 1).
VIEWPORT = 512
#: Stored pixels are 256², so cornerstone's fit-to-window scales them by 2: the test also sees the
#: viewer's scaling, not a 1:1 blit.
IMAGE_SIZE = 256
#: Hounsfield units: air, and soft tissue just above the header's window centre (40/400 for the
#: simulator's CTs), so it shows mid-bright grey, not white: a viewer that ignored the header's window
#: (e.g. stretching min..max) would render it white and fail.
BACKGROUND_HU = -1000
BRIGHT_HU = 140
QUADRANTS = ("top-left", "top-right", "bottom-left", "bottom-right")
#: What archives keep studies in besides native pixels: the browser decodes these itself (the image
#: loader's WebAssembly codecs), so each must render the same as the uncompressed image.
COMPRESSED = (JPEGLSLossless, JPEG2000Lossless, RLELossless)
#: Screenshot pixels kept clear of each quadrant's edges, where scaling smooths bright into dark.
MARGIN = 24


@dataclass(frozen=True)
class Loaded:
    orthanc: Orthanc
    study: GeneratedStudy
    #: (series UID, SOP instance UID) of the image shown with its top-left quadrant bright: not the
    #: first image, so only a page that honours the instance it is given shows it.
    named: tuple[str, str]
    #: The image QIDO order makes first (series 1, instance 1), shown with its bottom-right bright.
    first: tuple[str, str]
    #: Transfer syntax UID -> (study, series, instance) of the named image stored in that syntax.
    compressed: dict[str, tuple[str, str, str]]


def _ct_study() -> GeneratedStudy:
    """The simulator's first CT study: real headers (rescale to HU, a window, geometry) in a study
    with several series and a report, so finding the image is not trivial."""
    patient = SimPatient(bsn="900186021", name="de Vries^Bram", birth_date="19581102", sex="M",
                         consent="all")
    institution = SimInstitution(ura="00020771", name="Groot Ziekenhuis")
    for study in generate_studies(patient, institution, 8, seed=7, image_size=IMAGE_SIZE):
        if "CT" in study.modalities:
            return study
    raise AssertionError("the simulator made no CT study for this seed")


def _paint(ds: Dataset, quadrant: str) -> None:
    """Air everywhere but ``quadrant``, which is :data:`BRIGHT_HU`: stored values through the image's
    own rescale, as a scanner writes them."""
    slope, intercept = float(ds.RescaleSlope), float(ds.RescaleIntercept)
    rows, columns = int(ds.Rows), int(ds.Columns)
    stored = np.full((rows, columns), round((BACKGROUND_HU - intercept) / slope), dtype="<u2")
    top, left = quadrant.startswith("top"), quadrant.endswith("left")
    r = slice(0, rows // 2) if top else slice(rows // 2, rows)
    c = slice(0, columns // 2) if left else slice(columns // 2, columns)
    stored[r, c] = round((BRIGHT_HU - intercept) / slope)
    ds.PixelData = stored.tobytes()


def expected_grey(ds: Dataset, hu: float) -> float:
    """The display value of ``hu`` through the header's linear VOI window (PS3.3 C.11.2.1.2.1)."""
    center, width = float(ds.WindowCenter), float(ds.WindowWidth)
    value = ((hu - (center - 0.5)) / (width - 1) + 0.5) * 255
    return min(255.0, max(0.0, value))


def _part10(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    return buffer.getvalue()


def _compressed_copies(named: Dataset) -> dict[str, Dataset]:
    """The named image in each lossless syntax an archive (and the simulator) stores, one series each
    in a study of their own: the frames reach the browser compressed, and its codecs must decode them."""
    study_uid = generate_uid()
    copies = {}
    for number, syntax in enumerate(COMPRESSED, start=1):
        ds = copy.deepcopy(named)
        ds.StudyInstanceUID = study_uid
        ds.SeriesInstanceUID = generate_uid()
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.SeriesNumber = number
        copies[str(syntax)] = stored_as(ds, syntax)
    return copies


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Loaded]:
    study = _ct_study()
    images = [ds for ds in study.instances if ds.Modality == "CT"]
    first = min(images, key=lambda ds: (int(ds.SeriesNumber), int(ds.InstanceNumber)))
    named = max(images, key=lambda ds: (int(ds.SeriesNumber), int(ds.InstanceNumber)))
    assert first is not named
    instances = []
    for ds in study.instances:
        if ds.Modality == "CT":
            uid = ds.SOPInstanceUID
            ds = copy.deepcopy(ds)
            _paint(ds, "top-left" if uid == named.SOPInstanceUID
                   else "bottom-right" if uid == first.SOPInstanceUID else "top-right")
            if uid == named.SOPInstanceUID:
                named = ds
        instances.append(ds)
    painted = dataclasses.replace(study, instances=instances)
    compressed = _compressed_copies(named)
    with run_orthanc(tmp_path_factory.mktemp("viewer"), dicomweb=True) as orthanc:
        # over REST, not C-STORE: each file is stored in its own syntax, with nothing negotiated away
        for ds in [*painted.instances, *compressed.values()]:
            orthanc.upload(_part10(ds))
        yield Loaded(orthanc, painted, (str(named.SeriesInstanceUID), str(named.SOPInstanceUID)),
                     (str(first.SeriesInstanceUID), str(first.SOPInstanceUID)),
                     {syntax: (str(ds.StudyInstanceUID), str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID))
                      for syntax, ds in compressed.items()})


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with headless_chromium() as b:
        yield b


def page_url(base_url: str, study: str, series: str | None = None, instance: str | None = None) -> str:
    """The viewer page of ``study`` (and optionally one image of it) through the app at ``base_url``."""
    query = {"root": base_url + DICOMWEB_PREFIX, "study": study}
    if series is not None:
        query["series"] = series
    if instance is not None:
        query["instance"] = instance
    return f"{base_url}/index.html?{urlencode(query)}"


def quadrant_pixels(png: bytes) -> dict[str, np.ndarray]:
    """Each quadrant of the viewport screenshot as luminance, less :data:`MARGIN` on every side."""
    image = Image.open(io.BytesIO(png)).convert("L")
    assert image.size == (VIEWPORT, VIEWPORT), f"viewport screenshot is {image.size}"
    pixels = np.asarray(image, dtype=np.float64)
    half = VIEWPORT // 2
    inner = slice(MARGIN, half - MARGIN)
    outer = slice(half + MARGIN, VIEWPORT - MARGIN)
    return {"top-left": pixels[inner, inner], "top-right": pixels[inner, outer],
            "bottom-left": pixels[outer, inner], "bottom-right": pixels[outer, outer]}


def assert_one_bright_quadrant(png: bytes, bright: str, grey: float) -> None:
    """``bright`` shows ``grey`` (within a few levels of rounding and smoothing) everywhere, every other
    quadrant is black: the image is on screen, the right one, the right way up, windowed."""
    for name, pixels in quadrant_pixels(png).items():
        if name == bright:
            assert abs(pixels.min() - grey) <= 4 and abs(pixels.max() - grey) <= 4, (
                f"{name} should be grey {grey:.0f}: {pixels.min():.0f}..{pixels.max():.0f}")
        else:
            assert pixels.max() <= 4, f"{name} should be black: up to {pixels.max():.0f}"


async def show(browser: Browser, url: str) -> tuple[str, bytes]:
    """Open ``url``, wait for the page's verdict, screenshot the viewport (in a thread: the event loop
    must keep serving the page while selenium waits)."""
    def run() -> tuple[str, bytes]:
        state = browser.open(url)
        return state, browser.screenshot("#viewport")
    return await asyncio.to_thread(run)


def _bright_grey(loaded: Loaded) -> float:
    return expected_grey(loaded.study.instances[0], BRIGHT_HU)


async def test_named_image_is_on_screen_the_right_way_up(loaded: Loaded, browser: Browser) -> None:
    assert loaded.orthanc.dicomweb_root is not None
    log: list[ProxiedRequest] = []
    series, instance = loaded.named
    async with viewer_app(loaded.orthanc.dicomweb_root, log=log) as base_url:
        url = page_url(base_url, loaded.study.study_instance_uid, series, instance)
        state, png = await show(browser, url)
    assert state == "rendered", f"{state}\n{browser.console()}"
    assert_one_bright_quadrant(png, "top-left", _bright_grey(loaded))

    study_path = f"studies/{loaded.study.study_instance_uid}/series/{series}"
    # what the viewer asked for is the contract a DICOMweb root must serve: series metadata as JSON,
    # then the frame as multipart octet-stream in whatever syntax the server holds
    assert [(r.method, r.path, r.accept, r.status) for r in log] == [
        ("GET", f"{study_path}/metadata", "application/dicom+json", 200),
        ("GET", f"{study_path}/instances/{instance}/frames/1",
         "multipart/related; type=application/octet-stream; transfer-syntax=*", 200),
    ]


async def test_study_alone_shows_its_first_image_found_by_qido(loaded: Loaded, browser: Browser) -> None:
    assert loaded.orthanc.dicomweb_root is not None
    log: list[ProxiedRequest] = []
    async with viewer_app(loaded.orthanc.dicomweb_root, log=log) as base_url:
        state, png = await show(browser, page_url(base_url, loaded.study.study_instance_uid))
    assert state == "rendered", f"{state}\n{browser.console()}"
    assert_one_bright_quadrant(png, "bottom-right", _bright_grey(loaded))

    series, instance = loaded.first
    study_path = f"studies/{loaded.study.study_instance_uid}"
    assert [(r.path, r.accept) for r in log] == [
        (f"{study_path}/series", "application/dicom+json"),
        (f"{study_path}/series/{series}/instances", "application/dicom+json"),
        (f"{study_path}/series/{series}/metadata", "application/dicom+json"),
        (f"{study_path}/series/{series}/instances/{instance}/frames/1",
         "multipart/related; type=application/octet-stream; transfer-syntax=*"),
    ]


async def test_unknown_instance_is_an_error_and_a_blank_viewport_fails_the_check(
        loaded: Loaded, browser: Browser) -> None:
    """The page reports failure instead of "rendered", and the pixel check is one that fails on what
    a failed viewer leaves on screen: without this the two tests above could pass on nothing."""
    assert loaded.orthanc.dicomweb_root is not None
    series, _ = loaded.named
    async with viewer_app(loaded.orthanc.dicomweb_root) as base_url:
        state, png = await show(browser, page_url(base_url, loaded.study.study_instance_uid, series,
                                                  "1.2.826.0.1.3680043.10.1383.404"))
    assert state.startswith("error: "), state
    assert "1.2.826.0.1.3680043.10.1383.404" in state
    with pytest.raises(AssertionError, match="top-left should be grey"):
        assert_one_bright_quadrant(png, "top-left", _bright_grey(loaded))


async def test_unreachable_upstream_is_an_error_not_a_hang(browser: Browser) -> None:
    """A DICOMweb root that is down (here: a port nothing listens on) surfaces as the page's error
    state through the proxy's 502, within the wait, instead of a page stuck loading."""
    from duo_gateway.daemon import free_port

    async with viewer_app(f"http://127.0.0.1:{free_port()}/dicom-web") as base_url:
        state, _ = await show(browser, page_url(base_url, "1.2.3"))
    assert state.startswith("error: HTTP 502"), state


@pytest.mark.parametrize("syntax", [str(uid) for uid in COMPRESSED], ids=[uid.keyword for uid in COMPRESSED])
async def test_compressed_frames_are_decoded_in_the_browser(loaded: Loaded, browser: Browser,
                                                            syntax: str) -> None:
    """Orthanc hands the frame out in the syntax it stores (transfer-syntax=* lets it), so the screen
    shows the image only if the page's codec for that syntax ran in the browser."""
    assert loaded.orthanc.dicomweb_root is not None
    log: list[ProxiedRequest] = []
    study, series, instance = loaded.compressed[syntax]
    async with viewer_app(loaded.orthanc.dicomweb_root, log=log) as base_url:
        state, png = await show(browser, page_url(base_url, study, series, instance))
    assert state == "rendered", f"{state}\n{browser.console()}"
    assert_one_bright_quadrant(png, "top-left", _bright_grey(loaded))
    frame = log[-1]
    assert frame.path.endswith("/frames/1") and f"transfer-syntax={syntax}" in frame.content_type, frame
