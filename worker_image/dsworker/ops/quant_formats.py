"""The three quantised weight formats as they sit in device memory, and their tile-wise dequantisation.

Weights stay in checkpoint precision on the device (a BF16 copy of DeepSeek-R1 does not fit a 64 GB
Ascend or an 80 GB H100), so every op reads these layouts directly:

- FP8 (V3/R1 native): `data` float8_e4m3fn [N, K], `scale` fp32 `weight_scale_inv` [ceil(N/bn), ceil(K/bk)];
  w = e4m3(q) * scale[n // bn, k // bk] with `block` = (bn, bk), normally (128, 128).
- W8A8 (MindIE msModelSlim): `data` int8 [N, K], `scale` [N, 1], optional `offset` [N, 1];
  w = (q - offset) * scale; the activation is quantised per token inside the op.
- W8A8 static (msModelSlim "W8A8"): `data` int8 [N, K], `scale` the fp32 `deq_scale` [N], `static`
  the per-tensor `input_scale` and `input_offset` ([1] each, fp32) and the int32 `quant_bias` [N]:
  y = (q(x) @ data.T + quant_bias) * deq_scale, q(x) = int8(rint(x * (1 / input_scale) + input_offset))
  (quantize_static; conventions recorded in tests/data/formats/w8a8_static.json).
- W8A16 (compressed-tensors pack-quantized, 8 bits): the checkpoint's int32 words (q + 128, four per
  word, little-endian) are unpacked once at load to int8 [N, K], still 8 bits a weight, so the kernels
  need no byte shuffling; `scale` [N, 1] per channel or [N, G] per group of `group_size` columns.

Expert stacks add a leading expert axis to `data`, `scale` and `offset`. For w13 (gate rows then up
rows) an FP8 scale is [E, 2 * ceil(I/bn), ceil(H/bk)]: the gate blocks, then the up blocks, so I need
not be a multiple of 128. A rank's slice must start on a scale block edge (or lie inside one block).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

FP8 = "fp8"
W8A8 = "w8a8"
W8A16 = "w8a16"
W8A8_STATIC = "w8a8_static"  # dense linears only (attention): no expert-stack ops take it
KINDS = (FP8, W8A8, W8A16)  # the kinds of every op, expert stacks included
ALL_KINDS = (*KINDS, W8A8_STATIC)
TILE_ROWS = (
    2048  # weight rows dequantised at a time by the references: bounds their fp32 temporaries
)
INT8_MAX = 127.0
INT8_MIN = -128.0
_E4M3: dict[torch.device, torch.Tensor] = {}


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


@dataclass(frozen=True)
class QuantWeight:
    """One quantised weight as the model holds it; `nbytes` is what it costs in device memory."""

    kind: str
    data: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None = None
    group_size: int = 0  # W8A16 group scales: columns per group; 0 = per output channel
    block: tuple[int, int] = (128, 128)  # FP8 scale block (rows, cols)
    static: StaticInput | None = None  # W8A8 static: the activation quantisation and quant_bias

    def __post_init__(self) -> None:
        check_weight(self.kind, self.data, self.scale, self.offset, self.group_size, self.block)
        _expect(
            (self.kind == W8A8_STATIC) == (self.static is not None),
            "static input quantisation goes with kind w8a8_static only",
        )

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    @property
    def nbytes(self) -> int:
        """Bytes on the device: equals the checkpoint's bytes for the weight and its companions."""
        extra = self.offset.nbytes if self.offset is not None else 0
        if self.static is not None:
            extra += sum(t.nbytes for t in self.static.tensors())
        return self.data.nbytes + self.scale.nbytes + extra


@dataclass(frozen=True)
class StaticInput:
    """Static W8A8's per-tensor activation quantisation ([1] fp32 each) and int32 quant_bias [N]."""

    scale: torch.Tensor
    offset: torch.Tensor
    bias: torch.Tensor

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.scale, self.offset, self.bias


def _expect(ok: bool, what: str) -> None:
    if not ok:
        raise ValueError(what)


