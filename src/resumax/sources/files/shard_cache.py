"""`ShardCache`: whole remote shards in a bounded local directory, shared by every process of a
host, each shard downloaded to a temporary name, checked against its size and content hash, and
renamed into place.

Layout of the cache directory:
    shards/<hash>-<size>.array_record    complete, checked shards (named by content: two datasets,
                                         or two copies of one, share a directory safely)
    tmp/<hash>-<size>.<pid>.<n>.partial  downloads in progress (counted at their full size)
    locks/<hash>-<size>.lock             held while one process downloads that shard (removed by
                                         it when done)
    .lock                                held while a process counts the bytes and evicts

A process pins the shards it still needs (a shared `flock` on the shard), and eviction skips
pinned shards; among the rest it removes the one whose next use is farthest (`next_use`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import fcntl
import hashlib
import itertools
import os
import re
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from resumax.errors import DataSourceError
from resumax.records import shard_index, storage
from resumax.sources.files import cache_locks
from resumax.sources.files.download import download

_SHARD_SUFFIX = ".array_record"
_PARTIAL_SUFFIX = ".partial"
_POLL = 0.05


class NoRoom(Exception):
    """No room for a download ahead of need without evicting a shard needed sooner."""


@dataclasses.dataclass(frozen=True)
class RemoteShards:
    """The objects of a remote set: URLs, sizes, content hashes (None where only the size can be
    checked, e.g. a TFDS set) and the fsspec options to reach them (never part of a state)."""

    urls: tuple[str, ...]
    sizes: tuple[int, ...]
    hashes: tuple[str | None, ...]
    storage_options: dict[str, Any]

    def key(self, file_id: int) -> str:
        """The cache name of a shard: its content hash (or a hash of its URL) and size."""
        content = self.hashes[file_id]
        if content is None:
            content = hashlib.sha256(self.urls[file_id].encode()).hexdigest()[:32]
        return f"{content}-{self.sizes[file_id]}"


@dataclasses.dataclass(frozen=True)
class CacheSettings:
    """Where and how much: the directory, its byte limit, parallel downloads and the seconds one
    shard's download (with its retries) may take."""

    directory: str
    limit: int
    fetch_threads: int
    fetch_timeout: float


def shard_path(directory: str, key: str) -> str:
    """Where the cache in `directory` keeps the complete shard named `key`."""
    return os.path.join(directory, "shards", key + _SHARD_SUFFIX)


_SHARD_NAME = re.compile(r"^[^.]+-(\d+)\.array_record$")
_PARTIAL_NAME = re.compile(r"^[^.]+-(\d+)\.(\d+)\.\d+\.partial$")


def _size_of(directory: str, name: str) -> int:
    """The bytes of a file in shards/: the size its name records (`<hash>-<size>...`), or
    what a file under another name (never a shard of any set) holds."""
    match = _SHARD_NAME.match(name)
    with contextlib.suppress(OSError):
        return int(match.group(1)) if match else os.path.getsize(os.path.join(directory, name))
    return 0


