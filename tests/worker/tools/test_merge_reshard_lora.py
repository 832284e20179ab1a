"""lora-merge, verify and the dsworker CLI end to end (subprocess, real files)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dsworker.checkpoint import number_formats
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.safetensors_writer import save_arrays
from dsworker.checkpoint.sharded_metadata import read_metadata
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE, ParallelPlan
from dsworker.tools.lora_merge import lora_merge
from dsworker.tools.shard import shard
from dsworker.tools.verify import verify, verify_sharded

DSWORKER = str(Path(sys.executable).with_name("dsworker"))


def _tensors(root: Path) -> dict[str, tuple[str, np.ndarray]]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with SafetensorsReader(f) as r:
            out.update({n: (t.dtype, r.array(n)) for n, t in r.tensors.items()})
    return out


def _cli(*args: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    r = subprocess.run([DSWORKER, *args], capture_output=True, text=True, env=e, timeout=300)
    if check:
        assert r.returncode == 0, r.stderr
    return r


# ---------------------------------------------------------------- LoRA


def make_adapter(
    root: Path, base: dict[str, tuple[str, np.ndarray]], targets: list[str], r: int = 4, **cfg
) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A PEFT-layout adapter for `targets` (module names); returns {module: (A f32, B f32)}."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(3)
    tensors, ab = {}, {}
    for mod in targets:
        dtype, w = base[f"{mod}.weight"]
        out_f, in_f = w.shape
        a = rng.standard_normal((r, in_f)).astype(np.float32) * 0.1
        b = number_formats.bf16_to_f32(
            number_formats.f32_to_bf16(rng.standard_normal((out_f, r)).astype(np.float32) * 0.1)
        )
        tensors[f"base_model.model.{mod}.lora_A.weight"] = ("F32", a)
        tensors[f"base_model.model.{mod}.lora_B.weight"] = ("BF16", number_formats.f32_to_bf16(b))
        ab[mod] = (a, b)
    save_arrays(root / "adapter_model.safetensors", tensors)
    conf = {
        "peft_type": "LORA",
        "r": r,
        "lora_alpha": 8,
        "target_modules": ["q_b_proj", "o_proj", "gate_proj"],
    }
    conf.update(cfg)
    (root / "adapter_config.json").write_text(json.dumps(conf))
    return ab


TARGETS = [
    "model.layers.0.self_attn.q_b_proj",
    "model.layers.1.self_attn.o_proj",
    "model.layers.2.mlp.experts.5.gate_proj",
]


def _torch_reference(w_f32: np.ndarray, a: np.ndarray, b: np.ndarray, s: float) -> np.ndarray:
    import torch

    merged = torch.from_numpy(w_f32) + s * (torch.from_numpy(b) @ torch.from_numpy(a))
    return merged.to(torch.bfloat16).float().numpy()


@pytest.mark.parametrize("rslora", [False, True])
def test_lora_merge_bf16(tiny_v3: Path, tmp_path: Path, rslora: bool) -> None:
    base = _tensors(tiny_v3)
    ab = make_adapter(tmp_path / "ad", base, TARGETS, use_rslora=rslora)
    res = lora_merge(tiny_v3, tmp_path / "ad", tmp_path / "out")
    assert res["mergedModules"] == 3
    got = _tensors(tmp_path / "out")
    assert got.keys() == base.keys()
    s = 8 / 2.0 if rslora else 8 / 4
    for name, (dtype, arr) in base.items():
        mod = name[: -len(".weight")]
        if mod in ab:
            want = _torch_reference(number_formats.bf16_to_f32(arr), *ab[mod], s)
            have = number_formats.bf16_to_f32(got[name][1])
            assert got[name][0] == "BF16"
            # float32 sums may differ in order; allow one bf16 ulp on a few elements
            assert np.allclose(have, want, rtol=2**-7, atol=1e-6), name
            assert (have != want).mean() < 0.01
            assert not np.array_equal(have, number_formats.bf16_to_f32(arr))
        else:
            assert got[name][0] == dtype and np.array_equal(got[name][1], arr), name
    assert verify(tmp_path / "out") == ("hf", [])


def test_lora_merge_fp8_base(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8")
    base = _tensors(src)
    ab = make_adapter(tmp_path / "ad", base, TARGETS)
    lora_merge(src, tmp_path / "ad", tmp_path / "out")
    got = _tensors(tmp_path / "out")
    cfg = json.loads((tmp_path / "out" / "config.json").read_text())
    assert cfg["quantization_config"]["quant_method"] == "fp8"
    assert sorted(cfg["quantization_config"]["modules_to_not_convert"]) == sorted(TARGETS)
    for mod, (a, b) in ab.items():
        assert f"{mod}.weight_scale_inv" not in got
        codes = base[f"{mod}.weight"][1]
        scale = base[f"{mod}.weight_scale_inv"][1]
        w = (
            number_formats.fp8_e4m3_to_f32(codes)
            * np.kron(scale, np.ones((128, 128), np.float32))[: codes.shape[0], : codes.shape[1]]
        )
        dtype, have = got[f"{mod}.weight"]
        assert dtype == "BF16"
        assert np.allclose(
            number_formats.bf16_to_f32(have), _torch_reference(w, a, b, 2.0), rtol=2**-7, atol=1e-6
        )
    untouched = "model.layers.2.mlp.experts.4.gate_proj.weight"
    assert got[untouched][0] == "F8_E4M3" and np.array_equal(got[untouched][1], base[untouched][1])
    assert f"{untouched[:-7]}.weight_scale_inv" in got
    assert verify(tmp_path / "out") == ("hf", [])
    # the merged checkpoint shards like any FP8 checkpoint (mixed BF16/FP8 weights)
    shard(tmp_path / "out", tmp_path / "s", ParallelPlan(2, 1, 2, 2, 1))


@pytest.mark.parametrize("fmt", ["bf16", "fp8"])
def test_lora_merge_sharded_equals_hf_path(synth_checkpoint, tmp_path: Path, fmt: str) -> None:
    """lora-merge on a layout (slice by slice) == shard of lora-merge on the HF checkpoint."""
    from dsworker.tools.merge import merge

    src = synth_checkpoint("v3", "tiny", fmt, mtp=True)
    make_adapter(tmp_path / "ad", _tensors(src), TARGETS)
    plan = ParallelPlan(4, 2, 2, 2, 2)
    lora_merge(src, tmp_path / "ad", tmp_path / "hf_lora")
    shard(tmp_path / "hf_lora", tmp_path / "a", plan, mtp=True)
    shard(src, tmp_path / "base", plan, mtp=True)
    res = lora_merge(tmp_path / "base", tmp_path / "ad", tmp_path / "b")
    assert (
        res["mergedModules"] == 3
        and res["fingerprint"] != read_metadata(tmp_path / "base").fingerprint
    )
    assert verify_sharded(tmp_path / "b") == []
    assert json.loads((tmp_path / "b" / "config.json").read_text()) == json.loads(
        (tmp_path / "a" / "config.json").read_text()
    )
    merge(tmp_path / "a", tmp_path / "ma")
    merge(tmp_path / "b", tmp_path / "mb")
    ta, tb = _tensors(tmp_path / "ma"), _tensors(tmp_path / "mb")
    assert ta.keys() == tb.keys()
    for name, (dtype, arr) in ta.items():
        assert tb[name][0] == dtype
        if name[: -len(".weight")] in TARGETS:
            x, y = number_formats.bf16_to_f32(arr), number_formats.bf16_to_f32(tb[name][1])
            assert np.allclose(x, y, rtol=2**-7, atol=1e-6), name
        else:
            assert np.array_equal(arr, tb[name][1]), name


def test_lora_merge_refuses_bad_adapters(tiny_v3: Path, synth_checkpoint, tmp_path: Path) -> None:
    base = _tensors(tiny_v3)
    make_adapter(tmp_path / "ad", base, ["model.layers.0.self_attn.q_b_proj"])
    with pytest.raises(CheckpointError, match="w8a8 integer weights"):
        lora_merge(synth_checkpoint("v3", "tiny", "w8a8"), tmp_path / "ad", tmp_path / "o1")
    bad = tmp_path / "bad"
    make_adapter(bad, base, ["model.layers.0.self_attn.q_b_proj"])
    save_arrays(
        bad / "adapter_model.safetensors",
        {
            "base_model.model.model.layers.0.self_attn.q_b_proj.lora_A.weight": (
                "F32",
                np.zeros((4, 7), np.float32),
            ),
            "base_model.model.model.layers.0.self_attn.q_b_proj.lora_B.weight": (
                "F32",
                np.zeros((192, 4), np.float32),
            ),
        },
    )
    with pytest.raises(CheckpointError, match="trained for another model"):
        lora_merge(tiny_v3, bad, tmp_path / "o2")
    save_arrays(
        bad / "adapter_model.safetensors",
        {"base_model.model.lm_head.modules_to_save.weight": ("F32", np.zeros((2, 2), np.float32))},
    )
    with pytest.raises(CheckpointError, match="not a LoRA A/B weight"):
        lora_merge(tiny_v3, bad, tmp_path / "o3")
    shard(synth_checkpoint("v3", "tiny", "w8a16"), tmp_path / "sh", ParallelPlan(1, 1, 1, 1, 1))
    with pytest.raises(CheckpointError, match="w8a16 integer weights"):
        lora_merge(tmp_path / "sh", tmp_path / "ad", tmp_path / "o4")


# ---------------------------------------------------------------- verify


@pytest.fixture
def sharded(tiny_v3: Path, tmp_path: Path) -> Path:
    out = tmp_path / "s"
    shard(tiny_v3, out, ParallelPlan(4, 2, 2, 2, 2), mtp=True, checksum=True)
    assert verify_sharded(out) == []
    return out


def test_verify_extra_and_missing_files(sharded: Path) -> None:
    (sharded / "model-norm" / "stray.bin").write_bytes(b"x")
    (sharded / "model-003" / "model.safetensors").unlink()
    probs = verify_sharded(sharded)
    assert any("stray.bin: on disk but not listed" in p for p in probs)
    assert any("model-003/model.safetensors: listed in" in p and "missing" in p for p in probs)


def test_verify_size_checksum_header(sharded: Path) -> None:
    f = sharded / "model-attn-tp-001" / "model.safetensors"
    data = bytearray(f.read_bytes())
    data[-1] ^= 0xFF  # same size, different bytes
    f.write_bytes(bytes(data))
    assert any("sha256 differs" in p for p in verify_sharded(sharded))
    f.write_bytes(bytes(data[:-2]))
    assert any("bytes, metadata says" in p for p in verify_sharded(sharded))


def test_verify_metadata_tensor_list_and_seal(sharded: Path) -> None:
    md = json.loads((sharded / METADATA_FILE).read_text())
    md["tensors"] = [t for t in md["tensors"] if t["name"] != "model.norm.weight"]
    md["ranks"][1]["dirs"][2] = "model-attn-tp-000"
    (sharded / METADATA_FILE).write_text(json.dumps(md))
    probs = verify_sharded(sharded)
    assert any("_COMPLETE" in p and "does not match" in p for p in probs)
    assert any("model.norm.weight is not listed in the metadata" in p for p in probs)
    assert any("rank 1" in p and "rank arithmetic" in p for p in probs)
    (sharded / COMPLETE_MARKER).unlink()
    assert any("no _COMPLETE" in p for p in verify_sharded(sharded))


def test_verify_cli(sharded: Path, tiny_v3: Path, tmp_path: Path) -> None:
    r = _cli("verify", str(sharded))
    assert json.loads(r.stdout) == {
        "dir": str(sharded),
        "kind": "sharded",
        "ok": True,
        "problems": 0,
    }
    assert json.loads(_cli("verify", str(tiny_v3)).stdout)["kind"] == "hf"
    bad = Path(shutil.copytree(tiny_v3, tmp_path / "bad"))
    f = bad / "model-00001-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:-10])
    r = _cli("verify", str(bad), check=False)
    assert r.returncode == 2 and "truncated" in r.stderr and "Traceback" not in r.stderr
    r = _cli("verify", str(tmp_path), check=False)
    assert r.returncode == 2 and "neither a sharded layout" in r.stderr


# ---------------------------------------------------------------- CLI end to end


def test_cli_shard_merge_reshard(tiny_v3: Path, tmp_path: Path) -> None:
    log = tmp_path / "termination-log"
    env = {"DSOP_TERMINATION_LOG": str(log), "DSOP_PROGRESS_INTERVAL": "0"}
    out = tmp_path / "s"
    r = _cli(
        "shard", "--model_path", str(tiny_v3), "--save_directory", str(out), "--world-size", "4",
        "--dp", "2", "--tp", "2", "--moe_tp", "2", "--moe_ep", "2", "--mtp", "--processes", "2",
        "--checksum", env=env,
    )  # fmt: skip
    summary = json.loads(r.stdout)
    assert set(summary) >= {"bytes", "files", "seconds", "throughputMBps", "fingerprint"}
    assert summary["files"] == len(read_metadata(out).files)
    assert json.loads(log.read_text()) == summary
    progress = [ln for ln in r.stderr.splitlines() if ln.startswith("shard: ")]
    assert progress and "GB/s" in progress[-1] and "ETA" in progress[-1]
    r2 = _cli(
        "shard", "--model-path", str(tiny_v3), "--save-directory", str(out), "--world-size", "4",
        "--tp", "2", "--moe-tp", "2", "--mtp", "--fingerprint", summary["fingerprint"],
    )  # fmt: skip
    assert json.loads(r2.stdout)["skipped"] is True
    _cli("merge", str(out), str(tmp_path / "m"))
    _cli(
        "reshard",
        str(out),
        str(tmp_path / "r"),
        "--world-size",
        "2",
        "--tp",
        "1",
        "--moe-tp",
        "1",
        "--mtp",
    )
    assert read_metadata(tmp_path / "r").plan["moeEp"] == 2
    _cli("verify", str(tmp_path / "r"))
    assert _tensors(tmp_path / "m").keys() == _tensors(tiny_v3).keys()


def test_cli_keeps_torch_out_of_the_sharder(tiny_v3: Path, tmp_path: Path) -> None:
    code = (
        "import sys; from dsworker import cli; "
        f"rc = cli.main(['shard', '--model-path', {str(tiny_v3)!r}, '--save-directory', "
        f"{str(tmp_path / 'o')!r}, '--world-size', '2', '--tp', '2', '--moe-tp', '2']); "
        "rc |= cli.main(['verify', " + repr(str(tmp_path / "o")) + "]); "
        "assert rc == 0; assert 'torch' not in sys.modules, 'torch imported'; "
        "assert 'transformers' not in sys.modules"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    r = subprocess.run([DSWORKER, "--help"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "shard" in r.stdout and "lora-merge" in r.stdout


def test_merged_checkpoint_runs_in_transformers(tiny_v3: Path, tmp_path: Path) -> None:
    import torch
    from transformers import DeepseekV3ForCausalLM

    shard(tiny_v3, tmp_path / "s", ParallelPlan(8, 2, 4, 2, 4), mtp=True)
    from dsworker.tools.merge import merge

    merge(tmp_path / "s", tmp_path / "m")
    ids = torch.tensor([[0, 2, 80, 90, 100, 3]])
    with torch.no_grad():
        a = DeepseekV3ForCausalLM.from_pretrained(tiny_v3)(ids).logits
        b = DeepseekV3ForCausalLM.from_pretrained(tmp_path / "m")(ids).logits
    assert torch.equal(a, b)
