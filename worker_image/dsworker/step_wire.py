"""The control message rank 0 broadcasts before every forward: a step, a heartbeat, or stop.

Pure encoding to a flat list of int64 so it travels as one small tensor (header with the length,
then the payload) over a CPU (gloo) group; no pickling, so no rank ever unpickles network bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsworker.scheduler import Step, StepItem

STEP = 1
HEARTBEAT = 2
STOP = 3
_KINDS = (STEP, HEARTBEAT, STOP)
_ITEM_HEADER = 5  # seq_id, slot, start, n_tokens, sample


@dataclass(frozen=True)
class Message:
    """What the non-zero ranks act on: kind plus the step when kind == STEP."""

    kind: int
    step: Step | None = None


class WireError(ValueError):
    """A message that does not decode (a bug or a version mismatch between ranks)."""


def encode(msg: Message) -> list[int]:
    """[kind, n_items, per item: seq_id, slot, start, n_tokens, sample, tokens...]."""
    if msg.kind not in _KINDS:
        raise WireError(f"unknown message kind {msg.kind}")
    if msg.kind != STEP:
        return [msg.kind, 0]
    assert msg.step is not None
    out = [STEP, len(msg.step.items)]
    for it in msg.step.items:
        out += [it.seq_id, it.slot, it.start, len(it.tokens), int(it.sample)]
        out += list(it.tokens)
    return out


def decode(data: list[int]) -> Message:
    if len(data) < 2 or data[0] not in _KINDS:
        raise WireError(f"bad message header {data[:2]}")
    kind, n = data[0], data[1]
    if kind != STEP:
        return Message(kind)
    items: list[StepItem] = []
    i = 2
    for _ in range(n):
        if i + _ITEM_HEADER > len(data):
            raise WireError("truncated step item header")
        seq_id, slot, start, n_tok, sample = data[i : i + _ITEM_HEADER]
        i += _ITEM_HEADER
        if n_tok < 1 or i + n_tok > len(data):
            raise WireError("truncated step item tokens")
        items.append(StepItem(seq_id, slot, start, tuple(data[i : i + n_tok]), bool(sample)))
        i += n_tok
    if i != len(data):
        raise WireError(f"{len(data) - i} trailing values after {n} items")
    return Message(STEP, Step(tuple(items)))
