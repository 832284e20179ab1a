"""Builders of the children of one DeepSeekDeployment, as the dicts the operator applies.

Each builder is a pure function of the validated deployment (and, for a few, of facts read from
the cluster such as the shard bytes); the decision of which ones to apply lives in plan.py. One
module per concern: context (shared metadata), pods, storage, engine_config, jobs, network,
workload (the StatefulSet), placement (node-local pinning), podgroup (Volcano),
rank_table (the HCCL rank table ConfigMap).
"""

from .context import Context, Obj, metadata, owner_reference
from .engine_config import engine_config, engine_config_map
from .jobs import cleanup_job, shard_args, shard_job
from .network import client_service, disruption_budget, endpoint, headless_service
from .placement import NODE_PIN_GATE, node_selector, store_nodes
from .podgroup import pod_group
from .pods import RUN_AS
from .rank_table import rank_table_config_map
from .storage import model_dir, resized_store_claim, store_claim
from .workload import staged_bytes, statefulset

__all__ = [
    "NODE_PIN_GATE",
    "RUN_AS",
    "Context",
    "Obj",
    "cleanup_job",
    "client_service",
    "disruption_budget",
    "endpoint",
    "engine_config",
    "engine_config_map",
    "headless_service",
    "metadata",
    "model_dir",
    "node_selector",
    "owner_reference",
    "pod_group",
    "rank_table_config_map",
    "resized_store_claim",
    "shard_args",
    "shard_job",
    "staged_bytes",
    "statefulset",
    "store_claim",
    "store_nodes",
]
