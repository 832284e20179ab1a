"""Bad input to the sharder and its tools: one clear line naming the file/tensor and the fix, exit 2."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.contract.errors import SOURCE_MISSING, STORAGE_FULL, CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE, ParallelPlan, PlanError
from dsworker.tools.merge import merge
from dsworker.tools.shard import Expected, shard

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
PLAN2 = ParallelPlan(2, 1, 2, 2, 1)


@pytest.fixture
def ckpt(tiny_v3: Path, tmp_path: Path) -> Path:
    """A private, modifiable copy of the tiny V3 checkpoint."""
    return Path(shutil.copytree(tiny_v3, tmp_path / "src"))


def _index(ckpt: Path) -> dict:
    return json.loads((ckpt / "model.safetensors.index.json").read_text())


def _write_index(ckpt: Path, idx: dict) -> None:
    (ckpt / "model.safetensors.index.json").write_text(json.dumps(idx))


def _shard_err(ckpt: Path, out: Path, plan: ParallelPlan = PLAN2, **kw) -> str:
    with pytest.raises((CheckpointError, PlanError)) as ei:
        shard(ckpt, out, plan, **kw)
    msg = str(ei.value)
    assert "\n" not in msg
    assert not (out / COMPLETE_MARKER).exists()
    return msg


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([DSWORKER, *args], capture_output=True, text=True, env=e, timeout=120)


def test_missing_safetensors_file(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "model-00002-of-00003.safetensors" in msg and "missing" in msg and "download" in msg


def test_truncated_safetensors_file(ckpt: Path, tmp_path: Path) -> None:
    f = ckpt / "model-00002-of-00003.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) - 1000])
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "model-00002-of-00003.safetensors" in msg and "truncated" in msg


def test_truncated_header(ckpt: Path, tmp_path: Path) -> None:
    f = ckpt / "model-00001-of-00003.safetensors"
    f.write_bytes(f.read_bytes()[:100])
    assert "truncated" in _shard_err(ckpt, tmp_path / "out")


def test_corrupt_header(ckpt: Path, tmp_path: Path) -> None:
    f = ckpt / "model-00003-of-00003.safetensors"
    data = bytearray(f.read_bytes())
    data[8:20] = b"\xff" * 12
    f.write_bytes(bytes(data))
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "model-00003-of-00003.safetensors" in msg and "corrupt header" in msg


def test_empty_file(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model-00003-of-00003.safetensors").write_bytes(b"")
    assert "truncated" in _shard_err(ckpt, tmp_path / "out")


def test_tensor_in_index_but_absent(ckpt: Path, tmp_path: Path) -> None:
    idx = _index(ckpt)
    idx["weight_map"]["model.layers.1.mlp.experts.9.up_proj.weight"] = (
        "model-00002-of-00003.safetensors"
    )
    _write_index(ckpt, idx)
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "model.layers.1.mlp.experts.9.up_proj.weight" in msg and "absent" in msg


def test_tensor_in_file_but_not_in_index(ckpt: Path, tmp_path: Path) -> None:
    idx = _index(ckpt)
    del idx["weight_map"]["model.norm.weight"]
    _write_index(ckpt, idx)
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "model.norm.weight" in msg and "does not list" in msg


def test_config_inconsistent_with_shapes(ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["moe_intermediate_size"] = 64
    (ckpt / "config.json").write_text(json.dumps(cfg))
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "config.json" in msg and "mlp.experts.0" in msg and "implies" in msg
    assert "moe_intermediate_size" in msg


def test_config_with_fewer_experts_than_tensors(ckpt: Path, tmp_path: Path) -> None:
    cfg = json.loads((ckpt / "config.json").read_text())
    cfg["n_routed_experts"] = 4
    (ckpt / "config.json").write_text(json.dumps(cfg))
    assert "n_routed_experts" in _shard_err(ckpt, tmp_path / "out")


def test_config_not_json(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "config.json").write_text("{nope")
    assert "config.json" in _shard_err(ckpt, tmp_path / "out")


def test_plan_does_not_divide(tiny_v3: Path, tmp_path: Path) -> None:
    msg = _shard_err(tiny_v3, tmp_path / "out", ParallelPlan(3, 1, 3, 1, 3))
    assert "num_attention_heads (8) is not divisible by tp (3)" in msg
    assert "n_routed_experts (8) is not divisible by moeEp (3)" in msg
    # ... and names the first tensor and dim that cannot be split
    assert "tensor model.embed_tokens.weight: dim 0 of size 320 does not divide into 3 parts" in msg


def test_plan_does_not_divide_vocab(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "bf16", overrides={"vocab_size": 324})
    msg = _shard_err(src, tmp_path / "out", ParallelPlan(8, 1, 8, 1, 8))
    assert "vocab_size (324) is not divisible by tp (8)" in msg
    assert "tensor model.embed_tokens.weight: dim 0 of size 324" in msg


def test_fp8_shard_not_multiple_of_128(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8", overrides={"intermediate_size": 1024})
    msg = _shard_err(src, tmp_path / "out", ParallelPlan(8, 1, 8, 1, 8))
    assert "o_proj columns num_attention_heads*v_head_dim/tp = 64 is not a multiple of 128" in msg
    assert "FP8 tensor model.layers.0.self_attn.o_proj.weight: dim 1 shard 64" in msg
    assert "dequantizeFp8" in msg
    # The same plan works with dequantisation (shards are BF16, no block constraint).
    res = shard(src, tmp_path / "ok", ParallelPlan(8, 1, 8, 1, 8), dequantize_fp8=True)
    assert res["skipped"] is False


def test_fp8_plan_check_names_moe_tp(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8")
    msg = _shard_err(src, tmp_path / "out", ParallelPlan(4, 4, 1, 4, 1))
    assert "moe_intermediate_size/moeTp = 64 is not a multiple of 128" in msg


def test_index_file_name_escapes(ckpt: Path, tmp_path: Path) -> None:
    idx = _index(ckpt)
    idx["weight_map"]["model.norm.weight"] = "../outside.safetensors"
    _write_index(ckpt, idx)
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "'../outside.safetensors'" in msg and "escape" in msg


def test_index_absolute_file_name(ckpt: Path, tmp_path: Path) -> None:
    idx = _index(ckpt)
    idx["weight_map"]["model.norm.weight"] = "/etc/passwd"
    _write_index(ckpt, idx)
    assert "escape" in _shard_err(ckpt, tmp_path / "out")


def test_tensor_name_escapes(ckpt: Path, tmp_path: Path) -> None:
    idx = _index(ckpt)
    idx["weight_map"]["../../x"] = "model-00001-of-00003.safetensors"
    _write_index(ckpt, idx)
    msg = _shard_err(ckpt, tmp_path / "out")
    assert "'../../x'" in msg and "escape" in msg


def test_metadata_file_name_escapes(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard(tiny_v3, out, PLAN2)
    md = json.loads((out / METADATA_FILE).read_text())
    md["files"]["../../evil.safetensors"] = {"bytes": 1}
    md["tensors"][0]["file"] = "../../evil.safetensors"
    (out / METADATA_FILE).write_text(json.dumps(md))
    with pytest.raises(CheckpointError) as ei:
        merge(out, tmp_path / "m")
    assert "escape" in str(ei.value) or "_COMPLETE" in str(ei.value)
    (out / COMPLETE_MARKER).write_text(
        __import__("dsworker.checkpoint.sharded_metadata", fromlist=["x"]).complete_token(
            (out / METADATA_FILE).read_bytes()
        )
    )
    with pytest.raises(CheckpointError) as ei:
        merge(out, tmp_path / "m2")
    assert "'../../evil.safetensors'" in str(ei.value) and "escape" in str(ei.value)


def test_output_dir_not_ours(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    (out / "precious.txt").write_text("user data")
    msg = _shard_err(tiny_v3, out)
    assert "not empty and not written by dsworker shard" in msg and "precious.txt" in msg
    assert (out / "precious.txt").read_text() == "user data"


def test_output_dir_complete_for_other_plan(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    shard(tiny_v3, out, PLAN2)
    with pytest.raises(CheckpointError) as ei:
        shard(tiny_v3, out, ParallelPlan(4, 2, 2, 2, 2))
    msg = str(ei.value)
    assert "another plan" in msg and "worldSize" in msg and "new --save-directory" in msg
    assert (out / COMPLETE_MARKER).exists()  # the existing layout is left alone


def test_mtp_without_mtp_weights(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "bf16", mtp=False)
    msg = _shard_err(src, tmp_path / "out", mtp=True)
    assert "--mtp" in msg and "model.layers.3." in msg


def test_dequantize_non_fp8(tiny_v3: Path, tmp_path: Path) -> None:
    assert "not FP8" in _shard_err(tiny_v3, tmp_path / "out", dequantize_fp8=True)


def test_model_path_missing(tmp_path: Path) -> None:
    """An infrastructure problem (a volume not mounted or not populated), not a plan mismatch."""
    assert "does not exist" in _shard_err(tmp_path / "nope", tmp_path / "out")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError) as ei:
        shard(tmp_path / "empty", tmp_path / "out", PLAN2)
    assert ei.value.reason == SOURCE_MISSING and "config.json: not found" in str(ei.value)
    log = tmp_path / "termlog"
    r = run_cli(
        "shard", "--model-path", str(tmp_path / "nope"), "--save-directory", str(tmp_path / "o"),
        "--world-size", "2", "--tp", "2", "--moe-tp", "2",
        env={"DSOP_TERMINATION_LOG": str(log)},
    )  # fmt: skip
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert json.loads(log.read_text()) == {
        "error": r.stderr.strip().removeprefix("dsworker shard: error: "),
        "reason": SOURCE_MISSING,
    }


@contextlib.contextmanager
def small_tmpfs(path: Path, size: str = "1m"):
    path.mkdir()
    try:
        r = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
            capture_output=True,
            text=True,
        )
    except FileNotFoundError:
        pytest.skip("no mount command: cannot make a size-limited file system")
    if r.returncode != 0:
        pytest.skip(
            f"cannot mount a size-limited tmpfs here ({r.stderr.strip()}): full-disk test skipped"
        )
    try:
        yield path
    finally:
        subprocess.run(["umount", str(path)], check=False)


def test_full_disk_precheck(tiny_v3: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "600k") as mnt:
        with pytest.raises(CheckpointError) as ei:
            shard(tiny_v3, mnt / "out", ParallelPlan(8, 2, 4, 2, 4), mtp=True)
        assert "not enough space" in str(ei.value) and "GB free" in str(ei.value)
        assert ei.value.reason == STORAGE_FULL


def test_full_disk_mid_write(tiny_v3: Path, tmp_path: Path) -> None:
    with small_tmpfs(tmp_path / "small", "512k") as mnt:
        out = mnt / "out"
        msg = _shard_err(tiny_v3, out, ParallelPlan(8, 2, 4, 2, 4), mtp=True, space_check=False)
        assert "disk full while writing" in msg and "more space" in msg
        # the reason survives the writer processes (a disk full is not a plan that does not fit)
        with pytest.raises(CheckpointError) as ei:
            shard(tiny_v3, mnt / "p2", PLAN2, processes=2, space_check=False)
        assert ei.value.reason == STORAGE_FULL, ei.value
        assert not (out / COMPLETE_MARKER).exists() and not (out / METADATA_FILE).exists()
        assert not list(out.rglob("*.tmp"))
        # the CLI says the same in one line, exit 2, and the termination log gets the error
        log = tmp_path / "termlog"
        r = run_cli(
            "shard",
            "--model-path",
            str(tiny_v3),
            "--save-directory",
            str(mnt / "out2"),
            "--world-size",
            "8",
            "--tp",
            "4",
            "--moe-tp",
            "2",
            "--mtp",
            env={"DSOP_TERMINATION_LOG": str(log)},
        )
        assert r.returncode == 2
        assert "Traceback" not in r.stderr and "not enough space" in r.stderr
        record = json.loads(log.read_text())
        assert "not enough space" in record["error"] and record["reason"] == STORAGE_FULL


def test_cli_bad_input_exit_2_no_traceback(ckpt: Path, tmp_path: Path) -> None:
    (ckpt / "model-00002-of-00003.safetensors").unlink()
    r = run_cli(
        "shard", "--model-path", str(ckpt), "--save-directory", str(tmp_path / "o"),
        "--world-size", "2", "--tp", "2", "--moe-tp", "2",
    )  # fmt: skip
    assert r.returncode == 2, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr
    assert lines[0].startswith("dsworker shard: error:") and "model-00002-of-00003" in lines[0]
    r = run_cli(
        "shard", "--model-path", str(ckpt), "--save-directory", str(tmp_path / "o"),
        "--world-size", "3", "--tp", "2", "--moe-tp", "1",
    )  # fmt: skip
    assert (
        r.returncode == 2
        and "dp*tp must equal world_size" in r.stderr
        and "Traceback" not in r.stderr
    )


def test_what_the_deployment_asked_of_the_checkpoint_is_checked_before_any_output(
    ckpt: Path, tiny_v2: Path, tmp_path: Path
) -> None:
    """The operator passes spec.model and spec.serving along: only the Job reads config.json."""
    max_pos = json.loads((ckpt / "config.json").read_text())["max_position_embeddings"]
    out = tmp_path / "out"
    msg = _shard_err(ckpt, out, expected=Expected(quantization="w8a8", max_seq_len=max_pos + 1))
    assert "the checkpoint is bf16, not w8a8" in msg and "spec.model.quantization" in msg
    assert f"exceeds config.json max_position_embeddings ({max_pos})" in msg
    assert "spec.serving.maxSeqLen" in msg and not out.exists()
    msg = _shard_err(tiny_v2, out, expected=Expected(architecture="DeepseekV3"))
    assert "describes DeepseekV2, not DeepseekV3" in msg and "spec.sharding.enabled" in msg
    r = run_cli("shard", "--model-path", str(tiny_v2), "--save-directory", str(out),
                "--world-size", "2", "--tp", "1", "--moe-tp", "1", "--moe-ep", "2",
                "--expect-architecture", "DeepseekV3")  # fmt: skip
    assert r.returncode == 2 and "DeepseekV2" in r.stderr and "Traceback" not in r.stderr
    fine = Expected("DeepseekV3", "bf16", max_pos)
    assert shard(ckpt, out, PLAN2, expected=fine)["files"] > 0
