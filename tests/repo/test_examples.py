"""examples/: every custom resource is valid for the API models (no errors, no warnings), passes
the CRD's schema and CEL rules as the API server would apply them, and fits the real model it
names (DeepSeek-V3/R1 config.json dimensions, or the tiny synthetic checkpoint)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from crd_admission import admit, crd_schema
from deepseek_operator.api import parse_deployment
from deepseek_operator.api.config_rules import review_config
from dsworker.tools.synth import make_config

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))

# DeepSeek-V3 / R1 config.json (the public model files), without and with its FP8 block scheme.
_V3_FP8: dict[str, Any] = json.loads(
    (Path(__file__).resolve().parent.parent / "data" / "deepseek-v3-config.json").read_text()
)
V3_CONFIG = {k: v for k, v in _V3_FP8.items() if k != "quantization_config"}
FP8 = {"quantization_config": _V3_FP8["quantization_config"]}
# msModelSlim W8A8_DYNAMIC: no quantization_config, a quant_model_description_*.json beside it.
W8A8_FILES = ["quant_model_description_w8a8_dynamic.json"]

# example -> (config.json, quant description files) of the checkpoint it points at.
CHECKPOINTS: dict[str, tuple[dict[str, Any], list[str]]] = {
    "deepseek-r1-w8a8-ascend-2x8-ep2.yaml": (V3_CONFIG, W8A8_FILES),
    "deepseek-r1-a3-16npu-hostpath.yaml": (V3_CONFIG, W8A8_FILES),
    "deepseek-r1-w8a8-ascend-2x8-nodelocal.yaml": (V3_CONFIG, W8A8_FILES),
    "deepseek-v3-fp8-gpu-2x8.yaml": ({**V3_CONFIG, **FP8}, []),
    "deepseek-r1-mindie-ascend-2x8.yaml": (V3_CONFIG, W8A8_FILES),
    "deepseek-v3-vllm-gpu-2x8.yaml": ({**V3_CONFIG, **FP8}, []),
    "tiny-cpu.yaml": (make_config("v3", "tiny"), []),
}


def load(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / name).read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd_schema()


def test_every_example_has_a_checkpoint_here() -> None:
    assert sorted(p.name for p in FILES) == sorted(CHECKPOINTS)


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_valid_without_warnings(path: Path) -> None:
    obj = yaml.safe_load(path.read_text())
    result = parse_deployment(obj)
    assert result.ok, result.errors
    assert result.warnings == []
    assert "namespace" not in obj["metadata"], "apply examples with -n; keep them portable"
    assert path.read_text().startswith("#"), "each example starts with a comment saying what it is"


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_admitted_by_the_crd_schema_and_cel(schema: dict[str, Any], path: Path) -> None:
    assert admit(schema, yaml.safe_load(path.read_text()), cel=True) == []


@pytest.mark.parametrize("name", sorted(CHECKPOINTS))
def test_fits_the_model(name: str) -> None:
    config, quant_files = CHECKPOINTS[name]
    result = parse_deployment(load(name))
    assert result.deployment is not None
    review = review_config(result.deployment.spec, config, quant_files)
    assert review.errors == [] and review.warnings == []
    assert review.architecture == "DeepseekV3"


def test_r1_w8a8_on_two_ascend_nodes_with_ep_level_2() -> None:
    spec = parse_deployment(load("deepseek-r1-w8a8-ascend-2x8-ep2.yaml")).deployment.spec
    assert spec.model.quantization == "w8a8" and spec.model.mtp
    assert (spec.parallelism.nodes, spec.parallelism.devices_per_node) == (2, 8)
    assert spec.expert_parallel.level == 2 and spec.expert_parallel.interconnect == "switch"
    assert spec.worker.accelerator.resource_name == "huawei.com/Ascend910"
    assert spec.sharding.store.pvc is not None and spec.sharding.stage_to_tmpfs


def test_r1_on_one_16_npu_node_with_a_tmpfs_host_path_store() -> None:
    spec = parse_deployment(load("deepseek-r1-a3-16npu-hostpath.yaml")).deployment.spec
    assert (spec.parallelism.nodes, spec.parallelism.devices_per_node) == (1, 16)
    assert spec.sharding.store.host_path.path.startswith("/dev/shm/")
    assert spec.worker.node_selector and spec.worker.accelerator.type == "npu"


def test_v3_fp8_on_two_gpu_nodes() -> None:
    spec = parse_deployment(load("deepseek-v3-fp8-gpu-2x8.yaml")).deployment.spec
    assert spec.model.quantization == "fp8" and not spec.model.dequantize_fp8
    assert (spec.parallelism.nodes, spec.parallelism.devices_per_node) == (2, 8)
    assert spec.worker.accelerator.resource_name == "nvidia.com/gpu"


def test_tiny_cpu() -> None:
    spec = parse_deployment(load("tiny-cpu.yaml")).deployment.spec
    assert spec.worker.accelerator.type == "cpu" and spec.worker.accelerator.resource_name is None
    assert spec.parallelism.world() == 2


def test_tiny_cpu_header_command_makes_the_checkpoint_it_serves() -> None:
    """The `dsworker synth` line in the file's comments runs as written and writes where
    spec.model.source.hostPath points."""
    import shlex

    from dsworker.cli import build_parser

    text = (EXAMPLES / "tiny-cpu.yaml").read_text()
    line = next(ln for ln in text.splitlines() if ln.lstrip("# ").startswith("dsworker synth"))
    argv = shlex.split(line.lstrip("# "))[1:]
    args = build_parser("synth").parse_args(argv)
    assert args.arch == "v3"
    assert str(args.out) == load("tiny-cpu.yaml")["spec"]["model"]["source"]["hostPath"]["path"]
