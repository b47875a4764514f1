"""The quick reference runs end to end, as a script and as a notebook, and every check it prints
holds; the notebook and the script hold the same cells."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import jupytext
import nbformat
from jupyter_client import KernelManager
from jupyter_client.kernelspec import KernelSpecManager
from nbclient import NotebookClient

ROOT = Path(__file__).resolve().parent.parent
QUICKREF = ROOT / "examples/integration/arrayrecord/01_arrayrecord_quickref"
SCRIPT = QUICKREF.with_suffix(".py")
NOTEBOOK = QUICKREF.with_suffix(".ipynb")
CHECKS = 13
SYNC_COMMAND = f".venv/bin/jupytext --sync {SCRIPT.relative_to(ROOT)}"


def test_arrayrecord_quickref_runs_and_all_checks_hold(tmp_path):
    result = subprocess.run(
        [sys.executable, str(SCRIPT)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[FAILED]" not in result.stdout
    assert result.stdout.count("[ok]") == CHECKS
    assert f"Quick reference completed! {CHECKS} checks held." in result.stdout


def _this_python_kernel(kernel_dir: Path) -> KernelManager:
    """A `python3` kernel that runs this interpreter (the venv's), whatever kernels the user has
    installed elsewhere: its spec lives in `kernel_dir` alone."""
    spec = kernel_dir / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    kernel = {"argv": argv, "display_name": "Python 3 (test)", "language": "python"}
    (spec / "kernel.json").write_text(json.dumps(kernel))
    specs = KernelSpecManager(kernel_dirs=[str(kernel_dir)])
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


def _stdout(cell: nbformat.NotebookNode) -> str:
    return "".join(
        output.get("text", "")
        for output in cell.get("outputs", [])
        if output.output_type == "stream" and output.name == "stdout"
    )


def test_quickref_notebook_is_committed_without_outputs():
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code
    for cell in code:
        assert cell.outputs == [] and cell.execution_count is None, (
            f"clear the notebook's outputs: {SYNC_COMMAND} after removing them"
        )


def test_quickref_notebook_executes_and_all_checks_hold(tmp_path):
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    workdir = tmp_path / "cwd"
    workdir.mkdir()
    client = NotebookClient(
        notebook,
        timeout=600,
        kernel_name="python3",
        km=_this_python_kernel(tmp_path / "kernels"),
        resources={"metadata": {"path": str(workdir)}},
    )
    client.execute()  # raises CellExecutionError naming the cell if one fails

    errors = [
        output
        for cell in notebook.cells
        for output in cell.get("outputs", [])
        if output.output_type == "error"
    ]
    assert errors == []
    printed = "".join(_stdout(cell) for cell in notebook.cells)
    assert "[FAILED]" not in printed
    assert printed.count("[ok]") == CHECKS
    assert f"Quick reference completed! {CHECKS} checks held." in _stdout(notebook.cells[-1])
    assert list(workdir.iterdir()) == []  # it wrote to its own temporary directory only


def test_quickref_notebook_and_script_hold_the_same_cells():
    notebook, script = jupytext.read(NOTEBOOK), jupytext.read(SCRIPT)
    assert notebook.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    assert script.metadata["jupytext"]["formats"] == "ipynb,py:percent"
    cells_of_notebook = [(cell.cell_type, cell.source) for cell in notebook.cells]
    cells_of_script = [(cell.cell_type, cell.source) for cell in script.cells]
    assert cells_of_notebook == cells_of_script, f"out of sync: run {SYNC_COMMAND}"
