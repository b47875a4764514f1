"""What `resumax train` guarantees when things go wrong: real `python -m resumax train`
subprocesses, real signals, a real file-size limit and a real unprivileged user.

Bad labels, unwritable directories, a second process on the run directory and a changed config
are refused before step 1 with exit status 2; a NaN loss or a failed save ends the run with one
error line and the previous committed step intact; Ctrl-C saves and exits 130.
"""

from __future__ import annotations

import math
import os
import re
import shutil
import signal
import stat
import tempfile
from pathlib import Path

import numpy as np
import pytest

from resumax.errors import ConfigError, StageError
from resumax.pipeline import Pipeline
from resumax.sources import ArrayRecordSourceConfig, MemorySource
from resumax.train.checks import label_range_check, unwrap_config_error
from resumax.train.config import load_config
from resumax.train.run_lock import RunLock
from resumax.train.runlog import read_metrics
from tests.train_guard_runs import (
    CONFIG,
    ENDLESS,
    REPO,
    Training,
    committed_steps,
    error_lines,
    restore_latest,
    train_in_process,
)


@pytest.fixture
def world_dir(digits_dir):
    """A directory `nobody` can use (pytest's tmp_path is private to root), with the data."""
    directory = Path(tempfile.mkdtemp(prefix="resumax-guards-"))
    directory.chmod(0o777)
    shutil.copytree(digits_dir, directory / "digits")
    shutil.copy(CONFIG, directory / CONFIG.name)  # the checkout may be private to root too
    for path in [directory / "digits", *(directory / "digits").iterdir(), directory / CONFIG.name]:
        path.chmod(0o755 if path.is_dir() else 0o644)
    yield directory
    shutil.rmtree(directory, ignore_errors=True)


def unprivileged() -> list[str]:
    """Runs the command as `nobody` (see tests/unprivileged_train.py)."""
    return [str(REPO / "tests" / "unprivileged_train.py")]


def others_can_enter(path: Path) -> bool:
    """True when every directory down to `path` lets other users through (mode o+x)."""
    return all(os.stat(part).st_mode & stat.S_IXOTH for part in [path, *path.parents])


needs_root = pytest.mark.skipif(
    os.geteuid() != 0 or not hasattr(os, "setuid"), reason="drops privileges: needs root"
)
# After dropping to nobody, the run still imports lazily from the checkout's .venv.
needs_public_checkout = pytest.mark.skipif(
    not others_can_enter(REPO.resolve()),
    reason=f"the user nobody cannot enter the checkout {REPO} (a directory above it is private)",
)


# 1. Labels and the loss --------------------------------------------------------------------------


@pytest.mark.slow
def test_labels_outside_the_model_classes_are_a_config_error_before_step_1(tmp_path, digits_dir):
    status, _, stderr = Training(tmp_path / "run", digits_dir, "model.num_classes=2").wait()
    assert status == 2, stderr
    assert error_lines(stderr) == [error_lines(stderr)[0]], stderr
    assert "ConfigError: model.num_classes is 2" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert committed_steps(tmp_path / "run") == []


def test_a_label_check_stage_raises_config_error_for_each_batch_as_it_comes():
    examples = [{"label": np.int64(i % 3)} for i in range(10)] + [{"label": np.int64(7)}]
    source = MemorySource(
        ArrayRecordSourceConfig(seed=0, num_epochs=1, shuffle_files=False), examples
    )
    pipeline = Pipeline(source=source, stages=[label_range_check(3)], batch_size=5)
    batches = iter(pipeline)
    assert len(next(batches)["label"]) == 5
    assert len(next(batches)["label"]) == 5
    with pytest.raises(StageError) as raised:
        next(batches)
    error = unwrap_config_error(raised.value)
    assert isinstance(error, ConfigError)
    assert "model.num_classes is 3" in str(error) and "label 7" in str(error)


