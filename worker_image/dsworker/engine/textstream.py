"""One sequence's generated text, built token by token, with stop strings cut out.

Pure (given a decode function): decodes a sliding window of tokens so the cost per token stays
constant, never emits half a UTF-8 character, and holds back the last few characters that could
still become a stop string, so a streamed stop string is never shown to the client.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

# Prompt tokens decoded ahead of the output so the first word keeps its leading space.
CONTEXT_TOKENS = 5
_REPLACEMENT = "\ufffd"


class OutputText:
    """Accumulate text for one sequence and report what may be streamed so far."""

    def __init__(
        self,
        decode: Callable[[list[int]], str],
        stop: Sequence[str] = (),
        prompt_tail: Sequence[int] = (),
        silent: frozenset[int] = frozenset(),
    ) -> None:
        """silent: tokens `decode` drops (special tokens), kept out of the window so a run of
        them (EOS after EOS under ignore_eos) cannot grow it."""
        self._decode = decode
        self._silent = silent
        self.stop = [s for s in stop if s]
        self._hold = max((len(s) for s in self.stop), default=1) - 1
        self._tokens: list[int] = list(prompt_tail[-CONTEXT_TOKENS:])
        self._prefix = 0
        self._read = len(self._tokens)
        self.text = ""  # all decoded output text (cut at a stop string once matched)
        self._sent = 0
        self.stopped = False  # a stop string matched

    def add(self, token: int) -> bool:
        """Append a token; True when a stop string now appears (the text is cut before it)."""
        if self.stopped:
            return True
        if token in self._silent:
            return False
        self._tokens.append(token)
        self._advance(final=False)
        return self._check_stop()

    def finish(self) -> None:
        """The sequence ended: decode whatever is left, even an incomplete character."""
        if not self.stopped:
            self._advance(final=True)
            self._check_stop()

    def take(self, final: bool = False) -> str:
        """Text not yet handed out; unless final, minus what could still begin a stop string."""
        end = len(self.text)
        if not final and not self.stopped:
            end = max(self._sent, end - self._hold)
        out = self.text[self._sent : end]
        self._sent = end
        return out

    def _advance(self, final: bool) -> None:
        before = self._decode(self._tokens[self._prefix : self._read])
        after = self._decode(self._tokens[self._prefix :])
        if len(after) <= len(before) and not final:
            return
        if after.endswith(_REPLACEMENT) and not final:
            return  # wait for the rest of the character
        # Characters of `before` may change when a later token completes them; only the part
        # past its length is new (the sliding-window habit of incremental detokenizers).
        self.text += after[len(before) :]
        self._prefix = self._read
        self._read = len(self._tokens)

    def _check_stop(self) -> bool:
        if not self.stop:
            return False
        # Only the tail that could hold a new match needs scanning.
        start = max(0, self._sent - self._hold - 1)
        best = -1
        for s in self.stop:
            i = self.text.find(s, start)
            if i != -1 and (best == -1 or i < best):
                best = i
        if best == -1:
            return False
        self.text = self.text[:best]
        self._sent = min(self._sent, best)
        self.stopped = True
        return True
