"""Builders of the children of one DeepSeekDeployment, as the dicts the operator applies.

Each builder is a pure function of the validated deployment (and, for a few, of facts read from
the cluster such as the shard bytes); the decision of which ones to apply lives in plan.py. One
module per concern: context (shared metadata), pods, storage, engine_config, jobs, network,
workload (the StatefulSet).
"""

from .context import Context, Obj, metadata, owner_reference
from .engine_config import engine_config, engine_config_map
from .jobs import cleanup_job, shard_args, shard_job
from .network import client_service, disruption_budget, endpoint, headless_service
from .pods import RUN_AS
from .storage import model_dir, resized_store_claim, store_claim
from .workload import staged_bytes, statefulset

__all__ = [
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
    "owner_reference",
    "resized_store_claim",
    "shard_args",
    "shard_job",
    "staged_bytes",
    "statefulset",
    "store_claim",
]
