"""The runtime renderers: every example, served by each runtime its accelerator allows, renders a
MindIE config.json that MindIE's recorded schema accepts and `vllm serve` arguments that vLLM
0.13's recorded options accept, with the spec's values where docs/runtimes.md says they go."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepseek_operator.api import DeepSeekDeploymentSpec, parse_deployment
from deepseek_operator.planning.runtimes import Placement, mindie, vllm
from recorded_formats import load, mindie_config_errors, vllm_args_errors

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"
FILES = sorted(EXAMPLES.glob("*.yaml"))
WHERE = Placement(
    model_dir="/model",
    config_dir="/etc/dsworker",
    head_host="r1-worker-0.r1-ranks.llm.svc",
    group_port=29500,
)


def as_runtime(obj: dict[str, Any], engine: str) -> dict[str, Any]:
    """The example served by `engine`: what that runtime needs set, what it refuses left out."""
    obj = copy.deepcopy(obj)
    spec = obj["spec"]
    runtime = spec.setdefault("runtime", {})
    if runtime.get("engine") == engine:
        return obj
    spec["runtime"] = {"engine": engine}
    ep, serving = spec.get("expertParallel", {}), spec.get("serving", {})
    if engine == "vllm":
        spec["sharding"] = {"enabled": False}
        for key in ("alltoallBufferScaleFactors", "initRoutingCutoff", "groupedMatmul"):
            ep.pop(key, None)
        for key in ("npuMemSize", "truncation", "torchCompile"):
            serving.pop(key, None)
        spec.get("model", {}).pop("dequantizeFp8", None)
        par = spec.setdefault("parallelism", {})
        if par.get("moeTp", 1) != 1:  # vLLM: experts over all ranks (or TP over all ranks)
            par["moeTp"] = 1
            par.pop("moeEp", None)
    if engine == "mindie":
        spec["runtime"]["image"] = "mindie:2.1.RC1"
        if spec.get("parallelism", {}).get("nodes", 1) > 1:
            spec["runtime"]["rankTableConfigMap"] = "rank-table"
        for key in ("reasoningParser", "toolCallParser", "torchCompile"):
            serving.pop(key, None)
    return obj


def cases(engine: str, accelerators: tuple[str, ...]) -> list[tuple[str, DeepSeekDeploymentSpec]]:
    out = []
    for path in FILES:
        obj = yaml.safe_load(path.read_text())
        accelerator = obj["spec"].get("worker", {}).get("accelerator", {}).get("type", "npu")
        if accelerator not in accelerators:
            continue
        result = parse_deployment(as_runtime(obj, engine))
        assert result.ok, (path.name, result.errors)
        out.append((path.name, result.deployment.spec))
    return out


MINDIE = cases("mindie", ("npu",))
VLLM = cases("vllm", ("gpu", "npu"))


def test_every_accelerated_example_is_rendered_by_both_engines() -> None:
    assert {n for n, _ in MINDIE} >= {"deepseek-r1-mindie-ascend-2x8.yaml"}
    assert {n for n, _ in VLLM} >= {
        "deepseek-v3-vllm-gpu-2x8.yaml",
        "deepseek-r1-mindie-ascend-2x8.yaml",
        "deepseek-v3-fp8-gpu-2x8.yaml",
    }


# ------------------------------------------------------------------------------------- MindIE


@pytest.mark.parametrize("name,spec", MINDIE, ids=[n for n, _ in MINDIE])
def test_mindie_config_matches_the_recorded_schema(name: str, spec: DeepSeekDeploymentSpec) -> None:
    rendering = mindie.render(spec, WHERE)
    config = json.loads(rendering.files["config.json"])
    assert mindie_config_errors(config, spec.parallelism.nodes > 1) == []


@pytest.mark.parametrize("name,spec", MINDIE, ids=[n for n, _ in MINDIE])
def test_mindie_config_carries_the_spec(name: str, spec: DeepSeekDeploymentSpec) -> None:
    config = mindie.config_json(spec, "/model", 29500)
    backend = config["BackendConfig"]
    model = backend["ModelDeployConfig"]["ModelConfig"][0]
    plan = spec.parallelism.to_plan()
    assert model["modelWeightPath"] == "/model"
    assert model["trustRemoteCode"] is False
    assert (model["dp"], model["tp"], model["moe_tp"], model["moe_ep"]) == (
        plan.dp,
        plan.tp,
        plan.moe_tp,
        plan.moe_ep,
    )
    assert model["worldSize"] == spec.parallelism.devices_per_node
    assert backend["npuDeviceIds"] == [list(range(spec.parallelism.devices_per_node))]
    assert backend["multiNodesInferEnabled"] == (spec.parallelism.nodes > 1)
    assert model["models"]["deepseekv2"]["ep_level"] == spec.expert_parallel.level
    assert backend["ModelDeployConfig"]["maxSeqLen"] == spec.serving.max_seq_len
    assert backend["ScheduleConfig"]["maxBatchSize"] == spec.serving.max_batch_size
    assert config["ServerConfig"]["port"] == spec.serving.port
    assert ("plugin_params" in model) == spec.model.mtp


def test_mindie_two_nodes_environment_probes_and_buffer_table() -> None:
    spec = dict(MINDIE)["deepseek-r1-mindie-ascend-2x8.yaml"]
    rendering = mindie.render(spec, WHERE)
    env = {e["name"]: e for e in rendering.env}
    assert env["MIES_CONTAINER_IP"]["valueFrom"]["fieldRef"]["fieldPath"] == "status.podIP"
    assert env["MIES_CONFIG_JSON_PATH"]["value"] == "/etc/dsworker/config.json"
    assert (
        env["RANK_TABLE_FILE"]["value"] == env["RANKTABLEFILE"]["value"] == mindie.RANK_TABLE_PATH
    )
    assert env["DEEPSEEK_MTP"]["value"] == "1"
    recorded = load("mindie_service.env_and_endpoints.json")
    ours = {"POD_NAME", "POD_NAMESPACE", "POD_IP", "HOME"}
    assert set(env) - ours <= set(recorded["env"]), set(env) - ours - set(recorded["env"])
    ready = rendering.probes["readinessProbe"]["exec"]["command"]
    assert ready[-1] == recorded["endpoints"]["health_ready"]["path"]
    assert ready[-2] == str(spec.serving.port + 1)  # the management port
    live = rendering.probes["livenessProbe"]["exec"]["command"]
    assert live[-1] == recorded["endpoints"]["health_live"]["path"]
    model = json.loads(rendering.files["config.json"])["BackendConfig"]["ModelDeployConfig"]
    ds = model["ModelConfig"][0]["models"]["deepseekv2"]
    assert ds["alltoall_ep_buffer_scale_factors"] == [[1048576, 1.32], [8192, 5.2], [0, 8.0]]
    assert json.loads(model["ModelConfig"][0]["plugin_params"]) == {
        "plugin_type": "mtp",
        "num_speculative_tokens": 1,
    }
    assert json.loads(rendering.files["config.json"])["ServerConfig"]["maxLinkNum"] == 300
    assert {p["name"]: p["containerPort"] for p in rendering.ports} == {
        "http": 1025,
        "management": 1026,
        "metrics": 1027,
        "dist": 29500,
    }


def test_mindie_single_node_has_no_rank_table_and_level_1_keys() -> None:
    obj = as_runtime(
        yaml.safe_load((EXAMPLES / "deepseek-r1-a3-16npu-hostpath.yaml").read_text()), "mindie"
    )
    obj["spec"]["expertParallel"] = {
        "level": 1,
        "initRoutingCutoff": {"enabled": True, "topkScalingFactor": 0.5},
    }
    spec = parse_deployment(obj).deployment.spec
    rendering = mindie.render(spec, WHERE)
    assert not {"RANK_TABLE_FILE", "RANKTABLEFILE"} & {e["name"] for e in rendering.env}
    assert mindie.rank_table_volume(spec) is None
    config = json.loads(rendering.files["config.json"])
    assert mindie_config_errors(config, False) == []
    ds = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]["models"]["deepseekv2"]
    assert ds == {"ep_level": 1, "enable_init_routing_cutoff": True, "topk_scaling_factor": 0.5}


def test_mindie_extra_config_merges_into_the_model_instance() -> None:
    obj = as_runtime(
        yaml.safe_load((EXAMPLES / "deepseek-r1-mindie-ascend-2x8.yaml").read_text()), "mindie"
    )
    obj["spec"]["runtime"]["extraConfig"] = {
        "BackendConfig": {
            "ModelDeployConfig": {"ModelConfig": {"async_scheduler_wait_time": 300}},
            "ScheduleConfig": {"maxPrefillTokens": 16384},
        },
        "LogConfig": {"dynamicLogLevel": "info"},
    }
    spec = parse_deployment(obj).deployment.spec
    config = mindie.config_json(spec, "/model", 29500)
    assert mindie_config_errors(config, True) == []
    model = config["BackendConfig"]["ModelDeployConfig"]["ModelConfig"]
    assert len(model) == 1 and model[0]["async_scheduler_wait_time"] == 300
    assert model[0]["modelWeightPath"] == "/model"
    assert config["BackendConfig"]["ScheduleConfig"]["maxPrefillTokens"] == 16384


def test_the_schema_checker_catches_a_bad_rendering() -> None:
    """The check above can fail: a config with a port below 1024 is refused."""
    spec = dict(MINDIE)["deepseek-r1-mindie-ascend-2x8.yaml"]
    config = mindie.config_json(spec, "/model", 29500)
    config["ServerConfig"]["port"] = 80
    config["BackendConfig"]["ScheduleConfig"]["maxIterTimes"] = 10**6
    errors = mindie_config_errors(config, True)
    assert any("/ServerConfig/port" in e for e in errors), errors


# --------------------------------------------------------------------------------------- vLLM


@pytest.mark.parametrize("name,spec", VLLM, ids=[n for n, _ in VLLM])
def test_vllm_args_of_every_node_match_the_recorded_options(
    name: str, spec: DeepSeekDeploymentSpec
) -> None:
    launch = vllm.launch(spec, WHERE)
    accelerator = spec.worker.accelerator.type
    for index in range(spec.parallelism.nodes):
        args = launch.for_node(index, "10.0.0.9")
        assert vllm_args_errors(args, accelerator) == [], (index, args)


@pytest.mark.parametrize("name,spec", VLLM, ids=[n for n, _ in VLLM])
def test_vllm_args_carry_the_spec(name: str, spec: DeepSeekDeploymentSpec) -> None:
    args = vllm.launch(spec, WHERE).for_node(0, "10.0.0.9")
    plan = spec.parallelism.to_plan()

    def value(flag: str) -> str:
        return args[args.index(flag) + 1]

    assert args[0] == "/model"
    assert value("--tensor-parallel-size") == str(plan.tp)
    assert value("--max-model-len") == str(spec.serving.max_seq_len)
    assert value("--max-num-seqs") == str(spec.serving.max_batch_size)
    assert value("--port") == str(spec.serving.port)
    assert "--no-trust-remote-code" in args and "--trust-remote-code" not in args
    assert ("--enable-expert-parallel" in args) == (plan.moe_tp == 1 and plan.world_size > 1)
    if spec.model.mtp:
        assert json.loads(value("--speculative-config"))["num_speculative_tokens"] == (
            spec.serving.speculative_tokens
        )


def test_vllm_two_gpu_nodes_without_ray() -> None:
    spec = dict(VLLM)["deepseek-v3-vllm-gpu-2x8.yaml"]
    launch = vllm.launch(spec, WHERE)
    head, other = launch.for_node(0, "10.0.0.9"), launch.for_node(1, "10.0.0.10")
    common = [
        "--data-parallel-size",
        "2",
        "--data-parallel-size-local",
        "1",
        "--data-parallel-rpc-port",
        "29500",
    ]
    for args in (head, other):
        assert args[args.index("--data-parallel-size") :][:6] == common
        assert args[args.index("--all2all-backend") + 1] == "deepep_high_throughput"
        assert args[args.index("--quantization") + 1] == "fp8"
        assert json.loads(args[args.index("--speculative-config") + 1])["method"] == "deepseek_mtp"
    assert launch.args[-2:] == ["--gpu-memory-utilization", "0.92"]  # extraArgs come last
    assert head[head.index("--data-parallel-address") + 1] == "10.0.0.9"
    assert "--headless" not in head
    assert other[other.index("--data-parallel-address") + 1] == WHERE.head_host
    assert other[other.index("--data-parallel-start-rank") + 1] == "1"
    assert "--headless" in other
    rendering = vllm.render(spec, WHERE)
    assert rendering.command[:2] == ["/bin/sh", "-c"] and rendering.command[3] == "vllm"
    assert rendering.args == launch.args
    assert '"$POD_IP"' in rendering.command[2] and "$((i * 1))" in rendering.command[2]


def test_vllm_script_runs_each_nodes_arguments(tmp_path: Path) -> None:
    """The launch script, run by a real shell with a stub `vllm`, passes node 0's and node 1's
    arguments exactly as for_node renders them."""
    import subprocess

    spec = dict(VLLM)["deepseek-v3-vllm-gpu-2x8.yaml"]
    rendering = vllm.render(spec, WHERE)
    stub = tmp_path / "vllm"
    stub.write_text('#!/bin/sh\nfor a in "$@"; do printf "%s\\n" "$a"; done\n')
    stub.chmod(0o755)
    launch = rendering.extra["launch"]
    for index, ip in ((0, "10.0.0.9"), (1, "10.0.0.10")):
        env = {"PATH": f"{tmp_path}:/usr/bin:/bin", "POD_NAME": f"r1-worker-{index}", "POD_IP": ip}
        out = subprocess.run(
            [*rendering.command, *rendering.args],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.splitlines()
        assert out == ["serve", *launch.for_node(index, ip)]


def test_vllm_ascend_two_nodes_uses_ascend_options() -> None:
    spec = dict(VLLM)["deepseek-r1-mindie-ascend-2x8.yaml"]
    assert spec.runtime.image == "quay.io/ascend/vllm-ascend:v0.13.0"
    args = vllm.launch(spec, WHERE).for_node(1, "10.0.0.10")
    assert args[args.index("--quantization") + 1] == "ascend"
    assert json.loads(args[args.index("--speculative-config") + 1])["method"] == "mtp"
    assert "--all2all-backend" not in args
    assert "HCCL_IF_IP" in {e["name"] for e in vllm.env(spec)}


def test_vllm_one_tensor_group_over_two_nodes() -> None:
    obj = as_runtime(
        yaml.safe_load((EXAMPLES / "deepseek-v3-vllm-gpu-2x8.yaml").read_text()), "vllm"
    )
    obj["spec"]["parallelism"] = {"nodes": 2, "devicesPerNode": 8, "tp": 16, "moeEp": 1}
    spec = parse_deployment(obj).deployment.spec
    launch = vllm.launch(spec, WHERE)
    other = launch.for_node(1, "10.0.0.10")
    assert vllm_args_errors(other, "gpu") == []
    assert other[other.index("--node-rank") + 1] == "1" and "--headless" in other
    assert other[other.index("--nnodes") + 1] == "2"
    assert "--enable-expert-parallel" not in other and "--data-parallel-address" not in other


def test_the_option_checker_catches_a_bad_rendering() -> None:
    """The check above can fail: an unknown flag, a bad choice and a missing value are named."""
    errors = vllm_args_errors(
        ["/model", "--block-size", "48", "--no-such-flag", "--all2all-backend", "deepep", "--port"],
        "gpu",
    )
    assert len(errors) == 4, errors
    assert vllm_args_errors(["/model", "--quantization", "ascend"], "gpu")
    assert vllm_args_errors(["/model", "--quantization", "ascend"], "npu") == []
