"""config.json parsed once into a validated, typed model: the only way the worker and the operator
read a model's config (the checkpoint's file, or the llm.dsop.io/model-config annotation).

Every key anything reads is checked here for type and range, so no later arithmetic meets a string,
a negative size or a zero divisor: `ModelConfigError` names the key (as a dotted path) and what it
must be. Pure and torch-free: the operator imports it. Keys nothing reads pass through in `raw`.
"""

from __future__ import annotations

import math
import reprlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from dsworker.contract import strict_json
from dsworker.contract.errors import INVALID_MODEL_CONFIG, CheckpointError, PlanError

FP8_BLOCK = 128
MAX_DEPTH = 16  # real configs nest 5 deep (quantization_config.config_groups.*.weights.num_bits)
MAX_INT = (1 << 31) - 1
TOPK_METHODS = ("noaux_tc", "greedy", "group_limited_greedy")
SCORING = ("sigmoid", "softmax")
ROPE_KINDS = ("default", "yarn")
# The sizes ModelDims needs; the engine needs more (ModelConfig.require).
REQUIRED = (
    "hidden_size",
    "vocab_size",
    "num_attention_heads",
    "num_hidden_layers",
    "intermediate_size",
    "moe_intermediate_size",
    "n_routed_experts",
)


_shown = reprlib.Repr()  # a value as a message shows it: bounded, however long the input
_shown.maxstring = _shown.maxother = 60


class ModelConfigError(PlanError, CheckpointError):
    """A malformed config.json; `key` is the dotted path of the offending key.

    A PlanError and a CheckpointError at once, so that every caller that already refuses a plan
    or a checkpoint with a clear message (exit code 2) refuses this too.
    """

    reason = INVALID_MODEL_CONFIG

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ModelDims:
    """The config.json facts the split rules depend on (V2 and V3 names; see DEEPSEEK_REFERENCE.md)."""

    architecture: str  # "DeepseekV2" | "DeepseekV3"
    hidden_size: int
    vocab_size: int
    num_attention_heads: int
    num_hidden_layers: int
    first_k_dense_replace: int
    intermediate_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_nextn_predict_layers: int
    # weight_block_size when the checkpoint is FP8-block quantised
    fp8_block: tuple[int, int] | None
    # MLA head dims (0 when config.json lacks them): only used to check FP8 attention shards.
    qk_nope_head_dim: int = 0
    qk_rope_head_dim: int = 0
    v_head_dim: int = 0

    @classmethod
    def from_config(cls, cfg: Mapping[str, Any]) -> ModelDims:
        """The dims of a config.json object (ModelConfigError, a PlanError, when malformed)."""
        return parse_model_config(cfg).dims


@dataclass(frozen=True)
class RopeConfig:
    """Rotary embedding of the qk_rope part, from rope_parameters (transformers 5) or rope_scaling
    plus rope_theta: plain, or YaRN with DeepSeek's mscale."""

    kind: str = "default"  # "default" | "yarn"
    theta: float = 10000.0
    factor: float = 1.0  # default: max_position_embeddings / original_max_position_embeddings
    original_max_position: int = 4096
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0
    mscale_all_dim: float = 0.0
    attention_factor: float | None = None
    truncate: bool = True
    interleave: bool = True  # pairs (x0,x1),(x2,x3)...; False = rotate_half halves (V3 only)


