"""DeepSeekMoE over the whole world: routed experts by moe_ep x moe_tp, shared experts over tp.

Every tp rank of a dp group holds the same tokens, so each takes a 1/tp chunk of them; the world
then holds every token exactly once. EP level 1 (AllGather) gathers all chunks everywhere, runs the
local experts on the rows routed to them and reduce-scatters the sums back. EP level 2 (AllToAll)
sends each routed row only to the ranks owning its expert (all moe_tp slices), with fixed-size
buffers from alltoall_ep_buffer_scale_factors, and sends the results back. Either way the chunk's
routed output is added to the shared experts' partial sum and one tp all-reduce completes both.
Where this rank's shared slice folds into the routed stack (model/shared_fold.py), the decode
path runs it inside the fused expert ops instead: at world 1 for every token, at EP level 1 for
the gathered rows of this rank's own dp group, whose reduce-scatter then adds the slices of its
tp peers to the routed sums (the tp all-reduce stays and completes the rows as before).
gloo implements all_to_all_single too, so CPU runs exercise the same AllToAll path as nccl/hccl.
A world of one rank needs no exchange: fixed-shape steps (captured or compiled decode) and, where
the grouped matmul runs natively, every step take a path with static shapes and no host sync. On a
wider world a fixed-shape step exchanges through model/moe_fixed.py: the same padded chunk on every
rank, fixed AllToAll capacities, no host sync, so the collectives can be captured with the step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from dsworker.contract.engine_config import DEFAULT_BUFFER_SCALE_FACTORS
from dsworker.model import shared_fold
from dsworker.model.config import ModelArgs
from dsworker.model.experts import LocalExperts
from dsworker.model.layers import MLP, weight
from dsworker.model.moe_fixed import allgather_fixed, alltoall_fixed
from dsworker.ops.routing import moe_route, router_logits
from dsworker.parallel.device import native_grouped_mm
from dsworker.parallel.groups import ParallelGroups

FUSED_MAX_ROWS = 128  # routed (token, expert) rows up to which the fused expert ops run


class ExpertBufferOverflow(RuntimeError):
    """EP level 2 would need more rows than its AllToAll buffer holds (never dropped silently)."""


@dataclass(frozen=True)
class MoEOptions:
    """MindIE's expert-parallel knobs (models.deepseekv2.* in its config)."""

    ep_level: int = 1
    routing_cutoff: float | None = None  # topk_scaling_factor with enable_init_routing_cutoff
    buffer_scale_factors: tuple[tuple[int, float], ...] = tuple(DEFAULT_BUFFER_SCALE_FACTORS)
    grouped_matmul: bool = False

    def buffer_factor(self, seq_len: int) -> float:
        """The first entry whose threshold <= seq_len (the table is in descending order)."""
        for threshold, factor in self.buffer_scale_factors:
            if threshold <= seq_len:
                return factor
        return self.buffer_scale_factors[-1][1] if self.buffer_scale_factors else 1.0


@dataclass
class MoEStats:
    """Rows (token, expert pairs) this rank ran and the rows the routing cutoff dropped."""

    routed_rows: int = 0
    dropped_rows: int = 0
    overflow_checks: list[int] = field(default_factory=list)
    # Fixed-shape EP level 2 steps add the rows their AllToAll buffers could not hold (a device
    # counter: the step cannot stop on the host); DecodeGraphs allocates and checks it.
    a2a_excess: torch.Tensor | None = None


def a2a_capacity(factor: float, tokens: int, top_k: int, moe_ep: int, experts_per_rank: int) -> int:
    """Rows one rank may send to one rank: ceil(factor * tokens * top_k / moe_ep).

    `tokens` is the most any rank dispatches this step; capped at the most that can ever go to one
    rank (tokens * min(top_k, experts per rank)), so a generous factor costs no memory.
    """
    want = math.ceil(factor * tokens * top_k / moe_ep)
    return max(1, min(want, tokens * min(top_k, experts_per_rank)))


