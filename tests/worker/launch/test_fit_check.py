"""`dsworker serve` refuses, before any rank starts, a plan whose weights + KV + workspace do not fit."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest

from dsworker.cli import main
from dsworker.contract.errors import EXIT_BAD_INPUT


def test_serve_refuses_a_plan_that_does_not_fit(
    synth_checkpoint: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    model = synth_checkpoint("v3", "tiny", "fp8")
    monkeypatch.setenv("DSWORKER_DEVICE_MEMORY_GIB", "1.5")  # under the 2 GiB workspace allowance
    rc = main(["serve", "--model", str(model), "--nproc-per-node", "1", "--device", "cpu"])
    err = capsys.readouterr().err
    assert rc == EXIT_BAD_INPUT, err
    assert "does not fit" in err and "weights" in err and "1.5 GiB of device memory" in err, err
    assert "more ranks" in err and "smaller maxSeqLen x maxBatchSize" in err, err


def test_bad_memory_override_is_named(
    synth_checkpoint: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("DSWORKER_DEVICE_MEMORY_GIB", "lots")
    model = synth_checkpoint("v3", "tiny", "bf16")
    rc = main(["serve", "--model", str(model), "--nproc-per-node", "1", "--device", "cpu"])
    assert rc == EXIT_BAD_INPUT and "DSWORKER_DEVICE_MEMORY_GIB='lots'" in capsys.readouterr().err
