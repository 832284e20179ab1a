"""Shared experts folded into the routed experts' fused ops: held as extra experts of the stack.

A decode step then runs the shared experts inside dsworker::moe_gate_up / moe_down (or their 8-bit
twins): moe_route appends always-selected columns with weight 1 for them, and the step saves the
shared MLP's two matmuls, its SiLU and product, and the add. This rank's tp slice of the shared
MLP (intermediate I_s = n_shared * moe_inter / tp) is cut into S = I_s / I_c chunks of the routed
experts' width I_c = moe_inter / moe_tp; chunk j holds gate and up rows [j*I_c, (j+1)*I_c) and the
same columns of down_proj, so the chunks' outputs sum to the slice's. The chunks live at the end
of the expert stacks (one allocation; the separate path's MLPs hold views of it, so every byte is
held once), and the prefill path sums the chunk MLPs.

Not folded (the separate MLP stays), each for a reason of shape or numerics:
- I_s is not a multiple of I_c (e.g. V3's one shared expert with tp 2 but moe_tp 1);
- EP level 2 on a wider world (its rows travel to the experts' owners, the shared part stays home)
  and MindIE's routing cutoff (no fused path);
- S > 1 where the 8-bit layout does not split: W8A8 (the down projection's input is quantised per
  token over the whole slice; per chunk would round differently), W8A16 per channel (one down
  scale [H, 1] for every chunk: S copies, not one), FP8 with a chunk off its 128-blocks.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn

from dsworker.contract.quant import FP8, W8A16, QuantFormat
from dsworker.model import quant_weights
from dsworker.model.config import ModelArgs
from dsworker.model.layers import MLP
from dsworker.parallel.groups import ParallelGroups

if TYPE_CHECKING:
    from dsworker.model.experts import LocalExperts
    from dsworker.model.moe import MoE, MoEOptions


def chunks(
    args: ModelArgs, groups: ParallelGroups, opts: MoEOptions, prefix: str = "model.layers.1.mlp"
) -> tuple[int, str]:
    """(S, "") when this rank's shared slice of the MoE at `prefix` folds into S extra experts,
    else (0, why not)."""
    if not args.n_shared_experts:
        return 0, "no shared experts"
    if opts.routing_cutoff is not None:
        return 0, "the routing cutoff takes no fused path"
    if groups.world.size > 1 and opts.ep_level == 2:
        return 0, "EP level 2 sends routed rows to their owners; the shared slice stays home"
    formats = args.expert_formats(f"{prefix}.experts")
    if args.mlp_formats(f"{prefix}.shared_experts") != formats:
        return 0, "the checkpoint keeps the shared and routed experts in different precisions"
    slice_inter = args.n_shared_experts * args.moe_intermediate_size // groups.tp.size
    inter = args.moe_intermediate_size // groups.moe_tp.size
    if slice_inter % inter:
        return 0, f"the shared slice ({slice_inter}) is no multiple of a routed expert ({inter})"
    s = slice_inter // inter
    for q in {f for f in formats if f is not None}:
        if s > 1 and not _splits(q, inter):
            return 0, f"{q.kind} weights of {s} chunks do not split without copies"
    return s, ""


def _splits(q: QuantFormat, inter: int) -> bool:
    """Whether chunks `inter` wide cut q's scales without copies (see the module docstring)."""
    if q.kind == FP8:
        return inter % q.block[0] == 0 and inter % q.block[1] == 0
    return q.kind == W8A16 and bool(q.group_size) and inter % q.group_size == 0


class FoldedShared(nn.Module):
    """The shared experts' tp slice as S chunk MLPs over views of the expert stacks' tail."""

    def __init__(self, experts: LocalExperts, count: int, hidden: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.experts = [experts]  # a list: not a submodule, its parameters count there once
        meta = torch.device("meta")  # unused: the MLPs hold the stack's views, allocate nothing
        self.chunks = nn.ModuleList(
            MLP(hidden, experts.inter, dtype, meta, storage=experts.shared_storage(j))
            for j in range(count)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The separate path (prefill, large batches): the chunks' partial sums added."""
        out = self.chunks[0](x)
        for mlp in self.chunks[1:]:
            out = out + mlp(x)
        return out

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        """HF names -> views of the stack tail; one chunk is the plain MLP's own slots."""
        if len(self.chunks) == 1:
            return self.chunks[0].targets(prefix)
        ex = self.experts[0]
        tail, i = slice(ex.num, ex.num + len(self.chunks)), ex.inter
        gate, up, down = (f"{prefix}.{p}_proj.weight" for p in ("gate", "up", "down"))
        out: dict[str, torch.Tensor] = {}
        if ex.q13 is not None:
            q13 = quant_weights.part(ex.qall13, tail)
            out.update(quant_weights.chunk_slots(gate, q13, half=0))
            out.update(quant_weights.chunk_slots(up, q13, half=1))
        else:  # [S, I_c, H]: the slice's rows, split
            out.update({gate: ex.all13[tail, :i], up: ex.all13[tail, i:]})
        if ex.q2 is not None:
            out.update(quant_weights.chunk_slots(down, quant_weights.part(ex.qall2, tail)))
        else:  # [H, S, I_c]: columns, split
            out[down] = ex.all2[tail].transpose(0, 1)
        return out


def local_ids(moe: MoE, ids: torch.Tensor, real: torch.Tensor, folded: bool) -> torch.Tensor:
    """Global ids [R, k (+S)] of the world's gathered rows (R = W * m, rank-major) -> this rank's
    local ids, -1 for other ranks' experts and padding rows; the S shared columns (local ids
    E_loc..) stay only on rows of this rank's own dp group, whose tp ranks hold the other slices,
    so the reduce-scatter completes the shared sum as it completes the routed one."""
    ex, k = moe.experts, moe.args.top_k
    local = ids - ex.first
    hit = (local >= 0) & (local < ex.num) & real[:, None]
    if folded:
        mine = real & moe.peers.repeat_interleave(ids.shape[0] // moe.peers.shape[0])
        shared = torch.arange(ids.shape[1], device=ids.device) >= k
        hit = torch.where(shared, mine[:, None], hit)
    return local.masked_fill(~hit, -1)
