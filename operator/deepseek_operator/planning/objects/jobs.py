"""The Jobs: the sharding Job (`dsworker shard` with the exact plan the workers run) and the Job
that deletes an old plan's shard directory."""

from __future__ import annotations

import hashlib
import json
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


def template_digest(template: Mapping[str, Any]) -> str:
    """sha256 of a pod template as the operator built it: a Job's template cannot change, so a
    different digest means a new Job."""
    return hashlib.sha256(json.dumps(template, sort_keys=True).encode()).hexdigest()


def shard_job(ctx: Context, node: int | None = None) -> Obj:
    """The sharding Job (with `node`: the one of node `node` of a node-local store)."""
    sharding = ctx.spec.sharding
    name = names.shard_job(ctx.name, ctx.fingerprint, node)
    extra = {} if node is None else {names.NODE_INDEX_ANNOTATION: str(node)}
    labels = names.labels(ctx.name, names.SHARDER)
    labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    job = {
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
    job["metadata"]["annotations"][names.TEMPLATE_ANNOTATION] = template_digest(
        job["spec"]["template"]
    )
    return job


def _annotations(job: Mapping[str, Any]) -> Mapping[str, str]:
    return (job.get("metadata") or {}).get("annotations") or {}


def cleanup_job(ctx: Context, source: Mapping[str, Any], suspend: bool = False) -> Obj | None:
    """A Job that deletes the shard directory an old sharding Job wrote, on the same store.

    `source` is that sharding Job, or the cleanup Job made from it earlier (to resume one created
    suspended while its sharding Job was still writing). The store volume, node placement and
    image are copied from it, since the spec may since have moved to another store, and a Job's
    template cannot change. The cleanup names the sharding Job it is for (uid and generation):
    only a cleanup of that Job proves its directory gone.
    """
    notes = _annotations(source)
    fp = notes.get(names.FINGERPRINT_ANNOTATION)
    template = ((source.get("spec") or {}).get("template") or {}).get("spec") or {}
    store = next((v for v in template.get("volumes") or () if v.get("name") == "store"), None)
    if not fp or store is None:
        return None
    node = notes.get(names.NODE_INDEX_ANNOTATION)  # one Job per node of a node-local store
    image, pull = ctx.spec.sharding.image, ctx.spec.worker.image_pull_policy
    if names.CLEANS_UID_ANNOTATION in notes:  # a cleanup Job: resumed exactly as created
        cleans = notes[names.CLEANS_UID_ANNOTATION]
        generation = notes.get(names.CLEANS_GENERATION_ANNOTATION, "")
        first = (template.get("containers") or [{}])[0]
        image, pull = first.get("image", image), first.get("imagePullPolicy", pull)
    else:
        cleans = str((source.get("metadata") or {}).get("uid") or "")
        generation = notes.get(names.GENERATION_ANNOTATION, "")
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "cleanup",
                "image": image,
                "imagePullPolicy": pull,
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
            names.cleanup_job(ctx.name, fp, node),
            names.CLEANUP,
            {
                names.SHARD_DIR_ANNOTATION: names.shard_dir(fp),
                names.CLEANS_UID_ANNOTATION: cleans,
                names.CLEANS_GENERATION_ANNOTATION: generation,
                **({} if node is None else {names.NODE_INDEX_ANNOTATION: node}),
            },
            fingerprint=fp,
        ),
        "spec": {
            # Created suspended while the sharding Job it cleans up after is still writing (it
            # is stopped first): a suspended Job starts no pod.
            "suspend": suspend,
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": CLEANUP_TTL_SECONDS,
            "template": {
                "metadata": {"labels": names.labels(ctx.name, names.CLEANUP)},
                "spec": pod_spec,
            },
        },
    }
