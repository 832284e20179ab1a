"""docs/api-reference.md is generated from the API models and kept current: every field of the
CRD schema and every rule message is in it, and its links resolve."""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from deepseek_operator.api import DeepSeekDeployment
from deepseek_operator.generators import crd, docs

REFERENCE = Path(__file__).resolve().parents[3] / "docs" / "api-reference.md"


def _fields(node: dict[str, Any], path: str) -> Iterator[tuple[str, str]]:
    """(section path, field name) of every property under `node`."""
    for name, sub in node.get("properties", {}).items():
        yield path, name
        while sub.get("type") == "array":
            sub = sub["items"]
        yield from _fields(sub, f"{path}.{name}" if path else name)


def _sections(text: str) -> dict[str, str]:
    parts = re.split(r"^## (.+)$", text, flags=re.M)
    return {parts[i].strip(): parts[i + 1] for i in range(1, len(parts), 2)}


def test_reference_is_current() -> None:
    assert docs.main(["--check"]) == 0, "run: python -m deepseek_operator.generators.docs"
    assert REFERENCE.read_text() == docs.render()


def test_every_field_is_documented_in_its_section() -> None:
    text = REFERENCE.read_text()
    by_heading = _sections(text)
    schema = crd.open_api_schema()
    for parent, name in _fields(schema, ""):
        if parent == "" and name in ("apiVersion", "kind", "metadata"):
            continue
        heading = next(
            (h for h in by_heading if h.replace("[]", "") == (parent or "DeepSeekDeployment")),
            None,
        )
        assert heading, f"no section for {parent}"
        assert re.search(rf"^\| `{re.escape(name)}`", by_heading[heading], re.M), (
            f"{parent}.{name} missing from section {heading}"
        )


def test_every_rule_message_is_documented() -> None:
    text = REFERENCE.read_text()
    seen = 0
    for section in docs.sections(DeepSeekDeployment, crd.open_api_schema(), "DeepSeekDeployment"):
        for rule in getattr(section.model, "__rules__", ()):
            assert rule.message in text, rule.name
            seen += 1
    assert seen >= 18


def test_links_resolve_to_headings() -> None:
    text = REFERENCE.read_text()
    anchors = {docs.anchor(h) for h in _sections(text)}
    for target in re.findall(r"\]\(#([^)]+)\)", text):
        assert target in anchors, target


def test_descriptions_match_kubectl_explain() -> None:
    """The descriptions are the CRD's, which `kubectl explain` prints."""
    text = REFERENCE.read_text()
    schema = crd.open_api_schema()
    node = schema["properties"]["spec"]["properties"]["expertParallel"]["properties"]["level"]
    assert node["description"] in text
