"""Fixed-shape decode steps on worlds of 2 and 4 ranks (gloo on CPU) equal the ordinary eager steps.

Each rank decodes the same tokens through both paths; the fixed-shape one pads every rank to the
bucket of the busiest dp group and exchanges MoE rows through static collectives (EP level 1) or
fixed-capacity AllToAll buffers (EP level 2), which is what a captured graph replays. A rank whose
dp group has no sequences runs the padded step. The capture itself needs CUDA (test at the end).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from engine_helpers import PROMPTS
from graph_helpers import Scenario, compare_steps

from dsworker.contract.layout import ParallelPlan
from dsworker.model.moe import MoEOptions
from dsworker.parallel.groups import spawn_local

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


def run_world(nproc: int, ckpt: Path, out: Path) -> dict[str, list[dict]]:
    out.mkdir(parents=True, exist_ok=True)
    spawn_local(nproc, compare_steps, str(ckpt), WORLDS[nproc], str(out))
    return {
        name: [json.loads((out / f"{name}.{r}.json").read_text()) for r in range(nproc)]
        for name in WORLDS[nproc]
    }


@pytest.mark.parametrize("nproc", [2, 4])
def test_fixed_shape_steps_equal_eager_steps(tiny_v3: Path, tmp_path: Path, nproc: int) -> None:
    results = run_world(nproc, tiny_v3, tmp_path)
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
                    torch.tensor(got), torch.tensor(want), rtol=1e-4, atol=1e-4,
                    msg=lambda m, s=s, where=where: f"{where}, step {s}: {m}",
                )  # fmt: skip
    idle = results["dp2-ep2-one-idle" if nproc == 2 else "dp4-ep2-one-idle"]
    assert idle[-1]["fixed"] == [] and idle[0]["fixed"], "the idle rank ran padded steps only"
