"""The quick reference runs end to end and every check it prints holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_arrayrecord_quickref_runs_and_all_checks_hold():
    script = ROOT / "examples/integration/arrayrecord/01_arrayrecord_quickref.py"
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[FAILED]" not in result.stdout
    assert result.stdout.count("[ok]") == 11
    assert "Quick reference completed!" in result.stdout
