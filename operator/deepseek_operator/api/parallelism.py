"""spec.parallelism: the parallel plan that sharding and serving share."""

from __future__ import annotations

from pydantic import Field

from dsworker.contract.layout import ParallelPlan

from .base import ApiModel, Rule

# The world size as CEL sees it: worldSize has no server-side default (it is computed).
_W = "(has(self.worldSize) ? self.worldSize : self.nodes * self.devicesPerNode)"

MAX_RANKS = 65536


def _divides(cel_field: str, attr: str) -> Rule:
    return Rule(
        f"{cel_field}-divides-world",
        f"spec.parallelism.{cel_field} must divide worldSize (nodes*devicesPerNode); choose a "
        f"{cel_field} that divides it, or leave {cel_field} unset",
        lambda p: getattr(p, attr) is None or p.world() % getattr(p, attr) == 0,
        f"!has(self.{cel_field}) || {_W} % self.{cel_field} == 0",
    )


def _product(a: str, b: str, a_attr: str, b_attr: str, fix: str) -> Rule:
    def ok(p: Parallelism) -> bool:
        x, y = getattr(p, a_attr), getattr(p, b_attr)
        return x is None or y is None or x * y == p.world()

    return Rule(
        f"{a}-times-{b}",
        f"spec.parallelism.{a}*{b} must equal worldSize (nodes*devicesPerNode); {fix}, or leave "
        f"one of {a} and {b} unset",
        ok,
        f"!has(self.{a}) || !has(self.{b}) || self.{a} * self.{b} == {_W}",
    )


class Parallelism(ApiModel):
    """The parallel plan (MindIE's --dp --tp --moe_tp --moe_ep): attention runs in dp groups of tp
    ranks, the MoE layers in moeTp x moeEp over the whole world."""

    __rules__ = (
        Rule(
            "world-size",
            "spec.parallelism.worldSize must equal nodes*devicesPerNode; remove worldSize or "
            "change nodes or devicesPerNode",
            lambda p: p.world_size is None or p.world_size == p.nodes * p.devices_per_node,
            "!has(self.worldSize) || self.worldSize == self.nodes * self.devicesPerNode",
        ),
        _divides("dp", "dp"),
        _divides("tp", "tp"),
        _product("dp", "tp", "dp", "tp", "set dp = worldSize / tp"),
        _divides("moeTp", "moe_tp"),
        _divides("moeEp", "moe_ep"),
        _product("moeTp", "moeEp", "moe_tp", "moe_ep", "set moeEp = worldSize / moeTp"),
    )

    nodes: int = Field(
        1, ge=1, le=1024, description="Worker pods (one per node) that form one model instance."
    )
    devices_per_node: int = Field(
        8, ge=1, le=64, description="Ranks per worker pod: one process per accelerator device."
    )
    world_size: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="Total ranks. Default: nodes*devicesPerNode; if given it must equal that.",
    )
    dp: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="Attention data-parallel groups. dp*tp must equal worldSize. "
        "Default: worldSize/tp when tp is given, else 1.",
    )
    tp: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="Attention and dense-MLP tensor-parallel size. Default: worldSize/dp.",
    )
    moe_tp: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="Tensor-parallel size inside each routed expert. moeTp*moeEp must equal "
        "worldSize. Default: worldSize/moeEp when moeEp is given, else 1.",
    )
    moe_ep: int | None = Field(
        None,
        ge=1,
        le=MAX_RANKS,
        description="Expert-parallel size: routed experts are spread over moeEp groups. "
        "Default: worldSize/moeTp.",
    )

    def world(self) -> int:
        """The world size, given or computed."""
        return self.world_size or self.nodes * self.devices_per_node

    def _resolve(self) -> None:
        w = self.world()
        self.world_size = w
        if self.tp is None:
            self.dp = self.dp or 1
            self.tp = w // self.dp
        elif self.dp is None:
            self.dp = w // self.tp
        if self.moe_ep is None:
            self.moe_tp = self.moe_tp or 1
            self.moe_ep = w // self.moe_tp
        elif self.moe_tp is None:
            self.moe_tp = w // self.moe_ep

    def to_plan(self) -> ParallelPlan:
        """The plan the sharder and the workers run (call on a validated object)."""
        assert self.dp and self.tp and self.moe_tp and self.moe_ep, "validate the spec first"
        return ParallelPlan(
            world_size=self.world(), dp=self.dp, tp=self.tp, moe_tp=self.moe_tp, moe_ep=self.moe_ep
        )
