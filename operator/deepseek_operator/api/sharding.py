"""spec.sharding: the offline sharding Job and the store it writes to."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import Field, StringConstraints, field_validator

from .base import ApiModel, Rule
from .model import DNS_SUBDOMAIN
from .paths import host_path_rule
from .resources import QUANTITY, check_resources


def _no_server_default(schema: dict[str, Any]) -> None:
    schema.pop("default", None)


class PvcStore(ApiModel):
    """A ReadWriteMany claim for the shards: an existing one, or one the operator creates."""

    __rules__ = (
        Rule(
            "store-pvc-shape",
            "spec.sharding.store.pvc: set either claimName (an existing ReadWriteMany claim) or "
            "storageClassName and size (the operator creates the claim), not both",
            lambda p: (
                p.storage_class_name is None and p.size is None
                if p.claim_name is not None
                else p.storage_class_name is not None and p.size is not None
            ),
            "has(self.claimName) ? (!has(self.storageClassName) && !has(self.size)) : "
            "(has(self.storageClassName) && has(self.size))",
        ),
    )

    claim_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="An existing ReadWriteMany PersistentVolumeClaim in the same namespace.",
    )
    storage_class_name: str | None = Field(
        None,
        min_length=1,
        max_length=253,
        description="Storage class of the ReadWriteMany claim the operator creates (with size). "
        "The claim belongs to the DeepSeekDeployment and is deleted with it.",
    )
    size: str | None = Field(
        None,
        max_length=64,
        pattern=QUANTITY,
        description="Size of the claim the operator creates, e.g. 2Ti: room for the shards of one "
        "plan (about the checkpoint's size) plus one more during a re-shard.",
    )


class HostPathStore(ApiModel):
    """A node-local directory for the shards, typically on a tmpfs."""

    __rules__ = (host_path_rule("store-host-path", "spec.sharding.store.hostPath", "/dev/shm/dsd"),)

    path: str = Field(
        min_length=1,
        max_length=4096,
        description="Absolute directory on the node, e.g. /dev/shm/dsd. Shards are written to "
        "<path>/<fingerprint>/. Clean (no '.', '..' or empty segment, no trailing /), not / and "
        "not a system directory (/etc, /usr, /proc, /dev but /dev/shm, ...: see the operator "
        "guide).",
    )
    nodes: list[Annotated[str, StringConstraints(min_length=1, max_length=253)]] | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="The nodes (kubernetes.io/hostname) that hold the shards, one per worker pod "
        "in order: a sharding Job on node i writes the ranks of worker pod i (plus the files "
        "every rank reads), and worker pod i runs on node i. Required for parallelism.nodes > "
        "1. A node lost means re-sharding on its replacement: change the name here.",
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )


class ShardStore(ApiModel):
    """Where the sharding Job writes the shards: exactly one of pvc or hostPath."""

    __rules__ = (
        Rule(
            "store-one",
            "spec.sharding.store: set exactly one of pvc or hostPath",
            lambda s: (s.pvc is None) != (s.host_path is None),
            "has(self.pvc) != has(self.hostPath)",
        ),
    )

    pvc: PvcStore | None = Field(
        None,
        description="Shared ReadWriteMany claim; workers stage their own ranks from it. Needed "
        "for more than one node.",
    )
    host_path: HostPathStore | None = Field(
        None,
        description="Node-local directory (e.g. a tmpfs such as /dev/shm/dsd) that workers load "
        "from directly: with hostPath.nodes (one node per worker pod), or with parallelism.nodes: "
        "1 and a worker.nodeSelector that pins the node.",
    )


class Sharding(ApiModel):
    """Offline weight sharding: the checkpoint is split once, by the exact plan the workers run."""

    # "store is required when enabled" lives on the spec: this object defaults to {} on the server,
    # and the API server checks every default against the rules of its own object.

    enabled: bool = Field(
        True,
        description="Shard the checkpoint offline with a Job before the workers start. Only "
        "DeepseekV3 (V3, R1) can be sharded offline; DeepseekV2 needs false (split at start-up).",
    )
    store: ShardStore | None = Field(
        None, description="Where the shards are written. Required when enabled."
    )
    stage_to_tmpfs: bool = Field(
        True,
        description="Workers copy their own ranks' shards from a pvc store into a memory-backed "
        "emptyDir before loading. A hostPath store is loaded in place. Default: true.",
        # No server-side default: the operator warns when it is set with a hostPath store, and
        # a default filled in by the API server would look set on every object.
        json_schema_extra=_no_server_default,
    )
    processes: int | None = Field(
        None,
        ge=1,
        le=256,
        description="Parallel sharder processes in the Job. Default: min(worldSize, 8).",
    )
    backoff_limit: int = Field(
        3, ge=0, le=100, description="Retries of the sharding Job before the deployment fails."
    )
    active_deadline_seconds: int = Field(
        21600,
        ge=60,
        description="Time limit of the sharding Job in seconds, retries included.",
    )
    resources: dict[str, Any] | None = Field(
        None,
        description="Compute resources of the sharder container (core/v1 ResourceRequirements), "
        "checked like spec.worker.resources. Default: none set.",
    )
    image: str | None = Field(
        None,
        min_length=1,
        max_length=1024,
        description="Image of the sharding Job. Default: spec.worker.image.",
    )

    _check_resources = field_validator("resources")(check_resources)
