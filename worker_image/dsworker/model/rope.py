"""Rotary embedding of MLA's decoupled rope part: plain or YaRN, with DeepSeek's mscale rules.

YaRN stretches the low frequencies by `factor` with a linear ramp between beta_fast and beta_slow
rotations; cos/sin carry mscale(mscale)/mscale(mscale_all_dim), and the softmax scale gets
mscale(mscale_all_dim)^2 (0.135234 for V3's 192-dim heads), as transformers 5.x does.
"""

from __future__ import annotations

import math

import torch

from dsworker.contract.model_config import RopeConfig
from dsworker.model.config import ModelArgs


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    return 1.0 if factor <= 1 else 0.1 * mscale * math.log(factor) + 1.0


def _yarn_inv_freq(r: RopeConfig, dim: int) -> torch.Tensor:
    exponents = torch.arange(0, dim, 2, dtype=torch.float32) / dim
    extrapolated = 1.0 / (r.theta**exponents)
    interpolated = 1.0 / (r.factor * r.theta**exponents)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return (
            dim
            * math.log(r.original_max_position / (rotations * 2 * math.pi))
            / (2 * math.log(r.theta))
        )

    low, high = dim_of(r.beta_fast), dim_of(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1 = high-frequency dims, kept as they are
    return interpolated * (1 - keep) + extrapolated * keep


class Rope:
    """Per-position cos/sin tables (precomputed) and the attention softmax scale of one model."""

    def __init__(self, args: ModelArgs, device: torch.device) -> None:
        r, dim = args.rope, args.qk_rope_dim
        self.interleave = r.interleave
        self.softmax_scale = args.qk_head_dim**-0.5
        if r.kind == "yarn":
            inv_freq = _yarn_inv_freq(r, dim)
            if r.attention_factor is not None:
                self.attn_factor = float(r.attention_factor)
            elif r.mscale and r.mscale_all_dim:
                self.attn_factor = yarn_mscale(r.factor, r.mscale) / yarn_mscale(
                    r.factor, r.mscale_all_dim
                )
            else:
                self.attn_factor = yarn_mscale(r.factor)
            if r.mscale_all_dim:
                self.softmax_scale *= yarn_mscale(r.factor, r.mscale_all_dim) ** 2
        else:
            inv_freq = 1.0 / (r.theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
            self.attn_factor = 1.0
        self.inv_freq = inv_freq.to(device)
        self.table = torch.empty(0, dim, device=device)  # [positions, cos | sin] fp32

    def ensure(self, positions: int) -> None:
        """Tables for positions [0, positions): built on the host side before a step, so no
        step (or captured graph) computes trigonometry or converts positions."""
        if positions <= self.table.shape[0]:
            return
        n = max(positions, 2 * self.table.shape[0])
        angles = torch.arange(n, dtype=torch.float32, device=self.inv_freq.device)[:, None]
        angles = angles * self.inv_freq[None, :]
        self.table = torch.cat((angles.cos(), angles.sin()), dim=-1) * self.attn_factor

    def cos_sin(self, positions: torch.Tensor, upto: int) -> tuple[torch.Tensor, torch.Tensor]:
        """[T, dim/2] fp32 tables (views) for absolute positions below `upto`."""
        self.ensure(upto)
        cos, sin = self.table[positions].chunk(2, dim=-1)
        return cos, sin

    def apply(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """Rotate x [T, ..., dim]; the result is [even | odd] halves when interleaved.

        Queries and keys get the same layout, so their dot products equal the interleaved ones.
        """
        shape = (x.shape[0],) + (1,) * (x.dim() - 2) + (cos.shape[-1],)
        c, s = cos.view(shape), sin.view(shape)
        xf = x.float()
        if self.interleave:
            a, b = xf[..., 0::2], xf[..., 1::2]
        else:
            a, b = xf.chunk(2, dim=-1)
        return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)
