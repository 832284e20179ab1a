"""Per-rank device memory of a plan, from config.json alone: weights, KV cache, workspace.

Pure and torch-free, so the operator can check that a plan fits before any pod starts, and the
worker checks the same numbers at start-up. Weights are counted by the sharder's own rules
(layout.place / owner_dirs / tensor_slice): `shard_bytes` is exactly what `dsworker shard` writes
into the directories a rank reads (tensor data, not file headers). `device_bytes` is what the loaded
model holds: 8-bit weights as stored (W8A16 unpacked to one int8 a weight, the same bytes), float
tensors in the compute dtype, the router in fp32, static W8A8's [1] input scale and offset in fp32,
and kv_b_proj dequantised to the compute dtype
(absorbed MLA multiplies by it in both orientations; vLLM keeps it so too).
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from dsworker.contract.kv_budget import GIB, kv_bytes, pages_for, wanted_slots
from dsworker.contract.layout import (
    ModelDims,
    ParallelPlan,
    local_shape,
    owner_dirs,
    parts_for,
    place,
    split_name,
    tensor_slice,
)
from dsworker.contract.model_config import ModelConfig, ModelConfigError, parse_model_config
from dsworker.contract.precision import (
    MODULE_LIST_KEYS,
    Precision,
    QuantDescription,
    module_precision,
)
from dsworker.contract.quant import DTYPE_BYTES, QuantFormat, stored

# Activations, MoE exchange buffers, logits and allocator slack: a stated allowance per rank.
WORKSPACE_MIN_BYTES = 2 * GIB
HEADROOM_WARN = 0.10  # under 10% of device memory left over: warn
UNQUANTISED_ON_DEVICE = ("self_attn.kv_b_proj",)  # held in the compute dtype (see above)
# The MLA sizes the model counts with: optional to config.json's parser, required here.
MLA_SIZES = ("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
# The weights are counted tensor by tensor (about a second for R1's 62 x 256 expert MLPs): more
# expert MLPs than this (8x R1) is no DeepSeek checkpoint, and would hold the operator for minutes.
MAX_EXPERT_MLPS = 1 << 17


# config.json's keys the memory fit reads (and parse_model_config needs): what the sharder reports
# of the real checkpoint, small enough for the termination log (4 KiB with the rest).
FIT_KEYS = (
    "architectures",
    "model_type",
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
    "n_shared_experts",
    "num_experts_per_tok",
    "n_group",
    "topk_group",
    "topk_method",
    "first_k_dense_replace",
    "moe_layer_freq",
    "num_nextn_predict_layers",
    "max_position_embeddings",
    "q_lora_rank",
    *MLA_SIZES,
    "quantize",
)
_QUANT_KEYS = ("quant_method", "weight_block_size")
_QUANT_PART_KEYS = ("num_bits", "type", "strategy", "group_size")
# The module lists (and targets) travel in the sharder's report up to this many characters of
# JSON: the termination log holds 4 KiB. Longer ones are left out, and the operator then counts
# those modules as quantised (docs/memory.md); the worker's start-up check sees them all.
MODULE_LISTS_MAX_CHARS = 2048


def fit_inputs(cfg: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a (validated) config.json the memory fit reads: FIT_KEYS, and of
    quantization_config its method, FP8 block, 8-bit groups and module lists (when short)."""
    out = {k: cfg[k] for k in FIT_KEYS if cfg.get(k) is not None}
    qc = cfg.get("quantization_config")
    if isinstance(qc, Mapping) and qc:
        small: dict[str, Any] = {k: qc[k] for k in _QUANT_KEYS if k in qc}
        lists = {k: qc[k] for k in MODULE_LIST_KEYS if qc.get(k)}
        groups = qc.get("config_groups")
        if isinstance(groups, Mapping):
            small["config_groups"] = {
                name: _group_inputs(group) for name, group in groups.items()
                if isinstance(group, Mapping)
            }  # fmt: skip
        if len(json.dumps([lists, small], separators=(",", ":"))) > MODULE_LISTS_MAX_CHARS:
            lists = {}
            for group in small.get("config_groups", {}).values():
                group.pop("targets", None)
        out["quantization_config"] = small | lists
    return out


