"""`dsworker reshard SRC DST <plan>`: one sharded layout -> another plan, without the full model.

Every output slice is assembled from just the stored slices of SRC that overlap it (see
regions.region), so memory stays bounded and only the needed bytes are read. The result equals
`dsworker shard` of the original checkpoint for the new plan (same tensors, same fingerprint).
"""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import Any

from dsworker.checkpoint.progress import emit_summary
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ParallelPlan
from dsworker.tools.layout_options import LayoutOptions, add_layout_args, layout_args
from dsworker.tools.layout_writer import write_layout
from dsworker.tools.sharded_source import open_sharded


def reshard(
    src_dir: str | Path, dst_dir: str | Path, plan: ParallelPlan, **options: Any
) -> dict[str, Any]:
    """Re-cut the layout in src_dir for `plan` into dst_dir; returns the summary record.

    `options` are LayoutOptions' fields, as for shard().
    """
    return _reshard(src_dir, dst_dir, plan, LayoutOptions(**options))


def _reshard(
    src_dir: str | Path, dst_dir: str | Path, plan: ParallelPlan, options: LayoutOptions
) -> dict[str, Any]:
    md, src = open_sharded(src_dir)
    if options.mtp and not md.plan.get("mtp"):
        raise CheckpointError(
            f"{src_dir}: --mtp given but this layout was cut without the MTP layer; "
            "reshard from the original checkpoint with dsworker shard --mtp"
        )
    if options.dequantize_fp8 and md.plan.get("dequantized"):
        options = dataclasses.replace(options, dequantize_fp8=False)  # already BF16
    return write_layout(src, dst_dir, plan, options, what="reshard")


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reshard",
        help="convert a sharded layout to another plan",
        description="Convert a dsop-sharded/1 layout to another parallel plan.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    add_layout_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    plan, options = layout_args(args)
    emit_summary(_reshard(args.src, args.dst, plan, options))
    return 0
