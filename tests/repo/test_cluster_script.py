"""`scripts/cluster` keeps its state per checkout: a second checkout never attaches to (or stops)
the first one's cluster."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def checkout(where: Path) -> Path:
    """A copy of the two files `scripts/cluster` runs from, as a separate checkout would have."""
    (where / "scripts").mkdir(parents=True)
    (where / "tests" / "cluster").mkdir(parents=True)
    shutil.copy(ROOT / "scripts" / "cluster", where / "scripts" / "cluster")
    shutil.copy(ROOT / "tests" / "cluster" / "localcluster.py", where / "tests" / "cluster")
    return where


def cluster(repo: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "DSOP_CLUSTER_STATE"}
    env["HOME"] = str(home)
    return subprocess.run(
        [sys.executable, str(repo / "scripts" / "cluster"), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_two_checkouts_have_their_own_cluster_state(tmp_path: Path) -> None:
    home = tmp_path / "home"
    first, second = checkout(tmp_path / "a" / "repo"), checkout(tmp_path / "b" / "repo")
    down = cluster(first, home, "status")
    assert down.returncode == 1 and down.stdout.startswith("down (no state in "), down.stdout
    state = Path(down.stdout.split("no state in ", 1)[1].rstrip(")\n"))
    assert state.is_relative_to(home / ".cache" / "dsop-cluster" / "state"), state
    # What `up` in the first checkout leaves behind (its processes long gone).
    state.mkdir(parents=True)
    (state / "cluster.json").write_text(
        json.dumps(
            {
                "bin_dir": str(tmp_path / "bin"),
                "ports": {"apiserver": 1},
                "pids": {"etcd": 999999},
                "token": "t",
                "server": "https://127.0.0.1:1",
                "kubeconfig": str(state / "kubeconfig"),
            }
        )
    )
    mine = cluster(first, home, "status")
    assert "STOPPED" in mine.stdout, mine.stdout + mine.stderr  # the first checkout attaches
    other = cluster(second, home, "status")
    assert other.stdout.startswith("down (no state in "), other.stdout
    assert str(state) not in other.stdout
    gone = cluster(second, home, "down")
    assert gone.returncode == 0 and (state / "cluster.json").exists(), gone.stderr
