"""tests/cluster/localcluster.py stops its processes for sure: a component that ignores SIGTERM
is killed after the grace period, and a stop() that leaves one running says so."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from localcluster import ClusterError, LocalCluster, _kill_group

IGNORES_SIGTERM = (
    "import signal, subprocess, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN);"
    "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)']);"
    "print(child.pid, flush=True); time.sleep(60)"
)


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[-1].split()[0] != "Z"


def test_a_leader_that_ignores_sigterm_is_killed_with_its_group() -> None:
    proc = subprocess.Popen(
        [sys.executable, "-c", IGNORES_SIGTERM], stdout=subprocess.PIPE, start_new_session=True
    )
    assert proc.stdout is not None
    child = int(proc.stdout.readline())
    started = time.monotonic()
    assert _kill_group(proc.pid, proc, grace=0.3)
    assert proc.returncode == -9 and time.monotonic() - started < 5
    deadline = time.monotonic() + 5
    while _alive(child) and time.monotonic() < deadline:  # reaped by init, not by us
        time.sleep(0.05)
    assert not _alive(child), "the group's other process survived"


def test_stop_names_a_process_it_could_not_end(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("localcluster._kill_group", lambda pid, proc: False)
    monkeypatch.setattr("localcluster._is_our_process", lambda pid, bin_dir: True)
    cluster = LocalCluster(state_dir=tmp_path, pids={"etcd": os.getpid()}, ports={"etcd": 1})
    with pytest.raises(
        ClusterError, match=rf"still running after SIGKILL: etcd \(pid {os.getpid()}\)"
    ):
        cluster.stop()
    assert tmp_path.exists() and cluster.pids == {"etcd": os.getpid()}
