"""The loader reads an unsharded checkpoint's index as the sharder does: a regular file inside the
model directory, strict JSON. Real FIFOs and symlinks; each read runs in a subprocess against a
deadline, so a hang fails the test loudly instead of stalling the run."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.checkpoint.hf_checkpoint import INDEX_FILE

DEADLINE_S = 60
READ = (
    "import sys; from pathlib import Path\n"
    "from dsworker.contract.errors import CheckpointError\n"
    "from dsworker.engine.weight_files import _weight_map\n"
    "try:\n"
    "    print(len(_weight_map(Path(sys.argv[1]))))\n"
    "except CheckpointError as e:\n"
    "    print('refused:', e); sys.exit(2)\n"
)


def weight_map(model: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", READ, str(model)], capture_output=True, text=True, timeout=DEADLINE_S
    )


@pytest.fixture
def model(synth_checkpoint, tmp_path: Path) -> Path:
    return Path(shutil.copytree(synth_checkpoint("v3", "tiny", "bf16"), tmp_path / "model"))


def refused(model: Path, *words: str) -> None:
    r = weight_map(model)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert all(w in r.stdout for w in words), r.stdout


def test_the_index_is_read(model: Path) -> None:
    r = weight_map(model)
    index = json.loads((model / INDEX_FILE).read_text())
    assert r.returncode == 0 and int(r.stdout) == len(index["weight_map"]), r.stderr


def test_an_index_that_is_a_fifo_is_refused_not_waited_on(model: Path) -> None:
    (model / INDEX_FILE).unlink()
    os.mkfifo(model / INDEX_FILE)
    refused(model, INDEX_FILE, "FIFO (named pipe), not a regular file")


def test_an_index_linked_out_of_the_model_dir_is_refused(model: Path, tmp_path: Path) -> None:
    outside = tmp_path / "elsewhere.json"
    shutil.move(model / INDEX_FILE, outside)
    (model / INDEX_FILE).symlink_to(outside)
    refused(model, "symbolic link to", "outside")


def test_a_file_named_by_the_index_must_stay_inside_too(model: Path, tmp_path: Path) -> None:
    from dsworker.engine.weight_files import LoadError, _join

    shard = next(model.glob("model-*.safetensors"))
    outside = tmp_path / "stolen.safetensors"
    shutil.move(shard, outside)
    shard.symlink_to(outside)
    with pytest.raises(LoadError, match="outside"):
        _join(model, shard.name, f"{INDEX_FILE} weight_map")


def test_a_duplicate_key_in_the_index_is_refused(model: Path) -> None:
    index = model / INDEX_FILE
    text = index.read_text()
    name, fname = next(iter(json.loads(text)["weight_map"].items()))
    index.write_text(text.replace('"weight_map": {', f'"weight_map": {{"{name}": "{fname}", ', 1))
    refused(model, INDEX_FILE, f"duplicate key '{name}'")
