"""spec.expertParallel: how routed experts talk across ranks (MindIE models.deepseekv2.*)."""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import Field, WithJsonSchema

from .base import ApiModel, Rule, section

MAX_BUFFER_FACTORS = 16
# Both numbers of a pair share one schema on the server; this bounds them for CEL's int().
MAX_BUFFER_NUMBER = 2**31

# A [sequenceLength, factor] pair. The server sees a list of two numbers (a structural schema has
# one item schema per list); the rules below check the integer and the positive factor.
BufferFactor = Annotated[
    tuple[float, float],
    WithJsonSchema(
        {
            "type": "array",
            "description": "[sequenceLength, factor]: an integer >= 0 and a number > 0.",
            "items": {"type": "number", "minimum": 0, "maximum": MAX_BUFFER_NUMBER},
            "minItems": 2,
            "maxItems": 2,
        }
    ),
]

_FACTORS = "self.alltoallBufferScaleFactors"
_INDEXES = "[" + ", ".join(str(i) for i in range(MAX_BUFFER_FACTORS - 1)) + "]"


def _pairs_ok(ep: ExpertParallel) -> bool:
    return all(
        0 <= n <= MAX_BUFFER_NUMBER and float(n).is_integer() and f > 0
        for n, f in ep.alltoall_buffer_scale_factors or ()
    )


def _descending(ep: ExpertParallel) -> bool:
    firsts = [n for n, _ in ep.alltoall_buffer_scale_factors or ()]
    return all(a > b for a, b in zip(firsts, firsts[1:], strict=False))


class InitRoutingCutoff(ApiModel):
    """Top-k routing cutoff for AllGather EP (MindIE enable_init_routing_cutoff)."""

    __rules__ = (
        Rule(
            "topk-needs-enabled",
            "spec.expertParallel.initRoutingCutoff.topkScalingFactor requires enabled: true; set "
            "enabled: true or remove topkScalingFactor",
            lambda c: c.topk_scaling_factor is None or c.enabled,
            "!has(self.topkScalingFactor) || self.enabled",
        ),
    )

    enabled: bool = Field(
        False,
        description="Cut off the tail of each device's hidden states after top-k routing to save "
        "device memory (long sequences). Only with level 1.",
    )
    topk_scaling_factor: float | None = Field(
        None,
        gt=0,
        le=1,
        description="Fraction of the routed tokens kept, in (0, 1] (MindIE topk_scaling_factor). "
        "Requires enabled: true and level 1. Default: the engine's.",
    )


class ExpertParallel(ApiModel):
    """Expert parallelism: level 1 AllGathers tokens to every EP rank; level 2 dispatches and
    combines them with AllToAll."""

    __rules__ = (
        Rule(
            "cutoff-level-1",
            "spec.expertParallel.initRoutingCutoff.enabled is only allowed with level 1 "
            "(AllGather EP); set enabled: false or level: 1",
            lambda ep: ep.level == 1 or not ep.init_routing_cutoff.enabled,
            "self.level == 1 || !has(self.initRoutingCutoff) || "
            "!has(self.initRoutingCutoff.enabled) || !self.initRoutingCutoff.enabled",
        ),
        Rule(
            "topk-level-1",
            "spec.expertParallel.initRoutingCutoff.topkScalingFactor requires level 1 "
            "(AllGather EP); remove it or set level: 1",
            lambda ep: ep.level == 1 or ep.init_routing_cutoff.topk_scaling_factor is None,
            "self.level == 1 || !has(self.initRoutingCutoff) || "
            "!has(self.initRoutingCutoff.topkScalingFactor)",
        ),
        Rule(
            "buffer-factor-pairs",
            "spec.expertParallel.alltoallBufferScaleFactors: each entry must be [sequenceLength, "
            "factor] with sequenceLength an integer >= 0 and factor > 0, e.g. [[8192, 5.2], [0, 8.0]]",
            _pairs_ok,
            f"!has({_FACTORS}) || {_FACTORS}.all(p, p[1] > 0.0 && double(int(p[0])) == p[0])",
        ),
        Rule(
            "buffer-factors-descending",
            "spec.expertParallel.alltoallBufferScaleFactors must be sorted strictly descending by "
            "sequence length (the first number), e.g. [[1048576, 1.32], [8192, 5.2], [0, 8.0]]",
            _descending,
            f"!has({_FACTORS}) || {_INDEXES}.all(i, i + 1 >= size({_FACTORS}) || "
            f"{_FACTORS}[i][0] > {_FACTORS}[i + 1][0])",
        ),
    )

    level: Literal[1, 2] = Field(
        1,
        description="EP implementation (MindIE ep_level): 1 = AllGather EP, 2 = AllToAll EP with "
        "fused dispatch/combine. Level 2 across nodes needs the nodes connected through a switch.",
    )
    init_routing_cutoff: InitRoutingCutoff = section(
        InitRoutingCutoff, "Top-k routing cutoff (level 1 only)."
    )
    alltoall_buffer_scale_factors: list[BufferFactor] | None = Field(
        None,
        max_length=MAX_BUFFER_FACTORS,
        description="AllToAll buffer sizing (MindIE alltoall_ep_buffer_scale_factors): "
        "[sequenceLength, factor] pairs, strictly descending by sequenceLength; the first pair "
        "whose sequenceLength the batch reaches sets the buffer factor. Only takes effect with "
        "level 2. Default: the engine's table.",
    )
    grouped_matmul: Literal["auto", "on", "off"] = Field(
        "auto",
        description="Grouped MatMul fused expert kernels: auto turns them on when moeEp > 32.",
    )
    interconnect: Literal["switch", "direct"] = Field(
        "switch",
        description="How the nodes are connected: switch, or direct (back-to-back). Level 2 with "
        "more than one node requires switch.",
    )

    def _resolve(self) -> None:
        if self.alltoall_buffer_scale_factors:
            self.alltoall_buffer_scale_factors = [
                (int(n), float(f)) for n, f in self.alltoall_buffer_scale_factors
            ]

    def grouped_matmul_on(self, moe_ep: int) -> bool:
        """Whether the engine uses Grouped MatMul for this plan."""
        return self.grouped_matmul == "on" or (self.grouped_matmul == "auto" and moe_ep > 32)
