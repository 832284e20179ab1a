"""POST /v1/chat/completions' request: messages, offered tools, tool_choice and chat logprobs."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, Field, field_validator, model_validator

from dsworker.chat import grammar_spec
from dsworker.chat.grammar_spec import GrammarSpec
from dsworker.serving.protocol.common import (
    MAX_LOGPROBS,
    REQUEST,
    CommonRequest,
    grammar_or_400,
)
from dsworker.serving.protocol.errors import ApiError

MAX_TOOLS = 128  # OpenAI's cap on a request's tools
MAX_TOOL_NAME = 64  # OpenAI's cap on a function name's length


class ContentPart(BaseModel):
    model_config = REQUEST
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """A call in an earlier assistant message; `arguments` is JSON text, as OpenAI sends it."""

    model_config = REQUEST
    name: str = Field(min_length=1)
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _object_as_text(cls, v: Any) -> Any:
        """Some clients send the arguments as an object; templates concatenate text."""
        return json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v


class MessageToolCall(BaseModel):
    model_config = REQUEST
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FunctionDefinition(BaseModel):
    model_config = REQUEST
    name: str = Field(
        min_length=1,
        max_length=MAX_TOOL_NAME,
        pattern=r"^[^\s`]+$",
        description="No whitespace or backticks: the model writes the name in its call markup.",
    )
    description: str | None = None
    parameters: dict[str, Any] | None = None
    strict: bool | None = None


class Tool(BaseModel):
    """One offered function (OpenAI's `tools` entry)."""

    model_config = REQUEST
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    model_config = REQUEST
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[MessageToolCall] | None = None
    tool_call_id: str | None = None

    @model_validator(mode="after")
    def _calls_are_the_assistants(self) -> ChatMessage:
        if self.tool_calls and self.role != "assistant":
            raise ValueError(f"tool_calls belong to assistant messages, not {self.role}")
        return self

    def text(self) -> str:
        """The message's text; only text parts are supported."""
        if self.content is None or isinstance(self.content, str):
            return self.content or ""
        out = []
        for part in self.content:
            if part.type != "text" or part.text is None:
                raise ApiError(
                    f"content part type {part.type!r} is not supported (text only)",
                    param="messages",
                )
            out.append(part.text)
        return "".join(out)


class ChatCompletionRequest(CommonRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_LOGPROBS)
    tools: list[Tool] | None = Field(None, max_length=MAX_TOOLS)
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool = Field(True, description="false: at most one call is returned.")

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatCompletionRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    @field_validator("tool_choice")
    @classmethod
    def _known_choice(cls, v: str | dict[str, Any] | None) -> str | dict[str, Any] | None:
        if v in (None, "none", "auto", "required"):
            return v
        if isinstance(v, dict):
            function = v.get("function")
            name = function.get("name") if isinstance(function, dict) else None
            if v.get("type") != "function" or not isinstance(name, str) or not name:
                raise ValueError(
                    'a named tool_choice is {"type": "function", "function": {"name": ...}}'
                )
            return v
        raise ValueError(f'{v!r} is not one of "none", "auto", "required" or a named function')

    @property
    def forced_function(self) -> str | None:
        """The function a named tool_choice forces."""
        return self.tool_choice["function"]["name"] if isinstance(self.tool_choice, dict) else None

    def chat_grammar_spec(self, tools: list[dict[str, Any]], reasoning: bool) -> GrammarSpec | None:
        """What the answer must follow: the response_format, or with tool_choice "required" or
        a named function (and `tools`, the offered ones) DeepSeek-V3's call markup."""
        forced = self.tool_choice == "required" or self.forced_function is not None
        if not (forced and tools):
            return self.grammar_spec(reasoning)
        if self.response_format is not None and self.response_format.type != "text":
            raise ApiError(
                f"response_format {self.response_format.type} cannot be combined with a "
                f"tool_choice that forces a call ({json.dumps(self.tool_choice)})",
                param="response_format",
            )
        return grammar_or_400(
            lambda: grammar_spec.forced_tool_calls(
                tools, self.forced_function, self.parallel_tool_calls, reasoning
            )
        )

    def logprob_count(self) -> int | None:
        return (self.top_logprobs or 0) if self.logprobs else None

    def offered_tools(self, parser: str | None) -> list[dict[str, Any]]:
        """The tools to put before the model (OpenAI tool objects): none with tool_choice
        "none"; refuses tools when the server's tool call parser is off (`parser` None)."""
        if self.tool_choice == "none":
            return []
        if not self.tools:
            if self.tool_choice is not None:
                raise ApiError(f"tool_choice {self.tool_choice!r} needs tools", param="tool_choice")
            return []
        if parser is None:
            raise ApiError(
                "tools are not supported: this server's tool call parser is off; enable it "
                "with toolCallParser: deepseek_v3 in the engine config "
                "(spec.serving.toolCallParser of the DeepSeekDeployment)",
                param="tools",
            )
        return [t.model_dump(exclude_none=True) for t in self.tools]

    def template_messages(self) -> list[dict[str, Any]]:
        """Messages as the chat template sees them ('developer' is OpenAI's newer 'system').

        An assistant message's tool_calls and a tool message's tool_call_id pass through; an
        assistant message with tool_calls and no text gets content None, which DeepSeek's
        template tests for before it renders the calls."""
        out: list[dict[str, Any]] = []
        for m in self.messages:
            msg: dict[str, Any] = {
                "role": "system" if m.role == "developer" else m.role,
                "content": m.text(),
            }
            if m.tool_calls:
                msg["tool_calls"] = [c.template_dict() for c in m.tool_calls]
                msg["content"] = msg["content"] or None
            if m.tool_call_id is not None:
                msg["tool_call_id"] = m.tool_call_id
            out.append(msg)
        return out
