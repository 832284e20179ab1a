"""The spec fields each runtime cannot honour, refused at admission naming the field and runtime.

Every rule here is a spec-level Rule (the field and spec.runtime.engine live in different
sections). Each message starts with the field's JSON path, says which runtime cannot honour it
and how to fix it; docs/runtimes.md lists what each runtime does with every field.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .base import Rule

if TYPE_CHECKING:
    from .spec import DeepSeekDeploymentSpec

# CEL: spec.parallelism always exists after defaulting (its section defaults to {}).
_P = "self.parallelism"
_W = f"(has({_P}.worldSize) ? {_P}.worldSize : {_P}.nodes * {_P}.devicesPerNode)"
_DP = f"(has({_P}.dp) ? {_P}.dp : (has({_P}.tp) ? {_W} / {_P}.tp : 1))"
_TP = f"(has({_P}.tp) ? {_P}.tp : {_W} / {_DP})"
_MOE_TP = f"(has({_P}.moeTp) ? {_P}.moeTp : (has({_P}.moeEp) ? {_W} / {_P}.moeEp : 1))"
_EP = "self.expertParallel"
_SERVING = "self.serving"

VLLM_BLOCK_SIZES = (1, 8, 16, 32, 64, 128, 256)  # vLLM 0.13 --block-size choices
MINDIE_MAX_BATCH = 5000  # ScheduleConfig.maxBatchSize maximum
MINDIE_MAX_BLOCK = 128  # ScheduleConfig.cacheBlockSize maximum (multiples of 16)
MINDIE_MIN_PORT = 1024
# MindIE serves on port, port+1 (management, probes) and port+2 (metrics); the group's own
# port (multiNodesInferPort) is 29500, as the other runtimes' rendezvous port.
MINDIE_GROUP_PORT = 29500
MINDIE_NAME = r"^[A-Za-z0-9]([A-Za-z0-9._-]{0,254}[A-Za-z0-9])?$"


def _engine(engine: str) -> str:
    return f"(has(self.runtime) && has(self.runtime.engine) && self.runtime.engine == '{engine}')"


def _refuse(
    engine: str,
    name: str,
    message: str,
    ok: Callable[[DeepSeekDeploymentSpec], bool],
    cel_ok: str | None,
) -> Rule:
    """A rule that holds unless spec.runtime.engine is `engine` and `ok` fails."""
    return Rule(
        f"{engine}-{name}",
        message,
        lambda s: s.runtime.engine != engine or ok(s),
        None if cel_ok is None else f"!{_engine(engine)} || ({cel_ok})",
    )


def _unset(section: str, *fields: str) -> str:
    """CEL: the optional field section.f1.f2... is absent."""
    path, parts = section, []
    for field in fields:
        parts.append(f"!has({path}.{field})")
        path = f"{path}.{field}"
    return f"!has({section}) || " + " || ".join(parts)


def _false(section: str, field: str) -> str:
    return f"!has({section}) || !has({section}.{field}) || !{section}.{field}"


def _world(s: Any) -> int:
    return int(s.parallelism.world())


VLLM_RULES: tuple[Rule, ...] = (
    _refuse(
        "vllm",
        "sharding",
        "spec.sharding.enabled: runtime vllm loads the HuggingFace checkpoint itself (staged to "
        "node memory), not offline shards; set spec.sharding.enabled: false",
        lambda s: not s.sharding.enabled,
        "has(self.sharding) && has(self.sharding.enabled) && !self.sharding.enabled",
    ),
    _refuse(
        "vllm",
        "buffer-table",
        "spec.expertParallel.alltoallBufferScaleFactors: runtime vllm has no AllToAll buffer "
        "table (vLLM sizes its buffers itself); remove it or use runtime mindie or dsworker",
        lambda s: not s.expert_parallel.alltoall_buffer_scale_factors,
        _unset(_EP, "alltoallBufferScaleFactors"),
    ),
    _refuse(
        "vllm",
        "routing-cutoff",
        "spec.expertParallel.initRoutingCutoff: runtime vllm has no top-k routing cutoff; remove "
        "initRoutingCutoff or use runtime mindie or dsworker",
        lambda s: (
            not s.expert_parallel.init_routing_cutoff.enabled
            and s.expert_parallel.init_routing_cutoff.topk_scaling_factor is None
        ),
        f"!has({_EP}) || !has({_EP}.initRoutingCutoff) || "
        f"((!has({_EP}.initRoutingCutoff.enabled) || !{_EP}.initRoutingCutoff.enabled) && "
        f"!has({_EP}.initRoutingCutoff.topkScalingFactor))",
    ),
    _refuse(
        "vllm",
        "grouped-matmul",
        "spec.expertParallel.groupedMatmul: runtime vllm chooses its MoE kernels itself; set "
        "groupedMatmul: auto",
        lambda s: s.expert_parallel.grouped_matmul == "auto",
        f"!has({_EP}) || !has({_EP}.groupedMatmul) || {_EP}.groupedMatmul == 'auto'",
    ),
    _refuse(
        "vllm",
        "expert-merge",
        "spec.features.expertMerge: runtime vllm has no expert merge; set expertMerge: false",
        lambda s: not s.features.expert_merge,
        _false("self.features", "expertMerge"),
    ),
    _refuse(
        "vllm",
        "eplb",
        "spec.features.dynamicLoadBalancing: runtime vllm balances experts (--enable-eplb) only "
        "with expert parallelism over all ranks; set spec.parallelism.moeTp: 1 or "
        "dynamicLoadBalancing: false",
        lambda s: not s.features.dynamic_load_balancing or s.parallelism.moe_tp == 1,
        f"{_false('self.features', 'dynamicLoadBalancing')} || {_MOE_TP} == 1",
    ),
    _refuse(
        "vllm",
        "dequantize",
        "spec.model.dequantizeFp8: runtime vllm loads the checkpoint as it is (no sharding step "
        "converts it); set dequantizeFp8: false",
        lambda s: not s.model.dequantize_fp8,
        _false("self.model", "dequantizeFp8"),
    ),
    _refuse(
        "vllm",
        "truncation",
        "spec.serving.truncation: runtime vllm has no server-wide prompt truncation (requests "
        "set truncate_prompt_tokens); set truncation: false",
        lambda s: not s.serving.truncation,
        _false(_SERVING, "truncation"),
    ),
    _refuse(
        "vllm",
        "npu-mem-size",
        "spec.serving.npuMemSize: runtime vllm sizes its KV cache by a fraction of device memory; "
        "set npuMemSize: -1 and pass ['--gpu-memory-utilization', '0.9'] in spec.runtime.extraArgs",
        lambda s: s.serving.npu_mem_size == -1,
        f"!has({_SERVING}) || !has({_SERVING}.npuMemSize) || {_SERVING}.npuMemSize == -1",
    ),
    _refuse(
        "vllm",
        "torch-compile",
        "spec.serving.torchCompile: runtime vllm compiles on its own (turn it off with "
        "cudaGraphs: false); set torchCompile: false",
        lambda s: not s.serving.torch_compile,
        _false(_SERVING, "torchCompile"),
    ),
    _refuse(
        "vllm",
        "block-size",
        "spec.serving.cacheBlockSize: runtime vllm takes a block size of "
        f"{', '.join(map(str, VLLM_BLOCK_SIZES))}; choose one of them",
        lambda s: s.serving.cache_block_size in VLLM_BLOCK_SIZES,
        f"!has({_SERVING}) || !has({_SERVING}.cacheBlockSize) || "
        f"{_SERVING}.cacheBlockSize in {list(VLLM_BLOCK_SIZES)}",
    ),
    _refuse(
        "vllm",
        "accelerator",
        "spec.worker.accelerator.type: runtime vllm runs on gpu (vLLM) or npu (vLLM-Ascend), "
        "not cpu; set type gpu or npu",
        lambda s: s.worker.accelerator.type != "cpu",
        "!has(self.worker) || !has(self.worker.accelerator) || "
        "!has(self.worker.accelerator.type) || self.worker.accelerator.type != 'cpu'",
    ),
    _refuse(
        "vllm",
        "moe-split",
        "spec.parallelism.moeTp: runtime vllm splits the experts either by expert parallelism "
        "over all ranks (moeTp 1) or by tensor parallelism over all ranks (moeTp = worldSize); "
        "set moeTp: 1 or moeTp equal to worldSize",
        lambda s: s.parallelism.moe_tp in (1, _world(s)),
        f"{_MOE_TP} == 1 || {_MOE_TP} == {_W}",
    ),
    _refuse(
        "vllm",
        "tp-placement",
        "spec.parallelism.tp: runtime vllm needs each tensor-parallel group inside one node (tp "
        "divides devicesPerNode) or one group over all nodes; choose such a tp or set dp: 1",
        lambda s: (
            s.parallelism.devices_per_node % (s.parallelism.tp or 1) == 0 or s.parallelism.dp == 1
        ),
        f"{_P}.devicesPerNode % {_TP} == 0 || {_DP} == 1",
    ),
)

MINDIE_RULES: tuple[Rule, ...] = (
    _refuse(
        "mindie",
        "accelerator",
        "spec.worker.accelerator.type: runtime mindie runs on Ascend npu only; set type: npu or "
        "use runtime vllm or dsworker",
        lambda s: s.worker.accelerator.type == "npu",
        "!has(self.worker) || !has(self.worker.accelerator) || "
        "!has(self.worker.accelerator.type) || self.worker.accelerator.type == 'npu'",
    ),
    _refuse(
        "mindie",
        "port",
        f"spec.serving.port: runtime mindie serves on port, port+1 (management) and port+2 "
        f"(metrics), each in [{MINDIE_MIN_PORT}, 65535] and clear of {MINDIE_GROUP_PORT} (its "
        f"multi-node port); choose a port from {MINDIE_MIN_PORT} to 65533, e.g. 1025",
        lambda s: (
            MINDIE_MIN_PORT <= s.serving.port <= 65533
            and not MINDIE_GROUP_PORT - 2 <= s.serving.port <= MINDIE_GROUP_PORT
        ),
        f"!has({_SERVING}) || !has({_SERVING}.port) || ({_SERVING}.port >= {MINDIE_MIN_PORT} && "
        f"{_SERVING}.port <= 65533 && ({_SERVING}.port < {MINDIE_GROUP_PORT - 2} || "
        f"{_SERVING}.port > {MINDIE_GROUP_PORT}))",
    ),
    _refuse(
        "mindie",
        "batch",
        f"spec.serving.maxBatchSize: runtime mindie takes at most {MINDIE_MAX_BATCH} "
        "(ScheduleConfig.maxBatchSize); lower it",
        lambda s: s.serving.max_batch_size <= MINDIE_MAX_BATCH,
        f"!has({_SERVING}) || !has({_SERVING}.maxBatchSize) || "
        f"{_SERVING}.maxBatchSize <= {MINDIE_MAX_BATCH}",
    ),
    _refuse(
        "mindie",
        "block-size",
        f"spec.serving.cacheBlockSize: runtime mindie takes a multiple of 16 up to "
        f"{MINDIE_MAX_BLOCK} (ScheduleConfig.cacheBlockSize, 128 recommended); choose one",
        lambda s: (
            s.serving.cache_block_size <= MINDIE_MAX_BLOCK and s.serving.cache_block_size % 16 == 0
        ),
        f"!has({_SERVING}) || !has({_SERVING}.cacheBlockSize) || "
        f"({_SERVING}.cacheBlockSize <= {MINDIE_MAX_BLOCK} && "
        f"{_SERVING}.cacheBlockSize % 16 == 0)",
    ),
    _refuse(
        "mindie",
        "reasoning-parser",
        "spec.serving.reasoningParser: runtime mindie has no reasoning parser setting; remove it",
        lambda s: s.serving.reasoning_parser is None,
        _unset(_SERVING, "reasoningParser"),
    ),
    _refuse(
        "mindie",
        "api-key-secret",
        "spec.serving.apiKeySecret: runtime mindie takes no API key file (MindIE authenticates "
        "with its own TLS and token settings); remove apiKeySecret, or use the default runtime or "
        "vllm",
        lambda s: s.serving.api_key_secret is None,
        _unset(_SERVING, "apiKeySecret"),
    ),
    _refuse(
        "mindie",
        "tool-call-parser",
        "spec.serving.toolCallParser: runtime mindie has no tool-call parser setting; remove it",
        lambda s: s.serving.tool_call_parser is None,
        _unset(_SERVING, "toolCallParser"),
    ),
    _refuse(
        "mindie",
        "torch-compile",
        "spec.serving.torchCompile: runtime mindie does not use torch.compile; set torchCompile: "
        "false",
        lambda s: not s.serving.torch_compile,
        _false(_SERVING, "torchCompile"),
    ),
    _refuse(
        "mindie",
        "expert-merge",
        "spec.features.expertMerge: runtime mindie is not configured for expert merge by the "
        "operator; set expertMerge: false",
        lambda s: not s.features.expert_merge,
        _false("self.features", "expertMerge"),
    ),
    _refuse(
        "mindie",
        "dynamic-load-balancing",
        "spec.features.dynamicLoadBalancing: runtime mindie is not configured for dynamic load "
        "balancing by the operator; set dynamicLoadBalancing: false",
        lambda s: not s.features.dynamic_load_balancing,
        _false("self.features", "dynamicLoadBalancing"),
    ),
    _refuse(
        "mindie",
        "model-name",
        "spec.model.name: runtime mindie takes letters, digits, '-', '.' and '_', starting and "
        "ending with a letter or digit (modelName); choose such a name",
        lambda s: s.model.name is None or _mindie_name_ok(s.model.name),
        f"!has(self.model.name) || self.model.name.matches('{MINDIE_NAME}')",
    ),
)


def _mindie_name_ok(name: str) -> bool:
    return re.fullmatch(MINDIE_NAME, name) is not None


RUNTIME_RULES: tuple[Rule, ...] = VLLM_RULES + MINDIE_RULES
