"""The views' disk cache: one byte budget across all views, least recently used first out, never what
someone is reading, and a fetch that waits for room instead of overrunning the budget."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pydicom.dataset import Dataset

from duo_gateway.views.cache import CachedInstance, CacheFull, ViewCache


async def cached(cache: ViewCache, tmp_path: Path, name: str, size: int,
                 evicted: list[str] | None = None) -> CachedInstance:
    await cache.reserve(size, wait_s=0.5)
    path = tmp_path / name
    path.write_bytes(b"\0" * size)
    def told(e: CachedInstance) -> None:
        if evicted is not None:
            evicted.append(e.sop_instance_uid)

    entry = CachedInstance(name, "1.2", "1.2.3", "1.2.840.10008.1.2.1", path, size, Dataset(), on_evict=told)
    cache.add(entry)
    return entry


async def test_the_least_recently_used_instance_goes_first_and_its_owner_is_told(tmp_path: Path) -> None:
    cache = ViewCache(tmp_path, 300)
    evicted: list[str] = []
    a = await cached(cache, tmp_path, "a", 100, evicted)
    b = await cached(cache, tmp_path, "b", 100, evicted)
    await cached(cache, tmp_path, "c", 100, evicted)
    cache.touch(a)  # a was read just now: b is the oldest
    await cached(cache, tmp_path, "d", 100, evicted)
    assert evicted == ["b"] and not b.path.exists() and a.path.exists()
    assert cache.used == 300 and cache.high_water == 300


async def test_an_instance_being_read_stays_and_a_fetch_waits_for_room(tmp_path: Path) -> None:
    cache = ViewCache(tmp_path, 200)
    a = await cached(cache, tmp_path, "a", 100)
    b = await cached(cache, tmp_path, "b", 100)
    a.readers = b.readers = 1
    with pytest.raises(CacheFull):
        await cache.reserve(100, wait_s=0.05)
    waiting = asyncio.create_task(cache.reserve(100, wait_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()
    cache.done_reading(b)  # b may go now: the waiting fetch gets its room
    await asyncio.wait_for(waiting, 1)
    assert not b.path.exists() and a.path.exists() and cache.used == 200


async def test_an_instance_larger_than_the_budget_passes_alone(tmp_path: Path) -> None:
    cache = ViewCache(tmp_path, 100)
    await cache.reserve(500, wait_s=0.1)  # nothing else cached: let in, or it could never be shown
    with pytest.raises(CacheFull):
        await cache.reserve(1, wait_s=0.05)
    cache.release(500)
    assert cache.used == 0


async def test_removing_an_entry_gives_its_bytes_back(tmp_path: Path) -> None:
    cache = ViewCache(tmp_path, 100)
    a = await cached(cache, tmp_path, "a", 60)
    cache.remove(a)
    assert cache.used == 0 and not a.path.exists()
    cache.remove(a)  # twice is harmless
    assert cache.used == 0
