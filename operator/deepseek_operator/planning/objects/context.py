"""What every child of one DeepSeekDeployment shares: the deployment it is built for (Context) and
its standard metadata (labels, fingerprint annotation, controller reference)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ...api import API_VERSION, KIND, DeepSeekDeployment, DeepSeekDeploymentSpec
from .. import names

Obj = dict[str, Any]


@dataclass(frozen=True)
class Context:
    """The deployment a builder works for, with the facts every builder needs."""

    deployment: DeepSeekDeployment
    uid: str
    fingerprint: str
    generation: int

    @property
    def spec(self) -> DeepSeekDeploymentSpec:
        return self.deployment.spec

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def namespace(self) -> str:
        return self.deployment.namespace


def owner_reference(ctx: Context) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    ctx: Context,
    name: str,
    component: str,
    annotations: Mapping[str, str] | None = None,
    fingerprint: str | None = None,
) -> Obj:
    """Standard metadata of a child: labels, fingerprint annotation, controller reference."""
    fp = fingerprint or ctx.fingerprint
    labels = names.labels(ctx.name, component)
    labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(fp)
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels,
        "annotations": {
            names.FINGERPRINT_ANNOTATION: fp,
            names.DEPLOYMENT_ANNOTATION: ctx.name,
            **(annotations or {}),
        },
        "ownerReferences": [owner_reference(ctx)],
    }
