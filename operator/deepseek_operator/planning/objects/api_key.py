"""spec.serving.apiKeySecret: the Secret key mounted read-only into the engine container, and
the worker told where to read it (the operator itself never reads the Secret)."""

from __future__ import annotations

from ...api import DeepSeekDeploymentSpec
from .context import Obj

API_KEY_DIR = "/var/run/secrets/llm.dsop.io/api-key"
API_KEY_FILE = "api-key"
API_KEY_ENV = "DSWORKER_API_KEY_FILE"
VOLUME = "api-key"


def add_api_key(spec: DeepSeekDeploymentSpec, pod_spec: Obj) -> None:
    """Mount the key into the engine container of `pod_spec` and point DSWORKER_API_KEY_FILE
    at it (unless spec.worker.env sets that variable itself)."""
    secret = spec.serving.api_key_secret
    if secret is None:
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
    engine = next(c for c in pod_spec["containers"] if c["name"] == "engine")
    engine["volumeMounts"].append({"name": VOLUME, "mountPath": API_KEY_DIR, "readOnly": True})
    if not any(e["name"] == API_KEY_ENV for e in engine["env"]):
        engine["env"].append({"name": API_KEY_ENV, "value": f"{API_KEY_DIR}/{API_KEY_FILE}"})
