"""Files a checkpoint or a layout must not make us read: links out of the model directory, FIFOs,
and safetensors headers that list a tensor twice. Real symlinks, real FIFOs (os.mkfifo), real
files; every command runs as a subprocess against a deadline, so a hang fails the test loudly.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.checkpoint.safetensors_format import SafetensorsError
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
DEADLINE_S = 60  # a FIFO opened for reading blocks forever: the command must answer long before
PLAN_ARGS = ["--world-size", "2", "--tp", "2", "--moe-tp", "2"]
SECRET = "DSOP_TEST_SECRET=hunter2"


def run_cli(*args: str | Path) -> subprocess.CompletedProcess[str]:
    """One dsworker command; subprocess.TimeoutExpired (the test fails) if it hangs."""
    return subprocess.run(
        [DSWORKER, *map(str, args)], capture_output=True, text=True, timeout=DEADLINE_S
    )


def refused(r: subprocess.CompletedProcess[str], *words: str) -> None:
    """Exit 2 (bad input, not a crash) with every word on stderr and no traceback."""
    assert r.returncode == 2, (r.returncode, r.stderr)
    assert "Traceback" not in r.stderr and all(w in r.stderr for w in words), r.stderr


@pytest.fixture
def ckpt(tiny_v3: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_v3, tmp_path / "model"))


def store_holds(root: Path, text: str) -> list[Path]:
    return [p for p in root.rglob("*") if p.is_file() and text.encode() in p.read_bytes()]


@pytest.mark.parametrize("target", ["outside", "/proc/self/environ"])
def test_a_side_file_linked_out_of_the_model_dir_is_refused_by_shard_and_verify(
    ckpt: Path, tmp_path: Path, target: str
) -> None:
    outside = tmp_path / "elsewhere" / "tokenizer_config.json"
    outside.parent.mkdir()
    outside.write_text(json.dumps({"note": SECRET}))
    link = ckpt / "tokenizer_config.json"
    link.unlink()
    link.symlink_to(outside if target == "outside" else target)
    out = tmp_path / "out"
    env_secret = {**os.environ, "DSOP_TEST_SECRET": "hunter2"}
    r = subprocess.run(
        [DSWORKER, "shard", "--model-path", str(ckpt), "--save-directory", str(out), *PLAN_ARGS],
        capture_output=True,
        text=True,
        timeout=DEADLINE_S,
        env=env_secret,  # what /proc/self/environ would leak
    )
    refused(r, "tokenizer_config.json", "symbolic link", "outside")
    assert not out.exists() or not store_holds(out, "hunter2")
    refused(run_cli("verify", ckpt), "tokenizer_config.json", "symbolic link")


def test_a_link_that_stays_inside_the_model_dir_is_read(ckpt: Path, tmp_path: Path) -> None:
    """An HF-style layout (names linking to blobs beside them) is fine: nothing leaves the dir."""
    (ckpt / "blobs").mkdir()
    real = ckpt / "blobs" / "tokenizer-blob"
    (ckpt / "tokenizer.json").rename(real)
    (ckpt / "tokenizer.json").symlink_to(Path("blobs") / "tokenizer-blob")
    out = tmp_path / "out"
    r = run_cli("shard", "--model-path", ckpt, "--save-directory", out, *PLAN_ARGS)
    assert r.returncode == 0, r.stderr
    copied = out / "tokenizer.json"
    assert not copied.is_symlink() and copied.read_bytes() == real.read_bytes()
    assert run_cli("verify", out).returncode == 0


@pytest.mark.parametrize(
    "name",
    [
        "config.json",
        "model.safetensors.index.json",
        "model-00002-of-00003.safetensors",
        "tokenizer.json",
    ],
)
def test_a_fifo_in_the_model_dir_is_refused_never_waited_on(
    ckpt: Path, tmp_path: Path, name: str
) -> None:
    (ckpt / name).unlink()
    os.mkfifo(ckpt / name)
    r = run_cli("shard", "--model-path", ckpt, "--save-directory", tmp_path / "out", *PLAN_ARGS)
    refused(r, name, "FIFO", "not a regular file")
    refused(run_cli("verify", ckpt), name, "FIFO")


def test_a_fifo_nothing_reads_is_left_alone(ckpt: Path, tmp_path: Path) -> None:
    os.mkfifo(ckpt / "notes.pipe")
    r = run_cli("shard", "--model-path", ckpt, "--save-directory", tmp_path / "out", *PLAN_ARGS)
    assert r.returncode == 0, r.stderr
    assert not (tmp_path / "out" / "notes.pipe").exists()


@pytest.fixture
def layout(ckpt: Path, tmp_path: Path) -> Path:
    out = tmp_path / "layout"
    r = run_cli("shard", "--model-path", ckpt, "--save-directory", out, *PLAN_ARGS)
    assert r.returncode == 0, r.stderr
    return out


def test_verify_refuses_a_link_in_a_layout_even_to_identical_bytes(
    layout: Path, tmp_path: Path
) -> None:
    """Same size, same checksum: only the link itself gives it away."""
    twin = tmp_path / "twin.json"
    shutil.copyfile(layout / "tokenizer.json", twin)
    (layout / "tokenizer.json").unlink()
    (layout / "tokenizer.json").symlink_to(twin)
    refused(run_cli("verify", layout), "tokenizer.json", "symbolic link")


@pytest.mark.parametrize("name", [METADATA_FILE, COMPLETE_MARKER, "model-norm/model.safetensors"])
def test_verify_of_a_layout_with_a_fifo_answers(layout: Path, name: str) -> None:
    (layout / name).unlink()
    os.mkfifo(layout / name)
    refused(run_cli("verify", layout), name)


def _with_duplicate_entry(src: Path, dst: Path) -> str:
    """A copy of a safetensors file whose JSON header lists its first tensor twice (same entry)."""
    raw = src.read_bytes()
    hlen = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8 : 8 + hlen])
    name = next(k for k in header if k != "__metadata__")
    text = json.dumps(header, separators=(",", ":"))
    text = text[:-1] + f",{json.dumps(name)}:{json.dumps(header[name])}" + "}"
    text += " " * (-len(text) % 8)
    dst.write_bytes(len(text).to_bytes(8, "little") + text.encode() + raw[8 + hlen :])
    return name


def test_a_tensor_listed_twice_in_a_header_is_refused(ckpt: Path, tmp_path: Path) -> None:
    f = ckpt / "model-00001-of-00003.safetensors"
    name = _with_duplicate_entry(f, tmp_path / "dup.safetensors")
    with pytest.raises(SafetensorsError, match=f"duplicate key '{name}'"):
        SafetensorsReader(tmp_path / "dup.safetensors")
    shutil.copyfile(tmp_path / "dup.safetensors", f)
    r = run_cli("shard", "--model-path", ckpt, "--save-directory", tmp_path / "out", *PLAN_ARGS)
    refused(r, f.name, "duplicate key")
    refused(run_cli("verify", ckpt), "duplicate key")
