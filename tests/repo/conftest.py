"""Fixtures of the checks of the repository itself: the helm binary."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture(scope="session")
def helm() -> Path:
    """The helm binary built with the cluster binaries (a no-op when the cache is warm)."""
    if bin_dir := os.environ.get("DSOP_CLUSTER_BIN"):
        return Path(bin_dir) / "helm"
    from localcluster import ClusterError, build_binaries

    try:
        return build_binaries(lambda _msg: None) / "helm"
    except ClusterError as exc:  # no Go toolchain: only `make test` guarantees the binaries
        pytest.skip(f"helm not available: {exc}")
