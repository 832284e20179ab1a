"""Output tensors that are computed, not copied: FP8 dequantisation and a folded-in LoRA delta.

Both work chunk by chunk of rows (memory bounded by the chunk) in float32 and round once to the
output dtype. Imported only when a file holds such a tensor (numpy is not loaded otherwise).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from dsworker.checkpoint import number_formats
from dsworker.checkpoint.planned_files import OutEntry
from dsworker.checkpoint.regions import ReaderCache, Region, iter_rows, read_array
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter
from dsworker.contract.errors import CheckpointError


def write_dequant(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """BF16 = fp8 * scale_inv[row // 128, col // 128], chunk by chunk of rows."""
    assert e.region is not None and e.scale is not None
    scale = _read_f32(e.scale, readers)
    reg = e.region
    for a, block in iter_rows(reg, readers):
        if reg.dim == 0:
            r0, c0 = reg.start + a, 0
        else:
            r0, c0 = a, reg.start
        out = number_formats.dequant_fp8_block(block, scale, r0, c0, e.block)
        w.write(out.tobytes())
        advance(out.nbytes)


def _read_f32(reg: Region, readers: ReaderCache) -> np.ndarray:
    """A small float tensor (an FP8 weight_scale_inv) as float32 values, whatever its float dtype."""
    try:
        return number_formats.float_to_f32(read_array(reg, readers), reg.dtype)
    except ValueError as e:
        where = f"{reg.pieces[0].path}: {reg.pieces[0].name}" if reg.pieces else "scale"
        raise CheckpointError(f"{where}: {e}; the checkpoint's scales must be float") from None


def _to_f32(block: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return number_formats.bf16_to_f32(block.view("<u2"))
    if dtype == "F16":
        return block.view("<f2").astype(np.float32)
    if dtype == "F32":
        return block.view("<f4").astype(np.float32)
    raise CheckpointError(f"cannot do float math on {dtype} weights")


def _from_f32(x: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "BF16":
        return number_formats.f32_to_bf16(x)
    if dtype == "F16":
        return x.astype("<f2")
    return x.astype("<f4")


def write_lora(
    e: OutEntry, w: SafetensorsWriter, readers: ReaderCache, advance: Callable[[int], None]
) -> None:
    """W' = W + s * B @ A in float32, one rounding to the output dtype, chunk by chunk of rows.

    The region may be a slice of the weight (a sharded layout): a dim-0 slice takes B's matching
    rows, a dim-1 slice A's matching columns. An FP8 source weight (e.scale set) is dequantised
    first; the result is BF16.
    """
    assert e.region is not None and e.lora is not None
    a_reg, b_reg, s = e.lora
    a = _to_f32(read_array(a_reg, readers).view(np.uint8), a_reg.dtype).reshape(a_reg.shape)
    b = _to_f32(read_array(b_reg, readers).view(np.uint8), b_reg.dtype).reshape(b_reg.shape)
    scale = _read_f32(e.scale, readers) if e.scale is not None else None
    reg = e.region
    row_off, col_off = (reg.start, 0) if reg.dim == 0 else (0, reg.start)
    if reg.dim != 0:
        a = np.ascontiguousarray(a[:, reg.start : reg.stop])
    for r0, block in iter_rows(reg, readers):
        g0 = row_off + r0
        if scale is not None:
            wf = number_formats.fp8_e4m3_to_f32(block) * number_formats.expand_block_scale(
                scale, g0, g0 + block.shape[0], col_off, col_off + block.shape[1], e.block
            )
        else:
            wf = _to_f32(block, reg.dtype).reshape(block.shape[0], -1)
        wf = wf + np.float32(s) * (b[g0 : g0 + wf.shape[0]] @ a)
        out = _from_f32(wf, e.dtype)
        w.write(out.tobytes())
        advance(out.nbytes)
