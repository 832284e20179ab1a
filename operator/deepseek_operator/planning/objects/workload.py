"""The worker group: one StatefulSet whose pods stage their ranks' shards (optionally) and run
`dsworker serve`, with the devices, memory and probes the group needs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsworker.contract.layout import pod_ranks
from dsworker.contract.layout import staged_bytes as pod_staged_bytes

from ...api import DeepSeekDeploymentSpec
from ...api.quantity import parse_quantity
from .. import names
from ..ascend.pod import add_ascend, hccl_env, is_ascend
from ..runtimes import select as runtimes
from .api_key import add_api_key
from .context import Context, Obj, metadata
from .engine_config import ENGINE_CONFIG_DIR, rendering
from .placement import NODE_PIN_GATE, node_pinned
from .podgroup import pod_group_annotations
from .pods import (
    container_security_context,
    merge_env,
    placement,
    pod_name_env,
    pod_security_context,
)
from .storage import (
    SOURCE_MOUNT,
    STAGED_MOUNT,
    STORE_MOUNT,
    shard_path,
    source_path,
    source_volume,
    stages,
    store_volume,
)

GIB = 1 << 30
# /dev/shm of the engine (torch.distributed and NCCL/HCCL buffers): memory-backed, so bounded. An
# emptyDir of medium Memory counts against the pod's memory; past the limit the pod is evicted.
DSHM_SIZE = "16Gi"


def exact_staged_bytes(spec: DeepSeekDeploymentSpec, dir_bytes: Mapping[str, int]) -> int:
    """The bytes the largest pod stages, by the stager's own rule (dsworker.contract.layout)
    from the sharder's bytes per directory group: the pods share one template."""
    plan = spec.parallelism.to_plan()
    d = spec.parallelism.devices_per_node
    groups = dict(dir_bytes)
    return max(
        pod_staged_bytes(plan, pod_ranks(pod, d), groups) for pod in range(spec.parallelism.nodes)
    )


# tmpfs holds whole pages: a little more than the bytes of the files, by the number of files.
TMPFS_HEADROOM = 1.01
TMPFS_HEADROOM_BYTES = 64 << 20


def staged_bytes(spec: DeepSeekDeploymentSpec, shard_bytes: int) -> int:
    """An upper bound of the bytes one pod stages, for shards whose sharder did not report its
    bytes per directory (older sharders): every directory group is cut in equal parts, so a pod
    holds at most its largest share of any group; replicated files are small."""
    plan = spec.parallelism.to_plan()
    d = spec.parallelism.devices_per_node
    share = 0.0
    for pod in range(spec.parallelism.nodes):
        coords = [plan.coords(r) for r in range(pod * d, (pod + 1) * d)]
        tp_parts = len({c.tp_rank for c in coords}) / plan.tp
        moe_parts = len({(c.moe_tp_rank, c.moe_ep_rank) for c in coords}) / (
            plan.moe_tp * plan.moe_ep
        )
        share = max(share, tp_parts, moe_parts, d / plan.world_size)
    return math.ceil(shard_bytes * share * 1.05) + GIB


def _quantity(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def _resources(
    spec: DeepSeekDeploymentSpec, staged: int | None = None, room: int | None = None
) -> Obj:
    """spec.worker.resources with the devices added and, when the pod stages its shards into
    memory, the staged bytes added to the memory request (and to the limit, if one is set): the
    tmpfs is memory the pod uses on top of what the engine needs."""
    worker = spec.worker
    res: Obj = {k: dict(v) for k, v in (worker.resources or {}).items() if isinstance(v, Mapping)}
    resource = worker.accelerator.resource_name
    if worker.accelerator.type != "cpu" and resource:
        count = str(spec.parallelism.devices_per_node)
        res.setdefault("limits", {})[resource] = count
        res.setdefault("requests", {})[resource] = count
    if staged:
        requests = res.setdefault("requests", {})
        limits = res.get("limits") or {}
        # A limit without a request is also the request (Kubernetes' default): keep it so.
        base = requests.get("memory", limits.get("memory"))
        requests["memory"] = _quantity(_bytes(base) + staged)
        if "memory" in limits:
            limits["memory"] = _quantity(_bytes(limits["memory"]) + (room or staged))
    return res


def _bytes(quantity: Any) -> int:
    """A memory quantity of the spec in bytes (validated already; absent is 0)."""
    value = parse_quantity(quantity) if quantity is not None else None
    return math.ceil(value) if value is not None else 0


@dataclass
class _ModelFiles:
    """How the engine container reaches the model: the volumes and mounts, and the init container
    that stages the pod's ranks into memory first (with the bytes it stages, when known)."""

    volumes: list[Obj]
    mounts: list[Obj]
    stage: Obj | None = None
    staged_size: int | None = None
    room: int | None = None  # the tmpfs size limit: the staged bytes and its page headroom


def _model_files(
    ctx: Context, shard_bytes: int | None, dir_bytes: Mapping[str, int] | None = None
) -> _ModelFiles:
    spec = ctx.spec
    if not spec.sharding.enabled and runtimes.stages_checkpoint(spec):
        # The whole checkpoint into memory (vLLM); its size is the user's to request.
        return _ModelFiles(
            [source_volume(spec), {"name": "model", "emptyDir": {"medium": "Memory"}}],
            [{"name": "model", "mountPath": STAGED_MOUNT, "readOnly": True}],
            stage=runtimes.checkpoint_stager(
                spec, source_path(spec), SOURCE_MOUNT, container_security_context()
            ),
        )
    if not spec.sharding.enabled:
        return _ModelFiles(
            [source_volume(spec)],
            [{"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True}],
        )
    store = store_volume(ctx, read_only=True)
    if not stages(spec):
        return _ModelFiles([store], [{"name": "store", "mountPath": STORE_MOUNT, "readOnly": True}])
    staged: Obj = {"medium": "Memory"}
    files = _ModelFiles(
        [store, {"name": "model", "emptyDir": staged}],
        [{"name": "model", "mountPath": STAGED_MOUNT, "readOnly": True}],
        stage=_stage_container(ctx),
    )
    if dir_bytes:
        files.staged_size = exact_staged_bytes(spec, dir_bytes)
        files.room = math.ceil(files.staged_size * TMPFS_HEADROOM) + TMPFS_HEADROOM_BYTES
    elif shard_bytes:
        files.staged_size = files.room = staged_bytes(spec, shard_bytes)
    if files.room:
        staged["sizeLimit"] = _quantity(files.room)
    return files


def _stage_container(ctx: Context) -> Obj:
    """`dsworker stage`: copy this pod's ranks from the store into the memory-backed model dir."""
    worker = ctx.spec.worker
    return {
        "name": "stage",
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": [
            "stage",
            "--store",
            shard_path(ctx.fingerprint),
            "--dest",
            STAGED_MOUNT,
            "--devices-per-node",
            str(ctx.spec.parallelism.devices_per_node),
        ],
        "env": pod_name_env(),
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "store", "mountPath": STORE_MOUNT, "readOnly": True},
            {"name": "model", "mountPath": STAGED_MOUNT},
        ],
    }


