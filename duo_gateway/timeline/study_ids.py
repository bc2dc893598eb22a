"""The API's opaque study ``id``: a :class:`StudyRef`, the patient's BSN, who may use it and until when.

A transfer request names studies only by these ids (and no patient), so the id must carry the BSN
(the Mitz closed question and the XUA ``resource-id`` need it) without showing it to whoever handles
the id (browser, logs, proxies), and it must not be forgeable: a caller who could edit an id could
pair any study with any patient's consent. AES-GCM gives both: confidentiality and integrity under a
key only DUO holds. The associated data pins the format version, so a future layout cannot be
confused with this one.

An id is also bound to the organisation (URA) whose professional asked for the timeline, and expires
(``timeline.study_id_ttl_s``, default 24 h): a study id that leaks (a log, a browser history, another
hospital's system) cannot be replayed by anyone else, nor forever.

The key comes from ``timeline.study_id_key`` (replicas behind one load balancer must share it) or,
when unset, from a key file under the storage path, created on first start, so ids survive restarts
of a single DUO.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from duo_gateway.bsn import is_valid_bsn
from duo_gateway.timeline.model import StudyRef

_AAD: Final = b"duo-gateway study id v3"
_NONCE_BYTES: Final = 12
KEY_BYTES: Final = 32
#: Relative to the storage path.
KEY_FILE: Final = Path("keys") / "study-id.key"
#: How long an id stays usable when the config does not say.
DEFAULT_TTL_S: Final = 24 * 3600.0


class StudyIdRefused(ValueError):
    """A genuine id that this requester may not use (now): another organisation's, or expired."""


@dataclass(frozen=True)
class SealedStudy:
    #: Every source the timeline saw the study at, primary first (the merge's order).
    refs: tuple[StudyRef, ...]
    bsn: str
    #: The organisation whose professional the timeline was made for: the only one that may use it.
    ura: str
    #: Seconds since the epoch after which the id is refused.
    expires_at: float

    @property
    def ref(self) -> StudyRef:
        return self.refs[0]

    def check_use(self, ura: str, now: float | None = None) -> None:
        """Raises :class:`StudyIdRefused` unless ``ura`` may use this id now."""
        if ura != self.ura:
            raise StudyIdRefused("this study id was issued to another organisation's timeline; "
                                 "ask for a timeline as your own organisation")
        if (time.time() if now is None else now) >= self.expires_at:
            raise StudyIdRefused("this study id has expired; ask for a new timeline")


class StudyIds:
    def __init__(self, key: bytes, *, ttl_s: float = DEFAULT_TTL_S) -> None:
        if len(key) != KEY_BYTES:
            raise ValueError(f"a study id key is {KEY_BYTES} bytes")
        if ttl_s <= 0:
            raise ValueError("ttl_s must be positive")
        self._aead = AESGCM(key)
        self.ttl_s = ttl_s

    @classmethod
    def from_settings(cls, key_b64: str | None, storage_path: Path, *,
                      ttl_s: float = DEFAULT_TTL_S) -> StudyIds:
        if key_b64 is not None:
            try:
                return cls(base64.b64decode(key_b64, validate=True), ttl_s=ttl_s)
            except (binascii.Error, ValueError) as exc:
                raise ValueError(f"timeline.study_id_key must be {KEY_BYTES} bytes in base64") from exc
        return cls(load_or_create_key(storage_path / KEY_FILE), ttl_s=ttl_s)

    def seal(self, refs: StudyRef | Sequence[StudyRef], bsn: str, *, ura: str,
             now: float | None = None) -> str:
        """One id for the study at all the sources given, so a transfer can fall back to the next;
        usable by organisation ``ura`` only, for ``ttl_s`` from ``now``."""
        listed = (refs,) if isinstance(refs, StudyRef) else tuple(refs)
        if not listed or len({r.study_uid for r in listed}) != 1:
            raise ValueError("a study id names one study at one or more sources")
        expires = round((time.time() if now is None else now) + self.ttl_s)
        plain = json.dumps({"p": bsn, "c": [_pack(r) for r in listed], "u": ura, "e": expires},
                           separators=(",", ":")).encode()
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
            bsn = data["p"]
            if not isinstance(bsn, str) or not is_valid_bsn(bsn):
                raise ValueError("bad patient")
            refs = tuple(_unpack(c) for c in data["c"])
            if not refs or len({r.study_uid for r in refs}) != 1:
                raise ValueError("bad sources")
            ura, expires = data["u"], data["e"]
            if not isinstance(ura, str) or not isinstance(expires, int):
                raise ValueError("bad binding")
        except (InvalidTag, KeyError, TypeError, ValueError, binascii.Error, json.JSONDecodeError) as exc:
            raise ValueError("not a study id issued by this gateway") from exc
        return SealedStudy(refs, bsn, ura, float(expires))


def _pack(ref: StudyRef) -> dict[str, str]:
    data = {"k": ref.kind, "s": ref.study_uid, "h": ref.home_community_id, "r": ref.repository_unique_id,
            "d": ref.document_unique_id, "a": ref.hospital_ura}
    return {k: v for k, v in data.items() if v is not None}


def _unpack(data: dict[str, object]) -> StudyRef:
    kind, uid, home = data["k"], data["s"], data["h"]
    if kind not in ("xca", "tlb") or not isinstance(uid, str) or not isinstance(home, str):
        raise ValueError("bad fields")
    return StudyRef("xca" if kind == "xca" else "tlb", uid, home, _optional(data, "r"), _optional(data, "d"),
                    _optional(data, "a"))


def _optional(data: dict[str, object], key: str) -> str | None:
    value = data.get(key)
    if value is not None and not isinstance(value, str):
        raise ValueError("bad fields")
    return value


def load_or_create_key(path: Path) -> bytes:
    """The key file's bytes; a new random key (mode 0600, fsynced) when there is none yet.

    Created under a temporary name and linked into place, so a crash mid-write never leaves an empty
    key file behind (every later start would fail, every issued id would be lost), and a second
    process starting at the same moment either wins the link or reads the winner's complete key.
    """
    try:
        key = path.read_bytes()
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=".key-")
        tmp = Path(tmp_name)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(AESGCM.generate_key(bit_length=KEY_BYTES * 8))
                out.flush()
                os.fsync(out.fileno())
            try:
                os.link(tmp, path)
            except FileExistsError:
                pass  # another process made it first: use theirs
        finally:
            tmp.unlink(missing_ok=True)
        key = path.read_bytes()
    if len(key) != KEY_BYTES:
        raise ValueError(f"{path} does not hold a {KEY_BYTES}-byte study id key")
    return key


__all__ = ["DEFAULT_TTL_S", "KEY_FILE", "SealedStudy", "StudyIdRefused", "StudyIds", "load_or_create_key"]
