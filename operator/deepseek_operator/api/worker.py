"""spec.worker: the pods that run the engine."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from dsworker.contract.fit import ACCELERATORS

from .ascend import Ascend
from .base import ApiModel, Rule, section
from .names import DEFAULT_WORKER_IMAGE
from .quantity import parse_quantity
from .resources import EnvVar, check_resources
from .scheduling import (
    LABEL_VALUE,
    MAX_LABELS,
    MAX_TOLERATIONS,
    NODE_SELECTOR_RULE,
    Affinity,
    Toleration,
)

AcceleratorType = Literal["npu", "gpu", "cpu"]
# The accelerators whose device memory the worker's contract knows (dsworker.contract.fit).
AcceleratorProduct = Literal[tuple(ACCELERATORS)]  # type: ignore[valid-type]
# A positive amount of bytes: digits with an optional binary or decimal suffix (64Gi, 80G).
MEMORY_QUANTITY = r"^([0-9]+(\.[0-9]+)?)([KMGTPE]i|[kMGTPE])?$"
MIN_DEVICE_MEMORY = 1 << 30

DEFAULT_RESOURCE_NAMES: dict[str, str | None] = {
    "npu": "huawei.com/Ascend910",
    "gpu": "nvidia.com/gpu",
    "cpu": None,
}


class Accelerator(ApiModel):
    """The devices each rank runs on."""

    __rules__ = (
        Rule(
            "accelerator-memory-min",
            "spec.worker.accelerator.memory: give one device's memory, at least 1Gi (e.g. 64Gi)",
            lambda a: a.memory is None or (parse_quantity(a.memory) or 0) >= MIN_DEVICE_MEMORY,
            None,
        ),
    )

    type: AcceleratorType = Field(
        "npu",
        description="Device kind: npu (Ascend, torch_npu + hccl), gpu (CUDA, nccl) or cpu (gloo).",
    )
    resource_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Extended resource each worker pod requests devicesPerNode of. Default: "
        "huawei.com/Ascend910 for npu, nvidia.com/gpu for gpu, none for cpu.",
    )

    product: AcceleratorProduct | None = Field(  # type: ignore[valid-type]
        None,
        description="Which accelerator the nodes have, for its device memory when memory is not "
        "given: " + ", ".join(f"{k} ({v >> 30} GiB)" for k, v in ACCELERATORS.items()) + ".",
    )
    memory: str | None = Field(
        None,
        max_length=64,
        pattern=MEMORY_QUANTITY,
        description="Memory of one device (a quantity, e.g. 64Gi), for the check that the plan's "
        "weights, KV cache and workspace fit each rank before any pod starts. Default: the "
        "product's memory; with neither, the operator does not check and each worker checks "
        "against what its device reports at start-up.",
    )

    def _resolve(self) -> None:
        if self.resource_name is None:
            self.resource_name = DEFAULT_RESOURCE_NAMES[self.type]

    def memory_bytes(self) -> int | None:
        """One device's memory in bytes: memory, else the product's, else None (unknown)."""
        if self.memory is not None:
            return int(parse_quantity(self.memory) or 0)
        return ACCELERATORS[self.product] if self.product is not None else None


class Worker(ApiModel):
    """The worker pods: one per node, devicesPerNode ranks each."""

    __rules__ = (
        # The CRD declares env a list map keyed by name: the API server refuses duplicates itself.
        Rule(
            "env-names-unique",
            "spec.worker.env: each name may appear only once; remove the repeated entries",
            lambda w: len({e.name for e in w.env or ()}) == len(w.env or ()),
            None,
        ),
        NODE_SELECTOR_RULE,
    )

    image: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Worker image (dsworker). Default: the image released with the operator.",
    )
    image_pull_policy: Literal["Always", "IfNotPresent", "Never"] = Field(
        "IfNotPresent", description="Pull policy of the worker and sharder images."
    )
    accelerator: Accelerator = section(Accelerator, "The devices each rank runs on.")
    ascend: Ascend = section(
        Ascend, "Ascend NPU settings (driver mounts, device group, host network, HCCL)."
    )
    resources: dict[str, Any] | None = Field(
        None,
        description="Extra compute resources of the worker container (core/v1 "
        "ResourceRequirements); the accelerator request is added by the operator. The operator "
        "checks the quantities (and that no request exceeds its limit) before it creates pods.",
    )
    node_selector: dict[str, Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]] | None = (
        Field(
            None,
            max_length=MAX_LABELS,
            description="Node labels the worker pods must match (core/v1 nodeSelector).",
        )
    )
    tolerations: list[Toleration] | None = Field(
        None,
        max_length=MAX_TOLERATIONS,
        description="Tolerations of the worker pods (core/v1 Toleration list).",
    )
    affinity: Affinity | None = Field(
        None, description="Affinity of the worker pods (core/v1 Affinity)."
    )
    env: list[EnvVar] | None = Field(
        None,
        max_length=256,
        description="Extra environment variables of the engine (core/v1 EnvVar list). An entry "
        "named like one the operator sets replaces it.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    pod_annotations: dict[str, str] | None = Field(
        None, description="Annotations added to the worker pods."
    )
    priority_class_name: str | None = Field(
        None, max_length=253, description="PriorityClass of the worker pods."
    )
    scheduler_name: str | None = Field(
        None,
        max_length=253,
        description="Scheduler of the worker pods, e.g. a gang scheduler (Volcano).",
    )
    restart_budget: int = Field(
        5,
        ge=0,
        le=1000,
        description="Group restarts (all worker pods restarted together when one fails) before "
        "the deployment is marked Failed. The count starts again once the group has been Ready "
        "for 10 minutes without interruption.",
    )

    _check_resources = field_validator("resources")(check_resources)

    def _resolve(self) -> None:
        if self.image is None:
            self.image = DEFAULT_WORKER_IMAGE
