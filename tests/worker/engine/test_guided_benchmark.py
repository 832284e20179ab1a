"""benchmarks/guided.py compiles its grammars and walks them on a small synthetic vocabulary."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "guided.py"


def test_the_guided_benchmark_runs_and_reports_every_figure() -> None:
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "--vocab", "3000", "--steps", "20"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "vocabulary: 3000 ids (3000 pieces)" in out
    assert out.count("compile ") == 4 and out.count("per step, ") == 4
