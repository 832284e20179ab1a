"""A forward step over several sequences, and the slot-indexed MLA cache it reads and writes.

A step is the new tokens of each sequence (a whole prompt, a prompt chunk or one decode token)
flattened to [T]; each sequence owns one cache slot, and its tokens sit at positions start.. of
that slot. The same shape serves prefill, decode and mixed continuous batches.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch


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


class KVCache:
    """Per layer, slot and position: the normalised KV latent and the rotated shared rope key.

    576 values per token per layer for V3 (512 + 64), the compressed form absorbed MLA reads.
    One slot past `num_slots` is scratch: padding rows of a fixed-shape step write there.
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
    ) -> None:
        self.num_slots = num_slots
        self.scratch_slot = num_slots
        self.max_len = max_len
        shape = (num_layers, num_slots + 1, max_len)
        self.kv = torch.zeros(*shape, kv_rank, dtype=dtype, device=device)
        self.pe = torch.zeros(*shape, rope_dim, dtype=dtype, device=device)

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.kv[i], self.pe[i]

    def check(self, batch: Batch) -> None:
        """Refuse a step that would write outside the cache (a scheduler bug, never silent)."""
        if batch.max_k > self.max_len:
            raise ValueError(f"step reaches position {batch.max_k - 1}; cache holds {self.max_len}")
        if batch.max_slot >= self.num_slots:
            raise ValueError(f"slot {batch.max_slot} outside a cache of {self.num_slots} slots")
