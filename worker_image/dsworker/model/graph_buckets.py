"""Shape buckets of captured decode steps: a few batch sizes and key lengths cover every step.

A device graph replays fixed shapes, so a step is padded up to the nearest bucket; the buckets
grow geometrically so padding wastes at most about half a step and the graph count stays small.
"""

from __future__ import annotations

import bisect


def batch_buckets(max_batch: int) -> list[int]:
    """1, 2, 4, 8, then every multiple of 16 up to max_batch, and max_batch itself."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    small = [b for b in (1, 2, 4, 8) if b < max_batch]
    return small + list(range(16, max_batch, 16)) + [max_batch]


def key_buckets(max_len: int, smallest: int = 256) -> list[int]:
    """Powers of two from `smallest` below max_len, then max_len: keys a decode step reads."""
    if max_len < 1:
        raise ValueError(f"max_len must be >= 1, got {max_len}")
    out: list[int] = []
    k = smallest
    while k < max_len:
        out.append(k)
        k *= 2
    return out + [max_len]


def pick(buckets: list[int], n: int) -> int:
    """The smallest bucket >= n; a step larger than the last bucket is a caller bug."""
    i = bisect.bisect_left(buckets, n)
    if i == len(buckets):
        raise ValueError(f"{n} exceeds the largest bucket {buckets[-1]}")
    return buckets[i]
