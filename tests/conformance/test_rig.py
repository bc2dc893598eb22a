"""The NIST XDS Toolkit's Responding Imaging Gateway cases (``rig_2018-54xx``), DUO as the system under test.

In the Toolkit the Initiating Imaging Gateway simulator sends a RAD-75, the Responding Imaging Gateway
forwards a RAD-69 to each Imaging Document Source simulator it concerns (E, F), and three steps check
the result: ValidateRad69Request (what reached each source), ValidateRad75Response (``sameRetImgs``:
the status URN, and per returned document its HomeCommunityId, RepositoryUniqueId and mimeType, as a
set equal to the gold standard's; plus ``registryErrorListNotEmpty`` where errors are expected, an
error being right when its errorCode and severity match) and ValidateReturnedImages (``sameDcmImgs``:
SOPClassUID, SOPInstanceUID, PatientID, PatientBirthDate, PatientSex, StudyInstanceUID and
SeriesInstanceUID equal to the source's image).

Here the caller is the harness's XCA peer (signed XUA, an MTOM request of the Toolkit's shape, built
below element for element; plain HTTP on loopback, the peer known to DUO as a client without a
certificate, as in the other Responding Gateway tests: mTLS has tests of its own), and E and F are
DUO's two TLB hospitals, each a real DICOM Q/R peer (:class:`SimPacs`) behind Mitz consent.
Adaptations common to every case (docs/conformance.md says which apply where):

- **Identifiers.** The Toolkit's fixed data sets and OIDs become the generated studies of a BSN
  patient with consent at both hospitals, the hospitals' configured RepositoryUniqueIds and DUO's
  homeCommunityId. "Unknown" UIDs are made the Toolkit's way: a known UID with ``.999`` appended.
- **RAD-69.** Behind DUO there is no RAD-69 but a PACS, asked with C-FIND and then C-GET. What the
  Toolkit checks of the forwarded RAD-69 (the study, series and instance UIDs each source is asked
  for) is checked of the C-GETs each PACS received: exactly the requested instances it holds, from
  the hospital the RepositoryUniqueId names, and nothing from the other. An instance the PACS does
  not hold is asked for with the others and sends nothing; only then does a C-FIND find it missing.
- **Images.** Beyond the Toolkit's tag list, the pixel data and the whole data set (everything after
  the File Meta group, which the writer of a file rewrites) must equal the stored file.
- **Schemas.** Every answer, its MTOM attachments inlined, is valid against the official XSDs.

One network serves the module (its start took 8 s on a loaded 2-CPU machine); each test only reads.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from lxml import etree
from pydicom import dcmread

from duo_gateway.sim.pacs import SimPacs
from duo_gateway.xca.codes import (
    BASIC_TEXT_SR_SOP_CLASS,
    EXPLICIT_VR_LITTLE_ENDIAN,
    MIME_DICOM,
    RS_NS,
    XDSB_NS,
    XDSIB_NS,
    Action,
    ErrorCode,
    ResponseStatus,
    Severity,
)
from duo_gateway.xca.retrieve import RetrieveDocumentSetResponse, composite_context
from tests.xca.responding_harness import HOME, Network, Reply, running_network
from tests.xca.test_responding import (
    ALL,
    H1,
    H2,
    dataset_bytes,
    repo,
    retrieve_call,
    stored_files,
    studies_of,
)

pytestmark = pytest.mark.asyncio(loop_scope="module")

#: The tags ValidateReturnedImages compares (``sameDcmImgs`` TagList of every rig_2018 case).
NIST_TAGS = ("SOPClassUID", "SOPInstanceUID", "PatientID", "PatientBirthDate", "PatientSex",
             "StudyInstanceUID", "SeriesInstanceUID")


class RecordingPacs(SimPacs):
    """A SimPacs that remembers which instances each C-GET or C-MOVE made it send: DUO's RAD-69.

    ``_retrieve_entries`` is where both operations resolve their identifier to stored instances, so
    the record is independent of the level (SERIES for a whole series, IMAGE with a UID list) DUO
    chose. It runs in pynetdicom's association thread, hence the lock.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retrieves: list[frozenset[tuple[str, str, str]]] = []

    def _retrieve_entries(self, event: Any) -> list[Any]:
        entries = super()._retrieve_entries(event)
        sent = frozenset(
            (str(e.header.StudyInstanceUID), str(e.header.SeriesInstanceUID), str(e.header.SOPInstanceUID))
            for e in entries
        )
        with self._lock:
            self.retrieves.append(sent)
        return entries


