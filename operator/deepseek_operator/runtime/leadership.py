"""Whether kopf peering has paused this operator, from the peering object's keep-alives.

kopf pauses its watches while a live peer of the same peering name has a higher priority (or the
same one: then every such peer pauses), but the Reconciler's own retry and resync timers are not
kopf's, so they ask this first. The rule is kopf's own; the keep-alives are the peering object's
status: {identity: {priority, lifetime, lastseen}}.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Mapping
from typing import Any


def outranking_peers(
    status: Mapping[str, Any] | None, identity: str, priority: int, now: dt.datetime
) -> list[str]:
    """Identities of the live peers that pause an operator of this identity and priority."""
    out: list[str] = []
    for peer, info in (status or {}).items():
        if peer == identity or not isinstance(info, Mapping):
            continue
        try:
            seen = dt.datetime.fromisoformat(str(info["lastseen"]))
            lifetime = dt.timedelta(seconds=int(info.get("lifetime", 60)))
            their = int(info.get("priority", 0))
        except (KeyError, TypeError, ValueError):
            continue  # not a keep-alive kopf would read either
        if seen.tzinfo is None:
            seen = seen.replace(tzinfo=dt.UTC)
        if seen + lifetime > now and their >= priority:
            out.append(str(peer))
    return sorted(out)


def peering_kind(namespace: str | None) -> str:
    """ClusterKopfPeering for a cluster-wide operator, else KopfPeering (one per namespace)."""
    return "ClusterKopfPeering" if namespace is None else "KopfPeering"


def describe_peering(name: str, namespace: str | None) -> str:
    where = "" if namespace is None else f" in namespace {namespace}"
    return f"{peering_kind(namespace)} {name!r}{where}"


def peering_wait_message(name: str, missing: list[str | None], crd_missing: bool) -> str:
    """What an operator whose peering objects are missing waits for, and how to end the wait:
    kopf pauses every watch until they exist and says nothing about it."""
    objects = ", ".join(describe_peering(name, ns) for ns in missing)
    commands = "; ".join(
        "kubectl apply --server-side -f - <<< "
        f'\'{{"apiVersion": "kopf.dev/v1", "kind": "{peering_kind(ns)}", '
        f'"metadata": {{"name": "{name}"'
        + (f', "namespace": "{ns}"' if ns is not None else "")
        + "}}'"
        for ns in missing
    )
    crds = (
        "install the kopf.dev peering CRDs (kubectl apply --server-side -f "
        "crds/kopf-peering.yaml), then "
        if crd_missing
        else ""
    )
    return (
        f"leader election: waiting for {objects} (kopf.dev/v1), which does not exist: nothing "
        f"is reconciled until it does. To start, {crds}create it ({commands}), or run one "
        "replica with --standalone"
    )
