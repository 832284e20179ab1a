"""Shared fixtures for the data-plane tests: synthesized DeepSeek checkpoints, built once per session.

`synth_checkpoint(arch="v3", preset="tiny", fmt="bf16", mtp=False, seed=0, overrides=None,
keep_float=(), static=())` returns the path of a cached checkpoint; treat it as read-only (copy it first if a
test must modify it).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from dsworker.tools.synth import synthesize

SynthFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def synth_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> SynthFactory:
    cache: dict[str, Path] = {}

    def make(
        arch: str = "v3",
        preset: str = "tiny",
        fmt: str = "bf16",
        mtp: bool = False,
        seed: int = 0,
        overrides: dict[str, Any] | None = None,
        keep_float: tuple[str, ...] = (),
        static: tuple[str, ...] = (),
    ) -> Path:
        key = json.dumps(
            [arch, preset, fmt, mtp, seed, overrides, keep_float, static], sort_keys=True
        )
        if key not in cache:
            out = tmp_path_factory.mktemp(f"ckpt-{arch}-{preset}-{fmt}{'-mtp' if mtp else ''}")
            cache[key] = synthesize(
                out, arch, preset, fmt, mtp, seed, overrides, keep_float=keep_float, static=static
            )
        return cache[key]

    return make


@pytest.fixture(scope="session")
def tiny_v3(synth_checkpoint: SynthFactory) -> Path:
    """Tiny DeepSeek-V3 BF16 checkpoint with the MTP layer."""
    return synth_checkpoint("v3", "tiny", "bf16", mtp=True)


@pytest.fixture(scope="session")
def tiny_v2(synth_checkpoint: SynthFactory) -> Path:
    """Tiny DeepSeek-V2-Lite-style BF16 checkpoint (q_proj, greedy softmax routing)."""
    return synth_checkpoint("v2", "tiny", "bf16")
