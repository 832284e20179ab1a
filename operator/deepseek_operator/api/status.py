"""status: what the operator observed; written only by the operator."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import Field

from .base import StatusModel

Phase = Literal["Pending", "Sharding", "Staging", "Loading", "Ready", "Degraded", "Failed"]
PHASES: tuple[Phase, ...] = (
    "Pending",
    "Sharding",
    "Staging",
    "Loading",
    "Ready",
    "Degraded",
    "Failed",
)

# The condition types the operator sets.
VALIDATED = "Validated"
SHARDED = "Sharded"
WORKERS_READY = "WorkersReady"
READY = "Ready"
CONDITION_TYPES = (VALIDATED, SHARDED, WORKERS_READY, READY)

MAX_CONDITIONS = 16


class Condition(StatusModel):
    """One aspect of the deployment's state (the metav1.Condition shape)."""

    type: str = Field(
        min_length=1,
        max_length=316,
        pattern=r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
        r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])$",
        description="Condition type: Validated, Sharded, WorkersReady or Ready.",
    )
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$",
        description="CamelCase reason for the last transition.",
    )
    message: str = Field(
        "", max_length=32768, description="Human-readable details; names the field and the fix."
    )
    last_transition_time: datetime = Field(
        description="When status last changed (RFC 3339, seconds)."
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the condition was computed from."
    )


class NodeShardsStatus(StatusModel):
    """The sharding Job of one node of a node-local store, and what it wrote there."""

    index: int = Field(ge=0, description="Index in spec.sharding.store.hostPath.nodes.")
    node: str = Field(description="The node the Job writes on.")
    job: str = Field(description="Name of the node's sharding Job.")
    job_uid: str | None = Field(None, description="uid of the Job that wrote these shards.")
    complete: bool | None = Field(
        None,
        description="True once the node's Job completed. Kept when the Job is deleted afterwards, "
        "so that node is not sharded again, unless the node reboots (see bootID).",
    )
    boot_id: str | None = Field(
        None,
        alias="bootID",
        description="The node's status.nodeInfo.bootID when its Job was seen complete: a "
        "different one later means the node rebooted and its tmpfs shards are gone, so they are "
        "written again. Unset when the Node could not be read then.",
    )
    lost_job_uid: str | None = Field(
        None,
        description="Set while the node's shards are written again after a reboot: the uid of "
        "the completed Job whose output the reboot wiped ('' when that Job was gone), which is "
        "replaced and never taken as complete again.",
    )
    bytes: int | None = Field(None, ge=0, description="Bytes written on this node.")
    files: int | None = Field(None, ge=0, description="Files written on this node.")
    seconds: float | None = Field(None, ge=0, description="Duration of the node's Job.")
    dir_bytes: dict[str, int] | None = Field(
        None, description="Bytes of one directory of each group, as the node's sharder reported."
    )


class ShardsStatus(StatusModel):
    """The shards of the current plan."""

    bytes: int | None = Field(None, ge=0, description="Bytes written.")
    files: int | None = Field(None, ge=0, description="Files written.")
    seconds: float | None = Field(None, ge=0, description="Duration of the sharding Job.")
    throughput_mbps: float | None = Field(
        None, ge=0, alias="throughputMBps", description="Bytes written per second, in MB/s."
    )
    job: str | None = Field(None, description="Name of the sharding Job.")
    job_uid: str | None = Field(
        None, description="uid of the sharding Job that wrote these shards."
    )
    fingerprint: str | None = Field(
        None,
        description="The plan these shards are for; their directory in the store is its first "
        "16 hex digits.",
    )
    complete: bool | None = Field(
        None,
        description="True once the sharding Job completed: the directory is sealed by the "
        "_COMPLETE marker the sharder writes last (the workers stage nothing without it). Kept "
        "when the Job is deleted afterwards (by hand, by a TTL), so the shards are not written "
        "again.",
    )
    model_config_keys: dict[str, Any] | None = Field(
        None,
        alias="modelConfig",
        description="The sharded checkpoint's config.json as the sharder read it (the keys the "
        "memory fit reads): without the llm.dsop.io/model-config annotation, the operator checks "
        "that the plan fits the devices with it before any worker starts.",
    )
    quantization: str | None = Field(
        None, description="The sharded checkpoint's weight format (bf16, fp8, w8a8, w8a16)."
    )
    dir_bytes: dict[str, int] | None = Field(
        None,
        description="Bytes of one directory of each group of the layout (vocab, norm, attn, "
        "dense, moe; top: the top-level files), as the sharder reported: what a worker pod's "
        "staging memory is computed from.",
    )
    nodes: list[NodeShardsStatus] | None = Field(
        None,
        description="Node-local shards on several nodes: each node's sharding Job, and its "
        "completion as recorded when it completed.",
    )


class DeepSeekDeploymentStatus(StatusModel):
    """The observed state of a DeepSeekDeployment."""

    phase: Phase | None = Field(
        None,
        description="Pending, Sharding, Staging, Loading, Ready, Degraded (was Ready, lost a "
        "worker) or Failed (until the spec changes).",
    )
    observed_generation: int | None = Field(
        None, ge=0, description="metadata.generation the status describes."
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        max_length=MAX_CONDITIONS,
        description="Validated, Sharded, WorkersReady and Ready conditions.",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    fingerprint: str | None = Field(
        None,
        description="sha256 of the model source, quantization, MTP, the parallel layout and the "
        "shard format: names the shard directory and the sharding Job.",
    )
    model_name: str | None = Field(
        None,
        description="Served model name: spec.model.name, else metadata.name (printed as Model).",
    )
    runtime: Literal["dsworker", "mindie", "vllm"] | None = Field(
        None,
        description="The engine the worker pods run (mindie, vllm or dsworker); while a changed "
        "spec has not replaced a serving group, the one still serving (printed as Runtime).",
    )
    world_size: int | None = Field(
        None, ge=1, description="Ranks of the running plan (printed as World)."
    )
    moe_ep: int | None = Field(
        None,
        ge=1,
        description="Expert-parallel size (moeEp, given or computed) of the spec's plan (printed "
        "as EP; the EP level is printed as Level with -o wide).",
    )
    shards: ShardsStatus | None = Field(None, description="The shards of the current plan.")
    ready_workers: str | None = Field(
        None, pattern=r"^[0-9]+/[0-9]+$", description="Ready worker pods, as n/m."
    )
    group_restarts: int | None = Field(
        None,
        ge=0,
        description="Group restarts spent of spec.worker.restartBudget (back to 0 once the group "
        "has been Ready for 10 minutes without interruption).",
    )
    endpoint: str | None = Field(None, description="In-cluster URL of the OpenAI-compatible API.")
    message: str | None = Field(None, description="What is happening, or what to fix.")
