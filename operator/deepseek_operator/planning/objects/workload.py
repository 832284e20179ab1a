"""The worker group: one StatefulSet whose pods stage their ranks' shards (optionally) and run
`dsworker serve`, with the devices, memory and probes the group needs."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...api import DeepSeekDeploymentSpec
from ...api.quantity import parse_quantity
from .. import names
from .context import Context, Obj, metadata
from .engine_config import ENGINE_CONFIG_DIR, ENGINE_CONFIG_FILE
from .network import MASTER_PORT
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
    model_dir,
    shard_path,
    source_volume,
    stages,
    store_volume,
)

GIB = 1 << 30
# /dev/shm of the engine (torch.distributed and NCCL/HCCL buffers): memory-backed, so bounded. An
# emptyDir of medium Memory counts against the pod's memory; past the limit the pod is evicted.
DSHM_SIZE = "16Gi"

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


def staged_bytes(spec: DeepSeekDeploymentSpec, shard_bytes: int) -> int:
    """An upper bound of the bytes one pod stages: every directory group is cut in equal parts,
    so a pod holds at most its largest share of any group; replicated files are small."""
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


def _resources(spec: DeepSeekDeploymentSpec, staged: int | None = None) -> Obj:
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
            limits["memory"] = _quantity(_bytes(limits["memory"]) + staged)
    return res


def _bytes(quantity: Any) -> int:
    """A memory quantity of the spec in bytes (validated already; absent is 0)."""
    value = parse_quantity(quantity) if quantity is not None else None
    return math.ceil(value) if value is not None else 0


def _probe(kind: str, ctx: Context) -> Obj:
    rank0 = (
        f"{names.statefulset(ctx.name)}-0.{names.headless_service(ctx.name)}.{ctx.namespace}.svc"
    )
    return {
        "exec": {
            "command": [
                "python3",
                "-c",
                PROBE_SCRIPT,
                kind,
                rank0,
                str(ctx.spec.serving.port),
            ]
        },
        "timeoutSeconds": 8,
    }


def worker_probes(ctx: Context) -> Obj:
    return {
        # Loading hundreds of GB and warming up may take long: up to an hour before liveness.
        "startupProbe": {**_probe("ready", ctx), "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {**_probe("ready", ctx), "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**_probe("live", ctx), "periodSeconds": 20, "failureThreshold": 6},
    }


@dataclass
class _ModelFiles:
    """How the engine container reaches the model: the volumes and mounts, and the init container
    that stages the pod's ranks into memory first (with the bytes it stages, when known)."""

    volumes: list[Obj]
    mounts: list[Obj]
    stage: Obj | None = None
    staged_size: int | None = None


def _model_files(ctx: Context, shard_bytes: int | None) -> _ModelFiles:
    spec = ctx.spec
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
    if shard_bytes:
        files.staged_size = staged_bytes(spec, shard_bytes)
        staged["sizeLimit"] = _quantity(files.staged_size)
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


def _engine_env(ctx: Context, master: str) -> list[Obj]:
    spec = ctx.spec
    env = [
        *pod_name_env(),
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(spec.parallelism.nodes)},
        {"name": "DSOP_FINGERPRINT", "value": ctx.fingerprint},
    ]
    if spec.model.mtp:
        env.append({"name": "DEEPSEEK_MTP", "value": "1"})
    return merge_env(env, [e.to_dict() for e in spec.worker.env or ()])


def _engine_container(ctx: Context, master: str, mounts: list[Obj]) -> Obj:
    """`dsworker serve`: devicesPerNode ranks of the group, HTTP on global rank 0."""
    spec = ctx.spec
    worker, par = spec.worker, spec.parallelism
    return {
        "name": "engine",
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": [
            "serve",
            "--model",
            model_dir(ctx),
            "--config",
            f"{ENGINE_CONFIG_DIR}/{ENGINE_CONFIG_FILE}",
            "--nproc-per-node",
            str(par.devices_per_node),
            "--nodes",
            str(par.nodes),
            "--master-addr",
            master,
            "--master-port",
            str(MASTER_PORT),
            "--port",
            str(spec.serving.port),
        ],
        "env": _engine_env(ctx, master),
        "ports": [
            {"name": "http", "containerPort": spec.serving.port, "protocol": "TCP"},
            {"name": "dist", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        **worker_probes(ctx),
    }


def _pod_template(ctx: Context, config_digest: str, pod_spec: Obj) -> Obj:
    worker = ctx.spec.worker
    pod_labels = names.labels(ctx.name, names.WORKER)
    pod_labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    pod_annotations = {
        **(worker.pod_annotations or {}),
        names.FINGERPRINT_ANNOTATION: ctx.fingerprint,
        names.DEPLOYMENT_ANNOTATION: ctx.name,
        names.ENGINE_CONFIG_ANNOTATION: config_digest,
    }
    if worker.priority_class_name:
        pod_spec["priorityClassName"] = worker.priority_class_name
    if worker.scheduler_name:
        pod_spec["schedulerName"] = worker.scheduler_name
    return {"metadata": {"labels": pod_labels, "annotations": pod_annotations}, "spec": pod_spec}


def statefulset(ctx: Context, config_digest: str, shard_bytes: int | None) -> Obj:
    spec = ctx.spec
    worker, par = spec.worker, spec.parallelism
    sts_name = names.statefulset(ctx.name)
    headless = names.headless_service(ctx.name)
    master = f"{sts_name}-0.{headless}.{ctx.namespace}.svc"
    files = _model_files(ctx, shard_bytes)
    mounts: list[Obj] = [
        {"name": "engine-config", "mountPath": ENGINE_CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
        *files.mounts,
    ]
    volumes: list[Obj] = [
        {"name": "engine-config", "configMap": {"name": names.config_map(ctx.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": DSHM_SIZE}},
        *files.volumes,
    ]
    init = [files.stage] if files.stage is not None else []
    engine = _engine_container(ctx, master, mounts)
    resources = _resources(spec, files.staged_size)
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
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(
            ctx,
            sts_name,
            names.WORKER,
            {names.WORLD_SIZE_ANNOTATION: str(par.world())},
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
