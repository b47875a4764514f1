"""A whole indexed shard set identified from one directory listing, without a stat per file: each
file's inode in the listing must be the one its index entry records.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence

from resumax.records import shard_index
from resumax.sources.files.readers import FileIdentity

# (identities, record counts, content hashes) of the files, in their order, and the index path.
Listed = tuple[list[FileIdentity], list[int], list[str], str]


def identify_by_listing(
    paths: Sequence[str], listings: Mapping[str, Mapping[str, int]]
) -> Listed | None:
    """The identities, counts and hashes of `paths` from their shard index when `paths` are a
    whole `-NNNNN-of-MMMMM` set of one directory in shard order, the index lists exactly their
    names, and the directory lists every file (a regular file, not a link) with the inode its
    entry records (a link or directory put in a file's place has another inode); else None,
    and the caller stats every file. `listings` are listings the
    caller already took ({directory: {name: inode}}); another directory is listed here.

    A file replaced since it was indexed (a write and rename, as `write_shards` does) has a new
    inode, so the set falls back to the stat of every file and names it. One rewritten in place
    keeps its inode: it is refused, named, when it is opened, since its size and modification
    time then differ from the identity taken from the index.
    """
    shard = shard_index.complete_set(paths)
    if shard is None:
        return None
    directory = paths[0].rpartition(os.sep)[0]
    index = shard_index.index_path(os.path.join(directory, shard.stem))
    try:
        payload = shard_index.read_index(index)
        names, counts = payload["names"], payload["num_records"]
        sizes, mtimes = payload["sizes"], payload["mtime_ns"]
        hashes, inodes = payload["content_hashes"], payload[shard_index.INODES]
        if (
            len(names) != len(paths)
            or len(inodes) != len(paths)
            or not {type(size) for size in sizes} <= {int}
            or (sizes and min(sizes) <= 0)
        ):
            return None
        if [path.rpartition(os.sep)[2] for path in paths] != names:
            return None
        device = os.stat(directory or ".").st_dev
        listed = listings.get(directory)
        if listed is None:
            with os.scandir(directory or ".") as entries:
                listed = {entry.name: entry.inode() for entry in entries}
    except shard_index.INDEX_ERRORS:
        return None
    if [listed.get(name) for name in names] != inodes:
        return None
    identities = list(zip(sizes, mtimes, inodes, [device] * len(names), strict=True))
    return identities, counts, hashes, index
