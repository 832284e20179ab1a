"""The top kernels of one decode step under torch.profiler, for `benchmarks/engine.py --profile`.

The step runs as the engine runs it: through the decode graphs where it has them (a replay; the
profiler still sees each kernel of the graph on CUDA), else the eager step. On CUDA the ranking is
by device time of the kernels; on CPU (and NPU, whose kernels torch.profiler does not see here)
by the self CPU time of the ops. JSON lines: one `profile` summary, then `profile_op` rows.
"""

from __future__ import annotations

import json
from typing import Any

import torch
from torch.profiler import ProfilerActivity, profile

from dsworker.contract.kv_budget import pages_for
from dsworker.engine.model_runner import ModelRunner
from dsworker.model import Batch


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _device_us(evt: Any) -> float:
    """Self device time of an averaged event (the attribute was renamed in torch 2.4)."""
    us = getattr(evt, "self_device_time_total", None)
    return float(us if us is not None else getattr(evt, "self_cuda_time_total", 0.0))


@torch.inference_mode()
def profile_decode(runner: ModelRunner, prompts: list[list[int]], top: int) -> list[dict]:
    """Prefill `prompts` (one slot each, pages assigned here), warm up one decode step (a graph
    is captured then), profile the next one; rows of its top ops, heaviest first."""
    model, cache, graphs, dev = runner.model, runner.cache, runner.graphs, runner.device
    per = pages_for(cache.max_len, cache.page_size)
    for i in range(len(prompts)):
        cache.assign(i, range(i * per, (i + 1) * per))
    out = model.forward(Batch.build([(i, 0, p) for i, p in enumerate(prompts)], dev), cache)
    last = out.logits.argmax(-1).tolist()
    pos = [len(p) for p in prompts]

    def step() -> None:
        slots = list(range(len(prompts)))
        if graphs is not None and len(prompts) <= graphs.max_batch:
            graphs.run(slots, pos, [[t] for t in last])
        else:
            seqs = [(i, pos[i], [last[i]]) for i in slots]
            model.forward(Batch.build(seqs, dev), cache)
        _sync(dev)

    step()  # warm-up at the same positions: the profiled step rewrites the same cache entries
    on_cuda = dev.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        step()
    events = prof.key_averages()
    if on_cuda:
        timed = [(e, _device_us(e)) for e in events if e.device_type.name == "CUDA"]
        timed = [(e, us) for e, us in timed if us > 0]
    else:
        timed = [(e, float(e.self_cpu_time_total)) for e in events]
        timed = [(e, us) for e, us in timed if not e.key.startswith("ProfilerStep")]
    total = sum(us for _, us in timed) or 1.0
    timed.sort(key=lambda eu: -eu[1])
    rows = [
        {
            "bench": "profile",
            "batch": len(prompts),
            "graphed": graphs is not None,
            "clock": "device" if on_cuda else "cpu",
            "calls": sum(e.count for e, _ in timed),
            "distinct": len(timed),
            "total_us": round(total, 1),
        }
    ]
    for rank, (e, us) in enumerate(timed[:top], 1):
        rows.append(
            {
                "bench": "profile_op",
                "batch": len(prompts),
                "rank": rank,
                "name": e.key,
                "calls": e.count,
                "self_us": round(us, 1),
                "share": round(us / total, 4),
            }
        )
    return rows


def emit_profile(runner: ModelRunner, prompts: list[list[int]], top: int) -> None:
    for row in profile_decode(runner, prompts, top):
        print(json.dumps(row), flush=True)
