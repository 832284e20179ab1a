"""One chat choice's generated text as OpenAI's assistant message or stream deltas.

The reasoning parser (R1's thinking) reads the text first, the tool-call parser reads the answer
part after it. Kept apart from the HTTP handlers so the assembly is tested on any text, whatever a
model would write.
"""

from __future__ import annotations

from typing import Any

from dsworker.chat.reasoning import ReasoningSplitter
from dsworker.chat.tool_calls import ToolCallSplitter

TOOL_CALLS = "tool_calls"  # the finish_reason of an answer that called tools


class ChatOutput:
    """Feed one choice's text piece by piece (streaming) or whole (`message`).

    reasoning: split R1's thinking into reasoning_content; tools: parse DeepSeek tool calls in
    the answer; max_calls: keep only that many calls (parallel_tool_calls: false keeps one).
    """

    def __init__(self, reasoning: bool, tools: bool, max_calls: int | None = None) -> None:
        self._reasoning = ReasoningSplitter() if reasoning else None
        self._tools = ToolCallSplitter() if tools else None
        self._max_calls = max_calls
        self.calls = 0  # tool calls handed out so far

    def feed(self, text: str, final: bool = False) -> dict[str, Any]:
        """The new part as a stream delta: reasoning_content, content and tool_calls, each only
        when there is some (an empty dict when the piece completes nothing yet)."""
        thought, said = self._reasoning.feed(text, final) if self._reasoning else ("", text)
        delta: dict[str, Any] = {}
        if thought:
            delta["reasoning_content"] = thought
        calls = []
        if self._tools is not None:
            said, calls = self._tools.feed(said, final)
        if said:
            delta["content"] = said
        if self._max_calls is not None:
            calls = calls[: max(0, self._max_calls - self.calls)]
        if calls:
            delta["tool_calls"] = [c.delta_entry(self.calls + i) for i, c in enumerate(calls)]
            self.calls += len(calls)
        return delta

    def finish_reason(self, reason: str | None) -> str | None:
        """The engine's finish reason, or "tool_calls" once an answer that called tools ended
        by itself ("length" stays: a call may have been cut off)."""
        return TOOL_CALLS if reason not in (None, "length") and self.calls else reason

    def message(self, text: str) -> dict[str, Any]:
        """The whole answer as the assistant message of a non-streamed response."""
        delta = self.feed(text, final=True)
        message: dict[str, Any] = {"role": "assistant", "content": delta.get("content", "")}
        if self._reasoning is not None:
            message["reasoning_content"] = delta.get("reasoning_content", "")
        if "tool_calls" in delta:
            calls = delta["tool_calls"]
            message["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in calls]
            if not message["content"].strip():
                message["content"] = None  # OpenAI's shape of an answer that only calls tools
        return message
