"""A small, valid byte-level tokenizer for synthesized checkpoints.

Synthesized checkpoints must be loadable end to end (transformers' AutoTokenizer, our server's chat
template), so they ship a real tokenizer.json: byte-level BPE with the 256 byte tokens and no merges
(every text encodes, one token per byte), DeepSeek-style special tokens and a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

from dsworker.chat.tool_calls import (
    CALL_BEGIN,
    CALL_END,
    CALLS_BEGIN,
    CALLS_END,
    OUTPUT_BEGIN,
    OUTPUT_END,
    OUTPUTS_BEGIN,
    OUTPUTS_END,
    SEP,
)

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜pad▁of▁sentence｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT, PAD]
BOS_ID, EOS_ID = 0, 1
MIN_VOCAB = 256 + len(SPECIALS)

# DeepSeek-V3/R1's chat format (the markers and their order are those of the real template,
# whose shape dsworker.chat.tool_calls parses): the last system message is the system prompt; an
# assistant turn with tool_calls writes them in the call markup (its content may be None); tool
# outputs are grouped in one block, and the turn after them follows the block's end directly,
# without <｜Assistant｜>, as the model wrote its answer there. R1's reasoning (up to </think>)
# is left out of earlier turns.
CHAT_TEMPLATE = (
    "{% set ns = namespace(system='', tool=false) %}"
    "{% for m in messages %}{% if m['role'] == 'system' %}{% set ns.system = m['content'] %}"
    "{% endif %}{% endfor %}"
    "{{ bos_token }}{{ ns.system or '' }}"
    "{% for m in messages %}"
    "{% if m['role'] == 'user' %}"
    "{% if ns.tool %}{{ '" + OUTPUTS_END + "' }}{% set ns.tool = false %}{% endif %}"
    "{{ '" + USER + "' + m['content'] }}"
    "{% elif m['role'] == 'assistant' %}"
    "{% if ns.tool %}{{ '" + OUTPUTS_END + "' }}{% set ns.tool = false %}"
    "{% else %}{{ '" + ASSISTANT + "' }}{% endif %}"
    "{% set text = m['content'] or '' %}"
    "{% if '</think>' in text %}{% set text = text.split('</think>')[-1] %}{% endif %}"
    "{{ text }}"
    "{% if m['tool_calls'] %}{{ '" + CALLS_BEGIN + "' }}"
    "{% for c in m['tool_calls'] %}{% if not loop.first %}{{ '\\n' }}{% endif %}"
    "{{ '" + CALL_BEGIN + "' + (c['type'] | default('function')) + '" + SEP + "' }}"
    "{{ c['function']['name'] + '\\n```json\\n' + c['function']['arguments'] }}"
    "{{ '\\n```" + CALL_END + "' }}"
    "{% endfor %}{{ '" + CALLS_END + "' }}{% endif %}"
    "{{ eos_token }}"
    "{% elif m['role'] == 'tool' %}"
    "{% if ns.tool %}{{ '\\n' }}{% else %}{{ '" + OUTPUTS_BEGIN + "' }}"
    "{% set ns.tool = true %}{% endif %}"
    "{{ '" + OUTPUT_BEGIN + "' + m['content'] + '" + OUTPUT_END + "' }}"
    "{% elif m['role'] != 'system' %}{{ raise_exception('unsupported role ' + m['role']) }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if ns.tool %}{{ '" + OUTPUTS_END + "' }}"
    "{% elif add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
)


def byte_alphabet() -> list[str]:
    """The byte-level BPE alphabet (GPT-2's byte -> printable character map) in byte order.

    tokenizers' ByteLevel.alphabet() returns a set in arbitrary order; ids must not depend on it.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    mapping: dict[int, str] = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return [mapping[b] for b in range(256)]


def write_tokenizer(out_dir: Path, vocab_size: int) -> None:
    """Write tokenizer.json and tokenizer_config.json; the model's vocab must hold MIN_VOCAB ids."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    if vocab_size < MIN_VOCAB:
        raise ValueError(f"vocab_size {vocab_size} < {MIN_VOCAB} (256 bytes + special tokens)")
    vocab = {tok: i for i, tok in enumerate(SPECIALS)}
    for ch in byte_alphabet():
        vocab[ch] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(s, special=True, normalized=False) for s in SPECIALS])
    tok.save(str(out_dir / "tokenizer.json"))
    cfg = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 16384,
        "chat_template": CHAT_TEMPLATE,
    }
    (out_dir / "tokenizer_config.json").write_text(
        json.dumps(cfg, indent=2, ensure_ascii=False) + "\n"
    )
