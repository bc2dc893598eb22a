"""The replay stores of the responding gateway: in memory for one DUO, in PostgreSQL for replicas.

The PostgreSQL store is tested against a real server with two guards on one database, which is what
two replicas are: a key claimed through one is refused through the other.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from collections.abc import Iterator
from typing import Any

import pytest

from duo_gateway.config.loader import DuoConfig, parse_config
from duo_gateway.xca.responding.replay import (
    MemoryReplayGuard,
    PostgresReplayGuard,
    ReplayStoreFull,
    replay_guard,
    replay_key,
)
from tests.support.postgres import Postgres, run_postgres

NOW = dt.datetime(2026, 12, 7, 12, 0, tzinfo=dt.UTC)
MINUTE = dt.timedelta(minutes=1)


def test_keys_are_per_issuer_and_bounded_in_size() -> None:
    assert replay_key("urn:oid:1", "urn:uuid:x") == replay_key("urn:oid:1", "urn:uuid:x")
    assert replay_key("urn:oid:1", "urn:uuid:x") != replay_key("urn:oid:2", "urn:uuid:x")
    assert replay_key("urn:oid:1", "2:m") != replay_key("urn:oid:12", ":m")
    assert len(replay_key("i", "m" * 100_000)) == 64


async def test_memory_guard_refuses_a_key_until_it_expires() -> None:
    guard = MemoryReplayGuard(max_entries=10)
    assert await guard.first_use("k", until=NOW + MINUTE, now=NOW)
    assert not await guard.first_use("k", until=NOW + 10 * MINUTE, now=NOW + MINUTE / 2)
    # At expiry the key is gone: its assertion is refused from then on anyway.
    assert await guard.first_use("k", until=NOW + 3 * MINUTE, now=NOW + MINUTE)
    assert not await guard.first_use("k", until=NOW + 3 * MINUTE, now=NOW + 2 * MINUTE)


async def test_memory_guard_purges_what_expired_and_refuses_when_full() -> None:
    guard = MemoryReplayGuard(max_entries=3)
    for i in range(3):
        assert await guard.first_use(f"k{i}", until=NOW + (i + 1) * MINUTE, now=NOW)
    with pytest.raises(ReplayStoreFull):
        await guard.first_use("k3", until=NOW + 5 * MINUTE, now=NOW)
    assert len(guard) == 3
    # Two have expired by now: they are purged, so there is room again, and memory does not grow.
    assert await guard.first_use("k3", until=NOW + 5 * MINUTE, now=NOW + 2 * MINUTE)
    assert len(guard) == 2
    assert not await guard.first_use("k2", until=NOW + 5 * MINUTE, now=NOW + 2 * MINUTE)


def _config(url: str | None) -> DuoConfig:
    raw: dict[str, Any] = {
        "gateway": {"home_community_id": "urn:oid:2.16.528.1.1007.99.1", "ura": "00099001", "name": "DUO"},
        "mitz": {"closed_url": "http://127.0.0.1:1/c", "open_url": "http://127.0.0.1:1/o",
                 "subscriptions_url": "http://127.0.0.1:1/s"}}
    if url is not None:
        raw["storage"] = {"url": url}
    return parse_config(raw, base_dir=None, source="test", env={})


def test_the_store_follows_storage_url() -> None:
    """One DUO (no url, or SQLite) remembers in memory; PostgreSQL means replicas, so the table."""
    assert isinstance(replay_guard(_config(None)), MemoryReplayGuard)
    assert isinstance(replay_guard(_config("sqlite:////tmp/x.sqlite")), MemoryReplayGuard)
    assert isinstance(replay_guard(_config("postgresql://duo@127.0.0.1:1/duo")), PostgresReplayGuard)


@pytest.fixture(scope="module")
def postgres() -> Iterator[Postgres]:
    with run_postgres() as server:
        yield server


async def test_replicas_sharing_postgresql_refuse_each_others_keys(postgres: Postgres) -> None:
    url = postgres.create_database("replay")
    one, two = PostgresReplayGuard(url), PostgresReplayGuard(url)
    await asyncio.gather(one.open(), two.open())  # both create the table at once: no error
    try:
        assert await one.first_use("k", until=NOW + MINUTE, now=NOW)
        assert not await two.first_use("k", until=NOW + MINUTE, now=NOW)
        assert not await one.first_use("k", until=NOW + MINUTE, now=NOW)
        # Many replicas racing for one key: exactly one wins.
        wins = await asyncio.gather(*(g.first_use("race", until=NOW + MINUTE, now=NOW)
                                      for g in (one, two) * 4))
        assert wins.count(True) == 1
        # An expired key is taken over (no purge needed for correctness) ...
        assert await two.first_use("k", until=NOW + 3 * MINUTE, now=NOW + MINUTE)
        assert not await one.first_use("k", until=NOW + 3 * MINUTE, now=NOW + 2 * MINUTE)
    finally:
        await asyncio.gather(one.close(), two.close())


async def test_postgresql_store_purges_expired_keys(postgres: Postgres) -> None:
    import psycopg

    url = postgres.create_database("purge")
    guard = PostgresReplayGuard(url, purge_interval_s=0.0)  # every call purges (default: once a minute)
    await guard.open()
    try:
        for i in range(5):
            assert await guard.first_use(f"old{i}", until=NOW + MINUTE, now=NOW)
        assert await guard.first_use("new", until=NOW + 10 * MINUTE, now=NOW + 2 * MINUTE)
        with psycopg.connect(url) as conn:
            rows = conn.execute("SELECT key FROM xua_replay ORDER BY key").fetchall()
        assert rows == [("new",)]
    finally:
        await guard.close()
