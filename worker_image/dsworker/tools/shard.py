"""`dsworker shard`: a HF DeepSeek checkpoint -> the per-rank layout of one parallel plan.

Why offline: each rank then reads only its own slices, contiguously, from tmpfs (see
SHARDED_FORMAT.md). The split rules come from contract.layout; tools.layout_plan plans the output
files, tools.output_dir keeps re-runs safe, tools.layout_writer writes and seals the layout. This
module checks the checkpoint against what the deployment asked for and is the CLI.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from dsworker.checkpoint.progress import emit_summary, write_termination_log
from dsworker.contract.errors import CheckpointError, PlanError, termination_record
from dsworker.contract.layout import ParallelPlan, pod_ranks
from dsworker.tools.layout_options import LayoutOptions, add_layout_args, layout_args
from dsworker.tools.layout_source import LayoutSource, hf_source
from dsworker.tools.layout_writer import write_layout


@dataclass(frozen=True)
class Expected:
    """What the caller asked of the checkpoint (a DeepSeekDeployment's spec.model and
    spec.serving, passed by the operator, which never reads config.json itself)."""

    architecture: str | None = None
    quantization: str | None = None  # None or "auto": whatever the checkpoint is
    max_seq_len: int | None = None


def check_expected(src: LayoutSource, want: Expected) -> None:
    """Refuse (CheckpointError, exit 2) a checkpoint that is not what was asked, before any
    output: each problem names the flag and the deployment field to fix."""
    errs: list[str] = []
    arch = src.dims.architecture
    if want.architecture and arch != want.architecture:
        errs.append(
            f"config.json describes {arch}, not {want.architecture} (--expect-architecture); "
            "a DeepSeekDeployment shards only DeepseekV3 (V3, R1) offline: for V2 set "
            "spec.sharding.enabled: false, else point spec.model.source at a V3 checkpoint"
        )
    if want.quantization not in (None, "auto", src.quantization):
        errs.append(
            f"the checkpoint is {src.quantization}, not {want.quantization} "
            f"(--expect-quantization); set spec.model.quantization: auto or {src.quantization}"
        )
    most = src.config.get("max_position_embeddings")
    if want.max_seq_len and isinstance(most, int) and want.max_seq_len > most:
        errs.append(
            f"--max-seq-len {want.max_seq_len} exceeds config.json max_position_embeddings "
            f"({most}); lower spec.serving.maxSeqLen"
        )
    if errs:
        raise CheckpointError(f"{src.path}: " + "; ".join(errs))


def shard(
    model_path: str | Path,
    save_directory: str | Path,
    plan: ParallelPlan,
    *,
    expected: Expected = Expected(),
    **options: Any,
) -> dict[str, Any]:
    """Shard a HF checkpoint for `plan` into `save_directory`; returns the summary record.

    `options` are LayoutOptions' fields (mtp, dequantize_fp8, processes, ...). Raises
    CheckpointError / PlanError (exit code 2 in the CLI) for bad input.
    """
    return _shard(model_path, save_directory, plan, LayoutOptions(**options), expected)


def _shard(
    model_path: str | Path,
    save_directory: str | Path,
    plan: ParallelPlan,
    options: LayoutOptions,
    expected: Expected,
) -> dict[str, Any]:
    src = hf_source(model_path)
    check_expected(src, expected)
    return write_layout(src, save_directory, plan, options)


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "shard",
        help="split a HF checkpoint into the per-rank layout of one plan",
        description="Split a HuggingFace DeepSeek checkpoint into the dsop-sharded/1 layout.",
    )
    p.add_argument("--model-path", "--model_path", required=True, dest="model_path")
    p.add_argument("--save-directory", "--save_directory", required=True, dest="save_directory")
    add_layout_args(p)
    p.add_argument(
        "--expect-architecture",
        choices=("DeepseekV3", "DeepseekV2"),
        help="refuse a checkpoint of another architecture (config.json)",
    )
    p.add_argument(
        "--expect-quantization",
        choices=("auto", "bf16", "fp8", "w8a8", "w8a16"),
        help="refuse a checkpoint in another weight format",
    )
    p.add_argument(
        "--max-seq-len", type=int, help="refuse a checkpoint whose max_position_embeddings is lower"
    )
    p.add_argument(
        "--node-index",
        type=int,
        help="write only this node's ranks (with --devices-per-node) and the shared files: "
        "one node's part of a node-local store",
    )
    p.add_argument("--devices-per-node", type=int, help="ranks per node (with --node-index)")
    p.set_defaults(func=_run, on_error=_on_error)


def _on_error(error: CheckpointError | PlanError) -> None:
    write_termination_log(termination_record(error))


def _run(args: argparse.Namespace) -> int:
    plan, options = layout_args(args)
    options = dataclasses.replace(options, ranks=_node_ranks(args, plan))
    expected = Expected(args.expect_architecture, args.expect_quantization, args.max_seq_len)
    emit_summary(_shard(args.model_path, args.save_directory, plan, options, expected))
    return 0


def _node_ranks(args: argparse.Namespace, plan: ParallelPlan) -> range | None:
    """The ranks of --node-index (None: all), refused unless they lie inside the world."""
    if args.node_index is None and args.devices_per_node is None:
        return None
    if args.node_index is None or not args.devices_per_node or args.devices_per_node < 1:
        raise PlanError("--node-index and --devices-per-node (>= 1) go together; give both")
    ranks = pod_ranks(args.node_index, args.devices_per_node)
    if args.node_index < 0 or ranks.stop > plan.world_size:
        raise PlanError(
            f"--node-index {args.node_index} x --devices-per-node {args.devices_per_node} is "
            f"outside world size {plan.world_size}; use a node index below "
            f"{plan.world_size // args.devices_per_node}"
        )
    return ranks
