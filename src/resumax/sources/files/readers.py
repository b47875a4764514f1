"""`ArrayRecordFiles`: records of many ArrayRecord files by one global index, read through a bounded
pool of readers opened on demand, each checked to be the very file the source was built on.
"""

from __future__ import annotations

import errno
import operator
import os
import resource
import stat as stat_module
import threading
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np
from array_record.python import array_record_module

from resumax.errors import DataFileNotFoundError, DataSourceError
from resumax.sources.files.parallel_open import close_in_background, open_many

# The default pool leaves half the process's open-file limit, and at least _MIN_RESERVE
# descriptors, to everything else the process opens (sockets, pipes to workers, JAX, checkpoints):
# 128 readers under `ulimit -n 1024` (1/8 of small limits), 10,000 under 20,000; within bounds.
_LIMIT_FRACTION, _MIN_RESERVE, _MIN_DEFAULT, _MAX_DEFAULT = 8, 896, 16, 32768
_RANDOM_ACCESS_OPTIONS = "readahead_buffer_size:0,max_parallelism:0"


def default_max_open_files() -> int:
    """Readers a source keeps open by default: the process's soft `ulimit -n` less half of it
    (at least 896 left free), but no less than 1/8 of it: 128 under 1024, 1,024 under 2,048,
    10,000 under 20,000; between 16 and 32,768 (an open reader costs about 2 KB). The limit is
    read, never raised. Each worker process has its own pool and its own limit."""
    soft_limit, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft_limit == resource.RLIM_INFINITY:
        return _MAX_DEFAULT
    spare = soft_limit - max(_MIN_RESERVE, soft_limit // 2)
    return max(_MIN_DEFAULT, min(_MAX_DEFAULT, max(soft_limit // _LIMIT_FRACTION, spare)))


# Which file a path named when the source was built, as (size, mtime_ns, inode, device): a rewrite
# or a replacement changes it. Plain tuples: a source over 10^5 files builds one per file.
FileIdentity = tuple[int, int, int, int]


def file_identity(stat: os.stat_result) -> FileIdentity:
    return stat.st_size, stat.st_mtime_ns, stat.st_ino, stat.st_dev


def _describe(identity: FileIdentity) -> str:
    size, mtime_ns, inode, device = identity
    return f"{size} bytes, mtime_ns {mtime_ns}, inode {inode} on device {device}"


def os_refusal(path: str, error: OSError, max_open_files: int | None = None) -> DataSourceError:
    """A DataSourceError saying that the OS refused `path`, why, and what to do about it."""
    if error.errno in (errno.EMFILE, errno.ENFILE):
        pool = f" (now {max_open_files})" if max_open_files is not None else ""
        return DataSourceError(
            f"cannot open {path!r}: the operating system refused to open another file "
            f"({error.strerror}); raise the open-file limit (`ulimit -n`) or lower the source's "
            f"max_open_files{pool}"
        )
    if error.errno in (errno.EACCES, errno.EPERM):
        return DataSourceError(
            f"cannot open {path!r}: permission denied ({error.strerror}); fix the permissions of "
            "the file and its directories, or run as a user who may read them"
        )
    return DataSourceError(f"cannot open {path!r}: {error.strerror or error}")


def stat_data_file(path: str) -> os.stat_result:
    """os.stat of a data file, or DataSourceError naming it when it is missing, a directory or
    empty."""
    try:
        stat = os.stat(path)
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file {path!r} does not exist") from None
    except OSError as error:
        raise os_refusal(path, error) from error
    if stat_module.S_ISDIR(stat.st_mode):
        raise DataSourceError(
            f"data path {path!r} is a directory; pass files or a glob such as "
            f"{os.path.join(path, '*.array_record')}"
        )
    if stat.st_size == 0:
        raise DataSourceError(
            f"data file {path!r} is empty (0 bytes); it is not an ArrayRecord file"
        )
    return stat


def stat_files(paths: list[str]) -> list[FileIdentity]:
    """The identity (size, mtime_ns, inode, device) of every data file, from one tight loop of
    os.stat; on any missing, unreadable, directory or empty file, `stat_data_file`'s
    DataSourceError naming the first such path."""
    try:
        stats = list(map(os.stat, paths))
    except OSError:
        stats = None
    if stats is not None:
        modes = set(map(operator.attrgetter("st_mode"), stats))
        identities = list(map(_IDENTITY, stats))
        if not any(map(stat_module.S_ISDIR, modes)) and not any(i[0] == 0 for i in identities):
            return identities
    return [file_identity(stat_data_file(path)) for path in paths]


_IDENTITY = operator.attrgetter("st_size", "st_mtime_ns", "st_ino", "st_dev")


def open_reader(
    path: str,
    identity: FileIdentity | None = None,
    max_open_files: int | None = None,
    index: str | None = None,
) -> Any:
    """Opens one ArrayRecord file for random access, or raises DataSourceError naming it.

    With `identity`, the file must still be the one it describes (same size, modification time
    and inode): a file regenerated since the source was built is refused, in every process.
    `index` names the shard index the identity was taken from, if any, for the error to say.
    When the OS refuses the file (too many open files, permissions) the error says so.
    """
    try:
        found = file_identity(os.stat(path))
    except FileNotFoundError:
        raise DataFileNotFoundError(f"data file {path!r} does not exist (any more)") from None
    except OSError as error:
        raise os_refusal(path, error, max_open_files) from error
    if identity is not None and found != identity and index is not None and found[2] == identity[2]:
        # Same inode: written over in place (a replacement by rename has a new one), which the
        # index, read without a stat per file, cannot have shown when the source was built.
        raise DataSourceError(
            f"data file {path!r} is not the file its shard index {index!r} describes "
            f"({_describe(identity)} there, {_describe(found)} now): it was rewritten in place, "
            "after the index was written or while in use. Once the files are final, write the "
            "set anew with resumax.write_shards or `resumax convert` (which index it again), or "
            f"delete {index!r} so that the files are opened and counted"
        )
    if identity is not None and found != identity:
        raise DataSourceError(
            f"data file {path!r} changed since the source was opened ({_describe(identity)} "
            f"then, {_describe(found)} now): it was rewritten or replaced while in use; rebuild "
            "the source (or restart) once the files are final"
        )
    try:
        reader = array_record_module.ArrayRecordReader(path, _RANDOM_ACCESS_OPTIONS)
    except Exception as error:
        _raise_if_os_refuses(path, max_open_files)
        raise DataSourceError(f"cannot open ArrayRecord file {path!r}: {error}") from error
    if not reader.ok():
        _raise_if_os_refuses(path, max_open_files)
        raise DataSourceError(
            f"data file {path!r} is not a valid ArrayRecord file (corrupt or truncated)"
        )
    return reader


def _raise_if_os_refuses(path: str, max_open_files: int | None) -> None:
    """After a failed open: raises the OS's reason (too many open files, permissions) if the
    file cannot be opened at all, so that it is not mistaken for a corrupt file."""
    try:
        os.close(os.open(path, os.O_RDONLY))
    except OSError as error:
        raise os_refusal(path, error, max_open_files) from error


class LocalCopies(Protocol):
    """Where remote files are read from: a local copy per file id (`resumax.sources.files.
    shard_cache.ShardCache`)."""

    directory: str  # the copies' directory

    def fetch(self, file_id: int) -> str: ...  # the copy's path, downloaded first if need be

    def path(self, file_id: int) -> str: ...  # the copy's path, whether it exists or not


class ReaderPool:
    """At most `max_open_files` open readers, opened on demand, least recently used closed first.

    Thread-safe: a pipeline's prefetch thread and the caller may read at the same time.
    """

    def __init__(
        self,
        paths: Sequence[str],
        identities: Sequence[FileIdentity],
        counts: Sequence[int],
        max_open_files: int,
        index: str | None = None,
        copies: LocalCopies | None = None,
    ):
        self.paths, self.identities, self.counts = paths, identities, counts
        self.max_open_files = max_open_files
        self.index = index  # the shard index the identities come from, if any
        # For remote files: their local copies, fetched when opened (`paths` then are URLs,
        # for messages, and the copies are checked by the cache, not by identity).
        self.copies = copies
        # Files whose local copies were evicted: their readers are closed at the next read,
        # so that a deleted copy's disk space is freed. This process learns of its own
        # evictions at once, of other processes' from the copies' directory (`_look_for_evicted`).
        self.evicted: set[int] = set()
        self._copies_seen = 0  # the copies' directory's mtime when last looked at
        self.lock = threading.Lock()
        # file id -> open reader, least recently used first.
        self.open_readers: OrderedDict[int, Any] = OrderedDict()

    def forget(self, file_id: int) -> None:
        """Marks a file's local copy as evicted (any thread; no lock taken)."""
        self.evicted.add(file_id)

    def _look_for_evicted(self) -> None:
        """When the copies' directory changed since the last look (one stat): marks open
        readers whose copy another process evicted, from one listing (a stat per reader would
        give up the GIL, and wait to get it back, once per reader)."""
        if self.copies is None:
            return
        changed = os.stat(self.copies.directory).st_mtime_ns
        if changed != self._copies_seen:
            present = set(os.listdir(self.copies.directory))
            path = self.copies.path
            self.evicted.update(
                f for f in self.open_readers if os.path.basename(path(f)) not in present
            )
            self._copies_seen = changed

    def close_evicted(self) -> None:
        """Closes the readers of evicted local copies; call with `lock` held, once per read
        (before its `get`s)."""
        if self.copies is None:
            return
        self._look_for_evicted()
        closing = []
        while self.evicted:
            reader = self.open_readers.pop(self.evicted.pop(), None)
            if reader is not None:
                closing.append(reader)
        if closing:
            close_in_background(closing)

    def get(self, file_id: int) -> Any:
        """The reader of file `file_id`; call with `lock` held."""
        reader = self.open_readers.get(file_id)
        if reader is not None:
            self.open_readers.move_to_end(file_id)
            return reader
        self._make_room()  # before opening: never more than max_open_files descriptors
        reader = self.open_checked(file_id)
        self.open_readers[file_id] = reader
        return reader

    def open_checked(self, file_id: int) -> Any:
        """A new reader of file `file_id`, checked to be the file and record count the source
        saw; the pool does not hold it (any thread may call this without the lock)."""
        path = self.paths[file_id]
        if self.copies is not None:
            reader = open_reader(self.copies.fetch(file_id), None, self.max_open_files)
        else:
            reader = open_reader(path, self.identities[file_id], self.max_open_files, self.index)
        if reader.num_records() != self.counts[file_id]:
            found = reader.num_records()
            reader.close()
            raise DataSourceError(
                f"data file {path!r} holds {found} records where the source counted "
                f"{self.counts[file_id]}; the file changed: rebuild the source"
            )
        return reader

    def put(self, file_id: int, reader: Any) -> None:
        """Holds an opened reader of a file not open yet, least recently used closed first;
        call with `lock` held."""
        self._make_room()
        self.open_readers[file_id] = reader

    def _make_room(self) -> None:
        """Closes the least recently used readers until one more fits."""
        while len(self.open_readers) >= self.max_open_files:
            self.open_readers.popitem(last=False)[1].close()

    @property
    def num_open(self) -> int:
        return len(self.open_readers)

    def close(self) -> None:
        with self.lock:
            while self.open_readers:
                self.open_readers.popitem()[1].close()


class ArrayRecordFiles:
    """Records of a list of files addressed by one global record index, through a ReaderPool."""

    def __init__(
        self,
        paths: Sequence[str],
        counts: Sequence[int],
        identities: Sequence[FileIdentity],
        max_open_files: int,
        index: str | None = None,
        copies: LocalCopies | None = None,
    ):
        self.paths = list(paths)
        self.counts = [int(count) for count in counts]
        self.starts = np.concatenate([[0], np.cumsum(self.counts)]).astype(np.int64)
        self.pool = ReaderPool(
            self.paths, list(identities), self.counts, max_open_files, index, copies
        )

    def locate(self, record_index: int) -> tuple[str, int]:
        """(file path, index within that file) of a global record index."""
        file_id = int(np.searchsorted(self.starts, record_index, side="right") - 1)
        return self.paths[file_id], record_index - int(self.starts[file_id])

    def read(self, record_indices: np.ndarray) -> list[bytes]:
        """Raw bytes of the records at the given global indices, by per-record range reads.

        Records are read grouped by file, so each file is fetched from the pool once per call.
        """
        record_indices = np.asarray(record_indices, dtype=np.int64)
        pool = self.pool
        if len(self.paths) == 1:
            with pool.lock:
                pool.close_evicted()
                read = pool.get(0).read
                return [read(i, i + 1)[0] for i in record_indices.tolist()]
        file_ids = np.searchsorted(self.starts, record_indices, side="right") - 1
        local_indices = (record_indices - self.starts[file_ids]).tolist()
        if pool.max_open_files >= len(self.paths):
            return self._read_all_open(file_ids.tolist(), local_indices)
        by_file = np.argsort(file_ids, kind="stable").tolist()
        file_ids = file_ids.tolist()
        result: list[bytes] = [b""] * len(local_indices)
        with pool.lock:
            pool.close_evicted()
            current, read = -1, None
            for position in by_file:
                if file_ids[position] != current:
                    current = file_ids[position]
                    read = pool.get(current).read
                local = local_indices[position]
                result[position] = read(local, local + 1)[0]
        return result

    def _read_all_open(self, file_ids: list[int], local_indices: list[int]) -> list[bytes]:
        """Reads in the given order when the pool can hold every file: nothing is ever closed,
        so the files not yet open are opened first, then each record is one dict lookup, with
        no grouping and no LRU bookkeeping."""
        pool = self.pool
        with pool.lock:
            pool.close_evicted()
            readers = pool.open_readers
            open_many(pool, sorted(set(file_ids).difference(readers)))
            return [
                readers[file_id].read(local, local + 1)[0]
                for file_id, local in zip(file_ids, local_indices, strict=True)
            ]

    def close(self) -> None:
        self.pool.close()
