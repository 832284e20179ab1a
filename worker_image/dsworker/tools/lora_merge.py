"""`dsworker lora-merge`: fold a PEFT LoRA adapter into a checkpoint's weights.

Serving a fine-tune should not need LoRA kernels: W' = W + (lora_alpha / r) * B @ A (alpha/sqrt(r)
with use_rslora) is computed in float32 per row chunk and rounded once to the weight's dtype. An FP8
base weight that the adapter touches is dequantised to BF16 first and loses its weight_scale_inv;
config.json then lists that module in quantization_config.modules_to_not_convert so FP8 loaders
keep it in BF16. Untouched tensors are copied byte for byte. Works on HF checkpoints and on
sharded layouts (slice by slice, same plan, new fingerprint; never the full model in memory).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import (
    check_tensor_name,
    copy_file_atomic,
    load_json,
    sha256_file,
    write_bytes_atomic,
    write_json_atomic,
)
from dsworker.checkpoint.hf_checkpoint import INDEX_FILE, HFCheckpoint, open_checkpoint
from dsworker.checkpoint.planned_files import OutEntry, OutFile
from dsworker.checkpoint.progress import emit_summary, summary
from dsworker.checkpoint.regions import GlobalTensor, SourcePart, region
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.writer_processes import run_jobs
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import METADATA_FILE, split_name
from dsworker.tools.layout_options import LayoutOptions
from dsworker.tools.layout_writer import write_layout
from dsworker.tools.sharded_source import open_sharded

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
_LORA = re.compile(
    r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[A-Za-z0-9_\-]+)?\.weight$"
)


@dataclass(frozen=True)
class LoraPair:
    module: str
    a: GlobalTensor  # [r, in]
    b: GlobalTensor  # [out, r]
    scale: float


def _pattern_value(patterns: dict[str, Any], module: str, default: Any) -> Any:
    """PEFT's rank_pattern/alpha_pattern: the first key that matches the end of the module name."""
    for key, val in (patterns or {}).items():
        if re.search(rf"(^|\.){key}$", module) or re.fullmatch(key, module):
            return val
    return default


def read_adapter(adapter_dir: str | Path) -> list[LoraPair]:
    """Parse a PEFT adapter directory into (module, A, B, scale) pairs; refuse what we cannot merge."""
    root = Path(adapter_dir)
    cfg = load_json(root / ADAPTER_CONFIG, ADAPTER_CONFIG)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{root / ADAPTER_CONFIG}: not a JSON object")
    if cfg.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(
            f"{root / ADAPTER_CONFIG}: peft_type {cfg.get('peft_type')!r} is not LORA"
        )
    if cfg.get("fan_in_fan_out"):
        raise CheckpointError(f"{root / ADAPTER_CONFIG}: fan_in_fan_out adapters are not supported")
    if cfg.get("use_dora"):
        raise CheckpointError(f"{root / ADAPTER_CONFIG}: DoRA adapters are not supported")
    r_cfg, alpha_cfg = cfg.get("r"), cfg.get("lora_alpha")
    if not isinstance(r_cfg, int) or r_cfg <= 0 or not isinstance(alpha_cfg, (int, float)):
        raise CheckpointError(
            f"{root / ADAPTER_CONFIG}: needs positive integer r and numeric lora_alpha"
        )
    wpath = root / ADAPTER_WEIGHTS
    if not wpath.exists() and (root / "adapter_model.bin").exists():
        raise CheckpointError(
            f"{root}: adapter_model.bin (pickle) is not supported; save it as safetensors"
        )
    with SafetensorsReader(wpath) as rd:
        infos = dict(rd.tensors)
    halves: dict[str, dict[str, GlobalTensor]] = {}
    for name, t in infos.items():
        check_tensor_name(name, str(wpath))
        m = _LORA.match(name)
        if not m:
            raise CheckpointError(
                f"{wpath}: tensor {name} is not a LoRA A/B weight (modules_to_save, embeddings or "
                "magnitudes cannot be merged); remove it from the adapter"
            )
        gt = GlobalTensor(
            name, t.dtype, t.shape, [SourcePart(str(wpath), name, None, 0, t.shape[0])]
        )
        halves.setdefault(m.group("module"), {})[m.group("ab")] = gt
    pairs = []
    for module, ab in sorted(halves.items()):
        if set(ab) != {"A", "B"}:
            raise CheckpointError(
                f"{wpath}: module {module} has lora_{''.join(ab)} but not both A and B"
            )
        a, b = ab["A"], ab["B"]
        if len(a.shape) != 2 or len(b.shape) != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(
                f"{wpath}: {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} do not form B @ A"
            )
        rank = a.shape[0]
        alpha = float(_pattern_value(cfg.get("alpha_pattern") or {}, module, alpha_cfg))
        scale = alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank
        pairs.append(LoraPair(module, a, b, scale))
    if not pairs:
        raise CheckpointError(f"{wpath}: no LoRA weights found")
    return pairs


