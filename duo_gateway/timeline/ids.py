"""The API's opaque study ``id``: a :class:`StudyRef` and the patient's BSN, sealed by DUO.

A transfer request names studies only by these ids (and no patient), so the id must carry the BSN
(the Mitz closed question and the XUA ``resource-id`` need it) without showing it to whoever handles
the id (browser, logs, proxies), and it must not be forgeable: a caller who could edit an id could
pair any study with any patient's consent. AES-GCM gives both: confidentiality and integrity under a
key only DUO holds. The associated data pins the format version, so a future layout cannot be
confused with this one.

The key comes from ``timeline.study_id_key`` (replicas behind one load balancer must share it) or,
when unset, from a key file under the storage path, created on first start, so ids survive restarts
of a single DUO.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.timeline.model import StudyRef

_AAD: Final = b"duo-gateway study id v1"
_NONCE_BYTES: Final = 12
KEY_BYTES: Final = 32
#: Relative to the storage path.
KEY_FILE: Final = Path("keys") / "study-id.key"


@dataclass(frozen=True)
class SealedStudy:
    ref: StudyRef
    bsn: str


class StudyIds:
    def __init__(self, key: bytes) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a study id key is {KEY_BYTES} bytes")
        self._aead = AESGCM(key)

    @classmethod
    def from_settings(cls, key_b64: str | None, storage_path: Path) -> StudyIds:
        if key_b64 is not None:
            try:
                return cls(base64.b64decode(key_b64, validate=True))
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"timeline.study_id_key must be {KEY_BYTES} bytes in base64") from exc
        return cls(load_or_create_key(storage_path / KEY_FILE))

    def seal(self, ref: StudyRef, bsn: str) -> str:
        data = {"k": ref.kind, "s": ref.study_uid, "h": ref.home_community_id, "r": ref.repository_unique_id,
                "d": ref.document_unique_id, "a": ref.hospital_ura, "p": bsn}
        plain = json.dumps({k: v for k, v in data.items() if v is not None}, separators=(",", ":")).encode()
        nonce = os.urandom(_NONCE_BYTES)
        sealed = nonce + self._aead.encrypt(nonce, plain, _AAD)
        return base64.urlsafe_b64encode(sealed).decode().rstrip("=")

    def open(self, value: str) -> SealedStudy:
        """Raises ValueError for anything DUO (with this key) did not make, including edited ids."""
        try:
            raw = base64.urlsafe_b64decode(value + "=" * (-len(value) % 4))
            if len(raw) <= _NONCE_BYTES:
                raise ValueError("too short")
            plain = self._aead.decrypt(raw[:_NONCE_BYTES], raw[_NONCE_BYTES:], _AAD)
            data = json.loads(plain)
            kind, uid, home, bsn = data["k"], data["s"], data["h"], data["p"]
            if kind not in ("xca", "tlb") or not all(isinstance(v, str) for v in (uid, home, bsn)):
                raise ValueError("bad fields")
            if not is_valid_bsn(bsn):
                raise ValueError("bad patient")
            ref = StudyRef(kind, uid, home, data.get("r"), data.get("d"), data.get("a"))
        except (InvalidTag, KeyError, TypeError, ValueError, binascii.Error, json.JSONDecodeError) as exc:
            raise ValueError("not a study id issued by this gateway") from exc
        return SealedStudy(ref, bsn)


def load_or_create_key(path: Path) -> bytes:
    """The key file's bytes; a new random key (mode 0600) when there is none yet."""
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        key = AESGCM.generate_key(bit_length=KEY_BYTES * 8)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        except FileExistsError:
            return load_or_create_key(path)  # another process made it first: use theirs
        with os.fdopen(fd, "wb") as out:
            out.write(key)
        return key
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte study id key")
    return key


__all__ = ["KEY_FILE", "SealedStudy", "StudyIds", "load_or_create_key"]
