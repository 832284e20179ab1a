"""An Ascend worker pod: the host's driver and tools mounted read-only, the device group in
supplementalGroups, the optional host network, the HCCL environment and, on several nodes, the
rank table mounted and waited for. Applied to a rendered pod spec, so every runtime's pods get
the same (the engine container is the one named `container`)."""

from __future__ import annotations

import math
from typing import Any

from ...api import DeepSeekDeploymentSpec
from . import rank_table

Obj = dict[str, Any]

# (volume name, host path, hostPath type): what torch_npu, HCCL and npu-smi read from the host.
DRIVER_PATHS = (
    ("ascend-driver", "/usr/local/Ascend/driver", "Directory"),
    ("ascend-dcmi", "/usr/local/dcmi", "Directory"),
    ("ascend-npu-smi", "/usr/local/bin/npu-smi", "File"),
    ("ascend-install-info", "/etc/ascend_install.info", "File"),
    ("ascend-hccn-conf", "/etc/hccn.conf", "File"),
)
RANK_TABLE_VOLUME = "hccl-rank-table"
# MindIE reads RANKTABLEFILE (1.0.x) or RANK_TABLE_FILE (2.3.0, the weight sharder): set both.
RANK_TABLE_ENV = ("RANK_TABLE_FILE", "RANKTABLEFILE")
HIDDEN_SIZE = {"DeepseekV2": 5120, "DeepseekV3": 7168}
HCCL_DEFAULT_BUFFER_MB = 200  # CANN's default HCCL_BUFFSIZE
RANK_TABLE_WAIT_SECONDS = 1800


def is_ascend(spec: DeepSeekDeploymentSpec) -> bool:
    return spec.worker.accelerator.type == "npu"


def needs_rank_table(spec: DeepSeekDeploymentSpec) -> bool:
    """HCCL needs a rank table across nodes (on one node it finds the devices itself); the
    operator builds it unless spec.runtime.rankTableConfigMap names the user's own."""
    return (
        is_ascend(spec)
        and spec.parallelism.nodes > 1
        and spec.runtime.rank_table_config_map is None
    )


def hccl_buffer_mb(spec: DeepSeekDeploymentSpec) -> int | None:
    """HCCL_BUFFSIZE: as given; else, for AllToAll EP (level 2), one prefill of
    maxInputTokenLen tokens of the hidden size in 2-byte activations (CANN's sizing rule:
    micro-batch x sequence x hidden x dtype size, in MB), at least HCCL's default."""
    given = spec.worker.ascend.hccl_buffer_mb
    if given is not None:
        return given
    if spec.expert_parallel.level != 2:
        return None
    hidden = HIDDEN_SIZE.get(spec.model.architecture or "DeepseekV3", HIDDEN_SIZE["DeepseekV3"])
    mb = math.ceil(spec.serving.max_input_token_len * hidden * 2 / (1 << 20))
    return max(mb, HCCL_DEFAULT_BUFFER_MB)


def hccl_env(spec: DeepSeekDeploymentSpec) -> list[Obj]:
    ascend = spec.worker.ascend
    env: list[Obj] = [
        {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        # The address HCCL's host-side sockets bind: the pod's (the node's with hostNetwork).
        {"name": "HCCL_IF_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        {"name": "HCCL_CONNECT_TIMEOUT", "value": str(ascend.hccl_connect_timeout)},
    ]
    buffer = hccl_buffer_mb(spec)
    if buffer is not None:
        env.append({"name": "HCCL_BUFFSIZE", "value": str(buffer)})
    if needs_rank_table(spec):
        env += [{"name": n, "value": rank_table.TABLE_PATH} for n in RANK_TABLE_ENV]
    return env


def _add_env(container: Obj, env: list[Obj]) -> None:
    """Add what the container does not set already: spec.worker.env, merged in before, wins."""
    have = {e["name"] for e in container.get("env") or ()}
    container["env"] = [*(container.get("env") or ()), *(e for e in env if e["name"] not in have)]


def _wait_container(engine: Obj, security_context: Obj) -> Obj:
    return {
        "name": "rank-table",
        "image": engine["image"],
        "imagePullPolicy": engine.get("imagePullPolicy", "IfNotPresent"),
        "command": ["python3", "-c", rank_table.WAIT_SCRIPT],
        "args": [rank_table.TABLE_PATH, str(RANK_TABLE_WAIT_SECONDS)],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "resources": {
            "requests": {"cpu": "100m", "memory": "128Mi"},
            "limits": {"cpu": "100m", "memory": "128Mi"},
        },
        "securityContext": security_context,
        "volumeMounts": [
            {"name": RANK_TABLE_VOLUME, "mountPath": rank_table.TABLE_DIR, "readOnly": True}
        ],
    }


def add_ascend(
    spec: DeepSeekDeploymentSpec, pod_spec: Obj, table_config_map: str, container: str = "engine"
) -> None:
    """Make a rendered worker pod spec ready for Ascend NPUs (a no-op for other accelerators)."""
    if not is_ascend(spec):
        return
    ascend = spec.worker.ascend
    engine = next(c for c in pod_spec["containers"] if c["name"] == container)
    volumes, mounts = pod_spec.setdefault("volumes", []), engine.setdefault("volumeMounts", [])
    if ascend.driver_mounts:
        for name, path, kind in DRIVER_PATHS:
            volumes.append({"name": name, "hostPath": {"path": path, "type": kind}})
            mounts.append({"name": name, "mountPath": path, "readOnly": True})
    security = pod_spec.setdefault("securityContext", {})
    groups = list(security.get("supplementalGroups") or ())
    if ascend.device_group_id not in groups:
        security["supplementalGroups"] = [*groups, ascend.device_group_id]
    if ascend.host_network:
        pod_spec["hostNetwork"] = True
        pod_spec["dnsPolicy"] = "ClusterFirstWithHostNet"
    _add_env(engine, hccl_env(spec))
    if needs_rank_table(spec):
        volumes.append({"name": RANK_TABLE_VOLUME, "configMap": {"name": table_config_map}})
        mounts.append(
            {"name": RANK_TABLE_VOLUME, "mountPath": rank_table.TABLE_DIR, "readOnly": True}
        )
        wait = _wait_container(engine, dict(engine.get("securityContext") or {}))
        pod_spec["initContainers"] = [*(pod_spec.get("initContainers") or ()), wait]
