"""The engine-config table of docs/serving.md, generated from EngineConfig's field descriptions.

`python -m dsworker.contract.engine_config_docs` prints it (`--write docs/serving.md` puts it in the page); a unit test
checks the committed page holds exactly this text once, so a new key cannot ship undocumented.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import UnionType
from typing import Literal, Union, get_args, get_origin

from dsworker.contract.engine_config import EngineConfig

BEGIN = "<!-- engine-config-table:begin (python -m dsworker.contract.engine_config_docs) -->"
END = "<!-- engine-config-table:end -->"


def _default(name: str) -> str:
    value = EngineConfig().model_dump(mode="json")[name]
    text = json.dumps(value)
    return f"`{text}`" if len(text) <= 40 else f"`{text[:37]}...`"


def _type(annotation: object) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin in (Union, UnionType):
        return " \\| ".join("null" if a is type(None) else _type(a) for a in args)
    if origin is Literal:
        return " \\| ".join(json.dumps(a) for a in args)
    if origin is list and args:
        inner = get_args(args[0])
        return f"list of [{', '.join(a.__name__ for a in inner)}]" if inner else "list"
    return getattr(annotation, "__name__", None) or str(annotation)


def config_table() -> str:
    """Markdown table: key, type, default, meaning (in EngineConfig's field order)."""
    rows = ["| key | type | default | meaning |", "|---|---|---|---|"]
    for name, field in EngineConfig.model_fields.items():
        desc = (field.description or "").replace("|", "\\|")
        rows.append(f"| `{name}` | {_type(field.annotation)} | {_default(name)} | {desc} |")
    return "\n".join([BEGIN, *rows, END])


def write_table(path: Path) -> None:
    """Replace the page's table (first begin marker to last end marker) with the current one."""
    text = path.read_text()
    start, end = text.find(BEGIN), text.rfind(END)
    if start < 0 or end < start:
        raise SystemExit(f"{path}: no {BEGIN} ... {END} markers")
    path.write_text(text[:start] + config_table() + text[end + len(END) :])


if __name__ == "__main__":
    if sys.argv[1:2] == ["--write"] and len(sys.argv) == 3:
        write_table(Path(sys.argv[2]))
    else:
        print(config_table())
