"""DeepSeek-R1's thinking, apart from its answer: text up to `</think>` is `reasoning_content`,
the rest `content` (the shape of DeepSeek's own API and of vLLM's deepseek_r1 reasoning parser).

R1's chat template opens the `<think>` block itself, so the output usually starts inside it
without the tag; a leading `<think>` is dropped when the model writes one. Without `</think>`
all of the output is reasoning. Pure and incremental: a tag split across streamed pieces is held
back until it is whole, so a client never sees half a tag.
"""

from __future__ import annotations

START = "<think>"
END = "</think>"


def partial_tag(text: str, tag: str) -> int:
    """Length of the longest end of `text` that could begin `tag` (kept until the next piece);
    shared with the tool-call splitter, which holds back its markers the same way."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


class ReasoningSplitter:
    """Feed the output text piece by piece; each call says what is new reasoning and content."""

    def __init__(self) -> None:
        self._buf = ""
        self._thinking = True
        self._at_start = True  # nothing passed on yet: a leading <think> may still come

    def feed(self, text: str, final: bool = False) -> tuple[str, str]:
        """(new reasoning text, new content text); `final` flushes what was held back."""
        if not self._thinking:
            return "", text
        buf = self._buf + text
        if self._at_start:
            stripped = buf.lstrip()
            if START.startswith(stripped) and not final:
                self._buf = buf  # maybe the start of <think>: wait
                return "", ""
            if stripped.startswith(START):
                buf = stripped[len(START) :]
            self._at_start = False
        end = buf.find(END)
        if end >= 0:
            self._thinking, self._buf = False, ""
            return buf[:end], buf[end + len(END) :]
        keep = 0 if final else partial_tag(buf, END)
        self._buf = buf[len(buf) - keep :]
        return buf[: len(buf) - keep], ""


def split_reasoning(text: str) -> tuple[str, str]:
    """The whole output's (reasoning, content)."""
    return ReasoningSplitter().feed(text, final=True)
