"""MindIE Service: config.json (file Version 1.0.0), its environment and start command.

Field names, types and ranges follow MindIE's public documentation as recorded in
tests/data/formats/mindie_service_config.schema.json and mindie_service.env_and_endpoints.json;
every rendered config is validated against them in the tests. The spec already refuses what
MindIE cannot take (api/runtime_rules.py), so rendering never fails on a validated spec.
"""

from __future__ import annotations

import copy
import json
from typing import Any

from ...api import DeepSeekDeploymentSpec
from .common import (
    EngineRendering,
    Obj,
    Placement,
    container_port,
    field_env,
    http_probes,
    pod_identity_env,
)

CONFIG_FILE = "config.json"
RANK_TABLE_DIR = "/etc/mindie/ranktable"
RANK_TABLE_KEY = "hccl.json"
RANK_TABLE_PATH = f"{RANK_TABLE_DIR}/{RANK_TABLE_KEY}"
INSTALL_PATH = "/usr/local/Ascend/mindie/latest/mindie-service"
# The environment scripts of an Ascend image (CANN, ATB, ATB models, MindIE); each is sourced if
# the image has it, then the daemon replaces the shell.
SET_ENV = (
    "/usr/local/Ascend/ascend-toolkit/set_env.sh",
    "/usr/local/Ascend/nnal/atb/set_env.sh",
    "/usr/local/Ascend/atb-models/set_env.sh",
    "/usr/local/Ascend/mindie/set_env.sh",
)
START_SCRIPT = (
    f'for f in {" ".join(SET_ENV)}; do [ -f "$f" ] && . "$f"; done; '
    f'exec "${{MIES_INSTALL_PATH:-{INSTALL_PATH}}}/bin/mindieservice_daemon"'
)
# Defaults of the documentation for what the spec does not say.
MAX_LINK_NUM = 1000
TIMEOUT_SECONDS = 600
MAX_PREFILL_BATCH = 50
MAX_PREFILL_TOKENS = 8192
MAX_PREFILL_TOKENS_LIMIT = 4194304
MODEL_CONFIG = "ModelConfig"


def management_port(spec: DeepSeekDeploymentSpec) -> int:
    return spec.serving.port + 1


def metrics_port(spec: DeepSeekDeploymentSpec) -> int:
    return spec.serving.port + 2


def _deepseekv2(spec: DeepSeekDeploymentSpec) -> Obj:
    ep = spec.expert_parallel
    out: Obj = {"ep_level": ep.level}
    if ep.level == 1:
        out["enable_init_routing_cutoff"] = ep.init_routing_cutoff.enabled
        if ep.init_routing_cutoff.topk_scaling_factor is not None:
            out["topk_scaling_factor"] = ep.init_routing_cutoff.topk_scaling_factor
    if ep.alltoall_buffer_scale_factors:
        out["alltoall_ep_buffer_scale_factors"] = [
            [int(n), float(f)] for n, f in ep.alltoall_buffer_scale_factors
        ]
    return out


def _model_config(spec: DeepSeekDeploymentSpec, model_dir: str) -> Obj:
    plan, serving = spec.parallelism.to_plan(), spec.serving
    out: Obj = {
        "modelInstanceType": "Standard",
        "modelName": spec.model.name or "deepseek",
        "modelWeightPath": model_dir,
        # Devices of one instance on one node; multi-node inference takes the rank table's.
        "worldSize": spec.parallelism.devices_per_node,
        "cpuMemSize": serving.cpu_mem_size,
        "npuMemSize": serving.npu_mem_size,
        "backendType": "atb",
        "trustRemoteCode": False,
        "dp": plan.dp,
        "tp": plan.tp,
        "moe_tp": plan.moe_tp,
        "moe_ep": plan.moe_ep,
        "models": {"deepseekv2": _deepseekv2(spec)},
    }
    if spec.model.mtp:
        plugin = {"plugin_type": "mtp", "num_speculative_tokens": serving.speculative_tokens}
        out["plugin_params"] = json.dumps(plugin, separators=(",", ":"))
    return out


def _schedule_config(spec: DeepSeekDeploymentSpec) -> Obj:
    serving = spec.serving
    return {
        "templateType": "Standard",
        "templateName": "Standard_LLM",
        "cacheBlockSize": serving.cache_block_size,
        "maxPrefillBatchSize": min(MAX_PREFILL_BATCH, serving.max_batch_size),
        "maxPrefillTokens": min(
            MAX_PREFILL_TOKENS_LIMIT, max(MAX_PREFILL_TOKENS, serving.max_input_token_len)
        ),
        "prefillTimeMsPerReq": 150,
        "prefillPolicyType": 0,
        "decodeTimeMsPerReq": 50,
        "decodePolicyType": 0,
        "maxBatchSize": serving.max_batch_size,
        "maxIterTimes": serving.max_seq_len,
        "maxPreemptCount": 0,
        "supportSelectBatch": False,
        "maxQueueDelayMicroseconds": 5000,
        "maxFirstTokenWaitTime": 2500,
    }


