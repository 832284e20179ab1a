"""`dsworker synth`: random but well-formed DeepSeek V2/V3 checkpoints in HuggingFace layout.

Tests and benchmarks need checkpoints of every flavour the sharder meets in the wild (BF16, FP8
block-quantised, MindIE W8A8, compressed-tensors W8A16, with and without the MTP layer) without
downloading hundreds of GB. These load in transformers' DeepseekV3ForCausalLM / DeepseekV2ForCausalLM
(BF16), carry a real tokenizer and several safetensors files with a correct index. The config comes
from tools.synth_presets, the weights from tools.synth_tensors.
"""

from __future__ import annotations

import argparse
import json
import math
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from dsworker.chat.byte_level import BOS_ID, EOS_ID, write_tokenizer
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import split_name
from dsworker.contract.precision import matching, module_precision
from dsworker.tools.synth_presets import FORMATS, PRESETS, make_config, quant_config
from dsworker.tools.synth_tensors import ModelTensor, model_tensors, out_specs, write_file

W8A8_DESCRIPTION = "quant_model_description_w8a8_dynamic.json"


def synthesize(
    out_dir: str | Path,
    arch: str = "v3",
    preset: str = "tiny",
    fmt: str = "bf16",
    mtp: bool = False,
    seed: int = 0,
    overrides: dict[str, Any] | None = None,
    max_file_bytes: int = 2 << 30,
    keep_float: Sequence[str] = (),
    static: Sequence[str] = (),
) -> Path:
    """Write a random, well-formed HF checkpoint into out_dir and return its path.

    Files: config.json, generation_config.json, tokenizer.json, tokenizer_config.json,
    model-0000k-of-0000n.safetensors (at least 3 when the model has enough layers, split at layer
    boundaries), model.safetensors.index.json, and for w8a8 MindIE's quant description.
    `keep_float`: linear modules left in BF16, declared as the format's own tools declare them
    (see _declare_float). `static` (w8a8): the attention projections (names or `re:` regexes)
    written as msModelSlim's static "W8A8", the rest stays "W8A8_DYNAMIC" (its DeepSeek mix).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    cfg = make_config(arch, preset, fmt, mtp, overrides)
    qc = quant_config(fmt)
    if qc:
        cfg["quantization_config"] = qc
    if fmt == "w8a8":
        cfg["quantize"] = "w8a8_dynamic"
    groups = _declare_float(cfg, fmt, list(keep_float), model_tensors(cfg))
    groups = _declare_static(fmt, list(static), groups)

    def gbytes(g: list[ModelTensor]) -> int:
        return sum(s.nbytes for t in g for s in out_specs(t, fmt))

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
    static_modules = {
        t.name[: -len(".weight")] for g in groups for t in g if t.kind == "static_linear"
    }
    total_size = 0
    quant_desc: dict[str, Any] = {
        "model_quant_type": "W8A8_DYNAMIC",
        "version": "1.0.0",
        "group_size": 0,
    }
    for k, tensors in enumerate(files):
        fname = f"model-{k + 1:05d}-of-{len(files):05d}.safetensors"
        specs = write_file(out / fname, tensors, fmt, seed)
        for s in specs:
            weight_map[s.name] = fname
            total_size += s.nbytes
            is_q = s.dtype == "I8" or s.name.endswith((".weight_scale", ".weight_offset"))
            quant_desc[s.name] = "W8A8_DYNAMIC" if is_q else "FLOAT"
            if split_name(s.name)[0] in static_modules:
                quant_desc[s.name] = "W8A8"
                quant_desc["model_quant_type"] = "W8A8"  # msModelSlim: the highest type present
    index = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    gen = {"bos_token_id": BOS_ID, "eos_token_id": EOS_ID, "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")
    if fmt == "w8a8":
        (out / W8A8_DESCRIPTION).write_text(json.dumps(quant_desc, indent=2) + "\n")
    write_tokenizer(out, cfg["vocab_size"])
    return out


def _declare_float(
    cfg: dict[str, Any], fmt: str, keep: list[str], groups: list[list[ModelTensor]]
) -> list[list[ModelTensor]]:
    """The tensors with the linear modules `keep` names left in BF16, declared in config.json.

    fp8: `keep` becomes quantization_config.modules_to_not_convert (transformers' rule: a name, a
    parent module, a suffix); w8a16: it joins compressed-tensors' `ignore` (exact names, `re:`);
    w8a8: the modules it names (as `ignore` would) become "FLOAT" in msModelSlim's description.
    Which modules end up in BF16 is then contract.precision's decision on what was written.
    """
    if not keep:
        return groups
    if fmt == "bf16":
        raise CheckpointError("--keep-float needs a quantised --format (fp8, w8a8, w8a16)")
    linears = [t.name[: -len(".weight")] for g in groups for t in g if t.kind == "linear"]
    qc = cfg.get("quantization_config") or {}
    if fmt == "fp8":
        qc["modules_to_not_convert"] = keep
    elif fmt == "w8a16":
        qc["ignore"] = [*qc.get("ignore", []), *keep]
    if fmt == "w8a8":
        floats = set(matching(keep, linears))
    else:
        prec = module_precision(cfg)
        floats = {m for m in linears if not prec.quantised(m)}
    if not floats:
        raise CheckpointError(f"--keep-float {keep}: names none of the model's linear modules")
    return [
        [replace(t, kind="dense_linear") if t.name[: -len(".weight")] in floats else t for t in g]
        for g in groups
    ]


def _declare_static(
    fmt: str, static: list[str], groups: list[list[ModelTensor]]
) -> list[list[ModelTensor]]:
    """The attention projections `static` names (and not kept in BF16) as static W8A8 tensors."""
    if not static:
        return groups
    if fmt != "w8a8":
        raise CheckpointError("--w8a8-static needs --format w8a8")
    linears = [t.name[: -len(".weight")] for g in groups for t in g if t.kind == "linear"]
    chosen = set(matching(static, linears))
    if not chosen or any(".self_attn." not in m for m in chosen):
        raise CheckpointError(
            f"--w8a8-static {static}: must name attention projections (self_attn.*) only, "
            f"named {sorted(chosen)[:4]}"
        )
    return [
        [replace(t, kind="static_linear") if t.name[: -len(".weight")] in chosen else t for t in g]
        for g in groups
    ]


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
    p.add_argument(
        "--keep-float",
        action="append",
        default=[],
        metavar="PATTERN",
        help="leave these linear modules in BF16 and declare them so (repeatable; fp8: a "
        "modules_to_not_convert entry, w8a16/w8a8: a module name or 're:' regex)",
    )
    p.add_argument(
        "--w8a8-static",
        action="append",
        default=[],
        metavar="PATTERN",
        help='with --format w8a8: write these attention projections as static W8A8 ("W8A8" '
        "in the description, a module name or 're:' regex; repeatable), as msModelSlim's "
        "DeepSeek mix does",
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
        args.keep_float,
        args.w8a8_static,
    )
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    print(json.dumps({"out": str(out), "bytes": size}))
    return 0
