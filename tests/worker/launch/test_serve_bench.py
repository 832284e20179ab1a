"""benchmarks/engine.py runs on CPU with the tiny preset and prints every figure as JSON lines."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "engine.py"


def test_engine_benchmark_runs_on_cpu(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--work-dir",
         str(tmp_path), "--batch", "1", "2", "--new-tokens", "4", "--prefill-tokens", "32",
         "--repeat", "1"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    loads = {r["path"]: r for r in lines if r["bench"] == "load" and "path" in r}
    assert set(loads) == {"safetensors.load_file", "dsworker.engine.loader (sharded)"}
    assert all(r["gbps"] > 0 and r["bytes"] > 0 for r in loads.values())
    figures = {
        (r["bench"], r["engine"], r["batch"]): r["tokens_per_s"] for r in lines if "engine" in r
    }
    for engine in ("dsworker", "transformers"):
        assert figures[("prefill", engine, 1)] > 0
        assert figures[("decode", engine, 1)] > 0 and figures[("decode", engine, 2)] > 0
    ratios = [r for r in lines if "ratio" in r]
    assert {(r["bench"], r.get("batch")) for r in ratios} >= {("load", None), ("decode", 2)}


def test_engine_benchmark_with_mtp_reports_acceptance(tmp_path: Path) -> None:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--work-dir",
         str(tmp_path), "--batch", "2", "--new-tokens", "6", "--repeat", "1", "--mtp",
         "--speculative-tokens", "2", "--skip", "load", "prefill", "hf"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    [setup] = [r for r in lines if r["bench"] == "setup"]
    assert (setup["mtp"], setup["speculative_tokens"]) == (True, 2)
    (mtp,) = [r for r in lines if r["bench"] == "mtp"]
    # Every decode step carries 2 drafts for each of its (1 or 2) sequences; prefills carry none.
    decode_steps = mtp["steps"] - 2  # the warm-up's prefill and the run's
    assert 2 * decode_steps <= mtp["drafts"] <= 4 * decode_steps
    assert 0 <= mtp["accepted"] <= mtp["drafts"]
    assert [r["tokens_per_s"] > 0 for r in lines if r.get("engine") == "dsworker"] == [True]


def test_engine_benchmark_profiles_one_decode_step(tmp_path: Path) -> None:
    """--profile: per batch a summary and the top ops of one decode step, heaviest first."""
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--preset", "tiny", "--device", "cpu", "--work-dir",
         str(tmp_path), "--batch", "1", "3", "--repeat", "1", "--profile", "--profile-top", "4",
         "--skip", "load", "prefill", "decode", "hf"],
        capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-4000:]
    lines = [json.loads(ln) for ln in proc.stdout.splitlines() if ln.startswith("{")]
    for batch in (1, 3):
        [summary] = [r for r in lines if r["bench"] == "profile" and r["batch"] == batch]
        ops = [r for r in lines if r["bench"] == "profile_op" and r["batch"] == batch]
        assert summary["clock"] == "cpu" and summary["calls"] > 20 and summary["total_us"] > 0
        assert [r["rank"] for r in ops] == [1, 2, 3, 4]
        assert [r["self_us"] for r in ops] == sorted((r["self_us"] for r in ops), reverse=True)
        assert all(r["name"].startswith(("aten::", "dsworker::")) for r in ops), ops
        assert 0 < sum(r["share"] for r in ops) <= 1
