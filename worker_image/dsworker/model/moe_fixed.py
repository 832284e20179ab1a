"""The MoE exchanges of a fixed-shape step on a world of several ranks: no host sync, static shapes.

A graph replays the same collectives with the same sizes on every rank, so each rank sends the same
padded chunk of its tp group's tokens whatever it holds (a rank with no sequences sends padding
rows, whose results are dropped). EP level 1 gathers the chunks and reduce-scatters the sums, as the
eager path does, without first gathering the row counts (at decode sizes with the folded shared
experts inside, model/shared_fold.py). EP level 2 sends into buffers of the fixed
capacity that alltoall_ep_buffer_scale_factors gives for the chunk (`a2a_capacity`); a row that
does not fit is not sent, and is counted on the device (`MoEStats.a2a_excess`) so the step that
lost it is refused after it ran, on every rank alike, as the eager path refuses before sending.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from dsworker.model.moe import MoE


def run_experts(
    moe: MoE, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor, fused: bool
) -> torch.Tensor:
    """sum_k weights * local expert ids (x) for local ids [T, k], -1 where the expert is elsewhere:
    the fused ops at decode sizes, else the static combine (-1 slots weigh nothing there)."""
    if fused:
        return moe.experts.fused(x, ids, weights)
    hit = ids >= 0
    return moe.experts.combine(x, ids.clamp(min=0).long(), weights.masked_fill(~hit, 0.0))


def allgather_fixed(moe: MoE, xs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """EP level 1 over the padded chunk xs [m, H] (m the same on every rank; `valid` [m] its real
    rows) -> (its routed sums, whether the folded shared experts are in them too); padding rows
    run no expert."""
    from dsworker.model.moe import FUSED_MAX_ROWS
    from dsworker.model.shared_fold import local_ids

    world = moe.g.world
    everyone = world.all_gather(xs)  # [W*m, H]
    real = world.all_gather(valid)
    fused = everyone.shape[0] * moe.args.top_k <= FUSED_MAX_ROWS
    folded = fused and moe.fold > 0
    weights, ids = moe._route(everyone, folded)
    total = run_experts(moe, everyone, local_ids(moe, ids, real, folded), weights, fused)
    return world.reduce_scatter(total), folded


def fixed_capacity(moe: MoE, tokens: int) -> int:
    """Rows one rank may send to one rank when every rank dispatches `tokens` tokens."""
    from dsworker.model.moe import a2a_capacity

    factor = moe.opts.buffer_factor(tokens)
    return a2a_capacity(factor, tokens, moe.args.top_k, moe.g.moe_ep.size, moe.experts.num)


def alltoall_fixed(moe: MoE, xs: torch.Tensor, valid: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """EP level 2 over the padded chunk xs [m, H]: fixed-capacity AllToAll out and back; padding
    rows (`valid` False) take no buffer room, so they never cause a refusal."""
    from dsworker.model.moe import FUSED_MAX_ROWS

    world, k = moe.g.world, moe.args.top_k
    moe_tp, per = moe.g.moe_tp.size, moe.experts.num
    size, (m, h), dev = world.size, xs.shape, xs.device
    cap = fixed_capacity(moe, m)
    weights, ids = moe._route(xs)
    ids = ids.long()
    # One copy of each (token, k) row per moe_tp slice of its expert's owner, in (token, k, slice)
    # order; its place in the buffer to `dest` counts the rows before it that go there too.
    owner = ids // per
    dest = (owner[:, :, None] * moe_tp + torch.arange(moe_tp, device=dev)).reshape(-1)
    eid = (ids - owner * per)[:, :, None].expand(m, k, moe_tp).reshape(-1)
    real = valid.repeat_interleave(k * moe_tp)
    onehot = ((dest[:, None] == torch.arange(size, device=dev)) & real[:, None]).long()
    pos = (onehot.cumsum(0) - onehot).gather(1, dest[:, None]).squeeze(1)
    fits = (pos < cap) & real
    if moe.stats.a2a_excess is not None:
        moe.stats.a2a_excess.add_((real & ~fits).sum())
    dump = size * cap  # rows that do not fit (and padding) go to one extra row, never sent
    where = torch.where(fits, dest * cap + pos, dump)
    tok = torch.arange(m, device=dev).repeat_interleave(k * moe_tp)
    send = xs.new_zeros(dump + 1, h)
    send[where] = xs[tok]
    send_eid = torch.full((dump + 1,), -1, dtype=torch.long, device=dev)
    send_eid[where] = eid
    recv = world.all_to_all(send[:dump])
    recv_eid = world.all_to_all(send_eid[:dump])
    ones = torch.ones((dump, 1), dtype=torch.float32, device=dev)
    done = run_experts(moe, recv, recv_eid[:, None], ones, dump <= FUSED_MAX_ROWS)
    back = torch.cat([world.all_to_all(done), done.new_zeros(1, h)])[where]  # [m*k*moe_tp, H]
    back = back.view(m, k * moe_tp, h).float() * weights.repeat_interleave(moe_tp, 1)[..., None]
    return back.sum(1).to(xs.dtype), False
