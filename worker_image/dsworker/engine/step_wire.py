"""The control message rank 0 broadcasts before every forward: a step, the MTP layer's inputs
after a step (speculative decoding), a heartbeat, or stop.

Pure encoding to a flat list of int64 so it travels as one small tensor (header with the length,
then the payload) over a CPU (gloo) group; no pickling, so no rank ever unpickles network bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

from dsworker.engine.steps import DraftInput, Step, StepItem

STEP = 1
HEARTBEAT = 2
STOP = 3
DRAFT = 4
_KINDS = (STEP, HEARTBEAT, STOP, DRAFT)
_ITEM_HEADER = 8  # seq_id, slot, start, n_tokens, sample, drafts, prompt_rows, n_pages


@dataclass(frozen=True)
class Message:
    """What the non-zero ranks act on: kind plus the step (STEP) or the MTP inputs (DRAFT)."""

    kind: int
    step: Step | None = None
    drafts: tuple[DraftInput, ...] = ()


class WireError(ValueError):
    """A message that does not decode (a bug or a version mismatch between ranks)."""


def encode(msg: Message) -> list[int]:
    """[kind, n_items, per item: seq_id, slot, start, n_tokens, sample, drafts, prompt_rows,
    n_pages, tokens..., pages...]; DRAFT: [kind, n_inputs, per input: index, count, last]."""
    if msg.kind not in _KINDS:
        raise WireError(f"unknown message kind {msg.kind}")
    if msg.kind == DRAFT:
        out = [DRAFT, len(msg.drafts)]
        for d in msg.drafts:
            out += [d.index, d.count, d.last]
        return out
    if msg.kind != STEP:
        return [msg.kind, 0]
    assert msg.step is not None
    out = [STEP, len(msg.step.items)]
    for it in msg.step.items:
        out += [it.seq_id, it.slot, it.start, len(it.tokens), int(it.sample), it.drafts]
        out += [it.prompt_rows, len(it.pages), *it.tokens, *it.pages]
    return out


def _decode_drafts(data: list[int], n: int) -> Message:
    if len(data) != 2 + 3 * n:
        raise WireError(f"{len(data) - 2} values for {n} draft inputs of 3")
    inputs = [DraftInput(*data[i : i + 3]) for i in range(2, len(data), 3)]
    if any(d.index < 0 or d.count < 1 for d in inputs):
        raise WireError("a draft input with a negative index or no positions")
    return Message(DRAFT, drafts=tuple(inputs))


def decode(data: list[int]) -> Message:
    if len(data) < 2 or data[0] not in _KINDS:
        raise WireError(f"bad message header {data[:2]}")
    kind, n = data[0], data[1]
    if kind == DRAFT:
        return _decode_drafts(data, n)
    if kind != STEP:
        return Message(kind)
    items: list[StepItem] = []
    i = 2
    for _ in range(n):
        if i + _ITEM_HEADER > len(data):
            raise WireError("truncated step item header")
        seq_id, slot, start, n_tok, sample, drafts, scored, n_pages = data[i : i + _ITEM_HEADER]
        i += _ITEM_HEADER
        if n_tok < 1 or n_pages < 0 or i + n_tok + n_pages > len(data):
            raise WireError("truncated step item tokens")
        if not 0 <= drafts < n_tok or not 0 <= scored <= n_tok - int(bool(sample)) - drafts:
            raise WireError(f"step item with {drafts} drafts, {scored} prompt rows, {n_tok} tokens")
        toks = tuple(data[i : i + n_tok])
        pages = tuple(data[i + n_tok : i + n_tok + n_pages])
        items.append(StepItem(seq_id, slot, start, toks, bool(sample), drafts, pages, scored))
        i += n_tok + n_pages
    if i != len(data):
        raise WireError(f"{len(data) - i} trailing values after {n} items")
    return Message(STEP, Step(tuple(items)))
