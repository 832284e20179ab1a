"""Generates docs/api-reference.md, the DeepSeekDeployment field reference, from the API models.

`python -m deepseek_operator.generators.docs` writes the file; `--check` exits 1 when it is stale. The field
tables come from the same structural schema the CRD is generated from (names, types, defaults,
enums, bounds, descriptions), and the rules from each model's `__rules__`, so the reference can
never disagree with what the API server and the operator enforce.
"""

from __future__ import annotations

import argparse
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from ..api import (
    API_VERSION,
    CONDITION_TYPES,
    KIND,
    PHASES,
    PLURAL,
    SHORT_NAMES,
    DeepSeekDeployment,
)
from . import crd

DEFAULT_OUTPUT = crd.REPO / "docs" / "api-reference.md"
HEADER = (
    "<!-- Generated from operator/deepseek_operator/api by `python -m deepseek_operator.generators.docs`.\n"
    "     Do not edit: change the models and regenerate. -->\n"
)

MINIMAL_EXAMPLE = f"""
apiVersion: {API_VERSION}
kind: {KIND}
metadata:
  name: deepseek-r1
  namespace: llm
spec:
  model:
    source:
      pvc:
        claimName: models
        path: DeepSeek-R1
  sharding:
    store:
      pvc:
        storageClassName: nfs-rwx
        size: 1500Gi
"""


@dataclass
class Section:
    """One object of the API: where it sits, its model and its structural schema node."""

    path: str
    model: type[BaseModel]
    schema: dict[str, Any]


