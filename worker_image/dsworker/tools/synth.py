"""`dsworker synth`: random but well-formed DeepSeek V2/V3 checkpoints in HuggingFace layout.

Tests and benchmarks need checkpoints of every flavour the sharder meets in the wild (BF16, FP8
block-quantised, MindIE W8A8, compressed-tensors W8A16, with and without the MTP layer) without
downloading hundreds of GB. These load in transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM
(BF16), carry a real tokenizer and several safetensors files with a correct index. Each tensor's
values depend only on (seed, tensor name), so the same seed gives the same weights whatever the
file split. Generation streams row chunks: memory stays bounded even for the multi-GB bench preset.
"""

from __future__ import annotations

import argparse
import json
import math
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from dsworker.chat.byte_level import BOS_ID, EOS_ID, MIN_VOCAB, write_tokenizer
from dsworker.checkpoint import number_formats
from dsworker.checkpoint.safetensors_io import SafetensorsWriter, TensorSpec
from dsworker.contract.errors import CheckpointError

FORMATS = ("bf16", "fp8", "w8a8", "w8a16")
PRESETS = ("tiny", "small", "bench")
W8A8_DESCRIPTION = "quant_model_description_w8a8_dynamic.json"
INIT_STD = 0.02

_V3_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV3ForCausalLM"],
    "model_type": "deepseek_v3",
    "topk_method": "noaux_tc",
    "scoring_func": "sigmoid",
    "norm_topk_prob": True,
    "routed_scaling_factor": 2.5,
}
_V2_COMMON: dict[str, Any] = {
    "architectures": ["DeepseekV2ForCausalLM"],
    "model_type": "deepseek_v2",
    "topk_method": "greedy",
    "scoring_func": "softmax",
    "norm_topk_prob": False,
    "routed_scaling_factor": 1.0,
    "q_lora_rank": None,
    "n_group": 1,
    "topk_group": 1,
}
_TINY: dict[str, Any] = {
    "vocab_size": 320,
    "hidden_size": 64,
    "intermediate_size": 128,
    "moe_intermediate_size": 32,
    "num_hidden_layers": 3,
    "first_k_dense_replace": 1,
    "n_routed_experts": 8,
    "n_shared_experts": 2,
    "num_experts_per_tok": 2,
    "n_group": 4,
    "topk_group": 2,
    "num_attention_heads": 8,
    "q_lora_rank": 48,
    "kv_lora_rank": 32,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 512,
    "rope_scaling": {
        "type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 128,
        "beta_fast": 32,
        "beta_slow": 1,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
    },
}
# FP8 shards must be whole 128-blocks on every split dim: tp up to 4 (q_b/kv_b rows and o_proj
# columns per rank = 2 heads * 64 = 128), moeTp up to 2, with edge blocks (q_lora 96, kv_lora 64).
_TINY_FP8: dict[str, Any] = {
    "hidden_size": 256,
    "intermediate_size": 512,
    "moe_intermediate_size": 256,
    "q_lora_rank": 96,
    "kv_lora_rank": 64,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
}
_SMALL: dict[str, Any] = {
    "vocab_size": 8192,
    "hidden_size": 512,
    "intermediate_size": 1024,
    "moe_intermediate_size": 256,
    "num_hidden_layers": 6,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_shared_experts": 2,
    "num_experts_per_tok": 4,
    "n_group": 4,
    "topk_group": 2,
    "num_attention_heads": 8,
    "q_lora_rank": 256,
    "kv_lora_rank": 128,
    "qk_nope_head_dim": 64,
    "qk_rope_head_dim": 64,
    "v_head_dim": 64,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}
# The "bench" config of BENCHMARKS.md (3.54 B parameters).
_BENCH: dict[str, Any] = {
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "moe_intermediate_size": 1408,
    "num_hidden_layers": 12,
    "first_k_dense_replace": 1,
    "n_routed_experts": 32,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "n_group": 8,
    "topk_group": 4,
    "num_attention_heads": 16,
    "q_lora_rank": 768,
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 4096,
    "rope_scaling": None,
}


