"""The project's own engine: engine.json (MindIE names) and `dsworker serve` on every pod."""

from __future__ import annotations

from typing import Any

from dsworker.contract.engine_config import EngineConfig

from ...api import DeepSeekDeploymentSpec
from .common import EngineRendering, Obj, Placement, container_port

CONFIG_FILE = "engine.json"
DEVICE_BACKENDS = {"npu": "npu", "gpu": "cuda", "cpu": "cpu"}

# Only rank 0 serves HTTP, but every pod of the group needs probes: readiness and start-up ask
# rank 0's /health (the group serves only when every rank has loaded); liveness is rank 0's alone,
# so a stuck rank 0 does not restart the other pods one by one.
PROBE_SCRIPT = (
    "import os,re,sys,urllib.request as u\n"
    "o=int(re.search(r'(\\d+)$',os.environ['POD_NAME']).group(1))\n"
    "if sys.argv[1]=='live' and o: sys.exit(0)\n"
    "h='127.0.0.1' if o==0 else sys.argv[2]\n"
    "u.urlopen('http://%s:%s/health'%(h,sys.argv[3]),timeout=5)\n"
)


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


def _probe(kind: str, where: Placement, port: int) -> Obj:
    command = ["python3", "-c", PROBE_SCRIPT, kind, where.head_host, str(port)]
    return {"exec": {"command": command}, "timeoutSeconds": 8}


def probes(where: Placement, port: int) -> Obj:
    return {
        # Loading hundreds of GB and warming up may take long: up to an hour before liveness.
        "startupProbe": {
            **_probe("ready", where, port),
            "periodSeconds": 10,
            "failureThreshold": 360,
        },
        "readinessProbe": {
            **_probe("ready", where, port),
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": {
            **_probe("live", where, port),
            "periodSeconds": 20,
            "failureThreshold": 6,
        },
    }


def render(spec: DeepSeekDeploymentSpec, where: Placement, env: list[Obj]) -> EngineRendering:
    """`dsworker serve` with engine.json; `env` is the pod's own (identity, MASTER_*)."""
    par, port = spec.parallelism, spec.serving.port
    args = [
        "serve",
        "--model",
        where.model_dir,
        "--config",
        f"{where.config_dir}/{CONFIG_FILE}",
        "--nproc-per-node",
        str(par.devices_per_node),
        "--nodes",
        str(par.nodes),
        "--master-addr",
        where.head_host,
        "--master-port",
        str(where.group_port),
        "--port",
        str(port),
    ]
    return EngineRendering(
        files={CONFIG_FILE: engine_config(spec).to_json()},
        command=["dsworker"],
        args=args,
        env=env,
        ports=[container_port("http", port), container_port("dist", where.group_port)],
        probes=probes(where, port),
        config_file=CONFIG_FILE,
    )
