"""Number-format conversions in numpy: BF16 bits, FP8 e4m3fn, block and channel quantisation.

numpy has neither bfloat16 nor float8, and the sharder may not import torch, so these formats are
handled as raw bits: BF16 is the top half of a float32 (uint16), FP8 e4m3fn is decoded through a
256-entry table and encoded by nearest-value search with ties to even. All functions work on chunks
of rows so callers keep memory bounded.
"""

from __future__ import annotations

import numpy as np

FP8_MAX = 448.0


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """uint16 BF16 bits -> float32 (exact)."""
    return (np.asarray(bits, dtype=np.uint16).astype(np.uint32) << 16).view(np.float32)


def float_to_f32(raw: np.ndarray, dtype: str) -> np.ndarray:
    """A float tensor read as stored (BF16 as uint16 bits) -> float32 values; same shape.

    Scales and LoRA factors come as F32, BF16 or F16; casting BF16's uint16 bits with astype
    would take the bit pattern for the value.
    """
    if dtype == "BF16":
        return bf16_to_f32(np.asarray(raw).view(np.uint16))
    if dtype == "F16":
        return np.asarray(raw).view(np.float16).astype(np.float32)
    if dtype == "F32":
        return np.asarray(raw).view(np.float32)
    raise ValueError(f"{dtype} is not a float dtype (F32, BF16, F16)")


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> uint16 BF16 bits, round to nearest even (what torch's .to(bfloat16) does)."""
    u = np.ascontiguousarray(x, dtype=np.float32).view(np.uint32)
    rounded = ((u + (((u >> 16) & 1) + 0x7FFF)) >> 16).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def _e4m3fn_table() -> np.ndarray:
    codes = np.arange(256, dtype=np.int32)
    sign = np.where(codes >> 7, -1.0, 1.0)
    exp = (codes >> 3) & 0xF
    mant = codes & 7
    val = np.where(exp == 0, mant / 8.0 * 2.0**-6, (1.0 + mant / 8.0) * 2.0 ** (exp - 7.0))
    val = sign * val
    val[(codes & 0x7F) == 0x7F] = np.nan
    return val.astype(np.float32)


FP8_E4M3_TABLE = _e4m3fn_table()
_POS = FP8_E4M3_TABLE[:127].astype(np.float64)  # codes 0..126: 0 .. 448, increasing


def fp8_e4m3_to_f32(codes: np.ndarray) -> np.ndarray:
    return FP8_E4M3_TABLE[np.asarray(codes, dtype=np.uint8)]


def f32_to_fp8_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> e4m3fn codes (uint8), round to nearest, ties to even, saturating at +-448."""
    x = np.asarray(x, dtype=np.float32)
    ax = np.minimum(np.abs(x).astype(np.float64), FP8_MAX)
    hi = np.clip(np.searchsorted(_POS, ax, side="left"), 1, 126)
    lo = hi - 1
    dlo = ax - _POS[lo]
    dhi = _POS[hi] - ax
    pick_hi = (dhi < dlo) | ((dhi == dlo) & (hi % 2 == 0))
    code = np.where(pick_hi, hi, lo).astype(np.uint8)
    code[ax == 0] = 0
    code |= np.where(np.signbit(x), 0x80, 0).astype(np.uint8)
    code[np.isnan(x)] = 0x7F
    return code


def expand_block_scale(
    scale: np.ndarray, r0: int, r1: int, c0: int, c1: int, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """The per-element scale of rows [r0,r1) x cols [c0,c1) of a block-quantised weight."""
    rows = np.arange(r0, r1) // block[0]
    cols = np.arange(c0, c1) // block[1]
    return scale[np.ix_(rows, cols)]


def dequant_fp8_block(
    codes: np.ndarray, scale_inv: np.ndarray, r0: int, c0: int, block: tuple[int, int] = (128, 128)
) -> np.ndarray:
    """BF16 bits of fp8 `codes` (a [rows, cols] chunk at global row r0, col c0) times its block scale."""
    r1, c1 = r0 + codes.shape[0], c0 + codes.shape[1]
    s = expand_block_scale(scale_inv.astype(np.float32), r0, r1, c0, c1, block)
    return f32_to_bf16(fp8_e4m3_to_f32(codes) * s)


def quant_fp8_block(
    w: np.ndarray, block: tuple[int, int] = (128, 128)
) -> tuple[np.ndarray, np.ndarray]:
    """Block-quantise a float32 weight like DeepSeek-V3: (e4m3 codes, scale_inv fp32 per block)."""
    out, inp = w.shape
    nb_r, nb_c = -(-out // block[0]), -(-inp // block[1])
    pad = np.zeros((nb_r * block[0], nb_c * block[1]), np.float32)
    pad[:out, :inp] = np.abs(w)
    amax = pad.reshape(nb_r, block[0], nb_c, block[1]).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / FP8_MAX, 1.0).astype(np.float32)
    codes = f32_to_fp8_e4m3(w / expand_block_scale(scale, 0, out, 0, inp, block))
    return codes, scale


def quant_int8_channel(w: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-output-channel int8: (int8 weight, float32 scale [out,1])."""
    amax = np.abs(w).max(axis=1, keepdims=True)
    scale = np.where(amax > 0, amax / 127.0, 1.0).astype(np.float32)
    q = np.clip(np.rint(w / scale), -127, 127).astype(np.int8)
    return q, scale


def pack_int8_to_int32(q: np.ndarray) -> np.ndarray:
    """compressed-tensors pack-quantized, 8 bits: (q + 128) as unsigned bytes, 4 per int32 word."""
    u = (q.astype(np.int16) + 128).astype(np.uint8)
    return np.ascontiguousarray(u).view("<i4")


def unpack_int32_to_int8(packed: np.ndarray) -> np.ndarray:
    u = np.ascontiguousarray(packed, dtype="<i4").view(np.uint8)
    return (u.astype(np.int16) - 128).astype(np.int8)
