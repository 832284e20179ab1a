"""dsworker shard / merge / reshard on real files: round trips, layout rules, restart safety."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from dsworker.checkpoint.safetensors_format import NUMPY_DTYPES
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.checkpoint.sharded_metadata import read_metadata
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE, ParallelPlan
from dsworker.contract.memory import fit_inputs, weight_bytes
from dsworker.tools.merge import merge
from dsworker.tools.output_dir import IN_PROGRESS_MARKER
from dsworker.tools.reshard import reshard
from dsworker.tools.shard import shard
from dsworker.tools.verify import verify_sharded

Raw = dict[str, tuple[str, tuple[int, ...], bytes]]


def load_raw(root: Path) -> Raw:
    """Every tensor of every safetensors file under root (top level) as (dtype, shape, bytes)."""
    out: Raw = {}
    for f in sorted(root.glob("*.safetensors")):
        with SafetensorsReader(f) as r:
            for n, t in r.tensors.items():
                assert n not in out
                out[n] = (t.dtype, t.shape, r.read(t))
    return out


def as_array(dtype: str, shape: tuple[int, ...], raw: bytes) -> np.ndarray:
    return np.frombuffer(raw, NUMPY_DTYPES[dtype]).reshape(shape)


def without_mtp(raw: Raw, n_layers: int) -> Raw:
    return {k: v for k, v in raw.items() if not k.startswith(f"model.layers.{n_layers}.")}


def check_slices(src: Raw, out_dir: Path) -> None:
    """Independent of the sharder's copy code: every stored slice equals numpy slicing of the source."""
    md = read_metadata(out_dir)
    for t in md.tensors:
        dtype, shape, raw = src[t.name]
        with SafetensorsReader(out_dir / t.file) as r:
            got = r.array(t.name)
        full = as_array(dtype, shape, raw)
        if t.name.endswith(".weight_shape"):
            continue  # rewritten to the local shape, checked separately
        if t.dim is None:
            want = full
        else:
            size = t.shape[t.dim]
            idx = [slice(None)] * len(shape)
            idx[t.dim] = slice(t.part * size, (t.part + 1) * size)
            want = full[tuple(idx)]
        assert got.dtype == want.dtype and got.shape == want.shape, t.name
        assert np.array_equal(got.view(np.uint8), np.ascontiguousarray(want).view(np.uint8)), t.name


def check_on_disk(out_dir: Path, plan: ParallelPlan) -> None:
    md = read_metadata(out_dir)
    on_disk = {
        str(p.relative_to(out_dir))
        for p in out_dir.rglob("*")
        if p.is_file() and p.name not in (METADATA_FILE, COMPLETE_MARKER)
    }
    assert on_disk == set(md.files)
    for rel, rec in md.files.items():
        assert (out_dir / rel).stat().st_size == rec["bytes"]
    listed_tensors = {(t.file, t.name) for t in md.tensors}
    stored = set()
    for rel in md.files:
        if rel.endswith(".safetensors"):
            with SafetensorsReader(out_dir / rel) as r:
                stored |= {(rel, n) for n in r.tensors}
    assert stored == listed_tensors
    assert [r.rank for r in md.ranks] == list(range(plan.world_size))
    for r in md.ranks:
        c = plan.coords(r.rank)
        assert (r.dp_rank, r.tp_rank, r.moe_ep_rank, r.moe_tp_rank) == (
            r.rank // plan.tp,
            r.rank % plan.tp,
            r.rank // plan.moe_tp,
            r.rank % plan.moe_tp,
        )
        assert (c.tp_rank, c.moe_tp_rank) == (r.tp_rank, r.moe_tp_rank)
        assert r.dirs == [
            f"model-{r.rank:03d}",
            "model-norm",
            f"model-attn-tp-{r.tp_rank:03d}",
            f"model-dense-tp-{r.tp_rank:03d}",
            f"model-moe-tp-{r.moe_tp_rank:03d}-ep-{r.moe_ep_rank:03d}",
        ]
        assert all((out_dir / d).is_dir() for d in r.dirs)
        assert r.files == md.files_for_rank(r.rank)
        assert r.bytes == sum(md.files[f]["bytes"] for f in r.files)
    assert verify_sharded(out_dir) == []


