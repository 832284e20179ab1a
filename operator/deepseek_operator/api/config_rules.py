"""The rules that need the model's config.json: checked by the operator before any pod starts.

Pure functions over a validated spec and the parsed config.json (plus the names of any
quant_model_description*.json files), so they run in unit tests and in the operator alike. The
split rules themselves are dsworker.contract.layout's, the same ones the sharder and the loader use.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from dsworker.contract.layout import ModelDims, ParallelPlan, check_plan
from dsworker.contract.model_config import ModelConfig, ModelConfigError, parse_model_config

from .spec import DeepSeekDeploymentSpec

# What a checkpoint can be; "auto" in the spec resolves to one of these.
DETECTED_QUANTIZATIONS = ("bf16", "fp8", "w8a8", "w8a16")

_PLAN_FIELD = re.compile(r"\b(moeTp|moeEp|tp)\b")


class UnsupportedQuantization(ValueError):
    """The checkpoint's quantization is none the engine runs; the message says which."""


@dataclass
class ConfigReview:
    """What config.json says about a spec: errors block the deployment, warnings do not."""

    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    architecture: str | None = None
    quantization: str | None = None
    dims: ModelDims | None = None


def _bits(group: Mapping[str, Any], key: str) -> int | None:
    spec = group.get(key)
    return int(spec.get("num_bits", 0)) if isinstance(spec, Mapping) else None


def _compressed_tensors(qc: Mapping[str, Any]) -> str:
    groups = [g for g in (qc.get("config_groups") or {}).values() if isinstance(g, Mapping)]
    weights = {_bits(g, "weights") for g in groups}
    acts = {_bits(g, "input_activations") for g in groups}
    if weights == {8}:
        return "w8a8" if acts == {8} else "w8a16" if acts == {None} else ""
    return ""


def detect_quantization(
    config: Mapping[str, Any], quant_description_files: Iterable[str] = ()
) -> str:
    """The checkpoint's weight format (bf16, fp8, w8a8 or w8a16) from config.json and the names
    of quant_model_description*.json files; raises UnsupportedQuantization for anything else."""
    qc = config.get("quantization_config")
    if isinstance(qc, Mapping) and qc:
        method = str(qc.get("quant_method", ""))
        if method == "fp8":
            return "fp8"
        if method == "compressed-tensors" and (found := _compressed_tensors(qc)):
            return found
        raise UnsupportedQuantization(
            f"config.json quantization_config (quant_method {method!r}) is not supported; use a "
            "bf16, fp8 (block 128), w8a8 or w8a16 (compressed-tensors, 8-bit) checkpoint"
        )
    names = [str(config.get("quantize", ""))] + [str(n) for n in quant_description_files]
    for name in (n.lower() for n in names):
        if "w8a8" in name:
            return "w8a8"
        if "w8a16" in name:
            return "w8a16"
    return "bf16"


def resolve_quantization(
    spec: DeepSeekDeploymentSpec,
    config: Mapping[str, Any],
    quant_description_files: Iterable[str] = (),
) -> str:
    """spec.model.quantization with auto replaced by what the checkpoint is."""
    if spec.model.quantization != "auto":
        return spec.model.quantization
    return detect_quantization(config, quant_description_files)


def _blame(message: str) -> str:
    m = _PLAN_FIELD.search(message)
    return f"spec.parallelism.{m.group(1) if m else 'tp'}: {message}"


