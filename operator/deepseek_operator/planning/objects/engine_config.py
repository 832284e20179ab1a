"""The engine's configuration as spec.runtime's engine reads it, and the ConfigMap that carries it
(engine.json for dsworker, MindIE's config.json, vLLM's arguments): rendered by planning/runtimes."""

from __future__ import annotations

import hashlib

from .. import names
from ..runtimes import EngineRendering, Placement
from ..runtimes.dsworker import engine_config
from ..runtimes.select import render
from .context import Context, Obj, metadata
from .network import MASTER_PORT
from .pods import pod_name_env
from .storage import model_dir

ENGINE_CONFIG_DIR = "/etc/dsworker"
ENGINE_CONFIG_FILE = "engine.json"


def rank0_host(ctx: Context) -> str:
    """Pod 0's DNS name through the headless Service (resolves before the pods are Ready)."""
    sts, headless = names.statefulset(ctx.name), names.headless_service(ctx.name)
    return f"{sts}-0.{headless}.{ctx.namespace}.svc"


def dsworker_env(ctx: Context) -> list[Obj]:
    """The variables of `dsworker serve` (spec.worker.env is merged in by the pod builder)."""
    spec = ctx.spec
    env = [
        *pod_name_env(),
        {"name": "MASTER_ADDR", "value": rank0_host(ctx)},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(spec.parallelism.nodes)},
        {"name": "DSOP_FINGERPRINT", "value": ctx.fingerprint},
    ]
    if spec.model.mtp:
        env.append({"name": "DEEPSEEK_MTP", "value": "1"})
    return env


def rendering(ctx: Context) -> EngineRendering:
    """spec.runtime's engine configuration for this deployment's pods."""
    where = Placement(
        model_dir=model_dir(ctx),
        config_dir=ENGINE_CONFIG_DIR,
        head_host=rank0_host(ctx),
        group_port=MASTER_PORT,
    )
    return render(ctx.spec, where, dsworker_env(ctx))


def engine_config_map(ctx: Context) -> Obj:
    """`<name>-engine`: the rendered files; the digest of the engine's config file restarts the
    group when it changes."""
    out = rendering(ctx)
    digest = hashlib.sha256(out.files[out.config_file].encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            ctx,
            names.config_map(ctx.name),
            names.ENGINE_CONFIG,
            {names.ENGINE_CONFIG_ANNOTATION: digest},
        ),
        "data": dict(out.files),
    }


__all__ = ["ENGINE_CONFIG_DIR", "ENGINE_CONFIG_FILE", "engine_config", "engine_config_map"]
