"""spec.features: optional engine features (both exclude offline sharding)."""

from __future__ import annotations

from pydantic import Field

from .base import ApiModel


class Features(ApiModel):
    """Optional engine features. Both are incompatible with offline sharding."""

    expert_merge: bool = Field(
        False,
        description="Merge shared and routed experts in the engine. Incompatible with offline "
        "sharding (spec.sharding.enabled must be false).",
    )
    dynamic_load_balancing: bool = Field(
        False,
        description="Move experts between ranks at run time by load. Incompatible with offline "
        "sharding (spec.sharding.enabled must be false).",
    )
