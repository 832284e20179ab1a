"""Gang scheduling: with spec.worker.schedulerName volcano, a Volcano PodGroup
(scheduling.volcano.sh/v1beta1) that holds the worker pods until all `nodes` fit at once, so a
group never sits half-scheduled holding NPUs. Format: tests/data/formats/volcano_podgroup.source.json."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .. import names
from .context import Context, Obj, metadata

VOLCANO = "volcano"
API_VERSION = "scheduling.volcano.sh/v1beta1"


def gang_scheduled(spec: DeepSeekDeploymentSpec) -> bool:
    return spec.worker.scheduler_name == VOLCANO


def pod_group(ctx: Context) -> Obj | None:
    """The PodGroup of the worker pods (minMember: one pod per node), or None without Volcano."""
    if not gang_scheduled(ctx.spec):
        return None
    spec: Obj = {"minMember": ctx.spec.parallelism.nodes}
    if ctx.spec.worker.priority_class_name:
        spec["priorityClassName"] = ctx.spec.worker.priority_class_name
    return {
        "apiVersion": API_VERSION,
        "kind": "PodGroup",
        "metadata": metadata(ctx, names.pod_group(ctx.name), names.POD_GROUP),
        "spec": spec,
    }


def pod_group_annotations(ctx: Context) -> dict[str, str]:
    """What puts a worker pod into the PodGroup."""
    if not gang_scheduled(ctx.spec):
        return {}
    return {names.VOLCANO_GROUP_ANNOTATION: names.pod_group(ctx.name)}
