"""The table of rejected objects (tests/data/bad_specs.yaml) run through the operator's parser.

The loader here is shared with test_crd.py, which runs the same table through the CRD.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

from deepseek_operator.api import parse_deployment

DATA = Path(__file__).resolve().parents[1] / "data"
BAD_SPECS = DATA / "bad_specs.yaml"
VALID = sorted((DATA / "valid").glob("*.yaml"))


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON Merge Patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def load_bad_specs() -> list[dict[str, Any]]:
    """The cases, each with its full `object` built from base + patch."""
    table = yaml.safe_load(BAD_SPECS.read_text())
    cases = []
    for case in table["cases"]:
        obj = case.get("object") or merge_patch(table["base"], case["patch"])
        cases.append({**case, "object": obj})
    return cases


def load_valid() -> list[tuple[str, dict[str, Any]]]:
    return [(p.stem, yaml.safe_load(p.read_text())) for p in VALID]


CASES = load_bad_specs()


def test_table_is_large_and_names_are_unique() -> None:
    names = [c["name"] for c in CASES]
    assert len(names) >= 30
    assert len(set(names)) == len(names)


def test_base_object_is_valid() -> None:
    base = yaml.safe_load(BAD_SPECS.read_text())["base"]
    result = parse_deployment(base)
    assert result.ok, result.errors


@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_bad_spec_is_rejected_with_message(case: dict[str, Any]) -> None:
    result = parse_deployment(case["object"])
    assert not result.ok
    assert any(case["expect"] in e for e in result.errors), result.errors
    # Every message names the field to fix by its JSON path.
    assert all(e.startswith(("spec", "metadata")) for e in result.errors), result.errors


def test_merge_patch_semantics() -> None:
    assert merge_patch({"a": {"b": 1, "c": 2}}, {"a": {"b": None, "d": [1]}}) == {
        "a": {"c": 2, "d": [1]}
    }
    assert merge_patch({"a": [1, 2]}, {"a": [3]}) == {"a": [3]}
