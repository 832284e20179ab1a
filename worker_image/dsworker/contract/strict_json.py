"""JSON input read strictly: a key given twice is refused, not last-one-wins; depth cannot crash us.

Two values under one key (a safetensors header listing a tensor twice, an index mapping a name to
two files) are ambiguous: whoever reads the file next may pick the other one. Nesting deep enough
to exhaust the parser's recursion becomes an error message, not a RecursionError.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any


class JsonError(ValueError):
    """Input that is not strict JSON; the message says why, `key` names the key at fault if any."""

    def __init__(self, message: str, key: str = "") -> None:
        super().__init__(message)
        self.key = key


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise JsonError(f"duplicate key {key!r}", key)
        out[key] = value
    return out


def loads(raw: str | bytes) -> Any:
    """json.loads, refusing duplicate keys and turning every failure into a JsonError."""
    try:
        return json.loads(raw, object_pairs_hook=_no_duplicates)
    except RecursionError:
        key = _top_key_too_deep(raw.decode(errors="replace") if isinstance(raw, bytes) else raw)
        where = f"{key} " if key else ""
        raise JsonError(f"{where}nested too deeply to parse", key or "") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise JsonError(f"not valid JSON ({e})") from None


def _top_key_too_deep(text: str, limit: int = 64) -> str | None:
    """The top-level key under which `text` nests deeper than `limit`: a scan, no recursion."""
    depth, key, last, i = 0, None, None, 0
    while i < len(text):
        c = text[i]
        if c == '"':
            j = i + 1
            while j < len(text) and text[j] != '"':
                j += 2 if text[j] == "\\" else 1
            last, i = text[i + 1 : j], j + 1
            continue
        if c in "{[":
            depth += 1
            if depth > limit:
                return key
        elif c in "}]":
            depth -= 1
        elif c == ":" and depth == 1:
            key = last
        i += 1
    return None


def too_deep(obj: Any, limit: int) -> str | None:
    """The dotted path of the first value nested deeper than `limit`, else None; no recursion,
    so depth itself cannot crash the check."""
    stack: list[tuple[Any, str, int]] = [(obj, "", 0)]
    while stack:
        value, path, depth = stack.pop()
        if depth > limit:
            return path
        if isinstance(value, Mapping):
            stack.extend(
                (v, f"{path}.{k}" if path else str(k), depth + 1) for k, v in value.items()
            )
        elif isinstance(value, list):
            stack.extend((v, f"{path}[{i}]", depth + 1) for i, v in enumerate(value))
    return None
