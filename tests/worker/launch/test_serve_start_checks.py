"""What `dsworker serve` checks as it starts: bad input exits 2 with one line naming the problem,
no traceback, so the worker group fails at once instead of spending restarts on it (issue 16.9);
an API key from the environment guards the /v1 endpoints (16.11)."""

from __future__ import annotations

import json
import os
import resource
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
from serving_helpers import dsworker_serve, free_port

from dsworker.contract.errors import EXIT_BAD_INPUT
from dsworker.contract.layout import COMPLETE_MARKER, METADATA_FILE

CONFIG = {"device": "cpu", "dtype": "float32", "maxSeqLen": 64, "maxInputTokenLen": 32}


@pytest.fixture(scope="module")
def sharded(synth_checkpoint, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("load-errors") / "sharded"
    subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "shard", "--model-path", str(synth_checkpoint()),
         "--save-directory", str(out), "--world-size", "1", "--tp", "1", "--moe-tp", "1"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return out


def serve(model: Path, tmp: Path, config: dict | None = None, open_files: int | None = None):
    (tmp / "engine.json").write_text(json.dumps(CONFIG | (config or {})))

    def limit_open_files() -> None:
        if open_files is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (open_files, open_files))

    return subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "serve", "--model", str(model), "--config",
         str(tmp / "engine.json"), "--host", "127.0.0.1", "--port", str(free_port()),
         "--master-port", str(free_port()), "--grace-seconds", "5"],
        capture_output=True, text=True, timeout=300, preexec_fn=limit_open_files,
    )  # fmt: skip


def broken_copy(sharded: Path, tmp: Path, how: str) -> Path:
    model = tmp / how
    shutil.copytree(sharded, model)
    if how == "no-tokenizer":
        (model / "tokenizer.json").unlink()
    elif how == "fifo-tokenizer-config":  # opening it for reading would block forever
        (model / "tokenizer_config.json").unlink()
        os.mkfifo(model / "tokenizer_config.json")
    elif how == "fifo-metadata":
        (model / METADATA_FILE).unlink()
        os.mkfifo(model / METADATA_FILE)
    elif how == "no-complete":
        (model / COMPLETE_MARKER).unlink()
    else:  # a truncated shard
        shard = next(model.glob("model-moe-*/*.safetensors"))
        with shard.open("r+b") as f:
            f.truncate(1000)
    return model


@pytest.mark.parametrize(
    ("how", "says"),
    [
        ("no-tokenizer", "tokenizer.json: missing; the model directory needs tokenizer.json"),
        ("fifo-tokenizer-config", "tokenizer_config.json is a FIFO (named pipe)"),
        ("no-complete", f"{COMPLETE_MARKER} is missing, so sharding did not finish"),
        ("truncated", "truncated (header of"),
    ],
)
def test_a_broken_model_directory_exits_2_in_one_line(
    sharded: Path, tmp_path: Path, how: str, says: str
) -> None:
    done = serve(broken_copy(sharded, tmp_path, how), tmp_path)
    log = done.stdout + done.stderr
    assert done.returncode == EXIT_BAD_INPUT, log[-3000:]
    assert "Traceback" not in log, log[-3000:]
    [line] = [ln for ln in log.splitlines() if says in ln]
    assert "loading failed: " in line


def test_a_fifo_for_the_shards_metadata_is_refused_before_any_rank(
    sharded: Path, tmp_path: Path
) -> None:
    """The launcher reads the plan from the metadata: a FIFO there would block it forever."""
    done = serve(broken_copy(sharded, tmp_path, "fifo-metadata"), tmp_path)
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    assert done.stderr.startswith("dsworker serve: error: "), done.stderr[-3000:]
    assert f"{METADATA_FILE} is a FIFO (named pipe), not a regular file" in done.stderr


def test_an_unreadable_api_key_file_stops_the_launch_before_any_rank(
    sharded: Path, tmp_path: Path
) -> None:
    done = serve(sharded, tmp_path, {"apiKeyFile": str(tmp_path / "missing")})
    assert done.returncode == EXIT_BAD_INPUT, done.stderr[-3000:]
    assert f"apiKeyFile {tmp_path / 'missing'}: cannot be read" in done.stderr
    assert "rank0" not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_max_connections_beyond_the_open_file_limit_exits_2_naming_it(
    sharded: Path, tmp_path: Path
) -> None:
    done = serve(sharded, tmp_path, {"maxConnections": 4096}, open_files=512)
    log = done.stdout + done.stderr
    assert done.returncode == EXIT_BAD_INPUT, log[-3000:]
    assert "maxConnections 4096 needs 4352 open files, but the open-file limit is 512" in log
    assert "Traceback" not in log


def test_an_api_key_from_the_environment_guards_v1_but_not_health(
    sharded: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text("sk-from-a-secret\n")
    monkeypatch.setenv("DSWORKER_API_KEY_FILE", str(key_file))
    with dsworker_serve(sharded, CONFIG, tmp_path) as (url, _):
        assert httpx.get(url + "/v1/models", timeout=30).status_code == 401
        good = {"Authorization": "Bearer sk-from-a-secret"}
        assert httpx.get(url + "/v1/models", headers=good, timeout=30).status_code == 200
        assert httpx.get(url + "/metrics", timeout=30).status_code == 200
