"""A malformed config.json makes shard, verify and serve exit 2 with one line naming the key
(not 1 with a traceback, which a Job retries): wrong types, negative sizes, zero divisors, nested
garbage and nesting deep enough to exhaust a recursive parser."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.contract.errors import INVALID_MODEL_CONFIG

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
PLAN_ARGS = ["--world-size", "2", "--tp", "2", "--moe-tp", "2"]


DEEP = '{"x": ' * 5000 + "1" + "}" * 5000  # past the interpreter's recursion limit

# (key of config.json, its new value as JSON text, the key path the message must name)
BAD: list[tuple[str, str, str]] = [
    ("hidden_size", '"64"', "hidden_size"),
    ("num_attention_heads", "-8", "num_attention_heads"),
    ("architectures", "5", "architectures"),
    ("quantization_config", "[1]", "quantization_config"),
    (
        "quantization_config",
        '{"quant_method": "fp8", "weight_block_size": [0, 128]}',
        "quantization_config.weight_block_size",
    ),
    ("rope_scaling", '{"type": "yarn", "factor": "4"}', "rope_scaling.factor"),
    ("n_group", "3", "n_group"),
    ("num_nextn_predict_layers", '"1"', "num_nextn_predict_layers"),
    ("rope_scaling", DEEP, "rope_scaling nested too deeply"),
]


def run_cli(*args: str | Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [DSWORKER, *map(str, args)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, **(env or {})},
    )


def one_line_naming(r: subprocess.CompletedProcess, key: str) -> str:
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr[-2000:]
    assert key in lines[0] and "config.json" in lines[0], lines[0]
    return lines[0]


@pytest.fixture
def ckpt(tiny_v3: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(tiny_v3, tmp_path / "model"))


def _break(model_dir: Path, key: str, value: str) -> None:
    """config.json with `key` set to the JSON text `value` (written as text: json.dumps recurses)."""
    cfg = json.loads((model_dir / "config.json").read_text())
    cfg.pop(key, None)
    (model_dir / "config.json").write_text(json.dumps(cfg)[:-1] + f', "{key}": {value}}}')


@pytest.mark.parametrize(("key", "value", "named"), BAD, ids=[n for _, _, n in BAD])
def test_shard_and_verify_exit_2_naming_the_key(
    ckpt: Path, tmp_path: Path, key: str, value: str, named: str
) -> None:
    _break(ckpt, key, value)
    log = tmp_path / "termlog"
    r = run_cli(
        "shard", "--model-path", ckpt, "--save-directory", tmp_path / "out", *PLAN_ARGS,
        env={"DSOP_TERMINATION_LOG": str(log)},
    )  # fmt: skip
    line = one_line_naming(r, named)
    assert json.loads(log.read_text()) == {
        "error": line.removeprefix("dsworker shard: error: "),
        "reason": INVALID_MODEL_CONFIG,
    }
    assert not (tmp_path / "out").exists()
    r = run_cli("verify", ckpt)
    assert r.returncode == 2 and "Traceback" not in r.stderr and named in r.stderr, r.stderr[-2000:]


@pytest.mark.parametrize(("key", "value", "named"), [BAD[2], BAD[5]], ids=[BAD[2][2], BAD[5][2]])
def test_serve_exits_2_before_starting_any_rank(
    ckpt: Path, key: str, value: str, named: str
) -> None:
    _break(ckpt, key, value)
    r = run_cli("serve", "--model", ckpt, "--nproc-per-node", "1", "--device", "cpu")
    line = one_line_naming(r, named)
    assert line.startswith("dsworker serve: error: ") and "rank" not in r.stderr.lower()