def lora_merge(
    base: str | Path, adapter: str | Path, out: str | Path, processes: int = 1
) -> dict[str, Any]:
    """Write base + adapter as a new HF checkpoint in `out` (must be empty or new)."""
    t0 = time.monotonic()
    base = Path(base)
    if (base / METADATA_FILE).exists():
        return _lora_merge_sharded(base, Path(adapter), Path(out), processes)
    ck = open_checkpoint(base)
    if ck.quantization in ("w8a8", "w8a16"):
        raise CheckpointError(
            f"{base}: LoRA cannot be merged into {ck.quantization} integer weights; merge into the "
            "BF16 (or FP8) checkpoint, then quantise"
        )
    pairs = read_adapter(adapter)
    dst = Path(out)
    if dst.exists() and (not dst.is_dir() or any(dst.iterdir())):
        raise CheckpointError(f"{dst}: exists and is not an empty directory; choose a new --out")
    touched = _match(pairs, ck.tensors, Path(adapter))
    jobs, dropped = _plan(ck, touched)
    dst.mkdir(parents=True, exist_ok=True)
    results = run_jobs(jobs, dst, processes, False, "lora-merge")
    weight_map = {e.name: j.relpath for j in jobs for e in j.entries}
    total = sum(e.nbytes for j in jobs for e in j.entries)
    if ck.index_sha256 is not None:
        write_json_atomic(
            dst / INDEX_FILE, {"metadata": {"total_size": total}, "weight_map": weight_map}
        )
    cfg = _with_not_converted(ck.config, dropped)
    write_bytes_atomic(dst / "config.json", (json.dumps(cfg, indent=2) + "\n").encode())
    for name in ck.aux_files:
        if name != "config.json":
            copy_file_atomic(base / name, dst / name)
    return summary(
        sum(r.bytes for r in results),
        len(results),
        time.monotonic() - t0,
        outputDir=str(dst),
        mergedModules=len(touched),
    )


def _match(
    pairs: list[LoraPair], tensors: dict[str, GlobalTensor], adapter: Path
) -> dict[str, LoraPair]:
    """Base weight name -> its LoRA pair, refusing adapters that do not fit the base."""
    touched: dict[str, LoraPair] = {}
    for p in pairs:
        wname = f"{p.module}.weight"
        w = tensors.get(wname)
        if w is None:
            raise CheckpointError(
                f"{adapter}: adapter targets {p.module} but the base has no {wname}"
            )
        if len(w.shape) != 2 or (w.shape[0], w.shape[1]) != (p.b.shape[0], p.a.shape[1]):
            raise CheckpointError(
                f"{adapter}: {p.module}: B @ A is [{p.b.shape[0]}, {p.a.shape[1]}] but {wname} is "
                f"{list(w.shape)}; the adapter was trained for another model"
            )
        touched[wname] = p
    return touched


