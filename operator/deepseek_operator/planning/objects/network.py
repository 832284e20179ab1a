"""The Services (the OpenAI API on rank 0, the headless rank discovery) and the disruption budget
of the worker group."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .. import names
from .context import Context, Obj, metadata

MASTER_PORT = 29500  # torch.distributed's rendezvous on rank 0


def _ports(spec: DeepSeekDeploymentSpec) -> list[Obj]:
    return [
        {"name": "http", "port": spec.serving.port, "targetPort": "http", "protocol": "TCP"},
    ]


def headless_service(ctx: Context) -> Obj:
    """Rank discovery: pod DNS names resolve before the pods are Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, names.headless_service(ctx.name), names.HEADLESS),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(ctx.name, names.WORKER),
            "ports": [
                *_ports(ctx.spec),
                {"name": "dist", "port": MASTER_PORT, "targetPort": "dist", "protocol": "TCP"},
            ],
        },
    }


def client_service(ctx: Context) -> Obj:
    """The OpenAI API: rank 0 only (pod 0 of the StatefulSet)."""
    selector = names.selector_labels(ctx.name, names.WORKER)
    selector[names.POD_NAME_LABEL] = f"{names.statefulset(ctx.name)}-0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, names.client_service(ctx.name), names.SERVICE),
        "spec": {"type": "ClusterIP", "selector": selector, "ports": _ports(ctx.spec)},
    }


def endpoint(ctx: Context) -> str:
    return f"http://{names.client_service(ctx.name)}.{ctx.namespace}.svc:{ctx.spec.serving.port}/v1"


def disruption_budget(ctx: Context) -> Obj:
    """Every worker is needed: a voluntary eviction of one would take the whole group down, so a
    drain waits while the group is healthy. A group that is not serving anyway (a pod not Ready)
    must not block a drain: its pods may always be evicted."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ctx, names.disruption_budget(ctx.name), names.DISRUPTION),
        "spec": {
            "minAvailable": ctx.spec.parallelism.nodes,
            "selector": {"matchLabels": names.selector_labels(ctx.name, names.WORKER)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }
