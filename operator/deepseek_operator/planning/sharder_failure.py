"""What a failed sharding Job's termination reason means for the conditions (issue 16.10).

The sharder writes {"error": ..., "reason": ...} with a reason from
dsworker.contract.errors.TERMINATION_REASONS. A plan or checkpoint that cannot work is a validation
failure (ConfigMismatch, InvalidModelConfig); a missing source or a full, read-only or busy store
is infrastructure: the spec is valid, Sharded says what to fix there, and the fix names the field.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsworker.contract import errors

from ..api import DeepSeekDeploymentSpec
from . import status as st


@dataclass(frozen=True)
class SharderFailure:
    """The Sharded reason, the Validated reason when the input itself is wrong (else None), and
    the message: the sharder's error plus the fix."""

    sharded_reason: str
    validated_reason: str | None
    message: str


def _source(spec: DeepSeekDeploymentSpec) -> str:
    src = spec.model.source
    if src.pvc is not None:
        return f"spec.model.source.pvc (claim {src.pvc.claim_name}, path {src.pvc.path or '/'!r})"
    assert src.host_path is not None
    return f"spec.model.source.hostPath ({src.host_path.path} on the sharding Job's node)"


def _store(spec: DeepSeekDeploymentSpec) -> str:
    store = spec.sharding.store
    if store.pvc is not None:
        size = f"size {store.pvc.size}" if store.pvc.size else f"claim {store.pvc.claim_name}"
        return f"spec.sharding.store.pvc ({size})"
    assert store.host_path is not None
    return f"spec.sharding.store.hostPath ({store.host_path.path})"


def _fix(reason: str, spec: DeepSeekDeploymentSpec) -> str:
    if reason == errors.SOURCE_MISSING:
        return f"check that {_source(spec)} holds the checkpoint's config.json and safetensors"
    if reason == errors.STORAGE_FULL:
        return (
            f"give {_store(spec)} room for the shards (about the checkpoint's size, twice during "
            "a re-shard), or free space on it"
        )
    if reason == errors.STORAGE_NOT_WRITABLE:
        return f"make {_store(spec)} writable by the worker's user (not read-only)"
    return f"another writer holds the shard directory on {_store(spec)}; wait for it to finish"


def sharder_failure(
    reason: str | None, error: str, job_name: str, spec: DeepSeekDeploymentSpec
) -> SharderFailure:
    """Conditions for a sharding Job that failed with dsworker's termination `reason`; an absent
    or unknown reason (an older sharder) is taken as ConfigMismatch, as before reasons existed."""
    if reason == errors.INVALID_MODEL_CONFIG:
        return SharderFailure(st.SHARDING_FAILED, st.INVALID_MODEL_CONFIG, error)
    if reason not in errors.TERMINATION_REASONS or reason == errors.CONFIG_MISMATCH:
        return SharderFailure(st.SHARDING_FAILED, st.CONFIG_MISMATCH, error)
    text = (
        f"sharding Job {job_name} failed: {error}; {_fix(reason, spec)}, then delete Job "
        f"{job_name} (or change the spec) to run it again"
    )
    return SharderFailure(reason, None, text)
