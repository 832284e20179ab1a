"""The launcher and `dsworker serve`'s config resolution, with stand-in rank processes.

Real child processes (plain Python sleepers) exercise the group rules without loading a model:
one rank dying stops all and exits non-zero; SIGTERM stops all and exits 0.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest

from dsworker.contract.engine_config import EngineConfig, EngineConfigError, load_engine_config
from dsworker.launch.rank_processes import Launcher, RankSpec, rank_specs
from dsworker.launch.serve_command import node_rank_from_host, resolve_config
from waiting import wait_until

SLEEPER = textwrap.dedent(
    """
    import os, signal, sys, time
    open(sys.argv[1] + "/" + os.environ["RANK"], "w").write(str(os.getpid()))
    if os.environ["RANK"] == "0":
        signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    time.sleep(120)
    """
)


def test_rank_specs_follow_the_ordinal_rule() -> None:
    specs = rank_specs(4, 2, 1, "pod-0.svc", 29500)
    assert [s.rank for s in specs] == [4, 5, 6, 7]
    assert [s.local_rank for s in specs] == [0, 1, 2, 3]
    assert specs[2].env == {
        "RANK": "6",
        "LOCAL_RANK": "2",
        "WORLD_SIZE": "8",
        "LOCAL_WORLD_SIZE": "4",
        "NODE_RANK": "1",
        "MASTER_ADDR": "pod-0.svc",
        "MASTER_PORT": "29500",
    }
    with pytest.raises(ValueError, match="outside"):
        rank_specs(2, 2, 2, "x", 1)


def test_node_rank_from_pod_hostname(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NODE_RANK", raising=False)
    monkeypatch.setenv("POD_NAME", "r1-workers-3")
    assert node_rank_from_host(None) == 3
    assert node_rank_from_host(1) == 1
    monkeypatch.setenv("POD_NAME", "no-ordinal")
    with pytest.raises(EngineConfigError, match="--node-rank"):
        node_rank_from_host(None)


def _launcher(tmp_path: Path, n: int) -> Launcher:
    specs = rank_specs(n, 1, 0, "127.0.0.1", 1)
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)

    def cmd(spec: RankSpec) -> list[str]:
        return [sys.executable, str(script), str(tmp_path)]

    return Launcher(specs, cmd, grace_s=5.0)


def _wait_pids(tmp_path: Path, n: int) -> dict[int, int]:
    def pids() -> dict[int, int] | None:
        files = {int(p.name): p for p in tmp_path.iterdir() if p.name.isdigit()}
        if len(files) == n and all(f.read_text() for f in files.values()):
            return {r: int(f.read_text()) for r, f in files.items()}
        return None

    return wait_until(pids, 60, f"{n} ranks to write their pids")


def _run_in_thread(launcher: Launcher) -> tuple[threading.Thread, dict[str, int]]:
    result: dict[str, int] = {}
    launcher.start()
    t = threading.Thread(target=lambda: result.setdefault("rc", launcher.watch()))
    t.start()
    return t, result


def test_one_rank_dying_stops_the_group_non_zero(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path, 3)
    t, result = _run_in_thread(launcher)
    try:
        pids = _wait_pids(tmp_path, 3)
        os.kill(pids[1], signal.SIGKILL)
        t.join(30)
        assert result["rc"] != 0
        assert all(p.poll() is not None for p in launcher.procs.values())
    finally:
        launcher.stop_all()


def test_stop_terminates_every_rank(tmp_path: Path) -> None:
    launcher = _launcher(tmp_path, 2)
    t, result = _run_in_thread(launcher)
    try:
        _wait_pids(tmp_path, 2)
        launcher._on_signal(signal.SIGTERM, None)  # what the SIGTERM handler does
        t.join(30)
        assert result["rc"] == 0
        assert launcher.procs[0].returncode == 0  # rank 0 got SIGTERM first and exited cleanly
        assert all(p.returncode is not None for p in launcher.procs.values())
    finally:
        launcher.stop_all()


def test_serve_cli_sigterm_and_bad_config(tmp_path: Path) -> None:
    bad = tmp_path / "engine.json"
    bad.write_text(json.dumps({"maxSeqLenn": 1, "maxBatchSize": 0}))
    proc = subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "serve", "--model", str(tmp_path), "--config",
         str(bad)],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert proc.returncode == 2
    assert "maxSeqLenn: unknown key" in proc.stderr and "maxBatchSize" in proc.stderr


# -- config resolution ------------------------------------------------------------------------


def test_defaults_take_the_plan_from_the_shards() -> None:
    plan = {"worldSize": 2, "dp": 1, "tp": 2, "moeTp": 1, "moeEp": 2, "mtp": True}
    cfg = resolve_config(load_engine_config(None), 2, plan, {"port": 8000, "dtype": None})
    assert (cfg.worldSize, cfg.tp, cfg.moe_ep, cfg.mtp, cfg.port) == (2, 2, 2, True, 8000)
    assert cfg.dtype == "bfloat16"


def test_defaults_without_shards_are_tp_and_ep_over_the_world() -> None:
    cfg = resolve_config(EngineConfig(), 4, None, {})
    assert (cfg.dp, cfg.tp, cfg.moe_tp, cfg.moe_ep) == (1, 4, 1, 4)


def test_plan_mismatches_are_named() -> None:
    given = EngineConfig(worldSize=2, dp=2, tp=1, moe_ep=2)
    with pytest.raises(EngineConfigError, match="tp: shards 2, engine config 1"):
        resolve_config(given, 2, {"worldSize": 2, "dp": 1, "tp": 2, "moeTp": 1, "moeEp": 2}, {})
    with pytest.raises(EngineConfigError, match="does not match --nodes x --nproc-per-node = 4"):
        resolve_config(given, 4, None, {})
