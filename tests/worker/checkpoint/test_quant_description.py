"""msModelSlim's description file and the sharder's check that tensors are stored as declared.

Real files, real symlinks: a description that is not strict JSON, links out of the model
directory, or comes twice is refused naming the file, wherever it is read (the engine's model
builder, the sharder, the start-up memory check). A checkpoint whose tensors disagree with its
declarations is refused by the sharder before it writes anything, naming the tensor and the fix.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest

from dsworker.checkpoint.quant_description import read_quant_description
from dsworker.contract.errors import CheckpointError
from dsworker.contract.layout import ParallelPlan
from dsworker.model import ModelArgs
from dsworker.tools.shard import shard

DESC = "quant_model_description_w8a8_dynamic.json"
W8A8_FLOAT = (r"re:.*kv_b_proj$", "model.layers.0.mlp.down_proj")
FP8_FLOAT = ("model.layers.0.self_attn.o_proj", "model.layers.1.mlp.shared_experts")
P1 = ParallelPlan(1, 1, 1, 1, 1)


@pytest.fixture
def w8a8(synth_checkpoint: Callable[..., Path], tmp_path: Path) -> Path:
    src = synth_checkpoint("v3", "tiny", "w8a8", keep_float=W8A8_FLOAT)
    return Path(shutil.copytree(src, tmp_path / "model"))


def test_the_description_is_read_as_written(w8a8: Path) -> None:
    desc = read_quant_description(w8a8)
    assert desc is not None and desc.file == str(w8a8 / DESC)
    assert desc.entries["model.layers.0.mlp.down_proj.weight"] == "FLOAT"
    assert desc.entries["model.layers.0.mlp.up_proj.weight"] == "W8A8_DYNAMIC"
    args = ModelArgs.from_dir(w8a8)
    assert args.linear_format("model.layers.0.mlp.down_proj") is None
    assert args.linear_format("model.layers.2.self_attn.kv_b_proj") is None
    assert args.linear_format("model.layers.0.mlp.up_proj") == args.quant


def _not_json(root: Path, tmp: Path) -> str:
    (root / DESC).write_text('{"model.layers.0.mlp.down_proj.weight": "FLOAT",')
    return "msModelSlim description"


def _duplicate_key(root: Path, tmp: Path) -> str:
    (root / DESC).write_text('{"a.weight": "FLOAT", "a.weight": "W8A8"}')
    return "duplicate"


def _link_out(root: Path, tmp: Path) -> str:
    outside = tmp / "elsewhere.json"
    shutil.move(root / DESC, outside)
    (root / DESC).symlink_to(outside)
    return "outside"


def _two_files(root: Path, tmp: Path) -> str:
    shutil.copy(root / DESC, root / "quant_model_description.json")
    return "several msModelSlim description files"


def _a_directory(root: Path, tmp: Path) -> str:
    (root / DESC).unlink()
    (root / DESC).mkdir()
    return "not a regular file"


def _not_a_type(root: Path, tmp: Path) -> str:
    desc = json.loads((root / DESC).read_text())
    desc["model.layers.0.mlp.up_proj.weight"] = ["W8A8"]
    (root / DESC).write_text(json.dumps(desc))
    return "must be a quantisation type"


BAD = [_not_json, _duplicate_key, _link_out, _two_files, _a_directory, _not_a_type]


@pytest.mark.parametrize("spoil", BAD, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_description_is_refused_naming_the_file(
    spoil: Callable[[Path, Path], str], w8a8: Path, tmp_path: Path
) -> None:
    words = spoil(w8a8, tmp_path)
    for read in (
        lambda: ModelArgs.from_dir(w8a8),
        lambda: shard(w8a8, tmp_path / "out", P1),
    ):
        with pytest.raises(CheckpointError) as e:
            read()
        assert str(w8a8 / DESC) in str(e.value) or "quant_model_description" in str(e.value)
        assert words in str(e.value), str(e.value)
    assert not (tmp_path / "out" / "_COMPLETE").exists()


def test_a_tensor_stored_float_but_declared_quantised_is_refused(
    synth_checkpoint: Callable[..., Path], tmp_path: Path
) -> None:
    src = synth_checkpoint("v3", "tiny", "fp8", keep_float=FP8_FLOAT)
    ck = Path(shutil.copytree(src, tmp_path / "model"))
    cfg = json.loads((ck / "config.json").read_text())
    cfg["quantization_config"]["modules_to_not_convert"] = [FP8_FLOAT[0]]  # forgets one
    (ck / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError) as e:
        shard(ck, tmp_path / "out", P1)
    msg = str(e.value)
    assert "model.layers.1.mlp.shared_experts." in msg and "stored as BF16" in msg, msg
    assert "modules_to_not_convert" in msg


def test_a_tensor_stored_quantised_but_declared_float_is_refused(
    w8a8: Path, tmp_path: Path
) -> None:
    desc = json.loads((w8a8 / DESC).read_text())
    desc["model.layers.1.self_attn.o_proj.weight"] = "FLOAT"
    (w8a8 / DESC).write_text(json.dumps(desc))
    with pytest.raises(CheckpointError) as e:
        shard(w8a8, tmp_path / "out", P1)
    msg = str(e.value)
    assert "model.layers.1.self_attn.o_proj.weight is stored quantised (I8)" in msg, msg
    assert f'{DESC}: "model.layers.1.self_attn.o_proj.weight": "FLOAT"' in msg
