"""`train.tensorboard: true`: metrics.jsonl's lines as TensorBoard event files, read back with
TensorBoard's own loader, through a kill -9 and a resume."""

from __future__ import annotations

import json
import signal
from pathlib import Path

import numpy as np
import pytest
from tensorboard.backend.event_processing.plugin_event_accumulator import EventAccumulator
from tensorboard.util import tensor_util

from resumax.errors import ConfigError
from resumax.train.config import load_config
from resumax.train.datasets import prepare_digits
from resumax.train.loop import train
from resumax.train.runlog import MetricsLog, read_metrics
from resumax.train.tensorboard import scalars_of
from tests.training_runs import REPO, Training, committed_steps, logged_steps, wait_until

CONFIG = REPO / "configs" / "digits.yaml"
OVERRIDES = [
    "train.log_every=1",
    "train.eval_every=4",
    "train.checkpoint_every=5",
    "model.hidden_sizes=[16]",
    "data.batch_size=8",
    "data.num_workers=0",
    "optimizer.warmup_steps=1",
]


@pytest.fixture(scope="module")
def digits_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("data") / "digits"
    prepare_digits(directory)
    return directory


def tensorboard_view(run_dir: Path) -> EventAccumulator:
    """What TensorBoard's Python loader shows of `<run_dir>/tensorboard/`, keeping every value."""
    view = EventAccumulator(str(run_dir / "tensorboard"), size_guidance={"tensors": 0})
    view.Reload()
    return view


def scalar_series(view: EventAccumulator) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of the scalars plugin's series, in the order TensorBoard keeps."""
    return {
        tag: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in view.Tensors(tag)]
        for tag in view.PluginTagToContent("scalars")
    }


def jsonl_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The same view made from metrics.jsonl, each number rounded to TensorBoard's float32."""
    series: dict[str, list[tuple[int, float]]] = {}
    for line in read_metrics(run_dir / "metrics.jsonl"):
        for tag, value in scalars_of(line).items():
            series.setdefault(tag, []).append((line["step"], float(np.float32(value))))
    return series


def test_every_number_of_every_metrics_line_is_a_scalar_at_its_step(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    overrides = [*OVERRIDES, "train.num_steps=9", f"data.dir={digits_dir}"]
    train(load_config(CONFIG, [*overrides, "train.tensorboard=true", f"train.run_dir={run_dir}"]))
    series = scalar_series(tensorboard_view(run_dir))
    assert {"loss", "records_per_s", "data_wait_fraction", "eval_accuracy"} <= series.keys()
    assert "step" not in series and "resumed" not in series
    assert series == jsonl_series(run_dir)
    assert [step for step, _ in series["loss"]] == list(range(1, 10))
    assert [step for step, _ in series["eval_accuracy"]] == [4, 8]


def test_tensorboard_is_off_by_default_and_a_log_without_it_writes_no_event_files(tmp_path):
    assert load_config(CONFIG).train.tensorboard is False
    log = MetricsLog(tmp_path, 0)
    log.write({"step": 1, "loss": 1.0})
    log.close()
    assert read_metrics(tmp_path / "metrics.jsonl") == [{"step": 1, "loss": 1.0}]
    assert not (tmp_path / "tensorboard").exists()


@pytest.mark.slow
def test_after_a_kill_and_a_resume_tensorboard_shows_each_step_once_as_metrics_jsonl(
    tmp_path, digits_dir
):
    run_dir = tmp_path / "run"
    num_steps = 30
    overrides = [*OVERRIDES, "train.tensorboard=true", f"train.num_steps={num_steps}"]
    training = Training(CONFIG, run_dir, digits_dir, overrides)
    # Kill -9 between two checkpoints, once a line past a committed step has been written.
    wait_until(
        lambda: (
            (run_dir / "checkpoints").is_dir()
            and bool(committed_steps(run_dir))
            and logged_steps(run_dir)[-1] % 5 >= 2
        ),
        training,
        "a logged step past a committed checkpoint",
    )
    training.send(signal.SIGKILL)
    assert training.wait()[0] == -signal.SIGKILL
    orphaned = max(step for step, _ in scalar_series(tensorboard_view(run_dir))["loss"])
    restored = committed_steps(run_dir)[-1]
    assert orphaned > restored, "the kill was meant to leave steps past the last checkpoint"

    resumed = train(
        load_config(CONFIG, [*overrides, f"data.dir={digits_dir}", f"train.run_dir={run_dir}"])
    )
    assert (resumed.resumed_from, resumed.step) == (restored, num_steps)
    assert len(list((run_dir / "tensorboard").iterdir())) == 2
    series = scalar_series(tensorboard_view(run_dir))
    assert [step for step, _ in series["loss"]] == list(range(1, num_steps + 1))
    # records_per_s differs between the two processes: only the resumed one's values are shown.
    assert series == jsonl_series(run_dir)


def test_event_lines_are_text_and_a_reopened_log_drops_the_lines_after_its_step(tmp_path):
    rewind = {"step": 3, "event": "rewind", "from_step": 6, "skipped_batches": 2}
    log = MetricsLog(tmp_path, 0, tensorboard=True)
    for step in range(1, 7):
        log.write({"step": step, "loss": 1.0 / step})
    log.write({"step": 6, "event": "spike_recovery", "skipped_positions": [96, 127]})
    log.close()
    # Reopened at once, in the same clock second: the new file must still sort after the first.
    log = MetricsLog(tmp_path, 3, tensorboard=True)
    log.write(rewind)
    log.write({"step": 4, "loss": 0.5})
    log.close()

    view = tensorboard_view(tmp_path)
    texts = [
        (e.step, tensor_util.make_ndarray(e.tensor_proto).item().decode())
        for e in view.Tensors("events")
    ]
    assert texts == [(3, json.dumps(rewind))]
    assert view.SummaryMetadata("events").plugin_data.plugin_name == "text"
    series = scalar_series(view)
    assert series == jsonl_series(tmp_path)
    assert series["loss"] == [(1, 1.0), (2, 0.5), (3, float(np.float32(1 / 3))), (4, 0.5)]
    assert series["from_step"] == [(3, 6.0)]


def test_a_file_where_the_tensorboard_directory_goes_is_a_config_error(tmp_path):
    (tmp_path / "tensorboard").write_text("not a directory")
    with pytest.raises(ConfigError, match=r"train\.tensorboard: cannot write event files in"):
        MetricsLog(tmp_path, 0, tensorboard=True)
