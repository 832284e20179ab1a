"""tests/waiting.py: a wait returns what it waited for, or fails naming it."""

from __future__ import annotations

import itertools
import time

import pytest

from waiting import wait_until


def test_returns_the_first_truthy_value() -> None:
    calls = itertools.count()
    assert wait_until(lambda: next(calls) >= 3 and "up", 5, "the third poll", interval_s=0) == "up"


def test_fails_loudly_naming_what_it_waited_for() -> None:
    start = time.monotonic()
    status = 503
    with pytest.raises(
        AssertionError, match=r"waiting for /health to answer 200; last seen: False"
    ):
        wait_until(lambda: status == 200, 0.2, "/health to answer 200")
    assert time.monotonic() - start >= 0.2


def test_retries_only_the_exceptions_it_is_told_to() -> None:
    def refused() -> bool:
        raise ConnectionRefusedError("not listening yet")

    with pytest.raises(AssertionError, match="ConnectionRefusedError"):
        wait_until(refused, 0.1, "the port", retry_on=(OSError,))
    with pytest.raises(ConnectionRefusedError):  # not retried: fails at once, not after 60 s
        wait_until(refused, 60, "the port")
