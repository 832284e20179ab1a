"""OpenAI-compatible request validation and response shapes, without any I/O.

Requests are parsed by pydantic models with bounds; everything a client can get wrong becomes an
`ApiError` whose JSON body is OpenAI's {"error": {message, type, param, code}}, so SDKs show it.
Modules: `errors` (ApiError), `common` (shared fields, response_format, parsing), `completions`,
`chat`, `limits` (prompt and max_tokens bounds), `responses` (choices, usage, Reply).
"""

from dsworker.serving.protocol.chat import ChatCompletionRequest, ChatMessage, Tool
from dsworker.serving.protocol.common import CommonRequest, parse_request
from dsworker.serving.protocol.completions import CompletionRequest
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.protocol.limits import Limits, check_prompt_ids, resolve_max_tokens
from dsworker.serving.protocol.responses import Reply, choice, usage

__all__ = [
    "ApiError",
    "ChatCompletionRequest",
    "ChatMessage",
    "CommonRequest",
    "CompletionRequest",
    "Limits",
    "Reply",
    "Tool",
    "check_prompt_ids",
    "choice",
    "parse_request",
    "resolve_max_tokens",
    "usage",
]
