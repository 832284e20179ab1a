"""spec.worker: the pods that run the engine."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import Field, field_validator

from .ascend import Ascend
from .base import ApiModel, Rule, section
from .names import DEFAULT_WORKER_IMAGE
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

DEFAULT_RESOURCE_NAMES: dict[str, str | None] = {
    "npu": "huawei.com/Ascend910",
    "gpu": "nvidia.com/gpu",
    "cpu": None,
}


class Accelerator(ApiModel):
    """The devices each rank runs on."""

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

    def _resolve(self) -> None:
        if self.resource_name is None:
            self.resource_name = DEFAULT_RESOURCE_NAMES[self.type]


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
