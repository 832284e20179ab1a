"""Building blocks with tensor parallelism made explicit: norms, vocab-parallel embed and head, MLP.

Weights are plain tensors filled by the loader (no autograd, no init); a module that produces a
partial sum over tp says so and leaves the all-reduce to its caller, so the MoE block can fold the
shared experts and the routed experts into one reduction.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from dsworker.contract.quant import QuantFormat
from dsworker.model import quant_weights
from dsworker.ops.norm import add_rms_norm
from dsworker.ops.norm import rms_norm as fused_rms_norm
from dsworker.ops.quant_formats import QuantWeight
from dsworker.ops.quant_matmul import quant_linear
from dsworker.parallel.groups import Group


def weight(*shape: int, dtype: torch.dtype, device: torch.device) -> nn.Parameter:
    return nn.Parameter(torch.empty(*shape, dtype=dtype, device=device), requires_grad=False)


def rms_norm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm in fp32, scaled by the weight in the input dtype (transformers' numerics)."""
    return w * F.rms_norm(x.float(), (x.shape[-1],), eps=eps).to(x.dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.eps = eps
        self.weight = weight(dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused_rms_norm(x, self.weight, self.eps)

    def add(self, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(norm(residual + x), residual + x) in one op: the decoder's residual chaining."""
        return add_rms_norm(x, residual, self.weight, self.eps)


class VocabEmbedding(nn.Module):
    """Rows [tp_rank*V/tp, (tp_rank+1)*V/tp) of the table; other ids contribute zeros."""

    def __init__(
        self, vocab: int, hidden: int, tp: Group, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.tp = tp
        self.part = vocab // tp.size
        self.start = tp.rank * self.part
        self.weight = weight(self.part, hidden, dtype=dtype, device=device)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if self.tp.size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.part)
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out = out.masked_fill(outside[:, None], 0)
        return self.tp.all_reduce(out)


class VocabHead(nn.Module):
    """Column-parallel lm_head: local logits over V/tp ids, all-gathered to the full vocab."""

    def __init__(
        self, vocab: int, hidden: int, tp: Group, dtype: torch.dtype, device: torch.device
    ) -> None:
        super().__init__()
        self.tp = tp
        self.weight = weight(vocab // tp.size, hidden, dtype=dtype, device=device)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        local = F.linear(h, self.weight)
        if self.tp.size == 1:
            return local
        parts = self.tp.all_gather(local)  # [tp*T, V/tp]
        t, part = local.shape
        return parts.view(self.tp.size, t, part).permute(1, 0, 2).reshape(t, self.tp.size * part)


class Linear(nn.Module):
    """y = x @ W.T; with `quant`, W stays 8-bit (its parameters carry the checkpoint's names).

    `partial`: a row-parallel rank other than the first, whose output is summed with the others'
    (a static W8A8 weight's quant_bias is added once, by the first).
    """

    def __init__(
        self,
        out: int,
        inp: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: QuantFormat | None = None,
        partial: bool = False,
    ) -> None:
        super().__init__()
        self.partial = partial
        self.qweight: QuantWeight | None = None
        if quant is None:
            self.weight = weight(out, inp, dtype=dtype, device=device)
        else:
            self.qweight = quant_weights.alloc(quant, (), out, inp, device)
            quant_weights.register(self, "weight", self.qweight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.qweight is not None:
            return quant_linear(x, self.qweight, self.partial)
        return F.linear(x, self.weight)


def _held(
    fmt: QuantFormat | None,
    shape: tuple[int, int],
    dtype: torch.dtype,
    device: torch.device,
    halves: int = 1,
) -> torch.Tensor | QuantWeight:
    """An empty [n, k] weight: 8-bit in `fmt` with its scales, or in the compute dtype."""
    if fmt is None:
        return torch.empty(shape, dtype=dtype, device=device)
    return quant_weights.alloc(fmt, (), *shape, device, halves=halves)


class MLP(nn.Module):
    """SwiGLU with gate and up fused into one [2I, H] weight; returns a partial sum over tp.

    `quant`: the (gate+up, down) formats, each None for a weight held in the compute dtype (a
    checkpoint may keep down_proj in float and quantise gate/up, or the reverse). `storage`
    (w13, w2): tensors or 8-bit weights it holds instead of allocating its own, e.g. views of an
    expert stack that the fused expert ops read too (model/shared_fold.py).
    """

    def __init__(
        self,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: tuple[QuantFormat | None, QuantFormat | None] = (None, None),
        storage: tuple[torch.Tensor | QuantWeight, torch.Tensor | QuantWeight] | None = None,
    ) -> None:
        super().__init__()
        self.inter = inter
        self.q13: QuantWeight | None = None
        self.q2: QuantWeight | None = None
        if storage is None:
            storage = (
                _held(quant[0], (2 * inter, hidden), dtype, device, halves=2),
                _held(quant[1], (hidden, inter), dtype, device),
            )
        w13, w2 = storage
        if isinstance(w13, QuantWeight):
            self.q13 = w13
            quant_weights.register(self, "w13", w13)
        else:
            self.w13 = nn.Parameter(w13, requires_grad=False)
        if isinstance(w2, QuantWeight):
            self.q2 = w2
            quant_weights.register(self, "w2", w2)
        else:
            self.w2 = nn.Parameter(w2, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = quant_linear(x, self.q13) if self.q13 is not None else F.linear(x, self.w13)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        return quant_linear(h, self.q2) if self.q2 is not None else F.linear(h, self.w2)

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF names -> the views the loader fills."""
        out: dict[str, torch.Tensor] = {}
        if self.q13 is not None:
            out.update(quant_weights.slots(f"{prefix}.gate_proj.weight", self.q13, half=0))
            out.update(quant_weights.slots(f"{prefix}.up_proj.weight", self.q13, half=1))
        else:
            out[f"{prefix}.gate_proj.weight"] = self.w13[: self.inter]
            out[f"{prefix}.up_proj.weight"] = self.w13[self.inter :]
        if self.q2 is not None:
            out.update(quant_weights.slots(f"{prefix}.down_proj.weight", self.q2))
        else:
            out[f"{prefix}.down_proj.weight"] = self.w2
        return out