def _engine_container(ctx: Context, mounts: list[Obj]) -> Obj:
    """The serving container of spec.runtime's engine, with spec.worker.env merged in."""
    spec = ctx.spec
    out = rendering(ctx)
    named = {e["name"] for e in out.env}
    hccl = [e for e in (hccl_env(spec) if is_ascend(spec) else []) if e["name"] not in named]
    own = [*out.env, *hccl]  # user's env replaces these
    env = merge_env(own, [e.to_dict() for e in spec.worker.env or ()])
    return runtimes.serving_container(spec, out, env, mounts, container_security_context())


def _pod_template(ctx: Context, config_digest: str, pod_spec: Obj) -> Obj:
    worker = ctx.spec.worker
    pod_labels = names.labels(ctx.name, names.WORKER)
    pod_labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    pod_annotations = {
        **(worker.pod_annotations or {}),
        **pod_group_annotations(ctx),
        names.FINGERPRINT_ANNOTATION: ctx.fingerprint,
        names.DEPLOYMENT_ANNOTATION: ctx.name,
        names.ENGINE_CONFIG_ANNOTATION: config_digest,
    }
    if worker.priority_class_name:
        pod_spec["priorityClassName"] = worker.priority_class_name
    if worker.scheduler_name:
        pod_spec["schedulerName"] = worker.scheduler_name
    return {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec}


def statefulset(
    ctx: Context,
    config_digest: str,
    shard_bytes: int | None,
    dir_bytes: Mapping[str, int] | None = None,
) -> Obj:
    spec = ctx.spec
    worker, par = spec.worker, spec.parallelism
    sts_name = names.statefulset(ctx.name)
    headless = names.headless_service(ctx.name)
    files = _model_files(ctx, shard_bytes, dir_bytes)
    extra_volumes, extra_mounts = runtimes.extra_volumes(spec)
    config_volume: Obj = {"name": names.config_map(ctx.name)}
    mode = runtimes.config_volume_mode(spec)
    if mode is not None:
        config_volume["defaultMode"] = mode
    mounts: list[Obj] = [
        {"name": "engine-config", "mountPath": ENGINE_CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *files.mounts,
        *extra_mounts,
    ]
    volumes: list[Obj] = [
        {"name": "engine-config", "configMap": config_volume},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": DSHM_SIZE}},
        *files.volumes,
        *extra_volumes,
    ]
    init = [files.stage] if files.stage is not None else []
    engine = _engine_container(ctx, mounts)
    resources = _resources(spec, files.staged_size, files.room)
    if resources:
        engine["resources"] = resources
        if init:
            init[0]["resources"] = _without_devices(resources, worker.accelerator.resource_name)
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": pod_security_context(),
        "initContainers": init,
        "containers": [engine],
        "volumes": volumes,
        **placement(spec),
    }
    if not init:
        del pod_spec["initContainers"]
    add_ascend(spec, pod_spec, names.rank_table(ctx.name), engine["name"])
    if node_pinned(spec):
        # Pod i must run on hostPath.nodes[i], which a template cannot say: the operator sets
        # each pod's node while this gate holds it (planning/pinning.py).
        pod_spec["schedulingGates"] = [{"name": NODE_PIN_GATE}]
    add_api_key(spec, pod_spec)
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(
            ctx,
            sts_name,
            names.WORKER,
            {
                names.WORLD_SIZE_ANNOTATION: str(par.world()),
                names.RUNTIME_ANNOTATION: spec.runtime.engine,
            },
        ),
        "spec": {
            "serviceName": headless,
            "replicas": par.nodes,
            "podManagementPolicy": "Parallel",
            # The ranks form one torch.distributed group: the operator replaces all pods together.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": names.selector_labels(ctx.name, names.WORKER)},
            "template": _pod_template(ctx, config_digest, pod_spec),
        },
    }


def _without_devices(resources: Obj, resource: str | None) -> Obj:
    return {
        kind: {k: v for k, v in values.items() if k != resource}
        for kind, values in resources.items()
        if isinstance(values, Mapping)
    }
