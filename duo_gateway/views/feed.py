"""One study of one view: fetched from its source in the background, served as each instance lands.

A viewer asks for the first image long before the last one of a large study has come. So the fetch
starts when the view is made, and every request waits only for the instances it names: a study,
series or instance retrieve streams what has arrived and waits for the rest in turn; a metadata
request waits for the headers it needs, never for every pixel of the study.

The source is reached through the same :class:`~duo_gateway.transfer.fetch.StudyFetcher` a transfer
uses (the TLB hospital's PACS behind the Mitz Permit the view was made with, or the community's
ITI-39 + RAD-75), so the manifest it checks against and the instances it delivers are the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import Collection, Sequence
from contextlib import aclosing
from pathlib import Path

import structlog
from pydicom import dcmread
from pydicom.dataset import Dataset

from duo_gateway.transfer.fetch import Fetched, FetchFailed, Missed, StudyFetcher
from duo_gateway.transfer.jobstore import ExpectedInstance
from duo_gateway.views.cache import CachedInstance, CacheFull, ViewCache

log = structlog.get_logger(__name__)

#: Instances up to this size are written into the cache on the event loop (see ``_store``).
_WRITE_ON_LOOP = 4 * 1024 * 1024


class InstanceGone(Exception):
    """The instance will not come: the source did not deliver it, or the view closed."""


class StudyFeed:
    def __init__(self, *, study_id: str, study_uid: str, source: str, fetcher: StudyFetcher,
                 manifest: Sequence[ExpectedInstance], cache: ViewCache, directory: Path,
                 wait_s: float) -> None:
        self.study_id = study_id
        self.study_uid = study_uid
        self.source = source
        self.expected = {e.sop_instance_uid: e for e in manifest}
        #: Series UID -> its SOP Instance UIDs, in the manifest's order.
        self.series: dict[str, list[str]] = {}
        for e in manifest:
            self.series.setdefault(e.series_instance_uid, []).append(e.sop_instance_uid)
        self._fetcher = fetcher
        self._cache = cache
        self._dir = directory
        self._wait_s = wait_s
        self._cached: dict[str, CachedInstance] = {}
        #: Headers stay after an eviction: metadata never has to wait for a second fetch.
        self._headers: dict[str, Dataset] = {}
        self._missed: dict[str, str] = {}
        self._fetching: set[str] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._changed = asyncio.Event()
        self._closed = False

    # -- fetching ----------------------------------------------------------------------------
    def start(self) -> None:
        self._dir.mkdir(parents=True, exist_ok=True)
        self._spawn(list(self.expected.values()))

    def _spawn(self, wanted: list[ExpectedInstance]) -> None:
        self._fetching.update(w.sop_instance_uid for w in wanted)
        task = asyncio.create_task(self._run(wanted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, wanted: list[ExpectedInstance]) -> None:
        try:
            # In memory where the source can: each instance is written once, into the cache.
            async with aclosing(self._fetcher.fetch(wanted, in_memory=True)) as stream:
                async for item in stream:
                    if isinstance(item, Missed):
                        self._missed[item.sop_instance_uid] = item.detail
                        self._fetching.discard(item.sop_instance_uid)
                        self._notify()
                    else:
                        await self._store(item)
        except FetchFailed as exc:
            self._give_up(wanted, exc.detail)
        except CacheFull as exc:
            self._give_up(wanted, str(exc))
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("view_fetch_failed", source=self.source)
            self._give_up(wanted, "DUO failed while fetching it")
        finally:
            for w in wanted:
                self._fetching.discard(w.sop_instance_uid)
            self._notify()

    def _give_up(self, wanted: list[ExpectedInstance], detail: str) -> None:
        for w in wanted:
            if w.sop_instance_uid not in self._cached:
                self._missed.setdefault(w.sop_instance_uid, detail)

    async def _store(self, item: Fetched) -> None:
        uid = item.sop_instance_uid
        expected = self.expected.get(uid)
        if expected is None or self._closed or uid in self._cached:
            await _discard(item)
            return
        try:
            await self._cache.reserve(item.size, wait_s=self._wait_s)
        except CacheFull:
            await _discard(item)
            raise
        target = self._dir / f"{uid}.dcm"
        try:
            if item.data is not None and len(item.data) <= _WRITE_ON_LOOP:
                # A local write of a slice or two is cheaper than a hop to a thread, which under a
                # busy loop waits for the GIL's switch interval (5 ms) once per instance.
                target.write_bytes(item.data)
            else:
                await asyncio.to_thread(_place, item, target)
        except Exception:
            self._cache.release(item.size)
            await _discard(item)
            raise
        if self._closed:
            self._cache.release(item.size)
            await asyncio.to_thread(target.unlink, missing_ok=True)
            return
        entry = CachedInstance(
            sop_instance_uid=uid, series_instance_uid=expected.series_instance_uid,
            sop_class_uid=item.sop_class_uid or expected.sop_class_uid,
            transfer_syntax_uid=item.transfer_syntax_uid or "", path=target, size=item.size,
            header=None, on_evict=self._evicted)
        self._cached[uid] = entry
        self._missed.pop(uid, None)
        self._fetching.discard(uid)
        self._cache.add(entry)
        self._notify()

    def _evicted(self, entry: CachedInstance) -> None:
        if self._cached.get(entry.sop_instance_uid) is entry:
            del self._cached[entry.sop_instance_uid]

    def _notify(self) -> None:
        self._changed.set()
        self._changed = asyncio.Event()

    # -- serving -----------------------------------------------------------------------------
    async def instance(self, uid: str) -> CachedInstance:
        """The cached instance, waited for if it is on its way (fetched again if it was evicted). The
        caller reads it and then calls :meth:`ViewCache.done_reading`; until then it stays on disk.
        KeyError: not in this study; InstanceGone: it will not come; TimeoutError: not in time."""
        if uid not in self.expected:
            raise KeyError(uid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while True:
            if self._closed:
                raise InstanceGone("the view was closed")
            entry = self._cached.get(uid)
            if entry is not None:
                entry.readers += 1
                self._cache.touch(entry)
                return entry
            if uid in self._missed:
                raise InstanceGone(self._missed[uid])
            if uid not in self._fetching:
                self._spawn([self.expected[uid]])  # evicted meanwhile: from the source again
            await self._until_change(deadline)

    async def header(self, uid: str) -> Dataset:
        """The instance's dataset without pixel data, as soon as it has arrived once."""
        if uid not in self.expected:
            raise KeyError(uid)
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while (found := self._headers.get(uid)) is None:
            if self._closed:
                raise InstanceGone("the view was closed")
            if uid in self._cached:
                await self.read_headers()
                continue
            if uid in self._missed:
                raise InstanceGone(self._missed[uid])
            if uid not in self._fetching:
                self._spawn([self.expected[uid]])
            await self._until_change(deadline)
        return found

    def arrived(self, uid: str) -> bool:
        return uid in self._headers or uid in self._cached

    async def read_headers(self, uids: Collection[str] | None = None) -> None:
        """Read the headers of the instances (of ``uids``, default every one) that arrived and were not
        read yet, in one hop to a thread: headers are read when metadata or a search needs them,
        never on the fetch's path, and a batch at a time rather than one hop per instance."""
        pending = [(uid, e) for uid, e in self._cached.items()
                   if uid not in self._headers and (uids is None or uid in uids)]
        if not pending:
            return
        for _uid, entry in pending:
            entry.readers += 1  # kept on disk while they are read
        try:
            read = await asyncio.to_thread(_read_headers, [(uid, e.path) for uid, e in pending])
        finally:
            for _uid, entry in pending:
                self._cache.done_reading(entry)
        for uid, header in read.items():
            self._headers[uid] = header
            cached = self._cached.get(uid)
            if cached is not None:
                cached.header = header
                meta = getattr(header, "file_meta", None)
                if meta is not None and meta.get("TransferSyntaxUID"):
                    cached.transfer_syntax_uid = str(meta.TransferSyntaxUID)

    async def known_header(self, uid: str) -> Dataset | None:
        """The header if the instance has arrived (read now if need be), else None: no waiting."""
        if uid in self._cached and uid not in self._headers:
            await self.read_headers((uid,))
        return self._headers.get(uid)

    async def any_header(self, uids: Sequence[str]) -> Dataset | None:
        """The header of the first of ``uids`` to arrive (of those that do), for the attributes a
        series or study shares; None when none of them comes."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._wait_s
        while True:
            for uid in uids:
                if (found := await self.known_header(uid)) is not None:
                    return found
            if all(uid in self._missed for uid in uids) or self._closed:
                return None
            if not any(uid in self._fetching for uid in uids):
                self._spawn([self.expected[uids[0]]])
            await self._until_change(deadline)

    async def _until_change(self, deadline: float) -> None:
        left = deadline - asyncio.get_running_loop().time()
        if left <= 0:
            raise TimeoutError("the instance did not arrive in time")
        await asyncio.wait_for(self._changed.wait(), left)

    # -- the end -----------------------------------------------------------------------------
    async def close(self) -> None:
        """Stop fetching, forget every instance, delete the files."""
        self._closed = True
        self._notify()
        for task in list(self._tasks):
            task.cancel()
        for task in list(self._tasks):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for entry in list(self._cached.values()):
            self._cache.remove(entry)
        self._cached.clear()
        self._headers.clear()
        await asyncio.to_thread(shutil.rmtree, self._dir, True)


def _place(item: Fetched, target: Path) -> None:
    """The instance into the cache: written once from memory, or its spool file moved."""
    if item.data is not None:
        target.write_bytes(item.data)
    else:
        shutil.move(item.file(), target)


def _read_headers(files: list[tuple[str, Path]]) -> dict[str, Dataset]:
    read: dict[str, Dataset] = {}
    for uid, path in files:
        with contextlib.suppress(FileNotFoundError):
            read[uid] = dcmread(path, stop_before_pixels=True)
    return read


async def _discard(item: Fetched) -> None:
    if item.path is not None:
        await asyncio.to_thread(item.path.unlink, missing_ok=True)
