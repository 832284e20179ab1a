"""Chat templates render as transformers renders them, inside the sandbox; plus the docs table."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from dsworker.chat.template import (
    DEFAULT_CHAT_TEMPLATE,
    ChatTemplateError,
    pick_template,
    render_chat,
)
from dsworker.contract.engine_config_docs import config_table
from dsworker.serving.protocol import ApiError, ChatCompletionRequest, parse_request

BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"

# A DeepSeek-V3-style template (written for this test) that uses the features real templates do:
# namespace, loop controls, raise_exception, tojson, whitespace control.
DEEPSEEK_LIKE = (
    "{% if not add_generation_prompt is defined %}"
    "{% set add_generation_prompt = false %}{% endif %}"
    "{% set ns = namespace(system='') %}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'system' %}{% set ns.system = message['content'] %}{% continue %}"
    "{%- endif %}{%- endfor %}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' %}"
    "{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{%- elif message['role'] != 'system' %}"
    "{{ raise_exception('role ' + message['role'] + ' is not supported') }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
    "{# meta: {{ messages | length | tojson }} #}"
)

CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4"},
    {"role": "user", "content": "And 3+3? ✓"},
]


@pytest.mark.parametrize("template", [DEEPSEEK_LIKE, DEFAULT_CHAT_TEMPLATE])
@pytest.mark.parametrize("generation_prompt", [True, False])
def test_renders_like_transformers(template: str, generation_prompt: bool) -> None:
    from transformers.utils.chat_template_utils import render_jinja_template

    ours = render_chat(
        CONVERSATION, template, bos_token=BOS, eos_token=EOS,
        add_generation_prompt=generation_prompt,
    )  # fmt: skip
    theirs = render_jinja_template(
        [CONVERSATION], chat_template=template, bos_token=BOS, eos_token=EOS,
        add_generation_prompt=generation_prompt,
    )  # fmt: skip
    theirs = theirs[0][0] if isinstance(theirs, tuple) else theirs
    assert ours == theirs


def test_default_template_is_the_documented_plain_format() -> None:
    text = render_chat(CONVERSATION[:2], None, bos_token="<s>", eos_token="</s>")
    assert text == "<s>You are terse.\n\nUser: 2+2?\n\nAssistant:"


def test_template_errors_are_client_errors() -> None:
    with pytest.raises(ChatTemplateError, match="role tool is not supported"):
        render_chat([{"role": "tool", "content": "x"}], DEEPSEEK_LIKE)
    with pytest.raises(ChatTemplateError, match="does not parse"):
        render_chat(CONVERSATION, "{% for %}")


def test_sandbox_blocks_python_internals() -> None:
    evil = "{{ messages.__class__.__mro__[1].__subclasses__() }}"
    with pytest.raises(ChatTemplateError):
        render_chat(CONVERSATION, evil)
    mutate = "{{ messages.append(1) }}"
    with pytest.raises(ChatTemplateError):
        render_chat(CONVERSATION, mutate)


def test_pick_template_handles_named_lists() -> None:
    assert pick_template("x") == "x"
    assert pick_template([{"name": "tool_use", "template": "t"}, {"name": "default",
                          "template": "d"}]) == "d"  # fmt: skip
    assert pick_template(None) is None


def test_chat_messages_flatten_text_parts_and_refuse_images() -> None:
    raw = json.dumps(
        {"messages": [{"role": "developer", "content": [{"type": "text", "text": "a"},
                                                        {"type": "text", "text": "b"}]}]}
    ).encode()  # fmt: skip
    req = parse_request(ChatCompletionRequest, raw)
    assert req.template_messages() == [{"role": "system", "content": "ab"}]
    raw = json.dumps(
        {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}
    ).encode()
    with pytest.raises(ApiError, match="image_url"):
        parse_request(ChatCompletionRequest, raw).template_messages()


def test_docs_hold_the_generated_engine_config_table() -> None:
    docs = Path(__file__).resolve().parents[3] / "docs" / "serving.md"
    text = docs.read_text()
    assert config_table() in text and text.count("engine-config-table:") == 2, (
        "docs/serving.md is out of date: run `python -m dsworker.contract.engine_config_docs --write docs/serving.md`"
    )
