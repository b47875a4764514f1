"""`resumax train` under signals, in real subprocesses: Ctrl-C saves the current step and exits
130, a second waits for the commit, a third aborts with the committed steps intact; SIGTERMs sent
while the run saves cannot kill it. And the time the loop waits for data, in every metrics line and
in the progress bar of a real terminal."""

from __future__ import annotations

import os
import pty
import re
import signal
import termios
import time

import numpy as np
import pytest

from resumax.train.runlog import read_metrics
from tests.train_guard_runs import (
    ENDLESS,
    TIMEOUT,
    Training,
    committed_steps,
    restore_latest,
    train_in_process,
)

# 3. Signals --------------------------------------------------------------------------------------


@pytest.mark.slow
def test_first_ctrl_c_saves_the_current_step_and_exits_130(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    training = Training(run_dir, digits_dir, num_steps=ENDLESS)
    training.wait_for(lambda: training.logged()[-1:] >= [3], "step 3")
    training.send(signal.SIGINT)
    status, stdout, stderr = training.wait()
    assert status == 130, stdout + stderr
    saved = int(re.search(r"interrupted: saved step (\d+)", stdout)[1])
    assert saved >= 3 and committed_steps(run_dir)[-1] == saved
    assert "KeyboardInterrupt" not in stderr and "Traceback" not in stderr
    assert training.logged() == list(range(1, saved + 1))
    assert restore_latest(run_dir)[0] == saved


@pytest.mark.slow
def test_a_second_ctrl_c_waits_for_the_commit(tmp_path, digits_dir):
    run_dir = tmp_path / "run"
    training = Training(run_dir, digits_dir, num_steps=ENDLESS)
    training.wait_for(lambda: training.logged()[-1:] >= [3], "step 3")
    training.send(signal.SIGINT)
    time.sleep(0.1)  # Python runs a handler once for signals that arrive before it runs
    training.send(signal.SIGINT)
    status, stdout, stderr = training.wait()
    assert status == 130, stdout + stderr
    assert "waiting for the checkpoint to commit" in stderr
    saved = int(re.search(r"interrupted: saved step (\d+)", stdout)[1])
    assert committed_steps(run_dir)[-1] == saved
    assert "Traceback" not in stderr


@pytest.mark.slow
def test_a_third_ctrl_c_aborts_and_the_committed_steps_stay_restorable(tmp_path, digits_dir):
    run_dir, stderr_path = tmp_path / "run", tmp_path / "stderr.txt"
    # A wide model (~200 MB of params and optimizer state) makes the save long enough for three
    # Ctrl-C; stderr goes to a file so that each signal is sent only once the handler has answered
    # the previous one (pending signals that reach Python together run its handler once).
    with open(stderr_path, "w") as stderr_file:
        training = Training(
            run_dir,
            digits_dir,
            "model.hidden_sizes=[4096,4096]",
            num_steps=ENDLESS,
            stderr=stderr_file,
        )
        training.wait_for(lambda: committed_steps(run_dir)[-1:] >= [10], "step 10 committed")
        for answer in ("saving the current step", "waiting for the checkpoint", None):
            training.send(signal.SIGINT)
            if answer is not None:
                training.wait_for(lambda a=answer: a in stderr_path.read_text(), repr(answer))
        status, stdout, _ = training.wait()
    stderr = stderr_path.read_text()
    assert status == 130, stdout + stderr
    assert "aborted (Ctrl-C)" in stderr and "Traceback" not in stderr
    step, arrays = restore_latest(run_dir)
    assert step >= 10 and all(np.isfinite(a).all() for a in arrays)


@pytest.mark.slow
def test_sigterms_after_the_first_cannot_kill_the_run_while_it_saves_prints_and_exits(
    tmp_path, digits_dir
):
    run_dir = tmp_path / "run"
    training = Training(run_dir, digits_dir, num_steps=ENDLESS)
    training.wait_for(lambda: training.logged()[-1:] >= [3], "step 3")
    while training.running():  # a SIGTERM every 10 ms until the process has exited
        training.send(signal.SIGTERM)
        time.sleep(0.01)
    status, stdout, stderr = training.wait()
    assert status == 0, stdout + stderr
    saved = int(re.search(r"preempted \(SIGTERM\): saved step (\d+)", stdout)[1])
    assert committed_steps(run_dir)[-1] == saved
    assert (run_dir / "loss.png").exists()


# 6. Input-bound metrics --------------------------------------------------------------------------


def test_every_metrics_line_reports_the_time_the_loop_waited_for_data(tmp_path, digits_dir):
    started = time.perf_counter()
    train_in_process(tmp_path, digits_dir, num_steps=12)
    elapsed = time.perf_counter() - started
    lines = read_metrics(tmp_path / "metrics.jsonl")
    assert [line["step"] for line in lines] == list(range(1, 13))
    for line in lines:
        assert 0 <= line["data_wait_fraction"] <= 1
        assert 0 <= line["data_wait_s"] < elapsed
    assert sum(line["data_wait_s"] for line in lines) < elapsed


@pytest.mark.slow
def test_the_progress_bar_in_a_terminal_shows_the_data_wait_fraction(tmp_path, digits_dir):
    controller, terminal = pty.openpty()
    termios.tcsetwinsize(terminal, (24, 200))  # rows, columns: tqdm draws nothing in 0 columns
    training = Training(tmp_path / "run", digits_dir, num_steps=12, stderr=terminal)
    os.close(terminal)
    output = b""
    while chunk := _read_terminal(controller):
        output += chunk
    os.close(controller)
    assert training.process.wait(timeout=TIMEOUT) == 0, output
    assert re.search(rb"data_wait_fraction=\d\.\d\d", output), output


def _read_terminal(descriptor: int) -> bytes:
    """Bytes from a pseudo-terminal's controller side; b"" once the child closed it."""
    try:
        return os.read(descriptor, 65536)
    except OSError:  # EIO: no process holds the terminal side any more
        return b""
