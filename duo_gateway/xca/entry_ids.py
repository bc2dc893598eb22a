"""Identifiers: homeCommunityId normalisation and deterministic entryUUIDs / symbolic ids.

entryUUIDs are derived from what they describe (uuid5) instead of being random, so re-indexing the
same study yields the same DocumentEntry and initiating gateways can de-duplicate across queries.
"""

from __future__ import annotations

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


def name_uuid(*parts: str) -> str:
    """``urn:uuid:`` of a v5 UUID over ``parts``; '|' cannot occur in a UID or OID, so no collisions."""
    return urn_uuid(uuid.uuid5(ENTRY_NAMESPACE, "|".join(parts)))


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
