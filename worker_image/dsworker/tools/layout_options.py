"""The options of writing a layout, defined once for `dsworker shard` and `dsworker reshard`.

The plan flags are spelled as MindIE's sharder (--moe-tp and --moe_tp both accepted); the other
flags map one to one onto `LayoutOptions`, which the Python API (shard(), reshard()) takes as
keyword arguments.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass

from dsworker.contract.layout import ParallelPlan
from dsworker.tools.layout_plan import DEFAULT_MAX_FILE_BYTES


@dataclass(frozen=True)
class LayoutOptions:
    """How to cut and write a layout (everything but the plan, the source and the target)."""

    mtp: bool = False  # include the MTP layer
    dequantize_fp8: bool = False  # store FP8 weights as BF16
    processes: int = 1  # parallel writer processes
    checksum: bool = False  # record the sha256 of every file
    fingerprint: str | None = None  # layout id (default: sha256 of plan+config+index)
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES
    space_check: bool = True  # refuse early when the target clearly cannot hold the layout
    # only the directories these ranks read, plus the top-level files: one node's part of a
    # node-local store (the metadata then lists only those ranks and files)
    ranks: range | None = None


def add_layout_args(p: argparse.ArgumentParser) -> None:
    """The plan flags and the LayoutOptions flags."""
    p.add_argument("--world-size", "--world_size", type=int, required=True, dest="world_size")
    p.add_argument("--dp", type=int, default=None, help="default: world_size / tp")
    p.add_argument("--tp", type=int, required=True)
    p.add_argument("--moe-tp", "--moe_tp", type=int, required=True, dest="moe_tp")
    p.add_argument(
        "--moe-ep",
        "--moe_ep",
        type=int,
        default=None,
        dest="moe_ep",
        help="default: world_size / moe_tp",
    )
    p.add_argument(
        "--mtp", action="store_true", help="include the MTP layer (DEEPSEEK_MTP=1 in MindIE)"
    )
    p.add_argument("--dequantize-fp8", action="store_true", help="store FP8 weights as BF16")
    p.add_argument("--processes", type=int, default=1, help="parallel writer processes")
    p.add_argument("--checksum", action="store_true", help="record sha256 of every file")
    p.add_argument(
        "--fingerprint", default=None, help="layout id (default: sha256 of plan+config+index)"
    )
    p.add_argument(
        "--max-file-size",
        type=int,
        default=DEFAULT_MAX_FILE_BYTES,
        dest="max_file_bytes",
        help="bytes per output file",
    )


def layout_args(args: argparse.Namespace) -> tuple[ParallelPlan, LayoutOptions]:
    """The plan (dp and moe_ep default to world_size / tp and / moe_tp) and the options."""
    w = args.world_size
    dp = args.dp if args.dp is not None else (w // args.tp if args.tp else 0)
    ep = args.moe_ep if args.moe_ep is not None else (w // args.moe_tp if args.moe_tp else 0)
    options = LayoutOptions(
        mtp=args.mtp,
        dequantize_fp8=args.dequantize_fp8,
        processes=args.processes,
        checksum=args.checksum,
        fingerprint=args.fingerprint,
        max_file_bytes=args.max_file_bytes,
    )
    return ParallelPlan(w, dp, args.tp, args.moe_tp, ep), options
