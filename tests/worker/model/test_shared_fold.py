"""Shared experts folded into the routed stack (model/shared_fold.py), at the model: which plans
fold and why not, the loader filling the chunked views from real checkpoints, each byte held once
(the memory model stays exact), and logits equal to the same model with the separate shared MLP."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from engine_helpers import PROMPTS

from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import weight_bytes
from dsworker.contract.quant import FP8, W8A8, W8A16, QuantFormat
from dsworker.engine.loader import _splits, load_weights
from dsworker.model import Batch, DeepseekModel, ModelArgs, MoEOptions, shared_fold
from dsworker.model.moe import MoE
from dsworker.model.quant_weights import held_bytes
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups
from dsworker.tools.synth_presets import make_config

P1 = ParallelPlan(1, 1, 1, 1, 1)
LONG = [(7 * i) % 300 + 1 for i in range(70)]  # 70 tokens * top_k 2 > 128: the separate path
ALL_DOWN = (r"re:.*mlp\..*down_proj$",)  # every MLP's down_proj kept in BF16, gate/up 8-bit
# (arch, format, config overrides, keep_float): n_shared 2 folds as 2 chunks (BF16, FP8 on whole
# blocks); W8A8 and W8A16 per channel fold a single chunk, V3/R1's one shared expert; a
# checkpoint keeping every down_proj in BF16 folds with a float down stack beside 8-bit gate/up.
CASES = {
    "v3-bf16": ("v3", "bf16", None, ()),
    "v2-bf16": ("v2", "bf16", None, ()),
    "v3-fp8": ("v3", "fp8", None, ()),
    "v3-w8a8-one-shared": ("v3", "w8a8", {"n_shared_experts": 1}, ()),
    "v3-w8a16-one-shared": ("v3", "w8a16", {"n_shared_experts": 1}, ()),
    "v3-w8a16-one-shared-float-down": ("v3", "w8a16", {"n_shared_experts": 1}, ALL_DOWN),
}


def _fold(args: ModelArgs, world: int, tp: int, moe_tp: int, **opts: object) -> tuple[int, str]:
    groups = SimpleNamespace(world=SimpleNamespace(size=world), tp=SimpleNamespace(size=tp),
                             moe_tp=SimpleNamespace(size=moe_tp))  # fmt: skip
    return shared_fold.chunks(args, groups, MoEOptions(**opts))  # type: ignore[arg-type]


def test_which_plans_fold() -> None:
    """S = n_shared * moe_tp / tp chunks where that is whole and the format splits without copies."""
    v3 = ModelArgs.from_config(make_config("v3", "tiny"))  # n_shared 2, moe_inter 32
    one = dataclasses.replace(v3, n_shared_experts=1)
    assert _fold(v3, 1, 1, 1, ep_level=2) == (2, "")  # world 1: no exchange, level 2 or not
    assert _fold(v3, 2, 1, 2) == (4, "")
    assert _fold(one, 4, 2, 2) == (1, "")
    assert "EP level 2" in _fold(v3, 2, 2, 2, ep_level=2)[1]
    assert "cutoff" in _fold(v3, 1, 1, 1, routing_cutoff=1.0)[1]
    assert "no multiple" in _fold(one, 2, 2, 1)[1]  # V3 at tp 2, moe_tp 1: half an expert
    assert _fold(dataclasses.replace(v3, n_shared_experts=0), 1, 1, 1)[0] == 0
    big = dataclasses.replace(v3, moe_intermediate_size=256)  # 2 chunks of 256 columns
    for fmt, s in (
        (QuantFormat(W8A8), 0),  # per-token input quantisation over the whole slice
        (QuantFormat(W8A16), 0),  # one per-channel down scale for both chunks
        (QuantFormat(W8A16, group_size=128), 2),
        (QuantFormat(FP8), 2),
        (QuantFormat(FP8, block=(96, 128)), 0),  # a chunk edge inside a block
    ):
        assert _fold(dataclasses.replace(big, quant=fmt, precision=None), 1, 1, 1)[0] == s, fmt
    assert _fold(dataclasses.replace(one, quant=QuantFormat(W8A8), precision=None), 1, 1, 1) == (
        1,
        "",
    )


def test_a_chunked_target_is_one_split_dimension() -> None:
    assert _splits((64, 32), (2, 32, 32)) and _splits((32, 64), (32, 2, 32))
    assert not _splits((64, 32), (2, 16, 32)) and not _splits((64, 32), (64, 32))
    assert not _splits((64, 32), (2, 2, 16, 32))


def _model(ckpt: Path, fold: bool, monkeypatch: pytest.MonkeyPatch) -> DeepseekModel:
    with monkeypatch.context() as m:
        if not fold:
            m.setattr(shared_fold, "chunks", lambda *_: (0, "switched off by the test"))
        dev = Device.create("cpu")
        model = DeepseekModel(ModelArgs.from_dir(ckpt), build_groups(P1, 0, "gloo"), None,
                              torch.float32, dev.torch)  # fmt: skip
        load_weights(model.targets(), ckpt, P1, 0, dev)
    return model


def _stack_tensors(moe: MoE) -> list[torch.Tensor]:
    ex, out = moe.experts, []
    for q, whole in ((ex.q13, "13"), (ex.q2, "2")):
        if q is None:
            out.append(getattr(ex, f"all{whole}"))
        else:
            qw = getattr(ex, f"qall{whole}")
            out += [t for t in (qw.data, qw.scale, qw.offset) if t is not None]
    return out


def _logits(model: DeepseekModel) -> list[torch.Tensor]:
    """Prefill (fused path), one decode step, and a long prompt (separate path)."""
    cache = model.new_cache(len(PROMPTS) + 1, 128)
    out = model.forward(Batch.build([(i, 0, p) for i, p in enumerate(PROMPTS)], model.device),
                        cache)  # fmt: skip
    step = [
        (i, len(p), [int(t)])
        for i, (p, t) in enumerate(zip(PROMPTS, out.logits.argmax(-1), strict=True))
    ]
    dec = model.forward(Batch.build(step, model.device), cache)
    long = model.forward(Batch.build([(len(PROMPTS), 0, LONG)], model.device), cache)
    return [out.logits, dec.logits, long.logits]


@pytest.mark.parametrize("case", sorted(CASES))
def test_folded_model_loads_and_equals_the_separate_mlp(
    case: str, synth_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    arch, fmt, overrides, keep = CASES[case]
    ckpt = synth_checkpoint(arch, "tiny", fmt, overrides=overrides, keep_float=keep)
    folded, separate = _model(ckpt, True, monkeypatch), _model(ckpt, False, monkeypatch)
    moes = [m for m in folded.modules() if isinstance(m, MoE)]
    assert moes and all(m.fold > 0 for m in moes), [m.fold_reason for m in moes]
    for moe in moes:  # the chunk MLPs hold views of the expert stacks' tail: no second copy
        stacks = {t.untyped_storage().data_ptr() for t in _stack_tensors(moe)}
        for p in moe.shared.parameters():
            assert p.untyped_storage().data_ptr() in stacks
    cfg = json.loads((ckpt / "config.json").read_text())
    want = weight_bytes(cfg, P1, dtype_bytes=4).device[0]
    assert held_bytes(folded) == held_bytes(separate) == want
    tol = 1e-5 if fmt == "bf16" else 1e-4
    for name, a, b in zip(("prefill", "decode", "long"), _logits(folded), _logits(separate),
                          strict=True):  # fmt: skip
        err = (a - b).abs().max().item()
        assert err <= tol, f"{case} {name}: folded differs from the separate MLP by {err:.2e}"


def test_shared_experts_in_another_precision_than_the_routed_ones_stay_separate(
    synth_checkpoint: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A layer whose shared experts the checkpoint keeps in BF16 beside FP8 routed experts keeps
    the separate MLP (its stack could not hold both); the other layer still folds."""
    keep = ("model.layers.1.mlp.shared_experts",)
    ckpt = synth_checkpoint("v3", "tiny", "fp8", keep_float=keep)
    model = _model(ckpt, True, monkeypatch)
    moes = {n: m for n, m in model.named_modules() if isinstance(m, MoE)}
    assert moes["layers.1.mlp"].fold == 0
    assert "different precisions" in moes["layers.1.mlp"].fold_reason
    assert moes["layers.2.mlp"].fold > 0, moes["layers.2.mlp"].fold_reason
    cfg = json.loads((ckpt / "config.json").read_text())
    assert held_bytes(model) == weight_bytes(cfg, P1, dtype_bytes=4).device[0]
