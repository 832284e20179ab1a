"""`dsworker reshard SRC DST <plan>`: one sharded layout -> another plan, without the full model.

Every output slice is assembled from just the stored slices of SRC that overlap it (see
regions.region), so memory stays bounded and only the needed bytes are read. The result equals
`dsworker shard` of the original checkpoint for the new plan (same tensors, same fingerprint).
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from dsworker.checkpoint.progress import emit_summary
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ParallelPlan
from dsworker.tools.shard import DEFAULT_MAX_FILE_BYTES, add_plan_args, plan_from_args, write_layout
from dsworker.tools.sharded_source import open_sharded


def reshard(
    src_dir: str | Path,
    dst_dir: str | Path,
    plan: ParallelPlan,
    *,
    mtp: bool = False,
    dequantize_fp8: bool = False,
    processes: int = 1,
    checksum: bool = False,
    fingerprint: str | None = None,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
) -> dict[str, Any]:
    """Re-cut the layout in src_dir for `plan` into dst_dir; returns the summary record."""
    md, src = open_sharded(src_dir)
    if mtp and not md.plan.get("mtp"):
        raise CheckpointError(
            f"{src_dir}: --mtp given but this layout was cut without the MTP layer; "
            "reshard from the original checkpoint with dsworker shard --mtp"
        )
    if dequantize_fp8 and md.plan.get("dequantized"):
        dequantize_fp8 = False  # already BF16
    return write_layout(
        src,
        dst_dir,
        plan,
        mtp=mtp,
        dequantize_fp8=dequantize_fp8,
        processes=processes,
        checksum=checksum,
        fingerprint=fingerprint,
        max_file_bytes=max_file_bytes,
        what="reshard",
    )


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "reshard",
        help="convert a sharded layout to another plan",
        description="Convert a dsop-sharded/1 layout to another parallel plan.",
    )
    p.add_argument("src")
    p.add_argument("dst")
    add_plan_args(p)
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    out = reshard(
        args.src,
        args.dst,
        plan_from_args(args),
        mtp=args.mtp,
        dequantize_fp8=args.dequantize_fp8,
        processes=args.processes,
        checksum=args.checksum,
        fingerprint=args.fingerprint,
        max_file_bytes=args.max_file_size,
    )
    emit_summary(out)
    return 0
