"""Review fixes in the checkpoint tools: output lock, wipe order, names from metadata/index, scale
dtypes, missing tensors, LoRA salt through reshard, the aux-file allow-list."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

import dsworker.tools.output_dir as output_dir
from dsworker.checkpoint import number_formats
from dsworker.checkpoint.hf_checkpoint import open_checkpoint
from dsworker.checkpoint.planned_files import OutEntry, OutFile
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.safetensors_writer import save_arrays
from dsworker.checkpoint.sharded_metadata import complete_token, is_complete, read_metadata
from dsworker.checkpoint.writer_processes import run_jobs
from dsworker.contract.errors import EXIT_BUSY, CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE, ParallelPlan
from dsworker.tools.lora_merge import lora_merge
from dsworker.tools.merge import merge
from dsworker.tools.output_dir import IN_PROGRESS_MARKER, lock_path
from dsworker.tools.reshard import reshard
from dsworker.tools.shard import shard
from dsworker.tools.verify import verify_sharded
from waiting import wait_until

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
PLAN2 = ParallelPlan(2, 1, 2, 2, 1)
PLAN4 = ParallelPlan(4, 2, 2, 2, 2)
WORKER_IMAGE = Path(output_dir.__file__).resolve().parents[2]


def _copy(src: Path, dst: Path) -> Path:
    return Path(shutil.copytree(src, dst))


def _index(ck: Path) -> dict:
    return json.loads((ck / "model.safetensors.index.json").read_text())


def _rewrite(ck: Path, drop: tuple[str, ...] = (), change: dict | None = None) -> None:
    """Drop or replace tensors in a checkpoint copy, keeping the index in step."""
    idx = _index(ck)
    wm = idx["weight_map"]
    for fname in sorted(set(wm.values())):
        names = [n for n in wm if wm[n] == fname]
        if not any(n in drop or n in (change or {}) for n in names):
            continue
        with SafetensorsReader(ck / fname) as r:
            ts = {
                n: (t.dtype, r.array(n))
                for n, t in sorted(r.tensors.items(), key=lambda kv: kv[1].begin)
            }
        for n in drop:
            ts.pop(n, None)
        for n, v in (change or {}).items():
            if n in ts:
                ts[n] = v
        save_arrays(ck / fname, ts)
    for n in drop:
        wm.pop(n)
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))


# ------------------------------------------------------------------ 1. one writer per output dir


def test_second_sharder_is_refused_while_the_first_runs(tiny_v3: Path, tmp_path: Path) -> None:
    """Two real processes: B must neither wipe A's live output nor let A seal over missing shards."""
    out, started, go = tmp_path / "out", tmp_path / "started", tmp_path / "go"
    script = textwrap.dedent(
        f"""
        import sys, time
        from pathlib import Path
        import dsworker.tools.layout_writer as w
        from dsworker.contract.layout import ParallelPlan
        from dsworker.tools.shard import shard
        real = w.run_jobs
        def paused(*a, **k):
            Path({str(started)!r}).touch()
            while not Path({str(go)!r}).exists():
                time.sleep(0.01)
            return real(*a, **k)
        w.run_jobs = paused
        shard({str(tiny_v3)!r}, {str(out)!r}, ParallelPlan(2, 1, 2, 2, 1), mtp=True)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(WORKER_IMAGE))
    a = subprocess.Popen([sys.executable, "-c", script], env=env, stderr=subprocess.PIPE, text=True)
    try:

        def paused() -> bool:
            assert a.poll() is None, a.stderr.read() if a.stderr else ""
            return started.exists()

        wait_until(paused, 60, "the first sharder to pause before writing")
        live = sorted(p.name for p in out.iterdir())
        assert IN_PROGRESS_MARKER in live
        args = ["shard", "--model-path", str(tiny_v3), "--save-directory", str(out)]
        args += ["--world-size", "2", "--tp", "2", "--moe-tp", "2", "--mtp"]
        b = subprocess.run([DSWORKER, *args], capture_output=True, text=True, timeout=120)
        assert b.returncode == EXIT_BUSY, b.stderr
        assert "another dsworker run is writing" in b.stderr and str(lock_path(out)) in b.stderr
        assert sorted(p.name for p in out.iterdir()) == live  # nothing wiped
        go.touch()
        assert a.wait(timeout=120) == 0, a.stderr.read() if a.stderr else ""
    finally:
        go.touch()
        if a.poll() is None:
            a.kill()
            a.wait()
    assert verify_sharded(out) == []
    again = subprocess.run([DSWORKER, *args], capture_output=True, text=True, timeout=120)
    assert again.returncode == 0 and json.loads(again.stdout)["skipped"] is True


def test_lock_is_released_after_a_failed_run(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    with pytest.raises(CheckpointError), output_dir.output_lock(out):
        shard(tiny_v3, out, PLAN2)  # our own lock is held: refused
    shard(tiny_v3, out, PLAN2)
    assert is_complete(out) and lock_path(out).parent == tmp_path


def test_a_store_without_locks_still_shards_with_a_warning(
    tiny_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """NFS mounted nolock and some FUSE/CSI stores answer ENOLCK: no lock, but no refusal."""
    import errno

    def no_locks(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(output_dir.fcntl, "flock", no_locks)
    out = tmp_path / "out"
    shard(tiny_v3, out, PLAN2)
    assert is_complete(out) and "cannot lock (No locks available)" in capsys.readouterr().err


# ------------------------------------------------------------------ 7. unseal before wiping


def test_crash_while_wiping_a_corrupt_layout_leaves_it_unsealed(
    tiny_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "out"
    shard(tiny_v3, out, PLAN4, mtp=True)
    f = out / "model-attn-tp-001" / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-1])
    real, calls = shutil.rmtree, {"n": 0}

    def crashing(p, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt("killed mid-wipe")
        return real(p, *a, **k)

    monkeypatch.setattr(output_dir.shutil, "rmtree", crashing)
    with pytest.raises(KeyboardInterrupt):
        shard(tiny_v3, out, PLAN4, mtp=True)
    monkeypatch.undo()
    assert not is_complete(out)
    assert (out / METADATA_FILE).exists()  # still reads as our partial layout
    shard(tiny_v3, out, PLAN4, mtp=True)
    assert verify_sharded(out) == []


# ------------------------------------------------------------------ 3. names from the metadata


def test_merge_refuses_source_file_outside_its_output(tiny_v3: Path, tmp_path: Path) -> None:
    src = tmp_path / "layout"
    shard(tiny_v3, src, PLAN2)
    raw = (src / METADATA_FILE).read_text()
    first = _index(tiny_v3)["weight_map"]["model.embed_tokens.weight"]
    raw = raw.replace(f'"sourceFile":"{first}"', '"sourceFile":"../../pwned.safetensors"')
    (src / METADATA_FILE).write_text(raw)
    (src / COMPLETE_MARKER).write_text(complete_token(raw.encode()))
    with pytest.raises(CheckpointError, match="sourceFile.*escape"):
        merge(src, tmp_path / "a" / "merged")
    assert not list(tmp_path.rglob("pwned.safetensors"))


def test_writer_never_creates_files_outside_its_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    job = OutFile("../escaped.safetensors", [OutEntry("x", "I8", (1,), None, const=b"\x01")])
    with pytest.raises(CheckpointError, match="escape"):
        run_jobs([job], root)
    link = OutFile("ok.safetensors", [OutEntry("x", "I8", (1,), None, const=b"\x01")])
    link.copies.append("../escaped-copy.safetensors")
    with pytest.raises(CheckpointError, match="escape"):
        run_jobs([link], root)
    assert not list(tmp_path.glob("escaped*"))


# ------------------------------------------------------------------ 4. FP8 scale dtypes


def test_fp8_bf16_scales_are_decoded_not_bit_cast(synth_checkpoint, tmp_path: Path) -> None:
    ck = _copy(synth_checkpoint("v3", "tiny", "fp8"), tmp_path / "ck")
    w, s = (
        "model.layers.0.self_attn.o_proj.weight",
        "model.layers.0.self_attn.o_proj.weight_scale_inv",
    )
    fname = _index(ck)["weight_map"][s]
    with SafetensorsReader(ck / fname) as r:
        codes, scale = r.array(w), r.array(s)
    bf = number_formats.f32_to_bf16(scale)
    _rewrite(ck, change={s: ("BF16", bf)})
    shard(ck, tmp_path / "out", ParallelPlan(1, 1, 1, 1, 1), dequantize_fp8=True)
    with SafetensorsReader(tmp_path / "out" / "model-attn-tp-000" / "model.safetensors") as r:
        got = number_formats.bf16_to_f32(r.array(w))
    ref = number_formats.fp8_e4m3_to_f32(codes) * number_formats.expand_block_scale(
        number_formats.bf16_to_f32(bf), 0, codes.shape[0], 0, codes.shape[1]
    )
    np.testing.assert_array_equal(got, number_formats.bf16_to_f32(number_formats.f32_to_bf16(ref)))


def test_fp8_integer_scales_are_refused(synth_checkpoint, tmp_path: Path) -> None:
    ck = _copy(synth_checkpoint("v3", "tiny", "fp8"), tmp_path / "ck")
    s = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    fname = _index(ck)["weight_map"][s]
    with SafetensorsReader(ck / fname) as r:
        scale = r.array(s)
    _rewrite(ck, change={s: ("I32", scale.view(np.int32))})
    with pytest.raises(CheckpointError, match=f"{s} is I32.*must be F32"):
        open_checkpoint(ck)


# ------------------------------------------------------------------ 5. tensors config.json implies


def test_missing_tensors_are_named_before_sharding(tiny_v3: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_v3, tmp_path / "ck")
    gone = (
        "model.layers.1.mlp.experts.3.down_proj.weight",
        "model.layers.2.input_layernorm.weight",
        "model.layers.2.mlp.gate.e_score_correction_bias",
        "lm_head.weight",
    )
    _rewrite(ck, drop=gone)
    with pytest.raises(CheckpointError) as ei:
        shard(ck, tmp_path / "out", PLAN2)
    msg = str(ei.value)
    assert "config.json" in msg and all(n in msg for n in gone), msg
    assert not (tmp_path / "out" / COMPLETE_MARKER).exists()


def test_mtp_layer_absent_is_fine_partial_is_not(tiny_v3: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_v3, tmp_path / "ck")
    mtp = [n for n in _index(ck)["weight_map"] if n.startswith("model.layers.3.")]
    _rewrite(ck, drop=("model.layers.3.hnorm.weight", "model.layers.3.shared_head.head.weight"))
    with pytest.raises(CheckpointError, match="model.layers.3.hnorm.weight.*shared_head.head"):
        open_checkpoint(ck)
    _rewrite(ck, drop=tuple(n for n in mtp if n in _index(ck)["weight_map"]))
    assert not open_checkpoint(ck).has_mtp  # re-saved without MTP: still shardable
    shard(ck, tmp_path / "out", PLAN2)


def test_w8a8_weight_without_scale_is_refused(synth_checkpoint, tmp_path: Path) -> None:
    ck = _copy(synth_checkpoint("v3", "tiny", "w8a8"), tmp_path / "ck")
    _rewrite(ck, drop=("model.layers.0.self_attn.o_proj.weight_scale",))
    with pytest.raises(CheckpointError, match="o_proj.weight_scale"):
        open_checkpoint(ck)


# ------------------------------------------------------------------ 6. LoRA salt survives reshard


def test_reshard_of_a_lora_merged_layout_keeps_its_own_fingerprint(
    tiny_v3: Path, tmp_path: Path
) -> None:
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    rng = np.random.default_rng(0)
    mod = "model.layers.0.self_attn.q_b_proj"
    with SafetensorsReader(tiny_v3 / _index(tiny_v3)["weight_map"][f"{mod}.weight"]) as r:
        out_f, in_f = r.tensors[f"{mod}.weight"].shape
    ab = {
        f"base_model.model.{mod}.lora_A.weight": (
            "F32",
            rng.standard_normal((4, in_f), np.float32),
        ),
        f"base_model.model.{mod}.lora_B.weight": (
            "F32",
            rng.standard_normal((out_f, 4), np.float32),
        ),
    }
    save_arrays(adapter / "adapter_model.safetensors", ab)
    (adapter / "adapter_config.json").write_text(
        json.dumps({"peft_type": "LORA", "r": 4, "lora_alpha": 8})
    )
    shard(tiny_v3, tmp_path / "base_a", PLAN2, mtp=True)
    shard(tiny_v3, tmp_path / "base_b", PLAN4, mtp=True)
    lora_merge(tmp_path / "base_a", tmp_path / "adapter", tmp_path / "lora_a")
    salt = read_metadata(tmp_path / "lora_a").source.get("fingerprintSalt")
    assert salt and salt.startswith("lora:")
    out = reshard(tmp_path / "lora_a", tmp_path / "lora_b", PLAN4)
    assert out["fingerprint"] != read_metadata(tmp_path / "base_b").fingerprint
    assert read_metadata(tmp_path / "lora_b").source.get("fingerprintSalt") == salt
    with pytest.raises(CheckpointError, match="another plan"):
        reshard(tmp_path / "lora_a", tmp_path / "base_b", PLAN4)  # no silent base reuse
    lora_merge(tmp_path / "lora_a", adapter, tmp_path / "lora_aa")  # merged twice: both salts
    assert read_metadata(tmp_path / "lora_aa").source["fingerprintSalt"].count("lora:") == 2


# ------------------------------------------------------------------ 8. aux files: an allow-list


def test_only_listed_aux_files_are_copied(tiny_v3: Path, tmp_path: Path) -> None:
    ck = _copy(tiny_v3, tmp_path / "ck")
    keep = ["tokenizer.model", "special_tokens_map.json", "chat_template.jinja"]
    keep.append("quant_model_description_w8a8_dynamic.json")
    for name in keep:
        (ck / name).write_text("{}")
    for name in ("pytorch_model.bin", "README.md", "modeling_deepseek.py"):
        (ck / name).write_bytes(b"x" * 1000)
    shard(ck, tmp_path / "out", PLAN2)
    top = {p.name for p in (tmp_path / "out").iterdir() if p.is_file()}
    base = {"config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json"}
    assert top == base | set(keep) | {METADATA_FILE, COMPLETE_MARKER}


def test_space_check_counts_aux_files(
    tiny_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ck = _copy(tiny_v3, tmp_path / "ck")
    (ck / "tokenizer.model").write_bytes(b"\0" * (64 << 20))
    real = os.statvfs

    class Fake:
        f_frsize = 4096
        f_blocks = 1 << 30
        f_bavail = (40 << 20) // 4096  # the weights fit, the 64 MB tokenizer.model does not

    monkeypatch.setattr(output_dir.os, "statvfs", lambda p: Fake if "out" in str(p) else real(p))
    with pytest.raises(CheckpointError, match="not enough space"):
        shard(ck, tmp_path / "out", PLAN2)


# ------------------------------------------------------------------ 9. loader joins safely


def test_loader_refuses_index_names_outside_the_model_dir(tiny_v3: Path, tmp_path: Path) -> None:
    import torch

    from dsworker.engine.loader import load_weights
    from dsworker.engine.weight_files import LoadError
    from dsworker.parallel.device import Device

    ck = _copy(tiny_v3, tmp_path / "model")
    (tmp_path / "elsewhere").mkdir()
    idx = _index(ck)
    last = sorted(set(idx["weight_map"].values()))[-1]
    shutil.move(ck / last, tmp_path / "elsewhere" / last)
    idx["weight_map"] = {
        k: (f"../elsewhere/{v}" if v == last else v) for k, v in idx["weight_map"].items()
    }
    (ck / "model.safetensors.index.json").write_text(json.dumps(idx))
    with SafetensorsReader(tmp_path / "elsewhere" / last) as r:
        targets = {
            n: torch.empty(t.shape, dtype=torch.bfloat16)
            for n, t in r.tensors.items()
            if n.endswith("weight") and t.dtype == "BF16"
        }
    with pytest.raises(LoadError, match="escape"):
        load_weights(targets, ck, ParallelPlan(1, 1, 1, 1, 1), 0, Device.create("cpu"), mtp=True)
