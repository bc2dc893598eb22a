from __future__ import annotations

import base64
import tracemalloc
from pathlib import Path

import pytest
from lxml import etree

from duo_gateway.soap.envelope import Addressing, build_envelope, parse_envelope
from duo_gateway.soap.mtom import (
    XOP_NS,
    Attachment,
    MtomError,
    build_mtom,
    mtom_request,
    normalise_cid,
    parse_content_type,
    parse_mtom,
    resolve_document,
    xop_include,
)
from duo_gateway.soap.xml import XmlError

XDSB = "urn:ihe:iti:xds-b:2007"
ACTION = "urn:ihe:iti:2007:CrossGatewayRetrieveResponse"


def _envelope(*documents: etree._Element) -> etree._Element:
    body = etree.Element(f"{{{XDSB}}}RetrieveDocumentSetResponse", nsmap={"xdsb": XDSB})
    for doc in documents:
        dr = etree.SubElement(body, f"{{{XDSB}}}DocumentResponse")
        d = etree.SubElement(dr, f"{{{XDSB}}}Document")
        d.append(doc)
    return build_envelope(Addressing(action=ACTION, relates_to="urn:uuid:1"), body)


def _documents(root: etree._Element) -> list[etree._Element]:
    return list(root.iter(f"{{{XDSB}}}Document"))


def test_round_trip_with_bytes_and_file_attachments(tmp_path: Path) -> None:
    big = bytes(range(256)) * 5000  # contains CR, LF and "--" sequences
    path = tmp_path / "inst.dcm"
    path.write_bytes(big[::-1])
    env = _envelope(xop_include("1.a@x"), xop_include("2.b@x"))
    ctype, body = build_mtom(
        env,
        [Attachment("1.a@x", "application/dicom", big), Attachment("2.b@x", "application/dicom", path)],
        ACTION,
        chunk_bytes=4096,
    )
    mime, params = parse_content_type(ctype)
    assert mime == "multipart/related"
    assert params["type"] == "application/xop+xml"
    assert params["start-info"] == "application/soap+xml"
    assert params["action"] == ACTION
    chunks = list(body)
    assert len(chunks) > 10, "file attachment must be streamed in chunks, not read whole"
    raw = b"".join(chunks)
    assert len(raw) == body.content_length
    root, parts = parse_mtom(ctype, raw, max_part_bytes=len(big))
    assert parse_envelope(root).addressing.action == ACTION
    docs = _documents(root)
    assert resolve_document(docs[0], parts) == big
    assert resolve_document(docs[1], parts) == big[::-1]


def test_build_refuses_dangling_or_unreferenced_parts() -> None:
    with pytest.raises(ValueError, match="differ"):
        build_mtom(_envelope(xop_include("a@x")), [], ACTION)
    with pytest.raises(ValueError, match="differ"):
        build_mtom(_envelope(), [Attachment("a@x", "application/dicom", b"1")], ACTION)
    with pytest.raises(ValueError):
        build_mtom(_envelope(xop_include("a@x")), [Attachment("a@x", "text/plain\r\nX: y", b"1")], ACTION)


def _multipart(
    parts: list[tuple[dict[str, str], bytes]], boundary: str = "b1", sep: bytes = b"\r\n"
) -> bytes:
    out = b"preamble to ignore" + sep
    for headers, content in parts:
        out += b"--" + boundary.encode() + sep
        for k, v in headers.items():
            out += f"{k}: {v}".encode() + sep
        out += sep + content + sep
    return out + b"--" + boundary.encode() + b"--" + sep


def _env_bytes(href: str) -> bytes:
    env = _envelope(etree.Element(f"{{{XOP_NS}}}Include", href=href))
    return etree.tostring(env)


