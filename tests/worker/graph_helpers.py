"""Spawned ranks of the multi-rank fixed-shape tests: each decodes the same tokens twice, through
ordinary eager steps and through the padded fixed-shape steps (DecodeGraphs, eager on CPU), and
writes what it saw for the parent to compare.

Importable by name (spawn pickles `compare_steps` by reference), like engine_helpers.
"""

from __future__ import annotations

import faulthandler
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch

from dsworker.contract.layout import ParallelPlan
from dsworker.engine.loader import load_weights
from dsworker.model import Batch, DeepseekModel, EngineOptions, ExpertBufferOverflow, ModelArgs
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.model.moe import MoEOptions
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups, init_process_group

MAX_LEN = 64


@dataclass(frozen=True)
class Scenario:
    """One plan and prompt set; prompt i lives on dp group i % dp, in its slot i // dp."""

    plan: ParallelPlan
    prompts: list[list[int]]
    moe: MoEOptions = field(default_factory=MoEOptions)
    steps: int = 8


def _decode(
    model: DeepseekModel, sc: Scenario, graphs: DecodeGraphs | None, feed: list[list[int]] | None
) -> tuple[list[list[int]], list[list[float]], str | None]:
    """Prefill eagerly, then `steps` decode steps (eager, or fixed-shape through `graphs`).

    Returns this dp group's greedy tokens per prompt (with `feed`, those tokens are fed instead
    of the greedy ones, so both runs see the same inputs), each step's logits, and the refusal.
    """
    dp, me = sc.plan.dp, model.groups.coords.dp_rank
    mine = [i for i in range(len(sc.prompts)) if i % dp == me]
    cache = graphs.cache if graphs is not None else model.new_cache(4, MAX_LEN)
    seqs = [(i // dp, 0, sc.prompts[i]) for i in mine]
    out = model.forward(Batch.build(seqs, model.device), cache)
    tokens = [[t] for t in out.logits.argmax(-1).tolist()]
    rows = max(sum(1 for i in range(len(sc.prompts)) if i % dp == d) for d in range(dp))
    logits: list[list[float]] = []
    try:
        for s in range(sc.steps):
            if feed and s >= len(feed[0]):  # the run fed from refused at this step
                break
            pos = [len(sc.prompts[i]) + s for i in mine]
            last = [feed[j][s] if feed else tokens[j][-1] for j in range(len(mine))]
            reach = max(len(p) for p in sc.prompts) + s + 1
            if graphs is not None:
                step = graphs.run([i // dp for i in mine], pos, [[t] for t in last], rows=rows,
                                  reach=reach)  # fmt: skip
            else:
                batch = Batch.build(
                    [(i // dp, p, [t]) for i, p, t in zip(mine, pos, last, strict=True)],
                    model.device,
                )
                step = model.forward(batch, cache).logits
            logits.append(step.flatten().float().cpu().tolist())
            for t, nxt in zip(tokens, step.argmax(-1).tolist(), strict=True):
                t.append(nxt)
    except ExpertBufferOverflow as e:
        return tokens, logits, str(e)
    return tokens, logits, None


def compare_steps(
    rank: int,
    nproc: int,
    ckpt: str,
    scenarios: dict[str, Scenario],
    out: str,
    kind: str = "cpu",
    capture: bool = False,
    compile_backend: str | None = None,
) -> None:
    """One rank: every scenario eager, then fixed-shape (captured with `capture`, compiled with
    `compile_backend`) on the eager run's tokens."""
    faulthandler.enable()
    device = Device.create(kind, rank)
    device.cpu_threads(nproc)
    init_process_group(device, rank, nproc)
    args = ModelArgs.from_dir(ckpt)
    for name, sc in scenarios.items():
        groups = build_groups(sc.plan, rank, device.backend)
        model = DeepseekModel(args, groups, EngineOptions(moe=sc.moe), torch.float32, device.torch)
        load_weights(model.targets(), Path(ckpt), sc.plan, rank, device)
        eager, eager_logits, eager_err = _decode(model, sc, None, None)
        graphs = DecodeGraphs(
            model, model.new_cache(4, MAX_LEN), 4, capture=capture, compile_backend=compile_backend
        )
        fixed, fixed_logits, fixed_err = _decode(model, sc, graphs, eager)
        record = {
            "eager": eager,
            "fixed": fixed,
            "eager_logits": eager_logits,
            "fixed_logits": fixed_logits,
            "eager_error": eager_err,
            "fixed_error": fixed_err,
        }
        (Path(out) / f"{name}.{rank}.json").write_text(json.dumps(record))