# (world, dp, tp, moe_tp, moe_ep)
PLANS = [
    (1, 1, 1, 1, 1),
    (2, 1, 2, 2, 1),
    (2, 2, 1, 1, 2),
    (4, 2, 2, 2, 2),
    (4, 1, 4, 1, 4),
    (8, 2, 4, 2, 4),
    (8, 1, 8, 1, 8),
    (8, 8, 1, 8, 1),
]
FP8_PLANS = [p for p in PLANS if p[2] <= 4 and p[3] <= 2]


def _cases() -> list[tuple[str, tuple[int, ...]]]:
    out = [("bf16", p) for p in PLANS]
    out += [("fp8", p) for p in FP8_PLANS]
    out += [("w8a8", p) for p in (PLANS[1], PLANS[3], PLANS[5], PLANS[7])]
    out += [("w8a16", p) for p in (PLANS[1], PLANS[3], PLANS[5], PLANS[7])]
    return out


@pytest.mark.parametrize(("fmt", "p"), _cases(), ids=lambda x: str(x))
def test_shard_merge_roundtrip(
    synth_checkpoint, tmp_path: Path, fmt: str, p: tuple[int, ...]
) -> None:
    src = synth_checkpoint("v3", "tiny", fmt, mtp=True)
    plan = ParallelPlan(*p)
    out = tmp_path / "sharded"
    res = shard(src, out, plan, mtp=True, processes=2 if p[0] >= 4 else 1)
    assert res["skipped"] is False and res["bytes"] > 0
    assert (out / COMPLETE_MARKER).exists() and not (out / IN_PROGRESS_MARKER).exists()
    raw = load_raw(src)
    check_slices(raw, out)
    check_on_disk(out, plan)
    md = read_metadata(out)
    assert md.plan == {
        "worldSize": p[0],
        "dp": p[1],
        "tp": p[2],
        "moeTp": p[3],
        "moeEp": p[4],
        "mtp": True,
        "quantization": fmt,
        "dequantized": False,
    }
    merged = tmp_path / "merged"
    merge(out, merged)
    assert load_raw(merged) == raw
    assert json.loads((merged / "config.json").read_text()) == json.loads(
        (src / "config.json").read_text()
    )
    idx = json.loads((merged / "model.safetensors.index.json").read_text())
    assert (
        idx["weight_map"]
        == json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    )


