"""spec.serving.apiKeySecret: the Secret key mounted read-only into the engine container, and
the worker told where to read it (the operator itself never reads the Secret)."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .context import Obj

API_KEY_DIR = "/var/run/secrets/llm.dsop.io/api-key"
API_KEY_FILE = "api-key"
API_KEY_ENV = "DSWORKER_API_KEY_FILE"
VLLM_API_KEY_ENV = "VLLM_API_KEY"
VOLUME = "api-key"


def add_api_key(spec: DeepSeekDeploymentSpec, pod_spec: Obj) -> None:
    """dsworker: mount the key into the engine container of `pod_spec` and point
    DSWORKER_API_KEY_FILE at it. vLLM reads its key from VLLM_API_KEY (a secretKeyRef). Either
    unless spec.worker.env sets that variable itself; MindIE is refused at admission."""
    secret = spec.serving.api_key_secret
    if secret is None:
        return
    engine = next(c for c in pod_spec["containers"] if c["name"] == "engine")
    env = engine.setdefault("env", [])
    if spec.runtime.engine == "vllm":
        if not any(e["name"] == VLLM_API_KEY_ENV for e in env):
            ref = {"secretKeyRef": {"name": secret.name, "key": secret.key}}
            env.append({"name": VLLM_API_KEY_ENV, "valueFrom": ref})
        return
    pod_spec["volumes"].append(
        {
            "name": VOLUME,
            "secret": {
                "secretName": secret.name,
                "items": [{"key": secret.key, "path": API_KEY_FILE}],
                # Readable by the pod's fsGroup (the worker's group) only.
                "defaultMode": 0o440,
            },
        }
    )
    engine.setdefault("volumeMounts", []).append(
        {"name": VOLUME, "mountPath": API_KEY_DIR, "readOnly": True}
    )
    if not any(e["name"] == API_KEY_ENV for e in env):
        env.append({"name": API_KEY_ENV, "value": f"{API_KEY_DIR}/{API_KEY_FILE}"})
