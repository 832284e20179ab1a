"""msModelSlim's mixed W8A8 (attention "W8A8" static, MoE and MLPs "W8A8_DYNAMIC") loads 8-bit, holds
the bytes the memory model says, and computes what transformers computes on the dequantised
weights with both input roundings modelled (static per tensor, dynamic per token): fp32, atol 1e-4,
the same greedy tokens, at world 1 and in a spawned world of 2 ranks (tp 2: column-parallel
q_b_proj split with its deq_scale and quant_bias, row-parallel o_proj whole input scale and its
quant_bias added on the first rank only). A float16 export's int64-packed deq_scale computes as the
float32 it packs. A static module missing a companion is refused naming it.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    Reference,
    assert_matches,
    dequantized_copy,
    hf_reference,
    job,
    run_local,
    spawn_world,
)
from quant_reference import static_inputs
from safetensors.torch import load_file, save_file
from test_mixed_precision import P1, TP2, assert_holds_modelled_bytes

from dsworker.contract.errors import CheckpointError
from dsworker.tools.shard import shard

STATIC = (r"re:.*self_attn\..*",)  # every attention projection, kv_b_proj too (held dequantised)


@pytest.fixture(scope="module")
def ckpts(
    synth_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    src = synth_checkpoint("v3", "tiny", "w8a8", static=STATIC)
    layout = tmp_path_factory.mktemp("layout-static")
    shard(src, layout, TP2)
    return {"src": src, "deq": dequantized_copy(src, tmp_path_factory.mktemp("deq-static")),
            "layout": layout}  # fmt: skip


@pytest.fixture(scope="module")
def refs(ckpts: dict[str, Path]) -> dict[str, Reference]:
    st = static_inputs(ckpts["src"])
    return {
        "w1": hf_reference(ckpts["deq"], int8_inputs=True, static=st),
        "tp2": hf_reference(ckpts["deq"], int8_inputs=True, tp=2, moe_tp=2, static=st),
    }


def test_the_checkpoint_mixes_static_attention_and_dynamic_experts(
    ckpts: dict[str, Path],
) -> None:
    desc = json.loads((ckpts["src"] / "quant_model_description_w8a8_dynamic.json").read_text())
    assert desc["model.layers.1.self_attn.o_proj.deq_scale"] == "W8A8"
    assert desc["model.layers.1.mlp.experts.0.up_proj.weight"] == "W8A8_DYNAMIC"
    assert len(static_inputs(ckpts["src"])) >= 8


def test_world1_matches_transformers_and_holds_the_modelled_bytes(
    ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    out = run_local(job(ckpts["src"], P1))
    assert_matches(out, refs["w1"], "w8a8 static+dynamic, world 1")
    assert_holds_modelled_bytes(out, ckpts["src"], P1)


def test_world2_tp2_layout(
    ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path
) -> None:
    out = spawn_world(2, {"static": job(ckpts["layout"], TP2)}, tmp_path)["static"]
    assert_matches(out, refs["tp2"], "w8a8 static+dynamic, world 2 (tp 2 layout)")
    assert_holds_modelled_bytes(out, ckpts["layout"], TP2)


def _edited(src: Path, dst: Path, name: str, to: torch.dtype | None) -> Path:
    """A copy of the checkpoint with tensor `name` removed (to None) or cast to `to`."""
    shutil.copytree(src, dst)
    index_path = dst / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    f = dst / index["weight_map"][name]
    tensors = load_file(str(f))
    if to is None:
        del tensors[name], index["weight_map"][name]
    else:
        tensors[name] = tensors[name].to(to)
    save_file(tensors, str(f))
    index_path.write_text(json.dumps(index))
    return dst


def test_a_static_module_missing_a_companion_is_refused_naming_it(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    gone = "model.layers.1.self_attn.o_proj.quant_bias"
    bad = _edited(ckpts["src"], tmp_path / "bad", gone, None)
    with pytest.raises(CheckpointError, match=gone.replace(".", r"\.")):
        shard(bad, tmp_path / "out", P1)


def _packed(src: Path, dst: Path) -> Path:
    """A copy with every deq_scale stored as msModelSlim's float16 exports store it: the float32's
    bits as int32, sign-extended to int64 (deqscale2int64)."""
    shutil.copytree(src, dst)
    for f in dst.glob("*.safetensors"):
        tensors = load_file(str(f))
        for name, t in tensors.items():
            if name.endswith(".deq_scale"):
                tensors[name] = t.float().view(torch.int32).to(torch.int64)
        save_file(tensors, str(f))
    return dst


def test_a_float16_exports_int64_deq_scale_computes_as_the_float32_it_packs(
    ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path
) -> None:
    packed = _packed(ckpts["src"], tmp_path / "packed")
    header = json.loads((packed / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.1.self_attn.o_proj.deq_scale"
    assert load_file(str(packed / header[name]))[name].dtype == torch.int64
    want, got = run_local(job(ckpts["src"], P1)), run_local(job(packed, P1))
    assert got.tokens == want.tokens
    for key, logits in want.logits.items():  # kv_b_proj (dequantised on load) and 8-bit slots
        assert torch.equal(got.logits[key], logits), key
    assert got.weight_bytes == want.weight_bytes  # held as float32, as the memory model counts
    layout = tmp_path / "layout"
    shard(packed, layout, TP2)
    out = spawn_world(2, {"packed": job(layout, TP2)}, tmp_path / "w2")["packed"]
    assert_matches(out, refs["tp2"], "int64 deq_scale, world 2 (tp 2 layout)")


@pytest.mark.parametrize(
    ("to", "says"),
    [(torch.int64, "cast to int64 by value"), (torch.int32, "is I32; a deq_scale is float32")],
)
def test_a_deq_scale_that_is_no_packed_float32_is_refused_naming_it(
    ckpts: dict[str, Path], tmp_path: Path, to: torch.dtype, says: str
) -> None:
    name = "model.layers.0.self_attn.q_a_proj.deq_scale"
    bad = _edited(ckpts["src"], tmp_path / "bad", name, to)
    with pytest.raises(CheckpointError, match=name.replace(".", r"\.") + ".*" + says):
        run_local(job(bad, P1))


def _retyped(src: Path, dst: Path, module: str, kind: str) -> Path:
    """A copy of the checkpoint whose msModelSlim description types `module` as `kind`."""
    shutil.copytree(src, dst)
    (path,) = dst.glob("quant_model_description*.json")
    desc = json.loads(path.read_text())
    desc[f"{module}.weight"] = kind
    path.write_text(json.dumps(desc))
    return dst


def test_a_static_module_the_description_calls_dynamic_is_refused_naming_it(
    ckpts: dict[str, Path], tmp_path: Path
) -> None:
    module = "model.layers.1.self_attn.o_proj"
    bad = _retyped(ckpts["src"], tmp_path / "bad", module, "W8A8_DYNAMIC")
    with pytest.raises(
        CheckpointError, match=rf'{module} is stored as static W8A8 .* does not type it "W8A8"'
    ):
        run_local(job(bad, P1))


def test_a_dynamic_module_the_description_calls_static_is_refused_naming_it(
    synth_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    module = "model.layers.1.self_attn.o_proj"
    bad = _retyped(synth_checkpoint("v3", "tiny", "w8a8"), tmp_path / "bad", module, "W8A8")
    with pytest.raises(
        CheckpointError, match=rf'{module}: the msModelSlim description types it "W8A8"'
    ):
        run_local(job(bad, P1))
