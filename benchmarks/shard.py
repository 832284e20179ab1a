"""Sharding benchmark: dsworker shard vs a plain copy of the same bytes vs the naive way.

    .venv/bin/python benchmarks/shard.py [--dir /tmp/dsop-bench] [--layers 8] [--repeat 3]

Synthesizes (or reuses) the BENCHMARKS.md "bench" model with --layers decoder layers (8 layers:
4.6 GB of BF16) and a 2-layer one (1.0 GB) for the memory-scaling check, warms the page cache with
the source, then runs each method in a fresh process and measures wall time and the peak RSS of
that process tree (os.wait4's ru_maxrss):
  copy-cp    cp of the source safetensors files, then sync of the copies (the I/O limit)
  copy-cat   the same with cat (read/write, no in-kernel copy)
  shard      dsworker shard --processes N for the plan (fsyncs every file itself)
  naive      safetensors.torch.load_file of each whole source file, slice, save_file, sync
Every run prints one JSON line; a final line per method gives medians, the ratio of medians to
copy-cp (vsCopyCp) and the median of per-repeat ratios (vsCopyCpPaired: each run against the
copy-cp run of the same repeat, robust on a shared machine).
GBps is source bytes / wall seconds of the whole process (start-up included), so all methods are
compared on the same bytes; outputBytes is the layout's size, bytesWritten the distinct bytes on
disk (the sharder hard-links the vocab files that dp replicas share).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
DSWORKER = str(Path(sys.executable).with_name("dsworker"))


def ensure_checkpoint(root: Path, layers: int) -> Path:
    """The bench model with `layers` layers under root (synthesized once, reused afterwards)."""
    out = root / f"ckpt-{layers}l"
    if (out / "model.safetensors.index.json").exists() and (out / "tokenizer_config.json").exists():
        return out
    shutil.rmtree(out, ignore_errors=True)
    cfg = json.dumps({"num_hidden_layers": layers})
    cmd = [
        DSWORKER,
        "synth",
        "--preset",
        "bench",
        "--config",
        cfg,
        "--seed",
        "0",
        "--out",
        str(out),
    ]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    return out


def st_bytes(d: Path) -> tuple[int, int]:
    """(bytes of all safetensors files, bytes of distinct files on disk: hard links once)."""
    total, seen, unique = 0, set(), 0
    for f in d.rglob("*.safetensors"):
        st = f.stat()
        total += st.st_size
        if st.st_ino not in seen:
            seen.add(st.st_ino)
            unique += st.st_size
    return total, unique


def warm(src: Path) -> None:
    """Read the source once so every method reads it from the page cache (in a child process:
    the parent stays small, its RSS would otherwise leak into the children's ru_maxrss)."""
    files = [str(f) for f in sorted(src.glob("*.safetensors"))]
    subprocess.run(["/bin/sh", "-c", 'cat "$@" > /dev/null', "warm", *files], check=True)


def run_measured(cmd: list[str]) -> tuple[float, float, str]:
    """Run cmd in a fresh child: (seconds, peak RSS MB of it and its descendants, stdout).

    os.wait4 returns the child's rusage, whose ru_maxrss covers the child and every descendant
    it waited for (the sharder's worker processes included).
    """
    t0 = time.perf_counter()
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert p.stdout is not None
    out = p.stdout.read()
    p.stdout.close()
    _, status, ru = os.wait4(p.pid, 0)
    dt = time.perf_counter() - t0
    p.returncode = os.waitstatus_to_exitcode(status)
    if p.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:4])} failed with exit code {p.returncode}")
    return dt, ru.ru_maxrss / 1024.0, out.decode()


def method_cmd(method: str, src: Path, dst: Path, plan: list[int], processes: int) -> list[str]:
    files = " ".join(f"'{f}'" for f in sorted(src.glob("*.safetensors")))
    if method == "copy-cp":
        return ["/bin/sh", "-c", f"mkdir -p '{dst}' && cp {files} '{dst}/' && sync '{dst}'/*"]
    if method == "copy-cat":
        loop = f'for f in {files}; do cat "$f" > \'{dst}\'/$(basename "$f"); done'
        return ["/bin/sh", "-c", f"mkdir -p '{dst}' && {loop} && sync '{dst}'/*"]
    if method == "shard":
        w, dp, tp, mtp, mep = plan
        return [
            DSWORKER, "shard", "--model-path", str(src), "--save-directory", str(dst),
            "--world-size", str(w), "--dp", str(dp), "--tp", str(tp), "--moe-tp", str(mtp),
            "--moe-ep", str(mep), "--processes", str(processes),
        ]  # fmt: skip
    if method == "naive":
        return [sys.executable, __file__, "--naive", str(src), str(dst), ",".join(map(str, plan))]
    raise ValueError(method)


