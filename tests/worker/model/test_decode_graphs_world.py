"""Fixed-shape decode steps on worlds of 2 and 4 ranks (gloo on CPU) equal the ordinary eager steps.

Each rank decodes the same tokens through both paths; the fixed-shape one pads every rank to the
bucket of the busiest dp group and exchanges MoE rows through static collectives (EP level 1) or
fixed-capacity AllToAll buffers (EP level 2), which is what a captured graph replays. A rank whose
dp group has no sequences runs the padded step. The capture itself needs CUDA (test at the end).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS
from graph_helpers import Scenario, compare_steps

from dsworker.contract.layout import ParallelPlan
from dsworker.engine.loader import load_weights
from dsworker.model import Batch, DeepseekModel, EngineOptions, ModelArgs
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.model.moe import FUSED_MAX_ROWS, MoE, MoEOptions
from dsworker.model.moe_fixed import run_experts
from dsworker.parallel.device import Device
from dsworker.parallel.device_graphs import graph_api
from dsworker.parallel.groups import build_groups, spawn_local

EP2 = MoEOptions(ep_level=2)
# Prefill (>= 4 tokens per rank) gets room for every row; a decode step (2 tokens per rank) gets
# one row per destination, and two tokens of top-2 routing cannot all fit in two ranks' rows.
TIGHT = MoEOptions(ep_level=2, buffer_scale_factors=((4, 4.0), (0, 0.5)))

WORLDS = {
    2: {
        "dp2-ep1": Scenario(ParallelPlan(2, 2, 1, 1, 2), PROMPTS),
        "tp2-ep2": Scenario(ParallelPlan(2, 1, 2, 1, 2), PROMPTS, EP2),
        "dp2-ep2-one-idle": Scenario(ParallelPlan(2, 2, 1, 1, 2), PROMPTS[:1], EP2),
        "tp2-ep2-overflow": Scenario(ParallelPlan(2, 1, 2, 1, 2), PROMPTS, TIGHT, steps=2),
    },
    4: {
        "dp2-tp2-moetp2-ep1": Scenario(ParallelPlan(4, 2, 2, 2, 2), PROMPTS),
        "dp2-tp2-moetp2-ep2": Scenario(ParallelPlan(4, 2, 2, 2, 2), PROMPTS, EP2),
        "dp4-ep2-one-idle": Scenario(ParallelPlan(4, 4, 1, 1, 4), PROMPTS, EP2),
        "dp4-ep1-one-idle": Scenario(ParallelPlan(4, 4, 1, 1, 4), PROMPTS),
    },
}


def run_world(
    nproc: int,
    ckpt: Path,
    out: Path,
    kind: str = "cpu",
    capture: bool = False,
    compile_backend: str | None = None,
) -> dict[str, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    spawn_local(
        nproc, compare_steps, str(ckpt), WORLDS[nproc], str(out), kind, capture, compile_backend
    )
    return {
        name: [json.loads((out / f"{name}.{r}.json").read_text()) for r in range(nproc)]
        for name in WORLDS[nproc]
    }


@pytest.mark.parametrize("nproc", [2, 4])
def test_fixed_shape_steps_equal_eager_steps(tiny_v3: Path, tmp_path: Path, nproc: int) -> None:
    check(run_world(nproc, tiny_v3, tmp_path), nproc)


def test_compiled_steps_equal_eager_steps(
    tiny_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torch.compile (inductor, fullgraph) of the fixed-shape steps with their collectives traced:
    every world-2 scenario, the EP level 2 overflow refusal included, as eager gives it."""
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "inductor"))  # a fresh compile
    check(run_world(2, tiny_v3, tmp_path / "out", compile_backend="inductor"), 2)


def check(results: dict[str, list[dict]], nproc: int, tol: float = 1e-4) -> None:
    """Per rank and scenario: the same tokens, close logits, the same refusals."""
    for name, ranks in results.items():
        for r, rec in enumerate(ranks):
            where = f"{name}, rank {r}"
            if name.endswith("overflow"):
                assert rec["eager_error"] and "AllToAll buffer" in rec["eager_error"], where
                assert rec["fixed_error"] and "fixed-shape decode step" in rec["fixed_error"], where
                assert len(rec["fixed_logits"]) == len(rec["eager_logits"]) == 0, where
                continue
            assert rec["eager_error"] is None and rec["fixed_error"] is None, where
            assert rec["fixed"] == rec["eager"], where
            assert len(rec["fixed_logits"]) == len(rec["eager_logits"]) == WORLDS[nproc][name].steps
            for s, (got, want) in enumerate(
                zip(rec["fixed_logits"], rec["eager_logits"], strict=True)
            ):
                torch.testing.assert_close(
                    torch.tensor(got), torch.tensor(want), rtol=tol, atol=tol,
                    msg=lambda m, s=s, where=where: f"{where}, step {s}: {m}",
                )  # fmt: skip
    idle = results["dp2-ep2-one-idle" if nproc == 2 else "dp4-ep2-one-idle"]
    assert idle[-1]["fixed"] == [] and idle[0]["fixed"], "the idle rank ran padded steps only"