def test_mtp_left_out_without_flag(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard(tiny_v3, out, ParallelPlan(2, 1, 2, 2, 1))
    md = read_metadata(out)
    assert md.plan["mtp"] is False
    assert not [t for t in md.tensors if t.name.startswith("model.layers.3.")]
    merge(out, tmp_path / "m")
    assert load_raw(tmp_path / "m") == without_mtp(load_raw(tiny_v3), 3)


def test_v2_shards(tiny_v2: Path, tmp_path: Path) -> None:
    plan = ParallelPlan(4, 1, 4, 2, 2)
    shard(tiny_v2, tmp_path / "s", plan)
    check_slices(load_raw(tiny_v2), tmp_path / "s")
    check_on_disk(tmp_path / "s", plan)
    names = {t.name for t in read_metadata(tmp_path / "s").tensors}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    merge(tmp_path / "s", tmp_path / "m")
    assert load_raw(tmp_path / "m") == load_raw(tiny_v2)


def test_w8a16_weight_shape_is_local(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "w8a16", mtp=True)
    shard(src, tmp_path / "s", ParallelPlan(4, 2, 2, 2, 2), mtp=True)
    md = read_metadata(tmp_path / "s")
    seen = 0
    for t in md.tensors:
        if t.name.endswith(".weight_packed"):
            with SafetensorsReader(tmp_path / "s" / t.file) as r:
                ws = r.array(t.name.replace("weight_packed", "weight_shape")).tolist()
            assert ws == [t.shape[0], t.shape[1] * 4]
            seen += 1
    assert seen > 10


def _numpy_dequant(codes: np.ndarray, scale: np.ndarray) -> np.ndarray:
    """Reference FP8 block dequantisation, written independently of dsworker.checkpoint.number_formats."""
    import torch

    f = torch.from_numpy(codes.copy()).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    s = np.kron(scale, np.ones((128, 128), np.float32))[: f.shape[0], : f.shape[1]]
    return torch.from_numpy(f * s).to(torch.bfloat16).view(torch.uint16).numpy().astype(np.uint16)


@pytest.mark.parametrize("p", [(1, 1, 1, 1, 1), (4, 2, 2, 2, 2), (8, 2, 4, 2, 4)])
def test_fp8_dequantize(synth_checkpoint, tmp_path: Path, p: tuple[int, ...]) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8", mtp=True)
    out = tmp_path / "s"
    shard(src, out, ParallelPlan(*p), mtp=True, dequantize_fp8=True, processes=2)
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["torch_dtype"] == "bfloat16"
    md = read_metadata(out)
    assert md.plan["dequantized"] is True and md.plan["quantization"] == "fp8"
    assert not [t for t in md.tensors if t.name.endswith("weight_scale_inv")]
    merge(out, tmp_path / "m")
    got = load_raw(tmp_path / "m")
    raw = load_raw(src)
    n_fp8 = 0
    for name, (dtype, shape, data) in raw.items():
        if name.endswith(".weight_scale_inv"):
            assert name not in got
            continue
        if dtype == "F8_E4M3":
            n_fp8 += 1
            sd, ss, sb = raw[name.replace(".weight", ".weight_scale_inv")]
            want = _numpy_dequant(as_array(dtype, shape, data), as_array(sd, ss, sb))
            gd, gs, gb = got[name]
            assert (gd, gs) == ("BF16", shape)
            assert np.array_equal(as_array(gd, gs, gb), want), name
        else:
            assert got[name] == (dtype, shape, data)
    assert n_fp8 > 20


@pytest.mark.parametrize(
    ("fmt", "a", "b"),
    [
        ("bf16", (4, 2, 2, 2, 2), (8, 2, 4, 2, 4)),
        ("bf16", (8, 1, 8, 1, 8), (2, 1, 2, 2, 1)),
        ("bf16", (2, 2, 1, 1, 2), (1, 1, 1, 1, 1)),
        ("fp8", (2, 1, 2, 2, 1), (4, 1, 4, 1, 4)),
        ("w8a16", (4, 2, 2, 2, 2), (8, 1, 8, 8, 1)),
        ("w8a8", (8, 8, 1, 8, 1), (4, 1, 4, 2, 2)),
    ],
)
def test_reshard_equals_shard(synth_checkpoint, tmp_path: Path, fmt, a, b) -> None:
    src = synth_checkpoint("v3", "tiny", fmt, mtp=True)
    shard(src, tmp_path / "a", ParallelPlan(*a), mtp=True)
    res = reshard(tmp_path / "a", tmp_path / "ab", ParallelPlan(*b), mtp=True, processes=2)
    shard(src, tmp_path / "b", ParallelPlan(*b), mtp=True)
    mab, mb = read_metadata(tmp_path / "ab"), read_metadata(tmp_path / "b")
    assert res["fingerprint"] == mb.fingerprint == mab.fingerprint
    assert mab.plan == mb.plan and mab.ranks == mb.ranks
    assert {k: v["bytes"] for k, v in mab.files.items()} == {
        k: v["bytes"] for k, v in mb.files.items()
    }
    assert sorted(t.to_json().items() for t in mab.tensors) == sorted(
        t.to_json().items() for t in mb.tensors
    )
    for rel in mb.files:
        assert (tmp_path / "ab" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel
    check_on_disk(tmp_path / "ab", ParallelPlan(*b))


def test_reshard_can_drop_mtp_and_dequantize(synth_checkpoint, tmp_path: Path) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8", mtp=True)
    shard(src, tmp_path / "a", ParallelPlan(2, 1, 2, 2, 1), mtp=True)
    reshard(tmp_path / "a", tmp_path / "ab", ParallelPlan(4, 2, 2, 1, 4), dequantize_fp8=True)
    shard(src, tmp_path / "b", ParallelPlan(4, 2, 2, 1, 4), dequantize_fp8=True)
    for rel in read_metadata(tmp_path / "b").files:
        assert (tmp_path / "ab" / rel).read_bytes() == (tmp_path / "b" / rel).read_bytes(), rel


def test_checksums_and_file_split(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    shard(
        tiny_v3, out, ParallelPlan(1, 1, 1, 1, 1), mtp=True, checksum=True, max_file_bytes=100_000
    )
    md = read_metadata(out)
    import hashlib

    for rel, rec in md.files.items():
        assert rec["sha256"] == hashlib.sha256((out / rel).read_bytes()).hexdigest()
    moe = sorted(f for f in md.files if f.startswith("model-moe-"))
    assert len(moe) > 2 and moe[0].endswith(f"model-00001-of-{len(moe):05d}.safetensors")
    # companions never leave their weight's file
    files_of = {t.name: t.file for t in md.tensors}
    for n, f in files_of.items():
        if n.endswith("weight_scale_inv"):
            assert files_of[n.replace("weight_scale_inv", "weight")] == f
    merge(out, tmp_path / "m")
    assert load_raw(tmp_path / "m") == load_raw(tiny_v3)


# ---------------------------------------------------------------- restart safety


def test_rerun_over_complete_output_verifies_and_skips(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    plan = ParallelPlan(2, 1, 2, 2, 1)
    first = shard(tiny_v3, out, plan)
    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    again = shard(tiny_v3, out, plan)
    assert again["skipped"] is True and again["fingerprint"] == first["fingerprint"]
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == mtimes


def test_the_summary_reports_the_model_for_the_operators_memory_fit(
    tiny_v3: Path, tmp_path: Path
) -> None:
    """Without the model-config annotation, the operator checks the fit with what the sharder
    read (issue 17): the keys the memory model counts with, whether written or skipped."""
    config = json.loads((tiny_v3 / "config.json").read_text())
    plan = ParallelPlan(2, 1, 2, 2, 1)
    for res in (shard(tiny_v3, tmp_path / "s", plan), shard(tiny_v3, tmp_path / "s", plan)):
        assert res["modelConfig"] == fit_inputs(config) and res["quantization"] == "bf16"
        assert res["modelConfig"]["kv_lora_rank"] == config["kv_lora_rank"]
        assert weight_bytes(res["modelConfig"], plan).shard == weight_bytes(config, plan).shard
        assert len(json.dumps(res, separators=(",", ":"))) < 4096  # the termination log's limit


def test_rerun_over_corrupt_complete_output_reshards(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    plan = ParallelPlan(2, 1, 2, 2, 1)
    shard(tiny_v3, out, plan)
    victim = out / "model-norm" / "model.safetensors"
    victim.write_bytes(victim.read_bytes()[:-8])
    res = shard(tiny_v3, out, plan)
    assert res["skipped"] is False
    assert verify_sharded(out) == []


def test_partial_output_is_started_clean(tiny_v3: Path, tmp_path: Path) -> None:
    out = tmp_path / "s"
    plan = ParallelPlan(2, 1, 2, 2, 1)
    shard(tiny_v3, out, plan)
    # Simulate a crash mid-run: marker present, no _COMPLETE, a stray temp file and junk.
    (out / COMPLETE_MARKER).unlink()
    (out / IN_PROGRESS_MARKER).write_text("{}")
    (out / "model-000" / ".model.safetensors.tmp").write_bytes(b"partial")
    (out / "model-999").mkdir()
    res = shard(tiny_v3, out, plan)
    assert res["skipped"] is False
    assert not (out / "model-999").exists() and not (out / IN_PROGRESS_MARKER).exists()
    assert verify_sharded(out) == []


def test_crash_mid_write_leaves_no_complete_then_recovers(
    tiny_v3: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dsworker.checkpoint.outfile_writer as jobs

    out = tmp_path / "s"
    plan = ParallelPlan(4, 2, 2, 2, 2)
    real = jobs.write_outfile
    calls = {"n": 0}

    def flaky(*a, **k):
        calls["n"] += 1
        if calls["n"] == 5:
            raise KeyboardInterrupt  # like a SIGINT/kill between files
        return real(*a, **k)

    monkeypatch.setattr(jobs, "write_outfile", flaky)
    with pytest.raises(KeyboardInterrupt):
        shard(tiny_v3, out, plan)
    assert not (out / COMPLETE_MARKER).exists() and (out / IN_PROGRESS_MARKER).exists()
    assert not list(out.rglob("*.tmp"))
    monkeypatch.setattr(jobs, "write_outfile", real)
    shard(tiny_v3, out, plan)
    assert verify_sharded(out) == []


@pytest.mark.parametrize(("fmt", "dequant"), [("bf16", False), ("fp8", True), ("w8a16", False)])
def test_small_chunks_and_no_copy_file_range(
    synth_checkpoint, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: str, dequant: bool
) -> None:
    """Chunk boundaries inside tensors and the pread/write fallback give the same bytes."""
    import errno

    import dsworker.checkpoint.io_buffers as buffers
    import dsworker.checkpoint.regions as regions

    src = synth_checkpoint("v3", "tiny", fmt, mtp=True)
    plan = ParallelPlan(4, 2, 2, 2, 2)
    shard(src, tmp_path / "ref", plan, mtp=True, dequantize_fp8=dequant)

    def no_cfr(*a, **k):
        raise OSError(errno.EXDEV, "cross-device")

    monkeypatch.setattr(regions, "CHUNK_BYTES", 300)
    monkeypatch.setattr(buffers, "IOV_MAX", 4)  # several scatter reads per chunk
    monkeypatch.setattr(buffers, "_iov_cache", {})
    monkeypatch.setattr(buffers, "COPY_CHUNK", 1000)
    monkeypatch.setattr(buffers, "FALLBACK_CHUNK", 1000)
    monkeypatch.setattr(buffers.os, "copy_file_range", no_cfr)
    shard(src, tmp_path / "small", plan, mtp=True, dequantize_fp8=dequant, checksum=True)
    for rel in read_metadata(tmp_path / "ref").files:
        assert (tmp_path / "ref" / rel).read_bytes() == (tmp_path / "small" / rel).read_bytes(), rel
    assert verify_sharded(tmp_path / "small") == []
    merge(tmp_path / "small", tmp_path / "m")
    merge(tmp_path / "ref", tmp_path / "m2")
    assert load_raw(tmp_path / "m") == load_raw(tmp_path / "m2")


def test_dp_replicas_share_vocab_files(tiny_v3: Path, tmp_path: Path) -> None:
    """model-{r} and model-{r+tp} hold the same vocab slices: one file on disk, hard-linked."""
    out = tmp_path / "s"
    res = shard(tiny_v3, out, ParallelPlan(8, 2, 4, 2, 4))
    a, b = out / "model-001" / "model.safetensors", out / "model-005" / "model.safetensors"
    assert a.read_bytes() == b.read_bytes()
    assert a.stat().st_ino == b.stat().st_ino
    md = read_metadata(out)
    assert md.files["model-001/model.safetensors"] == md.files["model-005/model.safetensors"]
    assert res["bytes"] == sum(r["bytes"] for r in md.files.values())


def test_parallel_processes_same_output(tiny_v3: Path, tmp_path: Path) -> None:
    plan = ParallelPlan(8, 2, 4, 2, 4)
    shard(tiny_v3, tmp_path / "p1", plan, mtp=True, processes=1)
    shard(tiny_v3, tmp_path / "p3", plan, mtp=True, processes=3)
    for rel in read_metadata(tmp_path / "p1").files:
        assert (tmp_path / "p1" / rel).read_bytes() == (tmp_path / "p3" / rel).read_bytes()


def test_metadata_plan_mismatch_api(tiny_v3: Path, tmp_path: Path) -> None:
    from dsworker.checkpoint.sharded_metadata import plan_mismatch

    shard(tiny_v3, tmp_path / "s", ParallelPlan(4, 2, 2, 2, 2))
    md = read_metadata(tmp_path / "s")
    assert plan_mismatch(md.plan, dict(md.plan)) == []
    assert plan_mismatch(md.plan, ParallelPlan(4, 2, 2, 2, 2)) == []
    msgs = plan_mismatch(
        md.plan, {"world_size": 4, "dp": 1, "tp": 4, "moeTp": 2, "moeEp": 2, "mtp": True}
    )
    assert [m.split(":")[0] for m in msgs] == ["dp", "tp", "mtp"]
    assert "cut for 2" in msgs[1] and "uses 4" in msgs[1]
    assert md.files_for_rank(3) == md.rank(3).files
    assert {t.file.split("/")[0] for t in md.tensors_for_rank(3)} <= set(md.rank(3).dirs)
    assert os.path.basename(md.source["path"]) == tiny_v3.name
