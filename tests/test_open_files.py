"""Any number of shards in a bounded number of open files, and clear errors when the operating
system refuses one (too many open files, permissions): each in a subprocess with its own limits."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import textwrap

import numpy as np
import pytest

import resumax
from resumax import order
from resumax.records import shard_index

CHILD_PRELUDE = """
    import json, os, resource, sys
    import numpy as np
    HARD_LIMIT = resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    from resumax.errors import DataSourceError
    from resumax.pipeline import Pipeline
    from resumax.sources import ArrayRecordSourceConfig, ArrayRecordSourceModule
"""


def run_child(script: str, *args: str) -> subprocess.CompletedProcess:
    code = textwrap.dedent(CHILD_PRELUDE) + textwrap.dedent(script)
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300
    )


def linked_shard_set(directory, num_shards: int, distinct: int = 20) -> list[str]:
    """`num_shards` one-record shards with an index, as hard links to `distinct` real files:
    shard k holds the record {"id": k % distinct}. Costs no disk and a fraction of a second."""
    bases = [str(directory / f"base{k}.bin") for k in range(distinct)]
    for k, base in enumerate(bases):
        resumax.write_array_record(base, [{"id": np.int64(k)}])
    names = [f"train-{k:05d}-of-{num_shards:05d}.array_record" for k in range(num_shards)]
    facts = [shard_index.index_entry(base, "", 1)[1:] for base in bases]
    entries = [(name, *facts[k % distinct]) for k, name in enumerate(names)]
    for k, name in enumerate(names):
        os.link(bases[k % distinct], directory / name)
    shard_index.write_index(str(directory / f"train{shard_index.INDEX_SUFFIX}"), entries)
    return names


_READ_UNDER_LIMIT = """
    resource.setrlimit(resource.RLIMIT_NOFILE, (1024, HARD_LIMIT))
    config = ArrayRecordSourceConfig(seed=5, shuffle_files=True)
    results = {}
    for workers in (0, 2):
        source = ArrayRecordSourceModule(config, sys.argv[1])
        pipeline = Pipeline(source=source, batch_size=1000, num_workers=workers, prefetch=1)
        iterator = iter(pipeline)
        results[workers] = [int(i) for _ in range(5) for i in next(iterator)["id"]]
        results[f"open files with {workers} workers"] = len(os.listdir("/proc/self/fd"))
        iterator.close()
    print(json.dumps(results))
"""


@pytest.mark.slow
def test_twenty_thousand_shards_read_under_a_1024_open_file_limit_with_and_without_workers(
    tmp_path,
):
    linked_shard_set(tmp_path, 20_000)
    result = run_child(_READ_UNDER_LIMIT, str(tmp_path / "train-*.array_record"))
    assert result.returncode == 0, result.stderr[-3000:]
    results = json.loads(result.stdout)

    positions = np.arange(5000)
    expected = order.record_indices(positions, num_records=20_000, seed=5, epoch=0, shuffle=True)
    assert results["0"] == (expected % 20).tolist()
    assert results["2"] == results["0"]
    assert results["open files with 0 workers"] < 1024 // 2


_TOO_MANY_OPEN = """
    source = ArrayRecordSourceModule(
        ArrayRecordSourceConfig(shuffle_files=True), sys.argv[1], max_open_files=10_000
    )
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 40, HARD_LIMIT))
    try:
        source.read_records(np.arange(300))
    except DataSourceError as error:
        print(error)
        sys.exit(3)
"""


@pytest.mark.slow
def test_too_many_open_files_says_so_and_what_to_do(tmp_path):
    linked_shard_set(tmp_path, 300)
    result = run_child(_TOO_MANY_OPEN, str(tmp_path / "train-*.array_record"))
    assert result.returncode == 3, result.stderr[-3000:]
    message = result.stdout
    assert "train-" in message and "refused to open another file" in message
    assert "ulimit -n" in message and "max_open_files" in message
    assert "corrupt" not in message


@pytest.fixture
def public_dir():
    """A directory the unprivileged user a child becomes can traverse (pytest's tmp_path is
    private to its owner)."""
    directory = pathlib.Path(tempfile.mkdtemp(prefix="resumax-permissions-"))
    os.chmod(directory, 0o755)
    yield directory
    shutil.rmtree(directory)


_NOT_PERMITTED = """
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(), sys.argv[1])
    if os.geteuid() == 0:
        os.setuid(65534)  # as nobody: root reads files whatever their mode
    try:
        source.read_records(np.arange(len(source)))
    except DataSourceError as error:
        print(error)
        sys.exit(3)
"""


@pytest.mark.slow
def test_a_file_without_read_permission_says_so_and_what_to_do(public_dir):
    paths = resumax.write_shards(public_dir / "train", resumax_examples(6), num_shards=2)
    os.chmod(paths[1], 0)
    result = run_child(_NOT_PERMITTED, str(public_dir / "train-*.array_record"))
    assert result.returncode == 3, result.stderr[-3000:]
    assert "train-00001-of-00002.array_record" in result.stdout
    assert "permission denied" in result.stdout and "fix the permissions" in result.stdout
    assert "corrupt" not in result.stdout


def resumax_examples(count: int) -> list[dict]:
    return [{"id": np.int64(i)} for i in range(count)]
