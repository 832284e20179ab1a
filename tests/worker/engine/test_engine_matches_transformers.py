"""The engine against HuggingFace transformers on tiny random DeepSeek checkpoints (CPU, gloo).

Every plan must give transformers' logits (fp32, atol 1e-4) for a batch of prompts of different
lengths, and the same 16 greedy tokens. Worlds of 2 and 4 ranks are real spawned processes; each
spawn runs several plans in turn, since starting processes dominates the runtime on 2 cores.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from engine_helpers import (
    ATOL,
    NEW_TOKENS,
    PROMPTS,
    FakeAccelerator,
    Outcome,
    Reference,
    assert_matches,
    dequantized_copy,
    hf_mtp_logits,
    hf_reference,
    job,
    run_local,
    spawn_world,
)

from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import weight_bytes
from dsworker.engine.weight_files import LoadError, check_sharded
from dsworker.model.moe import MoEOptions, a2a_capacity
from dsworker.tools.shard import shard

BF16_ATOL = 0.02  # bf16 compute against the fp32 reference: observed ~4e-3 on logits ~0.6
P1 = ParallelPlan(1, 1, 1, 1, 1)


def plan(w: int, dp: int, tp: int, moe_tp: int, moe_ep: int) -> ParallelPlan:
    return ParallelPlan(w, dp, tp, moe_tp, moe_ep)


def assert_holds_modelled_bytes(out: Outcome, ckpt: Path, p: ParallelPlan) -> None:
    """Each rank's model holds what the memory model says (fp32 compute: 4-byte float parts)."""
    cfg = json.loads((ckpt / "config.json").read_text())
    assert out.weight_bytes == weight_bytes(cfg, p, mtp=False, dtype_bytes=4).device


# -- checkpoints and references (built once per module) --------------------------------------------


