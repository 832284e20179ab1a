"""Ops dispatched per decoder layer in one decode step, and the dtype conversions among them.

    .venv/bin/python benchmarks/ops_per_step.py [--preset tiny|small|bench] [--batch 1 16]

Builds a preset's model (random weights, world of one rank, bf16 on the CPU), prefills a prompt
per sequence, then counts the aten and dsworker ops of one fixed-shape decode step (what a CUDA
graph captures) with a TorchDispatchMode. A custom op counts one (its insides are not seen); view
ops (view, slice, split, permute, ...) launch no kernel and are counted apart. Ops run inside a
decoder layer's forward are attributed to it; the rest of the step (embedding, rope table lookup,
page lookups, head) is `ops_outside_layers`. One JSON line per batch size:
preset, batch, ops_per_layer (the worst MoE layer), dense_ops_per_layer, views_per_layer,
dtype_conversions (per MoE layer, worst), step_ops, step_dtype_conversions, top_ops.
Issue 20's budget: at most 25 ops per decoder layer and 0 conversions. Measured on the CPU
(small, bf16): main before the fused decode path, 111 ops and 17 conversions per MoE layer (668
ops, 102 conversions per step at batch 1); with it, 20 (batch 1) / 21 (batch 16) and 0; with the
shared experts folded into the fused expert ops (model/shared_fold.py), 15 / 16 (136 -> 111 step
ops at batch 1).
"""

from __future__ import annotations

import argparse
import collections
import json
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from dsworker.contract.layout import ParallelPlan
from dsworker.model import Batch, DeepseekModel, ModelArgs
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.model.moe import MoE
from dsworker.parallel.groups import build_groups
from dsworker.tools.synth import make_config

PROMPT = 12
NOT_KERNELS = {"aten::lift_fresh", "aten::alias", "aten::detach", "aten::_unsafe_view"}


def is_conversion(func: Any, args: tuple, kwargs: dict, out: Any) -> bool:
    """A copy that changes dtype: _to_copy (.to/.float/...) or copy_ between dtypes."""
    name = func._schema.name
    if name == "aten::_to_copy":
        return isinstance(out, torch.Tensor) and out.dtype != args[0].dtype
    if name == "aten::copy_":
        return args[0].dtype != args[1].dtype
    return False


class OpCounter(TorchDispatchMode):
    """Counts ops per owner (a layer index or None), split into kernels, views and conversions."""

    def __init__(self) -> None:
        super().__init__()
        self.owner: int | None = None
        self.kernels: dict[int | None, collections.Counter[str]] = collections.defaultdict(
            collections.Counter
        )
        self.views: collections.Counter[int | None] = collections.Counter()
        self.conversions: collections.Counter[int | None] = collections.Counter()

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: Any = None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func._schema.name
        if func.is_view or name in NOT_KERNELS:
            self.views[self.owner] += 1
        else:
            self.kernels[self.owner][name] += 1
        if is_conversion(func, args, kwargs, out):
            self.conversions[self.owner] += 1
        return out


def build(preset: str, dtype: torch.dtype, seed: int = 0) -> DeepseekModel:
    """A world-1 model of the preset with random weights (routing sees realistic spreads)."""
    args = ModelArgs.from_config(make_config("v3", preset))
    plan = ParallelPlan(1, 1, 1, 1, 1)
    model = DeepseekModel(args, build_groups(plan, 0, "gloo"), None, dtype, torch.device("cpu"))
    gen = torch.Generator().manual_seed(seed)
    for name, t in model.targets().items():
        scale = 1.0 if "norm" in name else 0.02
        t.copy_(torch.randn(t.shape, generator=gen) * scale + (1.0 if "norm" in name else 0.0))
    return model


def count_step(model: DeepseekModel, batch: int) -> dict[str, Any]:
    """Prefill `batch` prompts, then count one fixed-shape decode step."""
    cache = model.new_cache(batch, 64)
    graphs = DecodeGraphs(model, cache, batch, capture=False)
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(1, model.args.vocab_size, (batch, PROMPT), generator=gen).tolist()
    out = model.forward(
        Batch.build([(i, 0, p) for i, p in enumerate(prompts)], model.device), cache
    )
    first = out.logits.argmax(-1).tolist()
    counter = OpCounter()
    hooks = []
    for i, layer in enumerate(model.layers):

        def enter(_m: Any, _a: Any, i: int = i) -> None:
            counter.owner = i

        def leave(_m: Any, _a: Any, _o: Any) -> None:
            counter.owner = None

        hooks += [layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave)]
    try:
        with counter:
            graphs.run(list(range(batch)), [PROMPT] * batch, [[t] for t in first])
    finally:
        for h in hooks:
            h.remove()
    moe = [i for i, layer in enumerate(model.layers) if isinstance(layer.mlp, MoE)]
    dense = [i for i in range(len(model.layers)) if i not in moe]
    per = {i: sum(counter.kernels[i].values()) for i in range(len(model.layers))}
    worst = max(moe, key=lambda i: per[i])
    return {
        "batch": batch,
        "ops_per_layer": per[worst],
        "dense_ops_per_layer": max((per[i] for i in dense), default=None),
        "views_per_layer": counter.views[worst],
        "dtype_conversions": max(counter.conversions[i] for i in moe),
        "ops_outside_layers": sum(counter.kernels[None].values()),
        "step_ops": sum(sum(c.values()) for c in counter.kernels.values()),
        "step_dtype_conversions": sum(counter.conversions.values()),
        "layer_ops": dict(sorted(counter.kernels[worst].items(), key=lambda kv: -kv[1])),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="small", choices=["tiny", "small", "bench"])
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float32"])
    a = ap.parse_args()
    torch.set_grad_enabled(False)
    model = build(a.preset, getattr(torch, a.dtype))
    for b in a.batch:
        row = {"preset": a.preset, "dtype": a.dtype, **count_step(model, b)}
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
