"""W8A8 references and mixed-precision checkpoints for the engine tests.

transformers runs the dequantised checkpoint; for W8A8 the engine also rounds each quantised
matmul's input per token, so the reference does the same (and leaves inputs of the weights a
checkpoint keeps in BF16 unrounded). KEEP_FLOAT: what the mixed-precision tiny checkpoints keep.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from dsworker.checkpoint.safetensors_reader import SafetensorsReader

# Linear modules the mixed-precision tiny checkpoints keep in BF16 (synth keep_float), written as
# each format's own tools write them: an attention projection and a layer's shared experts each,
# kv_b_proj everywhere (a suffix / a regex), a dense down_proj beside quantised gate/up, and a
# layer's routed down_proj stack beside quantised gate/up stacks.
KEEP_FLOAT = {
    "fp8": ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.shared_experts", "kv_b_proj"),
    "w8a16": (
        "model.layers.0.self_attn.o_proj",
        r"re:model\.layers\.1\.mlp\.shared_experts\..*",
        r"re:model\.layers\.2\.mlp\.experts\.\d+\.down_proj$",
    ),
    "w8a8": (
        r"re:.*kv_b_proj$",
        "model.layers.0.self_attn.q_b_proj",
        "model.layers.0.mlp.down_proj",
        r"re:model\.layers\.2\.mlp\.shared_experts\..*",
    ),
}

# Weights a W8A8 checkpoint keeps 8-bit (kv_b_proj, eh_proj, router, embeddings and head do not).
_FLOAT_ON_DEVICE = ("kv_b_proj", "eh_proj", "mlp.gate.", "embed_tokens", "lm_head", "head.")


def _k_parts(name: str, tp: int, moe_tp: int) -> int:
    """How many ranks' slices the input of a row-parallel weight is quantised in (1: whole rows)."""
    if name.endswith("mlp.experts.down_proj"):
        return moe_tp
    return tp if ("o_proj" in name or "down_proj" in name) else 1


def float_params(ckpt: Path) -> tuple[str, ...]:
    """transformers' parameter names (routed experts fused per layer) of the linear weights a
    quantised checkpoint stores in BF16: read off its tensors, not off its declarations."""
    out = set()
    for f in sorted(ckpt.glob("*.safetensors")):
        with SafetensorsReader(f) as r:
            for name, t in r.tensors.items():
                if t.dtype == "BF16" and name.endswith("_proj.weight") and "eh_proj" not in name:
                    fused = re.sub(r"experts\.\d+\.(gate|up)_proj", "experts.gate_up_proj", name)
                    out.add(re.sub(r"experts\.\d+\.down_proj", "experts.down_proj", fused))
    return tuple(sorted(n.removesuffix(".weight") for n in out))


def static_inputs(ckpt: Path) -> dict[str, tuple[float, float]]:
    """module -> (input_scale, input_offset) of the static W8A8 modules of a checkpoint, as
    stored (bf16 values, exact in fp32); kv_b_proj, held dequantised, is left out."""
    from dsworker.checkpoint import number_formats

    out = {}
    for f in sorted(ckpt.glob("*.safetensors")):
        with SafetensorsReader(f) as r:
            for name in r.tensors:
                if name.endswith(".input_scale") and "kv_b_proj" not in name:
                    m = name.removesuffix(".input_scale")
                    vals = [
                        float(number_formats.bf16_to_f32(r.array(r.info(f"{m}.{c}")))[0])
                        for c in ("input_scale", "input_offset")
                    ]
                    out[m] = (vals[0], vals[1])
    return out


@contextlib.contextmanager
def per_token_int8_inputs(
    model: Any,
    tp: int = 1,
    moe_tp: int = 1,
    also_float: tuple[str, ...] = (),
    static: dict[str, tuple[float, float]] | None = None,
) -> Iterator[None]:
    """Every matmul on a W8A8-quantised weight sees its input rounded as the engine's op rounds it
    (symmetric int8 per token, per rank's slice of a row-parallel input; `static` modules by their
    per-tensor scale and offset, elementwise, so the same on any tp): transformers then computes
    what W8A8 serving on tp / moe_tp ranks should. `also_float`: parameters the checkpoint keeps
    in BF16 (float_params), whose inputs stay unrounded."""
    from dsworker.ops.quant_formats import quantize_per_token, quantize_static

    static = static or {}
    fixed = {
        p.untyped_storage().data_ptr(): static[n.removesuffix(".weight")]
        for n, p in model.named_parameters()
        if n.removesuffix(".weight") in static
    }
    parts = {
        p.untyped_storage().data_ptr(): _k_parts(n.removesuffix(".weight"), tp, moe_tp)
        for n, p in model.named_parameters()
        if p.dim() >= 2
        and not any(f in n for f in _FLOAT_ON_DEVICE)
        and n.removesuffix(".weight") not in also_float
        and n.removesuffix(".weight") not in static
    }
    linear = torch.nn.functional.linear

    def fake(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None = None) -> torch.Tensor:
        n = parts.get(w.untyped_storage().data_ptr())
        st = fixed.get(w.untyped_storage().data_ptr())
        if st:
            s, o = torch.tensor([st[0]]), torch.tensor([st[1]])
            x = ((quantize_static(x, s, o).float() - o) * s).to(x.dtype)
        if n:
            flat = x.reshape(-1, x.shape[-1])
            cols = []
            for chunk in flat.chunk(n, dim=-1):
                q, s = quantize_per_token(chunk)
                cols.append(q.float() * s[:, None])
            x = torch.cat(cols, -1).reshape(x.shape).to(x.dtype)
        return linear(x, w, b)

    impl = getattr(model.config, "_experts_implementation", None)
    model.config._experts_implementation = "eager"  # the expert loop calls functional.linear
    torch.nn.functional.linear = fake
    try:
        yield
    finally:
        torch.nn.functional.linear = linear
        model.config._experts_implementation = impl