@dataclass(frozen=True)
class ModelConfig:
    """A validated config.json, defaults filled in; `raw` is the whole object as given."""

    where: str
    raw: dict[str, Any] = field(repr=False)
    architecture: str
    sizes: dict[str, int]  # REQUIRED plus every other integer size the config gives, validated
    first_k_dense_replace: int
    n_shared_experts: int
    num_nextn_predict_layers: int
    moe_layer_freq: int
    q_lora_rank: int  # 0: plain q_proj (V2-Lite)
    n_group: int
    topk_group: int
    topk_method: str
    scoring_func: str
    norm_topk_prob: bool
    routed_scaling_factor: float
    rms_norm_eps: float
    max_position_embeddings: int | None
    tie_word_embeddings: bool
    rope: RopeConfig
    eos_token_ids: tuple[int, ...]
    quant_method: str | None
    fp8_block: tuple[int, int] | None

    def require(self, key: str) -> int:
        """A size the engine cannot run without; ModelConfigError naming it when absent."""
        value = self.sizes.get(key)
        if value is None:
            raise ModelConfigError(
                f"{self.where}: missing {key}, which the engine needs; use the checkpoint's own "
                "config.json",
                key,
            )
        return value

    @property
    def dims(self) -> ModelDims:
        s = self.sizes
        return ModelDims(
            architecture=self.architecture,
            hidden_size=s["hidden_size"],
            vocab_size=s["vocab_size"],
            num_attention_heads=s["num_attention_heads"],
            num_hidden_layers=s["num_hidden_layers"],
            first_k_dense_replace=self.first_k_dense_replace,
            intermediate_size=s["intermediate_size"],
            moe_intermediate_size=s["moe_intermediate_size"],
            n_routed_experts=s["n_routed_experts"],
            n_shared_experts=self.n_shared_experts,
            num_nextn_predict_layers=self.num_nextn_predict_layers,
            fp8_block=self.fp8_block,
            qk_nope_head_dim=s.get("qk_nope_head_dim", 0),
            qk_rope_head_dim=s.get("qk_rope_head_dim", 0),
            v_head_dim=s.get("v_head_dim", 0),
        )


# Optional integer sizes (absent or null: left out of ModelConfig.sizes) and their smallest value.
_OPTIONAL_SIZES: dict[str, int] = {
    **dict.fromkeys(("kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim"), 1),
    **dict.fromkeys(("num_experts_per_tok", "moe_layer_freq", "n_group", "topk_group"), 1),
    **dict.fromkeys(("first_k_dense_replace", "n_shared_experts", "num_nextn_predict_layers"), 0),
    "q_lora_rank": 0,  # 0: a plain q_proj (V2-Lite)
    "max_position_embeddings": 1,
}


def parse_model_config(
    source: str | bytes | Mapping[str, Any], where: str = "config.json"
) -> ModelConfig:
    """Validate a config.json (its text, or the parsed object); ModelConfigError naming the key.

    `where` names the source in messages (a file path, or the annotation).
    """
    if isinstance(source, str | bytes):
        try:
            source = strict_json.loads(source)
        except strict_json.JsonError as e:
            raise ModelConfigError(f"{where}: {e}", e.key) from None
    if not isinstance(source, Mapping):
        raise ModelConfigError(f"{where}: not a JSON object (config.json must be one)", "")
    deep = strict_json.too_deep(source, MAX_DEPTH)
    if deep is not None:
        raise ModelConfigError(f"{where}: {deep} nests deeper than {MAX_DEPTH} levels", deep)
    r = _Reader(dict(source), where, "")
    arch = _architecture(r)
    sizes = {k: r.get_int(k, 1, required=True) for k in REQUIRED}
    for key, low in _OPTIONAL_SIZES.items():
        value = r.get_int(key, low)
        if value is not None:
            sizes[key] = value
    _check_routing_sizes(sizes, where)
    v3 = arch == "DeepseekV3"
    quant_method, fp8_block = _quantization(r)
    return ModelConfig(
        where=where,
        raw=r.obj,
        architecture=arch,
        sizes=sizes,
        first_k_dense_replace=sizes.get("first_k_dense_replace", 0),
        n_shared_experts=sizes.get("n_shared_experts", 0),
        num_nextn_predict_layers=sizes.get("num_nextn_predict_layers", 0),
        moe_layer_freq=sizes.get("moe_layer_freq", 1),
        q_lora_rank=sizes.get("q_lora_rank", 0),
        n_group=sizes.get("n_group", 1),
        topk_group=sizes.get("topk_group", sizes.get("n_group", 1)),
        topk_method=r.choice("topk_method", TOPK_METHODS) or ("noaux_tc" if v3 else "greedy"),
        scoring_func=r.choice("scoring_func", SCORING) or ("sigmoid" if v3 else "softmax"),
        norm_topk_prob=r.get_bool("norm_topk_prob", v3),
        routed_scaling_factor=r.get_number("routed_scaling_factor", 0.0) or 1.0,
        rms_norm_eps=r.get_number("rms_norm_eps", 0.0) or 1e-6,
        max_position_embeddings=sizes.get("max_position_embeddings"),
        tie_word_embeddings=r.get_bool("tie_word_embeddings", False),
        rope=_rope(r, sizes.get("max_position_embeddings") or 4096, v3),
        eos_token_ids=_eos_ids(r),
        quant_method=quant_method,
        fp8_block=fp8_block,
    )