class ShardCache:
    """Local copies of the shards of one remote set, within `settings.limit` bytes on disk."""

    def __init__(self, shards: RemoteShards, settings: CacheSettings):
        self.shards, self.settings = shards, settings
        root = settings.directory
        self._dirs = {name: os.path.join(root, name) for name in ("shards", "tmp", "locks")}
        for directory in self._dirs.values():
            os.makedirs(directory, exist_ok=True)
        self._by_name = {
            shards.key(file_id) + _SHARD_SUFFIX: file_id for file_id in range(len(shards.urls))
        }
        self._paths = [shard_path(root, shards.key(f)) for f in range(len(shards.urls))]
        self._pins: dict[int, tuple[int, int]] = {}  # file id -> (fd, count)
        self._lock = threading.Lock()
        self._counter = itertools.count()
        # This process's downloads in progress, by file id: set once each ends, however.
        self._downloading: dict[int, threading.Event] = {}
        # File ids known to be on disk (downloaded, found or pinned by this object); another
        # process may have evicted one since: `fetch` checks the disk itself.
        self.present: set[int] = set()
        # Farthest next use first: set by the owner (from the read order); None: listing order.
        self.next_use: Callable[[], np.ndarray] | None = None
        # Closes this process's reader of a shard (at the reader's next read): called with each
        # shard this object evicts, and each one a read-ahead releases while the set does not
        # fit (closing a reader of a deleted file frees its disk: slow, and it holds the GIL).
        self.close_reader: Callable[[int], None] | None = None
        self.downloaded_bytes = 0
        self._filesystems: dict[str | None, Any] = {}  # by protocol
        # The size each shard's name records (`<hash>-<size>.array_record`), parsed once.
        self._sizes_by_name: dict[str, int] = {}

    @property
    def directory(self) -> str:
        """The directory of the complete shards."""
        return self._dirs["shards"]

    def path(self, file_id: int) -> str:
        return self._paths[file_id]

    # Fetching ---------------------------------------------------------------------------------

    def fetch(self, file_id: int, pin: bool = False, evict_after: int | None = None) -> str:
        """The local path of shard `file_id`, downloaded first if missing (once per host: a
        process downloading it is waited for); pinned when `pin`. DataSourceError naming the
        URL when it cannot be had within `fetch_timeout`.

        With `evict_after` (a download ahead of need, at that next use), only shards used later
        (or of other sets) are evicted, and NoRoom is raised at once when that frees too little.
        """
        path = self.path(file_id)
        if pin and self._pin_again(file_id):
            return path
        deadline = time.monotonic() + self.settings.fetch_timeout
        while True:
            if os.path.exists(path):
                self.present.add(file_id)
                if not pin or self._pin(file_id):
                    return path
                continue  # evicted by another process before the pin: fetch again
            if time.monotonic() > deadline:
                raise DataSourceError(
                    f"cannot fetch {self.shards.urls[file_id]!r} within fetch_timeout="
                    f"{self.settings.fetch_timeout} s"
                )
            self._download_once(file_id, deadline, evict_after)

    def _download_once(self, file_id: int, deadline: float, evict_after: int | None) -> None:
        """Downloads the shard unless a thread of this process (waited for on an event) or
        another process (waited for on its lock file) is downloading it already."""
        with self._lock:
            running = self._downloading.get(file_id)
            if running is None:
                self._downloading[file_id] = threading.Event()
        if running is not None:
            running.wait(max(deadline - time.monotonic(), 0.0))
            return  # the caller checks the disk again
        key = self.shards.key(file_id)
        lock = os.path.join(self._dirs["locks"], key + ".lock")
        try:
            with cache_locks.download_lock(lock, deadline + self.settings.fetch_timeout):
                if not os.path.exists(self.path(file_id)):
                    self._download(file_id, deadline, evict_after)
        except TimeoutError:
            raise DataSourceError(
                f"cannot fetch {self.shards.urls[file_id]!r}: another process has been "
                f"downloading it for over {self.settings.fetch_timeout} s"
            ) from None
        finally:
            with self._lock:
                self._downloading.pop(file_id).set()

    def _download(self, file_id: int, deadline: float, evict_after: int | None) -> None:
        """Downloads one shard into a reserved partial file, checks it and renames it."""
        url, size = self.shards.urls[file_id], self.shards.sizes[file_id]
        name = f"{self.shards.key(file_id)}.{os.getpid()}.{next(self._counter)}{_PARTIAL_SUFFIX}"
        partial = os.path.join(self._dirs["tmp"], name)
        cache_locks.PARTIALS.add((os.getpid(), partial))
        try:
            self._reserve(partial, size, deadline, url, evict_after)
            fs, remote_path = self._remote(file_id)
            download(url, fs, remote_path, partial, deadline, self.settings.fetch_timeout)
            self._check(file_id, partial)
            os.replace(partial, self.path(file_id))
            with self._lock:  # several download threads finish at once
                self.downloaded_bytes += size
        finally:
            cache_locks.PARTIALS.discard((os.getpid(), partial))
            with contextlib.suppress(FileNotFoundError):
                os.remove(partial)

    def _remote(self, file_id: int) -> tuple[Any, str]:
        """(fsspec filesystem, path in it) of a shard; one filesystem per protocol, made once
        per process."""
        url = self.shards.urls[file_id]
        scheme = storage.protocol(url)
        fs = self._filesystems.get(scheme)
        if fs is None:
            fs, path = storage.filesystem(url, self.shards.storage_options)
            self._filesystems[scheme] = fs
            return fs, path
        return fs, fs._strip_protocol(url)

    def _check(self, file_id: int, partial: str) -> None:
        """Refuses a download whose size or content hash is not the index's."""
        url, size, expected = (
            self.shards.urls[file_id],
            self.shards.sizes[file_id],
            self.shards.hashes[file_id],
        )
        found = os.path.getsize(partial)
        if found != size:
            raise DataSourceError(
                f"{url!r} has {found} bytes where its shard index says {size}: the object "
                "changed since the set was indexed; write the set anew or run `resumax index`"
            )
        if expected is not None and shard_index.content_hash(partial) != expected:
            raise DataSourceError(
                f"{url!r} does not hold the content its shard index records (content hash "
                f"{expected}): the object was replaced; write the set anew or run `resumax index`"
            )

    # Room -------------------------------------------------------------------------------------

    def _reserve(
        self, partial: str, size: int, deadline: float, url: str, evict_after: int | None
    ) -> None:
        """Creates `partial` once the directory has room for `size` more bytes, evicting the
        unpinned shards used farthest ahead (only those used after `evict_after`, if given:
        else NoRoom); waits for pins to go until `deadline`."""
        limit = self.settings.limit
        if size > limit:
            raise DataSourceError(
                f"{url!r} has {size} bytes, more than cache_limit={limit}: raise cache_limit"
            )
        while True:
            with cache_locks.flock(os.path.join(self.settings.directory, ".lock"), fcntl.LOCK_EX):
                used, shards = self._usage()
                if used + size > limit:
                    for victim in self._victims(shards, evict_after):
                        used -= self._evict(victim)
                        if used + size <= limit:
                            break
                if used + size <= limit:
                    open(partial, "wb").close()
                    return
            if evict_after is not None:
                raise NoRoom(url)
            if time.monotonic() > deadline:
                raise DataSourceError(
                    f"cannot fetch {url!r}: cache_limit={limit} bytes is full of shards still "
                    "in use (pinned by this or other processes); raise cache_limit or use a "
                    "smaller shuffle_window"
                )
            time.sleep(_POLL)

    def _usage(self) -> tuple[int, list[str]]:
        """Bytes held (complete shards and reserved downloads) and the complete shards' names;
        partial files of processes that no longer run are removed."""
        # tmp/ first: a download renamed into shards/ meanwhile (renames take no lock) is then
        # listed in both, never missed (which let one shard more in than the limit allows), and
        # counted once: a partial whose shard is complete is that rename (one download of a key
        # per host at a time). Counting it twice evicted a shard still to be used.
        partials = os.listdir(self._dirs["tmp"])
        shards = os.listdir(self._dirs["shards"])
        complete = {name[: -len(_SHARD_SUFFIX)] for name in shards}
        known, used = self._sizes_by_name, 0
        for name in shards:
            size = known.get(name)
            if size is None:
                match = _SHARD_NAME.match(name)
                if match is None:  # not a shard of any set: counted as it is now
                    used += _size_of(self._dirs["shards"], name)
                    continue
                size = known[name] = int(match.group(1))
            used += size
        for name in partials:
            match = _PARTIAL_NAME.match(name)  # anything else is no download in progress
            pid = int(match.group(2)) if match else -1
            if pid != os.getpid() and not cache_locks.alive(pid):
                with contextlib.suppress(FileNotFoundError):
                    os.remove(os.path.join(self._dirs["tmp"], name))
            elif name.split(".", 1)[0] not in complete:
                used += int(match.group(1))
        return used, shards

    def _victims(self, names: list[str], evict_after: int | None) -> list[str]:
        """Cached shard names, the one to evict first first: shards of other sets, then this
        set's by farthest next use (only those used after `evict_after`, if given)."""
        by_name = self._by_name
        file_ids = np.fromiter((by_name.get(name, -1) for name in names), np.int64, len(names))
        ours = file_ids >= 0
        ranks = np.full(len(names), np.inf)
        ranks[ours] = self.next_use()[file_ids[ours]] if self.next_use is not None else 0.0
        order = np.argsort(-ranks, kind="stable")
        if evict_after is not None:
            order = order[ranks[order] > evict_after]
        return [names[position] for position in order.tolist()]

    def _evict(self, name: str) -> int:
        """Removes a cached shard unless a process pins it; the bytes freed (0 if pinned)."""
        path = os.path.join(self._dirs["shards"], name)
        try:
            fd = os.open(path, os.O_RDONLY)
        except FileNotFoundError:
            return 0
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            size = _size_of(self._dirs["shards"], name)
            os.remove(path)
        except BlockingIOError:
            return 0  # pinned
        finally:
            os.close(fd)
        file_id = self._by_name.get(name)
        if file_id is not None:
            self.present.discard(file_id)
            if self.close_reader is not None:
                self.close_reader(file_id)
        return size

    # Pins -------------------------------------------------------------------------------------

    def _pin_again(self, file_id: int) -> bool:
        """One more pin of a shard this object pins already (no system call); else False."""
        with self._lock:
            held = self._pins.get(file_id)
            if held is None:
                return False
            self._pins[file_id] = (held[0], held[1] + 1)
            return True

    def _pin(self, file_id: int) -> bool:
        """Holds a shared lock on the cached shard (eviction skips it); False if it is gone."""
        with self._lock:
            held = self._pins.get(file_id)
            if held is not None:
                self._pins[file_id] = (held[0], held[1] + 1)
                return True
            try:
                fd = os.open(self.path(file_id), os.O_RDONLY)
            except FileNotFoundError:
                return False
            fcntl.flock(fd, fcntl.LOCK_SH)
            if not os.path.exists(self.path(file_id)):  # evicted while we waited for the lock
                os.close(fd)
                return False
            self._pins[file_id] = (fd, 1)
            return True

    def pinned(self) -> set[int]:
        """The file ids this cache object pins."""
        with self._lock:
            return set(self._pins)

    def unpin(self, file_ids: Sequence[int]) -> None:
        """Releases one pin of each shard (taken by `fetch(..., pin=True)`)."""
        with self._lock:
            for file_id in file_ids:
                if file_id not in self._pins:
                    continue  # released by close() already
                fd, count = self._pins[file_id]
                if count > 1:
                    self._pins[file_id] = (fd, count - 1)
                else:
                    del self._pins[file_id]
                    os.close(fd)

    def close(self) -> None:
        """Releases every pin."""
        with self._lock:
            for fd, _ in self._pins.values():
                os.close(fd)
            self._pins.clear()