def _models_in(annotation: Any) -> Iterator[type[BaseModel]]:
    """The pydantic models inside a field annotation (X, X | None, list[X], ...)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield annotation
        return
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        yield from _models_in(typing.get_args(annotation)[0])
        return
    if origin in (typing.Union, types.UnionType, list, tuple, dict):
        for arg in typing.get_args(annotation):
            yield from _models_in(arg)


def _child(schema: dict[str, Any], name: str) -> dict[str, Any]:
    node = schema["properties"][name]
    while node.get("type") == "array":
        node = node["items"]
    return node


def sections(model: type[BaseModel], schema: dict[str, Any], path: str) -> Iterator[Section]:
    """Every object reachable from `model`, depth first, in field order."""
    yield Section(path, model, schema)
    for name, field in model.model_fields.items():
        alias = field.alias or name
        if alias == "metadata" or alias not in schema.get("properties", {}):
            continue
        node = schema["properties"][alias]
        suffix = "[]" if node.get("type") == "array" else ""
        # Paths as the messages write them: spec.model.source, not DeepSeekDeployment.spec...
        child = f"{alias}{suffix}" if path == KIND else f"{path}.{alias}{suffix}"
        for sub in _models_in(field.annotation):
            yield from sections(sub, _child(schema, alias), child)


def anchor(path: str) -> str:
    """The GitHub-style anchor of a section heading `path`."""
    return "".join(c for c in path.lower() if c.isalnum() or c in "-_")


def type_text(node: dict[str, Any], child_paths: dict[int, str]) -> str:
    """A short type: string, integer, object (link to its section), []T, map[string]T."""
    kind = node.get("type")
    if id(node) in child_paths:
        target = child_paths[id(node)]
        return f"[object](#{anchor(target)})"
    if kind == "array":
        return "[]" + type_text(node["items"], child_paths)
    if kind == "object":
        extra = node.get("additionalProperties")
        if isinstance(extra, dict):
            return "map[string]" + type_text(extra, child_paths)
        return "object"
    return str(kind)


def _number(value: Any) -> str:
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def constraints(node: dict[str, Any]) -> list[str]:
    """The schema bounds of one field, in words."""
    out = []
    if "enum" in node:
        out.append("one of " + ", ".join(f"`{v}`" for v in node["enum"]))
    low, high = node.get("minimum"), node.get("maximum")
    if low is not None or high is not None:
        lo = "" if low is None else ("> " if node.get("exclusiveMinimum") else ">= ") + _number(low)
        hi = (
            ""
            if high is None
            else ("< " if node.get("exclusiveMaximum") else "<= ") + _number(high)
        )
        out.append(", ".join(p for p in (lo, hi) if p))
    if "maxLength" in node and "enum" not in node:
        out.append(f"at most {node['maxLength']} characters")
    if "maxItems" in node:
        out.append(f"at most {node['maxItems']} items")
    if "pattern" in node:
        out.append(f"pattern `{node['pattern']}`")
    return out


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def _default(node: dict[str, Any]) -> str:
    if "default" not in node:
        return ""
    value = node["default"]
    if value == {}:
        return "{}"
    if isinstance(value, bool):
        return f"`{str(value).lower()}`"
    if value == "":
        return '`""`'
    return f"`{value}`"


def field_table(section: Section, child_paths: dict[int, str]) -> list[str]:
    schema = section.schema
    required = set(schema.get("required", ()))
    lines = ["| Field | Type | Default | Description |", "|---|---|---|---|"]
    for name, node in schema.get("properties", {}).items():
        if name in ("apiVersion", "kind", "metadata") and section.path == KIND:
            continue
        text = node.get("description", "")
        bounds = constraints(node)
        if bounds:
            text += " (" + "; ".join(bounds) + ")"
        field_name = f"`{name}`" + (" (required)" if name in required else "")
        lines.append(
            f"| {field_name} | {type_text(node, child_paths)} | {_default(node)} | {_cell(text)} |"
        )
    return lines


def rule_lines(section: Section) -> list[str]:
    rules = getattr(section.model, "__rules__", ())
    if not rules:
        return []
    lines = ["", "Rules:", ""]
    for rule in rules:
        where = "API server (CEL) and operator" if rule.cel else "operator"
        lines.append(f"- {rule.message}. *Checked by: {where}.*")
    return lines


def render() -> str:
    """The reference as Markdown, byte-identical on every run."""
    schema = crd.open_api_schema()
    found = list(sections(DeepSeekDeployment, schema, KIND))
    child_paths = {id(s.schema): s.path for s in found if s.path != KIND}
    printer = ", ".join(c["name"] for c in crd.PRINTER_COLUMNS if not c.get("priority"))
    wide = " and ".join(c["name"] for c in crd.PRINTER_COLUMNS if c.get("priority"))
    out = [
        HEADER,
        "# DeepSeekDeployment API reference",
        "",
        f"`apiVersion: {API_VERSION}`, `kind: {KIND}`, plural `{PLURAL}`, short name "
        f"{', '.join(f'`{n}`' for n in SHORT_NAMES)}; namespaced, with the status subresource. "
        f"`kubectl get {SHORT_NAMES[0]}` prints {printer}; `-o wide` adds {wide}.",
        "",
        "Every field below is also in the CRD's schema, so `kubectl explain "
        "deepseekdeployment.spec.<field>` shows the same description. Defaults in the Default "
        "column are filled in by the API server; defaults that depend on other fields are "
        "described in the text and filled in by the operator. Each rule is checked at admission "
        "(the API server refuses the object with the rule's message) where CEL can express it, "
        "and again by the operator, which also checks the plan against the model's config.json "
        "and reports problems in the `Validated` condition (see "
        "[troubleshooting.md](troubleshooting.md)).",
        "",
        f"Phases (`status.phase`): {', '.join(PHASES)}. "
        f"Condition types: {', '.join(CONDITION_TYPES)}.",
        "",
        "A minimal object (an R1 checkpoint on a claim, shards on a claim the operator creates; "
        "everything else defaulted):",
        "",
        "```yaml",
        MINIMAL_EXAMPLE.strip(),
        "```",
        "",
        "## Contents",
        "",
    ]
    for section in found:
        depth = 0 if section.path == KIND else section.path.count(".") + 1
        out.append(f"{'  ' * depth}- [{section.path}](#{anchor(section.path)})")
    for section in found:
        doc = " ".join((section.model.__doc__ or "").split())
        out += ["", f"## {section.path}", ""]
        if doc:
            out += [doc, ""]
        out += field_table(section, child_paths)
        out += rule_lines(section)
    return "\n".join(out) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_operator.generators.docs", description=__doc__
    )
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT, help="file to write")
    parser.add_argument("--check", action="store_true", help="exit 1 if the file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = args.output.read_text() if args.output.exists() else ""
        if current != text:
            print(
                f"{args.output} is stale: run python -m deepseek_operator.generators.docs",
                file=sys.stderr,
            )
            return 1
        return 0
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(text)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