class _Reader:
    """Typed, range-checked reads of one JSON object; errors name the dotted key path."""

    def __init__(self, obj: dict[str, Any], where: str, prefix: str) -> None:
        self.obj, self.where, self.prefix = obj, where, prefix

    def fail(self, key: str, problem: str) -> ModelConfigError:
        path = self.prefix + key
        return ModelConfigError(f"{self.where}: {path} {problem}; fix config.json", path)

    def get_int(self, key: str, low: int, required: bool = False) -> int | None:
        v = self.obj.get(key)
        if v is None and not required:
            return None
        if v is None:
            raise ModelConfigError(
                f"{self.where}: missing or non-integer {self.prefix + key}; fix config.json",
                self.prefix + key,
            )
        if not isinstance(v, int) or isinstance(v, bool):
            raise self.fail(key, f"must be an integer, got {_shown.repr(v)}")
        if not low <= v <= MAX_INT:
            raise self.fail(key, f"must be an integer in [{low}, {MAX_INT}], got {v}")
        return v

    def get_number(self, key: str, low: float) -> float | None:
        """A finite number >= low (ints accepted), None when absent or null."""
        v = self.obj.get(key)
        if v is None:
            return None
        if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
            raise self.fail(key, f"must be a finite number, got {_shown.repr(v)}")
        if v < low:
            raise self.fail(key, f"must be >= {low}, got {v}")
        return float(v)

    def get_bool(self, key: str, default: bool) -> bool:
        v = self.obj.get(key)
        if v is None:
            return default
        if not isinstance(v, bool):
            raise self.fail(key, f"must be true or false, got {_shown.repr(v)}")
        return v

    def get_str(self, key: str) -> str | None:
        v = self.obj.get(key)
        if v is not None and not isinstance(v, str):
            raise self.fail(key, f"must be a string, got {_shown.repr(v)}")
        return v

    def choice(self, key: str, allowed: tuple[str, ...]) -> str | None:
        v = self.get_str(key)
        if v and v not in allowed:
            raise self.fail(
                key, f"is {_shown.repr(v)}, not one of {', '.join(allowed)} (not supported)"
            )
        return v or None

    def sub(self, key: str) -> _Reader | None:
        """A nested object, None when absent, null or empty."""
        v = self.obj.get(key)
        if v is None or v == {}:
            return None
        if not isinstance(v, dict):
            raise self.fail(key, f"must be a JSON object, got {type(v).__name__}")
        return _Reader(v, self.where, f"{self.prefix}{key}.")


def _architecture(r: _Reader) -> str:
    archs = r.obj.get("architectures")
    if archs is not None and (
        not isinstance(archs, list) or not all(isinstance(a, str) for a in archs)
    ):
        raise r.fail("architectures", f"must be a list of strings, got {_shown.repr(archs)}")
    archs = archs or []
    model_type = r.get_str("model_type") or ""
    if any("V3" in a for a in archs) or model_type == "deepseek_v3":
        return "DeepseekV3"
    if any("V2" in a for a in archs) or model_type == "deepseek_v2":
        return "DeepseekV2"
    raise ModelConfigError(
        f"{r.where}: architectures/model_type is neither DeepseekV2 nor DeepseekV3 "
        f"(got {_shown.repr(archs or model_type)}); point model.source at a DeepSeek checkpoint",
        "architectures",
    )


