"""One pod's share of a layout: the rule in contract/layout.py that the stager copies by, the
node-local sharder writes by and the operator sizes memory by, checked against real files."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from dsworker.checkpoint.sharded_metadata import read_metadata
from dsworker.contract.layout import (
    COMPLETE_MARKER,
    METADATA_FILE,
    TOP,
    ParallelPlan,
    dir_bytes_by_group,
    dir_group,
    pod_dirs,
    pod_ranks,
    staged_bytes,
)
from dsworker.tools.shard import shard
from dsworker.tools.stage import stage_ranks
from dsworker.tools.verify import verify_sharded

DSWORKER = str(Path(sys.executable).with_name("dsworker"))
PLAN = ParallelPlan(4, 2, 2, 2, 2)


def _disk_bytes(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def test_groups_and_pod_dirs() -> None:
    assert pod_ranks(1, 2) == range(2, 4)
    assert dir_group("config.json") == TOP
    assert dir_group("model-norm/model.safetensors") == "norm"
    assert dir_group("model-attn-tp-001/model.safetensors") == "attn"
    assert dir_group("model-dense-tp-000/x.safetensors") == "dense"
    assert dir_group("model-moe-tp-000-ep-001/x.safetensors") == "moe"
    assert dir_group("model-003/model.safetensors") == "vocab"
    dirs = pod_dirs(PLAN, range(0, 2))
    assert len(dirs) == len(set(dirs))
    assert set(dirs) == set(PLAN.rank_dirs(0)) | set(PLAN.rank_dirs(1))
    sizes = {TOP: 10, "vocab": 100, "norm": 1, "attn": 20, "dense": 30, "moe": 1000}
    # ranks 0,1: model-000, model-001, norm, attn-tp 0 and 1, dense-tp 0 and 1, moe ep 0 (tp 0, 1)
    assert staged_bytes(PLAN, range(0, 2), sizes) == 10 + 200 + 1 + 40 + 60 + 2000


@pytest.mark.parametrize("pod", [0, 1])
def test_staged_bytes_equal_what_the_stager_writes(tiny_v3: Path, tmp_path: Path, pod: int) -> None:
    """The sharder's dirBytes and the rule give the bytes the stager really puts in tmpfs
    (metadata and seal included), within one file's header digits."""
    out = shard(tiny_v3, tmp_path / "store", PLAN, mtp=True)
    md = read_metadata(tmp_path / "store")
    assert out["dirBytes"] == dir_bytes_by_group(
        {
            **{k: int(v["bytes"]) for k, v in md.files.items()},
            METADATA_FILE: (tmp_path / "store" / METADATA_FILE).stat().st_size,
            COMPLETE_MARKER: (tmp_path / "store" / COMPLETE_MARKER).stat().st_size,
        }
    )
    dest = tmp_path / "dest"
    stage_ranks(tmp_path / "store", dest, pod_ranks(pod, 2))
    real = _disk_bytes(dest)
    predicted = staged_bytes(PLAN, pod_ranks(pod, 2), out["dirBytes"])
    assert predicted >= real
    smallest_file = min(p.stat().st_size for p in dest.rglob("*.safetensors"))
    assert predicted - real < smallest_file
    assert predicted < _disk_bytes(tmp_path / "store")  # a share, not the whole store


def test_node_index_writes_only_that_nodes_ranks(tiny_v3: Path, tmp_path: Path) -> None:
    store = tmp_path / "node1"
    proc = subprocess.run(
        [
            DSWORKER,
            "shard",
            "--model-path",
            str(tiny_v3),
            "--save-directory",
            str(store),
            "--world-size",
            "4",
            "--tp",
            "2",
            "--moe-tp",
            "2",
            "--mtp",
            "--node-index",
            "1",
            "--devices-per-node",
            "2",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    tops = {p.name for p in store.iterdir() if p.is_dir()}
    assert tops == set(pod_dirs(PLAN, range(2, 4)))
    assert "model-000" not in tops and "model-moe-tp-000-ep-000" not in tops
    assert (store / "config.json").is_file()
    md = read_metadata(store)
    assert [r.rank for r in md.ranks] == [2, 3]
    assert md.plan["ranks"] == [2, 4]
    assert verify_sharded(store) == []
    # The node's own pod stages (loads) from it as from a full store.
    res = stage_ranks(store, tmp_path / "dest", range(2, 4))
    assert set(res.dirs) == tops
    # A full run over a node's part is refused, not taken for complete.
    with pytest.raises(Exception, match="ranks"):
        shard(tiny_v3, store, PLAN, mtp=True)


def test_node_index_outside_the_world_is_refused(tiny_v3: Path, tmp_path: Path) -> None:
    proc = subprocess.run(
        [DSWORKER, "shard", "--model-path", str(tiny_v3), "--save-directory", str(tmp_path / "o")]
        + ["--world-size", "4", "--tp", "2", "--moe-tp", "2", "--node-index", "2"]
        + ["--devices-per-node", "2"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 2
    assert "--node-index 2" in proc.stderr
