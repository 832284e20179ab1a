"""Which kernel backends this process can use: Triton on CUDA, torch_npu on Ascend, the reference everywhere.

The probes run once and never raise: a missing backend means the reference implementation serves.
"""

from __future__ import annotations

import functools
import importlib.util
import os


@functools.cache
def triton_available() -> bool:
    """True where triton imports (CUDA kernels, or the CPU interpreter with TRITON_INTERPRET=1)."""
    return importlib.util.find_spec("triton") is not None


def triton_interpreting() -> bool:
    """True when Triton kernels run in the CPU interpreter (tests without a GPU)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def npu_available() -> bool:
    """True where torch_npu imports (Ascend); its fused operators then serve the `npu` device."""
    return importlib.util.find_spec("torch_npu") is not None
