"""name_uuid is uuid5 written out for speed: every id DUO ever announced depends on it staying equal."""

from __future__ import annotations

import random
import uuid

from duo_gateway.xca.entry_ids import ENTRY_NAMESPACE, document_entry_uuid, name_uuid


def test_name_uuid_is_uuid5_over_the_joined_parts() -> None:
    rng = random.Random(14)
    alphabet = "0123456789.abcdefXYZ-_:|^&é€😀 "
    for _ in range(5000):
        parts = tuple("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 40)))
                      for _ in range(rng.randint(1, 4)))
        expected = f"urn:uuid:{uuid.uuid5(ENTRY_NAMESPACE, '|'.join(parts))}"
        assert name_uuid(*parts) == expected, parts


def test_a_known_entry_uuid_is_unchanged() -> None:
    # Computed by the uuid-module version before the rewrite: a change here renames every entry
    # consumers hold.
    assert (document_entry_uuid("2.25.71598217374864651526277468631560586670", "urn:oid:2.16.528.1.1007.99.1")
            == "urn:uuid:c741af3a-8df7-5838-95a1-0bb3b5aacd5e")