def _fp8_extra(dims: ModelDims, plan: ParallelPlan) -> list[str]:
    """The FP8 block checks of the attention projections when config.json leaves out the MLA
    head dims (DeepSeek's defaults then apply). With them, check_plan checks the projections
    itself (and always the shared experts): each problem is reported once."""
    if not dims.fp8_block or plan.tp == 1:
        return []
    if dims.qk_nope_head_dim and dims.qk_rope_head_dim and dims.v_head_dim:
        return []
    block = dims.fp8_block[0]
    errs: list[str] = []
    heads = dims.num_attention_heads
    dn = dims.qk_nope_head_dim or 128
    dr = dims.qk_rope_head_dim or 64
    dv = dims.v_head_dim or 128
    sizes: list[tuple[str, int]] = []
    if heads % plan.tp == 0:  # otherwise check_plan already reports the heads
        sizes += [
            ("q_b_proj rows (heads*(qk_nope_head_dim+qk_rope_head_dim))", heads * (dn + dr)),
            ("kv_b_proj rows (heads*(qk_nope_head_dim+v_head_dim))", heads * (dn + dv)),
            ("o_proj columns (heads*v_head_dim)", heads * dv),
        ]
    for what, size in sizes:
        if size % plan.tp == 0 and (size // plan.tp) % block:
            errs.append(
                f"spec.parallelism.tp: FP8 block quantisation: {what}/tp = {size // plan.tp} is "
                f"not a multiple of {block}; use a smaller tp or set spec.model.dequantizeFp8: true"
            )
    return errs


def review_config(
    spec: DeepSeekDeploymentSpec,
    config: ModelConfig | Mapping[str, Any],
    quant_description_files: Iterable[str] = (),
) -> ConfigReview:
    """Every config-dependent rule for a validated spec: architecture, offline sharding,
    quantization, MTP, sequence length and the divisibility of the parallel plan. A dict is
    validated first (parse_model_config): a malformed one is an error naming the key."""
    review = ConfigReview()
    try:
        mc = config if isinstance(config, ModelConfig) else parse_model_config(config)
    except ModelConfigError as exc:
        review.errors.append(f"spec.model.source: {exc}")
        return review
    config, dims = mc.raw, mc.dims
    review.dims, review.architecture = dims, dims.architecture
    model, errs, warns = spec.model, review.errors, review.warnings

    if model.architecture and model.architecture != dims.architecture:
        errs.append(
            f"spec.model.architecture is {model.architecture} but config.json describes "
            f"{dims.architecture}; remove spec.model.architecture or point spec.model.source at "
            f"a {model.architecture} checkpoint"
        )
    if spec.sharding.enabled and dims.architecture == "DeepseekV2":
        errs.append(
            "spec.sharding.enabled: config.json describes DeepseekV2 and offline sharding supports "
            "only DeepseekV3 (V3, R1); set spec.sharding.enabled: false (the model is split at "
            "start-up)"
        )
    if model.mtp and dims.num_nextn_predict_layers < 1:
        errs.append(
            "spec.model.mtp: the checkpoint has no MTP layer (config.json num_nextn_predict_layers "
            "is 0); set mtp: false"
        )

    try:
        detected = detect_quantization(config, quant_description_files)
    except UnsupportedQuantization as exc:
        errs.append(f"spec.model.quantization: {exc}")
        detected = None
    if detected and model.quantization not in ("auto", detected):
        errs.append(
            f"spec.model.quantization is {model.quantization} but the checkpoint is {detected}; "
            f"set quantization: auto or {detected}"
        )
    review.quantization = detected if model.quantization == "auto" else model.quantization
    if model.dequantize_fp8 and detected and detected != "fp8":
        warns.append(
            f"spec.model.dequantizeFp8 has no effect: the checkpoint is {detected}, not fp8"
        )
    if detected == "fp8" and not model.dequantize_fp8 and spec.worker.accelerator.type != "gpu":
        warns.append(
            f"spec.model.dequantizeFp8: the checkpoint is FP8 and accelerator type "
            f"{spec.worker.accelerator.type} has no FP8 matmul; set dequantizeFp8: true to shard "
            "BF16 weights"
        )

    max_pos = mc.max_position_embeddings
    if max_pos is not None and spec.serving.max_seq_len > max_pos:
        errs.append(
            f"spec.serving.maxSeqLen ({spec.serving.max_seq_len}) exceeds the model's "
            f"max_position_embeddings ({max_pos}); lower maxSeqLen"
        )

    plan = spec.parallelism.to_plan()
    split_dims = replace(dims, fp8_block=None) if model.dequantize_fp8 else dims
    errs.extend(_blame(m) for m in check_plan(split_dims, plan))
    errs.extend(_fp8_extra(split_dims, plan))
    return review


def check_against_config(
    spec: DeepSeekDeploymentSpec,
    config: ModelConfig | Mapping[str, Any],
    quant_description_files: Iterable[str] = (),
) -> list[str]:
    """The errors of review_config: empty when the spec fits the checkpoint."""
    return review_config(spec, config, quant_description_files).errors


__all__ = [
    "DETECTED_QUANTIZATIONS",
    "ConfigReview",
    "UnsupportedQuantization",
    "check_against_config",
    "detect_quantization",
    "resolve_quantization",
    "review_config",
]