@pytest.mark.slow
def test_a_non_finite_loss_stops_with_status_2_and_keeps_the_last_finite_step(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, digits_dir)
    status, stdout, stderr = Training(
        run_dir, digits_dir, "optimizer.learning_rate=1e30", num_steps=40
    ).wait()
    assert status == 2, stdout + stderr
    assert "resumed from step 5" in stdout
    assert re.search(r"NonFiniteLossError: the training loss is (nan|inf) at step \d+", stderr)
    assert "latest checkpoint stays step 5" in stderr
    assert "Traceback" not in stderr
    assert committed_steps(run_dir) == [5]
    step, arrays = restore_latest(run_dir)
    assert step == 5 and all(np.isfinite(a).all() for a in arrays)
    assert all(math.isfinite(line["loss"]) for line in read_metrics(run_dir / "metrics.jsonl"))


# 2. Writable directories and failed saves --------------------------------------------------------


@pytest.mark.parametrize("key", ["train.run_dir", "train.checkpoint_dir", "data.dir"])
def test_a_directory_that_cannot_be_created_is_a_config_error_naming_the_key(
    tmp_path, digits_dir, key
):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    data_dir = blocker / "digits" if key == "data.dir" else digits_dir
    overrides = [] if key == "data.dir" else [f"{key}={blocker / 'out'}"]
    with pytest.raises(ConfigError, match=rf"^{re.escape(key)}: cannot create or write") as raised:
        train_in_process(tmp_path / "run", data_dir, *overrides)
    assert f"{str(blocker)!r} is a file, not a directory" in str(raised.value)


@pytest.mark.slow
@needs_root
@needs_public_checkout
def test_a_read_only_checkpoint_dir_is_a_config_error_for_an_unprivileged_user(world_dir):
    run_dir = world_dir / "run"
    run_dir.mkdir(mode=0o777)
    run_dir.chmod(0o777)
    (run_dir / "checkpoints").mkdir(mode=0o755)  # owned by root: nobody cannot write it
    training = Training(
        run_dir, world_dir / "digits", launcher=unprivileged(), config=world_dir / CONFIG.name
    )
    status, _, stderr = training.wait()
    assert status == 2, stderr
    assert "ConfigError: train.checkpoint_dir: cannot create or write" in stderr
    assert "Permission denied" in stderr and "Traceback" not in stderr


@pytest.mark.slow
@needs_root
@needs_public_checkout
def test_a_save_failing_mid_run_ends_with_one_checkpoint_error_and_keeps_the_last_commit(
    world_dir,
):
    run_dir = world_dir / "run"
    run_dir.mkdir()
    run_dir.chmod(0o777)
    training = Training(
        run_dir,
        world_dir / "digits",
        num_steps=ENDLESS,
        launcher=unprivileged(),
        config=world_dir / CONFIG.name,
    )
    training.wait_for(lambda: committed_steps(run_dir), "a committed step")
    (run_dir / "checkpoints").chmod(0o555)
    status, _, stderr = training.wait()
    assert status == 2, stderr
    assert len([line for line in stderr.splitlines() if "CheckpointError" in line]) == 1, stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr
    latest = int(re.search(r"the latest committed step stays (\d+)", stderr)[1])
    (run_dir / "checkpoints").chmod(0o777)
    assert restore_latest(run_dir)[0] == latest == committed_steps(run_dir)[-1]


def full_disk(limit: int) -> list[str]:
    """Runs the command with files limited to `limit` bytes, as on a full disk: writes past it
    fail with EFBIG (SIGXFSZ ignored). Nothing else is limited, not even for root. It reads
    the session's compilation cache (tests/conftest.py) but writes no entry: that would fail too."""
    return [
        "-c",
        "import os, resource, runpy, signal, sys\n"
        f"os.environ['JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES'] = '{2**62}'\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        f"resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))\n"
        "sys.argv = ['resumax', 'train', *sys.argv[1:]]\n"
        "runpy.run_module('resumax', run_name='__main__')",
    ]