def _with_not_converted(cfg: dict[str, Any], fp8_touched: list[str]) -> dict[str, Any]:
    """config.json with the modules whose FP8 weights became BF16 listed as not converted."""
    cfg = dict(cfg)
    if fp8_touched:
        qc = dict(cfg.get("quantization_config") or {})
        keep = list(qc.get("modules_to_not_convert") or [])
        qc["modules_to_not_convert"] = keep + sorted(split_name(n)[0] for n in fp8_touched)
        cfg["quantization_config"] = qc
    return cfg


def _adapter_sha(adapter: Path) -> str:
    h = hashlib.sha256()
    for name in (ADAPTER_CONFIG, ADAPTER_WEIGHTS):
        h.update(sha256_file(adapter / name).encode())
    return h.hexdigest()


def _lora_merge_sharded(base: Path, adapter: Path, out: Path, processes: int) -> dict[str, Any]:
    """Fold the adapter into a sharded layout slice by slice, keeping its plan (no full model)."""
    md, src = open_sharded(base)
    if src.quantization in ("w8a8", "w8a16"):
        raise CheckpointError(
            f"{base}: LoRA cannot be merged into {src.quantization} integer weights; merge into the "
            "BF16 (or FP8) layout, then quantise"
        )
    touched = _match(read_adapter(adapter), src.tensors, adapter)
    fp8_touched = sorted(n for n in touched if src.tensors[n].dtype == "F8_E4M3")
    src.lora = {n: (p.a, p.b, p.scale) for n, p in touched.items()}
    src.config = _with_not_converted(src.config, fp8_touched)
    # Kept in the metadata (source.fingerprintSalt): merging twice or resharding keeps it.
    salt = "lora:" + _adapter_sha(adapter)
    src.fingerprint_salt = f"{src.fingerprint_salt}+{salt}" if src.fingerprint_salt else salt
    plan = md.parallel_plan()
    options = LayoutOptions(mtp=bool(md.plan.get("mtp")), processes=processes)
    res = write_layout(src, out, plan, options, what="lora-merge")
    res["mergedModules"] = len(touched)
    return res


def _plan(ck: HFCheckpoint, touched: dict[str, LoraPair]) -> tuple[list[OutFile], list[str]]:
    files: dict[str, OutFile] = {f: OutFile(f) for f in ck.files}
    fp8_touched = {n for n in touched if ck.tensors[n].dtype == "F8_E4M3"}
    drop = {f"{split_name(n)[0]}.weight_scale_inv" for n in fp8_touched}
    block = ck.dims.fp8_block or (128, 128)
    for gt in sorted(ck.tensors.values(), key=lambda t: t.order):
        if gt.name in drop:
            continue
        e = OutEntry(gt.name, gt.dtype, gt.shape, region(gt, None), global_shape=gt.shape)
        if gt.value is not None and gt.name.endswith(".weight_shape"):
            e.region = None
            e.const = b"".join(int(v).to_bytes(8, "little", signed=True) for v in gt.value)
        p = touched.get(gt.name)
        if p is not None:
            e.lora = (region(p.a, None), region(p.b, None), p.scale)
            if gt.name in fp8_touched:
                e.dtype, e.block = "BF16", block
                e.scale = region(ck.tensors[f"{split_name(gt.name)[0]}.weight_scale_inv"], None)
            elif gt.dtype not in ("BF16", "F16", "F32"):
                raise CheckpointError(
                    f"{gt.source_file}: {gt.name} is {gt.dtype}; LoRA needs float weights"
                )
        assert gt.source_file is not None
        files[gt.source_file].entries.append(e)
    return [f for f in files.values() if f.entries], sorted(fp8_touched)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "lora-merge",
        help="merge a PEFT LoRA adapter into base weights",
        description="Merge a PEFT LoRA adapter into a HuggingFace checkpoint: W += (alpha/r) B @ A.",
    )
    p.add_argument("--base", required=True, help="HF checkpoint directory")
    p.add_argument("--adapter", required=True, help="PEFT adapter directory")
    p.add_argument("--out", required=True, help="output directory (new or empty)")
    p.add_argument("--processes", type=int, default=1)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    emit_summary(lora_merge(args.base, args.adapter, args.out, args.processes))
    return 0
