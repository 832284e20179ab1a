"""Fused custom ops of the engine: one torch.library op per kernel kind, one module per op family.

Why custom ops: a decode step must be a few fused kernels on every device and world size, and the
quantised weights must stay quantised on the device. Each op has
- a torch reference, registered for every device (the CPU implementation and the numerical truth),
- a Triton kernel for CUDA (`ops/triton/`), registered only where triton imports,
- a torch_npu fused operator for Ascend, registered only where torch_npu imports,
- a fake (meta) implementation, so torch.compile and graph capture see shapes without running it.
Importing `dsworker.ops` registers every op under the `dsworker::` namespace.
"""

from __future__ import annotations

from dsworker.ops import backends as backends
from dsworker.ops import mla_cache as mla_cache
from dsworker.ops import mla_decode as mla_decode
from dsworker.ops import moe_experts as moe_experts
from dsworker.ops import norm as norm
from dsworker.ops import quant_moe as quant_moe  # registers quant_matmul's ops too
from dsworker.ops import routing as routing
