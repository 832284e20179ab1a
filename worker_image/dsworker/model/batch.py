"""A forward step over several sequences, and the slot-indexed MLA cache it reads and writes.

A step is the new tokens of each sequence (a whole prompt, a prompt chunk or one decode token)
flattened to [T]; each sequence owns one cache slot, and its tokens sit at positions start.. of
that slot. The same shape serves prefill, decode and mixed continuous batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from dsworker.contract.kv_budget import pages_for

DECODE_MAX_Q = 4  # new tokens per sequence up to which attention runs per row (mla_decode)


@dataclass(frozen=True)
class Batch:
    """Flattened tokens plus the indices attention needs to pad them per sequence."""

    input_ids: torch.Tensor  # [T] int64
    positions: torch.Tensor  # [T] absolute position in its sequence
    seq: torch.Tensor  # [T] sequence index b
    row: torch.Tensor  # [T] index among its sequence's new tokens
    slots: torch.Tensor  # [B] cache slot of each sequence
    token_slots: torch.Tensor  # [T]
    last: torch.Tensor  # [B] flat index of each sequence's last new token
    q_pos: torch.Tensor  # [B, max_q] query positions; padding rows see every key (discarded)
    max_q: int
    max_k: int  # keys to read per sequence: max position + 1
    max_slot: int = -1
    fixed_shape: bool = False  # padded to a bucket: no host syncs, no data-dependent shapes

    @property
    def num_tokens(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def num_seqs(self) -> int:
        return int(self.slots.shape[0])

    @property
    def is_decode(self) -> bool:
        """A decode step (one token per sequence, or a few with MTP drafts): each token row
        attends over its own sequence's pages in one op instead of padded prefill blocks."""
        return self.fixed_shape or 0 < self.max_q <= DECODE_MAX_Q

    @classmethod
    def build(cls, seqs: Sequence[tuple[int, int, Sequence[int]]], device: torch.device) -> Batch:
        """seqs: (slot, start position, new token ids) per sequence, in output order."""
        ids: list[int] = []
        pos: list[int] = []
        seq: list[int] = []
        row: list[int] = []
        tslot: list[int] = []
        last: list[int] = []
        for b, (slot, start, toks) in enumerate(seqs):
            if not toks:
                raise ValueError(f"sequence {b} (slot {slot}) has no tokens in this step")
            n = len(toks)
            ids += [int(t) for t in toks]
            pos += range(start, start + n)
            seq += [b] * n
            row += range(n)
            tslot += [slot] * n
            last.append(len(ids) - 1)
        max_q = max((len(t) for _, _, t in seqs), default=0)
        max_k = max((s + len(t) for _, s, t in seqs), default=0)
        q_pos = torch.full((len(seqs), max_q), max(max_k - 1, 0), dtype=torch.long)
        for b, (_, start, toks) in enumerate(seqs):
            q_pos[b, : len(toks)] = torch.arange(start, start + len(toks))

        def t(x: list[int]) -> torch.Tensor:
            return torch.tensor(x, dtype=torch.long)

        host = [
            t(ids),
            t(pos),
            t(seq),
            t(row),
            t([s for s, _, _ in seqs]),
            t(tslot),
            t(last),
            q_pos,
        ]
        dev = [x.to(device, non_blocking=True) for x in host]
        max_slot = max((s for s, _, _ in seqs), default=-1)
        return cls(*dev, max_q=max_q, max_k=max_k, max_slot=max_slot)

    @classmethod
    def decode(
        cls, input_ids: torch.Tensor, positions: torch.Tensor, slots: torch.Tensor, max_k: int
    ) -> Batch:
        """q new tokens per sequence (ids and positions [B, q]; q = 2 holds an MTP draft), built
        on the device alone (a CUDA graph captures it).

        Keys are read up to max_k whatever the positions; the causal mask hides the rest.
        """
        b, q = input_ids.shape
        ar = torch.arange(b, device=input_ids.device)
        return cls(
            input_ids.reshape(-1),
            positions.reshape(-1),
            seq=ar.repeat_interleave(q),
            row=torch.arange(q, device=input_ids.device).repeat(b),
            slots=slots,
            token_slots=slots.repeat_interleave(q),
            last=ar * q + (q - 1),
            q_pos=positions,
            max_q=q,
            max_k=max_k,
            fixed_shape=True,
        )

    def with_ids(self, input_ids: torch.Tensor) -> Batch:
        """The same layout with other token ids (the MTP layer reads the next tokens)."""
        return dataclasses.replace(self, input_ids=input_ids)