class MoE(nn.Module):
    def __init__(
        self,
        args: ModelArgs,
        groups: ParallelGroups,
        opts: MoEOptions,
        stats: MoEStats,
        dtype: torch.dtype,
        device: torch.device,
        prefix: str = "model.layers.1.mlp",
    ) -> None:
        super().__init__()
        self.args, self.g, self.opts, self.stats = args, groups, opts, stats
        e, h = args.n_routed_experts, args.hidden_size
        self.gate = weight(e, h, dtype=torch.float32, device=device)  # routing runs in fp32
        self.bias = (
            weight(e, dtype=torch.float32, device=device)
            if args.topk_method == "noaux_tc"
            else None
        )
        shared = args.n_shared_experts * args.moe_intermediate_size
        per = e // groups.moe_ep.size
        formats = args.expert_formats(f"{prefix}.experts")
        self.fold, self.fold_reason = shared_fold.chunks(args, groups, opts, prefix)
        self.experts = LocalExperts(per, groups.coords.moe_ep_rank * per, h,
                                    args.moe_intermediate_size // groups.moe_tp.size, dtype,
                                    device, formats, extra=self.fold)  # fmt: skip
        self.shared: nn.Module | None = None
        if self.fold:
            self.shared = shared_fold.FoldedShared(self.experts, self.fold, h, dtype)
        elif shared:
            self.shared = MLP(h, shared // groups.tp.size, dtype, device,
                              args.mlp_formats(f"{prefix}.shared_experts"))  # fmt: skip
        self.local_only = groups.world.size == 1 and opts.routing_cutoff is None
        # Which world ranks share this rank's dp group (rank-major rows of a world all-gather).
        self.peers = torch.tensor([r in groups.tp.ranks for r in groups.world.ranks],
                                  dtype=torch.bool, device=device)  # fmt: skip

    def targets(self, prefix: str) -> dict[str, torch.Tensor]:
        out = {f"{prefix}.gate.weight": self.gate}
        if self.bias is not None:
            out[f"{prefix}.gate.e_score_correction_bias"] = self.bias
        if self.shared is not None:
            out.update(self.shared.targets(f"{prefix}.shared_experts"))
        out.update(self.experts.targets(f"{prefix}.experts"))
        return out

    def _route(self, x: torch.Tensor, shared: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """(weights [T, k] fp32, global expert ids [T, k] int32): two ops, fp32 only inside.
        `shared`: the folded shared chunks follow as columns k.. (ids after this rank's experts,
        weight 1), so the fused ops run them too."""
        a, ex = self.args, self.experts
        n = self.fold if shared else 0
        return moe_route(router_logits(x, self.gate), self.bias, a.top_k, a.n_group,
                         a.topk_group, a.topk_method, a.scoring_func, a.norm_topk_prob,
                         a.routed_scaling_factor, n, ex.first + ex.num)  # fmt: skip

    def _sync_free(self, x: torch.Tensor, fixed_shape: bool) -> bool:
        """Take the static path: for fixed-shape steps (graphs, compile), and wherever the grouped
        matmul keeps it cheap; on cpu the ordinary path's host syncs cost nothing."""
        return self.local_only and (fixed_shape or native_grouped_mm(x))

    def forward(
        self, x: torch.Tensor, fixed_shape: bool = False, valid: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Routed plus shared experts of x [T, H]; `valid` [T] (fixed-shape steps) marks the rows
        that are not padding, which the exchanges of a wider world then skip."""
        k = self.args.top_k
        small = x.shape[0] * k <= FUSED_MAX_ROWS
        if self.local_only and (small or self._sync_free(x, fixed_shape)):
            folded = small and self.fold > 0
            weights, ids = self._route(x, folded)
            if not torch.compiler.is_compiling():  # a traced Python counter would recompile
                self.stats.routed_rows += x.shape[0] * k
            if small:  # decode: two ops reading only the routed (and shared) experts' weights
                routed = self.experts.fused(x, ids, weights)
            else:
                routed = self.experts.combine(x, ids.long(), weights)
            if folded or self.shared is None:
                return routed
            return routed + self.shared(x)
        tp = self.g.tp
        t = x.shape[0]
        chunk = -(-t // tp.size)
        lo, hi = min(t, tp.rank * chunk), min(t, (tp.rank + 1) * chunk)
        if fixed_shape and self.opts.routing_cutoff is None:  # the same chunk size on every rank
            pad = chunk - (hi - lo)
            real = torch.ones(t, dtype=torch.bool, device=x.device) if valid is None else valid
            fixed = alltoall_fixed if self.opts.ep_level == 2 else allgather_fixed
            routed, folded = fixed(self, F.pad(x[lo:hi], (0, 0, 0, pad)),
                                   F.pad(real[lo:hi], (0, pad)))  # fmt: skip
            routed = routed[: hi - lo]
        else:
            exchange = self._alltoall if self.opts.ep_level == 2 else self._allgather
            routed, folded = exchange(x[lo:hi])
        # Folded: the reduce-scatter already summed the shared slices into this chunk's rows.
        out = torch.zeros_like(x) if folded or self.shared is None else self.shared(x)
        out[lo:hi] += routed
        return tp.all_reduce(out)

    # -- EP level 1 ---------------------------------------------------------------------------

    def _allgather(self, xs: torch.Tensor) -> tuple[torch.Tensor, bool]:
        world, k = self.g.world, self.args.top_k
        n = xs.shape[0]
        counts = world.all_gather(torch.tensor([n], device=xs.device))
        m = max(1, int(counts.max()))
        padded = F.pad(xs, (0, 0, 0, m - n))
        everyone = world.all_gather(padded)  # [W*m, H]
        valid = (torch.arange(m, device=xs.device)[None, :] < counts[:, None]).reshape(-1)
        fused = self.opts.routing_cutoff is None and everyone.shape[0] * k <= FUSED_MAX_ROWS
        folded = fused and self.fold > 0
        weights, ids = self._route(everyone, folded)
        if fused:
            # Decode: every gathered token through the fused ops, other ranks' experts as -1.
            local = shared_fold.local_ids(self, ids, valid, folded)
            self.stats.routed_rows += int((local[:, :k] >= 0).sum())
            total = self.experts.fused(everyone, local, weights)
            return world.reduce_scatter(total)[:n], folded
        local = ids - self.experts.first
        hit = (local >= 0) & (local < self.experts.num) & valid[:, None]
        local = local.long()
        tok, slot = hit.nonzero(as_tuple=True)
        eid = local[tok, slot]
        if self.opts.routing_cutoff is not None:
            cap = math.ceil(self.opts.routing_cutoff * int(counts.sum()) * k)
            if tok.shape[0] > cap:  # keep the first rows in expert order, like init_routing
                keep = eid.argsort(stable=True)[:cap]
                self.stats.dropped_rows += tok.shape[0] - cap
                tok, slot, eid = tok[keep], slot[keep], eid[keep]
        self.stats.routed_rows += int(tok.shape[0])
        y = self.experts(everyone[tok], eid, self.opts.grouped_matmul)
        y = (y * weights[tok, slot, None]).to(y.dtype)  # weight in fp32, like the reference
        total = torch.zeros_like(everyone).index_add_(0, tok, y)
        return world.reduce_scatter(total)[:n], False

    # -- EP level 2 ---------------------------------------------------------------------------

    def _alltoall(self, xs: torch.Tensor) -> tuple[torch.Tensor, bool]:
        world, k = self.g.world, self.args.top_k
        moe_tp, moe_ep, per = self.g.moe_tp.size, self.g.moe_ep.size, self.experts.num
        size, n, dev = world.size, xs.shape[0], xs.device
        weights, ids = self._route(xs)
        ids = ids.long()
        # One copy of each (token, k) row per moe_tp slice of its expert's owner.
        owner = ids // per  # moe_ep rank
        dest = (owner[:, :, None] * moe_tp + torch.arange(moe_tp, device=dev)).reshape(-1)
        tok = torch.arange(n, device=dev)[:, None, None].expand(n, k, moe_tp).reshape(-1)
        slot = torch.arange(k, device=dev)[None, :, None].expand(n, k, moe_tp).reshape(-1)
        eid = (ids - owner * per)[:, :, None].expand(n, k, moe_tp).reshape(-1)
        send_counts = torch.bincount(dest, minlength=size)
        table = world.all_gather(torch.cat([send_counts, torch.tensor([n], device=dev)])[None])
        tokens = max(1, int(table[:, size].max()))
        factor = self.opts.buffer_factor(tokens)
        cap = a2a_capacity(factor, tokens, k, moe_ep, per)
        worst = int(table[:, :size].max())
        if worst > cap:
            src, dst = divmod(int(table[:, :size].argmax()), size)
            raise ExpertBufferOverflow(
                f"EP level 2: rank {src} routes {worst} rows to rank {dst} but the AllToAll buffer "
                f"holds {cap} (factor {factor} of alltoall_ep_buffer_scale_factors for "
                f"{tokens} tokens per rank, top_k {k}, moe_ep {moe_ep}); raise that factor"
            )
        order = dest.argsort(stable=True)
        dest, tok, slot, eid = dest[order], tok[order], slot[order], eid[order]
        starts = torch.cumsum(send_counts, 0) - send_counts
        pos = torch.arange(dest.shape[0], device=dev) - starts[dest]
        send = xs.new_zeros(size, cap, xs.shape[1])
        send[dest, pos] = xs[tok]
        send_eid = torch.full((size, cap), -1, dtype=torch.long, device=dev)
        send_eid[dest, pos] = eid
        recv = world.all_to_all(send.view(size * cap, -1))
        recv_eid = world.all_to_all(send_eid.view(-1))
        rows = (recv_eid >= 0).nonzero().squeeze(1)
        self.stats.routed_rows += int(rows.shape[0])
        done = torch.zeros_like(recv)
        done[rows] = self.experts(recv[rows], recv_eid[rows], self.opts.grouped_matmul)
        back = world.all_to_all(done).view(size, cap, -1)[dest, pos]
        back = (back * weights[tok, slot, None]).to(back.dtype)
        return torch.zeros_like(xs).index_add_(0, tok, back), False