def make_config(
    arch: str = "v3",
    preset: str = "tiny",
    fmt: str = "bf16",
    mtp: bool = False,
    overrides: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The config.json of a synthesized checkpoint (before quantization_config is added)."""
    if arch not in ("v2", "v3"):
        raise CheckpointError(f"unknown arch {arch!r}; use v2 or v3")
    if preset not in PRESETS:
        raise CheckpointError(f"unknown preset {preset!r}; use one of {', '.join(PRESETS)}")
    if fmt not in FORMATS:
        raise CheckpointError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")
    cfg: dict[str, Any] = {}
    cfg.update(_V3_COMMON if arch == "v3" else _V2_COMMON)
    cfg.update({"tiny": _TINY, "small": _SMALL, "bench": _BENCH}[preset])
    if arch == "v3" and preset == "bench":
        cfg["rope_scaling"] = None
    if fmt == "fp8" and preset == "tiny":
        cfg.update(_TINY_FP8)
    if arch == "v2":
        cfg["q_lora_rank"] = None
        cfg["n_group"] = cfg["topk_group"] = 1
        if cfg.get("rope_scaling"):
            cfg["rope_scaling"] = dict(cfg["rope_scaling"], mscale=0.707, mscale_all_dim=0.707)
    cfg.update(
        {
            "num_key_value_heads": cfg["num_attention_heads"],
            "num_nextn_predict_layers": 1 if mtp else 0,
            "moe_layer_freq": 1,
            "hidden_act": "silu",
            "initializer_range": INIT_STD,
            "rms_norm_eps": 1e-6,
            "rope_theta": 10000.0,
            "attention_bias": False,
            "attention_dropout": 0.0,
            "bos_token_id": BOS_ID,
            "eos_token_id": EOS_ID,
            "tie_word_embeddings": False,
            "use_cache": True,
            "torch_dtype": "bfloat16",
            "dtype": "bfloat16",
        }
    )
    if cfg.get("rope_scaling") is None:
        cfg.pop("rope_scaling", None)
    if overrides:
        cfg.update(overrides)
        if "num_attention_heads" in overrides and "num_key_value_heads" not in overrides:
            cfg["num_key_value_heads"] = cfg["num_attention_heads"]
    if cfg["vocab_size"] < MIN_VOCAB:
        raise CheckpointError(f"vocab_size must be >= {MIN_VOCAB} (the synthetic tokenizer's size)")
    return cfg


@dataclass(frozen=True)
class ModelTensor:
    """One logical tensor of the model before quantisation; kind says how to initialise it."""

    name: str
    shape: tuple[int, ...]
    kind: str  # embed | norm | linear | dense_linear (never quantised) | router | bias


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


def _out_specs(t: ModelTensor, fmt: str) -> list[TensorSpec]:
    """The stored tensors for one model tensor in a format (weight plus companions)."""
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


def _write_file(path: Path, tensors: list[ModelTensor], fmt: str, seed: int) -> list[TensorSpec]:
    specs: list[TensorSpec] = []
    owners: list[list[int]] = []
    for t in tensors:
        s = _out_specs(t, fmt)
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


def _quant_config(fmt: str) -> dict[str, Any] | None:
    if fmt == "fp8":
        return {
            "activation_scheme": "dynamic",
            "fmt": "e4m3",
            "quant_method": "fp8",
            "weight_block_size": [128, 128],
        }
    if fmt == "w8a16":
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "ignore": ["lm_head", "re:.*mlp.gate$"],
            "config_groups": {
                "group_0": {
                    "targets": ["Linear"],
                    "weights": {
                        "num_bits": 8,
                        "type": "int",
                        "symmetric": True,
                        "strategy": "channel",
                        "group_size": None,
                        "dynamic": False,
                    },
                    "input_activations": None,
                    "output_activations": None,
                }
            },
        }
    return None


def synthesize(
    out_dir: str | Path,
    arch: str = "v3",
    preset: str = "tiny",
    fmt: str = "bf16",
    mtp: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    max_file_bytes: int = 2 << 30,
) -> Path:
    """Write a random, well-formed HF checkpoint into out_dir and return its path.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    model-0000k-of-0000n.safetensors (at least 3 when the model has enough layers, split at layer
    boundaries), model.safetensors.index.json, and for w8a8 MindIE's quant description.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(arch, preset, fmt, mtp, overrides)
    qc = _quant_config(fmt)
    if qc:
        cfg["quantization_config"] = qc
    if fmt == "w8a8":
        cfg["quantize"] = "w8a8_dynamic"
    groups = model_tensors(cfg)

    def gbytes(g: list[ModelTensor]) -> int:
        return sum(s.nbytes for t in g for s in _out_specs(t, fmt))

    total = sum(gbytes(g) for g in groups)
    n_files = min(len(groups), max(3, math.ceil(total / max_file_bytes)))
    target = total / n_files
    files: list[list[ModelTensor]] = [[]]
    acc = 0.0
    for g in groups:
        if files[-1] and acc >= target * len(files) and len(files) < n_files:
            files.append([])
        files[-1].extend(g)
        acc += gbytes(g)
    weight_map: dict[str, str] = {}
    total_size = 0
    quant_desc: dict[str, Any] = {
        "model_quant_type": "W8A8_DYNAMIC",
        "version": "1.0.0",
        "group_size": 0,
    }
    for k, tensors in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        specs = _write_file(out / fname, tensors, fmt, seed)
        for s in specs:
            weight_map[s.name] = fname
            total_size += s.nbytes
            is_q = s.dtype == "I8" or s.name.endswith((".weight_scale", ".weight_offset"))
            quant_desc[s.name] = "W8A8_DYNAMIC" if is_q else "FLOAT"
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if fmt == "w8a8":
        (out / W8A8_DESCRIPTION).write_text(json.dumps(quant_desc, indent=2) + "\n")
    write_tokenizer(out, cfg["vocab_size"])
    return out


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "synth",
        help="write a random, well-formed DeepSeek checkpoint (HF layout)",
        description="Write a random but well-formed DeepSeek V2/V3 checkpoint for tests and benchmarks.",
    )
    p.add_argument("--arch", choices=("v2", "v3"), default="v3")
    p.add_argument("--preset", choices=PRESETS, default="tiny")
    p.add_argument("--config", default=None, help="JSON object overriding config.json fields")
    p.add_argument("--format", dest="fmt", choices=FORMATS, default="bf16")
    p.add_argument(
        "--mtp", action="store_true", help="include the MTP layer (num_nextn_predict_layers 1)"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-file-size", type=int, default=2 << 30, help="bytes per safetensors file")
    p.add_argument("--out", required=True, help="output directory")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    overrides = None
    if args.config:
        try:
            overrides = json.loads(args.config)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"--config is not valid JSON ({e}); pass a JSON object") from None
        if not isinstance(overrides, dict):
            raise CheckpointError(
                "--config must be a JSON object, e.g. '{\"num_hidden_layers\": 2}'"
            )
    out = synthesize(
        args.out,
        args.arch,
        args.preset,
        args.fmt,
        args.mtp,
        args.seed,
        overrides,
        args.max_file_size,
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"out": str(out), "bytes": size}))
    return 0
