"""What every pod the operator plans has: hardened security contexts, the pod's own name in its
environment, the user's env merged in, and the user's node placement."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .context import Obj

RUN_AS = 10001  # the uid of the dsworker images


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def pod_name_env() -> list[Obj]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]


def merge_env(own: list[Obj], user: list[Obj]) -> list[Obj]:
    """The operator's variables with spec.worker.env merged in by name: a user's entry replaces
    the operator's of the same name in place, the others follow. The API server keys env by name
    and refuses a list that names a variable twice."""
    by_name = {e["name"]: e for e in user}
    merged = [by_name.pop(e["name"], e) for e in own]
    return merged + [e for e in user if e["name"] in by_name]


def placement(spec: DeepSeekDeploymentSpec) -> Obj:
    worker = spec.worker
    out: Obj = {}
    if worker.node_selector:
        out["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        out["tolerations"] = [t.to_dict() for t in worker.tolerations]
    if worker.affinity and (affinity := worker.affinity.to_dict()):
        out["affinity"] = affinity
    return out
