"""Guided decoding on the device: each guided sequence's matcher masks the logits of its next
token and follows what it emits. The grammars themselves are compiled in dsworker.chat.grammars.
"""

from __future__ import annotations

import torch
import xgrammar as xgr

from dsworker.chat.grammars import Grammar


def unpack(bitmask: torch.Tensor, n: int) -> torch.Tensor:
    """xgrammar's bitmask [1, ceil(V/32)] int32 (bit j of word i: token 32i + j allowed) as
    the bool mask of the first `n` tokens. A few tensor ops on any device, and no Triton kernel
    to compile on first use: masking a 129k row this way took a third of xgrammar's own CPU
    kernel's time when most tokens were ruled out (benchmarks/guided.py, its last line)."""
    shifts = torch.arange(32, dtype=torch.int32, device=bitmask.device)
    return ((bitmask[0, :, None] >> shifts) & 1).flatten()[:n].bool()


class Matcher:
    """One sequence's place in its grammar. Per sampled step: fill() the next token's mask,
    mask() the row it is drawn from, accept() the token drawn. Recomputing a preempted
    sequence samples nothing, so nothing is accepted again: the matcher simply goes on."""

    def __init__(self, grammar: Grammar) -> None:
        self.vocab_size = grammar.vocab_size
        self._matcher = xgr.GrammarMatcher(
            grammar.compiled, terminate_without_stop_token=not grammar.has_stop
        )
        self._bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
        self._restrict = True

    def fill(self) -> None:
        """Compute which tokens may come next (on the host; the state does not change)."""
        self._restrict = bool(self._matcher.fill_next_token_bitmask(self._bitmask))

    def mask(self, rows: torch.Tensor) -> torch.Tensor:
        """A copy of `rows` [1, W] (fp32) with every token the grammar rules out at -inf,
        including logit columns past the vocabulary (W > vocab_size)."""
        if rows.dim() != 2 or rows.shape[0] != 1:
            raise ValueError(f"a guided sequence samples from one row, not {tuple(rows.shape)}")
        out = rows.float().clone()
        n = min(self.vocab_size, out.shape[-1])
        if self._restrict:  # else every token is allowed (inside a free string, say)
            allowed = unpack(self._bitmask.to(out.device, non_blocking=True), n)
            out[0, :n].masked_fill_(~allowed, float("-inf"))
        out[:, n:] = float("-inf")
        return out

    def can_continue(self) -> bool:
        """After fill(): some token of the vocabulary may come next."""
        return not self._restrict or bool(unpack(self._bitmask, self.vocab_size).any())

    def accept(self, token: int) -> bool:
        """Advance past the emitted token; False if the grammar does not allow it."""
        return bool(self._matcher.accept_token(token))

    @property
    def terminated(self) -> bool:
        """The grammar is complete and its stop token (EOS) was accepted."""
        return bool(self._matcher.is_terminated())
