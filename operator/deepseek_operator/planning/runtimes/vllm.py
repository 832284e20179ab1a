"""vLLM (GPU) and vLLM-Ascend (npu): the `vllm serve` arguments of every pod of the group.

Options, choices and ranges follow vLLM 0.13.0 as recorded in
tests/data/formats/vllm_serve_options.json (vllm-ascend 0.13.0 on npu); the tests check every
rendered argument list against it. Several nodes run without Ray: with tensor-parallel groups
inside a node, node 0 serves the API with its local data-parallel ranks and the others run
`--headless` from their start rank; with one tensor-parallel group over all nodes (dp 1), they
join it by node rank (the mp executor's --nnodes/--node-rank).
"""

from __future__ import annotations

import json
import shlex
from dataclasses import dataclass

from ...api import DeepSeekDeploymentSpec
from .common import EngineRendering, Obj, Placement, container_port, http_probes, pod_identity_env

ARGS_FILE = "vllm-args.json"
# The all-to-all backend of each EP level on GPU: level 1 gathers tokens to every EP rank, level 2
# dispatches and combines them (DeepEP). vLLM-Ascend chooses its own MoE communication.
ALL2ALL_BACKENDS = {1: "allgather_reducescatter", 2: "deepep_high_throughput"}
MTP_METHODS = {"gpu": "deepseek_mtp", "npu": "mtp"}  # vllm-ascend's tutorials use "mtp"
QUANTIZATION = {
    "gpu": {"fp8": "fp8", "w8a8": "compressed-tensors", "w8a16": "compressed-tensors"},
    "npu": {"w8a8": "ascend", "w8a16": "ascend"},
}
# Per-pod values of the launch script's node-dependent arguments.
POD_IP, START_RANK, NODE_RANK = "{pod_ip}", "{start_rank}", "{node_rank}"


@dataclass(frozen=True)
class Launch:
    """`vllm serve` for the group: `args` on every node, then `head` on node 0 or `others` on the
    rest. Node-dependent values are the placeholders POD_IP, START_RANK and NODE_RANK."""

    args: list[str]
    head: list[str]
    others: list[str]
    dp_local: int

    def for_node(self, index: int, pod_ip: str) -> list[str]:
        """The full argument list of node `index` (as the launch script builds it)."""
        values = {
            POD_IP: pod_ip,
            START_RANK: str(index * self.dp_local),
            NODE_RANK: str(index),
        }
        extra = self.head if index == 0 else self.others
        return self.args + [values.get(a, a) for a in extra]

    def script(self) -> str:
        """The shell that picks node 0's or the other nodes' arguments from the pod's ordinal and
        runs `vllm serve` with the container's args ("$@") and them."""
        shell = {
            POD_IP: '"$POD_IP"',
            START_RANK: f"$((i * {self.dp_local}))",
            NODE_RANK: '"$i"',
        }

        def words(extra: list[str]) -> str:
            return " ".join(shell.get(a) or shlex.quote(a) for a in extra)

        return (
            'i="${POD_NAME##*-}"; '
            f'if [ "$i" = 0 ]; then exec vllm serve "$@" {words(self.head)}; fi; '
            f'exec vllm serve "$@" {words(self.others)}'
        )


def _multi_node(
    spec: DeepSeekDeploymentSpec, head_host: str, port: int
) -> tuple[list[str], list[str], list[str], int]:
    """(every node's, node 0's, the other nodes') parallel arguments and the local DP size."""
    par = spec.parallelism
    plan, d = par.to_plan(), par.devices_per_node
    if d % plan.tp == 0:  # tensor-parallel groups inside a node: data parallelism across nodes
        local = d // plan.tp
        args = ["--data-parallel-size", str(plan.dp)]
        if plan.dp > 1:
            args += ["--data-parallel-size-local", str(local)]
        if par.nodes == 1:
            return args, [], [], local
        args += ["--data-parallel-rpc-port", str(port)]
        head = ["--data-parallel-address", POD_IP]
        others = ["--headless", "--data-parallel-address", head_host]
        others += ["--data-parallel-start-rank", START_RANK]
        return args, head, others, local
    # dp 1: one tensor-parallel group over all nodes (the spec refuses anything else).
    args = ["--nnodes", str(par.nodes), "--master-addr", head_host, "--master-port", str(port)]
    return args, ["--node-rank", "0"], ["--node-rank", NODE_RANK, "--headless"], 1


