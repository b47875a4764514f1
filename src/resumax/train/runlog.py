"""A run's outputs: `metrics.jsonl` (one JSON line per logged step), `config.yaml`, `loss.png`, and
with train.tensorboard the same lines as TensorBoard event files.

On resume the log is cut back to the restored step and the resumed process rewrites what follows,
so after any sequence of kills the file holds exactly one line per logged step, in step order.
"""

from __future__ import annotations

import json
import os
from typing import Any

from resumax.errors import ResumaxError
from resumax.train.config import Config, changed_keys, load_config, to_yaml

METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "loss.png"


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The complete lines of a metrics file; a torn last line (a kill mid-write) is skipped."""
    if not os.path.exists(path):
        return []
    lines = []
    with open(path, encoding="utf-8") as file:
        for text in file:
            if not text.endswith("\n"):
                break
            try:
                lines.append(json.loads(text))
            except json.JSONDecodeError:
                break
    return lines


class MetricsLog:
    """Appends metric lines to `<run_dir>/metrics.jsonl`, each flushed as soon as it is written.

    Opening it at `restored_step` keeps the lines of steps <= restored_step and drops the rest
    (they came from a process that died before its next checkpoint); the file is replaced
    atomically, so a kill during the cut leaves either the old or the new file. With `tensorboard`
    each line also goes to `<run_dir>/tensorboard/` (see `TensorBoardLog`), cut the same way.
    """

    def __init__(
        self, run_dir: str | os.PathLike, restored_step: int, *, tensorboard: bool = False
    ):
        self.path = os.path.join(os.fspath(run_dir), METRICS_FILE)
        kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= restored_step]
        partial = f"{self.path}.partial"
        with open(partial, "w", encoding="utf-8") as file:
            file.writelines(json.dumps(line) + "\n" for line in kept)
        os.replace(partial, self.path)
        self._file = open(self.path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())
        self._tensorboard = None
        if tensorboard:
            # Imported on demand: tensorboardX's import loads boto3 and google.cloud.storage
            # when they are installed (half a second), and most runs go without it.
            from resumax.train.tensorboard import TensorBoardLog

            self._tensorboard = TensorBoardLog(run_dir, restored_step)

    def write(self, line: dict[str, Any]) -> None:
        """Appends one line and flushes it to the OS, so a kill -9 right after keeps it."""
        self._file.write(json.dumps(line) + "\n")
        self._file.flush()
        if self._tensorboard is not None:
            self._tensorboard.write(line)

    def close(self) -> None:
        self._file.close()
        if self._tensorboard is not None:
            self._tensorboard.close()


def record_config(run_dir: str, config: Config) -> None:
    """Writes `<run_dir>/config.yaml`, first warning about keys changed since the last start.

    A resumed run is bitwise identical to an uninterrupted one only under the same config (the
    learning-rate schedule, for instance, depends on train.num_steps).
    """
    path = os.path.join(run_dir, "config.yaml")
    text = to_yaml(config)
    if os.path.exists(path):
        try:
            before = load_config(path)
        except ResumaxError:
            before = None
        changed = changed_keys(before, config) if before is not None else ["<unreadable>"]
        if changed:
            print(f"note: config changed since the last start of this run: {changed}", flush=True)
    with open(f"{path}.partial", "w", encoding="utf-8") as file:
        file.write(text)
    os.replace(f"{path}.partial", path)


def plot_metrics(run_dir: str | os.PathLike) -> str:
    """Draws training loss (and eval accuracy, if logged) against step into `<run_dir>/loss.png`.

    Lines with `"resumed": true` (the first line each resumed process wrote) are marked with a
    dashed vertical line, event lines (a rewind, a spike recovery) with a dotted one at the step
    training went back to. Returns the path of the image; it is replaced atomically.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    run_dir = os.fspath(run_dir)
    everything = read_metrics(os.path.join(run_dir, METRICS_FILE))
    lines = [m for m in everything if "loss" in m]
    figure, loss_axis = pyplot.subplots(figsize=(8, 4.5))
    loss_axis.plot([m["step"] for m in lines], [m["loss"] for m in lines], lw=1, label="train loss")
    loss_axis.set_xlabel("step")
    loss_axis.set_ylabel("train loss (batch)")
    loss_axis.set_yscale("log")
    for index, step in enumerate(m["step"] for m in lines if m.get("resumed")):
        loss_axis.axvline(
            step, color="tab:red", ls="--", lw=1, label="resumed" if not index else ""
        )
    events = [m for m in everything if "event" in m]
    for index, event in enumerate(events):
        label = "rewind / spike recovery (skipped data)" if not index else ""
        loss_axis.axvline(event["step"], color="tab:purple", ls=":", lw=1.5, label=label)
    evals = [m for m in lines if "eval_accuracy" in m]
    if evals:
        accuracy_axis = loss_axis.twinx()
        accuracy_axis.plot(
            [m["step"] for m in evals],
            [m["eval_accuracy"] for m in evals],
            "o-",
            color="tab:green",
            ms=3,
            label="test accuracy",
        )
        accuracy_axis.set_ylabel("test accuracy")
        accuracy_axis.set_ylim(0, 1)
        accuracy_axis.legend(loc="center right")
    loss_axis.legend(loc="upper right")
    loss_axis.set_title(os.path.basename(os.path.abspath(run_dir)))
    figure.tight_layout()
    path = os.path.join(run_dir, PLOT_FILE)
    partial = f"{path}.partial.png"
    figure.savefig(partial, dpi=100)
    pyplot.close(figure)
    os.replace(partial, path)
    return path
