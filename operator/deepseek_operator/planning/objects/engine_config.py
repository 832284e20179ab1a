"""The engine config (MindIE names) the workers read, and the ConfigMap that carries it."""

from __future__ import annotations

import hashlib
from typing import Any

from dsworker.contract.engine_config import EngineConfig

from ...api import DeepSeekDeploymentSpec
from .. import names
from .context import Context, Obj, metadata

ENGINE_CONFIG_DIR = "/etc/dsworker"
ENGINE_CONFIG_FILE = "engine.json"
DEVICE_BACKENDS = {"npu": "npu", "gpu": "cuda", "cpu": "cpu"}


def engine_config(spec: DeepSeekDeploymentSpec) -> EngineConfig:
    """The engine config (MindIE names) the workers read from the ConfigMap."""
    par, ep, serving = spec.parallelism, spec.expert_parallel, spec.serving
    plan = par.to_plan()
    extra: dict[str, Any] = {}
    if ep.init_routing_cutoff.topk_scaling_factor is not None:
        extra["topk_scaling_factor"] = ep.init_routing_cutoff.topk_scaling_factor
    if ep.alltoall_buffer_scale_factors:
        extra["alltoall_ep_buffer_scale_factors"] = [
            (int(n), float(f)) for n, f in ep.alltoall_buffer_scale_factors
        ]
    return EngineConfig(
        modelName=spec.model.name or "deepseek",
        maxSeqLen=serving.max_seq_len,
        maxInputTokenLen=serving.max_input_token_len,
        truncation=serving.truncation,
        maxBatchSize=serving.max_batch_size,
        port=serving.port,
        cpuMemSize=serving.cpu_mem_size,
        npuMemSize=serving.npu_mem_size,
        cacheBlockSize=serving.cache_block_size,
        prefixCaching=serving.prefix_caching,
        reasoningParser=serving.reasoning_parser,
        toolCallParser=serving.tool_call_parser,
        cudaGraphs=serving.cuda_graphs,
        torchCompile=serving.torch_compile,
        worldSize=plan.world_size,
        dp=plan.dp,
        tp=plan.tp,
        moe_tp=plan.moe_tp,
        moe_ep=plan.moe_ep,
        ep_level=ep.level,
        enable_init_routing_cutoff=ep.init_routing_cutoff.enabled,
        grouped_matmul="on" if ep.grouped_matmul_on(plan.moe_ep) else "off",
        mtp=spec.model.mtp,
        num_speculative_tokens=serving.speculative_tokens,
        device=DEVICE_BACKENDS[spec.worker.accelerator.type],
        **extra,
    )


def engine_config_map(ctx: Context) -> Obj:
    text = engine_config(ctx.spec).to_json()
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            ctx,
            names.config_map(ctx.name),
            names.ENGINE_CONFIG,
            {names.ENGINE_CONFIG_ANNOTATION: digest},
        ),
        "data": {ENGINE_CONFIG_FILE: text},
    }
