"""Spec patches that each runtime rule accepts and rejects (shared by the Python and CEL tests)."""

from __future__ import annotations

from typing import Any

NO_SHARDING = {"enabled": False, "store": None}
GPU = {"accelerator": {"type": "gpu"}}
VLLM: dict[str, Any] = {"runtime": {"engine": "vllm"}, "sharding": NO_SHARDING, "worker": GPU}
MINDIE: dict[str, Any] = {"runtime": {"engine": "mindie", "image": "mindie:2.1.RC1"}}


def vllm(**patch: Any) -> dict[str, Any]:
    return {**VLLM, **patch}


def mindie(**patch: Any) -> dict[str, Any]:
    return {**MINDIE, **patch}


# rule name -> (a spec patch it accepts, a spec patch it rejects)
RUNTIME_RULE_CASES: dict[str, tuple[dict[str, Any], dict[str, Any]]] = {
    "vllm-sharding": (vllm(), {"runtime": {"engine": "vllm"}, "worker": GPU}),
    "vllm-buffer-table": (
        vllm(expertParallel={"level": 2}),
        vllm(expertParallel={"level": 2, "alltoallBufferScaleFactors": [[0, 8.0]]}),
    ),
    "vllm-routing-cutoff": (
        vllm(expertParallel={"initRoutingCutoff": {"enabled": False}}),
        vllm(expertParallel={"initRoutingCutoff": {"enabled": True}}),
    ),
    "vllm-grouped-matmul": (
        vllm(expertParallel={"groupedMatmul": "auto"}),
        vllm(expertParallel={"groupedMatmul": "on"}),
    ),
    "vllm-expert-merge": (
        vllm(features={"expertMerge": False}),
        vllm(features={"expertMerge": True}),
    ),
    "vllm-eplb": (
        vllm(features={"dynamicLoadBalancing": True}),
        vllm(features={"dynamicLoadBalancing": True}, parallelism={"moeTp": 8}),
    ),
    "vllm-dequantize": (
        vllm(model={"dequantizeFp8": False}),
        vllm(model={"dequantizeFp8": True}),
    ),
    "vllm-truncation": (vllm(serving={"truncation": False}), vllm(serving={"truncation": True})),
    "vllm-npu-mem-size": (vllm(serving={"npuMemSize": -1}), vllm(serving={"npuMemSize": 16})),
    "vllm-torch-compile": (
        vllm(serving={"torchCompile": False}),
        vllm(serving={"torchCompile": True}),
    ),
    "vllm-block-size": (vllm(serving={"cacheBlockSize": 64}), vllm(serving={"cacheBlockSize": 48})),
    "vllm-accelerator": (
        vllm(worker={"accelerator": {"type": "npu"}}),
        vllm(worker={"accelerator": {"type": "cpu"}}),
    ),
    "vllm-moe-split": (
        vllm(parallelism={"moeTp": 8}),
        vllm(parallelism={"moeTp": 2}),
    ),
    "vllm-tp-placement": (
        vllm(parallelism={"nodes": 2, "tp": 16}),
        vllm(parallelism={"nodes": 2, "devicesPerNode": 6, "tp": 4}),
    ),
    "mindie-accelerator": (
        mindie(worker={"accelerator": {"type": "npu"}}),
        mindie(worker={"accelerator": {"type": "gpu"}}),
    ),
    "mindie-port": (mindie(serving={"port": 1025}), mindie(serving={"port": 29499})),
    "mindie-batch": (
        mindie(serving={"maxBatchSize": 5000}),
        mindie(serving={"maxBatchSize": 5001}),
    ),
    "mindie-block-size": (
        mindie(serving={"cacheBlockSize": 48}),
        mindie(serving={"cacheBlockSize": 40}),
    ),
    "mindie-reasoning-parser": (mindie(), mindie(serving={"reasoningParser": "deepseek_r1"})),
    "mindie-tool-call-parser": (mindie(), mindie(serving={"toolCallParser": "deepseek_v3"})),
    "mindie-api-key-secret": (mindie(), mindie(serving={"apiKeySecret": {"name": "k"}})),
    "mindie-torch-compile": (mindie(), mindie(serving={"torchCompile": True})),
    "mindie-expert-merge": (
        mindie(sharding=NO_SHARDING),
        mindie(sharding=NO_SHARDING, features={"expertMerge": True}),
    ),
    "mindie-dynamic-load-balancing": (
        mindie(sharding=NO_SHARDING),
        mindie(sharding=NO_SHARDING, features={"dynamicLoadBalancing": True}),
    ),
    "mindie-model-name": (
        mindie(model={"name": "DeepSeek-R1_w8a8"}),
        mindie(model={"name": "DeepSeek R1"}),
    ),
    "extra-args-vllm": (
        vllm(runtime={"engine": "vllm", "extraArgs": ["--seed", "1"]}),
        {"runtime": {"extraArgs": ["--seed", "1"]}},
    ),
    "extra-config-mindie": (
        {"runtime": {**MINDIE["runtime"], "extraConfig": {"LogConfig": {"logLevel": "Info"}}}},
        {"runtime": {"extraConfig": {"LogConfig": {"logLevel": "Info"}}}},
    ),
    "rank-table-mindie": (
        {"runtime": {**MINDIE["runtime"], "rankTableConfigMap": "rt"}},
        {"runtime": {"rankTableConfigMap": "rt"}},
    ),
    "mindie-image": (mindie(), {"runtime": {"engine": "mindie"}}),
    "extra-args-owned": (
        vllm(runtime={"engine": "vllm", "extraArgs": ["--gpu-memory-utilization", "0.92"]}),
        vllm(runtime={"engine": "vllm", "extraArgs": ["--max-model-len=4096"]}),
    ),
    "extra-config-owned": (
        {"runtime": {**MINDIE["runtime"], "extraConfig": {"ServerConfig": {"maxLinkNum": 300}}}},
        {"runtime": {**MINDIE["runtime"], "extraConfig": {"ServerConfig": {"port": 2000}}}},
    ),
}
