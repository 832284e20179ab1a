"""Device storage of 8-bit weights: allocated in checkpoint precision, filled by the loader in place.

A quantised Linear, MLP or expert stack holds `QuantWeight`s whose tensors are also registered as
frozen Parameters under the checkpoint's names (`weight`, `weight_scale_inv`, `weight_scale`,
`weight_offset`), so `targets()` hands the loader the slots a checkpoint's companions fill and
`parameters()` counts the bytes the rank holds. A stacked w13 keeps gate rows then up rows; its
FP8 scales keep the gate blocks apart from the up blocks (see ops/quant_formats.py).
"""

from __future__ import annotations

import torch
from torch import nn

from dsworker.contract.quant import FP8, W8A8, W8A8_STATIC, QuantFormat
from dsworker.ops.quant_formats import QuantWeight, StaticInput, cdiv

SCALE_NAME = {FP8: "weight_scale_inv", W8A8_STATIC: "deq_scale"}
# static W8A8's per-tensor input scale and offset are held in fp32 whatever their stored dtype
STATIC_NAMES = ("input_scale", "input_offset", "quant_bias")
OFFSET_NAME = "weight_offset"


def scale_name(kind: str) -> str:
    return SCALE_NAME.get(kind, "weight_scale")


def alloc(
    fmt: QuantFormat, lead: tuple[int, ...], n: int, k: int, device: torch.device, halves: int = 1
) -> QuantWeight:
    """An empty [*lead, n, k] weight with its scales (halves=2: a gate/up stack of n/2 rows each)."""
    if fmt.kind == FP8:
        bn, bk = fmt.block
        data = torch.empty((*lead, n, k), dtype=torch.float8_e4m3fn, device=device)
        scale = torch.empty(
            (*lead, halves * cdiv(n // halves, bn), cdiv(k, bk)), dtype=torch.float32, device=device
        )
        return QuantWeight(FP8, data, scale, block=fmt.block)
    data = torch.empty((*lead, n, k), dtype=torch.int8, device=device)
    if fmt.kind == W8A8_STATIC:
        assert not lead and halves == 1, "static W8A8 is served for single linear weights only"
        one = torch.empty((1,), dtype=torch.float32, device=device)
        st = StaticInput(
            one, torch.empty_like(one), torch.empty((n,), dtype=torch.int32, device=device)
        )
        deq = torch.empty((n,), dtype=torch.float32, device=device)
        return QuantWeight(W8A8_STATIC, data, deq, static=st)
    if fmt.kind == W8A8:
        scale = torch.empty((*lead, n, 1), dtype=torch.float32, device=device)
        offset = torch.zeros((*lead, n, 1), dtype=torch.float32, device=device)
        return QuantWeight(W8A8, data, scale, offset)
    groups = cdiv(k, fmt.group_size) if fmt.group_size else 1
    scale = torch.empty((*lead, n, groups), dtype=torch.bfloat16, device=device)
    return QuantWeight(fmt.kind, data, scale, group_size=fmt.group_size)


def register(module: nn.Module, prefix: str, qw: QuantWeight) -> None:
    """Expose qw's tensors as frozen Parameters: `{prefix}`, `{prefix}_scale`, `{prefix}_offset`,
    or for prefix `weight` the checkpoint's own names (a Linear's named_parameters are its targets)."""
    scale, offset = (
        (scale_name(qw.kind), OFFSET_NAME)
        if prefix == "weight"
        else (f"{prefix}_scale", f"{prefix}_offset")
    )
    module.register_parameter(prefix, nn.Parameter(qw.data, requires_grad=False))
    module.register_parameter(scale, nn.Parameter(qw.scale, requires_grad=False))
    if qw.offset is not None:
        module.register_parameter(offset, nn.Parameter(qw.offset, requires_grad=False))
    if qw.static is not None:
        assert prefix == "weight", "static W8A8 is served for single linear weights only"
        for name, t in zip(STATIC_NAMES, qw.static.tensors(), strict=True):
            module.register_parameter(name, nn.Parameter(t, requires_grad=False))


def slots(
    name: str, qw: QuantWeight, index: tuple[int, ...] = (), half: int | None = None
) -> dict[str, torch.Tensor]:
    """Checkpoint name `<module>.weight` and its companions -> views of qw to fill.

    `index` picks one expert of a stack; `half` 0/1 picks the gate/up rows of a w13 stack.
    """
    module = name[: -len(".weight")]
    data, scale, offset = qw.data[index], qw.scale[index], qw.offset
    offset = offset[index] if offset is not None else None
    if half is not None:
        rows = data.shape[0] // 2
        data = data[half * rows : (half + 1) * rows]
        srows = scale.shape[0] // 2 if qw.kind == FP8 else rows
        scale = scale[half * srows : (half + 1) * srows]
        offset = offset[half * rows : (half + 1) * rows] if offset is not None else None
    out = {name: data, f"{module}.{scale_name(qw.kind)}": scale}
    if offset is not None:
        out[f"{module}.{OFFSET_NAME}"] = offset
    if qw.static is not None:
        out.update(zip((f"{module}.{s}" for s in STATIC_NAMES), qw.static.tensors(), strict=True))
    return out


def held_bytes(model: nn.Module) -> int:
    """Device bytes of every weight the model holds (8-bit ones as stored)."""
    return sum(p.nbytes for p in model.parameters())


def part(qw: QuantWeight, index: int | slice) -> QuantWeight:
    """Views of one expert (int) or a run of experts (slice) of a stack: the same bytes."""
    offset = qw.offset[index] if qw.offset is not None else None
    return QuantWeight(qw.kind, qw.data[index], qw.scale[index], offset, qw.group_size, qw.block)


def chunk_slots(name: str, qw: QuantWeight, half: int | None = None) -> dict[str, torch.Tensor]:
    """Checkpoint `<module>.weight` [N, K] and companions -> views of a stack [S, ...] of S chunks
    that split it: half 0/1 takes the gate/up rows of each w13 chunk ([S, N/S, K], the rows split),
    half None a w2 chunk stack transposed to [N, S, K/S] (the columns split). The loader fills a
    view whose shape is the slice's with one dimension split in two (engine/loader.py)."""
    module = name[: -len(".weight")]
    parts = [qw.data, qw.scale] + ([qw.offset] if qw.offset is not None else [])
    if half is None:
        views = [t.transpose(0, 1) for t in parts]
    else:
        views = []
        for t in parts:
            rows = t.shape[1] // 2  # FP8 keeps gate blocks apart from up blocks, so halves hold
            views.append(t[:, half * rows : (half + 1) * rows])
    out = {name: views[0], f"{module}.{scale_name(qw.kind)}": views[1]}
    if qw.offset is not None:
        out[f"{module}.{OFFSET_NAME}"] = views[2]
    return out