@pytest.mark.slow
def test_a_full_disk_during_a_checkpoint_is_one_checkpoint_error_line(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    # A 64x128 float32 kernel (32 KB, and its two Adam moments) is in every checkpoint; files of
    # up to 8 KB (metrics.jsonl, config.yaml) still work.
    wide = "model.hidden_sizes=[128]"
    train_in_process(run_dir, digits_dir, wide)
    status, stdout, stderr = Training(
        run_dir, digits_dir, wide, num_steps=30, launcher=full_disk(8192)
    ).wait()
    assert status == 2, stdout + stderr
    assert error_lines(stderr) == [error_lines(stderr)[-1]], stderr
    assert "CheckpointError: committing step 10" in stderr and "File too large" in stderr
    assert "the latest committed step stays 5" in stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr
    assert committed_steps(run_dir) == [5]
    result = train_in_process(run_dir, digits_dir, wide, num_steps=30)
    assert (result.resumed_from, result.step) == (5, 30)


# 4. One process per run directory ----------------------------------------------------------------


def test_a_second_lock_on_a_run_directory_names_the_holder_and_is_free_after_close(tmp_path):
    first = RunLock(tmp_path)
    with pytest.raises(ConfigError, match=rf"in use by another .*\(pid {os.getpid()}\)"):
        RunLock(tmp_path)
    first.close()
    RunLock(tmp_path).close()


@pytest.mark.slow
def test_a_second_training_process_on_a_run_directory_is_refused_until_the_first_dies(
    tmp_path, digits_dir
):
    run_dir = tmp_path / "run"
    holder = Training(run_dir, digits_dir, num_steps=ENDLESS)
    holder.wait_for(lambda: holder.logged(), "the first step")
    status, _, stderr = Training(run_dir, digits_dir).wait()
    assert status == 2, stderr
    assert f"ConfigError: train.run_dir {str(run_dir)!r} is in use" in stderr
    assert f"(pid {holder.process.pid})" in stderr
    assert holder.running()
    holder.send(signal.SIGKILL)
    assert holder.wait()[0] == -signal.SIGKILL
    RunLock(run_dir).close()  # the operating system released the dead holder's lock


# 5. Messages -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("- 1\n- 2\n", r"its top level is a YAML list; expected a mapping of the sections"),
        ("train: 5\n", r"train: expected a mapping of train\.\* keys .* got the YAML int 5"),
        ("data: [1]\n", r"data: expected a mapping of data\.\* keys .* got the YAML list \[1\]"),
        ("7\n", r"its top level is a YAML int"),
    ],
)
def test_a_config_file_that_is_not_a_mapping_of_sections_names_file_key_and_expectation(
    tmp_path, text, expected
):
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=expected) as raised:
        load_config(path)
    assert str(path) in str(raised.value)


def test_an_override_replacing_a_section_names_the_key():
    with pytest.raises(ConfigError, match=r"train: expected a mapping .* command-line overrides"):
        load_config(None, ["train=5"])


@pytest.mark.slow
def test_resuming_with_another_model_or_data_seed_names_the_path_shapes_and_config_key(
    tmp_path, digits_dir
):
    run_dir = tmp_path / "run"
    train_in_process(run_dir, digits_dir)
    status, _, stderr = Training(run_dir, digits_dir, "model.hidden_sizes=[24]").wait()
    assert status == 2, stderr
    assert re.search(
        r"CheckpointError: step 5 .* another model: model\.\S+ has shape \(\d+, \d+\) in the "
        r"checkpoint but shape \(\d+, \d+\) in the model",
        stderr,
    ), stderr
    assert "(16, 10)" in stderr and "(24, 10)" in stderr
    assert "Traceback" not in stderr and "Event loop is closed" not in stderr
    assert len(stderr.splitlines()) == 1, stderr
    status, _, stderr = Training(run_dir, digits_dir, "data.seed=7").wait()
    assert status == 2, stderr
    assert "it was written with data.seed=0, this config has data.seed=7" in stderr
    assert "rng_seed" not in stderr and "rngs" not in stderr
    assert committed_steps(run_dir) == [5]
