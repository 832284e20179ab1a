"""Node-local shards on several nodes: worker pod i must run on hostPath.nodes[i]. A pod template
cannot name a node per ordinal, so the pods start held by a scheduling gate; the operator sets
each held pod's node (a gated pod's nodeSelector may still be narrowed) and lifts the gate."""

from __future__ import annotations

import re
from dataclasses import dataclass

from . import names, objects
from .observed import meta, terminating, uid
from .state import PassState


@dataclass(frozen=True)
class Pin:
    """Set this pod's nodeSelector and remove its scheduling gates, while it is this uid."""

    name: str
    uid: str
    node_selector: dict[str, str]


def plan_pins(state: PassState) -> None:
    nodes = objects.store_nodes(state.spec)
    if not nodes:
        return
    for pod in state.observed.component_pods(names.WORKER):
        gates = [g.get("name") for g in (pod.get("spec") or {}).get("schedulingGates") or ()]
        if objects.NODE_PIN_GATE not in gates or terminating(pod):
            continue
        m = re.search(r"-(\d+)$", str(meta(pod).get("name") or ""))
        if not m or int(m.group(1)) >= len(nodes) or int(m.group(1)) in state.resharding:
            continue  # not a node's pod, or its node's shards are written again (node_reboot.py)
        selector = objects.node_selector(state.spec, nodes[int(m.group(1))])
        state.pins.append(Pin(str(meta(pod).get("name")), uid(pod), selector))