def _check_routing_sizes(sizes: dict[str, int], where: str) -> None:
    """Group-limited routing splits the experts into n_group groups and keeps topk_group of them."""
    experts, groups = sizes["n_routed_experts"], sizes.get("n_group", 1)
    for key, bad, must in (
        ("n_group", experts % groups, f"divide n_routed_experts ({experts})"),
        ("topk_group", sizes.get("topk_group", 1) > groups, f"be <= n_group ({groups})"),
        (
            "num_experts_per_tok",
            sizes.get("num_experts_per_tok", 1) > experts,
            f"be <= n_routed_experts ({experts})",
        ),
    ):
        if bad:
            raise ModelConfigError(
                f"{where}: {key} ({sizes[key]}) must {must}; fix config.json", key
            )


def _rope(r: _Reader, max_pos: int, v3: bool) -> RopeConfig:
    key = "rope_parameters" if r.obj.get("rope_parameters") else "rope_scaling"
    rp = r.sub(key)
    top_theta = r.get_number("rope_theta", 0.0)
    interleave = r.get_bool("rope_interleave", True) if v3 else True
    if rp is None:
        return RopeConfig(
            theta=top_theta or 10000.0, original_max_position=max_pos, interleave=interleave
        )
    orig = rp.get_int("original_max_position_embeddings", 1) or max_pos
    kind_key = "rope_type" if "rope_type" in rp.obj else "type"
    kind = rp.get_str(kind_key) or "default"
    if kind not in ROPE_KINDS:
        raise rp.fail(
            kind_key, f"is {_shown.repr(kind)}: rope type not supported ({', '.join(ROPE_KINDS)})"
        )
    return RopeConfig(
        kind=kind,
        theta=rp.get_number("rope_theta", 0.0) or top_theta or 10000.0,
        factor=rp.get_number("factor", 0.0) or max_pos / orig,
        original_max_position=orig,
        beta_fast=rp.get_number("beta_fast", 0.0) or 32.0,
        beta_slow=rp.get_number("beta_slow", 0.0) or 1.0,
        mscale=rp.get_number("mscale", 0.0) or 0.0,
        mscale_all_dim=rp.get_number("mscale_all_dim", 0.0) or 0.0,
        attention_factor=rp.get_number("attention_factor", 0.0),
        truncate=rp.get_bool("truncate", True),
        interleave=interleave,
    )


def _eos_ids(r: _Reader) -> tuple[int, ...]:
    v = r.obj.get("eos_token_id")
    ids = v if isinstance(v, list) else [] if v is None else [v]
    if not all(isinstance(i, int) and not isinstance(i, bool) and 0 <= i <= MAX_INT for i in ids):
        raise r.fail("eos_token_id", f"must be a token id or a list of them, got {_shown.repr(v)}")
    return tuple(ids)


def _quantization(r: _Reader) -> tuple[str | None, tuple[int, int] | None]:
    """(quant_method, FP8 block) of quantization_config; its nested parts checked for type."""
    r.get_str("quantize")  # MindIE's name of the scheme
    qc = r.sub("quantization_config")
    if qc is None:
        return None, None
    method = qc.get_str("quant_method")
    not_converted = qc.obj.get("modules_to_not_convert")
    if not_converted is not None and (
        not isinstance(not_converted, list) or not all(isinstance(m, str) for m in not_converted)
    ):
        raise qc.fail("modules_to_not_convert", "must be a list of module names")
    groups = qc.sub("config_groups")
    for group in [groups.sub(name) for name in groups.obj] if groups else []:
        for part in ("weights", "input_activations", "output_activations"):
            if (spec := group.sub(part) if group else None) is not None:
                if "num_bits" in spec.obj:
                    spec.get_int("num_bits", 1, required=True)
                spec.get_int("group_size", 0)
                spec.get_str("strategy")
                spec.get_str("type")
    if method != "fp8":
        return method, None
    block = qc.obj.get("weight_block_size")
    if block is None:
        return method, (FP8_BLOCK, FP8_BLOCK)
    ok = isinstance(block, list) and len(block) == 2
    if not ok or not all(isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in block):
        raise qc.fail(
            "weight_block_size", f"must be two positive integers, got {_shown.repr(block)}"
        )
    return method, (block[0], block[1])
