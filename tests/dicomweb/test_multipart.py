"""multipart/related and Accept (dicomweb/multipart.py): bodies split by the standard library's RFC 2046
parser and by dicomweb-client, Accept headers as dicomweb-client really sends them, and the transfer
syntax choice of PS3.18 8.7.3 with the simulators' real conversion rule."""

from __future__ import annotations

import email
import email.policy
import re
from io import BytesIO

import pytest
from dicomweb_client import DICOMwebClient
from pydicom.filewriter import dcmwrite
from pydicom.uid import (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGLSLossless,
)

from duo_gateway.dicomweb.multipart import (
    Acceptable,
    MultipartRelated,
    NotAcceptable,
    choose_transfer_syntax,
    parse_accept,
)
from duo_gateway.sim.codecs import can_convert
from duo_gateway.sim.studies import GeneratedStudy
from tests.dicomweb.conftest import Origin

ELE, ILE = str(ExplicitVRLittleEndian), str(ImplicitVRLittleEndian)
#: Content that looks like framing: a delimiter of another body, bare CR and LF, a CRLF at the very end.
TRICKY_PARTS = [b"\r\n--not-our-boundary\r\nContent-Type: text/plain\r\n\r\nx\r\n", b"\n\n\r\r\x00\xff--",
                b"", b"plain"]


def _body(writer: MultipartRelated, parts: list[bytes], locations: list[str] | None = None) -> bytes:
    pieces = []
    for index, part in enumerate(parts):
        pieces += [writer.part_head(location=locations[index] if locations else None), part, writer.PART_END]
    return b"".join([*pieces, writer.end()])


def _parse_rfc2046(content_type: str, body: bytes) -> email.message.EmailMessage:
    message = email.message_from_bytes(f"Content-Type: {content_type}\r\n\r\n".encode() + body,
                                       policy=email.policy.HTTP)
    assert isinstance(message, email.message.EmailMessage)
    assert not message.defects
    return message


def test_email_parser_splits_the_body_into_the_parts_written() -> None:
    writer = MultipartRelated("application/dicom", transfer_syntax=ELE)
    locations = [f"https://duo.example/v/studies/1.2/series/3.4/instances/5.{i}" for i in range(4)]
    message = _parse_rfc2046(writer.content_type, _body(writer, TRICKY_PARTS, locations))
    assert message.get_content_type() == "multipart/related"
    assert message.get_param("type") == "application/dicom"
    assert message.get_param("transfer-syntax") == ELE
    assert message.get_boundary() == writer.boundary
    parts = list(message.iter_parts())
    assert [p.get_payload(decode=True) for p in parts] == TRICKY_PARTS
    assert [p["Content-Location"] for p in parts] == locations
    assert all(p.get_content_type() == "application/dicom" and p.get_param("transfer-syntax") == ELE
               and not p.defects for p in parts)


def test_part_content_type_and_boundary_forms() -> None:
    writer = MultipartRelated("application/octet-stream", boundary="duo'(bound)+_,-./:=? ary")
    assert writer.content_type == ('multipart/related; type="application/octet-stream"; '
                                   "boundary=\"duo'(bound)+_,-./:=? ary\"")
    head = writer.part_head("image/jpeg")
    assert head == b"--duo'(bound)+_,-./:=? ary\r\nContent-Type: image/jpeg\r\n\r\n"
    message = _parse_rfc2046(writer.content_type, head + b"jpeg" + writer.PART_END + writer.end())
    assert [p.get_payload(decode=True) for p in message.iter_parts()] == [b"jpeg"]
    assert writer.end() == b"--duo'(bound)+_,-./:=? ary--\r\n"
    assert MultipartRelated.PART_END == b"\r\n"


def test_boundaries_are_random_and_valid() -> None:
    boundaries = {MultipartRelated("application/dicom").boundary for _ in range(50)}
    assert len(boundaries) == 50
    assert all(re.fullmatch(r"[0-9a-f]{32}", b) for b in boundaries)
    content_type = MultipartRelated("application/dicom").content_type
    assert re.fullmatch(r'multipart/related; type="application/dicom"; boundary=[0-9a-f]{32}', content_type)


