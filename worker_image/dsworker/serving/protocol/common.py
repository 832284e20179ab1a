"""What both endpoints share: request bounds, the common fields and their sampling parameters,
response_format, and bytes -> validated request.

Unknown request fields are ignored (clients send many); known but unsupported ones are refused.
"""

from __future__ import annotations

import json
from collections.abc import Callable
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
from dsworker.serving.protocol.errors import ApiError

T = TypeVar("T", bound=BaseModel)

# Every request model's config: unknown fields ignored, known ones strict, as OpenAI's API is
# ("10" is no max_tokens, true no n, "yes" no stream): a 400 naming the field, never a guess.
REQUEST = ConfigDict(extra="ignore", strict=True)

MAX_STOP_STRINGS = 4
MAX_CHOICES = 16  # n: each choice is a sequence of its own, holding a KV slot
MAX_LOGPROBS = 20  # likeliest alternatives a request may ask for per token (vLLM's default cap)
MAX_STOP_CHARS = 256
MAX_LOGIT_BIAS = 300  # OpenAI's cap on logit_bias entries
MAX_STOP_TOKEN_IDS = 64


class StreamOptions(BaseModel):
    model_config = REQUEST
    include_usage: bool = False


class JsonSchemaFormat(BaseModel):
    """response_format.json_schema: OpenAI's named schema (`strict` is accepted; the output
    always follows the schema, with no properties it does not name, as vLLM's xgrammar does)."""

    model_config = ConfigDict(extra="ignore", strict=True, populate_by_name=True)
    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_-]+$")
    description: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """response_format: free text, any JSON object, or JSON following a schema."""

    model_config = REQUEST
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


class CommonRequest(BaseModel):
    """Fields both endpoints share."""

    model_config = REQUEST

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
    def _refuse_unsupported(self) -> CommonRequest:
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
        return grammar_or_400(lambda: fmt.spec(reasoning)) if fmt else None

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


def grammar_or_400(build: Callable[[], GrammarSpec | None]) -> GrammarSpec | None:
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