def _merge(base: Obj, extra: Obj) -> Obj:
    """extraConfig over the rendered config: objects merge, other values replace; a ModelConfig
    object merges into the one model instance."""
    out = copy.deepcopy(base)
    for key, value in extra.items():
        old = out.get(key)
        if key == MODEL_CONFIG and isinstance(old, list) and isinstance(value, dict):
            out[key] = [_merge(old[0], value), *old[1:]]
        elif isinstance(old, dict) and isinstance(value, dict):
            out[key] = _merge(old, value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def config_json(spec: DeepSeekDeploymentSpec, model_dir: str, group_port: int) -> Obj:
    """MindIE Service's config.json for one validated spec."""
    serving, par = spec.serving, spec.parallelism
    config: Obj = {
        "Version": "1.0.0",
        "ServerConfig": {
            # MIES_CONTAINER_IP and MIES_CONTAINER_MANAGEMENT_IP (the pod IP) override both.
            "ipAddress": "127.0.0.1",
            "managementIpAddress": "127.0.0.2",
            "port": serving.port,
            "managementPort": management_port(spec),
            "metricsPort": metrics_port(spec),
            "allowAllZeroIpListening": False,
            "maxLinkNum": MAX_LINK_NUM,
            # Plain HTTP inside the cluster, as the other runtimes serve; extraConfig turns TLS
            # on together with the certificate paths of the image.
            "httpsEnabled": False,
            "fullTextEnabled": False,
            "inferMode": "standard",
            "interCommTLSEnabled": False,
            "openAiSupport": "vllm",
            "tokenTimeout": TIMEOUT_SECONDS,
            "e2eTimeout": TIMEOUT_SECONDS,
        },
        "BackendConfig": {
            "backendName": "mindieservice_llm_engine",
            "modelInstanceNumber": 1,
            "npuDeviceIds": [list(range(par.devices_per_node))],
            "tokenizerProcessNumber": 8,
            "multiNodesInferEnabled": par.nodes > 1,
            "multiNodesInferPort": group_port,
            "interNodeTLSEnabled": False,
            "ModelDeployConfig": {
                "maxSeqLen": serving.max_seq_len,
                "maxInputTokenLen": serving.max_input_token_len,
                "truncation": serving.truncation,
                MODEL_CONFIG: [_model_config(spec, model_dir)],
            },
            "ScheduleConfig": _schedule_config(spec),
        },
    }
    return _merge(config, spec.runtime.extra_config or {})


def env(spec: DeepSeekDeploymentSpec, config_dir: str) -> list[Obj]:
    """MindIE's variables: the pod IP as its service and management address, the config and
    rank table paths, metrics on, MTP."""
    out = [
        *pod_identity_env(),
        field_env("MIES_CONTAINER_IP", "status.podIP"),
        field_env("MIES_CONTAINER_MANAGEMENT_IP", "status.podIP"),
        {"name": "MIES_CONFIG_JSON_PATH", "value": f"{config_dir}/{CONFIG_FILE}"},
        {"name": "MIES_SERVICE_MONITOR_MODE", "value": "1"},
        # MindIE writes its logs under $HOME: the root file system is read-only, /tmp is not.
        {"name": "HOME", "value": "/tmp"},
    ]
    if rank_table_volume(spec) is not None:
        # The user's table; without one the operator builds it (planning/hccl.py, whose
        # environment names its own path). MindIE 1.0.x reads RANKTABLEFILE, later RANK_TABLE_FILE.
        out += [
            {"name": "RANK_TABLE_FILE", "value": RANK_TABLE_PATH},
            {"name": "RANKTABLEFILE", "value": RANK_TABLE_PATH},
        ]
    if spec.model.mtp:
        out.append({"name": "DEEPSEEK_MTP", "value": "1"})
    return out


def render(spec: DeepSeekDeploymentSpec, where: Placement) -> EngineRendering:
    """MindIE's config.json, environment, start command, ports and probes."""
    config = config_json(spec, where.model_dir, where.group_port)
    port = spec.serving.port
    return EngineRendering(
        files={CONFIG_FILE: json.dumps(config, indent=2, sort_keys=True) + "\n"},
        command=["/bin/bash", "-c", START_SCRIPT],
        args=[],
        env=env(spec, where.config_dir),
        ports=[
            container_port("http", port),
            container_port("management", management_port(spec)),
            container_port("metrics", metrics_port(spec)),
            container_port("dist", where.group_port),
        ],
        probes=http_probes(
            where.head_host, management_port(spec), "/v2/health/ready", "/v2/health/live"
        ),
        config_file=CONFIG_FILE,
        extra={"config": config, "metricsPath": "/metrics", "metricsPort": metrics_port(spec)},
    )


def rank_table_volume(spec: DeepSeekDeploymentSpec) -> tuple[Obj, Obj] | None:
    """The rank table ConfigMap's volume and mount, with more than one node."""
    name = spec.runtime.rank_table_config_map
    if spec.parallelism.nodes == 1 or name is None:
        return None
    volume = {
        "name": "rank-table",
        "configMap": {
            "name": name,
            "items": [{"key": RANK_TABLE_KEY, "path": RANK_TABLE_KEY}],
            "defaultMode": 0o640,
        },
    }
    return volume, {"name": "rank-table", "mountPath": RANK_TABLE_DIR, "readOnly": True}


def config_values(rendering: EngineRendering) -> Any:
    """The parsed config.json of a rendering (for tests and docs)."""
    return json.loads(rendering.files[CONFIG_FILE])
