"""The tensors of a synthesized checkpoint: names and shapes from its config, values and files.

Each tensor's values depend only on (seed, tensor name), so the same seed gives the same weights
whatever the file split; generation streams row chunks, so memory stays bounded even for the
multi-GB bench preset. Quantised formats store each linear weight with its companions (FP8 block
scales, W8A8 per-channel scale and offset, W8A16 packed int32 words, scale and shape).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsworker.checkpoint import number_formats
from dsworker.checkpoint.safetensors_format import TensorSpec
from dsworker.checkpoint.safetensors_writer import SafetensorsWriter
from dsworker.contract.errors import CheckpointError
from dsworker.contract.quant import W8A8_STATIC, QuantFormat, stored
from dsworker.tools.synth_presets import INIT_STD

STATIC = QuantFormat(W8A8_STATIC)
# Static input scales a calibration might pick: inputs of the normed projections reach about 4,
# o_proj's (attention outputs of the tiny models) about 0.5; each module jitters its own.
STATIC_AMAX = {"o_proj": 0.5}


@dataclass(frozen=True)
class ModelTensor:
    """One logical tensor of the model before quantisation; kind says how to initialise it."""

    name: str
    shape: tuple[int, ...]
    # embed | norm | linear | dense_linear (never quantised) | static_linear (W8A8 static) |
    # router | bias
    kind: str


def _attn(p: str, c: dict[str, Any]) -> list[ModelTensor]:
    h, n = c["hidden_size"], c["num_attention_heads"]
    dn, dr, dv = c["qk_nope_head_dim"], c["qk_rope_head_dim"], c["v_head_dim"]
    rkv, rq = c["kv_lora_rank"], c.get("q_lora_rank")
    out = []
    if rq:
        out += [
            ModelTensor(f"{p}.self_attn.q_a_proj.weight", (rq, h), "linear"),
            ModelTensor(f"{p}.self_attn.q_a_layernorm.weight", (rq,), "norm"),
            ModelTensor(f"{p}.self_attn.q_b_proj.weight", (n * (dn + dr), rq), "linear"),
        ]
    else:
        out.append(ModelTensor(f"{p}.self_attn.q_proj.weight", (n * (dn + dr), h), "linear"))
    out += [
        ModelTensor(f"{p}.self_attn.kv_a_proj_with_mqa.weight", (rkv + dr, h), "linear"),
        ModelTensor(f"{p}.self_attn.kv_a_layernorm.weight", (rkv,), "norm"),
        ModelTensor(f"{p}.self_attn.kv_b_proj.weight", (n * (dn + dv), rkv), "linear"),
        ModelTensor(f"{p}.self_attn.o_proj.weight", (h, n * dv), "linear"),
    ]
    return out


def _mlp(p: str, inter: int, h: int) -> list[ModelTensor]:
    return [
        ModelTensor(f"{p}.gate_proj.weight", (inter, h), "linear"),
        ModelTensor(f"{p}.up_proj.weight", (inter, h), "linear"),
        ModelTensor(f"{p}.down_proj.weight", (h, inter), "linear"),
    ]


def _layer(i: int, c: dict[str, Any]) -> list[ModelTensor]:
    h = c["hidden_size"]
    p = f"model.layers.{i}"
    out = [ModelTensor(f"{p}.input_layernorm.weight", (h,), "norm")]
    out += _attn(p, c)
    out.append(ModelTensor(f"{p}.post_attention_layernorm.weight", (h,), "norm"))
    if i < c["first_k_dense_replace"]:
        out += _mlp(f"{p}.mlp", c["intermediate_size"], h)
        return out
    e, im = c["n_routed_experts"], c["moe_intermediate_size"]
    out.append(ModelTensor(f"{p}.mlp.gate.weight", (e, h), "router"))
    if c.get("topk_method") == "noaux_tc":
        out.append(ModelTensor(f"{p}.mlp.gate.e_score_correction_bias", (e,), "bias"))
    for j in range(e):
        out += _mlp(f"{p}.mlp.experts.{j}", im, h)
    if c.get("n_shared_experts"):
        out += _mlp(f"{p}.mlp.shared_experts", c["n_shared_experts"] * im, h)
    return out


def model_tensors(c: dict[str, Any]) -> list[list[ModelTensor]]:
    """The tensors in groups that stay within one file: embed, each layer, MTP layer, head."""
    h, v, nl = c["hidden_size"], c["vocab_size"], c["num_hidden_layers"]
    groups = [[ModelTensor("model.embed_tokens.weight", (v, h), "embed")]]
    groups += [_layer(i, c) for i in range(nl)]
    for k in range(int(c.get("num_nextn_predict_layers") or 0)):
        i = nl + k
        p = f"model.layers.{i}"
        g = [
            ModelTensor(f"{p}.embed_tokens.weight", (v, h), "embed"),
            ModelTensor(f"{p}.enorm.weight", (h,), "norm"),
            ModelTensor(f"{p}.hnorm.weight", (h,), "norm"),
            ModelTensor(f"{p}.eh_proj.weight", (h, 2 * h), "dense_linear"),
        ]
        g += _layer(i, c)
        g += [
            ModelTensor(f"{p}.shared_head.norm.weight", (h,), "norm"),
            ModelTensor(f"{p}.shared_head.head.weight", (v, h), "embed"),
        ]
        groups.append(g)
    groups.append(
        [
            ModelTensor("model.norm.weight", (h,), "norm"),
            ModelTensor("lm_head.weight", (v, h), "embed"),
        ]
    )
    return groups


def out_specs(t: ModelTensor, fmt: str) -> list[TensorSpec]:
    """The stored tensors for one model tensor in a format (weight plus companions)."""
    if t.kind == "static_linear":
        return [TensorSpec(n, d, s) for n, d, s in stored(t.name, t.shape, STATIC)]  # type: ignore[arg-type]
    if t.kind != "linear" or fmt == "bf16":
        return [TensorSpec(t.name, "F32" if t.kind == "bias" else "BF16", t.shape)]
    base = t.name[: -len(".weight")]
    out, inp = t.shape
    if fmt == "fp8":
        return [
            TensorSpec(t.name, "F8_E4M3", t.shape),
            TensorSpec(
                f"{base}.weight_scale_inv", "F32", (math.ceil(out / 128), math.ceil(inp / 128))
            ),
        ]
    if fmt == "w8a8":
        return [
            TensorSpec(t.name, "I8", t.shape),
            TensorSpec(f"{base}.weight_scale", "F32", (out, 1)),
            TensorSpec(f"{base}.weight_offset", "F32", (out, 1)),
        ]
    if inp % 4:
        raise CheckpointError(f"{t.name}: input dim {inp} is not a multiple of 4 (W8A16 packing)")
    return [
        TensorSpec(f"{base}.weight_packed", "I32", (out, inp // 4)),
        TensorSpec(f"{base}.weight_scale", "BF16", (out, 1)),
        TensorSpec(f"{base}.weight_shape", "I64", (2,)),
    ]


def _row_chunks(rows: int, cols: int, align: int) -> Iterator[tuple[int, int]]:
    step = max(align, (4_000_000 // max(cols, 1)) // align * align)
    for r in range(0, rows, step):
        yield r, min(rows, r + step)


def _tensor_bytes(t: ModelTensor, fmt: str, seed: int) -> Iterator[list[bytes]]:
    """Yields, per row chunk, the bytes of each stored tensor of `t` (companions in _out_specs order)."""
    rng = np.random.default_rng([seed, zlib.crc32(t.name.encode())])
    if t.kind == "norm":
        w = 1.0 + 0.05 * rng.standard_normal(t.shape, dtype=np.float32)
        yield [number_formats.f32_to_bf16(w).tobytes()]
        return
    if t.kind == "bias":
        yield [(0.05 * rng.standard_normal(t.shape, dtype=np.float32)).astype("<f4").tobytes()]
        return
    rows, cols = t.shape
    if t.kind == "static_linear":
        yield from _static_bytes(t, rng)
        return
    quantised = t.kind == "linear" and fmt != "bf16"
    chunks = list(_row_chunks(rows, cols, 128))
    for k, (r0, r1) in enumerate(chunks):
        w = rng.standard_normal((r1 - r0, cols), dtype=np.float32)
        w *= INIT_STD
        if not quantised:
            yield [number_formats.f32_to_bf16(w).tobytes()]
        elif fmt == "fp8":
            codes, scale = number_formats.quant_fp8_block(w)
            yield [codes.tobytes(), scale.astype("<f4").tobytes()]
        elif fmt == "w8a8":
            q, scale = number_formats.quant_int8_channel(w)
            yield [q.tobytes(), scale.tobytes(), np.zeros_like(scale).tobytes()]
        else:
            q, scale = number_formats.quant_int8_channel(w)
            extra = np.array([rows, cols], "<i8").tobytes() if k == len(chunks) - 1 else b""
            yield [
                number_formats.pack_int8_to_int32(q).tobytes(),
                number_formats.f32_to_bf16(scale).tobytes(),
                extra,
            ]


def _static_bytes(t: ModelTensor, rng: np.random.Generator) -> Iterator[list[bytes]]:
    """msModelSlim "W8A8": int8 weight, bf16 input_scale and input_offset [1], int32 quant_bias
    = -input_offset * rowsum(q) (no float bias), fp32 deq_scale = input_scale * weight scale."""
    rows, cols = t.shape
    leaf = t.name[: -len(".weight")].rsplit(".", 1)[-1]
    amax = STATIC_AMAX.get(leaf, 4.0) * float(rng.uniform(0.8, 1.2))
    in_scale = number_formats.f32_to_bf16(np.array([amax / 127.0], np.float32))
    is32 = number_formats.bf16_to_f32(in_scale)
    off = float(rng.integers(-4, 5))
    in_off = number_formats.f32_to_bf16(np.array([off], np.float32))
    chunks = list(_row_chunks(rows, cols, 128))
    for k, (r0, r1) in enumerate(chunks):
        w = rng.standard_normal((r1 - r0, cols), dtype=np.float32) * INIT_STD
        q, ws = number_formats.quant_int8_channel(w)
        qb = (-off * q.astype(np.int64).sum(axis=1)).astype("<i4")
        deq = (ws[:, 0] * is32[0]).astype("<f4")
        last = k == len(chunks) - 1
        yield [
            q.tobytes(),
            in_scale.tobytes() if last else b"",
            in_off.tobytes() if last else b"",
            qb.tobytes(),
            deq.tobytes(),
        ]


def write_file(path: Path, tensors: list[ModelTensor], fmt: str, seed: int) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    owners: list[list[int]] = []
    for t in tensors:
        s = out_specs(t, fmt)
        owners.append(list(range(len(specs), len(specs) + len(s))))
        specs += s
    # Companions are stored after their weight in the file, but generated chunk by chunk together:
    # buffer the (small) companions per tensor, stream the weight.
    w = SafetensorsWriter(path, specs)
    try:
        for t, idx in zip(tensors, owners, strict=True):
            extras: list[list[bytes]] = [[] for _ in idx[1:]]
            for parts in _tensor_bytes(t, fmt, seed):
                w.write(parts[0])
                for e, b in zip(extras, parts[1:], strict=True):
                    e.append(b)
            for e in extras:
                w.write(b"".join(e))
    except BaseException:
        w.abort()
        raise
    w.commit()
    return specs
