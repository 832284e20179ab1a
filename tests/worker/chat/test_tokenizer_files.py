"""The tokenizer's files are read as the checkpoint's others are: regular files inside the model
directory, strict JSON. Real FIFOs and symlinks; each load runs in a subprocess against a deadline,
so a FIFO that blocks the read fails the test loudly instead of stalling the run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.chat.byte_level import CHAT_TEMPLATE, MIN_VOCAB, write_tokenizer

DEADLINE_S = 60
LOAD = (
    "import sys\n"
    "from dsworker.chat.tokenizer import TextTokenizer, TokenizerError\n"
    "try:\n"
    "    tok = TextTokenizer(sys.argv[1])\n"
    "except TokenizerError as e:\n"
    "    print('refused:', e); sys.exit(2)\n"
    "print(tok.chat_template == sys.argv[2], sorted(tok.eos_token_ids))\n"
)


@pytest.fixture
def model(tmp_path: Path) -> Path:
    d = tmp_path / "model"
    d.mkdir()
    write_tokenizer(d, MIN_VOCAB)
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": 1}))
    return d


def load(d: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", LOAD, str(d), CHAT_TEMPLATE],
        capture_output=True, text=True, timeout=DEADLINE_S,
    )  # fmt: skip


def refused(d: Path, *words: str) -> str:
    r = load(d)
    assert r.returncode == 2 and "Traceback" not in r.stderr, (r.stdout, r.stderr)
    assert all(w in r.stdout for w in words), r.stdout
    return r.stdout


def test_the_synthesized_files_load(model: Path) -> None:
    r = load(model)
    assert (r.returncode, r.stdout.strip()) == (0, "True [1]"), r.stderr


@pytest.mark.parametrize(
    "name", ["tokenizer_config.json", "generation_config.json", "tokenizer.json"]
)
def test_a_fifo_in_place_of_a_file_is_refused_not_waited_on(model: Path, name: str) -> None:
    (model / name).unlink()
    os.mkfifo(model / name)
    refused(model, name, "FIFO (named pipe), not a regular file")


@pytest.mark.parametrize("name", ["tokenizer_config.json", "tokenizer.json", "chat_template.jinja"])
def test_a_file_linked_out_of_the_model_dir_is_refused(
    model: Path, tmp_path: Path, name: str
) -> None:
    if name == "chat_template.jinja":  # read only when tokenizer_config.json has no template
        cfg = json.loads((model / "tokenizer_config.json").read_text())
        del cfg["chat_template"]
        (model / "tokenizer_config.json").write_text(json.dumps(cfg))
    outside = tmp_path / f"elsewhere-{name}"
    if (model / name).exists():
        (model / name).rename(outside)
    else:
        outside.write_text(CHAT_TEMPLATE)
    (model / name).symlink_to(outside)
    refused(model, name, "symbolic link to", "outside")


def test_a_link_inside_the_model_dir_is_fine(model: Path) -> None:
    (model / "tokenizer_config.json").rename(model / "real_config.json")
    (model / "tokenizer_config.json").symlink_to("real_config.json")
    assert load(model).returncode == 0


@pytest.mark.parametrize(
    ("name", "key"), [("tokenizer_config.json", "eos_token"), ("generation_config.json", "eos_token_id"),
                      ("tokenizer.json", "version")],
)  # fmt: skip
def test_a_duplicate_key_is_refused(model: Path, name: str, key: str) -> None:
    path = model / name
    text = path.read_text()
    first = json.dumps(json.loads(text)[key], ensure_ascii=False)
    path.write_text(text.replace("{", f'{{"{key}": {first}, ', 1))
    refused(model, name, f"duplicate key '{key}'")


def test_a_config_that_is_not_an_object_is_refused(model: Path) -> None:
    (model / "tokenizer_config.json").write_text("[]")
    refused(model, "tokenizer_config.json", "not a JSON object")
