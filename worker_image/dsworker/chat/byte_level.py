"""A small, valid byte-level tokenizer for synthesized checkpoints.

Synthesized checkpoints must be loadable end to end (transformers' AutoTokenizer, our server's chat
template), so they ship a real tokenizer.json: byte-level BPE with the 256 byte tokens and no merges
(every text encodes, one token per byte), DeepSeek-style special tokens and a chat template.
"""

from __future__ import annotations

import json
from pathlib import Path

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
PAD = "<｜pad▁of▁sentence｜>"
SPECIALS = [BOS, EOS, USER, ASSISTANT, PAD]
BOS_ID, EOS_ID = 0, 1
MIN_VOCAB = 256 + len(SPECIALS)

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{{ message['content'] }}"
    "{% elif message['role'] == 'user' %}{{ '" + USER + "' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}"
    "{{ '" + ASSISTANT + "' + message['content'] + eos_token }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '" + ASSISTANT + "' }}{% endif %}"
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