@pytest.mark.parametrize(
    ("href", "content_id"),
    [
        ("cid:1.abc@host", "<1.abc@host>"),
        ("cid:1.abc%40host", "<1.abc@host>"),  # RFC 2392 URL-encoding of the href
        ("cid:urn%3Auuid%3A42", "<urn:uuid:42>"),
        ("CID:x@y", "x@y"),  # Content-ID without angle brackets, upper-case scheme
    ],
)
def test_cid_matching_rules(href: str, content_id: str) -> None:
    body = _multipart([
        ({"Content-Type": 'application/xop+xml; type="application/soap+xml"', "Content-ID": "<root>"},
         _env_bytes(href)),
        ({"Content-Type": "application/dicom", "Content-ID": content_id}, b"DICM-bytes"),
    ])
    ctype = 'multipart/related; boundary=b1; type="application/xop+xml"; start="<root>"'
    root, parts = parse_mtom(ctype, body)
    assert resolve_document(_documents(root)[0], parts) == b"DICM-bytes"


def test_root_is_first_part_without_start_and_lf_separators() -> None:
    body = _multipart(
        [
            ({"Content-Type": "application/xop+xml", "Content-ID": "<r>"}, _env_bytes("cid:a")),
            ({"Content-Type": "application/dicom", "Content-ID": "<a>"}, b"\x00\x01\n\n\x02"),
        ],
        sep=b"\n",
    )
    root, parts = parse_mtom('multipart/related; boundary="b1"', body)
    assert resolve_document(_documents(root)[0], parts) == b"\x00\x01\n\n\x02"


def test_start_parameter_selects_root_even_when_not_first() -> None:
    body = _multipart([
        ({"Content-Type": "application/dicom", "Content-ID": "<a>"}, b"payload"),
        ({"Content-Type": "application/xop+xml", "Content-ID": "<r>"}, _env_bytes("cid:a")),
    ])
    root, parts = parse_mtom('multipart/related; boundary=b1; start="<r>"', body)
    assert resolve_document(_documents(root)[0], parts) == b"payload"
    assert list(parts) == ["a"]


def test_missing_start_part_and_missing_closing_delimiter_are_refused() -> None:
    body = _multipart([({"Content-ID": "<r>"}, _env_bytes("cid:a"))])
    with pytest.raises(MtomError, match="start"):
        parse_mtom('multipart/related; boundary=b1; start="<other>"', body)
    with pytest.raises(MtomError, match="closing"):
        parse_mtom("multipart/related; boundary=b1", body.rsplit(b"--b1--", 1)[0])
    with pytest.raises(MtomError, match="boundary"):
        parse_mtom("multipart/related", body)


def test_duplicate_content_ids_are_refused_as_the_streaming_reader_does() -> None:
    body = _multipart([
        ({"Content-Type": "application/xop+xml", "Content-ID": "<r>"}, _env_bytes("cid:a")),
        ({"Content-Type": "application/dicom", "Content-ID": "<a>"}, b"one"),
        ({"Content-Type": "application/dicom", "Content-ID": "<a>"}, b"two"),
    ])
    with pytest.raises(MtomError, match="duplicate Content-ID"):
        parse_mtom('multipart/related; boundary="b1"', body)


def test_per_part_size_limit() -> None:
    body = _multipart([
        ({"Content-ID": "<r>"}, _env_bytes("cid:a")),
        ({"Content-ID": "<a>"}, b"x" * 2001),
    ])
    with pytest.raises(MtomError, match="exceeds"):
        parse_mtom("multipart/related; boundary=b1", body, max_part_bytes=2000)
    _, parts = parse_mtom("multipart/related; boundary=b1", body, max_part_bytes=5000)
    assert len(parts["a"]) == 2001


def test_include_naming_absent_part_is_an_error() -> None:
    body = _multipart([({"Content-ID": "<r>"}, _env_bytes("cid:nope"))])
    root, parts = parse_mtom("multipart/related; boundary=b1", body)
    with pytest.raises(MtomError, match="not in the message"):
        resolve_document(_documents(root)[0], parts)


def test_plain_soap_with_inline_base64() -> None:
    env = _envelope()
    response = env.find("{*}Body/{*}RetrieveDocumentSetResponse")
    assert response is not None
    dr = etree.SubElement(response, f"{{{XDSB}}}DocumentResponse")
    doc = etree.SubElement(dr, f"{{{XDSB}}}Document")
    encoded = base64.b64encode(b"\x00inline\xff").decode()
    doc.text = "\n  " + encoded[:6] + "\n" + encoded[6:] + "\n"  # line-wrapped, as some stacks send it
    root, parts = parse_mtom("application/soap+xml; charset=UTF-8", etree.tostring(env))
    assert parts == {}
    assert resolve_document(_documents(root)[0], parts) == b"\x00inline\xff"


