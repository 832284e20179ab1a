"""Progress lines on stderr and the final JSON summary (stdout + Kubernetes termination log).

A sharding Job over hundreds of GB must show it is alive (bytes done, GB/s, ETA every few seconds)
and hand its result to the operator: the summary goes to stdout and to /dev/termination-log (or
$DSOP_TERMINATION_LOG), which the kubelet copies into the pod status where the operator reads it.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import IO, Any

TERMINATION_LOG_ENV = "DSOP_TERMINATION_LOG"
DEFAULT_TERMINATION_LOG = "/dev/termination-log"
PROGRESS_INTERVAL_ENV = "DSOP_PROGRESS_INTERVAL"


def _gb(n: float) -> str:
    return f"{n / 1e9:.2f}"


class Progress:
    """Prints 'what: 1.20/7.10 GB (17%) 1.05 GB/s ETA 5s' at most every `interval` seconds."""

    def __init__(
        self, what: str, total: int, interval: float | None = None, stream: IO[str] | None = None
    ) -> None:
        self.what = what
        self.total = total
        env = os.environ.get(PROGRESS_INTERVAL_ENV)
        self.interval = interval if interval is not None else float(env) if env else 5.0
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.last = self.start

    def elapsed(self) -> float:
        return time.monotonic() - self.start

    def maybe_log(self, done: int, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self.last < self.interval:
            return
        self.last = now
        dt = max(now - self.start, 1e-9)
        rate = done / dt
        pct = 100.0 * done / self.total if self.total else 100.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        eta_s = f"{eta:.0f}s" if eta != float("inf") else "?"
        print(
            f"{self.what}: {_gb(done)}/{_gb(self.total)} GB ({pct:.0f}%) "
            f"{rate / 1e9:.2f} GB/s ETA {eta_s}",
            file=self.stream,
            flush=True,
        )


def termination_log_path() -> str | None:
    """$DSOP_TERMINATION_LOG when set, else /dev/termination-log when it exists and is writable."""
    env = os.environ.get(TERMINATION_LOG_ENV)
    if env:
        return env
    if os.path.exists(DEFAULT_TERMINATION_LOG) and os.access(DEFAULT_TERMINATION_LOG, os.W_OK):
        return DEFAULT_TERMINATION_LOG
    return None


def write_termination_log(obj: dict[str, Any]) -> None:
    path = termination_log_path()
    if path is None:
        return
    with contextlib.suppress(OSError), open(path, "w") as f:
        f.write(json.dumps(obj, separators=(",", ":")) + "\n")


def summary(bytes_done: int, files: int, seconds: float, **extra: Any) -> dict[str, Any]:
    """The final result record: bytes, files, seconds, throughputMBps (+ command-specific fields)."""
    out: dict[str, Any] = {
        "bytes": bytes_done,
        "files": files,
        "seconds": round(seconds, 3),
        "throughputMBps": round(bytes_done / 1e6 / seconds, 1) if seconds > 0 else 0.0,
    }
    out.update(extra)
    return out


def emit_summary(obj: dict[str, Any]) -> None:
    print(json.dumps(obj), flush=True)
    write_termination_log(obj)
