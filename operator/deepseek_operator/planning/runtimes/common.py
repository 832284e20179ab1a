"""What every runtime renderer takes and returns, and the HTTP probe the non-dsworker engines use."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

Obj = dict[str, Any]

# Every pod of a group gets probes: readiness and start-up ask rank 0's endpoint (the group
# serves only when every rank has loaded); liveness is rank 0's alone, so a stuck rank 0 does not
# restart the other pods one by one. Rank 0 asks its own pod IP: MindIE binds its management
# endpoints to MIES_CONTAINER_MANAGEMENT_IP, vLLM binds every address.
HTTP_PROBE_SCRIPT = (
    "import os,re,sys,urllib.request as u\n"
    "o=int(re.search(r'(\\d+)$',os.environ['POD_NAME']).group(1))\n"
    "k,h,p,path=sys.argv[1:5]\n"
    "if k=='live' and o: sys.exit(0)\n"
    "if o==0: h=os.environ.get('POD_IP') or '127.0.0.1'\n"
    "u.urlopen('http://%s:%s%s'%(h,p,path),timeout=5)\n"
)


@dataclass(frozen=True)
class Placement:
    """Where the engine finds its inputs inside the pod, and how the group's pods meet."""

    model_dir: str  # the model (shards, staged copy or checkpoint) inside the container
    config_dir: str  # where the engine ConfigMap is mounted
    head_host: str  # rank 0's pod DNS name (resolves before the pods are Ready)
    group_port: int  # the group's rendezvous port on rank 0


@dataclass
class EngineRendering:
    """One runtime's configuration: the engine ConfigMap's files and the serving container."""

    files: dict[str, str]
    command: list[str]
    args: list[str]
    env: list[Obj]
    ports: list[Obj]
    probes: Obj
    config_file: str  # the file of `files` whose digest restarts the group when it changes
    extra: Obj = field(default_factory=dict)  # runtime-specific facts (for docs and tests)


def field_env(name: str, path: str) -> Obj:
    """An environment variable from the downward API (metadata.name, status.podIP, ...)."""
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": path}}}


def pod_identity_env() -> list[Obj]:
    return [
        field_env("POD_NAME", "metadata.name"),
        field_env("POD_NAMESPACE", "metadata.namespace"),
        field_env("POD_IP", "status.podIP"),
    ]


def http_probes(head_host: str, port: int, ready_path: str, live_path: str) -> Obj:
    def probe(kind: str, path: str) -> Obj:
        return {
            "exec": {
                "command": ["python3", "-c", HTTP_PROBE_SCRIPT, kind, head_host, str(port), path]
            },
            "timeoutSeconds": 8,
        }

    return {
        # Loading hundreds of GB and warming up may take long: up to an hour before liveness.
        "startupProbe": {
            **probe("ready", ready_path),
            "periodSeconds": 10,
            "failureThreshold": 360,
        },
        "readinessProbe": {
            **probe("ready", ready_path),
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "livenessProbe": {**probe("live", live_path), "periodSeconds": 20, "failureThreshold": 6},
    }


def container_port(name: str, port: int) -> Obj:
    return {"name": name, "containerPort": port, "protocol": "TCP"}