def naive(src: Path, dst: Path, plan_s: str) -> None:
    """The naive way: load each whole file into memory (torch tensors), slice, save, sync."""
    import torch
    from safetensors.torch import load_file, save_file

    from dsworker.contract.layout import (
        ModelDims,
        ParallelPlan,
        owner_dirs,
        parts_for,
        place,
        tensor_slice,
    )

    plan = ParallelPlan(*map(int, plan_s.split(",")))
    dims = ModelDims.from_config(json.loads((src / "config.json").read_text()))
    for k, f in enumerate(sorted(src.glob("*.safetensors"))):
        tensors = load_file(f)
        outs: dict[str, dict[str, torch.Tensor]] = {}
        for name, t in tensors.items():
            pl = place(name, dims)
            parts = parts_for(pl.group, plan)
            for d, part in owner_dirs(pl, dims, plan):
                sl = tensor_slice(name, tuple(t.shape), pl, part, parts)
                piece = t if sl.dim is None else t.narrow(sl.dim, sl.start, sl.stop - sl.start)
                outs.setdefault(d, {})[name] = piece.contiguous()
        for d, group in outs.items():
            (dst / d).mkdir(parents=True, exist_ok=True)
            save_file(group, dst / d / f"model-naive-{k:05d}.safetensors")
        del tensors, outs
    subprocess.run(["sync", *map(str, dst.rglob("*.safetensors"))], check=True)


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--dir", default="/tmp/dsop-bench", help="where checkpoints are kept")
    ap.add_argument(
        "--out", default=None, help="output directory (default DIR/out; try /dev/shm/x)"
    )
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--small-layers", type=int, default=2)
    ap.add_argument("--plan", default="8,2,4,2,4", help="world,dp,tp,moe_tp,moe_ep")
    ap.add_argument("--processes", default="1,2")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--naive", nargs=3, metavar=("SRC", "DST", "PLAN"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.naive:
        naive(Path(args.naive[0]), Path(args.naive[1]), args.naive[2])
        return
    root = Path(args.dir)
    root.mkdir(parents=True, exist_ok=True)
    plan = [int(x) for x in args.plan.split(",")]
    big = ensure_checkpoint(root, args.layers)
    small = ensure_checkpoint(root, args.small_layers)
    runs: list[tuple[str, int, Path]] = [("copy-cp", 1, big), ("copy-cat", 1, big)]
    runs += [("shard", int(p), big) for p in args.processes.split(",")]
    runs += [("naive", 1, big), ("shard", 1, small), ("naive", 1, small)]
    dst = Path(args.out) if args.out else root / "out"
    _, rss0, _ = run_measured(["/bin/true"])
    print(json.dumps({"method": "baseline-/bin/true", "peakRssMB": round(rss0, 1)}), flush=True)
    results: dict[tuple[str, int, str], list[dict]] = {}
    for rep in range(args.repeat):
        for method, procs, src in runs:
            shutil.rmtree(dst, ignore_errors=True)
            subprocess.run(["sync"], check=False)
            warm(src)
            secs, rss, out = run_measured(method_cmd(method, src, dst, plan, procs))
            layout, unique = st_bytes(dst)
            source = st_bytes(src)[0]
            rec = {
                "method": method,
                "processes": procs,
                "checkpoint": src.name,
                "target": str(dst.parent),
                "sourceBytes": source,
                "outputBytes": layout,
                "bytesWritten": unique,
                "seconds": round(secs, 3),
                "GBps": round(source / secs / 1e9, 3),
                "peakRssMB": round(rss, 1),
                "repeat": rep,
            }
            if method == "shard":
                rec["summary"] = json.loads(out.strip().splitlines()[-1])
            print(json.dumps(rec), flush=True)
            results.setdefault((method, procs, src.name), []).append(rec)
    shutil.rmtree(dst, ignore_errors=True)
    base = statistics.median(r["GBps"] for r in results[("copy-cp", 1, big.name)])
    cp_by_rep = {r["repeat"]: r["seconds"] for r in results[("copy-cp", 1, big.name)]}
    for (method, procs, name), recs in results.items():
        # the machine is shared: ratios within one repeat (same conditions) are the robust figure
        paired = [
            cp_by_rep[r["repeat"]] * r["sourceBytes"] / st_bytes(big)[0] / r["seconds"]
            for r in recs
        ]
        med = {
            "median": True,
            "method": method,
            "processes": procs,
            "checkpoint": name,
            "target": recs[0]["target"],
            "sourceBytes": recs[0]["sourceBytes"],
            "outputBytes": recs[0]["outputBytes"],
            "bytesWritten": recs[0]["bytesWritten"],
            "seconds": round(statistics.median(r["seconds"] for r in recs), 3),
            "GBps": round(statistics.median(r["GBps"] for r in recs), 3),
            "peakRssMB": round(statistics.median(r["peakRssMB"] for r in recs), 1),
            "vsCopyCp": round(statistics.median(r["GBps"] for r in recs) / base, 2),
            "vsCopyCpPaired": round(statistics.median(paired), 2),
            "runs": len(recs),
        }
        if method == "shard":
            med["internalSeconds"] = round(
                statistics.median(r["summary"]["seconds"] for r in recs), 3
            )
        print(json.dumps(med), flush=True)


if __name__ == "__main__":
    main()
