"""The fused-op tests run the Triton kernels in triton's CPU interpreter on a machine without CUDA.

triton 3.9 decides at decoration time (`@triton.jit`, i.e. when a kernel module is imported)
whether a kernel is compiled or interpreted, from TRITON_INTERPRET. So this conftest sets
TRITON_INTERPRET=1 when pytest loads it, before any test module of this folder imports
dsworker.ops.triton.*; `fused_op_helpers.kernels(name)` also reloads a kernel module that an
earlier test imported without it. Kernels then run on CPU tensors through numpy. With CUDA
nothing is set and they run compiled.
"""

from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():
    os.environ["TRITON_INTERPRET"] = "1"
