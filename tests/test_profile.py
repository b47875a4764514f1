"""`resumax profile`: per-step times, end-to-end records/s per num_workers, a recommendation."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from resumax import ArrayRecordSourceConfig, ArrayRecordSourceModule, Pipeline, RandomMap
from resumax.profile import profile_pipeline

REPO = Path(__file__).resolve().parent.parent


def run_profile(*arguments: str, cwd: Path) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "resumax", "profile", *arguments, "--seconds", "0.3"]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=300)


def assert_profile_shape(output: str, steps: list[str]) -> None:
    """Every step with its us/record and records/s, a row per num_workers 0..cores, and one
    recommendation line naming a num_workers setting."""
    for step in steps:
        assert re.search(rf"^{re.escape(step)}\s+[\d.]+\s+[\d,]+\s+\d+%$", output, re.M), step
    assert "records/s" in output and "num_workers" in output and "decode" in output
    for workers in range(os.cpu_count() + 1):
        assert re.search(rf"^\s+{workers}\s+[\d,]+$", output, re.M), workers
    (line,) = [line for line in output.splitlines() if line.startswith("recommendation: ")]
    assert re.search(r"takes \d+%: (use|keep) num_workers=\d", line), line


@pytest.mark.slow
def test_profile_of_files_prints_every_step_and_each_worker_count(shards, tmp_path):
    result = run_profile(shards, "--batch-size", "16", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert_profile_shape(result.stdout, ["read", "decode", "batch", "device put"])


@pytest.mark.slow
def test_profile_of_a_config_prepares_its_data_and_names_its_stage(tmp_path):
    config = REPO / "configs" / "digits.yaml"
    result = run_profile("--config", str(config), f"data.dir={tmp_path}/digits", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert (tmp_path / "digits").is_dir()
    assert_profile_shape(result.stdout, ["read", "decode", "batch", "BatchMap 'features'"])


def test_profile_without_files_or_config_exits_2_and_says_what_to_give(tmp_path):
    result = run_profile(cwd=tmp_path)
    assert result.returncode == 2
    assert "give ArrayRecord paths or globs, or --config" in result.stderr


def crop(example: dict, rng: np.random.Generator) -> dict:
    top = rng.integers(0, 2)
    return {**example, "image": example["image"][top : top + 2]}


def test_profile_times_each_stage_by_name_and_does_not_move_the_pipeline(shards):
    source = ArrayRecordSourceModule(ArrayRecordSourceConfig(shuffle_files=True), shards)
    pipeline = Pipeline(source, [RandomMap(crop, name="crop")], batch_size=8)
    report = profile_pipeline(pipeline, seconds=0.2, max_workers=0)
    assert [step.name for step in report.steps] == [
        "read",
        "decode",
        "RandomMap 'crop'",
        "batch",
        "device put",
    ]
    assert all(step.records > 0 and step.records_per_s > 0 for step in report.steps)
    assert list(report.end_to_end) == [0] and report.end_to_end[0] > 0
    assert source.get_state()["current_index"] == 0