def _group_inputs(group: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {
        part: {k: spec[k] for k in _QUANT_PART_KEYS if k in spec}
        for part, spec in group.items()
        if part in ("weights", "input_activations") and isinstance(spec, Mapping)
    }
    if isinstance(group.get("targets"), list):
        out["targets"] = group["targets"]
    return out


def memory_config(cfg: Mapping[str, Any] | ModelConfig) -> dict[str, Any]:
    """config.json validated for the memory model (ModelConfigError naming the key), as a dict:
    every value the counting below reads is then of the right type and range."""
    mc = cfg if isinstance(cfg, ModelConfig) else parse_model_config(cfg)
    for key in MLA_SIZES:
        mc.require(key)
    layers = mc.sizes["num_hidden_layers"] + mc.num_nextn_predict_layers
    if layers * (mc.sizes["n_routed_experts"] + 1) > MAX_EXPERT_MLPS:
        raise ModelConfigError(
            f"{mc.where}: n_routed_experts ({mc.sizes['n_routed_experts']}) x layers ({layers}) "
            f"is over {MAX_EXPERT_MLPS} expert MLPs, more than any DeepSeek checkpoint; "
            "fix config.json",
            "n_routed_experts",
        )
    return mc.raw


@dataclass(frozen=True)
class Tensor:
    """One stored tensor of the checkpoint: name, safetensors dtype, global shape."""

    name: str
    dtype: str
    shape: tuple[int, ...]


def _linear_names(p: str, cfg: dict[str, Any]) -> list[tuple[str, tuple[int, int]]]:
    h, n = cfg["hidden_size"], cfg["num_attention_heads"]
    dn, dr, dv = cfg["qk_nope_head_dim"], cfg["qk_rope_head_dim"], cfg["v_head_dim"]
    rkv, rq = cfg["kv_lora_rank"], cfg.get("q_lora_rank")
    a = f"{p}.self_attn"
    out = (
        [(f"{a}.q_a_proj", (rq, h)), (f"{a}.q_b_proj", (n * (dn + dr), rq))]
        if rq
        else [(f"{a}.q_proj", (n * (dn + dr), h))]
    )
    return out + [
        (f"{a}.kv_a_proj_with_mqa", (rkv + dr, h)),
        (f"{a}.kv_b_proj", (n * (dn + dv), rkv)),
        (f"{a}.o_proj", (h, n * dv)),
    ]


def _mlp(p: str, inter: int, h: int) -> list[tuple[str, tuple[int, int]]]:
    return [
        (f"{p}.gate_proj", (inter, h)),
        (f"{p}.up_proj", (inter, h)),
        (f"{p}.down_proj", (h, inter)),
    ]


def _layer(i: int, cfg: dict[str, Any]) -> tuple[list[Tensor], list[tuple[str, tuple[int, int]]]]:
    """(float tensors, quantisable linear modules) of decoder layer i."""
    h, p = cfg["hidden_size"], f"model.layers.{i}"
    floats = [Tensor(f"{p}.input_layernorm.weight", "BF16", (h,))]
    floats.append(Tensor(f"{p}.post_attention_layernorm.weight", "BF16", (h,)))
    if cfg.get("q_lora_rank"):
        floats.append(Tensor(f"{p}.self_attn.q_a_layernorm.weight", "BF16", (cfg["q_lora_rank"],)))
    floats.append(Tensor(f"{p}.self_attn.kv_a_layernorm.weight", "BF16", (cfg["kv_lora_rank"],)))
    linears = _linear_names(p, cfg)
    if i < int(cfg.get("first_k_dense_replace") or 0):
        return floats, linears + _mlp(f"{p}.mlp", cfg["intermediate_size"], h)
    e, im = cfg["n_routed_experts"], cfg["moe_intermediate_size"]
    floats.append(Tensor(f"{p}.mlp.gate.weight", "BF16", (e, h)))
    if cfg.get("topk_method", "noaux_tc") == "noaux_tc" and "V3" in str(cfg.get("architectures")):
        floats.append(Tensor(f"{p}.mlp.gate.e_score_correction_bias", "F32", (e,)))
    for j in range(e):
        linears += _mlp(f"{p}.mlp.experts.{j}", im, h)
    if cfg.get("n_shared_experts"):
        linears += _mlp(f"{p}.mlp.shared_experts", cfg["n_shared_experts"] * im, h)
    return floats, linears


def checkpoint_tensors(
    cfg: dict[str, Any], mtp: bool, precision: Precision | None = None
) -> Iterator[Tensor]:
    """Every stored tensor of a DeepSeek checkpoint in config.json's format (MTP when asked),
    each linear module as `precision` (default: config.json's) stores it."""
    prec = precision or module_precision(cfg)
    h, v, nl = cfg["hidden_size"], cfg["vocab_size"], cfg["num_hidden_layers"]
    yield Tensor("model.embed_tokens.weight", "BF16", (v, h))
    n_mtp = int(cfg.get("num_nextn_predict_layers") or 0) if mtp else 0
    for i in range(nl + n_mtp):
        floats, linears = _layer(i, cfg)
        if i >= nl:
            p = f"model.layers.{i}"
            floats += [
                Tensor(f"{p}.embed_tokens.weight", "BF16", (v, h)),
                Tensor(f"{p}.enorm.weight", "BF16", (h,)),
                Tensor(f"{p}.hnorm.weight", "BF16", (h,)),
                Tensor(f"{p}.eh_proj.weight", "BF16", (h, 2 * h)),
                Tensor(f"{p}.shared_head.norm.weight", "BF16", (h,)),
                Tensor(f"{p}.shared_head.head.weight", "BF16", (v, h)),
            ]
        yield from floats
        for module, shape in linears:
            name = f"{module}.weight"
            fmt = prec.format_of(module)
            if fmt is None:
                yield Tensor(name, "BF16", shape)
            else:
                yield from (Tensor(n, d, s) for n, d, s in stored(name, shape, fmt))
    yield Tensor("model.norm.weight", "BF16", (h,))
    yield Tensor("lm_head.weight", "BF16", (v, h))


def _numel(shape: tuple[int, ...]) -> int:
    out = 1
    for s in shape:
        out *= s
    return out


def _device_bytes(
    t: Tensor, shape: tuple[int, ...], fmt: QuantFormat | None, dtype_bytes: int
) -> int:
    """What the model holds for one stored slice (see the module docstring)."""
    module, suffix = split_name(t.name)
    if suffix == "weight_shape":
        return 0  # read on the host
    if module.endswith(".mlp.gate"):
        return _numel(shape) * 4  # the router runs in fp32
    if fmt is not None and module.endswith(UNQUANTISED_ON_DEVICE):
        if suffix in ("weight", "weight_packed"):
            cols = shape[1] * 4 if suffix == "weight_packed" else shape[1]
            return shape[0] * cols * dtype_bytes
        return 0  # its scales are folded into the dequantised weight
    if suffix in ("input_scale", "input_offset"):
        return _numel(shape) * 4  # static W8A8's per-tensor input quantisation, held in fp32
    if t.dtype in ("BF16", "F16") and suffix in ("weight", ""):
        return _numel(shape) * dtype_bytes
    return _numel(shape) * DTYPE_BYTES[t.dtype]


@dataclass(frozen=True)
class WeightBytes:
    """Per rank: what the sharder writes for it, and what the loaded model holds."""

    shard: list[int]
    device: list[int]


def weight_bytes(
    cfg: Mapping[str, Any] | ModelConfig,
    plan: ParallelPlan,
    mtp: bool = False,
    dtype_bytes: int = 2,
    description: QuantDescription | None = None,
) -> WeightBytes:
    """Weight bytes of every rank of `plan` (dtype_bytes: the compute dtype's, 2 for bf16;
    description: msModelSlim's, when the checkpoint has one)."""
    cfg = memory_config(cfg)
    dims = ModelDims.from_config(cfg)
    prec = module_precision(cfg, description)
    fmt = prec.fmt
    shard: dict[str, int] = {}
    device: dict[str, int] = {}
    for t in checkpoint_tensors(cfg, mtp, prec):
        pl = place(t.name, dims)
        parts = parts_for(pl.group, plan)
        for d, part in owner_dirs(pl, dims, plan):
            shape = local_shape(t.shape, tensor_slice(t.name, t.shape, pl, part, parts))
            shard[d] = shard.get(d, 0) + _numel(shape) * DTYPE_BYTES[t.dtype]
            device[d] = device.get(d, 0) + _device_bytes(t, shape, fmt, dtype_bytes)
    ranks = range(plan.world_size)
    return WeightBytes(
        [sum(shard.get(d, 0) for d in plan.rank_dirs(r)) for r in ranks],
        [sum(device.get(d, 0) for d in plan.rank_dirs(r)) for r in ranks],
    )


def kv_cache_bytes(
    cfg: Mapping[str, Any] | ModelConfig,
    plan: ParallelPlan,
    max_seq_len: int,
    max_batch_size: int,
    page_size: int,
    mtp: bool = False,
    dtype_bytes: int = 2,
) -> tuple[int, int]:
    """(one maxSeqLen sequence, maxBatchSize of them) of KV on one rank of its dp group.

    MLA caches one latent plus the rope key per token and layer, not split over tp.
    """
    cfg = memory_config(cfg)
    layers = int(cfg["num_hidden_layers"]) + (
        int(cfg.get("num_nextn_predict_layers") or 0) if mtp else 0
    )
    page = kv_bytes(
        layers, page_size, int(cfg["kv_lora_rank"]), int(cfg["qk_rope_head_dim"]), dtype_bytes
    )
    per_seq = pages_for(max_seq_len, page_size) * page
    return per_seq, per_seq * wanted_slots(max_batch_size, plan.dp)


def workspace_bytes(
    cfg: Mapping[str, Any] | ModelConfig, prefill_tokens: int, dtype_bytes: int = 2
) -> int:
    """Activations of one prefill step (about 16 hidden-wide rows each) plus fp32 logits, at least
    WORKSPACE_MIN_BYTES: a stated allowance, not a measurement."""
    cfg = memory_config(cfg)
    per_token = 16 * int(cfg["hidden_size"]) * dtype_bytes + 4 * int(cfg["vocab_size"])
    return max(WORKSPACE_MIN_BYTES, prefill_tokens * per_token)
