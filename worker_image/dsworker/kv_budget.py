"""How many KV-cache slots one rank allocates, from the engine config's npuMemSize.

Pure (no torch) so the arithmetic and its error messages are unit-tested without a device. A slot
holds one sequence of maxSeqLen positions; the scheduler's maxBatchSize is cut to what fits.
"""

from __future__ import annotations

from dataclasses import dataclass

GIB = 1 << 30
# Auto mode (npuMemSize -1) leaves this much of the free memory for activations, MoE buffers and
# the allocator's fragmentation: 10% of what is free after the weights, and never less than 1 GiB.
AUTO_RESERVE_FRACTION = 0.10
AUTO_RESERVE_MIN_BYTES = 1 * GIB


class KVBudgetError(ValueError):
    """The memory budget cannot hold even one sequence; the message names the key and the fix."""


@dataclass(frozen=True)
class KVBudget:
    """The slots to allocate (per dp group), their bytes, and why that many."""

    slots: int
    wanted: int
    bytes_per_slot: int
    budget_bytes: int | None  # None = no limit (cpu with npuMemSize -1)
    reason: str

    @property
    def bytes(self) -> int:
        return self.slots * self.bytes_per_slot

    @property
    def capped(self) -> bool:
        """True when the budget, not maxBatchSize, set the slot count."""
        return self.slots < self.wanted


def bytes_per_slot(
    num_layers: int, max_seq_len: int, kv_rank: int, rope_dim: int, dtype_bytes: int
) -> int:
    """Bytes of one sequence's cache: every layer (MTP included) x positions x latent + rope key."""
    return num_layers * max_seq_len * (kv_rank + rope_dim) * dtype_bytes


def wanted_slots(max_batch_size: int, dp: int) -> int:
    """One dp group's share of the scheduler's slots (slot s lives on group s % dp)."""
    return -(-max_batch_size // dp)


def auto_reserve(free_bytes: int) -> int:
    """Bytes auto mode keeps free for activations (see AUTO_RESERVE_*)."""
    return max(int(free_bytes * AUTO_RESERVE_FRACTION), AUTO_RESERVE_MIN_BYTES)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def plan_kv_cache(
    slot_bytes: int, wanted: int, npu_mem_size: int, free_bytes: int | None
) -> KVBudget:
    """slots = min(wanted, budget // slot_bytes); budget = npuMemSize GiB, or for -1 the free
    device memory less auto_reserve (free_bytes None = cpu: no limit). Raises KVBudgetError,
    also when an explicit budget's slots exceed the free memory (an OOM later, said now)."""
    if slot_bytes <= 0 or wanted <= 0:
        raise ValueError(f"slot_bytes ({slot_bytes}) and wanted ({wanted}) must be positive")
    fix = "raise npuMemSize, lower maxSeqLen, or spread the model over more ranks (tp/moe_ep)"
    if npu_mem_size >= 0:
        budget: int | None = npu_mem_size * GIB
        source = f"npuMemSize {npu_mem_size} GiB"
    elif free_bytes is None:
        budget, source = None, "npuMemSize -1 on cpu (no limit)"
    else:
        budget = max(0, free_bytes - auto_reserve(free_bytes))
        source = (
            f"npuMemSize -1 (auto): {_gib(free_bytes)} free after the weights less "
            f"{_gib(auto_reserve(free_bytes))} kept for activations"
        )
        fix = "free device memory, lower maxSeqLen, or spread the model over more ranks (tp/moe_ep)"
    fits = wanted if budget is None else budget // slot_bytes
    if fits < 1:
        raise KVBudgetError(
            f"KV cache: {source} holds no sequence; one sequence of maxSeqLen positions needs "
            f"{_gib(slot_bytes)} ({slot_bytes} bytes); {fix}"
        )
    slots = min(wanted, fits)
    if npu_mem_size >= 0 and free_bytes is not None and slots * slot_bytes > free_bytes:
        raise KVBudgetError(
            f"KV cache: {source} gives {slots} sequences ({_gib(slots * slot_bytes)}) but only "
            f"{_gib(free_bytes)} of device memory is free after the weights; lower npuMemSize, "
            "or set it to -1 (auto) to use what is free"
        )
    if slots < wanted:
        reason = f"{source} holds {slots} of the {wanted} slots maxBatchSize asks for"
    else:
        reason = f"{source} holds all {wanted} slots maxBatchSize asks for"
    return KVBudget(slots, wanted, slot_bytes, budget, reason)
