"""The Triton kernels: interpreted on CPU (every machine), compiled on a GPU (where there is one).

The interpreted cases live in triton_cases.py and run in a child pytest with TRITON_INTERPRET=1 set
before triton is imported (see that module for why a fresh process is needed).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from quant_helpers import expert_stack, rel_err, tail

import dsworker.ops  # noqa: F401  (registers the dsworker:: ops)
from dsworker.ops import quant_formats as qf
from dsworker.ops.quant_moe import GATE_UP

CASES = Path(__file__).with_name("triton_cases.py")
DEADLINE_S = 300


def test_triton_kernels_under_interpreter() -> None:
    pytest.importorskip("triton", reason="triton is not installed: no CUDA kernels to check")
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(CASES)]
    try:
        run = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=DEADLINE_S)
    except subprocess.TimeoutExpired as e:
        pytest.fail(f"interpreted Triton cases still running after {DEADLINE_S}s: {e.stdout}")
    assert run.returncode == 0, f"interpreted Triton cases failed:\n{run.stdout}\n{run.stderr}"
    assert " passed" in run.stdout and " skipped" not in run.stdout, run.stdout


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device: compiled kernels need a GPU"
)
@pytest.mark.parametrize("kind", qf.KINDS)
def test_cuda_ops_match_reference(kind: str) -> None:
    """On a GPU the registered CUDA kernels (compiled Triton) against the CPU reference."""
    x, ids = torch.randn(7, 256), torch.randint(-1, 4, (7, 2))
    w13 = expert_stack(kind, 4, 256, 256, True, 6)
    args = (ids, w13["data"], w13["scale"], *tail(kind, w13))
    ref = GATE_UP[kind](x, *args)
    cuda = [a.cuda() if isinstance(a, torch.Tensor) else a for a in args]
    got = GATE_UP[kind](x.cuda(), *cuda).cpu()
    assert rel_err(got, ref) < 1e-4  # fp32 x: IEEE fp32 dots, only the summation order differs
