"""Helpers of the fused-op tests (imported after conftest.py has set TRITON_INTERPRET)."""

from __future__ import annotations

import importlib
import os
from types import ModuleType

import torch

from dsworker.model.config import ModelArgs
from dsworker.tools.synth_presets import make_config

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"

ODD_ROWS = (1, 3, 5)


def kernels(name: str) -> ModuleType:
    """dsworker.ops.triton.<name>, interpreted on a CPU-only machine."""
    module = importlib.import_module(f"dsworker.ops.triton.{name}")
    if DEVICE == "cpu":
        from triton.runtime.interpreter import InterpretedFunction

        jitted = [v for v in vars(module).values() if hasattr(v, "fn") and hasattr(v, "src")]
        if not all(isinstance(v, InterpretedFunction) for v in jitted):
            os.environ["TRITON_INTERPRET"] = "1"
            module = importlib.reload(module)
        _interpret_triton_language(InterpretedFunction)
    return module


def _interpret_triton_language(interpreted: type) -> None:
    """triton.language's own jitted helpers (tl.sum, tl.max, ...) are decorated when triton is
    first imported: if an earlier test imported it before TRITON_INTERPRET was set, they stay
    compiled-only and an interpreted kernel calling them fails ("Cannot call @triton.jit'd outside
    of the scope of a kernel"). Reload them (and the names tl re-exports) in interpreter mode."""
    import triton.language as tl
    import triton.language.standard as standard

    if isinstance(standard.sum, interpreted):
        return
    importlib.reload(standard)
    importlib.reload(tl)


def preset_args(preset: str, arch: str = "v3") -> ModelArgs:
    """The ModelArgs of a synth preset (tiny, small, bench)."""
    return ModelArgs.from_config(make_config(arch, preset))


def assert_close(actual: torch.Tensor, expected: torch.Tensor, ulps: float) -> None:
    """|a - e| <= ulps * eps(dtype) * max|e| (+ a floor of one ulp of 1.0): rounding-order noise
    of fp32 accumulators passes, a wrong term (a slot, a head, a key) does not."""
    assert actual.shape == expected.shape and actual.dtype == expected.dtype
    eps = torch.finfo(expected.dtype).eps
    scale = max(1.0, float(expected.detach().float().abs().max()))
    err = (
        float((actual.detach().float() - expected.detach().float()).abs().max())
        if actual.numel()
        else 0.0
    )
    assert err <= ulps * eps * scale, f"max error {err:.3g} > {ulps} ulps of {scale:.3g}"
