"""`dsworker::rms_norm` and `dsworker::add_rms_norm`: the residual add and the norm in one pass.

A decoder layer adds its attention (or MoE) output to the residual stream and normalises the sum
for the next block; fused, the row is read once and no fp32 copy leaves the kernel. Numerics are
model/layers.py's rms_norm (transformers'): normalise in fp32, round, scale by the weight in the
activation dtype.
"""

import torch
import torch.nn.functional as F

from dsworker.ops import backends


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """fp32 norm, rounded to x.dtype, times the weight in x.dtype."""
    normed = F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)
    return (weight.to(x.dtype) * normed).to(x.dtype)


@torch.library.custom_op("dsworker::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """x [..., D], weight [D] -> RMSNorm(x) * weight in x.dtype."""
    return rms_norm_reference(x, weight, eps)


@rms_norm.register_fake
def _rms_norm_fake(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("dsworker::add_rms_norm", mutates_args=())
def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(RMSNorm(residual + x) * weight, residual + x), both in x.dtype; the sum is rounded to
    x.dtype before the norm, as the eager `x = x + block(...)` then `norm(x)` does."""
    new_residual = (residual + x).to(x.dtype)
    return rms_norm_reference(new_residual, weight, eps), new_residual


@add_rms_norm.register_fake
def _add_rms_norm_fake(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty_like(x)


if backends.triton_available():

    @rms_norm.register_kernel("cuda")
    def _rms_norm_cuda(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        from dsworker.ops.triton.norm import rms_norm_triton

        return rms_norm_triton(x, None, weight, eps)[0]

    @add_rms_norm.register_kernel("cuda")
    def _add_rms_norm_cuda(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        from dsworker.ops.triton.norm import rms_norm_triton

        normed, new_residual = rms_norm_triton(x, residual, weight, eps)
        assert new_residual is not None
        return normed, new_residual


if backends.npu_available():

    @rms_norm.register_kernel("npu")
    def _rms_norm_npu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        import torch_npu

        return torch_npu.npu_rms_norm(x, weight.to(x.dtype), epsilon=eps)[0]

    @add_rms_norm.register_kernel("npu")
    def _add_rms_norm_npu(
        x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
    ) -> tuple[torch.Tensor, torch.Tensor]:
        import torch_npu

        normed, _, new_residual = torch_npu.npu_add_rms_norm(residual, x, weight.to(x.dtype), eps)
        return normed, new_residual
