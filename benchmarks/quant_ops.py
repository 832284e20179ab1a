"""Quantised matmul ops against a BF16 torch.matmul of the same shape, one JSON line per op x shape.

    .venv/bin/python benchmarks/quant_ops.py [--device cuda] [--runs 50] [--small]

R1-like shapes: dense 7168x2048 (q_a/kv_a-like), 2048x7168 (o_proj-like); experts w13 [E, 4096, 7168]
and w2 [E, 7168, 2048] with 8 of E routed per token; M (tokens) in 1, 16, 128. On CUDA each figure is
the median of --runs CUDA-event timings after warm-up; on CPU `--device cpu --small` shrinks every
shape by 16 so the whole run takes seconds. `speedup` = bf16 time / quantised time; `weight_bytes`
is what the quantised weight occupies (the BF16 copy would be 2 bytes a weight).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch

import dsworker.ops  # noqa: F401  (registers the dsworker:: ops)
from dsworker.ops import quant_formats as qf
from dsworker.ops.quant_matmul import quant_linear
from dsworker.ops.quant_moe import quant_experts

DENSE = [(7168, 2048), (2048, 7168)]  # (K in, N out)
EXPERT = (7168, 2048, 16)  # hidden, intermediate, local experts (256 routed / EP 16)
TOKENS = (1, 16, 128)
TOPK = 8


def timed(fn: Callable[[], object], runs: int, device: torch.device) -> float:
    """Median milliseconds of fn over runs (after 3 warm-up calls)."""
    for _ in range(3 if device.type == "cuda" else 1):
        fn()
    times = []
    for _ in range(runs):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def make(kind: str, shape: tuple[int, ...], device: torch.device) -> qf.QuantWeight:
    """Random codes and scales in the on-device layout (values do not matter for timing)."""
    n, k = shape[-2], shape[-1]
    lead = shape[:-2]
    if kind == qf.FP8:
        data = torch.randn(shape, device=device).to(torch.float8_e4m3fn)
        scale = torch.rand((*lead, qf.cdiv(n, 128), qf.cdiv(k, 128)), device=device)
        return qf.QuantWeight(kind, data, scale)
    data = torch.randint(-127, 128, shape, dtype=torch.int8, device=device)
    if kind == qf.W8A16:
        scale = torch.rand((*lead, n, qf.cdiv(k, 128)), device=device) * 1e-2
        return qf.QuantWeight(kind, data, scale, group_size=128)
    return qf.QuantWeight(kind, data, torch.rand((*lead, n, 1), device=device) * 1e-2)


def bench_dense(args: argparse.Namespace, device: torch.device, div: int) -> None:
    for k, n in DENSE:
        k, n = k // div, n // div
        w_bf16 = torch.randn(n, k, device=device, dtype=torch.bfloat16)
        for kind in qf.KINDS:
            qw = make(kind, (n, k), device)
            for m in TOKENS:
                x = torch.randn(m, k, device=device, dtype=torch.bfloat16)
                base = timed(lambda x=x, w=w_bf16: x @ w.T, args.runs, device)
                ms = timed(lambda x=x, qw=qw: quant_linear(x, qw), args.runs, device)
                emit("dense", kind, f"{n}x{k}", m, ms, base, qw.nbytes)


def bench_experts(args: argparse.Namespace, device: torch.device, div: int) -> None:
    hid, inter, e = EXPERT[0] // div, EXPERT[1] // div, EXPERT[2] // (4 if div > 1 else 1)
    b13 = torch.randn(e, 2 * inter, hid, device=device, dtype=torch.bfloat16)
    b2 = torch.randn(e, hid, inter, device=device, dtype=torch.bfloat16)
    for kind in qf.KINDS:
        q13, q2 = make(kind, (e, 2 * inter, hid), device), make(kind, (e, hid, inter), device)
        for m in TOKENS[:2] if div > 1 else TOKENS:  # --small: the CPU reference is slow
            x = torch.randn(m, hid, device=device, dtype=torch.bfloat16)
            ids = torch.randint(0, e, (m, TOPK), device=device, dtype=torch.int32)
            wts = torch.rand(m, TOPK, device=device)

            def bf16(
                x: torch.Tensor = x, ids: torch.Tensor = ids, wts: torch.Tensor = wts
            ) -> torch.Tensor:
                """The same routed loop on a BF16 copy: per expert present, its rows."""
                out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
                flat = ids.reshape(-1)
                for ex in flat.unique().tolist():
                    pairs = (flat == ex).nonzero().squeeze(1)
                    g, u = (x[pairs // TOPK] @ b13[ex].T).chunk(2, -1)
                    y = (torch.nn.functional.silu(g) * u) @ b2[ex].T
                    out.index_add_(0, pairs // TOPK, y.float() * wts.reshape(-1)[pairs, None])
                return out.to(x.dtype)

            base = timed(bf16, args.runs, device)
            ms = timed(
                lambda x=x, ids=ids, wts=wts, a=q13, b=q2: quant_experts(x, ids, wts, a, b),
                args.runs,
                device,
            )
            emit(
                "experts",
                kind,
                f"E{e}x{2 * inter}x{hid}+{hid}x{inter}",
                m,
                ms,
                base,
                q13.nbytes + q2.nbytes,
            )


def emit(family: str, kind: str, shape: str, m: int, ms: float, base: float, nbytes: int) -> None:
    line = {"op": family, "kind": kind, "shape": shape, "tokens": m, "ms": round(ms, 4)}
    line |= {"bf16_ms": round(base, 4), "speedup": round(base / ms, 3), "weight_bytes": nbytes}
    print(json.dumps(line), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--runs", type=int, default=None, help="timed runs (default 50; 3 with --small)"
    )
    ap.add_argument("--small", action="store_true", help="shapes / 16 (CPU smoke run)")
    args = ap.parse_args()
    device = torch.device(args.device)
    args.runs = args.runs or (3 if args.small else 50)
    div = 16 if args.small else 1
    torch.manual_seed(0)
    bench_dense(args, device, div)
    bench_experts(args, device, div)


if __name__ == "__main__":
    main()
