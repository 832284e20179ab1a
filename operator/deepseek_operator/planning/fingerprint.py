"""The fingerprint of a shard set: what must change for the shards on disk to be different.

It names the shard directory (<store>/<fingerprint[:16]>) and the sharding Job, so a spec change
that alters the shards writes a new directory next to the old one (the workers keep serving from
the old one until the new one is complete), while a change that does not (serving limits, image,
resources, the served model name) reuses the shards. The deployment's namespace/name is part of
it too, so deployments sharing a store never share (or clean up) each other's directories.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from dsworker.contract.layout import FORMAT

from ..api import DeepSeekDeploymentSpec


def config_hash(config: Mapping[str, Any] | None) -> str | None:
    """sha256 of a config.json's canonical JSON, or None when the config is not known."""
    if config is None:
        return None
    canonical = json.dumps(config, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def store_identity(spec: DeepSeekDeploymentSpec) -> dict[str, str] | None:
    """Which store the shards live in; its size or storage class do not change the shards."""
    store = spec.sharding.store
    if not spec.sharding.enabled or store is None:
        return None
    if store.host_path is not None:
        if store.host_path.nodes:  # node-local on several nodes: which node holds which ranks
            return {"hostPath": store.host_path.path, "nodes": ",".join(store.host_path.nodes)}
        return {"hostPath": store.host_path.path}
    assert store.pvc is not None
    return {"pvc": store.pvc.claim_name or "(created by the operator)"}


def fingerprint_inputs(
    spec: DeepSeekDeploymentSpec,
    model_config: Mapping[str, Any] | None = None,
    owner: str | None = None,
) -> dict[str, Any]:
    """Everything the shards depend on, as one JSON-able document.

    `owner` (namespace/name of the deployment) keeps two deployments with the same model and plan
    on one store apart: each writes, stages from and cleans up only its own directories.
    """
    model = spec.model
    return {
        "owner": owner,
        "format": FORMAT,
        "source": model.source.to_dict(),
        "config": config_hash(model_config),
        "quantization": model.quantization,
        "dequantizeFp8": model.dequantize_fp8,
        "mtp": model.mtp,
        "plan": spec.parallelism.to_plan().to_dict(),
        "sharded": spec.sharding.enabled,
        "store": store_identity(spec),
    }


def fingerprint(
    spec: DeepSeekDeploymentSpec,
    model_config: Mapping[str, Any] | None = None,
    owner: str | None = None,
) -> str:
    """sha256 (hex) over fingerprint_inputs: equal inputs give equal shards."""
    doc = json.dumps(
        fingerprint_inputs(spec, model_config, owner), sort_keys=True, separators=(",", ":")
    )
    return hashlib.sha256(doc.encode()).hexdigest()
