"""The table of rejected objects (tests/data/bad_specs.yaml) run through the operator's parser
(the loader is tests/spec_cases.py; test_crd.py runs the same table through the CRD)."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from deepseek_operator.api import parse_deployment
from spec_cases import BAD_SPECS, load_bad_specs, merge_patch

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