@pytest_asyncio.fixture(scope="module", loop_scope="module")
async def duo(tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[Network]:
    async with running_network(tmp_path_factory.mktemp("rig"), pacs_class=RecordingPacs) as network:
        yield network


@pytest.fixture(autouse=True)
def fresh_records(duo: Network) -> None:
    for pacs in duo.pacs:
        assert isinstance(pacs, RecordingPacs)
        pacs.retrieves.clear()


# ------------------------------------------------------------------------------------------------
# the Toolkit's request, DUO's answer, the Toolkit's assertions
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Wanted:
    """One DocumentRequest of a RAD-75: an instance where the requester believes it is."""

    study_uid: str
    series_uid: str
    repository: str
    sop_uid: str

    @property
    def composite(self) -> str:
        return composite_context(self.study_uid, self.series_uid, self.sop_uid)

    def unknown(self) -> Wanted:
        """The Toolkit's unknown instance (rig_2018-5424b, 5425a/b): the same UID with ``.999``."""
        return Wanted(self.study_uid, self.series_uid, self.repository, f"{self.sop_uid}.999")


def images(duo: Network, ura: str, study_index: int) -> list[Wanted]:
    """The image instances (no reports) of the patient's ``study_index``-th study at ``ura``."""
    study = studies_of(duo, ura, ALL)[study_index]
    return [
        Wanted(study.study_instance_uid, str(ds.SeriesInstanceUID), repo(duo, ura), str(ds.SOPInstanceUID))
        for ds in study.instances
        if ds.SOPClassUID != BASIC_TEXT_SR_SOP_CLASS
    ]


def rad75_request(
    docs: Sequence[Wanted], syntaxes: Sequence[str] = (EXPLICIT_VR_LITTLE_ENDIAN,)
) -> etree._Element:
    """The body the Toolkit sends (``Rad75RetrieveRequest/RAD-75Request.xml``), element for element:
    StudyRequest and SeriesRequest in request order, each ``xdsb:DocumentRequest`` declaring its own
    namespace, all three ids, then the TransferSyntaxUIDList. Written out rather than taken from
    DUO's own builder, so DUO's parser is met with a peer's document, not its own."""
    root = etree.Element(f"{{{XDSIB_NS}}}RetrieveImagingDocumentSetRequest", nsmap={"xdsiB": XDSIB_NS})
    studies: dict[str, etree._Element] = {}
    series: dict[tuple[str, str], etree._Element] = {}
    for doc in docs:
        if doc.study_uid not in studies:
            studies[doc.study_uid] = etree.SubElement(
                root, f"{{{XDSIB_NS}}}StudyRequest", studyInstanceUID=doc.study_uid
            )
        key = (doc.study_uid, doc.series_uid)
        if key not in series:
            series[key] = etree.SubElement(
                studies[doc.study_uid], f"{{{XDSIB_NS}}}SeriesRequest", seriesInstanceUID=doc.series_uid
            )
        request = etree.SubElement(series[key], f"{{{XDSB_NS}}}DocumentRequest", nsmap={"xdsb": XDSB_NS})
        for tag, text in (("HomeCommunityId", HOME), ("RepositoryUniqueId", doc.repository),
                          ("DocumentUniqueId", doc.sop_uid)):
            etree.SubElement(request, f"{{{XDSB_NS}}}{tag}").text = text
    listing = etree.SubElement(root, f"{{{XDSIB_NS}}}TransferSyntaxUIDList")
    for uid in syntaxes:
        etree.SubElement(listing, f"{{{XDSIB_NS}}}TransferSyntaxUID").text = uid
    return root


async def rad75(
    duo: Network, docs: Sequence[Wanted], wsdl_dir: Path
) -> tuple[Reply, RetrieveDocumentSetResponse]:
    """Send over MTOM, as the Toolkit's simulator does; ``retrieve_call`` checks the Action, the
    multipart answer and the XSDs."""
    path = duo.gateway.config.xca_responding.rad75_path
    return await retrieve_call(duo, path, Action.RAD75, rad75_request(docs), wsdl_dir, mtom=True)


def assert_status(reply: Reply, expected: ResponseStatus) -> None:
    """``sameRetImgs`` compares the status attribute as a string: the exact URN, no lenient parse."""
    assert reply.envelope is not None and reply.envelope.body is not None
    assert reply.envelope.body.tag == f"{{{XDSB_NS}}}RetrieveDocumentSetResponse"
    response = reply.envelope.body.find(f"{{{RS_NS}}}RegistryResponse")
    assert response is not None
    assert response.get("status") == expected.value


def assert_documents(duo: Network, resp: RetrieveDocumentSetResponse, delivered: Iterable[Wanted]) -> None:
    """ValidateRad75Response (``sameRetImgs``) and ValidateReturnedImages (``sameDcmImgs``)."""
    expected = {w.sop_uid: w for w in delivered}
    got = {d.document_unique_id: d for d in resp.documents}
    assert len(got) == len(resp.documents), "a document returned twice"
    assert set(got) == set(expected)
    for uid, doc in got.items():
        want = expected[uid]
        assert (doc.home, doc.repository_unique_id, doc.mime_type) == (HOME, want.repository, MIME_DICOM)
        assert isinstance(doc.data, bytes)
        ura = next(h.ura for h in duo.net.hospitals if h.repository_unique_id == want.repository)
        stored = stored_files(duo, ura, want.study_uid)[uid]
        image, gold = dcmread(BytesIO(doc.data)), dcmread(BytesIO(stored))
        for tag in NIST_TAGS:
            assert image[tag].value == gold[tag].value, tag
        assert (image.StudyInstanceUID, image.SeriesInstanceUID) == (want.study_uid, want.series_uid)
        assert image.PixelData == gold.PixelData
        assert dataset_bytes(doc.data) == dataset_bytes(stored)


def assert_errors(resp: RetrieveDocumentSetResponse, expected: Sequence[tuple[ErrorCode, str]]) -> None:
    """``registryErrorListNotEmpty`` where the Toolkit expects errors, none where it does not; each
    error's code and severity as in the gold standard, its location DUO's homeCommunityId (RAD-75:
    every RegistryError names the Responding Imaging Gateway), its codeContext naming the instance."""
    assert len(resp.errors) == len(expected), resp.errors
    for error, (code, names) in zip(resp.errors, expected, strict=True):
        assert (error.error_code, error.severity, error.location) == (code, Severity.ERROR, HOME)
        assert names in error.code_context, error.code_context


def asked(duo: Network) -> dict[str, set[tuple[str, str, str]]]:
    """Per hospital URA, every (study, series, instance) its PACS was made to send since the test began."""
    out: dict[str, set[tuple[str, str, str]]] = {}
    for hospital, pacs in zip(duo.net.hospitals, duo.pacs, strict=True):
        assert isinstance(pacs, RecordingPacs)
        sent = {item for retrieve in pacs.retrieves for item in retrieve}
        if sent:
            out[hospital.ura] = sent
    return out


def at(ura: str, docs: Iterable[Wanted]) -> dict[str, set[tuple[str, str, str]]]:
    return {ura: {(w.study_uid, w.series_uid, w.sop_uid) for w in docs}}


# ------------------------------------------------------------------------------------------------
# rig_2018-5421x: a single Imaging Document Source, success
# ------------------------------------------------------------------------------------------------


async def test_rig_2018_5421a(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5421a, Single Image, Single IDS: one image of source E in Explicit VR Little Endian.

    Adapted: E is TLB hospital H1's PACS (its RepositoryUniqueId); the image is the first of a
    generated study of a consenting BSN patient; the RAD-69 check is on H1's C-GET (module docstring).
    """
    image = images(duo, H1, 0)[0]
    reply, resp = await rad75(duo, [image], wsdl_dir)
    assert_status(reply, ResponseStatus.SUCCESS)
    assert_errors(resp, [])
    assert_documents(duo, resp, [image])
    assert asked(duo) == at(H1, [image])


async def test_rig_2018_5421b(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5421b, Two Studies, Single IDS: one image from each of two studies on source E.

    Adapted as rig_2018-5421a: the patient's two studies at H1, the first image of each.
    """
    wanted = [images(duo, H1, 0)[0], images(duo, H1, 1)[0]]
    assert wanted[0].study_uid != wanted[1].study_uid
    reply, resp = await rad75(duo, wanted, wsdl_dir)
    assert_status(reply, ResponseStatus.SUCCESS)
    assert_errors(resp, [])
    assert_documents(duo, resp, wanted)
    assert asked(duo) == at(H1, wanted)


async def test_rig_2018_5421c(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5421c, One Multi-Image Study, Single IDS (F): every image of a one-series study on F.

    Adapted: F is TLB hospital H2; the study is the patient's generated single-series study there
    (four images, where the Toolkit's has five). All of the series is asked for, so DUO may fetch
    it with one series-level C-GET; what the PACS sent must still be exactly the four.
    """
    study = next(
        i for i in range(len(studies_of(duo, H2, ALL)))
        if len({w.series_uid for w in images(duo, H2, i)}) == 1 and len(images(duo, H2, i)) >= 3
    )
    wanted = images(duo, H2, study)
    reply, resp = await rad75(duo, wanted, wsdl_dir)
    assert_status(reply, ResponseStatus.SUCCESS)
    assert_errors(resp, [])
    assert_documents(duo, resp, wanted)
    assert asked(duo) == at(H2, wanted)


# ------------------------------------------------------------------------------------------------
# rig_2018-5423a: two Imaging Document Sources, success
# ------------------------------------------------------------------------------------------------


async def test_rig_2018_5423a(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5423a, Multiple Imaging Document Source Actors (E, F): one image on E, one on F, in
    one RAD-75, answered as one consolidated Success.

    Adapted: E and F are TLB hospitals H1 and H2, each asked Mitz for itself; each PACS must have
    been asked for its own image only (the Toolkit's ValidateRad69Request-E and -F).
    """
    on_e, on_f = images(duo, H1, 0)[0], images(duo, H2, 0)[0]
    reply, resp = await rad75(duo, [on_e, on_f], wsdl_dir)
    assert_status(reply, ResponseStatus.SUCCESS)
    assert_errors(resp, [])
    assert_documents(duo, resp, [on_e, on_f])
    assert asked(duo) == at(H1, [on_e]) | at(H2, [on_f])


# ------------------------------------------------------------------------------------------------
# rig_2018-5424x: failures
# ------------------------------------------------------------------------------------------------


async def test_rig_2018_5424b(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5424b, Unknown DICOM UIDs, Single IDS: a known study and series on E, an unknown
    instance UID; Failure, no document, XDSDocumentUniqueIdError (Error) naming the composite
    study:series:instance UID.

    Adapted: the Toolkit's source gets the RAD-69 and answers the error; DUO's C-GET of it brings
    nothing, and its C-FIND of the study then finds the instance missing.
    """
    ghost = images(duo, H1, 0)[0].unknown()
    reply, resp = await rad75(duo, [ghost], wsdl_dir)
    assert_status(reply, ResponseStatus.FAILURE)
    assert_errors(resp, [(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, ghost.composite)])
    assert_documents(duo, resp, [])
    assert asked(duo) == {}


async def test_rig_2018_5424c(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5424c, Unknown Imaging Document Source, Single IDS: E's image asked of a
    RepositoryUniqueId no source has (F's with ``.999``); Failure, no document, one Error.

    Adapted: the Toolkit's gold standard carries XDSIUnknownIdsUid, a code of the Toolkit's own
    simulator that no IHE table defines; DUO answers the IHE code for a repositoryUniqueId that
    resolves to no repository, XDSUnknownRepositoryId (ITI TF-3 Table 4.2.4.1-2, which RAD-69/RAD-75
    reuse; DUO's ITI-39 answers the same). No hospital's PACS is contacted.
    """
    image = images(duo, H1, 0)[0]
    nowhere = Wanted(image.study_uid, image.series_uid, f"{repo(duo, H2)}.999", image.sop_uid)
    reply, resp = await rad75(duo, [nowhere], wsdl_dir)
    assert_status(reply, ResponseStatus.FAILURE)
    assert_errors(resp, [(ErrorCode.UNKNOWN_REPOSITORY_ID, nowhere.repository)])
    assert nowhere.composite in resp.errors[0].code_context
    assert_documents(duo, resp, [])
    assert asked(duo) == {}


# ------------------------------------------------------------------------------------------------
# rig_2018-5425x: partial success
# ------------------------------------------------------------------------------------------------


async def test_rig_2018_5425a(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5425a, Partial Success, Single IDS: in one series on E a known image and an unknown
    one; PartialSuccess (the IHE-namespace URN), the known image, and XDSDocumentUniqueIdError
    (Error) for the composite UID of the unknown.

    Adapted as rig_2018-5424b: H1's PACS is asked for the known image only.
    """
    image = images(duo, H1, 0)[0]
    ghost = image.unknown()
    reply, resp = await rad75(duo, [image, ghost], wsdl_dir)
    assert_status(reply, ResponseStatus.PARTIAL_SUCCESS)
    assert_errors(resp, [(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, ghost.composite)])
    assert_documents(duo, resp, [image])
    assert asked(duo) == at(H1, [image])


async def test_rig_2018_5425b(duo: Network, wsdl_dir: Path) -> None:
    """rig_2018-5425b, Partial Success, Multiple Imaging Document Source Actors (E, F): an image on
    E, and on F an unknown instance of a study F holds; one consolidated PartialSuccess with E's
    image and XDSDocumentUniqueIdError (Error) for F's composite UID.

    Adapted: E and F are H1 and H2; the Toolkit's F receives a RAD-69 for the unknown instance and
    answers the error, H2's PACS sends nothing and is C-FINDed.
    """
    on_e = images(duo, H1, 1)[0]
    ghost_on_f = images(duo, H2, 0)[0].unknown()
    reply, resp = await rad75(duo, [on_e, ghost_on_f], wsdl_dir)
    assert_status(reply, ResponseStatus.PARTIAL_SUCCESS)
    assert_errors(resp, [(ErrorCode.DOCUMENT_UNIQUE_ID_ERROR, ghost_on_f.composite)])
    assert_documents(duo, resp, [on_e])
    assert asked(duo) == at(H1, [on_e])