@pytest.mark.parametrize("boundary", ["", "x" * 71, "ends with space ", "semi;colon", 'quo"te', "naïve"])
def test_invalid_boundaries_are_refused(boundary: str) -> None:
    with pytest.raises(ValueError, match="boundary"):
        MultipartRelated("application/dicom", boundary=boundary)


def test_a_header_cannot_be_injected() -> None:
    writer = MultipartRelated("application/dicom")
    with pytest.raises(ValueError):
        writer.part_head(location="/x\r\nSet-Cookie: a=b")
    with pytest.raises(ValueError):
        writer.part_head("application/dicom\nX-Evil: 1")
    with pytest.raises(ValueError):
        MultipartRelated("application/dicom; x=1")
    with pytest.raises(ValueError):
        MultipartRelated("application/dicom", transfer_syntax="1.2.840.10008.1.2.1\r\nX: y")


@pytest.mark.parametrize("stream", [False, True])
def test_dicomweb_client_retrieves_a_study_streamed_part_by_part(origin: Origin, ct_study: GeneratedStudy,
                                                                  stream: bool) -> None:
    """The route's way: each instance written as it comes, every piece its own HTTP chunk; the client
    splits the parts (across its own read chunks when streaming) and reads each as a DICOM file."""
    writer = MultipartRelated("application/dicom", transfer_syntax=ELE)
    pieces: list[bytes] = []
    for ds in ct_study.instances:
        buffer = BytesIO()
        dcmwrite(buffer, ds, enforce_file_format=True)
        pieces += [writer.part_head(), buffer.getvalue(), writer.PART_END]
    pieces.append(writer.end())
    origin.serve(f"/dicom-web/studies/{ct_study.study_instance_uid}", writer.content_type, pieces)

    client = DICOMwebClient(url=origin.url, chunk_size=1000)
    uid = ct_study.study_instance_uid
    got = list(client.iter_study(uid)) if stream else client.retrieve_study(uid)
    assert [ds.SOPInstanceUID for ds in got] == [ds.SOPInstanceUID for ds in ct_study.instances]
    for back, ds in zip(got, ct_study.instances, strict=True):
        assert back.get("PixelData") == ds.get("PixelData")
        assert back.file_meta.TransferSyntaxUID == ELE
    assert parse_accept(origin.accept_headers[0]) == [Acceptable("application/dicom", None, True, 1.0)]


def test_accept_headers_dicomweb_client_sends(origin: Origin, ct_study: GeneratedStudy) -> None:
    writer = MultipartRelated("application/dicom")
    ds = ct_study.instances[0]
    buffer = BytesIO()
    dcmwrite(buffer, ds, enforce_file_format=True)
    origin.serve(f"/dicom-web/studies/{ds.StudyInstanceUID}", writer.content_type,
                 _body(writer, [buffer.getvalue()]))
    client = DICOMwebClient(url=origin.url)
    client.retrieve_study(ds.StudyInstanceUID, media_types=(("application/dicom", "*"),))
    client.retrieve_study(ds.StudyInstanceUID, media_types=(("application/dicom", str(JPEG2000Lossless)),))
    star, named = (parse_accept(header) for header in origin.accept_headers)
    assert star == [Acceptable("application/dicom", "*", True, 1.0)]
    assert named == [Acceptable("application/dicom", str(JPEG2000Lossless), True, 1.0)]
    jpeg_ls, j2k = str(JPEGLSLossless), str(JPEG2000Lossless)
    assert choose_transfer_syntax(star, jpeg_ls, convertible=can_convert) == jpeg_ls
    assert choose_transfer_syntax(named, jpeg_ls, convertible=can_convert) == j2k
    assert choose_transfer_syntax(named, ILE, convertible=can_convert) == j2k
    with pytest.raises(NotAcceptable):
        choose_transfer_syntax(named, str(JPEGBaseline8Bit), convertible=can_convert)
    # A range naming no syntax: PS3.18's Explicit VR Little Endian, or as stored where the server says so.
    plain = parse_accept('multipart/related; type="application/dicom"')
    assert choose_transfer_syntax(plain, jpeg_ls, convertible=can_convert) == "1.2.840.10008.1.2.1"
    assert choose_transfer_syntax(plain, jpeg_ls, convertible=can_convert, unnamed="*") == jpeg_ls


