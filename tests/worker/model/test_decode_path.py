"""The fused decode path (mla_decode, fused experts, chained norms) against the prefill path, the
op budget of a decode step, and ranks with no tokens in an EP step.

Decode and prefill compute the same tokens by different ops (per-row paged attention and routed
expert kernels against padded blocks and sorted expert matmuls), so each checks the other.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS, run_local, spawn_world

from dsworker.contract.layout import ParallelPlan
from dsworker.engine.loader import load_weights
from dsworker.launch.generate import GenerateJob
from dsworker.model import Batch, DeepseekModel, ModelArgs, MoEOptions
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups

P1 = ParallelPlan(1, 1, 1, 1, 1)
SCRIPT = Path(__file__).resolve().parents[3] / "benchmarks" / "ops_per_step.py"
# Recorded by benchmarks/ops_per_step.py (tiny, bf16): 15 at batch 1, 16 at batch 3 (einsum adds
# one clone), with the shared experts inside the fused expert ops (20 / 21 before that). Main
# before the fused path: 111 ops and 17 dtype conversions per MoE layer.
OPS_CEILING = 16


def _model(ckpt: Path, dtype: torch.dtype = torch.float32) -> DeepseekModel:
    dev = Device.create("cpu")
    model = DeepseekModel(ModelArgs.from_dir(ckpt), build_groups(P1, 0, "gloo"), None, dtype,
                          dev.torch)  # fmt: skip
    load_weights(model.targets(), ckpt, P1, 0, dev)
    return model


def _ops_per_step():  # noqa: ANN202 (the benchmark module, loaded from its path)
    spec = importlib.util.spec_from_file_location("ops_per_step", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["ops_per_step"] = module
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_steps_equal_one_prefill(tiny_v3: Path, dtype: torch.dtype) -> None:
    """Token by token (decode path, fixed-shape and ordinary steps) equals one prefill over the
    whole sequence (prefill path), logits at every position."""
    model = _model(tiny_v3, dtype)
    seqs = [p + [(7 * i + 3) % 200 + 1 for i in range(6)] for p in PROMPTS]
    full_cache = model.new_cache(len(seqs), 64)
    batch = Batch.build([(i, 0, s) for i, s in enumerate(seqs)], model.device)
    assert not batch.is_decode
    full = model.forward(batch, full_cache, all_logits=True).logits.float()
    want = [full[batch.seq == i] for i in range(len(seqs))]

    cache = model.new_cache(len(seqs), 64)
    graphs = DecodeGraphs(model, cache, 4, capture=False)
    prompts = Batch.build([(i, 0, p) for i, p in enumerate(PROMPTS)], model.device)
    model.forward(prompts, cache)
    tol = 1e-5 if dtype == torch.float32 else 0.05
    for j in range(6):
        pos = [len(p) + j for p in PROMPTS]
        toks = [[s[n]] for s, n in zip(seqs, pos, strict=True)]
        if j % 2:  # the padded fixed-shape step (3 sequences in the 4-row bucket)
            got = graphs.run(list(range(len(seqs))), pos, toks).float()
        else:
            rows = [(i, n, t) for i, (n, t) in enumerate(zip(pos, toks, strict=True))]
            step = Batch.build(rows, model.device)
            assert step.is_decode
            got = model.forward(step, cache).logits.float()
        for i, n in enumerate(pos):
            err = (got[i] - want[i][n]).abs().max().item()
            assert err <= tol, f"step {j}, sequence {i}: decode differs from prefill by {err:.2e}"


def test_decode_step_meets_the_op_budget(tiny_v3: Path) -> None:
    """The fused ops run in a decode step (not in a prefill), within the recorded op ceiling and
    with no dtype conversion; issue 20's budget is 25 per layer."""
    bench = _ops_per_step()
    model = bench.build("tiny", torch.bfloat16)
    for batch in (1, 3):
        row = bench.count_step(model, batch)
        assert row["dtype_conversions"] == 0 and row["step_dtype_conversions"] == 0, row
        assert row["ops_per_layer"] <= OPS_CEILING, row
        for op in ("mla_decode", "mla_cache_store", "moe_route", "moe_gate_up", "moe_down"):
            assert row["layer_ops"].get(f"dsworker::{op}") == 1, (op, row["layer_ops"])
        assert row["layer_ops"]["dsworker::add_rms_norm"] == 2
        assert "aten::silu" not in row["layer_ops"], row["layer_ops"]  # no separate shared MLP


def test_the_counter_sees_conversions() -> None:
    """The counting mode itself: a .float() and a cross-dtype copy_ count, a same-dtype copy not."""
    counter = _ops_per_step().OpCounter()
    x = torch.ones(4, dtype=torch.bfloat16)
    with counter:
        x.float()
        torch.empty(4).copy_(x)
        torch.empty(4, dtype=torch.bfloat16).copy_(x)
        x.view(2, 2)
    assert counter.conversions[None] == 2
    assert counter.views[None] == 1
    assert sum(counter.kernels[None].values()) == 5  # to_copy, 2 empty, 2 copy_


def _job(model: Path, plan: ParallelPlan, prompts: list[list[int]], level: int) -> GenerateJob:
    return GenerateJob(model=str(model), plan=plan, prompts=prompts, max_new_tokens=6,
                       moe=MoEOptions(ep_level=level), dtype="float32",
                       keep_logits=True)  # fmt: skip


def test_ranks_without_tokens_take_part_in_ep_steps(tiny_v3: Path, tmp_path: Path) -> None:
    """One prompt over dp 2: the second dp group has no tokens in any step yet joins every
    AllGather / AllToAll (0-row routing); the first gets world 1's tokens and logits."""
    prompt = [PROMPTS[0]]
    want = run_local(_job(tiny_v3, P1, prompt, 1))
    plan = ParallelPlan(2, 2, 1, 1, 2)
    jobs = {f"level{lv}": _job(tiny_v3, plan, prompt, lv) for lv in (1, 2)}
    for name, got in spawn_world(2, jobs, tmp_path).items():
        assert got.error is None, f"{name}: {got.error}"
        assert got.tokens == want.tokens, name
        err = (got.logits["prompt_0"] - want.logits["prompt_0"]).abs().max().item()
        assert err <= 1e-4, f"{name}: logits differ by {err:.2e}"
