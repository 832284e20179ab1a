"""The checkpoint's tokenizer, read only from JSON: tokenizer.json through the `tokenizers` package.

Never imports remote code and never unpickles: tokenizer_config.json supplies the special tokens,
whether to prepend BOS and the chat template (or chat_template.jinja beside it);
generation_config.json and config.json supply the end-of-sequence ids. Each is read as the
checkpoint's other files are: only a regular file inside the model directory (a FIFO would hang the
server's start, a symlink could read any file), as strict JSON (a key given twice is refused).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer

from dsworker.chat.byte_level import byte_alphabet
from dsworker.chat.template import pick_template
from dsworker.checkpoint.fsutil import member_file, read_regular
from dsworker.contract import strict_json
from dsworker.contract.errors import CheckpointError

_BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's byte tokens


class TokenizerError(RuntimeError):
    """The model directory has no usable tokenizer; the message names the file."""


def _read_member(d: Path, name: str) -> str | None:
    """The text of d/name, None when there is no such entry; refused unless a regular file
    inside `d`."""
    path = d / name
    if not path.exists() and not path.is_symlink():
        return None
    try:
        return read_regular(member_file(d, name, name), name).decode()
    except CheckpointError as exc:
        raise TokenizerError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise TokenizerError(f"{path}: not UTF-8 text ({exc}); re-download it") from None


def _parse_json(d: Path, name: str, text: str) -> dict[str, Any]:
    try:
        data = strict_json.loads(text)
    except strict_json.JsonError as exc:
        raise TokenizerError(f"{d / name}: {exc}; fix or re-download it") from None
    if not isinstance(data, dict):
        raise TokenizerError(f"{d / name}: not a JSON object; fix or re-download it")
    return data


def _read_json(d: Path, name: str) -> dict[str, Any]:
    """A side file's JSON object; {} when the file is absent."""
    text = _read_member(d, name)
    return {} if text is None else _parse_json(d, name, text)


def _token_text(value: Any) -> str | None:
    """Special tokens are stored as strings or as AddedToken dicts with a 'content' key."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _byte_level(decoder: dict[str, Any]) -> bool:
    """The decoder maps GPT-2's printable alphabet back to bytes (byte-level BPE)."""
    if decoder.get("type") == "ByteLevel":
        return True
    return decoder.get("type") == "Sequence" and any(
        _byte_level(d) for d in decoder.get("decoders", []) if isinstance(d, dict)
    )


def _ids(value: Any) -> set[int]:
    if isinstance(value, int):
        return {value}
    if isinstance(value, list):
        return {v for v in value if isinstance(v, int)}
    return set()


class TextTokenizer:
    """Encode/decode text and the metadata the server needs (BOS/EOS, chat template)."""

    def __init__(self, model_dir: str | Path) -> None:
        d = Path(model_dir)
        path = d / "tokenizer.json"
        text = _read_member(d, "tokenizer.json")
        if text is None:
            raise TokenizerError(f"{path}: missing; the model directory needs tokenizer.json")
        _parse_json(d, "tokenizer.json", text)  # the Rust parser keeps a repeated vocab key's last
        try:
            self._tok = Tokenizer.from_str(text)
        except Exception as exc:  # the Rust side raises its own exception type
            raise TokenizerError(f"{path}: cannot load ({exc})") from None
        cfg = _read_json(d, "tokenizer_config.json")
        gen = _read_json(d, "generation_config.json")
        model_cfg = _read_json(d, "config.json")
        self.bos_token = _token_text(cfg.get("bos_token")) or ""
        self.eos_token = _token_text(cfg.get("eos_token")) or ""
        self.bos_token_id = self._tok.token_to_id(self.bos_token) if self.bos_token else None
        self.add_bos_token = bool(cfg.get("add_bos_token", self.bos_token_id is not None))
        eos = _ids(gen.get("eos_token_id")) | _ids(model_cfg.get("eos_token_id"))
        eos_id = self._tok.token_to_id(self.eos_token) if self.eos_token else None
        if eos_id is not None:
            eos.add(eos_id)
        self.eos_token_ids: frozenset[int] = frozenset(eos)
        # Tokens `decode` leaves out of the text (skip_special_tokens).
        self.special_ids: frozenset[int] = frozenset(
            i for i, t in self._tok.get_added_tokens_decoder().items() if t.special
        )
        # DeepSeek's fill-in-the-middle markers: <begin>prefix<hole>suffix<end>, then the middle.
        fim = tuple(f"<｜fim▁{part}｜>" for part in ("begin", "hole", "end"))
        self.fim_tokens: tuple[str, ...] | None = (
            fim if all(self._tok.token_to_id(t) is not None for t in fim) else None
        )
        decoder = self._tok.decoder
        byte_level = decoder is not None and _byte_level(json.loads(decoder.__getstate__()))
        self._unbyte = {c: b for b, c in enumerate(byte_alphabet())} if byte_level else {}
        template = pick_template(cfg.get("chat_template"))
        if template is None:
            template = _read_member(d, "chat_template.jinja")
        self.chat_template: str | None = template
        # Prompt token ids must index the model's embedding, whatever the tokenizer knows.
        self.vocab_size = int(
            model_cfg.get("vocab_size") or self._tok.get_vocab_size(with_added_tokens=True)
        )

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of `text`; BOS first when the model wants it and `add_bos` (plain prompts).

        encode_batch releases the GIL while it works (encode does not), so a long prompt
        tokenized on a worker thread does not stall the server's event loop."""
        ids = self._tok.encode_batch([text], add_special_tokens=False)[0].ids
        if (
            add_bos
            and self.add_bos_token
            and self.bos_token_id is not None
            and (not ids or ids[0] != self.bos_token_id)
        ):
            ids = [self.bos_token_id, *ids]
        return ids

    def token_bytes(self, token: int) -> bytes:
        """The token's own bytes (logprobs' `bytes`): a byte-level piece may be part of a UTF-8
        character, which decoding it alone can only show as U+FFFD."""
        piece = self._tok.id_to_token(token)
        if piece is None:
            return b""
        if token not in self.special_ids:
            if self._unbyte and all(c in self._unbyte for c in piece):
                return bytes(self._unbyte[c] for c in piece)
            if m := _BYTE_FALLBACK.fullmatch(piece):
                return bytes([int(m.group(1), 16)])
        return self.decode([token], skip_special_tokens=False).encode()

    def marked_special(self, texts: Iterable[str]) -> list[str]:
        """Those of `texts` that are special tokens here, which decoding leaves out of the text."""
        return [t for t in texts if self._tok.token_to_id(t) in self.special_ids]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)
