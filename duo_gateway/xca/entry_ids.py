"""Identifiers: homeCommunityId normalisation and deterministic entryUUIDs / symbolic ids.

entryUUIDs are derived from what they describe (uuid5) instead of being random, so re-indexing the
same study yields the same DocumentEntry and initiating gateways can de-duplicate across queries.
"""

from __future__ import annotations

import hashlib
import uuid

from duo_gateway.xca.hl7 import is_oid

#: Namespace of every name-based UUID this gateway mints; changing it renames every entry.
ENTRY_NAMESPACE = uuid.UUID("0b6f4f0c-8f1e-5a39-9d7e-6475f6f2d001")
_MAX_OID = 64


class HomeCommunityIdError(ValueError):
    """Not a usable homeCommunityId."""


def normalise_home(value: str) -> str:
    """``urn:oid:<OID>`` from either that form or a bare OID, as Epic sends it (xca.md §5, §13.1)."""
    v = value.strip()
    oid = v[8:] if v[:8].lower() == "urn:oid:" else v
    if not is_oid(oid) or len(oid) > _MAX_OID:
        raise HomeCommunityIdError(f"not a homeCommunityId: {value!r}")
    return f"urn:oid:{oid}"


def home_oid(home: str) -> str:
    return normalise_home(home)[8:]


def urn_uuid(u: uuid.UUID) -> str:
    return f"urn:uuid:{u}"


_NAMESPACE_BYTES = ENTRY_NAMESPACE.bytes


def name_uuid(*parts: str) -> str:
    """``urn:uuid:`` of a v5 UUID over ``parts``; '|' cannot occur in a UID or OID, so no collisions.

    Exactly ``uuid.uuid5(ENTRY_NAMESPACE, "|".join(parts))``, written out: an ITI-38 answer derives
    thirteen of these per entry, and the ``uuid`` module's objects made it a third of the answer's cost
    (2 µs instead of 7 each; tests/xca/test_entry_ids.py holds it to uuid5).
    """
    x = hashlib.sha1(_NAMESPACE_BYTES + "|".join(parts).encode(), usedforsecurity=False).hexdigest()
    # Version 5 in the 13th digit, the RFC 4122 variant (10xx) in the top bits of the 17th.
    return f"urn:uuid:{x[:8]}-{x[8:12]}-5{x[13:16]}-{'89ab'[int(x[16], 16) & 3]}{x[17:20]}-{x[20:32]}"


def document_entry_uuid(document_unique_id: str, home: str | None = None) -> str:
    """entryUUID of a DocumentEntry, keyed by its uniqueId (KOS uniqueIds already name the study and
    the repository, see xca.metadata.kos_unique_id)."""
    return name_uuid("doc", document_unique_id, home or "")


def is_urn_uuid(value: str) -> bool:
    if not value.lower().startswith("urn:uuid:"):
        return False
    try:
        uuid.UUID(value[9:])
    except ValueError:
        return False
    return True