@dataclass(frozen=True)
class LayerKV:
    """One layer's cache as one step sees it: where its new tokens go, which pages it reads."""

    kv: torch.Tensor  # [pages + 1, page_size, kv_rank]
    pe: torch.Tensor  # [pages + 1, page_size, rope_dim]
    layer: int  # index of this layer in all_kv / all_pe (the fused store writes those)
    all_kv: torch.Tensor  # [layers, pages + 1, page_size, kv_rank]
    all_pe: torch.Tensor
    write: torch.Tensor  # [T] row of each new token in the flattened pages
    read: torch.Tensor  # [B, n] pages holding each sequence's first n * page_size positions
    max_k: int
    row_pages: torch.Tensor | None = None  # decode steps: [T, n] each token row's pages
    lengths: torch.Tensor | None = None  # decode steps: [T] keys each row sees (position + 1)

    def keys(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Each sequence's first max_k latents and rope keys: [B, max_k, .] each."""
        b, n = self.read.shape
        if n == 1:  # all within the first page: read max_k positions, not the whole page
            page = self.read[:, 0]
            return self.kv[page, : self.max_k], self.pe[page, : self.max_k]
        kv = self.kv[self.read].reshape(b, n * self.kv.shape[1], -1)[:, : self.max_k]
        pe = self.pe[self.read].reshape(b, n * self.pe.shape[1], -1)[:, : self.max_k]
        return kv, pe


class KVCache:
    """Per layer, in pages of `page_size` positions: the normalised KV latent and the rotated
    shared rope key (576 values per token per layer for V3, the form absorbed MLA reads).

    A sequence owns a slot; `table[slot]` lists the pages that hold its positions, in order
    (assigned by the scheduler through `assign`). By default every slot owns one page of
    `max_len` positions. The page and slot past the last are scratch: padding rows of a
    fixed-shape step write there.
    """

    def __init__(
        self,
        num_layers: int,
        num_slots: int,
        max_len: int,
        kv_rank: int,
        rope_dim: int,
        dtype: torch.dtype,
        device: torch.device,
        page_size: int | None = None,
        num_pages: int | None = None,
    ) -> None:
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.max_len = max_len
        self.page_size = page_size or max_len
        per_slot = pages_for(max_len, self.page_size)
        self.num_pages = num_pages if num_pages is not None else num_slots * per_slot
        self.scratch_page = self.num_pages
        shape = (num_layers, self.num_pages + 1, self.page_size)
        self.kv = torch.zeros(*shape, kv_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(*shape, rope_dim, dtype=dtype, device=device)
        self.table = torch.full(
            (num_slots + 1, per_slot), self.scratch_page, dtype=torch.long, device=device
        )
        if num_pages is None:  # one run of pages per slot, fixed
            self.table[:num_slots] = torch.arange(self.num_pages, device=device).view(
                num_slots, per_slot
            )
        # Positions each slot's pages hold (host side: bounds the chained MTP drafts).
        self.capacity = [per_slot * self.page_size if num_pages is None else 0] * num_slots

    def assign(self, slot: int, pages: Sequence[int]) -> None:
        """Give `slot` these pages, in position order (a new sequence takes the slot)."""
        if len(pages) > self.table.shape[1] or any(not 0 <= p < self.num_pages for p in pages):
            raise ValueError(f"slot {slot}: pages {list(pages)[:4]}... do not fit this cache")
        row = torch.tensor(list(pages), dtype=torch.long)
        self.table[slot, : len(pages)].copy_(row, non_blocking=True)
        self.capacity[slot] = len(pages) * self.page_size

    def chain_room(self, slot: int, last: int, drafts: int) -> int:
        """How many of `drafts` chained MTP drafts fit when the first reads position `last`:
        draft j is read (and its MTP entry written) at last + j, inside the slot's capacity."""
        return max(0, min(drafts, self.capacity[slot] - last))

    def bind(self, batch: Batch) -> Callable[[int], LayerKV]:
        """Layer index -> its LayerKV for this step (the page lookups are done once)."""
        p = self.page_size
        pages = self.table[batch.token_slots, batch.positions // p]
        write = pages * p + batch.positions % p
        read = self.table[batch.slots, : -(-batch.max_k // p)]
        if not batch.is_decode:
            return lambda i: LayerKV(self.kv[i], self.pe[i], i, self.kv, self.pe, write, read,
                                     batch.max_k)  # fmt: skip
        rows, lengths = read[batch.seq], batch.positions + 1
        return lambda i: LayerKV(self.kv[i], self.pe[i], i, self.kv, self.pe, write, read,
                                 batch.max_k, rows, lengths)  # fmt: skip

    def check(self, batch: Batch) -> None:
        """Refuse a step that would write outside the cache (a scheduler bug, never silent)."""
        if batch.max_k > self.max_len:
            raise ValueError(f"step reaches position {batch.max_k - 1}; cache holds {self.max_len}")
        if batch.max_slot >= self.num_slots:
            raise ValueError(f"slot {batch.max_slot} outside a cache of {self.num_slots} slots")
