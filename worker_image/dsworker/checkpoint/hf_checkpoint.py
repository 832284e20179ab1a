"""Opening and validating a HuggingFace-format DeepSeek checkpoint (config, index, safetensors headers).

Everything that can be wrong with a downloaded checkpoint is found here, before a single byte is
written: missing/truncated/corrupt files, index entries that point nowhere or outside the directory,
tensors that do not match config.json, a quantisation that config.json does not describe. Each
error names the file or tensor and the fix.
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import check_tensor_name, load_json, safe_join
from dsworker.checkpoint.regions import GlobalTensor, SourcePart
from dsworker.checkpoint.safetensors_io import SafetensorsReader
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ModelDims, PlanError, layer_index, split_name

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANTIZATIONS = ("bf16", "fp8", "w8a8", "w8a16")
# dtypes an FP8 weight_scale_inv may have (DeepSeek ships F32); decoded by quant.float_to_f32
FLOAT_SCALE_DTYPES = ("F32", "BF16", "F16")
# The small files copied next to the weights (SHARDED_FORMAT.md): config, generation settings,
# tokenizer, chat template, MindIE quant descriptions. An allow-list: pickled weights
# (pytorch_model.bin), remote code and READMEs stay behind.
AUX_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "tokenizer.model",
    "special_tokens_map.json",
    "chat_template.jinja",
)
_AUX_PATTERN = re.compile(r"^quant_model_description[A-Za-z0-9_.\-]*\.json$")


def is_aux_file(name: str) -> bool:
    """Whether a top-level file of a checkpoint travels with the weights."""
    return name in AUX_FILES or bool(_AUX_PATTERN.match(name))


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while b := f.read(1 << 20):
            h.update(b)
    return h.hexdigest()


@dataclass
class HFCheckpoint:
    """A validated HF checkpoint: its config, its tensors (by name, in file order) and aux files."""

    root: Path
    config: dict[str, Any]
    dims: ModelDims
    tensors: dict[str, GlobalTensor]
    files: list[str]
    index_sha256: str | None
    config_sha256: str
    quantization: str
    aux_files: list[str]

    @property
    def has_mtp(self) -> bool:
        return any(_is_mtp_name(n, self.dims) for n in self.tensors)

    @property
    def total_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


def _is_mtp_name(name: str, dims: ModelDims) -> bool:
    i = layer_index(name)
    return i is not None and i >= dims.num_hidden_layers


def open_checkpoint(path: str | Path) -> HFCheckpoint:
    """Read config.json, the index and every safetensors header; validate them against each other."""
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"{root}: model path does not exist or is not a directory")
    cfg_path = root / "config.json"
    config = load_json(cfg_path, "config.json")
    if not isinstance(config, dict):
        raise CheckpointError(f"{cfg_path}: config.json is not a JSON object")
    try:
        dims = ModelDims.from_config(config)
    except PlanError as e:
        raise CheckpointError(f"{cfg_path}: {e}") from None
    index_path = root / INDEX_FILE
    index_sha = None
    if index_path.exists():
        index = load_json(index_path, INDEX_FILE)
        wm = index.get("weight_map") if isinstance(index, dict) else None
        if not isinstance(wm, dict) or not wm:
            raise CheckpointError(f"{index_path}: no weight_map object; re-download the index")
        index_sha = sha256_file(index_path)
        weight_map: dict[str, str] = {}
        for name, fname in wm.items():
            check_tensor_name(name, f"{index_path} weight_map")
            safe_join(root, fname, f"{index_path} weight_map[{name!r}]")
            weight_map[name] = fname
        files = list(dict.fromkeys(weight_map.values()))
    else:
        files = sorted(p.name for p in root.glob("*.safetensors"))
        if not files:
            raise CheckpointError(
                f"{root}: no {INDEX_FILE} and no *.safetensors files; point --model-path at a "
                "HuggingFace checkpoint directory"
            )
        if len(files) > 1:
            raise CheckpointError(
                f"{root}: {len(files)} safetensors files but no {INDEX_FILE}; restore the index"
            )
        weight_map = {}
    tensors: dict[str, GlobalTensor] = {}
    order = 0
    for fname in files:
        fpath = root / fname
        if not fpath.exists():
            listed = next(n for n, f in weight_map.items() if f == fname)
            raise CheckpointError(
                f"{fpath}: missing, but {INDEX_FILE} lists it (e.g. for {listed}); "
                "download the missing file"
            )
        with SafetensorsReader(fpath) as r:
            infos = r.tensors
        for name, t in infos.items():
            check_tensor_name(name, str(fpath))
            if weight_map and weight_map.get(name) != fname:
                where = weight_map.get(name)
                raise CheckpointError(
                    f"{fpath}: holds tensor {name} which {INDEX_FILE} "
                    + (f"places in {where}" if where else "does not list")
                    + "; re-download the checkpoint or regenerate the index"
                )
            if name in tensors:
                raise CheckpointError(
                    f"{fpath}: tensor {name} appears in two files; fix the checkpoint"
                )
            tensors[name] = GlobalTensor(
                name=name,
                dtype=t.dtype,
                shape=t.shape,
                parts=[SourcePart(str(fpath), name, None, 0, t.shape[0] if t.shape else 0)],
                source_file=fname,
                order=order,
            )
            order += 1
    for name, fname in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{root / fname}: tensor {name} is listed in {INDEX_FILE} but absent from {fname}; "
                "re-download that file or fix the index"
            )
    quantization = detect_quantization(config, tensors, root)
    for t in tensors.values():
        if t.name.endswith(".weight_shape") and t.dtype in ("I64", "I32") and t.shape == (2,):
            with SafetensorsReader(t.parts[0].path) as r:
                t.value = [int(v) for v in r.array(t.name).tolist()]
    check_shapes(config, dims, tensors, cfg_path)
    check_complete(config, dims, tensors, cfg_path, "re-download the files that hold them")
    aux = sorted(p.name for p in root.iterdir() if is_aux_file(p.name) and p.is_file())
    return HFCheckpoint(
        root=root,
        config=config,
        dims=dims,
        tensors=tensors,
        files=files,
        index_sha256=index_sha,
        config_sha256=sha256_file(cfg_path),
        quantization=quantization,
        aux_files=aux,
    )


def detect_quantization(
    config: dict[str, Any], tensors: dict[str, GlobalTensor], root: Path
) -> str:
    """bf16 | fp8 | w8a8 | w8a16, from the tensors, cross-checked with config.json."""
    has_fp8 = any(t.dtype == "F8_E4M3" for t in tensors.values())
    has_packed = any(n.endswith(".weight_packed") for n in tensors)
    has_int8 = any(t.dtype == "I8" and n.endswith(".weight") for n, t in tensors.items())
    qc = config.get("quantization_config") or {}
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    cfg = root / "config.json"
    if has_fp8:
        if method != "fp8":
            raise CheckpointError(
                f"{cfg}: tensors are float8 but quantization_config.quant_method is {method!r}; "
                "restore the checkpoint's quantization_config (quant_method fp8)"
            )
        for n, t in tensors.items():
            if t.dtype == "F8_E4M3":
                base, _ = split_name(n)
                if f"{base}.weight_scale_inv" not in tensors:
                    raise CheckpointError(
                        f"{t.source_file}: FP8 tensor {n} has no {base}.weight_scale_inv; "
                        "the checkpoint is incomplete - re-download it"
                    )
        return "fp8"
    if method == "fp8":
        raise CheckpointError(
            f"{cfg}: quantization_config says fp8 but no tensor is float8; remove "
            "quantization_config or use the FP8 weights"
        )
    if has_packed:
        if method != "compressed-tensors":
            raise CheckpointError(
                f"{cfg}: weight_packed tensors but quantization_config.quant_method is {method!r}; "
                "restore quantization_config (compressed-tensors)"
            )
        return "w8a16"
    if has_int8:
        return "w8a8"
    return "bf16"


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


def expected_shape(
    name: str, c: dict[str, Any], dims: ModelDims
) -> tuple[tuple[int, ...], str] | None:
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
        elif sm and layer < dims.first_k_dense_replace:
            formula = _mlp_shape(sm.group(2), "intermediate_size")
    if formula is None:
        return None
    env = {k: v for k, v in c.items() if isinstance(v, int) and not isinstance(v, bool)}
    try:
        shape = tuple(int(eval(f, {"__builtins__": {}}, env)) for f in formula)
    except (NameError, TypeError):
        return None
    return shape, "[" + ", ".join(formula) + "]"


def check_shapes(
    config: dict[str, Any], dims: ModelDims, tensors: dict[str, GlobalTensor], cfg_path: Path
) -> None:
    """Every known weight must have the shape config.json implies, every layer/expert index exist."""
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
        exp = expected_shape(probe, config, dims)
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


def expected_modules(
    config: dict[str, Any], dims: ModelDims, layers: list[int]
) -> list[tuple[str, bool]]:
    """(name, is_linear) for every module config.json implies, main model plus extra (MTP) layers.

    A non-linear name (norms, router, its bias, embeddings) must be stored exactly so; a linear
    module's weight may be stored quantised under any of `_WEIGHT_NAMES`. Mirrors DeepseekV2/V3:
    dense MLP below first_k_dense_replace (and off the moe_layer_freq grid), router + routed experts
    + optional shared experts elsewhere, e_score_correction_bias with noaux_tc routing, q_a/q_b with
    q_lora_rank else q_proj, and for MTP layers their embed/enorm/hnorm/eh_proj/shared_head.
    """
    exact: list[str] = ["model.embed_tokens.weight", "model.norm.weight"]
    linear: list[str] = [] if config.get("tie_word_embeddings") else ["lm_head"]
    out = [(n, False) for n in exact] + [(n, True) for n in linear]
    freq = config.get("moe_layer_freq")
    freq = freq if isinstance(freq, int) and freq > 0 else 1
    projs = ("gate_proj", "up_proj", "down_proj")
    for i in [*range(dims.num_hidden_layers), *layers]:
        p, a = f"model.layers.{i}", f"model.layers.{i}.self_attn"
        exact = [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
        exact.append(f"{a}.kv_a_layernorm.weight")
        linear = [f"{a}.kv_a_proj_with_mqa", f"{a}.kv_b_proj", f"{a}.o_proj"]
        if config.get("q_lora_rank"):
            exact.append(f"{a}.q_a_layernorm.weight")
            linear += [f"{a}.q_a_proj", f"{a}.q_b_proj"]
        else:
            linear.append(f"{a}.q_proj")
        if i >= dims.first_k_dense_replace and i % freq == 0:
            exact.append(f"{p}.mlp.gate.weight")
            if config.get("topk_method") == "noaux_tc":
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


def missing_tensors(
    config: dict[str, Any], dims: ModelDims, tensors: Mapping[str, Any]
) -> list[str]:
    """Names config.json implies that `tensors` lacks, plus quantisation companions that are missing.

    An MTP layer may be absent as a whole (many re-saved checkpoints drop it; sharding with --mtp
    then says so), but a present one must be complete.
    """
    first_mtp = dims.num_hidden_layers
    present = {layer_index(n) for n in tensors}
    mtp_layers = [
        i for i in range(first_mtp, first_mtp + dims.num_nextn_predict_layers) if i in present
    ]
    missing = []
    for m, is_linear in expected_modules(config, dims, mtp_layers):
        if not is_linear:
            if m not in tensors:
                missing.append(m)
        elif not any(f"{m}.{w}" in tensors for w in _WEIGHT_NAMES):
            missing.append(f"{m}.weight")
    for name, t in tensors.items():
        module, suffix = split_name(name)
        has_weight = any(f"{module}.{w}" in tensors for w in _WEIGHT_NAMES)
        if suffix in ("weight_scale_inv", "weight_scale", "weight_offset") and not has_weight:
            missing.append(f"{module}.weight")  # a companion without its weight
        int_weight = (suffix == "weight" and getattr(t, "dtype", None) == "I8") or (
            suffix == "weight_packed"
        )
        if int_weight and f"{module}.weight_scale" not in tensors:
            missing.append(f"{module}.weight_scale")
    return list(dict.fromkeys(missing))


def check_complete(
    config: dict[str, Any],
    dims: ModelDims,
    tensors: Mapping[str, Any],
    where: Path | str,
    fix: str,
) -> None:
    """Refuse a checkpoint that lacks tensors config.json implies, naming them (not at load time)."""
    missing = missing_tensors(config, dims, tensors)
    if missing:
        shown = ", ".join(missing[:8]) + (
            f" (+{len(missing) - 8} more)" if len(missing) > 8 else ""
        )
        raise CheckpointError(
            f"{where}: config.json implies {len(missing)} tensor(s) that are missing: {shown}; "
            f"{fix}, or fix config.json if it does not belong to these weights"
        )