def test_graph_capture_api_is_found_or_refused_with_a_reason(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """cpu has none; an npu without torch_npu (or without its graph API) says why in the log."""
    import sys

    with caplog.at_level(logging.INFO, logger="dsworker.parallel"):
        assert graph_api("cpu") is None
        monkeypatch.setitem(sys.modules, "torch_npu", None)  # an image without torch_npu
        assert graph_api("npu") is None
    assert "no graph capture on cpu" in caplog.text
    assert "NPU graph capture unavailable: torch_npu is not installed" in caplog.text


def test_fixed_exchange_expert_paths_agree() -> None:
    """Past FUSED_MAX_ROWS the fixed exchanges run the static combine, -1 slots weighing nothing:
    it must equal the fused ops on the same rows."""
    from dsworker.model.experts import LocalExperts

    torch.manual_seed(0)
    ex = LocalExperts(4, 0, 16, 8, torch.float32, torch.device("cpu"))
    ex.w13.normal_()
    ex.w2.normal_()
    x = torch.randn(70, 16)
    ids = torch.randint(-1, 4, (70, 2))  # 140 rows: over the fused limit
    weights = torch.rand(70, 2)

    class Holder:
        experts = ex

    assert ids.numel() > FUSED_MAX_ROWS  # what the exchanges then ask for: fused=False
    combined = run_experts(Holder(), x, ids, weights, False)  # type: ignore[arg-type]
    torch.testing.assert_close(combined, ex.fused(x, ids, weights), rtol=1e-5, atol=1e-5)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: graph capture needs one"
)


@needs_cuda
@pytest.mark.parametrize("ep_level", [1, 2])
def test_captured_fixed_exchanges_equal_eager_on_one_gpu(tiny_v3: Path, ep_level: int) -> None:
    """The fixed exchanges' own kernels (routing to buffers, one-hot places, gathers back) under
    capture on one GPU: a world of one rank told to exchange (its collectives are no-ops)."""
    plan = ParallelPlan(1, 1, 1, 1, 1)
    dev = Device.create("cuda")
    runs = []
    for capture in (False, True):
        opts = EngineOptions(moe=MoEOptions(ep_level=ep_level))
        model = DeepseekModel(ModelArgs.from_dir(tiny_v3), build_groups(plan, 0, "nccl"), opts,
                              torch.float32, dev.torch)  # fmt: skip
        load_weights(model.targets(), tiny_v3, plan, 0, dev)
        for m in model.modules():
            if isinstance(m, MoE):
                m.local_only = False
        graphs = DecodeGraphs(model, model.new_cache(4, 64), 4, capture=capture)
        out = model.forward(Batch.build([(i, 0, p) for i, p in enumerate(PROMPTS)], dev.torch),
                            graphs.cache)  # fmt: skip
        tokens = [[t] for t in out.logits.argmax(-1).tolist()]
        steps = []
        for s in range(8):
            pos = [len(p) + s for p in PROMPTS]
            logits = graphs.run(list(range(len(PROMPTS))), pos, [[t[-1]] for t in tokens])
            steps.append(logits.cpu())
            for t, nxt in zip(tokens, logits.argmax(-1).tolist(), strict=True):
                t.append(nxt)
        runs.append((tokens, steps))
        assert bool(graphs.graphs) == capture
    assert runs[0][0] == runs[1][0]
    for eager, replay in zip(runs[0][1], runs[1][1], strict=True):
        torch.testing.assert_close(replay, eager, rtol=1e-4, atol=1e-4)


@pytest.mark.skipif(
    torch.cuda.device_count() < 2, reason="a captured multi-rank step needs 2 CUDA devices (nccl)"
)
def test_captured_multi_rank_steps_equal_eager_steps(tiny_v3: Path, tmp_path: Path) -> None:
    """World 2 over nccl: the collectives captured with the step, replayed per bucket."""
    check(run_world(2, tiny_v3, tmp_path, kind="cuda", capture=True), 2, tol=1e-3)
