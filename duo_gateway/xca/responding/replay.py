"""Each XCA request is acted on once: a WS-Addressing MessageID seen before is a replay.

A peer may keep one assertion for a whole session (DUO does, :class:`~duo_gateway.xca.initiating.
exchange.CommunitySigner`), so the assertion cannot be what is used once; the message is. A request is
remembered by its issuer and MessageID until its assertion expires (plus the clock skew): after that
the assertion itself is refused, so nothing older needs remembering, and memory stays bounded by the
request rate times the assertion lifetime.

Why not also the ``wsu:Timestamp``: DUO does not check a message-level signature, so the Timestamp is
no more protected than the MessageID, and with millisecond resolution two legitimate requests sent at
once under one kept assertion would collide.

Two stores: one process (no ``storage.url``, or SQLite, which is one DUO) remembers in memory; DUO
replicas sharing PostgreSQL remember in the ``xua_replay`` table, so a message replayed at another
replica is refused too. Both refuse rather than forget: a store that is full or unreachable fails the
request (the peer retries with a new MessageID), never lets it through unchecked.
"""

from __future__ import annotations

import asyncio
import hashlib
import heapq
import time
from abc import ABC, abstractmethod
from datetime import datetime
from typing import Final

import structlog

from duo_gateway.config.loader import DuoConfig
from duo_gateway.transfer.sql import PostgresBackend

log = structlog.get_logger(__name__)

#: How often a replica deletes expired keys from the shared table.
PURGE_INTERVAL_S: Final = 60.0
_SCHEMA_LOCK_KEY: Final = 0x6475_6F78  # "duox": pg_advisory_xact_lock key for creating the table


class ReplayStoreFull(RuntimeError):
    """More live messages than ``xua.replay_cache_max``: refusing is safer than forgetting one."""


def replay_key(issuer: str, message_id: str) -> str:
    """Per issuer, so one peer cannot block another's MessageIDs; hashed, so a long id costs no memory."""
    return hashlib.sha256(f"{issuer}\0{message_id}".encode()).hexdigest()


class ReplayGuard(ABC):
    async def open(self) -> None:  # noqa: B027 - only the shared store has something to open
        """Ready the store (the shared one creates its table and fails start-up when unreachable)."""

    async def close(self) -> None:  # noqa: B027
        """Release what :meth:`open` took."""

    @abstractmethod
    async def first_use(self, key: str, *, until: datetime, now: datetime) -> bool:
        """Record ``key`` until ``until``; False when it is already recorded and not yet expired."""


class MemoryReplayGuard(ReplayGuard):
    """One process: a dict of live keys and a heap by expiry, so purging costs only what expired."""

    def __init__(self, max_entries: int) -> None:
        self._max = max_entries
        self._expires: dict[str, float] = {}
        self._heap: list[tuple[float, str]] = []

    def __len__(self) -> int:
        return len(self._expires)

    def _purge(self, now: float) -> None:
        while self._heap and self._heap[0][0] <= now:
            expiry, key = heapq.heappop(self._heap)
            if self._expires.get(key) == expiry:
                del self._expires[key]

    async def first_use(self, key: str, *, until: datetime, now: datetime) -> bool:
        t = now.timestamp()
        self._purge(t)
        if key in self._expires:
            return False
        if len(self._expires) >= self._max:
            raise ReplayStoreFull(f"{self._max} messages are remembered already (xua.replay_cache_max)")
        expiry = until.timestamp()
        self._expires[key] = expiry
        heapq.heappush(self._heap, (expiry, key))
        return True


class PostgresReplayGuard(ReplayGuard):
    """Replicas sharing PostgreSQL: a key is claimed by exactly one INSERT across all of them.

    An expired row with the same key is taken over (``DO UPDATE ... WHERE expired``) rather than
    refused, so the table needs no purge to stay correct, only to stay small. Times are each
    replica's own clock in epoch seconds; the configured clock skew already covers their drift.
    """

    def __init__(self, url: str, *, pool_size: int = 4, purge_interval_s: float = PURGE_INTERVAL_S) -> None:
        self._backend = PostgresBackend(url, pool_size=pool_size)
        self._purge_interval_s = purge_interval_s
        self._next_purge = 0.0

    async def open(self) -> None:
        await asyncio.to_thread(self._open)

    def _open(self) -> None:
        self._backend.open()
        with self._backend.transaction(write=True) as tx:
            # CREATE TABLE IF NOT EXISTS is not safe against a concurrent CREATE in PostgreSQL.
            tx.one("SELECT pg_advisory_xact_lock(?)", (_SCHEMA_LOCK_KEY,))
            tx.run("CREATE TABLE IF NOT EXISTS xua_replay (key TEXT PRIMARY KEY, "
                   "expires_at DOUBLE PRECISION NOT NULL)")
            tx.run("CREATE INDEX IF NOT EXISTS xua_replay_expires_at ON xua_replay (expires_at)")

    async def close(self) -> None:
        await asyncio.to_thread(self._backend.close)

    async def first_use(self, key: str, *, until: datetime, now: datetime) -> bool:
        purge = time.monotonic() >= self._next_purge
        if purge:
            self._next_purge = time.monotonic() + self._purge_interval_s
        return await asyncio.to_thread(self._claim, key, until.timestamp(), now.timestamp(), purge)

    def _claim(self, key: str, until: float, now: float, purge: bool) -> bool:
        with self._backend.transaction(write=True) as tx:
            claimed = tx.run(
                "INSERT INTO xua_replay (key, expires_at) VALUES (?, ?) ON CONFLICT (key) DO UPDATE "
                "SET expires_at = EXCLUDED.expires_at WHERE xua_replay.expires_at <= ?",
                (key, until, now)) == 1
        if purge:
            with self._backend.transaction(write=True) as tx:
                gone = tx.run("DELETE FROM xua_replay WHERE expires_at <= ?", (now,))
            if gone:
                log.debug("xua replay keys purged", count=gone)
        return claimed


def replay_guard(config: DuoConfig) -> ReplayGuard:
    """PostgreSQL when ``storage.url`` names it (replicas share it), memory otherwise (one process)."""
    url = config.storage.url.get_secret_value() if config.storage.url is not None else ""
    if url.startswith(("postgresql://", "postgres://")):
        return PostgresReplayGuard(url)
    return MemoryReplayGuard(config.xua.replay_cache_max)


__all__ = ["MemoryReplayGuard", "PostgresReplayGuard", "ReplayGuard", "ReplayStoreFull", "replay_guard",
           "replay_key"]
