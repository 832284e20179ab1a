"""The shared tables of DeepSeekDeployment objects: tests/data/bad_specs.yaml (each case built
from base + patch), the valid examples of tests/data/valid, and every Rule of the API models.
Used by the API, CRD, examples and admission tests (unit and integration) alike."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import yaml

from deepseek_operator.api import ApiModel, Rule

DATA = Path(__file__).resolve().parent / "data"
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


def all_rules() -> dict[str, Rule]:
    found: dict[str, Rule] = {}
    todo = list(ApiModel.__subclasses__())
    while todo:
        cls = todo.pop()
        todo.extend(cls.__subclasses__())
        for rule in cls.__dict__.get("__rules__", ()):
            assert rule.name not in found, f"duplicate rule name {rule.name}"
            found[rule.name] = rule
    return found
