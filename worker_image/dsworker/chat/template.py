"""Render chat messages into a prompt with the model's Jinja chat template, sandboxed.

Templates come from checkpoint files, so they run in Jinja's immutable sandbox (no attribute
access to Python internals, no mutation of arguments). The environment mirrors what HuggingFace
templates expect (trim_blocks, lstrip_blocks, loop controls, raise_exception, tojson).
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.meta
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dsworker.chat.tool_calls import with_tools_prompt

# Used when the checkpoint ships no chat template: the DeepSeek-V2-Chat plain-text format.
DEFAULT_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'user' %}{{ 'User: ' + message['content'] + '\n\n' }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ 'Assistant: ' + message['content'] + eos_token }}"
    "{% else %}{{ raise_exception('unsupported role ' + message['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)


class ChatTemplateError(ValueError):
    """The template refused the conversation or failed to render; a client-side (400) error."""


def _raise(message: str) -> None:
    raise ChatTemplateError(message)


def _tojson(value: Any, indent: int | None = None, ensure_ascii: bool = False) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _environment() -> ImmutableSandboxedEnvironment:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=["jinja2.ext.loopcontrols"]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = _strftime_now
    return env


@lru_cache(maxsize=8)
def _compile(template: str) -> jinja2.Template:
    try:
        return _environment().from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from None


@lru_cache(maxsize=8)
def template_reads(template: str | None, name: str) -> bool:
    """Whether the template (None: the default one) reads the variable `name`, e.g. `tools`:
    DeepSeek-V3's template renders tool calls and outputs but never the offered tools."""
    env = _environment()
    try:
        ast = env.parse(template or DEFAULT_CHAT_TEMPLATE)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"chat template does not parse: {exc}") from None
    return name in jinja2.meta.find_undeclared_variables(ast)


def render_chat(
    messages: list[dict[str, Any]],
    template: str | None = None,
    *,
    bos_token: str = "",
    eos_token: str = "",
    add_generation_prompt: bool = True,
    tools: list[dict[str, Any]] | None = None,
    **extra: Any,
) -> str:
    """The prompt text for `messages` (dicts with role and string content, and the tool fields
    OpenAI's messages may carry); `extra` are further template variables.

    `tools` (OpenAI tool objects) go to the template as `tools`; a template that does not read
    them gets them in the system prompt instead (dsworker.chat.tool_calls.with_tools_prompt)."""
    tpl = _compile(template or DEFAULT_CHAT_TEMPLATE)
    if tools:
        extra["tools"] = tools
        if not template_reads(template, "tools"):
            messages = with_tools_prompt(messages, tools)
    try:
        return tpl.render(
            messages=messages,
            bos_token=bos_token,
            eos_token=eos_token,
            add_generation_prompt=add_generation_prompt,
            **extra,
        )
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:  # includes sandbox SecurityError
        raise ChatTemplateError(f"chat template failed: {exc}") from None
    except (TypeError, ValueError, KeyError, IndexError) as exc:
        raise ChatTemplateError(f"chat template failed on these messages: {exc}") from None


def pick_template(value: Any) -> str | None:
    """tokenizer_config.json's chat_template: a string, or a list of named ones ('default')."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        named = {t.get("name"): t.get("template") for t in value if isinstance(t, dict)}
        chosen = named.get("default")
        return chosen if isinstance(chosen, str) else None
    return None
