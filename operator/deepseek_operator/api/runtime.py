"""spec.runtime: which engine serves the model (dsworker, MindIE or vLLM) and its escape hatches.

The spec's other sections say what to serve; this section says which engine's own configuration
they are rendered into (docs/runtimes.md maps every field). What an engine cannot honour is
refused at admission by the spec's rules in runtime_rules.py.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel, Rule
from .model import DNS_SUBDOMAIN

Engine = Literal["dsworker", "mindie", "vllm"]
ENGINES: tuple[Engine, ...] = ("dsworker", "mindie", "vllm")

# The public images of the vLLM version whose options are recorded under tests/data/formats.
VLLM_VERSION = "0.13.0"
DEFAULT_VLLM_IMAGES = {
    "gpu": f"vllm/vllm-openai:v{VLLM_VERSION}",
    "npu": f"quay.io/ascend/vllm-ascend:v{VLLM_VERSION}",
}

MAX_EXTRA_ARGS = 32
MAX_EXTRA_ARG_LEN = 1024

# `vllm serve` flags the operator renders from the spec (with their short aliases), or that would
# break the group (--headless, --pipeline-parallel-size) or the security model
# (--trust-remote-code): extraArgs may not set them.
VLLM_OWNED_FLAGS: tuple[str, ...] = (
    "--model",
    "--served-model-name",
    "--host",
    "--port",
    "--tensor-parallel-size",
    "-tp",
    "--pipeline-parallel-size",
    "-pp",
    "--data-parallel-size",
    "-dp",
    "--data-parallel-size-local",
    "-dpl",
    "--data-parallel-rank",
    "-dpn",
    "--data-parallel-start-rank",
    "-dpr",
    "--data-parallel-address",
    "-dpa",
    "--data-parallel-rpc-port",
    "-dpp",
    "--data-parallel-backend",
    "-dpb",
    "--data-parallel-hybrid-lb",
    "--data-parallel-external-lb",
    "--headless",
    "--nnodes",
    "--node-rank",
    "--master-addr",
    "--master-port",
    "--distributed-executor-backend",
    "--enable-expert-parallel",
    "--no-enable-expert-parallel",
    "--all2all-backend",
    "--enable-eplb",
    "--no-enable-eplb",
    "--max-model-len",
    "--max-num-seqs",
    "--speculative-config",
    "--quantization",
    "-q",
    "--block-size",
    "--enable-prefix-caching",
    "--no-enable-prefix-caching",
    "--enforce-eager",
    "--no-enforce-eager",
    "--trust-remote-code",
    "--no-trust-remote-code",
    "--reasoning-parser",
    "--tool-call-parser",
    "--enable-auto-tool-choice",
    "--no-enable-auto-tool-choice",
)

# config.json keys the operator renders from the spec (dotted paths; ModelConfig means the one
# model instance): extraConfig may not set them. The top level it may touch is MINDIE_SECTIONS.
MINDIE_SECTIONS = ("ServerConfig", "BackendConfig", "LogConfig")
MINDIE_OWNED_KEYS: tuple[str, ...] = (
    "ServerConfig.ipAddress",
    "ServerConfig.managementIpAddress",
    "ServerConfig.port",
    "ServerConfig.managementPort",
    "ServerConfig.metricsPort",
    "ServerConfig.allowAllZeroIpListening",
    "ServerConfig.inferMode",
    "BackendConfig.backendName",
    "BackendConfig.modelInstanceNumber",
    "BackendConfig.npuDeviceIds",
    "BackendConfig.multiNodesInferEnabled",
    "BackendConfig.multiNodesInferPort",
    "BackendConfig.ModelDeployConfig.maxSeqLen",
    "BackendConfig.ModelDeployConfig.maxInputTokenLen",
    "BackendConfig.ModelDeployConfig.truncation",
    "BackendConfig.ModelDeployConfig.ModelConfig.modelName",
    "BackendConfig.ModelDeployConfig.ModelConfig.modelWeightPath",
    "BackendConfig.ModelDeployConfig.ModelConfig.worldSize",
    "BackendConfig.ModelDeployConfig.ModelConfig.cpuMemSize",
    "BackendConfig.ModelDeployConfig.ModelConfig.npuMemSize",
    "BackendConfig.ModelDeployConfig.ModelConfig.backendType",
    "BackendConfig.ModelDeployConfig.ModelConfig.trustRemoteCode",
    "BackendConfig.ModelDeployConfig.ModelConfig.dp",
    "BackendConfig.ModelDeployConfig.ModelConfig.tp",
    "BackendConfig.ModelDeployConfig.ModelConfig.moe_tp",
    "BackendConfig.ModelDeployConfig.ModelConfig.moe_ep",
    "BackendConfig.ModelDeployConfig.ModelConfig.plugin_params",
    "BackendConfig.ModelDeployConfig.ModelConfig.models.deepseekv2.ep_level",
    "BackendConfig.ModelDeployConfig.ModelConfig.models.deepseekv2.enable_init_routing_cutoff",
    "BackendConfig.ModelDeployConfig.ModelConfig.models.deepseekv2.topk_scaling_factor",
    "BackendConfig.ModelDeployConfig.ModelConfig.models.deepseekv2.alltoall_ep_buffer_scale_factors",
    "BackendConfig.ScheduleConfig.cacheBlockSize",
    "BackendConfig.ScheduleConfig.maxBatchSize",
    "BackendConfig.ScheduleConfig.maxIterTimes",
)

ExtraArg = Annotated[str, Field(min_length=1, max_length=MAX_EXTRA_ARG_LEN)]


def owned_flag(arg: str) -> str | None:
    """The operator-owned flag `arg` sets (exactly, as --flag=value, or as an argparse
    abbreviation of one), else None."""
    if not arg.startswith("-"):
        return None
    name = arg.split("=", 1)[0]
    for flag in VLLM_OWNED_FLAGS:
        if name == flag or (name.startswith("--") and len(name) > 2 and flag.startswith(name)):
            return flag
    return None


def _leaves(obj: Any, prefix: str = "") -> list[str]:
    if not isinstance(obj, dict) or not obj:
        return [prefix] if prefix else []
    out: list[str] = []
    for key, value in obj.items():
        out += _leaves(value, f"{prefix}.{key}" if prefix else str(key))
    return out


def owned_config_keys(extra: dict[str, Any] | None) -> list[str]:
    """The paths of extraConfig that set, or hold, a key the operator renders."""
    found: list[str] = []
    for leaf in _leaves(extra or {}):
        hit = next((k for k in MINDIE_OWNED_KEYS if leaf == k or leaf.startswith(k + ".")), None)
        if hit is None:  # an object over an owned key replaces it too, e.g. {"models": 1}
            hit = next((k for k in MINDIE_OWNED_KEYS if k.startswith(leaf + ".")), None)
        if hit is not None and hit not in found:
            found.append(hit)
    return found


_FLAGS_CEL = "[" + ", ".join(f"'{f}'" for f in VLLM_OWNED_FLAGS) + "]"


def _engine_is(engine: str) -> str:
    return f"has(self.engine) && self.engine == '{engine}'"


class Runtime(ApiModel):
    """The serving engine: the project's own dsworker, MindIE Service (Ascend) or vLLM (GPU, and
    vLLM-Ascend on npu)."""

    __rules__ = (
        Rule(
            "extra-args-vllm",
            "spec.runtime.extraArgs: only runtime vllm takes extra arguments; remove extraArgs or "
            "set engine: vllm",
            lambda r: r.extra_args is None or r.engine == "vllm",
            f"!has(self.extraArgs) || ({_engine_is('vllm')})",
        ),
        Rule(
            "extra-config-mindie",
            "spec.runtime.extraConfig: only runtime mindie takes extra config.json keys; remove "
            "extraConfig or set engine: mindie",
            lambda r: r.extra_config is None or r.engine == "mindie",
            f"!has(self.extraConfig) || ({_engine_is('mindie')})",
        ),
        Rule(
            "rank-table-mindie",
            "spec.runtime.rankTableConfigMap: only runtime mindie reads an HCCL rank table; remove "
            "it or set engine: mindie",
            lambda r: r.rank_table_config_map is None or r.engine == "mindie",
            f"!has(self.rankTableConfigMap) || ({_engine_is('mindie')})",
        ),
        Rule(
            "mindie-image",
            "spec.runtime.image is required by runtime mindie: set it to your MindIE image (for "
            "example from Ascend Hub); the operator ships none",
            lambda r: r.engine != "mindie" or r.image is not None,
            f"!({_engine_is('mindie')}) || has(self.image)",
        ),
        Rule(
            "extra-args-owned",
            "spec.runtime.extraArgs may not set a flag the operator renders from the spec (or "
            "--trust-remote-code, --headless, --pipeline-parallel-size); set the spec field "
            "instead (see docs/runtimes.md) and remove the flag",
            lambda r: not any(owned_flag(a) for a in r.extra_args or ()),
            f"!has(self.extraArgs) || self.extraArgs.all(a, !{_FLAGS_CEL}.exists(f, a == f || "
            "a.startsWith(f + '=') || (a.startsWith('--') && size(a) > 2 && f.startsWith(a))))",
        ),
        Rule(
            "extra-config-owned",
            "spec.runtime.extraConfig may set only ServerConfig, BackendConfig and LogConfig keys "
            "the operator does not render from the spec (see docs/runtimes.md); remove the others",
            lambda r: (
                not owned_config_keys(r.extra_config)
                and all(k in MINDIE_SECTIONS for k in r.extra_config or {})
            ),
            None,
        ),
    )

    engine: Engine = Field(
        "dsworker",
        description="The engine that serves: dsworker (this project's engine), mindie (MindIE "
        "Service on Ascend npu) or vllm (vLLM on gpu, vLLM-Ascend on npu). Fields an engine "
        "cannot honour are refused, naming the field and the engine.",
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Image of the serving container. Default: spec.worker.image for dsworker, "
        f"vllm/vllm-openai:v{VLLM_VERSION} for vllm on gpu, quay.io/ascend/vllm-ascend:"
        f"v{VLLM_VERSION} on npu; required for mindie. spec.worker.image still runs the sharding "
        "and staging steps.",
    )
    rank_table_config_map: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="mindie: a ConfigMap in the namespace whose key hccl.json is the HCCL rank "
        "table of the worker nodes (written by the cluster's Ascend tooling or by hand). "
        "Optional: with more than one node and none named, the operator builds the table from the "
        "Ascend device plugin's pod annotations (ConfigMap <name>-hccl).",
    )
    extra_args: list[ExtraArg] | None = Field(
        None,
        max_length=MAX_EXTRA_ARGS,
        description="vllm: extra `vllm serve` arguments appended to the rendered ones, e.g. "
        "['--gpu-memory-utilization', '0.92']. Flags the operator renders from the spec are "
        "refused.",
    )
    extra_config: dict[str, Any] | None = Field(
        None,
        description="mindie: keys merged into the rendered config.json (objects merge, other "
        "values replace; BackendConfig.ModelDeployConfig.ModelConfig as an object merges into the "
        "one model instance). Only ServerConfig, BackendConfig and LogConfig keys the operator "
        "does not render from the spec.",
    )
