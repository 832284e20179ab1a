"""DeepSeek-V3/R1 tool calls: the prompt that offers functions, and the calls parsed from the answer.

The models write calls in their own markup after any ordinary text (the format of DeepSeek's chat
template and of vLLM's `--tool-call-parser deepseek_v3`):

    <｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>NAME
    ```json
    ARGUMENTS
    ```<｜tool▁call▁end｜>            (more calls, each usually after a newline)
    <｜tool▁calls▁end｜>

Pure and incremental like dsworker.chat.reasoning: a marker split across streamed pieces is held back
until it is whole, and each call is handed out once its end marker has arrived. Text the parser
cannot read as calls is never lost: from the first malformed call on, the raw text is content.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from dsworker.chat.reasoning import partial_tag

CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
CALLS_END = "<｜tool▁calls▁end｜>"
CALL_BEGIN = "<｜tool▁call▁begin｜>"
CALL_END = "<｜tool▁call▁end｜>"
SEP = "<｜tool▁sep｜>"
MARKERS = (CALLS_BEGIN, CALLS_END, CALL_BEGIN, CALL_END, SEP)
# How the chat template hands the calls' results back: one block, an output per tool message.
OUTPUTS_BEGIN = "<｜tool▁outputs▁begin｜>"
OUTPUTS_END = "<｜tool▁outputs▁end｜>"
OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
OUTPUT_END = "<｜tool▁output▁end｜>"

# Between CALL_BEGIN and CALL_END; whitespace around the parts is tolerated, the parts are not.
_CALL = re.compile(
    r"\s*(?P<type>\w+)\s*"
    + re.escape(SEP)
    + r"\s*(?P<name>[^\s`]+)\s*\n\s*```(?:json)?[ \t]*\n(?P<args>.*)\n\s*```\s*",
    re.DOTALL,
)


def new_call_id() -> str:
    """A fresh id the client echoes back in the tool message that answers the call."""
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass(frozen=True)
class ToolCall:
    """One parsed call; `arguments` is the model's JSON object text, as OpenAI carries it."""

    id: str
    name: str
    arguments: str

    def message_entry(self) -> dict[str, Any]:
        """The call in a chat message's `tool_calls`."""
        return {
            "id": self.id,
            "type": "function",
            "function": {"name": self.name, "arguments": self.arguments},
        }

    def delta_entry(self, index: int) -> dict[str, Any]:
        """The call in a stream chunk's `delta.tool_calls`: the whole call in one delta."""
        return {"index": index, **self.message_entry()}


def parse_call(body: str, new_id: Callable[[], str] = new_call_id) -> ToolCall | None:
    """The call between CALL_BEGIN and CALL_END, or None when it is not a function call with a
    name and a JSON object of arguments."""
    m = _CALL.fullmatch(body)
    if m is None or m["type"] != "function":
        return None
    args = m["args"].strip()
    try:
        parsed = json.loads(args)
    except (ValueError, RecursionError):
        return None
    if not isinstance(parsed, dict):
        return None
    return ToolCall(new_id(), m["name"], args)


class ToolCallSplitter:
    """Feed the answer text piece by piece; each call says what is new content and which calls
    were completed."""

    def __init__(self, new_id: Callable[[], str] = new_call_id) -> None:
        self._new_id = new_id
        self._buf = ""
        self._in_block = False  # between CALLS_BEGIN and CALLS_END
        self._raw = False  # a malformed call was met: all that follows is content
        self._opened = ""  # the block's begin marker, until a call in the block vouches for it

    def feed(self, text: str, final: bool = False) -> tuple[str, list[ToolCall]]:
        """(new content, calls completed by this piece); `final` flushes what was held back."""
        self._buf += text
        content: list[str] = []
        calls: list[ToolCall] = []
        while True:
            if self._raw:
                content.append(self._buf)
                self._buf = ""
                break
            if not self._in_block:
                start = self._buf.find(CALLS_BEGIN)
                if start < 0:
                    keep = 0 if final else partial_tag(self._buf, CALLS_BEGIN)
                    content.append(self._buf[: len(self._buf) - keep])
                    self._buf = self._buf[len(self._buf) - keep :]
                    break
                content.append(self._buf[:start])
                self._buf = self._buf[start + len(CALLS_BEGIN) :]
                self._in_block, self._opened = True, CALLS_BEGIN
                continue
            if not self._block_step(calls, final):
                break
        return "".join(content), calls

    def _block_step(self, calls: list[ToolCall], final: bool) -> bool:
        """Read one element of the block; False when it has to wait for more text."""
        rest = self._buf.lstrip()
        if rest.startswith(CALL_BEGIN):
            end = rest.find(CALL_END)
            if end < 0:
                return self._fall_back() if final else False
            call = parse_call(rest[len(CALL_BEGIN) : end], self._new_id)
            if call is None:
                return self._fall_back()
            calls.append(call)
            self._buf, self._opened = rest[end + len(CALL_END) :], ""
            return True
        if rest.startswith(CALLS_END) and not self._opened:
            self._buf, self._in_block = rest[len(CALLS_END) :], False
            return True
        if not final and (CALL_BEGIN.startswith(rest) or CALLS_END.startswith(rest)):
            return False  # nothing but whitespace or the start of a marker yet
        if final and not rest and not self._opened:
            self._buf = ""  # the answer ended after its calls, without CALLS_END
            return False
        return self._fall_back()

    def _fall_back(self) -> bool:
        """Not a call (or a block without any): the raw text from here on is content."""
        self._buf = self._opened + self._buf
        self._opened, self._raw = "", True
        return True


def split_tool_calls(
    text: str, new_id: Callable[[], str] = new_call_id
) -> tuple[str, list[ToolCall]]:
    """The whole answer's (content, calls)."""
    return ToolCallSplitter(new_id).feed(text, final=True)


def tools_prompt(tools: list[dict[str, Any]]) -> str:
    """The system text that offers `tools` (OpenAI tool objects) in DeepSeek's call format, for
    chat templates that do not render `tools` themselves (DeepSeek-V3's and R1's do not); worded
    after vLLM's examples/tool_chat_template_deepseekv3.jinja."""
    signatures = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    return (
        "# Tools\n\n"
        "You may call one or more functions to assist with the user query.\n\n"
        "You are provided with function signatures within <tools></tools> XML tags:\n"
        f"<tools>\n{signatures}\n</tools>\n\n"
        f"For function call returns, you should first print {CALLS_BEGIN}\n"
        "For each function call, you should return object like:\n"
        f"{CALL_BEGIN}function{SEP}<function_name>\n"
        "```json\n<function_arguments_in_json_format>\n```"
        f"{CALL_END}\n"
        f"At the end of function call returns, you should print {CALLS_END}"
    )


def with_tools_prompt(
    messages: list[dict[str, Any]], tools: list[dict[str, Any]]
) -> list[dict[str, Any]]:
    """`messages` with tools_prompt after the last system message's text (DeepSeek's templates keep
    only the last system message as the system prompt), or as a new first system message."""
    text = tools_prompt(tools)
    systems = [i for i, m in enumerate(messages) if m["role"] == "system"]
    if not systems:
        return [{"role": "system", "content": text}, *messages]
    out = list(messages)
    last = dict(out[systems[-1]])
    last["content"] = f"{last['content']}\n\n{text}" if last.get("content") else text
    out[systems[-1]] = last
    return out
