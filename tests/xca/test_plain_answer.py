"""DUO's ITI-38 answer against plain lxml building the same answer (bench.iti38), and DUO's text
writer against lxml on values that need escaping.

bench.iti38 prints DUO's answer-building time per entry beside plain lxml's; the comparison is only
honest while both build exactly the same answer, which the first test holds them to (c14n, and in fact
byte for byte). The others show the text writer emits what an lxml tree of the same values serializes
to, for the values where a text writer could go wrong.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
from lxml import etree

from bench._harness import consenting_patient, network
from bench.iti38 import duo_answer, plain_template_answer, plain_tree_answer, study_records
from duo_gateway.config.xca import DocumentCodes
from duo_gateway.sim.network import DUO_HOME_COMMUNITY_ID
from duo_gateway.soap.xml import parse_own
from duo_gateway.xca import (
    AdhocQueryResponse,
    Author,
    Code,
    DocumentEntry,
    ErrorCode,
    MetadataError,
    ObjectRef,
    RegistryError,
    ResponseStatus,
    Xon,
    build_adhoc_query_response,
)
from duo_gateway.xca.codes import QUERY_NS, RIM_NS, RS_NS
from duo_gateway.xca.errors import build_error_list
from duo_gateway.xca.metadata import study_entry
from duo_gateway.xca.query import adhoc_query_response_bytes
from tests.xca.xsd import assert_valid


@pytest.fixture(scope="module")
def entries() -> list[DocumentEntry]:
    """The entries of the bench's studies (fewer of them), mapped as the responding gateway maps them."""
    net = network()
    bsn = consenting_patient(net).bsn
    return [study_entry(rec, bsn=bsn, hospital_ura=h.ura, hospital_name=h.name,
                        repository_unique_id=h.repository_unique_id, home=DUO_HOME_COMMUNITY_ID,
                        codes=DocumentCodes())
            for h, rec in study_records(net.hospitals[:2], 15, 8, False)]


def _c14n(data: bytes) -> bytes:
    return etree.tostring(parse_own(data), method="c14n", exclusive=True)


def test_plain_lxml_builds_exactly_duos_answer(entries: list[DocumentEntry]) -> None:
    duo = duo_answer(entries, "urn:uuid:1", "urn:uuid:2")
    assert duo.count(b"<rim:ExtrinsicObject ") == len(entries) == 30
    for plain in (plain_tree_answer(entries, "urn:uuid:1", "urn:uuid:2"),
                  plain_template_answer(entries, "urn:uuid:1", "urn:uuid:2")):
        assert _c14n(plain) == _c14n(duo)
        assert plain == duo  # not only the same infoset: the same bytes


def test_duos_answer_is_schema_valid(entries: list[DocumentEntry], wsdl_dir: Path) -> None:
    assert_valid(wsdl_dir, parse_own(adhoc_query_response_bytes(
        AdhocQueryResponse(ResponseStatus.SUCCESS, tuple(entries)))))


_NASTY = 'a&b <c> "d" \'e\'\tf\ng\rh ]]> é€😀 &amp; />'


def _hostile(entry: DocumentEntry) -> DocumentEntry:
    """Every value a peer or PACS could fill, holding what escaping must get right."""
    code = Code(_NASTY[:20], _NASTY, _NASTY)
    return replace(
        entry, title=_NASTY, mime_type='application/"dicom"', hash=_NASTY, language_code="nl<NL",
        class_code=code, type_code=code, event_codes=(code, Code("CT", "DCM", None)),
        confidentiality_codes=(code, code), reference_ids=(_NASTY, ""), version='1"',
        extra_slots=((_NASTY, (_NASTY, "")), ("empty", ())),
        authors=(Author(institutions=(Xon(_NASTY, "00010001"),), person=_NASTY, roles=(_NASTY, "r"),
                        specialties=("s",)), Author()),
        unique_id="2.25.1&2", patient_id='999911120^^^&2.16.840.1.113883.2.4.6.3&ISO"', size=0,
    )


def test_values_needing_escapes_are_written_as_lxml_writes_them(entries: list[DocumentEntry]) -> None:
    hostile = [_hostile(e) for e in entries[:3]]
    duo = duo_answer(hostile, "urn:uuid:1", "urn:uuid:2")
    assert duo == plain_tree_answer(hostile, "urn:uuid:1", "urn:uuid:2")
    r = f"{{{RIM_NS}}}"
    title = parse_own(duo).find(f".//{r}ExtrinsicObject/{r}Name/{r}LocalizedString")
    assert title is not None and title.get("value") == _NASTY


def test_object_refs_and_errors_are_written_as_lxml_writes_them(entries: list[DocumentEntry]) -> None:
    errors = (RegistryError(ErrorCode.UNAVAILABLE_COMMUNITY, f"hospital {_NASTY}", location="urn:oid:1.2"),)
    refs = (ObjectRef(entries[0].entry_uuid, "1.2.3"), ObjectRef('urn:uuid:"x"', "urn:oid:1.2.4"))
    resp = AdhocQueryResponse(ResponseStatus.PARTIAL_SUCCESS, refs, errors)
    tree = etree.Element(f"{{{QUERY_NS}}}AdhocQueryResponse", nsmap={"query": QUERY_NS, "rim": RIM_NS,
                                                                      "rs": RS_NS})
    tree.set("status", ResponseStatus.PARTIAL_SUCCESS.value)
    error_list = build_error_list(errors)
    assert error_list is not None
    tree.append(error_list)
    objects = etree.SubElement(tree, f"{{{RIM_NS}}}RegistryObjectList")
    for ref, home in zip(refs, ("urn:oid:1.2.3", "urn:oid:1.2.4"), strict=True):
        etree.SubElement(objects, f"{{{RIM_NS}}}ObjectRef", id=ref.id, home=home)
    assert adhoc_query_response_bytes(resp) == etree.tostring(tree, encoding="UTF-8")
    assert etree.tostring(build_adhoc_query_response(resp)) == etree.tostring(tree)


@pytest.mark.parametrize("bad", ["\x00", "\x0b", "\ufffe", "\ud800"])
def test_a_value_xml_cannot_carry_is_refused_like_incomplete_metadata(
        entries: list[DocumentEntry], bad: str) -> None:
    with pytest.raises(MetadataError, match="XML cannot carry"):
        adhoc_query_response_bytes(AdhocQueryResponse(
            ResponseStatus.SUCCESS, (replace(entries[0], title=f"CT {bad}"),)))
