"""Play the Ascend device plugin on kwok nodes: annotate each scheduled worker pod with the NPUs
it got and their NIC IPs, in the plugin's format (tests/data/formats/
ascend_device_plugin_annotation.schema.json), as the plugin does when it allocates them."""

from __future__ import annotations

import json
import re
import zlib
from typing import Any

DEVICE_ANNOTATION = "ascend.kubectl.kubernetes.io/ascend-910-configuration"


def annotation_value(pod: Any, devices: int) -> str:
    ordinal = int(re.search(r"-(\d+)$", pod.metadata.name).group(1))
    return json.dumps(
        {
            "pod_name": pod.metadata.name,
            # The node's IP; kwok gives every node 127.0.0.1, so one per node name here.
            "server_id": f"10.0.{zlib.crc32(pod.spec.node_name.encode()) % 250}.1",
            "devices": [
                {"device_id": str(k), "device_ip": f"192.168.{ordinal}.{k + 1}"}
                for k in range(devices)
            ],
        }
    )


def annotate(core: Any, namespace: str, pods: list[Any], devices: int) -> None:
    for pod in pods:
        body = {"metadata": {"annotations": {DEVICE_ANNOTATION: annotation_value(pod, devices)}}}
        core.patch_namespaced_pod(pod.metadata.name, namespace, body)
