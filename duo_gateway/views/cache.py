"""The disk cache every view's fetched instances share, bounded in bytes across all views.

Why one budget for all: a view holds a remote study only while someone may look at it, and what a
single DUO can keep on disk does not grow with the number of clinicians viewing. When an instance
would not fit, the least recently used instances that nobody is reading right now go first, from
any view; their feed fetches them again if they are asked for later. When nothing can go (every
cached instance is being read), the fetch waits for room, and with it the source (back-pressure),
instead of overrunning the budget.

Loop-only: every method runs on the event loop, so plain counters suffice.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import structlog
from pydicom.dataset import Dataset

log = structlog.get_logger(__name__)


@dataclass(eq=False)
class CachedInstance:
    """One fetched instance on disk. ``header`` is its dataset without pixel data (metadata, QIDO), read
    when first needed."""

    sop_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    path: Path
    size: int
    header: Dataset | None
    #: Readers holding the file open now: such an entry is never evicted.
    readers: int = 0
    #: Called when the cache evicts it, so its owner forgets it (and fetches it again on demand).
    on_evict: Callable[[CachedInstance], None] | None = field(default=None, repr=False)


class CacheFull(Exception):
    """No room came within the wait: every cached instance is being read."""


class ViewCache:
    def __init__(self, root: Path, limit: int) -> None:
        if limit < 1:
            raise ValueError("limit must be >= 1")
        self.root = root
        self.limit = limit
        #: Bytes of cached files plus reservations of files being written.
        self.used = 0
        self.high_water = 0
        self._lru: OrderedDict[int, CachedInstance] = OrderedDict()
        self._keys = itertools.count()
        self._key_of: dict[int, int] = {}  # id(entry) -> LRU key
        self._room = asyncio.Event()

    async def reserve(self, size: int, *, wait_s: float) -> None:
        """Room for ``size`` bytes, evicting what nobody reads; waits up to ``wait_s`` for readers to
        finish. An instance larger than the whole budget is let in when the cache is otherwise empty,
        or it could never be shown."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + wait_s
        while True:
            self._evict_for(size)
            if self.used + size <= self.limit or self.used == 0:
                self.used += size
                self.high_water = max(self.high_water, self.used)
                return
            left = deadline - loop.time()
            if left <= 0:
                raise CacheFull(f"the view cache ({self.limit} bytes) is full of instances being read")
            self._room.clear()
            try:
                await asyncio.wait_for(self._room.wait(), left)
            except TimeoutError:
                pass

    def release(self, size: int) -> None:
        """Give back a reservation that did not become an entry, or an entry's bytes."""
        self.used -= size
        self._room.set()

    def add(self, entry: CachedInstance) -> None:
        """A reserved, now written instance becomes evictable (most recently used)."""
        key = next(self._keys)
        self._key_of[id(entry)] = key
        self._lru[key] = entry

    def touch(self, entry: CachedInstance) -> None:
        key = self._key_of.get(id(entry))
        if key is not None:
            self._lru.move_to_end(key)

    def remove(self, entry: CachedInstance) -> None:
        """Its owner drops it (the view closed): bytes back, file gone."""
        key = self._key_of.pop(id(entry), None)
        if key is None:
            return
        del self._lru[key]
        entry.path.unlink(missing_ok=True)
        self.release(entry.size)

    def done_reading(self, entry: CachedInstance) -> None:
        entry.readers -= 1
        if entry.readers == 0:
            self._room.set()

    def _evict_for(self, size: int) -> None:
        if self.used + size <= self.limit:
            return
        for key, entry in list(self._lru.items()):
            if self.used + size <= self.limit:
                return
            if entry.readers:
                continue
            del self._lru[key]
            self._key_of.pop(id(entry), None)
            entry.path.unlink(missing_ok=True)
            self.used -= entry.size
            log.info("view_cache_evicted", bytes=entry.size)
            if entry.on_evict is not None:
                entry.on_evict(entry)
