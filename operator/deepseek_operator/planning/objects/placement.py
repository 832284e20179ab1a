"""Node-local shards on several nodes (spec.sharding.store.hostPath.nodes): worker pod i and the
sharding Job of node i run on hostPath.nodes[i], since only that node holds pod i's ranks."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .context import Obj

HOSTNAME_LABEL = "kubernetes.io/hostname"
# The scheduling gate that holds a worker pod until the operator has set its node.
NODE_PIN_GATE = "llm.dsop.io/node-pin"


def store_nodes(spec: DeepSeekDeploymentSpec) -> list[str] | None:
    """hostPath.nodes of a node-local store in use, else None."""
    store = spec.sharding.store
    if not spec.sharding.enabled or store is None or store.host_path is None:
        return None
    return list(store.host_path.nodes) if store.host_path.nodes else None


def node_pinned(spec: DeepSeekDeploymentSpec) -> bool:
    return store_nodes(spec) is not None


def node_selector(spec: DeepSeekDeploymentSpec, node: str) -> Obj:
    """spec.worker.nodeSelector with the node's hostname added."""
    return {**(spec.worker.node_selector or {}), HOSTNAME_LABEL: node}