def launch(spec: DeepSeekDeploymentSpec, where: Placement) -> Launch:
    """The `vllm serve` arguments of the group."""
    par, serving, model, ep = spec.parallelism, spec.serving, spec.model, spec.expert_parallel
    plan, accelerator = par.to_plan(), spec.worker.accelerator.type
    args = [
        where.model_dir,
        "--served-model-name",
        model.name or "deepseek",
        "--port",
        str(serving.port),
        "--no-trust-remote-code",
        "--tensor-parallel-size",
        str(plan.tp),
    ]
    parallel, head, others, local = _multi_node(spec, where.head_host, where.group_port)
    args += parallel
    if plan.moe_tp == 1 and plan.world_size > 1:  # experts spread over all ranks
        args.append("--enable-expert-parallel")
        if accelerator == "gpu":
            args += ["--all2all-backend", ALL2ALL_BACKENDS[ep.level]]
        if spec.features.dynamic_load_balancing:
            args.append("--enable-eplb")
    args += ["--max-model-len", str(serving.max_seq_len)]
    args += ["--max-num-seqs", str(serving.max_batch_size)]
    args += ["--block-size", str(serving.cache_block_size)]
    args.append(
        "--enable-prefix-caching" if serving.prefix_caching else "--no-enable-prefix-caching"
    )
    if not serving.cuda_graphs:
        args.append("--enforce-eager")
    quantization = QUANTIZATION[accelerator].get(model.quantization)
    if quantization:
        args += ["--quantization", quantization]
    if model.mtp:
        speculative = {
            "method": MTP_METHODS[accelerator],
            "num_speculative_tokens": serving.speculative_tokens,
        }
        args += ["--speculative-config", json.dumps(speculative, separators=(",", ":"))]
    if serving.reasoning_parser:
        args += ["--reasoning-parser", serving.reasoning_parser]
    if serving.tool_call_parser:
        args += ["--enable-auto-tool-choice", "--tool-call-parser", serving.tool_call_parser]
    args += list(spec.runtime.extra_args or ())
    return Launch(args, head, others, local)


def env(spec: DeepSeekDeploymentSpec) -> list[Obj]:
    out = [
        *pod_identity_env(),
        # Caches (torch.compile, Triton, Hugging Face) go under $HOME: the root file system is
        # read-only, /tmp is not.
        {"name": "HOME", "value": "/tmp"},
    ]
    if spec.worker.accelerator.type == "npu" and spec.parallelism.nodes > 1:
        out.append({"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}})
    return out


def render(spec: DeepSeekDeploymentSpec, where: Placement) -> EngineRendering:
    """The vLLM container: `vllm serve` (through the launch script with several nodes)."""
    group = launch(spec, where)
    command = ["vllm", "serve"]
    if spec.parallelism.nodes > 1:
        command = ["/bin/sh", "-c", group.script(), "vllm"]
    port = spec.serving.port
    files = {
        ARGS_FILE: json.dumps(
            {"args": group.args, "head": group.head, "others": group.others}, indent=2
        )
        + "\n"
    }
    ports = [container_port("http", port), container_port("dist", where.group_port)]
    return EngineRendering(
        files=files,
        command=command,
        args=group.args,
        env=env(spec),
        ports=ports,
        probes=http_probes(where.head_host, port, "/health", "/health"),
        config_file=ARGS_FILE,
        extra={"launch": group, "metricsPath": "/metrics", "metricsPort": port},
    )
