"""This rank's routed experts (a contiguous block, each sliced over moe_tp) and how rows run them.

Two equal-result paths: a loop of per-expert matmuls, and a grouped matmul over rows sorted by
expert (MindIE switches it on by itself past 32 EP ranks, where the loop's launch count hurts).
The grouped path uses torch._grouped_mm on CUDA bf16 when present, else one padded bmm.
`fused` is the decode path: two fused ops over the routed experts only (any world size, -1 for
experts elsewhere). `combine` is another, for steps that must not wait on the host (graph capture, compile): static
shapes throughout, either the native grouped matmul or every local expert over every token.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from dsworker.contract.quant import QuantFormat
from dsworker.model import quant_weights
from dsworker.ops.moe_experts import moe_down, moe_gate_up
from dsworker.ops.quant_formats import QuantWeight
from dsworker.ops.quant_moe import quant_down, quant_gate_up
from dsworker.parallel.device import native_grouped_mm

log = logging.getLogger("dsworker.model")


class LocalExperts(nn.Module):
    """w13 [E_loc, 2*I_loc, H] (gate rows then up rows) and w2 [E_loc, H, I_loc].

    `extra` > 0 allocates that many more experts at the end of the same stacks: the shared
    experts' chunks (model/shared_fold.py), which `fused` runs for ids E_loc.. and nothing else
    sees. The parameters registered here are the routed part only, so each byte counts once.
    """

    def __init__(
        self,
        num: int,
        first: int,
        hidden: int,
        inter: int,
        dtype: torch.dtype,
        device: torch.device,
        quant: tuple[QuantFormat | None, QuantFormat | None] = (None, None),
        extra: int = 0,
    ) -> None:
        super().__init__()
        self.num, self.first, self.inter, self.extra = num, first, inter, extra
        self.q13: QuantWeight | None = None
        self.q2: QuantWeight | None = None
        total = num + extra
        # A checkpoint may keep one half in float (contract/precision.py): each half on its own.
        if quant[0] is None:
            self.all13 = torch.empty(total, 2 * inter, hidden, dtype=dtype, device=device)
            self.w13 = nn.Parameter(self.all13[:num], requires_grad=False)
        else:
            self.qall13 = quant_weights.alloc(quant[0], (total,), 2 * inter, hidden, device, 2)
            self.q13 = quant_weights.part(self.qall13, slice(0, num))
            quant_weights.register(self, "w13", self.q13)
        if quant[1] is None:
            self.all2 = torch.empty(total, hidden, inter, dtype=dtype, device=device)
            self.w2 = nn.Parameter(self.all2[:num], requires_grad=False)
        else:
            self.qall2 = quant_weights.alloc(quant[1], (total,), hidden, inter, device)
            self.q2 = quant_weights.part(self.qall2, slice(0, num))
            quant_weights.register(self, "w2", self.q2)
        self.quantised = self.q13 is not None or self.q2 is not None  # 8-bit ops on every path
        self._native_grouped = True

    def shared_storage(
        self, chunk: int
    ) -> tuple[torch.Tensor | QuantWeight, torch.Tensor | QuantWeight]:
        """Views (w13 [2I, H], w2 [H, I]) of extra expert `chunk`, for the MLP that holds it."""
        e = self.num + chunk
        w13 = quant_weights.part(self.qall13, e) if self.q13 is not None else self.all13[e]
        w2 = quant_weights.part(self.qall2, e) if self.q2 is not None else self.all2[e]
        return w13, w2

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        out: dict[str, torch.Tensor] = {}
        for i in range(self.num):
            p = f"{prefix}.{self.first + i}"
            if self.q13 is not None:
                out.update(quant_weights.slots(f"{p}.gate_proj.weight", self.q13, (i,), 0))
                out.update(quant_weights.slots(f"{p}.up_proj.weight", self.q13, (i,), 1))
            else:
                out[f"{p}.gate_proj.weight"] = self.w13[i, : self.inter]
                out[f"{p}.up_proj.weight"] = self.w13[i, self.inter :]
            if self.q2 is not None:
                out.update(quant_weights.slots(f"{p}.down_proj.weight", self.q2, (i,)))
            else:
                out[f"{p}.down_proj.weight"] = self.w2[i]
        return out

    def _routed(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, whole: bool = False
    ) -> torch.Tensor:
        """An 8-bit stack's path: the quantised op for an 8-bit half, the float op for a float
        one (a checkpoint may keep down_proj in float); both read only the routed experts.
        `whole`: the stacks with their extra (shared) experts, for ids E_loc.."""
        if self.q13 is not None:
            h = quant_gate_up(x, ids, self.qall13 if whole else self.q13)
        else:
            h = moe_gate_up(x, ids, self.all13 if whole else self.w13)
        if self.q2 is not None:
            return quant_down(h, ids, weights, self.qall2 if whole else self.q2)
        return moe_down(h, ids, weights, self.all2 if whole else self.w2)

    def forward(self, x: torch.Tensor, eid: torch.Tensor, grouped: bool) -> torch.Tensor:
        """Rows x [R, H] through local expert eid [R] each (partial over moe_tp)."""
        if x.shape[0] == 0:
            return x.new_zeros(x.shape)
        if self.quantised:
            ones = torch.ones((x.shape[0], 1), dtype=torch.float32, device=x.device)
            return self._routed(x, eid[:, None], ones)
        return self._grouped(x, eid) if grouped else self._loop(x, eid)

    def _loop(self, x: torch.Tensor, eid: torch.Tensor) -> torch.Tensor:
        out = x.new_zeros(x.shape)
        for e in eid.unique().tolist():
            rows = (eid == e).nonzero().squeeze(1)
            gate, up = F.linear(x[rows], self.w13[e]).chunk(2, dim=-1)
            out[rows] = F.linear(F.silu(gate) * up, self.w2[e])
        return out

    def _grouped(self, x: torch.Tensor, eid: torch.Tensor) -> torch.Tensor:
        order = eid.argsort(stable=True)
        sorted_eid = eid[order]
        counts = torch.bincount(sorted_eid, minlength=self.num)
        xs = x[order]
        if self._native_grouped and native_grouped_mm(x):
            try:
                ys = self._grouped_native(xs, counts)
                return ys.new_empty(ys.shape).index_copy_(0, order, ys)
            except (RuntimeError, AttributeError) as e:  # old GPU/torch: use the portable path
                self._no_native_grouped(e)
        starts = torch.cumsum(counts, 0) - counts
        slot = torch.arange(x.shape[0], device=x.device) - starts[sorted_eid]
        padded = x.new_zeros(self.num, int(counts.max()), x.shape[1])
        padded[sorted_eid, slot] = xs
        gate, up = torch.bmm(padded, self.w13.transpose(1, 2)).chunk(2, dim=-1)
        ys = torch.bmm(F.silu(gate) * up, self.w2.transpose(1, 2))[sorted_eid, slot]
        return ys.new_empty(ys.shape).index_copy_(0, order, ys)

    def fused(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert ids[t, k] (x[t]) for local ids [T, k] (-1: an expert of
        another rank, adds nothing; E_loc.. the extra experts) in two ops that read only the
        routed experts' weights (dsworker::moe_gate_up / moe_down): the small-token-count
        (decode) path, no host sync. 8-bit experts take their own grouped op, which reads only
        the routed experts too."""
        if self.quantised:
            return self._routed(x, ids, weights.float(), whole=True)
        return moe_down(moe_gate_up(x, ids, self.all13), ids, weights, self.all2)

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        """sum_k weights[t, k] * expert ids[t, k] (x[t]) for local ids [T, k]; no host sync."""
        if self.quantised:
            return self._routed(x, ids, weights.float())
        if self._native_grouped and native_grouped_mm(x):
            try:
                return self.combine_grouped(x, ids, weights)
            except (
                RuntimeError,
                AttributeError,
            ) as e:  # graph warm-up runs first, so it is met here
                self._no_native_grouped(e)
        return self.combine_dense(x, ids, weights)

    def combine_grouped(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Rows sorted by expert through torch._grouped_mm; group sizes stay on the device."""
        t, k = ids.shape
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        counts = torch.zeros(self.num, dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.int32))
        ys = self._grouped_native(x[order // k], counts)
        # Back to (token, k) order and summed there: no atomics, so a replay repeats eager bits.
        ys = torch.empty_like(ys).index_copy_(0, order, ys).view(t, k, -1)
        return (ys.float() * weights[..., None]).sum(1).to(x.dtype)

    def combine_dense(
        self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """Every local expert over every token, weighted by a dense [T, E] matrix.

        Reads each expert once, which at decode sizes (T*k rows near the expert count) costs about
        what the routed rows would.
        """
        gate, up = torch.matmul(x, self.w13.transpose(1, 2)).chunk(2, dim=-1)  # [E, T, I]
        ys = torch.matmul(F.silu(gate) * up, self.w2.transpose(1, 2))  # [E, T, H]
        dense = weights.new_zeros(ids.shape[0], self.num).scatter_add_(1, ids, weights)  # [T, E]
        return torch.einsum("eth,te->th", ys.float(), dense).to(x.dtype)

    def _no_native_grouped(self, e: Exception) -> None:
        log.warning("torch._grouped_mm unavailable (%s); using the portable expert paths", e)
        self._native_grouped = False

    def _grouped_native(self, xs: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        offs = torch.cumsum(counts, 0).to(torch.int32)
        h = torch._grouped_mm(xs, self.w13.transpose(1, 2), offs=offs)
        gate, up = h.chunk(2, dim=-1)
        return torch._grouped_mm(
            (F.silu(gate) * up).contiguous(), self.w2.transpose(1, 2), offs=offs
        )
