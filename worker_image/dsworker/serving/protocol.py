"""OpenAI-compatible request validation and response shapes, without any I/O.

Requests are parsed by pydantic models with bounds; everything a client can get wrong becomes an
`ApiError` whose JSON body is OpenAI's {"error": {message, type, param, code}}, so SDKs show it.
Unknown request fields are ignored (clients send many); known but unsupported ones are refused.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    field_validator,
    model_validator,
)

from dsworker.chat import grammar_spec
from dsworker.chat.grammar_spec import GrammarError, GrammarSpec
from dsworker.engine.requests import SamplingParams

T = TypeVar("T", bound=BaseModel)

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n: each choice is a sequence of its own, holding a KV slot
MAX_LOGPROBS = 20  # likeliest alternatives a request may ask for per token (vLLM's default cap)
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries
MAX_STOP_TOKEN_IDS = 64
MAX_TOOLS = 128  # OpenAI's cap on a request's tools
MAX_TOOL_NAME = 64  # OpenAI's cap on a function name's length


class ApiError(Exception):
    """An error answered to the client in OpenAI's shape."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's named schema (`strict` is accepted; the output
    always follows the schema, with no properties it does not name, as vLLM's xgrammar does)."""

    model_config = ConfigDict(extra="ignore", populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: free text, any JSON object, or JSON following a schema."""

    model_config = ConfigDict(extra="ignore")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_with_its_type(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs json_schema: {"name": ..., "schema": ...}')
        return self

    def spec(self, reasoning: bool = False) -> GrammarSpec | None:
        """The grammar the output follows (with `reasoning`, the answer after R1's thinking);
        None for text."""
        if self.type == "json_object":
            return grammar_spec.json_object(reasoning=reasoning)
        if self.type == "json_schema":
            assert self.json_schema is not None
            return grammar_spec.json_schema(self.json_schema.schema_, reasoning=reasoning)
        return None


class _Common(BaseModel):
    """Fields both endpoints share."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(
        0, ge=-1, description="Extension: keep the k most likely tokens; 0 or -1 (vLLM's) = off."
    )
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="Choices, each its own sequence.")
    ignore_eos: bool = Field(False, description="Extension: generate past end-of-sequence.")
    min_tokens: int = Field(
        0,
        ge=0,
        description="Extension (vLLM's): no end-of-sequence or stop_token_ids token before this "
        "many tokens (stop strings still apply).",
    )
    stop_token_ids: list[int] = Field(
        default_factory=list,
        max_length=MAX_STOP_TOKEN_IDS,
        description="Extension (vLLM's): token ids that end the sequence like EOS, kept out of "
        "the text.",
    )
    return_token_ids: bool = Field(False, description="Extension: add token_ids to choices.")
    presence_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    frequency_penalty: float = Field(0.0, ge=-2.0, le=2.0)
    user: str | None = None
    logit_bias: dict[str, float] | None = Field(
        None, description="Token id (as a string) -> -100..100 added to its logit before sampling."
    )
    response_format: ResponseFormat | None = Field(
        None, description="json_object or json_schema: guided decoding (vLLM takes it on both)."
    )

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        """OpenAI's fields are nullable and SDKs send null for "not set": use the default."""
        if isinstance(data, dict):
            return {k: v for k, v in data.items() if v is not None}
        return data

    @field_validator("logit_bias")
    @classmethod
    def _bias(cls, v: dict[str, float] | None) -> dict[str, float] | None:
        if v is None:
            return v
        if len(v) > MAX_LOGIT_BIAS:
            raise ValueError(f"at most {MAX_LOGIT_BIAS} entries")
        for key, bias in v.items():
            if not (key.isascii() and key.isdigit() and len(key) <= 10):
                raise ValueError(f"key {key[:20]!r} is not a token id")
            if not -100 <= bias <= 100:
                raise ValueError(f"bias {bias} of token {key} is outside -100..100")
        return v

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> _Common:
        if self.stream_options is not None and not self.stream:
            raise ValueError("stream_options needs stream: true")
        return self

    @field_validator("stop")
    @classmethod
    def _stop(cls, v: str | list[str] | None) -> str | list[str] | None:
        items = [v] if isinstance(v, str) else (v or [])
        if len(items) > MAX_STOP_STRINGS:
            raise ValueError(f"at most {MAX_STOP_STRINGS} stop sequences")
        if any(not s or len(s) > MAX_STOP_CHARS for s in items):
            raise ValueError(f"stop sequences must be 1..{MAX_STOP_CHARS} characters")
        return v

    @property
    def stop_list(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def _bias_by_token(self) -> dict[int, float]:
        """logit_bias by token id; keys naming one id ("9", "09") add up."""
        out: dict[int, float] = {}
        for key, bias in (self.logit_bias or {}).items():
            out[int(key)] = out.get(int(key), 0.0) + bias
        return out

    def logprob_count(self) -> int | None:
        """None: no logprobs; k: each token's logprob and its k likeliest alternatives."""
        return None

    def prompt_logprob_count(self) -> int | None:
        """The same for the prompt's tokens (completions' echo)."""
        return None

    def grammar_spec(self, reasoning: bool = False) -> GrammarSpec | None:
        """What the output must follow (guided decoding), or None for free text; with
        `reasoning` (R1's parser on a chat), the answer after the thinking does."""
        fmt = self.response_format
        return _spec(lambda: fmt.spec(reasoning)) if fmt else None

    def sampling(self) -> SamplingParams:
        return SamplingParams(
            temperature=self.temperature,
            top_p=self.top_p,
            top_k=max(self.top_k, 0),
            seed=self.seed,
            presence_penalty=self.presence_penalty,
            frequency_penalty=self.frequency_penalty,
            logit_bias=tuple(self._bias_by_token().items()),
        )


class CompletionRequest(_Common):
    """POST /v1/completions: one prompt, as text or as token ids."""

    prompt: str | list[int] | list[str] | list[list[int]]
    logprobs: int | None = Field(
        None, ge=0, le=MAX_LOGPROBS, description="Each token's logprob and this many likeliest."
    )
    echo: bool = Field(
        False, description="Prefix each choice with its prompt (and the prompt's logprobs)."
    )
    suffix: str | None = Field(
        None,
        description="Fill in the middle: the text after the completion (models with FIM tokens).",
    )
    best_of: int | None = Field(None, ge=1, le=1)

    @model_validator(mode="after")
    def _suffix_with_text(self) -> CompletionRequest:
        if self.suffix is not None and self.echo:
            raise ValueError("suffix and echo cannot be combined")
        return self

    def logprob_count(self) -> int | None:
        return self.logprobs

    def prompt_logprob_count(self) -> int | None:
        return self.logprobs if self.echo else None

    def prompts(self) -> list[str | list[int]]:
        """The prompts: one string or id list, or a batch of them (each gets n choices)."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise ApiError("prompt must not be empty", param="prompt")
        if all(isinstance(x, int) for x in p):
            return [list(p)]  # type: ignore[arg-type]
        if len(p) * self.n > MAX_CHOICES:
            raise ApiError(
                f"{len(p)} prompts x n {self.n} is more than {MAX_CHOICES} choices; split the "
                "batch",
                param="prompt",
            )
        return list(p)  # type: ignore[arg-type]


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore")
    type: str
    text: str | None = None


class FunctionCall(BaseModel):
    """A call in an earlier assistant message; `arguments` is JSON text, as OpenAI sends it."""

    model_config = ConfigDict(extra="ignore")
    name: str = Field(min_length=1)
    arguments: str = "{}"

    @field_validator("arguments", mode="before")
    @classmethod
    def _object_as_text(cls, v: Any) -> Any:
        """Some clients send the arguments as an object; templates concatenate text."""
        return json.dumps(v, ensure_ascii=False) if isinstance(v, dict) else v


class MessageToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall

    def template_dict(self) -> dict[str, Any]:
        return self.model_dump(exclude_none=True)


class FunctionDefinition(BaseModel):
    model_config = ConfigDict(extra="ignore")
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

    model_config = ConfigDict(extra="ignore")
    type: Literal["function"]
    function: FunctionDefinition


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")
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


class ChatCompletionRequest(_Common):
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
        return _spec(
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


def _spec(build: Callable[[], GrammarSpec | None]) -> GrammarSpec | None:
    """A grammar spec, its errors as 400s naming the field."""
    try:
        return build()
    except GrammarError as exc:
        raise ApiError(exc.message, param=exc.param) from None


def parse_request(model: type[T], raw: bytes) -> T:
    """Bytes -> validated request, or an ApiError naming the first bad field."""
    try:
        data = json.loads(raw)
        # A \ud800 escape is valid JSON but no text: the tokenizer could not take it.
        json.dumps(data, ensure_ascii=False).encode("utf-8")
    except (ValueError, RecursionError) as exc:  # JSON, UTF-8, digit-limit and nesting errors
        raise ApiError(f"request body is not valid JSON text: {exc}") from None
    if not isinstance(data, dict):
        raise ApiError("request body must be a JSON object")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        err = exc.errors()[0]
        loc = ".".join(str(p) for p in err["loc"])
        param = str(err["loc"][0]) if err["loc"] else None
        raise ApiError(f"{loc}: {err['msg']}" if loc else err["msg"], param=param) from None


@dataclass(frozen=True)
class Limits:
    """The serving bounds of the engine config that requests are checked against."""

    max_input_tokens: int
    max_seq_len: int
    max_new_tokens: int
    truncation: bool
    vocab_size: int


def check_prompt_ids(ids: list[int], limits: Limits) -> list[int]:
    """Refuse bad ids and over-long prompts, or keep the last max_input_tokens when truncating."""
    if not ids:
        raise ApiError("prompt is empty after tokenization", param="prompt")
    bad = [t for t in ids if not 0 <= t < limits.vocab_size]
    if bad:
        raise ApiError(
            f"token ids {bad[:5]} are outside the vocabulary [0, {limits.vocab_size})",
            param="prompt",
        )
    if len(ids) > limits.max_input_tokens:
        if not limits.truncation:
            raise ApiError(
                f"prompt has {len(ids)} tokens, more than maxInputTokenLen "
                f"({limits.max_input_tokens}); shorten it",
                param="prompt",
                code="context_length_exceeded",
            )
        ids = ids[-limits.max_input_tokens :]
    return ids


def resolve_max_tokens(requested: int | None, default: int, prompt_len: int, limits: Limits) -> int:
    """The request's token budget: bounded by maxNewTokens, clipped to the room under maxSeqLen."""
    if requested is not None and requested > limits.max_new_tokens:
        raise ApiError(
            f"max_tokens {requested} exceeds this server's limit {limits.max_new_tokens}",
            param="max_tokens",
        )
    want = requested if requested is not None else min(default, limits.max_new_tokens)
    return max(1, min(want, limits.max_seq_len - prompt_len))


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def choice(
    index: int,
    key: str,
    value: Any,
    finish_reason: str | None,
    token_ids: list[int] | None = None,
    logprobs: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One choice: `key` is "text" (completions), "message" (chat) or "delta" (chat chunks)."""
    out: dict[str, Any] = {
        "index": index,
        key: value,
        "logprobs": logprobs,
        "finish_reason": finish_reason,
    }
    if token_ids is not None:
        out["token_ids"] = token_ids
    return out


@dataclass(frozen=True)
class Reply:
    """What every body of one response shares (a stream's chunks alike): id, object, model,
    and one creation time."""

    id: str
    object: str
    model: str
    created: int

    @classmethod
    def new(cls, prefix: str, obj: str, model: str) -> Reply:
        return cls(f"{prefix}-{uuid.uuid4().hex[:24]}", obj, model, int(time.time()))

    def body(
        self, choices: list[dict[str, Any]], tokens: tuple[int, int] | None = None
    ) -> dict[str, Any]:
        """A response or stream chunk; `tokens` (prompt, completion) adds usage."""
        out: dict[str, Any] = {
            "id": self.id,
            "object": self.object,
            "created": self.created,
            "model": self.model,
            "choices": choices,
        }
        if tokens is not None:
            out["usage"] = usage(*tokens)
        return out

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        """The last stream chunk when stream_options.include_usage asks for it: no choices."""
        return self.body([], (prompt_tokens, completion_tokens))