def check_weight(
    kind: str,
    data: torch.Tensor,
    scale: torch.Tensor,
    offset: torch.Tensor | None,
    group_size: int,
    block: tuple[int, int],
) -> None:
    """Reject a weight whose dtype or scale shape does not match its format, naming the field."""
    _expect(kind in ALL_KINDS, f"quantisation kind {kind!r} is not one of {ALL_KINDS}")
    _expect(data.dim() >= 2, f"{kind} weight must be [..., N, K], got shape {tuple(data.shape)}")
    n, k = data.shape[-2:]
    lead = tuple(data.shape[:-2])
    if kind == FP8:
        _expect(
            data.dtype == torch.float8_e4m3fn, f"fp8 weight must be float8_e4m3fn, not {data.dtype}"
        )
        want = (*lead, cdiv(n, block[0]), cdiv(k, block[1]))
        # a stacked w13 keeps gate and up blocks apart: 2 * ceil(I / bn) rows of scales
        alt = (*lead, 2 * cdiv(n // 2, block[0]), cdiv(k, block[1]))
        _expect(
            tuple(scale.shape) in (want, alt),
            f"fp8 weight_scale_inv must be {want} for weight {tuple(data.shape)} and block {block}, "
            f"got {tuple(scale.shape)}",
        )
        return
    _expect(data.dtype == torch.int8, f"{kind} weight must be int8 [N, K], not {data.dtype}")
    if kind == W8A8_STATIC:
        _expect(
            scale.dtype == torch.float32 and tuple(scale.shape) == (*lead, n),
            f"w8a8_static deq_scale must be float32 [{n}] (bfloat16 models), got {scale.dtype} "
            f"{tuple(scale.shape)}",
        )
        return
    groups = scale.shape[-1] if scale.dim() == data.dim() else 1
    _expect(
        tuple(scale.shape[:-1]) == (*lead, n) or tuple(scale.shape) == (*lead, n),
        f"{kind} weight_scale must be [..., {n}, 1] or [..., {n}, groups], got {tuple(scale.shape)}",
    )
    if kind == W8A16 and groups > 1:
        _expect(
            group_size > 0 and cdiv(k, group_size) == groups,
            f"w8a16 group_size {group_size} does not give {groups} groups over {k} columns",
        )
    if offset is not None:
        _expect(kind == W8A8, "weight_offset exists only for w8a8 (asymmetric msModelSlim weights)")
        _expect(
            offset.numel() == scale.numel(),
            "w8a8 weight_offset must have the shape of weight_scale",
        )


def unpack_w8a16(packed: torch.Tensor, cols: int) -> torch.Tensor:
    """compressed-tensors int32 words (q + 128, byte b = column 4j+b) -> int8 [N, cols], row tile by tile."""
    _expect(packed.dtype == torch.int32, f"w8a16 weight_packed must be int32, not {packed.dtype}")
    _expect(
        4 * packed.shape[-1] >= cols, f"{packed.shape[-1]} int32 words cannot hold {cols} columns"
    )
    out = torch.empty((*packed.shape[:-1], cols), dtype=torch.int8, device=packed.device)
    flat, dst = packed.reshape(-1, packed.shape[-1]), out.view(-1, cols)
    for a in range(0, flat.shape[0], TILE_ROWS):
        u = flat[a : a + TILE_ROWS].contiguous().view(torch.uint8)[:, :cols]
        dst[a : a + TILE_ROWS] = (u.to(torch.int16) - 128).to(torch.int8)
    return out


def unpack_deq_scale(packed: torch.Tensor) -> torch.Tensor:
    """msModelSlim's int64 deq_scale (float16 exports, and its deqscale2int64 post-process) ->
    the float32 it carries: each value is a float32's bits as int32, sign-extended to int64.
    ValueError where the values are not such scales."""
    _expect(packed.dtype == torch.int64, f"a packed deq_scale is int64, not {packed.dtype}")
    words = packed.contiguous().reshape(-1).view(torch.int32).view(-1, 2)  # little-endian [lo, hi]
    _expect(
        bool((words[:, 1] == 0).all()),
        "a value has its high 32 bits set: not a float32 packed by msModelSlim (deqscale2int64)",
    )
    out = words[:, 0].contiguous().view(torch.float32).reshape(packed.shape)
    normal = (out >= torch.finfo(torch.float32).tiny) & torch.isfinite(out)
    _expect(
        bool((normal | (out == 0)).all() and normal.any()),
        "it unpacks to float32 scales that are not finite, positive and normal (or zero), or "
        "all zero: a deq_scale cast to int64 by value rather than by its bits?",
    )
    return out


def from_checkpoint(
    kind: str, tensors: dict[str, torch.Tensor], cols: int | None = None, group_size: int = 0
) -> QuantWeight:
    """A QuantWeight from a module's checkpoint tensors (`weight`/`weight_packed` and companions).

    `cols` is the unpacked width of a W8A16 weight (its `weight_shape[1]`); it defaults to 4 per word.
    `group_size` comes from the quantisation config; without it, ceil(cols / groups) is assumed,
    which is only right when the groups divide the width (all DeepSeek widths are multiples of 128).
    """
    if kind == FP8:
        return QuantWeight(FP8, tensors["weight"], tensors["weight_scale_inv"])
    if kind == W8A8:
        return QuantWeight(
            W8A8, tensors["weight"], tensors["weight_scale"], tensors.get("weight_offset")
        )
    packed = tensors.get("weight_packed", tensors.get("weight"))
    _expect(packed is not None, "w8a16 needs `weight_packed` (or an int32 `weight`)")
    assert packed is not None
    if cols is None and "weight_shape" in tensors:
        cols = int(tensors["weight_shape"][-1])
    data = unpack_w8a16(packed, cols if cols is not None else 4 * packed.shape[-1])
    scale = tensors["weight_scale"]
    groups = scale.shape[-1]
    if groups > 1 and group_size <= 0:
        group_size = cdiv(data.shape[-1], groups)
    return QuantWeight(W8A16, data, scale, group_size=group_size if groups > 1 else 0)


def e4m3_table(device: torch.device) -> torch.Tensor:
    """fp32 value of each e4m3fn code: a gather dequantises on devices without float8 kernels."""
    if device not in _E4M3:
        codes = torch.arange(256, dtype=torch.int32).to(torch.uint8)
        _E4M3[device] = codes.view(torch.float8_e4m3fn).to(torch.float32).to(device)
    return _E4M3[device]


def dequant_rows(
    kind: str,
    data: torch.Tensor,
    scale: torch.Tensor,
    r0: int,
    r1: int,
    group_size: int = 0,
    block: tuple[int, int] = (128, 128),
    offset: torch.Tensor | None = None,
    scale_row0: int = 0,
) -> torch.Tensor:
    """fp32 rows r0..r1 of a 2-D quantised weight: the only full-precision temporary the references make.

    `scale_row0` shifts the scale rows (the up half of a stacked w13 has its own FP8 blocks).
    """
    k = data.shape[1]
    dev = data.device
    if kind == FP8:
        q = e4m3_table(dev)[data[r0:r1].view(torch.uint8).long()]
        ri = scale_row0 + torch.arange(r0, r1, device=dev) // block[0]
        ci = torch.arange(k, device=dev) // block[1]
        return q * scale.float()[ri][:, ci]
    q = data[r0:r1].float()
    s = scale.reshape(data.shape[0], -1)[r0:r1].float()
    if offset is not None:
        q = q - offset.reshape(data.shape[0], -1)[r0:r1].float()
    if s.shape[1] > 1:
        s = s[:, torch.arange(k, device=dev) // group_size]
    return q * s


def round_half_even(v: torch.Tensor) -> torch.Tensor:
    """Ties to even (torch.round): Ascend's AscendQuant rounding, mirrored by the Triton kernel."""
    return torch.round(v)


def quantize_static(
    x: torch.Tensor, input_scale: torch.Tensor, input_offset: torch.Tensor
) -> torch.Tensor:
    """Static per-tensor int8 [..., K]: rint(x * (1 / input_scale) + input_offset), saturated to
    [-128, 127]. The reciprocal is taken in x's dtype, as vllm-ascend feeds npu_quantize."""
    inv = input_scale.to(x.dtype).reciprocal().float()
    v = x.float() * inv + input_offset.float()
    return round_half_even(v).clamp(INT8_MIN, INT8_MAX).to(torch.int8)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric dynamic int8 per row: (q int8 [M, K], scale fp32 [M]) with x ~= q * scale.

    Rounds half away from zero; an all-zero row gets scale 1. The Triton kernel computes the same.
    """
    xf = x.float()
    amax = xf.abs().amax(dim=-1)
    s = amax / INT8_MAX
    s = torch.where(s > 0, s, torch.ones_like(s))
    v = xf / s[..., None]
    q = torch.sign(v) * torch.floor(v.abs() + 0.5)
    return q.clamp(-INT8_MAX, INT8_MAX).to(torch.int8), s
