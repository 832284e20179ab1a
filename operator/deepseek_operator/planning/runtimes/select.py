"""One entry point over the runtimes: the rendering of spec.runtime.engine, and the pieces of the
worker pod that differ by runtime (the serving container, the checkpoint stager, extra volumes)."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from . import dsworker, mindie, vllm
from .common import EngineRendering, Obj, Placement

STAGED_MOUNT = "/model"


def render(spec: DeepSeekDeploymentSpec, where: Placement, own_env: list[Obj]) -> EngineRendering:
    """The configuration of the runtime the spec names. `own_env` is what dsworker's pods get
    (identity, MASTER_*): the other engines render their own."""
    engine = spec.runtime.engine
    if engine == "mindie":
        return mindie.render(spec, where)
    if engine == "vllm":
        return vllm.render(spec, where)
    return dsworker.render(spec, where, own_env)


def serving_container(
    spec: DeepSeekDeploymentSpec,
    rendering: EngineRendering,
    env: list[Obj],
    mounts: list[Obj],
    security_context: Obj,
) -> Obj:
    """The container that runs the engine (`env`: the rendering's with spec.worker.env merged)."""
    return {
        "name": "engine",
        "image": spec.runtime.image,
        "imagePullPolicy": spec.worker.image_pull_policy,
        "command": rendering.command,
        "args": rendering.args,
        "env": env,
        "ports": rendering.ports,
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security_context,
        "volumeMounts": mounts,
        **rendering.probes,
    }


def stages_checkpoint(spec: DeepSeekDeploymentSpec) -> bool:
    """Whether the pods copy the whole HF checkpoint into memory first (vLLM)."""
    return spec.runtime.engine == "vllm" and spec.sharding.stage_to_tmpfs


def checkpoint_stager(
    spec: DeepSeekDeploymentSpec, source_dir: str, source_mount: str, security_context: Obj
) -> Obj:
    """`dsworker stage-checkpoint` (spec.worker.image): the checkpoint's safetensors and JSON
    files into the memory-backed model directory."""
    worker = spec.worker
    return {
        "name": "stage",
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": ["stage-checkpoint", "--source", source_dir, "--dest", STAGED_MOUNT],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": security_context,
        "volumeMounts": [
            {"name": "source", "mountPath": source_mount, "readOnly": True},
            {"name": "model", "mountPath": STAGED_MOUNT},
        ],
    }


def extra_volumes(spec: DeepSeekDeploymentSpec) -> tuple[list[Obj], list[Obj]]:
    """(volumes, engine mounts) a runtime adds: MindIE's rank table."""
    if spec.runtime.engine == "mindie":
        found = mindie.rank_table_volume(spec)
        if found is not None:
            return [found[0]], [found[1]]
    return [], []


def config_volume_mode(spec: DeepSeekDeploymentSpec) -> int | None:
    """The engine ConfigMap's file mode where a runtime checks it (MindIE wants 0640)."""
    return 0o640 if spec.runtime.engine == "mindie" else None
