"""`dsworker stage-checkpoint`: copies exactly a checkpoint's safetensors and JSON files, refuses
what could escape or run code, seals the copy and skips a sealed copy of the same files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import COMPLETE_MARKER
from dsworker.tools.stage_checkpoint import seal, stage_checkpoint

DSWORKER = str(Path(sys.executable).with_name("dsworker"))


@pytest.fixture
def checkpoint(tiny_v3: Path, tmp_path: Path) -> Path:
    out = tmp_path / "ckpt"
    shutil.copytree(tiny_v3, out)
    (out / "pytorch_model.bin").write_bytes(b"pickle")  # never copied
    (out / "modeling_deepseek.py").write_text("raise SystemExit")  # never copied
    return out


def test_copies_safetensors_and_json_only_and_seals(checkpoint: Path, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    summary = stage_checkpoint(checkpoint, dest)
    wanted = sorted(p.name for p in checkpoint.iterdir() if p.suffix in (".safetensors", ".json"))
    assert sorted(p.name for p in dest.iterdir() if p.name != COMPLETE_MARKER) == wanted
    for name in wanted:
        assert (dest / name).read_bytes() == (checkpoint / name).read_bytes()
    assert summary["files"] == len(wanted) and summary["skipped"] is False
    sizes = {n: (checkpoint / n).stat().st_size for n in wanted}
    assert (dest / COMPLETE_MARKER).read_text() == seal(sizes)
    assert stage_checkpoint(checkpoint, dest)["skipped"] is True


def test_a_changed_checkpoint_is_staged_again_clean(checkpoint: Path, tmp_path: Path) -> None:
    dest = tmp_path / "model"
    stage_checkpoint(checkpoint, dest)
    (dest / "stale.json").write_text("{}")
    (checkpoint / "generation_config.json").write_text('{"changed": true}')
    assert stage_checkpoint(checkpoint, dest)["skipped"] is False
    assert not (dest / "stale.json").exists()
    assert json.loads((dest / "generation_config.json").read_text()) == {"changed": True}


def test_refuses_a_symlink_out_of_the_checkpoint(checkpoint: Path, tmp_path: Path) -> None:
    outside = tmp_path / "secret.json"
    outside.write_text("{}")
    os.symlink(outside, checkpoint / "tokenizer_config.json.link.json")
    with pytest.raises(CheckpointError, match="symlink out of the checkpoint"):
        stage_checkpoint(checkpoint, tmp_path / "model")
    assert not (tmp_path / "model" / COMPLETE_MARKER).exists()


def test_refuses_an_index_naming_a_missing_file(checkpoint: Path, tmp_path: Path) -> None:
    index = checkpoint / "model.safetensors.index.json"
    doc = json.loads(index.read_text())
    doc["weight_map"]["model.extra.weight"] = "../elsewhere.safetensors"
    index.write_text(json.dumps(doc))
    with pytest.raises(CheckpointError, match="weight_map names"):
        stage_checkpoint(checkpoint, tmp_path / "model")


def test_command_line_exits_2_on_bad_input(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    run = subprocess.run(
        [
            DSWORKER,
            "stage-checkpoint",
            "--source",
            str(tmp_path / "empty"),
            "--dest",
            str(tmp_path / "m"),
        ],
        capture_output=True,
        text=True,
    )
    assert run.returncode == 2 and "no config.json" in run.stderr
