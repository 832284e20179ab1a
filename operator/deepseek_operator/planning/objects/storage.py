"""Where the checkpoint and the shards live: the source and store volumes, the store claim the
operator creates (and grows), and the paths the sharder and the engine see them at."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...api import DeepSeekDeploymentSpec
from .. import names
from ..runtimes.select import stages_checkpoint
from .context import Context, Obj, metadata

SOURCE_MOUNT = "/source"
STORE_MOUNT = "/store"
STAGED_MOUNT = "/model"


def source_path(spec: DeepSeekDeploymentSpec) -> str:
    source = spec.model.source
    sub = source.pvc.path.strip("/") if source.pvc is not None else ""
    return f"{SOURCE_MOUNT}/{sub}" if sub else SOURCE_MOUNT


def source_volume(spec: DeepSeekDeploymentSpec) -> Obj:
    source = spec.model.source
    if source.pvc is not None:
        return {
            "name": "source",
            "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
        }
    assert source.host_path is not None
    return {"name": "source", "hostPath": {"path": source.host_path.path, "type": "Directory"}}


def store_claim_name(ctx: Context) -> str | None:
    store = ctx.spec.sharding.store
    if store is None or store.pvc is None:
        return None
    return store.pvc.claim_name or names.store_claim(ctx.name)


def store_volume(ctx: Context, read_only: bool) -> Obj:
    store = ctx.spec.sharding.store
    assert store is not None
    if store.host_path is not None:
        return {
            "name": "store",
            "hostPath": {"path": store.host_path.path, "type": "DirectoryOrCreate"},
        }
    claim: Obj = {"claimName": store_claim_name(ctx)}
    if read_only:
        claim["readOnly"] = True
    return {"name": "store", "persistentVolumeClaim": claim}


def host_path_store(spec: DeepSeekDeploymentSpec) -> bool:
    store = spec.sharding.store
    return spec.sharding.enabled and store is not None and store.host_path is not None


def stages(spec: DeepSeekDeploymentSpec) -> bool:
    """Whether workers copy their ranks into tmpfs first (a pvc store with stageToTmpfs)."""
    store = spec.sharding.store
    return (
        spec.sharding.enabled
        and store is not None
        and store.pvc is not None
        and spec.sharding.stage_to_tmpfs
    )


def shard_path(fingerprint: str) -> str:
    return f"{STORE_MOUNT}/{names.shard_dir(fingerprint)}"


def model_dir(ctx: Context) -> str:
    """Where the engine loads the model from inside the worker container."""
    if not ctx.spec.sharding.enabled:
        return STAGED_MOUNT if stages_checkpoint(ctx.spec) else source_path(ctx.spec)
    if stages(ctx.spec):
        return STAGED_MOUNT
    return shard_path(ctx.fingerprint)


def store_claim(ctx: Context) -> Obj | None:
    """The ReadWriteMany claim for the shards, when the spec asks the operator to create it."""
    store = ctx.spec.sharding.store
    if not ctx.spec.sharding.enabled or store is None or store.pvc is None:
        return None
    if store.pvc.claim_name is not None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(ctx, names.store_claim(ctx.name), names.SHARD_STORE),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": store.pvc.storage_class_name,
            "resources": {"requests": {"storage": store.pvc.size}},
        },
    }


def resized_store_claim(ctx: Context, observed: Mapping[str, Any], size: str) -> Obj:
    """The store claim as the operator applied it, with only the storage request changed.

    A claim's spec is immutable but for resources.requests, so every other field the operator
    owns (access modes, storage class, fingerprint label and annotation) is applied again with the
    value the claim has: a server-side apply that left one out would try to remove it.
    """
    claim = store_claim(ctx)
    assert claim is not None
    md = observed.get("metadata") or {}
    fingerprint = (md.get("annotations") or {}).get(names.FINGERPRINT_ANNOTATION)
    claim["metadata"] = metadata(
        ctx, claim["metadata"]["name"], names.SHARD_STORE, None, fingerprint
    )
    spec = observed.get("spec") or {}
    for key in ("accessModes", "storageClassName"):
        if key in spec:
            claim["spec"][key] = spec[key]
    claim["spec"]["resources"] = {"requests": {"storage": size}}
    return claim
