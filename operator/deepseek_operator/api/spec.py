"""The DeepSeekDeployment object: its spec with the rules that span sections."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import ApiModel, Rule, section
from .expert_parallel import ExpertParallel
from .features import Features
from .model import ModelSpec
from .names import API_VERSION, HEADLESS_SUFFIX, KIND
from .parallelism import Parallelism
from .runtime import DEFAULT_VLLM_IMAGES, Runtime
from .runtime_rules import RUNTIME_RULES
from .serving import Serving
from .sharding import Sharding
from .status import DeepSeekDeploymentStatus
from .worker import Worker

MAX_SHARDER_PROCESSES = 8


def _host_path_store(s: DeepSeekDeploymentSpec) -> bool:
    return s.sharding.store is not None and s.sharding.store.host_path is not None


def _host_path_nodes_ok(s: DeepSeekDeploymentSpec) -> bool:
    if not _host_path_store(s):
        return True
    assert s.sharding.store is not None and s.sharding.store.host_path is not None
    nodes = s.sharding.store.host_path.nodes
    if nodes:
        return len(nodes) == s.parallelism.nodes
    return s.parallelism.nodes == 1 and bool(s.worker.node_selector)


class DeepSeekDeploymentSpec(ApiModel):
    """The desired state: one DeepSeek model instance, its shards and its worker pods."""

    __rules__ = (
        Rule(
            "direct-level-2-multinode",
            "spec.expertParallel.interconnect: level 2 (AllToAll EP) across nodes needs the nodes "
            "connected through a switch; set interconnect: switch, level: 1, or nodes: 1",
            lambda s: (
                not (
                    s.expert_parallel.level == 2
                    and s.expert_parallel.interconnect == "direct"
                    and s.parallelism.nodes > 1
                )
            ),
            "!has(self.expertParallel) || !has(self.parallelism) || "
            "!(self.expertParallel.level == 2 && self.expertParallel.interconnect == 'direct' && "
            "self.parallelism.nodes > 1)",
        ),
        Rule(
            "store-required",
            "spec.sharding.store is required when spec.sharding.enabled is true; set store.pvc or "
            "store.hostPath, or set enabled: false",
            lambda s: not s.sharding.enabled or s.sharding.store is not None,
            "has(self.sharding) && (!self.sharding.enabled || has(self.sharding.store))",
        ),
        Rule(
            "expert-merge-sharding",
            "spec.features.expertMerge is incompatible with offline sharding; set "
            "spec.sharding.enabled: false or expertMerge: false",
            lambda s: not (s.sharding.enabled and s.features.expert_merge),
            "!has(self.sharding) || !self.sharding.enabled || !has(self.features) || "
            "!self.features.expertMerge",
        ),
        Rule(
            "dlb-sharding",
            "spec.features.dynamicLoadBalancing is incompatible with offline sharding; set "
            "spec.sharding.enabled: false or dynamicLoadBalancing: false",
            lambda s: not (s.sharding.enabled and s.features.dynamic_load_balancing),
            "!has(self.sharding) || !self.sharding.enabled || !has(self.features) || "
            "!self.features.dynamicLoadBalancing",
        ),
        Rule(
            "v2-no-offline-sharding",
            "spec.sharding.enabled: offline sharding supports only DeepseekV3 (V3, R1); for "
            "DeepseekV2 set spec.sharding.enabled: false (the model is split at start-up)",
            lambda s: not (s.sharding.enabled and s.model.architecture == "DeepseekV2"),
            "!has(self.sharding) || !self.sharding.enabled || "
            "!has(self.model.architecture) || self.model.architecture != 'DeepseekV2'",
        ),
        Rule(
            "host-path-store-nodes",
            "spec.sharding.store.hostPath is node-local: set store.hostPath.nodes to one node per "
            "worker pod (as many as spec.parallelism.nodes), or with spec.parallelism.nodes: 1 "
            "set a spec.worker.nodeSelector that pins the node",
            _host_path_nodes_ok,
            "!has(self.sharding) || !has(self.sharding.store) || "
            "!has(self.sharding.store.hostPath) || (has(self.sharding.store.hostPath.nodes) ? "
            "size(self.sharding.store.hostPath.nodes) == "
            "(has(self.parallelism) ? self.parallelism.nodes : 1) : "
            "((!has(self.parallelism) || self.parallelism.nodes == 1) && has(self.worker) && "
            "has(self.worker.nodeSelector) && size(self.worker.nodeSelector) > 0))",
        ),
        *RUNTIME_RULES,
    )

    model: ModelSpec = Field(description="The model to serve and where its checkpoint is.")
    parallelism: Parallelism = section(
        Parallelism,
        "The parallel plan: pods, ranks and how attention and experts split over them. Sharding "
        "and serving always use the same plan.",
    )
    expert_parallel: ExpertParallel = section(
        ExpertParallel, "Expert-parallel communication (MindIE models.deepseekv2.*)."
    )
    sharding: Sharding = section(
        Sharding, "Offline weight sharding into a store the workers load from."
    )
    features: Features = section(Features, "Optional engine features.")
    serving: Serving = section(Serving, "Serving limits and the HTTP port.")
    worker: Worker = section(Worker, "The worker pods.")
    runtime: Runtime = section(
        Runtime, "The engine that serves the model: mindie, vllm or dsworker (docs/runtimes.md)."
    )

    def _resolve(self) -> None:
        if self.sharding.processes is None:
            self.sharding.processes = min(self.parallelism.world(), MAX_SHARDER_PROCESSES)
        if self.sharding.image is None:
            self.sharding.image = self.worker.image
        if self.runtime.image is None and self.runtime.engine == "vllm":
            accelerator = self.worker.accelerator.type
            self.runtime.image = DEFAULT_VLLM_IMAGES.get(accelerator, DEFAULT_VLLM_IMAGES["gpu"])
        elif self.runtime.image is None:  # dsworker (mindie requires one)
            self.runtime.image = self.worker.image


class DeepSeekDeployment(ApiModel):
    """A DeepSeek MoE model served with expert parallelism from offline-sharded weights."""

    __rules__ = (
        # The API Service is named <name> and the rank-discovery Service <name>-ranks: a
        # deployment named "a-ranks" would fight "a" over one Service.
        Rule(
            "name-not-ranks",
            f"metadata.name: a name ending in {HEADLESS_SUFFIX} would take the name of the "
            f"rank-discovery Service of the deployment named without {HEADLESS_SUFFIX}; choose a "
            f"name that does not end in {HEADLESS_SUFFIX}",
            lambda d: not str(d.metadata.get("name") or "").endswith(HEADLESS_SUFFIX),
            "!has(self.metadata) || !has(self.metadata.name) || "
            f"!self.metadata.name.endsWith('{HEADLESS_SUFFIX}')",
        ),
    )

    api_version: Literal["llm.dsop.io/v1alpha1"] = Field(
        API_VERSION, description="API version of this object: llm.dsop.io/v1alpha1."
    )
    kind: Literal["DeepSeekDeployment"] = Field(
        KIND, description="Kind of this object: DeepSeekDeployment."
    )
    metadata: dict[str, Any] = Field(
        default_factory=dict, description="Standard object metadata (name, namespace, ...)."
    )
    spec: DeepSeekDeploymentSpec = Field(description="The desired state.")
    status: DeepSeekDeploymentStatus | None = Field(
        None, description="The observed state, written by the operator."
    )

    @property
    def name(self) -> str:
        return str(self.metadata.get("name", ""))

    @property
    def namespace(self) -> str:
        return str(self.metadata.get("namespace", ""))

    def _resolve(self) -> None:
        if self.spec.model.name is None and self.name:
            self.spec.model.name = self.name