@pytest.fixture(scope="module")
def ckpts(
    synth_checkpoint: Callable[..., Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Path]:
    out = {
        "v3": synth_checkpoint("v3", "tiny", "bf16", mtp=True),
        "v3_noq": synth_checkpoint("v3", "tiny", "bf16", overrides={"q_lora_rank": None}),
        "v2": synth_checkpoint("v2", "tiny", "bf16"),
        "v2_glg": synth_checkpoint(
            "v2",
            "tiny",
            "bf16",
            overrides={"topk_method": "group_limited_greedy", "n_group": 4, "topk_group": 2},
        ),
    }
    for fmt in ("fp8", "w8a8", "w8a16"):
        out[fmt] = synth_checkpoint("v3", "tiny", fmt)
        out[f"{fmt}_deq"] = dequantized_copy(out[fmt], tmp_path_factory.mktemp(f"deq-{fmt}"))
    return out


@pytest.fixture(scope="module")
def refs(ckpts: dict[str, Path]) -> dict[str, Reference]:
    kinds = ("v3", "v3_noq", "v2", "v2_glg", "fp8_deq", "w8a8_deq", "w8a16_deq")
    # W8A8 quantises activations per token by definition: its reference rounds them alike.
    out = {k: hf_reference(ckpts[k], int8_inputs=k == "w8a8_deq") for k in kinds}
    # ...rounded per rank's slice where a row-parallel weight's input is split (o_proj, down_proj)
    for tp, moe_tp in ((2, 2), (4, 1)):
        ref = hf_reference(ckpts["w8a8_deq"], int8_inputs=True, tp=tp, moe_tp=moe_tp)
        out[f"w8a8_deq_tp{tp}_moetp{moe_tp}"] = ref
    return out


@pytest.fixture(scope="module")
def layouts(ckpts: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Sharded layouts written by `dsworker shard` (the sharder helper's code)."""
    root = tmp_path_factory.mktemp("layouts")
    specs = {
        "v3_w1": ("v3", P1, True),
        "v3_w2": ("v3", plan(2, 1, 2, 2, 1), True),
        "v3_w4": ("v3", plan(4, 2, 2, 2, 2), False),
        "fp8_w2": ("fp8", plan(2, 2, 1, 1, 2), False),
        "w8a8_w2": ("w8a8", plan(2, 1, 2, 2, 1), False),
    }
    out = {}
    for name, (src, p, mtp) in specs.items():
        shard(ckpts[src], root / name, p, mtp=mtp)
        out[name] = root / name
    return out


# -- world 1, in this process --------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v3", "v3_noq", "v2", "v2_glg"])
def test_world1_matches_transformers(
    kind: str, ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    assert_matches(run_local(job(ckpts[kind], P1)), refs[kind], kind)


def test_world1_grouped_matmul_and_cutoff(
    ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    grouped = run_local(job(ckpts["v3"], P1, grouped_matmul=True, routing_cutoff=1.0))
    assert_matches(grouped, refs["v3"], "grouped matmul, cutoff 1.0")
    assert grouped.dropped_rows == 0 and grouped.routed_rows > 0
    cut = run_local(job(ckpts["v3"], P1, routing_cutoff=0.25))
    assert cut.dropped_rows > 0  # the cutoff bites and is counted, not hidden
    assert cut.routed_rows + cut.dropped_rows == grouped.routed_rows


def test_world1_mtp(ckpts: dict[str, Path], refs: dict[str, Reference]) -> None:
    out = run_local(job(ckpts["v3"], P1, mtp=True))
    assert_matches(out, refs["v3"], "v3 with MTP loaded")
    for i in range(len(PROMPTS)):
        want = hf_mtp_logits(ckpts["v3"], refs["v3"], i, out.tokens[i][0])
        err = (out.logits[f"mtp_{i}"] - want).abs().max().item()
        assert err <= ATOL, f"MTP logits of prompt {i} differ by {err:.2e}"


@pytest.mark.parametrize("fmt", ["fp8", "w8a8", "w8a16"])
def test_world1_quantized_matches_dequantized(
    fmt: str, ckpts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    """Kept 8-bit, through the quantised ops in fp32: equal to transformers on the dequantised
    weights (W8A8: with its per-token int8 activations), same greedy ids."""
    out = run_local(job(ckpts[fmt], P1))
    assert_matches(out, refs[f"{fmt}_deq"], fmt)
    assert_holds_modelled_bytes(out, ckpts[fmt], P1)


def test_world1_sharded_equals_unsharded(
    layouts: dict[str, Path], refs: dict[str, Reference]
) -> None:
    out = run_local(job(layouts["v3_w1"], P1, mtp=True))
    assert_matches(out, refs["v3"], "sharded world 1")
    dirs = {Path(f).parent.name for f in out.files_by_rank[0]}
    assert dirs == set(P1.rank_dirs(0))


def test_plan_mismatch_is_refused_naming_fields(
    layouts: dict[str, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(LoadError) as e:
        check_sharded(layouts["v3_w2"], plan(2, 2, 1, 1, 2), mtp=False)
    msg = str(e.value)
    for fld in ("dp", "tp", "moeTp", "moeEp", "mtp"):
        assert f"{fld}:" in msg, msg
    assert "worldSize:" not in msg
    # The CLI says the same in one line and exits 2 (no spawn: the refusal comes first).
    from dsworker.cli import main

    rc = main(["generate", "--model", str(layouts["v3_w2"]), "--nproc", "1", "--prompt-ids", "1,2"])
    assert rc == 2 and "worldSize: the shards were cut for 2" in capsys.readouterr().err
    rc = main(
        [
            "generate",
            "--model",
            str(layouts["v3_w2"]),
            "--nproc",
            "2",
            "--tp",
            "1",
            "--prompt-ids",
            "1",
        ]
    )
    err = capsys.readouterr().err
    assert rc == 2 and "tp: the shards were cut for 2, the runtime uses 1" in err, err


def test_incomplete_layout_is_refused(layouts: dict[str, Path], tmp_path: Path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(layouts["v3_w1"], broken)
    (broken / "_COMPLETE").unlink()
    with pytest.raises(LoadError, match="_COMPLETE is missing"):
        check_sharded(broken, P1, mtp=True)


def test_buffer_sizing_rule() -> None:
    opts = MoEOptions()  # MindIE's table: first entry whose threshold <= tokens
    assert opts.buffer_factor(0) == 8.0 and opts.buffer_factor(8191) == 8.0
    assert opts.buffer_factor(8192) == 5.2 and opts.buffer_factor(2_000_000) == 1.32
    assert a2a_capacity(1.5, 100, 8, 4, 64) == 300  # ceil(1.5 * 100 * 8 / 4)
    assert a2a_capacity(8.0, 10, 2, 2, 4) == 20  # capped at tokens * min(top_k, experts/rank)


# -- spawned worlds ------------------------------------------------------------------------------


def test_world2_plans(
    ckpts: dict[str, Path], refs: dict[str, Reference], layouts: dict[str, Path], tmp_path: Path
) -> None:
    jobs = {
        "dp2_ep2_level1_cutoff1": job(ckpts["v3"], plan(2, 2, 1, 1, 2), routing_cutoff=1.0),
        "tp2_moetp2_level2_grouped_mtp": job(
            ckpts["v3"], plan(2, 1, 2, 2, 1), mtp=True, ep_level=2, grouped_matmul=True
        ),
        "v3noq_tp2_ep2_level2": job(ckpts["v3_noq"], plan(2, 1, 2, 1, 2), ep_level=2),
        "v2_dp2_moetp2_grouped": job(ckpts["v2"], plan(2, 2, 1, 2, 1), grouped_matmul=True),
        "sharded_tp2_moetp2_mtp": job(layouts["v3_w2"], plan(2, 1, 2, 2, 1), mtp=True, ep_level=2),
        "fp8_sharded_dp2_ep2": job(layouts["fp8_w2"], plan(2, 2, 1, 1, 2)),
        "w8a8_sharded_tp2": job(layouts["w8a8_w2"], plan(2, 1, 2, 2, 1), ep_level=2),
        "w8a16_tp2_moetp2_grouped": job(ckpts["w8a16"], plan(2, 1, 2, 2, 1), grouped_matmul=True),
        "overflow": job(
            ckpts["v3"], plan(2, 2, 1, 1, 2), ep_level=2, buffer_scale_factors=((0, 0.05),)
        ),
        "cutoff_quarter": job(ckpts["v3"], plan(2, 2, 1, 1, 2), routing_cutoff=0.25),
    }
    out = spawn_world(2, jobs, tmp_path)
    assert_matches(out["dp2_ep2_level1_cutoff1"], refs["v3"], "dp2 moeEp2 EP1 cutoff 1.0")
    assert out["dp2_ep2_level1_cutoff1"].dropped_rows == 0
    assert_matches(out["tp2_moetp2_level2_grouped_mtp"], refs["v3"], "tp2 moeTp2 EP2 grouped")
    assert_matches(out["v3noq_tp2_ep2_level2"], refs["v3_noq"], "v3 q_proj tp2 moeEp2 EP2")
    assert_matches(out["v2_dp2_moetp2_grouped"], refs["v2"], "v2 dp2 moeTp2 grouped")
    assert_matches(out["sharded_tp2_moetp2_mtp"], refs["v3"], "sharded tp2 moeTp2")
    assert_matches(out["fp8_sharded_dp2_ep2"], refs["fp8_deq"], "fp8 sharded dp2 moeEp2")
    assert_matches(out["w8a8_sharded_tp2"], refs["w8a8_deq_tp2_moetp2"], "w8a8 tp2 moeTp2")
    assert_matches(out["w8a16_tp2_moetp2_grouped"], refs["w8a16_deq"], "w8a16 tp2 moeTp2")
    for name, fmt in (("fp8_sharded_dp2_ep2", "fp8"), ("w8a8_sharded_tp2", "w8a8")):
        assert_holds_modelled_bytes(out[name], ckpts[fmt], jobs[name].plan)
    assert_holds_modelled_bytes(
        out["w8a16_tp2_moetp2_grouped"], ckpts["w8a16"], plan(2, 1, 2, 2, 1)
    )
    # MTP draft logits do not depend on the plan: world 2 equals the world-1 run.
    w1 = run_local(job(ckpts["v3"], P1, mtp=True))
    for i in range(len(PROMPTS)):
        for name in ("tp2_moetp2_level2_grouped_mtp", "sharded_tp2_moetp2_mtp"):
            err = (out[name].logits[f"mtp_{i}"] - w1.logits[f"mtp_{i}"]).abs().max().item()
            assert err <= ATOL, f"{name}: MTP logits of prompt {i} differ by {err:.2e}"
    # Each rank of the sharded run read exactly its metadata entry's directories.
    for r, files in out["sharded_tp2_moetp2_mtp"].files_by_rank.items():
        assert {Path(f).parent.name for f in files} == set(plan(2, 1, 2, 2, 1).rank_dirs(r))
    err = out["overflow"].error or ""
    assert "AllToAll buffer" in err and "alltoall_ep_buffer_scale_factors" in err, err
    assert out["cutoff_quarter"].dropped_rows > 0


def test_world4_plans(
    ckpts: dict[str, Path], refs: dict[str, Reference], layouts: dict[str, Path], tmp_path: Path
) -> None:
    jobs = {
        "dp2_tp2_moetp2_ep2_level1_mtp": job(ckpts["v3"], plan(4, 2, 2, 2, 2), mtp=True),
        "dp2_tp2_ep4_level2_grouped": job(
            ckpts["v3"], plan(4, 2, 2, 1, 4), ep_level=2, grouped_matmul=True
        ),
        "v2_dp4_ep4_level2": job(ckpts["v2"], plan(4, 4, 1, 1, 4), ep_level=2),
        "v3noq_tp4_moetp4_cutoff1": job(ckpts["v3_noq"], plan(4, 1, 4, 4, 1), routing_cutoff=1.0),
        "sharded_dp2_tp2_moetp2_ep2": job(layouts["v3_w4"], plan(4, 2, 2, 2, 2), ep_level=2),
        "w8a16_tp4_ep4": job(ckpts["w8a16"], plan(4, 1, 4, 1, 4)),
        "fp8_dp2_tp2_moetp2_ep2": job(ckpts["fp8"], plan(4, 2, 2, 2, 2), ep_level=2),
        "w8a8_tp4_ep4": job(ckpts["w8a8"], plan(4, 1, 4, 1, 4)),
    }
    out = spawn_world(4, jobs, tmp_path)
    assert_matches(out["dp2_tp2_moetp2_ep2_level1_mtp"], refs["v3"], "dp2 tp2 moeTp2 moeEp2 EP1")
    assert_matches(out["dp2_tp2_ep4_level2_grouped"], refs["v3"], "dp2 tp2 moeEp4 EP2 grouped")
    assert_matches(out["v2_dp4_ep4_level2"], refs["v2"], "v2 dp4 moeEp4 EP2 (one idle dp group)")
    assert_matches(out["v3noq_tp4_moetp4_cutoff1"], refs["v3_noq"], "tp4 moeTp4 cutoff 1.0")
    assert out["v3noq_tp4_moetp4_cutoff1"].dropped_rows == 0
    assert_matches(out["sharded_dp2_tp2_moetp2_ep2"], refs["v3"], "sharded dp2 tp2 moeTp2 moeEp2")
    assert_matches(out["w8a16_tp4_ep4"], refs["w8a16_deq"], "w8a16 tp4 moeEp4")
    assert_matches(out["fp8_dp2_tp2_moetp2_ep2"], refs["fp8_deq"], "fp8 dp2 tp2 moeTp2 moeEp2")
    assert_matches(out["w8a8_tp4_ep4"], refs["w8a8_deq_tp4_moetp1"], "w8a8 tp4 moeEp4")
    for name, fmt in (
        ("w8a16_tp4_ep4", "w8a16"),
        ("fp8_dp2_tp2_moetp2_ep2", "fp8"),
        ("w8a8_tp4_ep4", "w8a8"),
    ):
        assert_holds_modelled_bytes(out[name], ckpts[fmt], jobs[name].plan)
    w1 = run_local(job(ckpts["v3"], P1, mtp=True))
    for i in range(len(PROMPTS)):
        got = out["dp2_tp2_moetp2_ep2_level1_mtp"].logits[f"mtp_{i}"]
        assert (got - w1.logits[f"mtp_{i}"]).abs().max().item() <= ATOL


def test_cli_generate(ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path) -> None:
    """`dsworker generate` end to end: 2 spawned ranks, JSON on stdout, logits file."""
    dump = tmp_path / "logits.safetensors"
    prompts = ";".join(",".join(map(str, p)) for p in PROMPTS)
    cmd = [
        sys.executable,
        "-m",
        "dsworker.cli",
        "generate",
        "--model",
        str(ckpts["v2"]),
        "--nproc",
        "2",
    ]
    cmd += [
        "--dp",
        "2",
        "--moe-ep",
        "2",
        "--ep-level",
        "2",
        "--grouped-matmul",
        "on",
        "--dtype",
        "float32",
    ]
    cmd += [
        "--prompt-ids",
        prompts,
        "--max-new-tokens",
        str(NEW_TOKENS),
        "--dump-logits",
        str(dump),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads(proc.stdout.strip().splitlines()[-1])
    assert record["generated"] == refs["v2"].tokens
    from safetensors.torch import load_file

    logits = load_file(str(dump))
    for i, want in enumerate(refs["v2"].logits):
        assert logits[f"prompt_{i}"].dtype == torch.float32
        assert (logits[f"prompt_{i}"] - want).abs().max().item() <= ATOL


# -- loader details ------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["v3", "w8a16", "fp8"])
def test_pinned_buffer_path_loads_the_same(
    kind: str, ckpts: dict[str, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of tp2/moeTp2 (dim-0 and dim-1 slices) through tiny buffers equals the direct copy."""
    from dsworker.engine import host_to_device, loader
    from dsworker.model import DeepseekModel, EngineOptions, ModelArgs
    from dsworker.parallel.device import Device
    from dsworker.parallel.groups import build_groups

    p = plan(2, 1, 2, 2, 1)
    args = ModelArgs.from_dir(ckpts[kind])
    models = [
        DeepseekModel(args, build_groups(p, 1, "gloo"), EngineOptions(), torch.float32)
        for _ in range(2)
    ]
    direct = loader.load_weights(models[0].targets(), ckpts[kind], p, 1, Device.create("cpu"))
    monkeypatch.setattr(host_to_device, "BUFFER_BYTES", 4096)  # many chunks and alternations
    streamed = loader.load_weights(models[1].targets(), ckpts[kind], p, 1, FakeAccelerator())  # type: ignore[arg-type]
    assert streamed.bytes == direct.bytes > 0
    for (name, a), b in zip(models[0].targets().items(), models[1].targets().values(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("alias", ["qweight", "weight"])
def test_w8a16_weight_name_aliases(
    alias: str, ckpts: dict[str, Path], refs: dict[str, Reference], tmp_path: Path
) -> None:
    """weight_packed stored as qweight or as an int32 weight still loads (vLLM's failure mode)."""
    from safetensors.torch import load_file, save_file

    src = ckpts["w8a16"]
    shutil.copytree(
        src, tmp_path / "ck", ignore=shutil.ignore_patterns("*.safetensors", "*.index.json")
    )
    index = json.loads((src / "model.safetensors.index.json").read_text())
    renamed: dict[str, str] = {}
    for f in sorted(src.glob("*.safetensors")):
        tensors = {
            k.replace(".weight_packed", f".{alias}"): v for k, v in load_file(str(f)).items()
        }
        save_file(tensors, str(tmp_path / "ck" / f.name))
        renamed.update(dict.fromkeys(tensors, f.name))
    index["weight_map"] = renamed
    (tmp_path / "ck" / "model.safetensors.index.json").write_text(json.dumps(index))
    assert_matches(run_local(job(tmp_path / "ck", P1)), refs["w8a16_deq"], f"w8a16 as {alias}")


def test_bfloat16_close_to_float32(ckpts: dict[str, Path], refs: dict[str, Reference]) -> None:
    bf16 = run_local(dataclasses.replace(job(ckpts["v3"], P1), dtype="bfloat16", max_new_tokens=1))
    for i, want in enumerate(refs["v3"].logits):
        err = (bf16.logits[f"prompt_{i}"] - want).abs().max().item()
        assert err <= BF16_ATOL, f"bf16 prompt {i}: {err:.3f}"


def test_grouped_matmul_equals_expert_loop() -> None:
    from dsworker.model.experts import LocalExperts

    torch.manual_seed(0)
    ex = LocalExperts(4, 0, 16, 8, torch.float32, torch.device("cpu"))
    ex.w13.normal_()
    ex.w2.normal_()
    x = torch.randn(37, 16)
    eid = torch.randint(0, 4, (37,))
    eid[eid == 2] = 1  # an expert with no rows
    torch.testing.assert_close(ex(x, eid, grouped=True), ex(x, eid, grouped=False))


def test_attention_in_head_blocks_matches_transformers(
    ckpts: dict[str, Path], refs: dict[str, Reference], monkeypatch: pytest.MonkeyPatch
) -> None:
    """A long prefill expands keys and values a block of heads at a time (bounded memory);
    here blocks of 1 head."""
    from dsworker.model import attention

    monkeypatch.setattr(attention, "EXPAND_BYTES", 1)
    assert attention.heads_per_block(16, 11, 24, 4) == 1
    assert_matches(run_local(job(ckpts["v3"], P1)), refs["v3"], "head blocks")
