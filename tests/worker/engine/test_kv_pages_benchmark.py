"""benchmarks/kv_pages.py drives the real scheduler to the end of its workload and prints it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "kv_pages.py"


def run(*args: str) -> dict[str, str]:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--requests", "24", "--max-batch-size", "8",
         "--max-seq-len", "512", "--page-size", "16", "--prompt", "20", "60", *args],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = [ln.rsplit(None, 1) for ln in proc.stdout.splitlines()[1:]]
    return {name.strip(): value for name, value in rows}


def test_the_page_policy_benchmark_drains_its_workload() -> None:
    roomy = run("--pages", "256", "--output", "10", "100", "--max-tokens", "400")
    tight = run("--pages", "32", "--output", "100", "400", "--max-tokens", "400")
    assert float(roomy["mean running batch"]) > 5  # 8 slots, busy but for the tail
    assert int(roomy["preemptions"]) == 0
    assert int(tight["preemptions"]) > 0  # a third of the pages the outputs need
    assert int(tight["steps to drain"]) > int(roomy["steps to drain"])
