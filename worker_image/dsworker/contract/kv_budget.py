"""How much KV cache one rank allocates, from the engine config's npuMemSize.

Pure (no torch) so the arithmetic and its error messages are unit-tested without a device. The
budget holds some number of pages of cacheBlockSize positions, at least one maxSeqLen sequence's
worth; sequences take pages as their tokens fill them (see dsworker.engine.scheduler), so many short
requests fit where few long ones would.
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


def kv_bytes(num_layers: int, positions: int, kv_rank: int, rope_dim: int, dtype_bytes: int) -> int:
    """Bytes of `positions` cached positions: every layer (MTP included) x latent + rope key."""
    return num_layers * positions * (kv_rank + rope_dim) * dtype_bytes


def pages_for(positions: int, page_size: int) -> int:
    """Pages that hold `positions` positions."""
    return -(-positions // page_size)


def wanted_slots(max_batch_size: int, dp: int) -> int:
    """One dp group's share of the scheduler's slots (slot s lives on group s % dp)."""
    return -(-max_batch_size // dp)


def auto_reserve(free_bytes: int) -> int:
    """Bytes auto mode keeps free for activations (see AUTO_RESERVE_*)."""
    return max(int(free_bytes * AUTO_RESERVE_FRACTION), AUTO_RESERVE_MIN_BYTES)


def _gib(n: int) -> str:
    return f"{n / GIB:.2f} GiB"


def _budget(npu_mem_size: int, free_bytes: int | None) -> tuple[int | None, str, str]:
    """(budget bytes or None for no limit, where it comes from, how to get more)."""
    fix = "raise npuMemSize, lower maxSeqLen, or spread the model over more ranks (tp/moe_ep)"
    if npu_mem_size >= 0:
        return npu_mem_size * GIB, f"npuMemSize {npu_mem_size} GiB", fix
    if free_bytes is None:
        return None, "npuMemSize -1 on cpu (no limit)", fix
    source = (
        f"npuMemSize -1 (auto): {_gib(free_bytes)} free after the weights less "
        f"{_gib(auto_reserve(free_bytes))} kept for activations"
    )
    fix = "free device memory, lower maxSeqLen, or spread the model over more ranks (tp/moe_ep)"
    return max(0, free_bytes - auto_reserve(free_bytes)), source, fix


@dataclass(frozen=True)
class KVPages:
    """The pages to allocate (per dp group) and why that many."""

    pages: int
    wanted: int
    bytes_per_page: int
    reason: str


def plan_kv_pages(
    page_bytes: int,
    pages_per_sequence: int,
    wanted_sequences: int,
    npu_mem_size: int,
    free_bytes: int | None,
) -> KVPages:
    """pages = min(what wanted_sequences of maxSeqLen need, budget // page_bytes), and at least
    one maxSeqLen sequence's pages (else KVBudgetError). The budget is npuMemSize GiB, or for -1
    the free device memory less auto_reserve (free_bytes None = cpu: no limit); an explicit
    budget above the free memory is refused now rather than failing at allocation."""
    if page_bytes <= 0 or pages_per_sequence <= 0 or wanted_sequences <= 0:
        raise ValueError("page_bytes, pages_per_sequence and wanted_sequences must be positive")
    budget, source, fix = _budget(npu_mem_size, free_bytes)
    wanted = pages_per_sequence * wanted_sequences
    fits = wanted if budget is None else budget // page_bytes
    seq_bytes = pages_per_sequence * page_bytes
    if fits < pages_per_sequence:
        raise KVBudgetError(
            f"KV cache: {source} holds {fits} pages, less than one sequence of maxSeqLen "
            f"positions ({pages_per_sequence} pages, {_gib(seq_bytes)}); {fix}"
        )
    pages = min(wanted, fits)
    if npu_mem_size >= 0 and free_bytes is not None and pages * page_bytes > free_bytes:
        raise KVBudgetError(
            f"KV cache: {source} gives {pages} pages ({_gib(pages * page_bytes)}) but only "
            f"{_gib(free_bytes)} of device memory is free after the weights; lower npuMemSize, "
            "or set it to -1 (auto) to use what is free"
        )
    share = f"{pages} of the {wanted} pages that maxBatchSize sequences of maxSeqLen could use"
    return KVPages(pages, wanted, page_bytes, f"{source} holds {share}")
