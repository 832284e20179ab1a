"""The word-level vocabulary the HTTP tests serve, as a model directory's tokenizer files (no
torch: the serving room's own tests need none)."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from dsworker.chat.tool_calls import CALL_BEGIN, CALL_END, CALLS_BEGIN, CALLS_END, SEP

FIM = ["<｜fim▁begin｜>", "<｜fim▁hole｜>", "<｜fim▁end｜>"]
# After "go" the counting model writes a DeepSeek-V3 tool call, then wraps round to <s> and EOS.
CALL_WORDS = ["go", CALLS_BEGIN, CALL_BEGIN, "function", SEP, "get_weather", "\n```json\n",
              '{"city":', '"Paris"}', "\n```", CALL_END, CALLS_END]  # fmt: skip
WORDS = ["<s>", "</s>", "User:", "Assistant:", *[f"w{i}" for i in range(60)], "</think>", "a1", "a2",
         *FIM, *CALL_WORDS]  # fmt: skip
EOS_ID = 1
WEATHER_TOOL = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}  # fmt: skip


def write_model_dir(d: Path, chat_template: str | None = None) -> Path:
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="</s>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.add_special_tokens(["<s>", "</s>", *FIM])
    tok.save(str(d / "tokenizer.json"))
    cfg = {"bos_token": "<s>", "eos_token": "</s>", "add_bos_token": True}
    if chat_template:
        cfg["chat_template"] = chat_template
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "config.json").write_text(json.dumps({"vocab_size": len(WORDS), "eos_token_id": EOS_ID}))
    return d
