"""Fused decode ops (dsworker.ops) against the engine's eager torch paths, one JSON line per op.

    .venv/bin/python benchmarks/fused_ops.py [--device cuda] [--rows 1 8 32] [--small]

On CUDA each op runs its Triton kernel and the eager path runs model/ code (routing.route,
LocalExperts.combine, layers.rms_norm, LayerKV.keys + MLA._attend); medians of CUDA-event timings
after warm-up, R1 shapes per rank by default (256 experts, k 8, H 7168, I 2048, 128 heads, rank 512,
rope 64). `--device cpu --small` times the torch references on tiny shapes in seconds, as a smoke
test of the script. Fields: op, impl (op|eager), device, rows, shape, median_us, p90_us.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

import dsworker.ops  # noqa: F401  (registers torch.ops.dsworker.*)
from dsworker.model.attention import MLA
from dsworker.model.experts import LocalExperts
from dsworker.model.layers import rms_norm
from dsworker.model.routing import route
from dsworker.ops.routing import moe_route

R1 = dict(experts=256, groups=8, topk_group=4, k=8, hidden=7168, inter=2048, heads=128, rank=512,
          rope=64, local_experts=32, context=4096, page=64)  # fmt: skip
SMALL = dict(experts=32, groups=4, topk_group=2, k=4, hidden=512, inter=256, heads=8, rank=128,
             rope=64, local_experts=32, context=256, page=16)  # fmt: skip


def timed(fn: Callable[[], Any], device: str, iters: int) -> tuple[float, float]:
    """(median, p90) microseconds of fn after warm-up; CUDA events on the GPU."""
    for _ in range(3):
        fn()
    samples = []
    for _ in range(iters):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            samples.append(start.elapsed_time(end) * 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append((time.perf_counter() - t0) * 1e6)
    samples.sort()
    return statistics.median(samples), samples[int(0.9 * (len(samples) - 1))]


def emit(op: str, impl: str, device: str, rows: int, shape: dict, fn: Callable, iters: int) -> None:
    median, p90 = timed(fn, device, iters)
    print(json.dumps(dict(op=op, impl=impl, device=device, rows=rows, shape=shape,
                          median_us=round(median, 2), p90_us=round(p90, 2))), flush=True)  # fmt: skip


def bench_routing(s: dict, rows: int, dev: str, iters: int) -> None:
    from dsworker.model.config import ModelArgs
    from dsworker.tools.synth_presets import make_config

    cfg = make_config("v3", "bench")
    cfg.update(n_routed_experts=s["experts"], n_group=s["groups"], topk_group=s["topk_group"],
               num_experts_per_tok=s["k"])  # fmt: skip
    args = ModelArgs.from_config(cfg)
    logits = torch.randn(rows, s["experts"], device=dev)
    bias = 0.1 * torch.randn(s["experts"], device=dev)
    shape = {"experts": s["experts"], "k": s["k"]}

    def op() -> tuple[torch.Tensor, torch.Tensor]:
        return moe_route(logits, bias, s["k"], s["groups"], s["topk_group"], "noaux_tc",
                         "sigmoid", True, 2.5)  # fmt: skip

    emit("moe_route", "op", dev, rows, shape, op, iters)
    emit("moe_route", "eager", dev, rows, shape, lambda: route(logits, args, bias), iters)


def bench_experts(s: dict, rows: int, dev: str, iters: int, dtype: torch.dtype) -> None:
    ex = LocalExperts(s["local_experts"], 0, s["hidden"], s["inter"], dtype, torch.device(dev))
    ex.w13.data.normal_(std=0.02)
    ex.w2.data.normal_(std=0.02)
    x = torch.randn(rows, s["hidden"], device=dev, dtype=dtype)
    ids = torch.stack(
        [torch.randperm(s["local_experts"], device=dev)[: s["k"]] for _ in range(rows)]
    )
    w = torch.rand(rows, s["k"], device=dev)
    shape = {"experts": s["local_experts"], "k": s["k"], "hidden": s["hidden"], "inter": s["inter"]}
    ops = torch.ops.dsworker

    def fused() -> torch.Tensor:
        return ops.moe_down(ops.moe_gate_up(x, ids, ex.w13), ids, w, ex.w2)

    emit("moe_experts", "op", dev, rows, shape, fused, iters)
    emit("moe_experts", "eager", dev, rows, shape, lambda: ex.combine(x, ids, w), iters)


def bench_norm(s: dict, rows: int, dev: str, iters: int, dtype: torch.dtype) -> None:
    x, res = (torch.randn(rows, s["hidden"], device=dev, dtype=dtype) for _ in range(2))
    weight = torch.ones(s["hidden"], device=dev, dtype=dtype)
    shape = {"hidden": s["hidden"]}

    def op() -> tuple[torch.Tensor, torch.Tensor]:
        return torch.ops.dsworker.add_rms_norm(x, res, weight, 1e-6)

    emit("add_rms_norm", "op", dev, rows, shape, op, iters)
    emit("add_rms_norm", "eager", dev, rows, shape, lambda: rms_norm(res + x, weight, 1e-6), iters)


def bench_mla(s: dict, rows: int, dev: str, iters: int, dtype: torch.dtype) -> None:
    page, ctx = s["page"], s["context"]
    cols = ctx // page
    kv = torch.randn(rows * cols, page, s["rank"], device=dev, dtype=dtype)
    pe = torch.randn(rows * cols, page, s["rope"], device=dev, dtype=dtype)
    table = torch.randperm(rows * cols, device=dev).view(rows, cols)
    lengths = torch.full((rows,), ctx, device=dev)
    qn = torch.randn(rows, s["heads"], s["rank"], device=dev, dtype=dtype)
    qp = torch.randn(rows, s["heads"], s["rope"], device=dev, dtype=dtype)
    cos, sin = (
        torch.ones(rows, s["rope"] // 2, device=dev),
        torch.zeros(rows, s["rope"] // 2, device=dev),
    )
    shape = {"heads": s["heads"], "rank": s["rank"], "context": ctx, "page": page}
    scale = 0.1

    def op() -> torch.Tensor:
        return torch.ops.dsworker.mla_decode(qn, qp, kv, pe, table, lengths, scale, cos, sin, True)

    visible = torch.ones(rows, 1, ctx, dtype=torch.bool, device=dev)

    def eager() -> torch.Tensor:  # LayerKV.keys() + Rope.apply + MLA._attend of a decode step
        keys = kv[table].reshape(rows, ctx, -1)
        keys_pe = pe[table].reshape(rows, ctx, -1)
        q_pe = torch.cat((qp.float()[..., 0::2], qp.float()[..., 1::2]), -1).to(dtype)
        return MLA._attend(qn[:, None], q_pe[:, None], keys, keys_pe, visible, scale)

    emit("mla_decode", "op", dev, rows, shape, op, iters)
    emit("mla_decode", "eager", dev, rows, shape, eager, iters)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--small", action="store_true", help="small shapes (CPU smoke test)")
    p.add_argument("--iters", type=int, default=50)
    a = p.parse_args()
    shapes = SMALL if a.small else R1
    dtype = torch.bfloat16
    with torch.inference_mode():
        for rows in a.rows:
            bench_routing(shapes, rows, a.device, a.iters)
            bench_experts(shapes, rows, a.device, a.iters, dtype)
            bench_norm(shapes, rows, a.device, a.iters, dtype)
            bench_mla(shapes, rows, a.device, a.iters, dtype)


if __name__ == "__main__":
    main()
