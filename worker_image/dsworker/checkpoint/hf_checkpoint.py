"""Opening and validating a HuggingFace-format DeepSeek checkpoint (config, index, safetensors headers).

Everything that can be wrong with a downloaded checkpoint is found here, before a single byte is
written: missing/truncated/corrupt files, index entries that point nowhere or outside the directory,
tensors that do not match config.json, a quantisation that config.json does not describe. Each
error names the file or tensor and the fix.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import (
    check_tensor_name,
    load_json,
    member_file,
    read_regular,
    safe_join,
    sha256_file,
)
from dsworker.checkpoint.implied_tensors import check_complete, check_shapes
from dsworker.checkpoint.quant_description import (
    DESCRIPTION_PATTERN,
    check_declared,
    read_precision,
)
from dsworker.checkpoint.regions import GlobalTensor, SourcePart
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.contract.errors import SOURCE_MISSING, CheckpointError
from dsworker.contract.layout import ModelDims, layer_index, split_name
from dsworker.contract.model_config import ModelConfig, parse_model_config

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
QUANTIZATIONS = ("bf16", "fp8", "w8a8", "w8a16")
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


def is_aux_file(name: str) -> bool:
    """Whether a top-level file of a checkpoint travels with the weights."""
    return name in AUX_FILES or bool(DESCRIPTION_PATTERN.match(name))


def read_model_config(root: Path) -> ModelConfig:
    """The validated config.json of a model directory (HF checkpoint or sharded layout).

    A missing directory or config.json is SourceMissing (a volume not mounted or not populated);
    a malformed one a ModelConfigError naming the key.
    """
    path = root / "config.json"
    if not root.is_dir():
        raise CheckpointError(
            f"{root}: model path does not exist or is not a directory", reason=SOURCE_MISSING
        )
    if not path.exists() and not path.is_symlink():
        raise CheckpointError(
            f"{path}: not found; {root} holds no model (is the volume populated?)",
            reason=SOURCE_MISSING,
        )
    raw = read_regular(member_file(root, "config.json", "config.json"), "config.json")
    return parse_model_config(raw, str(path))


@dataclass
class HFCheckpoint:
    """A validated HF checkpoint: its config, its tensors (by name, in file order) and aux files."""

    root: Path
    model: ModelConfig
    tensors: dict[str, GlobalTensor]
    files: list[str]
    index_sha256: str | None
    config_sha256: str
    quantization: str
    aux_files: list[str]

    @property
    def config(self) -> dict[str, Any]:
        return self.model.raw

    @cached_property
    def dims(self) -> ModelDims:
        return self.model.dims

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
    model = read_model_config(root)
    cfg_path = root / "config.json"
    weight_map, index_sha = _read_index(root)
    files = list(dict.fromkeys(weight_map.values())) if weight_map else _lone_file(root)
    tensors = _read_tensors(root, files, weight_map)
    quantization = detect_quantization(model, tensors, root)
    check_declared(read_precision(root, model), tensors, cfg_path)
    for t in tensors.values():
        if t.name.endswith(".weight_shape") and t.dtype in ("I64", "I32") and t.shape == (2,):
            with SafetensorsReader(t.parts[0].path) as r:
                t.value = [int(v) for v in r.array(t.name).tolist()]
    check_shapes(model, tensors, cfg_path)
    check_complete(model, tensors, cfg_path, "re-download the files that hold them")
    return HFCheckpoint(
        root=root,
        model=model,
        tensors=tensors,
        files=files,
        index_sha256=index_sha,
        config_sha256=sha256_file(cfg_path),
        quantization=quantization,
        aux_files=_side_files(root),
    )


def _side_files(root: Path) -> list[str]:
    """The aux files of the checkpoint, each a regular file inside it (they are copied into the
    store, so a link out of the directory or a FIFO is refused, never followed or waited on)."""
    names = sorted(p.name for p in root.iterdir() if is_aux_file(p.name))
    for name in names:
        member_file(root, name, "side file")
    return names


def _read_index(root: Path) -> tuple[dict[str, str], str | None]:
    """The index's weight_map (names and file names checked) and its sha256; empty without one."""
    weight_map = read_weight_map(root)
    return weight_map, sha256_file(root / INDEX_FILE) if weight_map else None


def read_weight_map(root: Path) -> dict[str, str]:
    """The index's weight_map, tensor name -> file name, both checked; {} without an index.
    The index is read only as a regular file inside `root`, as strict JSON."""
    index_path = root / INDEX_FILE
    if not index_path.exists() and not index_path.is_symlink():
        return {}
    index = load_json(member_file(root, INDEX_FILE, INDEX_FILE), INDEX_FILE)
    wm = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(wm, dict) or not wm:
        raise CheckpointError(f"{index_path}: no weight_map object; re-download the index")
    weight_map: dict[str, str] = {}
    for name, fname in wm.items():
        check_tensor_name(name, f"{index_path} weight_map")
        safe_join(root, fname, f"{index_path} weight_map[{name!r}]")
        weight_map[name] = fname
    return weight_map


def _lone_file(root: Path) -> list[str]:
    """Without an index: the one safetensors file of the directory."""
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
    return files


def _read_tensors(
    root: Path, files: list[str], weight_map: dict[str, str]
) -> dict[str, GlobalTensor]:
    """Every tensor of every file's header, checked against the index (both ways)."""
    tensors: dict[str, GlobalTensor] = {}
    for fname in files:
        fpath = root / fname
        if not fpath.exists() and not fpath.is_symlink():
            listed = next(n for n, f in weight_map.items() if f == fname)
            raise CheckpointError(
                f"{fpath}: missing, but {INDEX_FILE} lists it (e.g. for {listed}); "
                "download the missing file"
            )
        with SafetensorsReader(member_file(root, fname, "safetensors file")) as r:
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
                order=len(tensors),
            )
    for name, fname in weight_map.items():
        if name not in tensors:
            raise CheckpointError(
                f"{root / fname}: tensor {name} is listed in {INDEX_FILE} but absent from {fname}; "
                "re-download that file or fix the index"
            )
    return tensors


def detect_quantization(model: ModelConfig, tensors: dict[str, GlobalTensor], root: Path) -> str:
    """bf16 | fp8 | w8a8 | w8a16, from the tensors, cross-checked with config.json."""
    has_fp8 = any(t.dtype == "F8_E4M3" for t in tensors.values())
    has_packed = any(n.endswith(".weight_packed") for n in tensors)
    has_int8 = any(t.dtype == "I8" and n.endswith(".weight") for n, t in tensors.items())
    method = model.quant_method
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
