"""Opening a sharded layout as a source of whole tensors (for merge and reshard).

Each global tensor becomes a `GlobalTensor` whose parts are the stored slices (one copy per part:
the vocab slices that every dp replica holds are read once), so any region of it can be read
without materialising the full model.
"""

from __future__ import annotations

from pathlib import Path

from dsworker.checkpoint.fsutil import check_tensor_name, safe_join
from dsworker.checkpoint.hf_checkpoint import read_model_config
from dsworker.checkpoint.implied_tensors import check_complete
from dsworker.checkpoint.regions import GlobalTensor, SourcePart
from dsworker.checkpoint.sharded_metadata import ShardedMetadata, read_metadata
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import METADATA_FILE
from dsworker.tools.layout_source import LayoutSource
from dsworker.tools.verify import verify_sharded


def open_sharded(root: str | Path) -> tuple[ShardedMetadata, LayoutSource]:
    """Validate a complete layout and index its tensors; CheckpointError when it is not usable."""
    root = Path(root)
    md = read_metadata(root)
    problems = verify_sharded(root, checksums=False)
    if problems:
        more = f" (+{len(problems) - 1} more; run dsworker verify)" if len(problems) > 1 else ""
        raise CheckpointError(problems[0] + more)
    model = read_model_config(root)
    tensors: dict[str, GlobalTensor] = {}
    seen: set[tuple[str, int | None, int]] = set()
    for t in md.tensors:
        check_tensor_name(t.name, str(root / METADATA_FILE))
        where = f"{root / METADATA_FILE} tensors[{t.name!r}]"
        path = safe_join(root, t.file, where)
        if t.source_file is not None:  # merge writes the tensor back to this name
            safe_join(root, t.source_file, f"{where}.sourceFile")
        key = (t.name, t.dim, t.part)
        if key in seen:
            continue
        seen.add(key)
        gt = tensors.get(t.name)
        if gt is None:
            gt = tensors[t.name] = GlobalTensor(
                name=t.name,
                dtype=t.dtype,
                shape=tuple(t.global_shape),
                parts=[],
                source_file=t.source_file,
                value=t.global_value,
            )
        if t.dim is None:
            gt.parts.append(SourcePart(str(path), t.name, None, 0, t.shape[0] if t.shape else 0))
        else:
            size = t.shape[t.dim]
            gt.parts.append(
                SourcePart(str(path), t.name, t.dim, t.part * size, (t.part + 1) * size)
            )
    check_complete(model, tensors, root / METADATA_FILE, "the layout is damaged; shard it again")
    # The metadata lists tensors in source order (the sharder keeps it): keep reading sequentially.
    for k, gt in enumerate(tensors.values()):
        gt.order = k
    aux = [
        (rel, root / rel)
        for rel in md.files
        if "/" not in rel and not rel.endswith(".safetensors") and rel != "config.json"
    ]
    src = LayoutSource(
        path=root,
        tensors=tensors,
        dims=model.dims,
        config=model.raw,
        config_sha256=str(md.source.get("configSha256", "")),
        index_sha256=md.source.get("indexSha256"),
        quantization=str(md.plan.get("quantization", "bf16")),
        dequantized=bool(md.plan.get("dequantized", False)),
        aux=aux,
        # e.g. a LoRA merge: a reshard of base+adapter must not get the base's fingerprint
        fingerprint_salt=str(md.source.get("fingerprintSalt") or ""),
    )
    return md, src