def test_inline_garbage_and_size_limit() -> None:
    doc = etree.Element(f"{{{XDSB}}}Document")
    doc.text = "not base64!!"
    with pytest.raises(MtomError):
        resolve_document(doc, {})
    doc.text = base64.b64encode(b"y" * 300).decode()
    with pytest.raises(MtomError, match="limit"):
        resolve_document(doc, {}, max_bytes=100)


def test_envelope_part_goes_through_the_hardened_parser() -> None:
    evil = b'<?xml version="1.0"?><!DOCTYPE x [<!ENTITY e "boom">]><x>&e;</x>'
    body = _multipart([({"Content-ID": "<r>"}, evil)])
    with pytest.raises(XmlError):
        parse_mtom("multipart/related; boundary=b1", body)


def test_base64_transfer_encoded_part_is_decoded() -> None:
    body = _multipart([
        ({"Content-ID": "<r>"}, _env_bytes("cid:a")),
        ({"Content-ID": "<a>", "Content-Transfer-Encoding": "base64"}, base64.encodebytes(b"\x01\x02" * 100)),
    ])
    root, parts = parse_mtom("multipart/related; boundary=b1", body)
    assert resolve_document(_documents(root)[0], parts) == b"\x01\x02" * 100


def test_normalise_cid() -> None:
    assert normalise_cid("cid:a%20b@c") == "a b@c"
    assert normalise_cid(" <a b@c> ") == "a b@c"
    assert xop_include("a b@c").get("href") == "cid:a%20b@c"


#: 4 MiB of bare delimiters with empty header blocks: every one of them a well-formed (empty) part.
FLOOD = b"--b1\r\n\r\n\r\n\r\n" * (4 * 1024 * 1024 // 12)


def test_a_delimiter_flood_is_refused_at_the_part_limit_without_listing_the_rest() -> None:
    """The parts past the limit are never looked for: listing every delimiter of a 4 MiB flood first
    took ~1 s of event loop and tens of MB (one match object per delimiter)."""
    tracemalloc.start()
    try:
        with pytest.raises(MtomError, match="more than 8 MIME parts"):
            parse_mtom("multipart/related; boundary=b1", FLOOD, max_parts=8)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 256 * 1024


def test_delimiter_recognition_is_unchanged() -> None:
    """Only ``--boundary`` opening the body or a line, followed by padding and a line end, delimits;
    ``--boundaryX`` is content, and the epilogue after the close delimiter is ignored."""
    body = (b"--b1\r\nContent-ID: <r>\r\n\r\n" + _env_bytes("cid:a")
            + b"\r\n--b1 \t\r\nContent-ID: <a>\r\n\r\nx--b1\r\n--b1x\r\ny\n--b1--\r\n--b1\r\nepilogue")
    root, parts = parse_mtom("multipart/related; boundary=b1", body)
    assert resolve_document(_documents(root)[0], parts) == b"x--b1\r\n--b1x\r\ny"


def test_a_serialised_envelope_goes_as_a_one_part_mtom_request() -> None:
    """RAD-75 requests: the signed envelope's bytes unchanged in the root part, nothing else."""
    xml = etree.tostring(_envelope())
    content_type, body = mtom_request(xml, ACTION)
    media, params = parse_content_type(content_type)
    assert media == "multipart/related" and params["type"] == "application/xop+xml"
    assert params["action"] == ACTION and params["start"].startswith("<")
    assert xml in body, "the envelope travels byte for byte (its signature covers those bytes)"
    root, attachments = parse_mtom(content_type, body)
    assert attachments == {}
    assert etree.tostring(root) == xml
    assert parse_envelope(etree.tostring(root)).addressing.action == ACTION
    with pytest.raises(ValueError):
        mtom_request(xml, 'bad"action')
