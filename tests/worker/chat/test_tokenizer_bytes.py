"""A token's own bytes for logprobs: byte-level pieces and SentencePiece byte tokens may hold part
of a UTF-8 character, which decoding the token alone shows only as U+FFFD."""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer, models

from dsworker.chat.byte_level import BOS, BOS_ID, write_tokenizer
from dsworker.chat.tokenizer import TextTokenizer


def test_byte_level_pieces_give_their_bytes(tmp_path: Path) -> None:
    write_tokenizer(tmp_path, 300)  # one token per byte, like a synthesized checkpoint's
    tok = TextTokenizer(tmp_path)
    ids = tok.encode("é✓a", add_bos=False)
    assert len(ids) == 6
    assert b"".join(tok.token_bytes(i) for i in ids) == "é✓a".encode()
    assert tok.decode([ids[0]]) == "\ufffd" and tok.token_bytes(ids[0]) == b"\xc3"
    assert tok.token_bytes(BOS_ID) == BOS.encode() and BOS_ID in tok.special_ids


def test_byte_fallback_tokens_and_plain_words(tmp_path: Path) -> None:
    words = Tokenizer(models.WordLevel({"hello": 0, "<0xE2>": 1, "<unk>": 2}, unk_token="<unk>"))
    words.save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "config.json").write_text(json.dumps({"vocab_size": 3}))
    tok = TextTokenizer(tmp_path)
    assert tok.token_bytes(1) == b"\xe2"
    assert tok.token_bytes(0) == b"hello"
    assert tok.token_bytes(99) == b""
