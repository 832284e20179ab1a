"""The Jobs: the sharding Job (`dsworker shard` with the exact plan the workers run) and the Job
that deletes an old plan's shard directory."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from .. import names
from ..observed import EXIT_BAD_INPUT
from .context import Context, Obj, metadata
from .placement import node_selector, store_nodes
from .pods import container_security_context, placement, pod_name_env, pod_security_context
from .storage import (
    SOURCE_MOUNT,
    STORE_MOUNT,
    host_path_store,
    shard_path,
    source_path,
    source_volume,
    store_volume,
)

CLEANUP_TTL_SECONDS = 3600


def shard_args(ctx: Context, node: int | None = None) -> list[str]:
    """`dsworker shard` with the plan: the same numbers the workers run (with `node`: only the
    ranks of worker pod `node` and the files every rank reads)."""
    spec = ctx.spec
    plan = spec.parallelism.to_plan()
    args = [
        "shard",
        "--model-path",
        source_path(spec),
        "--save-directory",
        shard_path(ctx.fingerprint),
        "--world-size",
        str(plan.world_size),
        "--dp",
        str(plan.dp),
        "--tp",
        str(plan.tp),
        "--moe-tp",
        str(plan.moe_tp),
        "--moe-ep",
        str(plan.moe_ep),
    ]
    if spec.model.mtp:
        args.append("--mtp")
    if spec.model.dequantize_fp8:
        args.append("--dequantize-fp8")
    args += ["--processes", str(spec.sharding.processes), "--fingerprint", ctx.fingerprint]
    # The rules that need config.json, which only the Job reads: it exits 2 naming the field.
    args += ["--expect-architecture", "DeepseekV3"]
    args += ["--expect-quantization", spec.model.quantization]
    args += ["--max-seq-len", str(spec.serving.max_seq_len)]
    if node is not None:
        args += ["--node-index", str(node)]
        args += ["--devices-per-node", str(spec.parallelism.devices_per_node)]
    return args


def _shard_pod_spec(ctx: Context, node: int | None = None) -> Obj:
    spec = ctx.spec
    sharding, worker = spec.sharding, spec.worker
    container: Obj = {
        "name": "shard",
        "image": sharding.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": shard_args(ctx, node),
        "env": pod_name_env(),
        # The sharder writes its JSON summary, or {"error": ...}, here; the log tail otherwise.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True},
            {"name": "store", "mountPath": STORE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if sharding.resources:
        container["resources"] = dict(sharding.resources)
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            source_volume(spec),
            store_volume(ctx, read_only=False),
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if host_path_store(spec) or spec.model.source.host_path is not None:
        # A hostPath store: the shards must land on the workers' node. A hostPath checkpoint: it
        # is on the nodes the workers are placed on, not necessarily on any other.
        pod_spec.update(placement(spec))
    nodes = store_nodes(spec)
    if node is not None and nodes is not None:
        # The node whose worker pod reads these ranks.
        pod_spec["nodeSelector"] = node_selector(spec, nodes[node])
    return pod_spec


def shard_job(ctx: Context, node: int | None = None) -> Obj:
    """The sharding Job (with `node`: the one of node `node` of a node-local store)."""
    sharding = ctx.spec.sharding
    name = names.shard_job(ctx.name, ctx.fingerprint, node)
    extra = {} if node is None else {names.NODE_INDEX_ANNOTATION: str(node)}
    labels = names.labels(ctx.name, names.SHARDER)
    labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            ctx,
            name,
            names.SHARDER,
            {
                names.GENERATION_ANNOTATION: str(ctx.generation),
                names.SHARD_DIR_ANNOTATION: names.shard_dir(ctx.fingerprint),
                **extra,
            },
        ),
        "spec": {
            "backoffLimit": sharding.backoff_limit,
            "activeDeadlineSeconds": sharding.active_deadline_seconds,
            # Bad input (exit code 2: the checkpoint or plan cannot work) fails the Job at once;
            # the retries of backoffLimit are for what may pass (a node lost, out of memory).
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "shard",
                            "operator": "In",
                            "values": [EXIT_BAD_INPUT],
                        },
                    }
                ]
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        names.FINGERPRINT_ANNOTATION: ctx.fingerprint,
                        names.DEPLOYMENT_ANNOTATION: ctx.name,
                    },
                },
                "spec": _shard_pod_spec(ctx, node),
            },
        },
    }


def cleanup_job(ctx: Context, old_job: Mapping[str, Any]) -> Obj | None:
    """A Job that deletes the shard directory an old sharding Job wrote, on the same store.

    The store volume and node placement are copied from the old Job, since the spec may since
    have moved to another store.
    """
    fp = (old_job.get("metadata") or {}).get("annotations", {}).get(names.FINGERPRINT_ANNOTATION)
    template = ((old_job.get("spec") or {}).get("template") or {}).get("spec") or {}
    store = next((v for v in template.get("volumes") or () if v.get("name") == "store"), None)
    if not fp or store is None:
        return None
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "cleanup",
                "image": ctx.spec.sharding.image,
                "imagePullPolicy": ctx.spec.worker.image_pull_policy,
                "command": ["rm"],
                "args": ["-rf", "--", shard_path(fp)],
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "store", "mountPath": STORE_MOUNT}],
            }
        ],
        "volumes": [store],
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if template.get(key):
            pod_spec[key] = template[key]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            ctx,
            names.cleanup_job(
                ctx.name,
                fp,
                (old_job.get("metadata") or {})
                .get("annotations", {})
                .get(names.NODE_INDEX_ANNOTATION),
            ),
            names.CLEANUP,
            {names.SHARD_DIR_ANNOTATION: names.shard_dir(fp)},
            fingerprint=fp,
        ),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": CLEANUP_TTL_SECONDS,
            "template": {
                "metadata": {"labels": names.labels(ctx.name, names.CLEANUP)},
                "spec": pod_spec,
            },
        },
    }