def test_accept_media_ranges_parameters_and_order() -> None:
    assert parse_accept(None) == parse_accept("") == parse_accept(" , ") == []
    assert parse_accept('multipart/related; type="application/dicom"; transfer-syntax=1.2.840.10008.1.2.1') \
        == [Acceptable("application/dicom", ELE, True, 1.0)]
    assert parse_accept("application/dicom+json, application/json;q=0.5") == [
        Acceptable("application/dicom+json", None, False, 1.0),
        Acceptable("application/json", None, False, 0.5)]
    # q first, then type/subtype before type/* before */*, then the client's order
    assert [a.media_type for a in parse_accept(
        "*/*;q=0.8, image/*;q=0.8, image/png;q=0.8, image/jpeg;q=0.8, application/dicom+json")] == [
        "application/dicom+json", "image/png", "image/jpeg", "image/*", "*/*"]
    assert parse_accept('Multipart/Related ; TYPE="Application/DICOM" ; Transfer-Syntax="*" ; Q=0.50') == [
        Acceptable("application/dicom", "*", True, 0.5)]
    # a quoted parameter may hold the list and parameter separators
    assert [a.media_type for a in parse_accept('image/jpeg; note="a, b; c", image/png;;')] == [
        "image/jpeg", "image/png"]
    assert parse_accept("multipart/related, multipart/*;q=0.1") == [
        Acceptable("*/*", None, True, 1.0), Acceptable("*/*", None, True, 0.1)]
    assert parse_accept("application/dicom+json;q=0, application/json;q=0.001") == [
        Acceptable("application/json", None, False, 0.001)]


@pytest.mark.parametrize("header", [
    "application", "application/", "*/json", "application/dicom; q=2", "application/dicom; q=0.1234",
    "application/dicom; q=", "application/dicom; q=1.001", 'multipart/related; type="dicom"',
    "application/dicom; transfer-syntax=abc", "application/dicom; transfer-syntax=1.02",
    "application/dicom; flag", 'application/dicom; a="unterminated', "application/dicom; q=1; Q=0.5",
    "application/json;q=0, */*;q=0.0",
])
def test_malformed_or_refusing_accept_headers(header: str) -> None:
    with pytest.raises(NotAcceptable):
        parse_accept(header)


def test_transfer_syntax_choice() -> None:
    def choose(header: str | None, stored: str) -> str:
        return choose_transfer_syntax(parse_accept(header), stored, convertible=can_convert)

    dicom = 'multipart/related; type="application/dicom"'
    # no transfer-syntax parameter, and no Accept at all: Explicit VR Little Endian, converted if need be
    assert choose(dicom, ELE) == choose(None, ELE) == choose("*/*", ELE) == ELE
    assert choose(dicom, str(JPEG2000Lossless)) == ELE
    assert choose(f"{dicom}; transfer-syntax=*", str(JPEG2000Lossless)) == str(JPEG2000Lossless)
    # lossy data is never decompressed: only as stored, asked for by name or by *
    with pytest.raises(NotAcceptable):
        choose(dicom, str(JPEGBaseline8Bit))
    assert choose(f"{dicom}, {dicom}; transfer-syntax={JPEGBaseline8Bit};q=0.5", str(JPEGBaseline8Bit)) \
        == str(JPEGBaseline8Bit)
    assert choose(f"{dicom}; transfer-syntax={JPEGLSLossless}, {dicom}; transfer-syntax={ILE};q=0.9",
                  ELE) == str(JPEGLSLossless)
    assert choose('multipart/related; type="application/*"; transfer-syntax=*', ILE) == ILE
    assert choose("multipart/related", ILE) == ELE
    # only ranges a multipart application/dicom answer satisfies count
    for header in ("application/dicom+json", "application/dicom", "image/*, application/octet-stream",
                   'multipart/related; type="application/octet-stream"'):
        with pytest.raises(NotAcceptable):
            choose(header, ELE)
    assert choose(f'application/dicom+json, {dicom}; transfer-syntax={ILE};q=0.2', ELE) == ILE
