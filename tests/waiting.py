"""Waits in tests: poll against a deadline, and fail loudly with what was awaited.

A wait that gives up silently lets a test carry on against a server that never came up, and the
failure then points somewhere else (issue 16.16).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    deadline_s: float,
    what: str,
    *,
    interval_s: float = 0.05,
    retry_on: tuple[type[Exception], ...] = (),
) -> T:
    """predicate()'s first truthy value, polled every `interval_s` for up to `deadline_s`
    seconds, else an AssertionError naming `what`, the time waited and the last value seen.

    An exception of a `retry_on` type counts as "not yet" (a port not listening yet); any other
    ends the wait at once (a server that exited will not come up)."""
    start = time.monotonic()
    last: object = None
    while True:
        try:
            value = predicate()
        except retry_on as exc:
            last = exc
        else:
            if value:
                return value
            last = value
        waited = time.monotonic() - start
        if waited >= deadline_s:
            raise AssertionError(
                f"gave up after {waited:.1f} s waiting for {what}; last seen: {last!r}"
            )
        time.sleep(interval_s)
