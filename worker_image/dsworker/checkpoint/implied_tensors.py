"""The tensors config.json implies: their names and shapes, checked against what a checkpoint holds.

Shapes are formulas over config.json fields, so an error can say which fields disagree with the
tensor; names mirror DeepseekV2/V3 (dense and MoE layers, MLA with or without q_lora, MTP layers).
Shared by the HF checkpoint and the sharded layout read back as a source.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsworker.checkpoint.regions import GlobalTensor
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import layer_index, split_name
from dsworker.contract.model_config import ModelConfig
from dsworker.contract.quant import STATIC_COMPANIONS

# dtypes an FP8 weight_scale_inv may have (DeepSeek ships F32); decoded by float_to_f32
FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")

_ATTN = "num_attention_heads"
_QK = f"{_ATTN}*(qk_nope_head_dim+qk_rope_head_dim)"
# Shapes by module (within a layer), as formulas over config.json fields, so that an error can say
# which fields disagree with the tensor.
_LAYER_SHAPES: dict[str, tuple[str, ...]] = {
    "input_layernorm": ("hidden_size",),
    "post_attention_layernorm": ("hidden_size",),
    "embed_tokens": ("vocab_size", "hidden_size"),
    "shared_head.head": ("vocab_size", "hidden_size"),
    "shared_head.norm": ("hidden_size",),
    "enorm": ("hidden_size",),
    "hnorm": ("hidden_size",),
    "eh_proj": ("hidden_size", "2*hidden_size"),
    "mlp.gate": ("n_routed_experts", "hidden_size"),
    "self_attn.q_proj": (_QK, "hidden_size"),
    "self_attn.q_a_proj": ("q_lora_rank", "hidden_size"),
    "self_attn.q_a_layernorm": ("q_lora_rank",),
    "self_attn.q_b_proj": (_QK, "q_lora_rank"),
    "self_attn.kv_a_proj_with_mqa": ("kv_lora_rank+qk_rope_head_dim", "hidden_size"),
    "self_attn.kv_a_layernorm": ("kv_lora_rank",),
    "self_attn.kv_b_proj": (f"{_ATTN}*(qk_nope_head_dim+v_head_dim)", "kv_lora_rank"),
    "self_attn.o_proj": ("hidden_size", f"{_ATTN}*v_head_dim"),
}
_GLOBAL_SHAPES: dict[str, tuple[str, ...]] = {
    "model.embed_tokens": ("vocab_size", "hidden_size"),
    "lm_head": ("vocab_size", "hidden_size"),
    "model.norm": ("hidden_size",),
}


def _mlp_shape(proj: str, inter: str) -> tuple[str, ...]:
    return ("hidden_size", inter) if proj == "down_proj" else (inter, "hidden_size")


def expected_shape(name: str, mc: ModelConfig) -> tuple[tuple[int, ...], str] | None:
    """(shape, formula) config.json implies for a ".weight" tensor; None when it cannot tell."""
    module, suffix = split_name(name)
    if suffix != "weight":
        return None
    formula = _GLOBAL_SHAPES.get(module)
    m = re.match(r"^model\.layers\.(\d+)\.(.+)$", module)
    if formula is None and m:
        layer, rest = int(m.group(1)), m.group(2)
        formula = _LAYER_SHAPES.get(rest)
        em = re.match(r"^mlp\.experts\.\d+\.(gate_proj|up_proj|down_proj)$", rest)
        sm = re.match(r"^mlp\.(shared_experts\.)?(gate_proj|up_proj|down_proj)$", rest)
        if em:
            formula = _mlp_shape(em.group(1), "moe_intermediate_size")
        elif sm and sm.group(1):
            formula = _mlp_shape(sm.group(2), "n_shared_experts*moe_intermediate_size")
        elif sm and layer < mc.first_k_dense_replace:
            formula = _mlp_shape(sm.group(2), "intermediate_size")
    if formula is None:
        return None
    try:  # the formulas are ours; the names in them are validated integer sizes of config.json
        shape = tuple(int(eval(f, {"__builtins__": {}}, dict(mc.sizes))) for f in formula)
    except (NameError, TypeError):
        return None
    return shape, "[" + ", ".join(formula) + "]"


def check_shapes(mc: ModelConfig, tensors: dict[str, GlobalTensor], cfg_path: Path) -> None:
    """Every known weight must have the shape config.json implies, every layer/expert index exist."""
    dims = mc.dims
    n_layers = dims.num_hidden_layers + dims.num_nextn_predict_layers
    for name, t in tensors.items():
        layer = layer_index(name)
        if layer is not None and layer >= n_layers:
            raise CheckpointError(
                f"{cfg_path}: tensor {name} is for layer {layer} but config.json has "
                f"num_hidden_layers={dims.num_hidden_layers} (+{dims.num_nextn_predict_layers} MTP); "
                "the config does not belong to these weights"
            )
        em = re.search(r"\.mlp\.experts\.(\d+)\.", name)
        if em and int(em.group(1)) >= dims.n_routed_experts:
            raise CheckpointError(
                f"{cfg_path}: tensor {name} is expert {em.group(1)} but config.json has "
                f"n_routed_experts={dims.n_routed_experts}; the config does not belong to these weights"
            )
        module, suffix = split_name(name)
        shape: tuple[int, ...] = t.shape
        probe = name
        if suffix == "weight_packed" and len(shape) == 2:
            shape, probe = (shape[0], shape[1] * 4), module + ".weight"
        if suffix == "weight_scale_inv":
            if t.dtype not in FLOAT_SCALE_DTYPES:
                raise CheckpointError(
                    f"{t.source_file}: {name} is {t.dtype}; FP8 block scales must be F32 "
                    "(BF16/F16 are read as such) - re-download or re-export the checkpoint"
                )
            w = tensors.get(module + ".weight")
            if w is not None and len(w.shape) == 2:
                blk = dims.fp8_block or (128, 128)
                want = (math.ceil(w.shape[0] / blk[0]), math.ceil(w.shape[1] / blk[1]))
                if shape != want:
                    raise CheckpointError(
                        f"{w.source_file}: {name} has shape {list(shape)}, expected {list(want)} "
                        f"for {module}.weight {list(w.shape)} in {blk[0]}x{blk[1]} blocks; "
                        "the checkpoint is inconsistent - re-download it"
                    )
            continue
        exp = expected_shape(probe, mc)
        if exp is not None and shape != exp[0]:
            raise CheckpointError(
                f"{cfg_path}: tensor {name} has shape {list(t.shape)} but config.json implies "
                f"{list(exp[0])} = {exp[1]} for {probe}; the config does not belong to these "
                "weights - fix those config.json fields or use the matching config"
            )


# Stored names under which a linear layer's weight may appear (plain/FP8/W8A8, W8A16, GPTQ-style).
_WEIGHT_NAMES = ("weight", "weight_packed", "qweight")
_MTP_ONLY = ("embed_tokens", "enorm", "hnorm", "shared_head.norm")
_MTP_LINEAR = ("eh_proj", "shared_head.head")


def expected_modules(mc: ModelConfig, layers: list[int]) -> list[tuple[str, bool]]:
    """(name, is_linear) for every module config.json implies, main model plus extra (MTP) layers.

    A non-linear name (norms, router, its bias, embeddings) must be stored exactly so; a linear
    module's weight may be stored quantised under any of `_WEIGHT_NAMES`. Mirrors DeepseekV2/V3:
    dense MLP below first_k_dense_replace (and off the moe_layer_freq grid), router + routed experts
    + optional shared experts elsewhere, e_score_correction_bias with noaux_tc routing, q_a/q_b with
    q_lora_rank else q_proj, and for MTP layers their embed/enorm/hnorm/eh_proj/shared_head.
    """
    dims = mc.dims
    exact: list[str] = ["model.embed_tokens.weight", "model.norm.weight"]
    linear: list[str] = [] if mc.tie_word_embeddings else ["lm_head"]
    out = [(n, False) for n in exact] + [(n, True) for n in linear]
    freq = mc.moe_layer_freq
    projs = ("gate_proj", "up_proj", "down_proj")
    for i in [*range(dims.num_hidden_layers), *layers]:
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        exact = [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        exact.append(f"{a}.kv_a_layernorm.weight")
        linear = [f"{a}.kv_a_proj_with_mqa", f"{a}.kv_b_proj", f"{a}.o_proj"]
        if mc.q_lora_rank:
            exact.append(f"{a}.q_a_layernorm.weight")
            linear += [f"{a}.q_a_proj", f"{a}.q_b_proj"]
        else:
            linear.append(f"{a}.q_proj")
        if i >= dims.first_k_dense_replace and i % freq == 0:
            exact.append(f"{p}.mlp.gate.weight")
            if mc.topk_method == "noaux_tc":
                exact.append(f"{p}.mlp.gate.e_score_correction_bias")
            for e in range(dims.n_routed_experts):
                linear += [f"{p}.mlp.experts.{e}.{x}" for x in projs]
            if dims.n_shared_experts:
                linear += [f"{p}.mlp.shared_experts.{x}" for x in projs]
        else:
            linear += [f"{p}.mlp.{x}" for x in projs]
        if i >= dims.num_hidden_layers:
            exact += [f"{p}.{x}.weight" for x in _MTP_ONLY]
            linear += [f"{p}.{x}" for x in _MTP_LINEAR]
        out += [(n, False) for n in exact] + [(n, True) for n in linear]
    return out


def missing_tensors(mc: ModelConfig, tensors: Mapping[str, Any]) -> list[str]:
    """Names config.json implies that `tensors` lacks, plus quantisation companions that are missing.

    An MTP layer may be absent as a whole (many re-saved checkpoints drop it; sharding with --mtp
    then says so), but a present one must be complete.
    """
    first_mtp = mc.dims.num_hidden_layers
    present = {layer_index(n) for n in tensors}
    mtp_layers = [
        i for i in range(first_mtp, first_mtp + mc.num_nextn_predict_layers) if i in present
    ]
    missing = []
    for m, is_linear in expected_modules(mc, mtp_layers):
        if not is_linear:
            if m not in tensors:
                missing.append(m)
        elif not any(f"{m}.{w}" in tensors for w in _WEIGHT_NAMES):
            missing.append(f"{m}.weight")
    for name, t in tensors.items():
        module, suffix = split_name(name)
        has_weight = any(f"{module}.{w}" in tensors for w in _WEIGHT_NAMES)
        companion = suffix in (
            "weight_scale_inv",
            "weight_scale",
            "weight_offset",
            *STATIC_COMPANIONS,
        )
        if companion and not has_weight:
            missing.append(f"{module}.weight")  # a companion without its weight
        int_weight = (suffix == "weight" and getattr(t, "dtype", None) == "I8") or (
            suffix == "weight_packed"
        )
        if int_weight:
            missing += _missing_scales(module, tensors)
    return list(dict.fromkeys(missing))


def _missing_scales(module: str, tensors: Mapping[str, Any]) -> list[str]:
    """An int8 weight's missing companions: all of static W8A8's once it has one of them (its
    description type "W8A8"), else the per-channel weight_scale."""
    static = [f"{module}.{c}" for c in STATIC_COMPANIONS]
    if any(n in tensors for n in static):
        return [n for n in static if n not in tensors]
    return [] if f"{module}.weight_scale" in tensors else [f"{module}.weight_scale"]


def check_complete(
    mc: ModelConfig,
    tensors: Mapping[str, Any],
    where: Path | str,
    fix: str,
) -> None:
    """Refuse a checkpoint that lacks tensors config.json implies, naming them (not at load time)."""
    missing = missing_tensors(mc, tensors)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise CheckpointError(
            f"{where}: config.json implies {len(missing)} tensor(s) that are missing: {shown}; "
            f"{fix}, or fix config.json if it does not belong to these weights"
        )
