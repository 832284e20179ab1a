"""The HCCL rank table (version "1.0", as HCCL and MindIE read it) from the worker pods: each pod's
IP, its node's IP and the NPUs the Ascend device plugin gave it, with their NIC IPs, which the
plugin publishes on the pod in the DEVICE_ANNOTATION (JSON: pod_name, server_id, devices
[{device_id, device_ip}]; Ascend/ascend-device-plugin, plugin_api.go Instance/Device). Pure.

The table is complete only when every pod of the group is there with an IP and exactly
devicesPerNode devices with valid, distinct IPs; until then `missing` says what is not there yet.
"""

from __future__ import annotations

import ipaddress
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

DEVICE_ANNOTATION = "ascend.kubectl.kubernetes.io/ascend-910-configuration"
TABLE_KEY = "hccl.json"  # the ConfigMap key, and the file name in the pods
TABLE_DIR = "/etc/dsop/hccl"
TABLE_PATH = f"{TABLE_DIR}/{TABLE_KEY}"
VERSION = "1.0"


@dataclass(frozen=True)
class PodFacts:
    """What the table needs of one worker pod, as read from the API server."""

    ordinal: int
    name: str
    pod_ip: str | None
    host_ip: str | None
    annotation: str | None


@dataclass
class RankTable:
    """The table (None until complete) and, while incomplete, what is missing, pod by pod."""

    table: dict[str, Any] | None
    missing: list[str] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        return self.table is not None


def _ip(value: Any) -> str | None:
    try:
        return str(ipaddress.ip_address(str(value)))
    except ValueError:
        return None


def parse_devices(pod: PodFacts, want: int) -> tuple[list[tuple[str, str]], str | None, str]:
    """(device_id, device_ip) pairs sorted by device id, the server_id the plugin states, or
    why the annotation cannot be used yet ("" when it can)."""
    where = f"pod {pod.name}: annotation {DEVICE_ANNOTATION}"
    if not pod.annotation:
        return [], None, f"pod {pod.name}: no {DEVICE_ANNOTATION} annotation yet (the Ascend "
        "device plugin writes it when it allocates the NPUs)"
    try:
        data = json.loads(pod.annotation)
        devices = [(str(d["device_id"]), str(d["device_ip"])) for d in data["devices"]]
    except (ValueError, KeyError, TypeError):
        return (
            [],
            None,
            f"{where} is not the device plugin's JSON (devices: [{{device_id, device_ip}}])",
        )
    bad = [i for i, ip in devices if _ip(ip) is None or not re.fullmatch(r"0|[1-9][0-9]*", i)]
    if bad:
        return [], None, f"{where}: device(s) {', '.join(bad)} have no valid id or IP"
    if len(devices) != want or len({i for i, _ in devices}) != want:
        return [], None, f"{where} lists {len(devices)} device(s), the pod runs {want} ranks"
    server = data.get("server_id") if isinstance(data, Mapping) else None
    return sorted(devices, key=lambda d: int(d[0])), _ip(server), ""


def build(pods: Iterable[PodFacts], nodes: int, devices_per_node: int) -> RankTable:
    """The rank table of a group of `nodes` pods with `devices_per_node` ranks each: server i is
    pod ordinal i (the first is MindIE's master, holding rank 0), ranks numbered in pod order
    and, within a pod, in device-id order, as the engine numbers its local ranks."""
    by_ordinal = {p.ordinal: p for p in pods}
    missing: list[str] = []
    servers: list[dict[str, Any]] = []
    for ordinal in range(nodes):
        pod = by_ordinal.get(ordinal)
        if pod is None:
            missing.append(f"worker pod {ordinal} does not exist yet")
            continue
        pod_ip, host_ip = _ip(pod.pod_ip), _ip(pod.host_ip)
        devices, server_ip, why = parse_devices(pod, devices_per_node)
        if pod_ip is None:
            missing.append(f"pod {pod.name}: no pod IP yet")
        if why:
            missing.append(why)
        if pod_ip is None or why:
            continue
        first = ordinal * devices_per_node
        servers.append(
            {
                "server_id": server_ip or host_ip or pod_ip,
                "container_ip": pod_ip,
                "device": [
                    {"device_id": dev, "device_ip": ip, "rank_id": str(first + k)}
                    for k, (dev, ip) in enumerate(devices)
                ],
            }
        )
    if not missing:
        missing += _duplicates(servers)
    if missing:
        return RankTable(None, missing)
    return RankTable(
        {
            "status": "completed",
            "version": VERSION,
            "server_count": str(len(servers)),
            "server_list": servers,
        }
    )


def _duplicates(servers: list[dict[str, Any]]) -> list[str]:
    """Two pods on one server, or one device IP twice: the plugin's facts contradict each other."""
    out = []
    ids = [s["server_id"] for s in servers]
    if len(set(ids)) != len(ids):
        out.append(f"two worker pods report the same server {sorted(ids)}: one pod per node")
    ips = [d["device_ip"] for s in servers for d in s["device"]]
    if len(set(ips)) != len(ips):
        out.append("the device plugin reports one device IP for two devices; check hccn.conf")
    return out


# The init container that holds the engine until the table is complete and names this pod (a table
# left from the group's previous pods names other IPs). ConfigMap volumes update in place.
WAIT_SCRIPT = (
    "import json,os,sys,time\n"
    "p,ip,t=sys.argv[1],os.environ['POD_IP'],time.time()+float(sys.argv[2])\n"
    "while True:\n"
    " try:\n"
    "  d=json.load(open(p))\n"
    "  if d.get('status')=='completed' and any(s.get('container_ip')==ip "
    "for s in d['server_list']): sys.exit(0)\n"
    " except (OSError,ValueError,KeyError): pass\n"
    " if time.time()>t: sys.exit('no complete HCCL rank table naming %s in %s'%(ip,p))\n"
    " time.sleep(2)\n"
)
