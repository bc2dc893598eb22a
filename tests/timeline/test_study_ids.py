"""The sealed study id: round trip, opacity, and refusal of anything edited or made elsewhere."""

from __future__ import annotations

import base64
import os
from pathlib import Path

import pytest

from duo_gateway.timeline.model import StudyRef
from duo_gateway.timeline.study_ids import KEY_FILE, StudyIdRefused, StudyIds, load_or_create_key

BSN = "999911120"
URA = "00010001"
REF = StudyRef("xca", "1.2.3.4.5", "urn:oid:1.2.3", repository_unique_id="1.2.3.9",
               document_unique_id="1.2.3.4.5.6")


def test_round_trip_and_opaque() -> None:
    ids = StudyIds(os.urandom(32))
    token = ids.seal(REF, BSN, ura=URA)
    assert ids.open(token).ref == REF and ids.open(token).bsn == BSN
    raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4))
    # Neither the BSN nor the study UID can be read off the id.
    assert BSN.encode() not in raw and b"1.2.3.4.5" not in raw and BSN not in token
    # A fresh nonce each time: two ids for one study do not link requests to each other.
    assert ids.seal(REF, BSN, ura=URA) != token


def test_edited_foreign_and_garbage_ids_are_refused() -> None:
    ids = StudyIds(os.urandom(32))
    token = ids.seal(REF, BSN, ura=URA)
    raw = bytearray(base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)))
    raw[20] ^= 1
    edited = base64.urlsafe_b64encode(bytes(raw)).decode().rstrip("=")
    for bad in (edited, StudyIds(os.urandom(32)).seal(REF, BSN, ura=URA), REF.encode(), "", "x", "!!!!"):
        with pytest.raises(ValueError, match="not a study id"):
            ids.open(bad)


def test_key_file_is_made_once_and_private(tmp_path: Path) -> None:
    first = StudyIds.from_settings(None, tmp_path)
    token = first.seal(REF, BSN, ura=URA)
    assert (tmp_path / KEY_FILE).stat().st_mode & 0o777 == 0o600
    # A restart reads the same key, so ids handed out before it still work.
    assert StudyIds.from_settings(None, tmp_path).open(token).bsn == BSN
    assert load_or_create_key(tmp_path / KEY_FILE) == (tmp_path / KEY_FILE).read_bytes()


def test_configured_key_wins_and_is_checked(tmp_path: Path) -> None:
    key = base64.b64encode(os.urandom(32)).decode()
    token = StudyIds.from_settings(key, tmp_path).seal(REF, BSN, ura=URA)
    assert StudyIds.from_settings(key, tmp_path / "other").open(token).ref == REF
    assert not (tmp_path / KEY_FILE).exists()
    with pytest.raises(ValueError, match="32 bytes"):
        StudyIds.from_settings(base64.b64encode(b"short").decode(), tmp_path)
    with pytest.raises(ValueError, match="32 bytes"):
        StudyIds.from_settings("not base64!", tmp_path)


def test_every_copy_of_a_study_is_sealed_primary_first() -> None:
    ids = StudyIds(os.urandom(32))
    tlb = StudyRef("tlb", "1.2.3.4.5", "urn:oid:1.2.9", repository_unique_id="1.2.9.1",
                   hospital_ura="00010001")
    sealed = ids.open(ids.seal([tlb, REF], BSN, ura=URA))
    assert sealed.refs == (tlb, REF) and sealed.ref == tlb and sealed.bsn == BSN
    with pytest.raises(ValueError, match="one study"):
        ids.seal([tlb, StudyRef("xca", "9.9.9", "urn:oid:1.2.3")], BSN, ura=URA)
    with pytest.raises(ValueError, match="one study"):
        ids.seal([], BSN, ura=URA)


def test_an_id_is_bound_to_the_requesting_organisation_and_expires() -> None:
    ids = StudyIds(os.urandom(32), ttl_s=3600)
    sealed = ids.open(ids.seal(REF, BSN, ura=URA, now=1_000_000.0))
    assert sealed.ura == URA and sealed.expires_at == 1_003_600.0
    sealed.check_use(URA, now=1_003_599.0)
    with pytest.raises(StudyIdRefused, match="another organisation"):
        sealed.check_use("00000666", now=1_000_001.0)
    with pytest.raises(StudyIdRefused, match="expired"):
        sealed.check_use(URA, now=1_003_600.0)
    # The binding is inside the seal: an id cannot be re-bound without the key.
    assert ids.open(ids.seal(REF, BSN, ura="00000666")).ura == "00000666"
