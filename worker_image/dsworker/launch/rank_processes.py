"""Start one pod's engine ranks as child processes and keep them alive together, or not at all.

A model instance is one torch.distributed group: if any rank dies the survivors would hang in their
next collective, so the launcher stops every rank and exits non-zero, and Kubernetes restarts the
pod (the operator restarts the whole group). SIGTERM stops the ranks cleanly: rank 0 first (it
finishes HTTP requests and tells the other ranks to stop), then whatever is left.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import FrameType

log = logging.getLogger("dsworker.launch.rank_processes")

POLL_S = 0.1
_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class RankSpec:
    """One child: its global and local rank and the torch.distributed environment it gets."""

    rank: int
    local_rank: int
    env: dict[str, str]


def rank_specs(
    nproc_per_node: int, nodes: int, node_rank: int, master_addr: str, master_port: int
) -> list[RankSpec]:
    """Global rank = node_rank * nproc_per_node + local index (the StatefulSet ordinal rule)."""
    if nproc_per_node < 1 or nodes < 1:
        raise ValueError("--nproc-per-node and --nodes must be >= 1")
    if not 0 <= node_rank < nodes:
        raise ValueError(f"node rank {node_rank} is outside [0, {nodes}); check --node-rank")
    world = nodes * nproc_per_node
    specs = []
    for local in range(nproc_per_node):
        rank = node_rank * nproc_per_node + local
        env = {
            "RANK": str(rank),
            "LOCAL_RANK": str(local),
            "WORLD_SIZE": str(world),
            "LOCAL_WORLD_SIZE": str(nproc_per_node),
            "NODE_RANK": str(node_rank),
            "MASTER_ADDR": master_addr,
            "MASTER_PORT": str(master_port),
        }
        specs.append(RankSpec(rank, local, env))
    return specs


def _die_with_parent() -> None:
    """In the child: get SIGKILL if the launcher dies, so no orphan rank keeps a device busy."""
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    except OSError:
        pass


class Launcher:
    """Run the children; return the pod's exit code."""

    def __init__(
        self,
        specs: Sequence[RankSpec],
        command: Callable[[RankSpec], list[str]],
        base_env: Mapping[str, str] | None = None,
        grace_s: float = 30.0,
    ) -> None:
        self.specs = list(specs)
        self.command = command
        self.base_env = dict(os.environ if base_env is None else base_env)
        self.grace_s = grace_s
        self.procs: dict[int, subprocess.Popen[bytes]] = {}
        self._stop_signal: int | None = None

    def _on_signal(self, signum: int, frame: FrameType | None) -> None:
        if self._stop_signal is None:
            log.info("received signal %d: stopping all ranks", signum)
        self._stop_signal = signum

    def start(self) -> None:
        for spec in self.specs:
            env = {**self.base_env, **spec.env}
            self.procs[spec.rank] = subprocess.Popen(
                self.command(spec), env=env, preexec_fn=_die_with_parent
            )
            log.info("started rank %d (pid %d)", spec.rank, self.procs[spec.rank].pid)

    def run(self) -> int:
        """Start the ranks and watch them; the exit code says how the group ended."""
        old = {s: signal.signal(s, self._on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            self.start()
            return self.watch()
        finally:
            self.stop_all()
            for s, h in old.items():
                signal.signal(s, h)

    def watch(self) -> int:
        while True:
            if self._stop_signal is not None:
                self.stop_all()
                return 0
            for rank, proc in self.procs.items():
                rc = proc.poll()
                if rc is not None:
                    if self._stop_signal is not None:
                        break  # a stop raced with this exit: handled at the top of the loop
                    log.error(
                        "rank %d exited with %s; stopping the other ranks of the group",
                        rank,
                        _describe(rc),
                    )
                    self.stop_all()
                    return rc if rc > 0 else 1
            time.sleep(POLL_S)

    def stop_all(self) -> None:
        """SIGTERM rank 0 (it tells the others to stop) then the rest; SIGKILL after the grace."""
        alive = {r: p for r, p in self.procs.items() if p.poll() is None}
        if not alive:
            return
        deadline = time.monotonic() + self.grace_s
        first = min(alive)
        if first == 0:
            _signal(alive[0], signal.SIGTERM)
            # Rank 0 drains HTTP for up to half the grace, then tells the others to stop: leave
            # it room to do so before they are signalled too.
            _wait_all(alive.values(), min(deadline, time.monotonic() + self.grace_s * 0.8))
        for p in alive.values():
            if p.poll() is None:
                _signal(p, signal.SIGTERM)
        _wait_all(alive.values(), deadline)
        for r, p in alive.items():
            if p.poll() is None:
                log.warning("rank %d ignored SIGTERM for %.0fs: killing it", r, self.grace_s)
                _signal(p, signal.SIGKILL)
                p.wait()


def _signal(p: subprocess.Popen[bytes], sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        p.send_signal(sig)


def _wait_all(procs: Iterable[subprocess.Popen[bytes]], deadline: float) -> None:
    for p in procs:
        left = deadline - time.monotonic()
        if left <= 0:
            return
        try:
            p.wait(timeout=left)
        except subprocess.TimeoutExpired:
            return


def _describe(rc: int) -> str:
    if rc < 0:
        try:
            return f"signal {signal.Signals(-rc).name}"
        except ValueError:
            return f"signal {-rc}"
    return f"code {rc}"


def python_module_command(module: str, args: Sequence[str]) -> Callable[[RankSpec], list[str]]:
    """Each rank runs `python -m module args...` with this interpreter."""

    def cmd(spec: RankSpec) -> list[str]:
        return [sys.executable, "-m", module, *args]

    return cmd
