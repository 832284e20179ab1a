"""The parallel plan (MindIE's --dp --tp --moe_tp --moe_ep) and its rank arithmetic.

Shared by the sharder, the loader, the launcher and the operator; `record()` / `from_record()` are
the one conversion to and from the camelCase plan that model_sharded_metadata.json and the runtime
record. Pure: no I/O, no numpy, no torch.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, fields
from typing import Any

from dsworker.contract.errors import PlanError


@dataclass(frozen=True)
class ParallelPlan:
    """The parallel layout that sharding and runtime share (MindIE's --dp --tp --moe_tp --moe_ep)."""

    world_size: int
    dp: int
    tp: int
    moe_tp: int
    moe_ep: int

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if not isinstance(v, int) or v < 1:
                raise PlanError(f"{f.name} must be a positive integer, got {v!r}")
        if self.dp * self.tp != self.world_size:
            raise PlanError(
                f"dp*tp must equal world_size: {self.dp}*{self.tp} != {self.world_size}; "
                "set dp = world_size / tp"
            )
        if self.moe_tp * self.moe_ep != self.world_size:
            raise PlanError(
                f"moe_tp*moe_ep must equal world_size: {self.moe_tp}*{self.moe_ep} != "
                f"{self.world_size}; set moe_ep = world_size / moe_tp"
            )

    def coords(self, rank: int) -> RankCoords:
        """Rank arithmetic: dp_rank = r // tp, tp_rank = r % tp, moe_ep = r // moe_tp, moe_tp = r % moe_tp."""
        if not 0 <= rank < self.world_size:
            raise PlanError(f"rank {rank} outside world of {self.world_size}")
        return RankCoords(
            rank=rank,
            dp_rank=rank // self.tp,
            tp_rank=rank % self.tp,
            moe_ep_rank=rank // self.moe_tp,
            moe_tp_rank=rank % self.moe_tp,
        )

    def rank_dirs(self, rank: int) -> list[str]:
        """The directories rank `rank` reads, in load order."""
        c = self.coords(rank)
        return [
            rank_dir(rank),
            "model-norm",
            f"model-attn-tp-{c.tp_rank:03d}",
            f"model-dense-tp-{c.tp_rank:03d}",
            moe_dir(c.moe_tp_rank, c.moe_ep_rank),
        ]

    def all_dirs(self) -> list[str]:
        """Every directory of the layout, each once."""
        seen: dict[str, None] = {}
        for r in range(self.world_size):
            for d in self.rank_dirs(r):
                seen.setdefault(d, None)
        return list(seen)

    def to_dict(self) -> dict[str, int]:
        return asdict(self)

    def record(
        self,
        *,
        mtp: bool | None = None,
        quantization: str | None = None,
        dequantized: bool | None = None,
    ) -> dict[str, Any]:
        """The plan as model_sharded_metadata.json and the runtime record it (camelCase), with
        whichever of mtp, quantization and dequantized are given."""
        out: dict[str, Any] = {
            "worldSize": self.world_size,
            "dp": self.dp,
            "tp": self.tp,
            "moeTp": self.moe_tp,
            "moeEp": self.moe_ep,
        }
        if mtp is not None:
            out["mtp"] = bool(mtp)
        if quantization is not None:
            out["quantization"] = quantization
        if dequantized is not None:
            out["dequantized"] = bool(dequantized)
        return out

    @classmethod
    def from_record(cls, record: Mapping[str, Any]) -> ParallelPlan:
        """The plan of a `record()` (PlanError naming a missing or bad field)."""
        keys = ("worldSize", "dp", "tp", "moeTp", "moeEp")
        missing = [k for k in keys if k not in record]
        if missing:
            raise PlanError(f"plan record lacks {', '.join(missing)}")
        return cls(*(record[k] for k in keys))


@dataclass(frozen=True)
class RankCoords:
    """Where one global rank sits in the attention and MoE grids."""

    rank: int
    dp_rank: int
    tp_rank: int
    moe_ep_rank: int
    moe_tp_rank: int


def rank_dir(rank: int) -> str:
    return f"model-{rank:03d}"


def moe_dir(moe_tp_rank: int, moe_ep_rank: int) -> str:
    return f"model-moe-tp-{moe_tp_rank:03d}-ep-{moe_ep_rank:03d}"
