"""`dsworker stage`: trusts only a sealed store, copies exactly the metadata's files, seals its copy."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.checkpoint.sharded_metadata import (
    complete_token,
    is_complete,
    read_metadata,
    read_sealed,
)
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE, ParallelPlan
from dsworker.tools.shard import shard
from dsworker.tools.stage import StageError, stage_ranks

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
PLAN = ParallelPlan(4, 2, 2, 2, 2)


@pytest.fixture(scope="module")
def layout(tiny_v3: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("stage-layout") / "store"
    shard(tiny_v3, out, PLAN, mtp=True)
    return out


@pytest.fixture
def store(layout: Path, tmp_path: Path) -> Path:
    """A private copy of the sealed layout (tests damage it)."""
    return Path(shutil.copytree(layout, tmp_path / "store"))


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*") if p.is_file()}


def _reseal(store: Path, md: dict) -> None:
    """Rewrite the metadata and seal it properly, as a tampering tool would."""
    raw = json.dumps(md).encode()
    (store / METADATA_FILE).write_bytes(raw)
    (store / COMPLETE_MARKER).write_text(complete_token(raw))


def test_stage_copies_exactly_the_listed_files_and_seals(store: Path, tmp_path: Path) -> None:
    (store / "model-norm" / "stale.safetensors").write_bytes(b"not listed")
    (store / "notes.json").write_text("{}")  # unlisted top-level file
    dest = tmp_path / "dest"
    res = stage_ranks(store, dest, range(0, 2))
    md = read_metadata(store)
    dirs = set(res.dirs)
    assert dirs == set(PLAN.rank_dirs(0)) | set(PLAN.rank_dirs(1))
    want = {f for f in md.files if "/" not in f or f.split("/", 1)[0] in dirs}
    assert _files(dest) == want | {METADATA_FILE, COMPLETE_MARKER}
    for rel in want:
        assert (dest / rel).read_bytes() == (store / rel).read_bytes()
    # sealed like a store: the loader's seal check passes, and only the sha256 token counts
    assert is_complete(dest)
    assert read_sealed(dest) == (store / METADATA_FILE).read_bytes()
    again = stage_ranks(store, dest, range(0, 2))
    assert again.skipped and again.files == 0
    # another pod's ranks over this copy: not a no-op, restaged clean
    other = stage_ranks(store, dest, range(2, 4))
    assert not other.skipped
    assert not (dest / "model-000").exists() and (dest / "model-002").is_dir()


def test_stage_refuses_an_unsealed_store(store: Path, tmp_path: Path) -> None:
    (store / COMPLETE_MARKER).write_text("garbage\n")
    with pytest.raises(StageError, match="does not seal"):
        stage_ranks(store, tmp_path / "dest", range(0, 2))
    assert not (tmp_path / "dest").exists()
    (store / COMPLETE_MARKER).unlink()
    with pytest.raises(StageError, match="no _COMPLETE"):
        stage_ranks(store, tmp_path / "dest", range(0, 2))


def test_stage_refuses_missing_or_resized_listed_files(store: Path, tmp_path: Path) -> None:
    victim = store / "model-attn-tp-000" / "model.safetensors"
    data = victim.read_bytes()
    victim.unlink()
    with pytest.raises(StageError, match="model-attn-tp-000/model.safetensors: listed"):
        stage_ranks(store, tmp_path / "dest", range(0, 2))
    victim.write_bytes(data[:-1])
    with pytest.raises(StageError, match="bytes but the metadata says"):
        stage_ranks(store, tmp_path / "dest", range(0, 2))
    assert not is_complete(tmp_path / "dest")


def test_stage_refuses_ranks_larger_than_the_free_space_before_copying(
    store: Path, tmp_path: Path
) -> None:
    """A listed file grown (sparse, so no disk is used) past the free space of the destination
    and resealed: the stager says so before it writes a byte."""
    dest = tmp_path / "dest"
    dest.mkdir()
    rel = "model-attn-tp-000/model.safetensors"
    too_big = shutil.disk_usage(dest).free + (1 << 30)
    os.truncate(store / rel, too_big)
    md = json.loads((store / METADATA_FILE).read_bytes())
    md["files"][rel]["bytes"] = too_big
    _reseal(store, md)
    with pytest.raises(StageError, match=r"dest: this pod's ranks need .* GB is free there"):
        stage_ranks(store, dest, range(0, 2))
    assert list(dest.iterdir()) == []  # nothing copied, nothing sealed


def test_stage_refuses_dirs_outside_the_rank_arithmetic(store: Path, tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "x.safetensors").write_bytes(b"secret")
    md = json.loads((store / METADATA_FILE).read_bytes())
    md["ranks"][0]["dirs"].append("../../outside")
    md["files"]["../../outside/x.safetensors"] = {"bytes": 6}
    _reseal(store, md)
    dest = tmp_path / "pod" / "dest"
    with pytest.raises(StageError, match="rank arithmetic"):
        stage_ranks(store, dest, range(0, 1))
    # a listed file whose name escapes, even with honest rank dirs
    md["ranks"][0]["dirs"].pop()
    md["files"]["model-000/../../../outside/x.safetensors"] = md["files"].pop(
        "../../outside/x.safetensors"
    )
    _reseal(store, md)
    with pytest.raises(StageError, match="escape"):
        stage_ranks(store, dest, range(0, 1))
    assert [p for p in tmp_path.rglob("x.safetensors")] == [outside / "x.safetensors"]


def test_fingerprint_token_no_longer_seals(store: Path) -> None:
    fp = read_metadata(store).fingerprint
    (store / COMPLETE_MARKER).write_text(fp + "\n")
    assert not is_complete(store)


def test_stage_cli_exit_2_on_damaged_store(store: Path, tmp_path: Path) -> None:
    (store / COMPLETE_MARKER).write_text("x\n")
    r = subprocess.run(
        [DSWORKER, "stage", "--store", str(store), "--dest", str(tmp_path / "d")]
        + ["--devices-per-node", "2", "--pod-ordinal", "0"],
        capture_output=True,
        text=True,
        env=dict(os.environ),
        timeout=120,
    )
    assert r.returncode == 2, r.stderr
    assert "does not seal" in r.stderr and "Traceback" not in r.stderr
