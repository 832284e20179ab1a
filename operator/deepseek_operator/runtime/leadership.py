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
