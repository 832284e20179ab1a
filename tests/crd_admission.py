"""The API server's admission of a DeepSeekDeployment, emulated on the committed CRD: structural
defaulting, the OpenAPI schema (draft 4, unknown fields rejected) and the CEL rules (cel-python;
the caller is skipped when it is missing). Shared by the CRD and the examples tests."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

CRD_FILE = Path(__file__).resolve().parents[1] / "crds" / "deepseekdeployments.llm.dsop.io.yaml"


def crd_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the committed CRD."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """The API server's structural defaulting: fill unset fields, then recurse (defaults too)."""
    if isinstance(value, dict) and "properties" in schema:
        for name, sub in schema["properties"].items():
            if name not in value and "default" in sub:
                value[name] = copy.deepcopy(sub["default"])
            if name in value:
                value[name] = apply_defaults(sub, value[name])
    elif isinstance(value, list) and isinstance(schema.get("items"), dict):
        value = [apply_defaults(schema["items"], v) for v in value]
    return value


def draft4(schema: dict[str, Any]) -> dict[str, Any]:
    """The schema as plain JSON Schema draft 4, unknown fields rejected (fieldValidation=Strict)."""
    out = {k: draft4(v) if isinstance(v, dict) else v for k, v in schema.items()}
    out = {k: v for k, v in out.items() if not k.startswith("x-kubernetes-")}
    if "properties" in schema:
        out["properties"] = {k: draft4(v) for k, v in schema["properties"].items()}
        if not schema.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
    return out


def schema_errors(schema: dict[str, Any], obj: dict[str, Any]) -> list[str]:
    validator = jsonschema.Draft4Validator(draft4(schema))
    return [f"{e.json_path}: {e.message}" for e in validator.iter_errors(obj)]


def typed(schema: dict[str, Any], value: Any) -> Any:
    """Values as CEL sees them on the server: `number` fields are doubles."""
    if schema.get("type") == "number" and isinstance(value, int | float):
        return float(value)
    if isinstance(value, dict):
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties")
        return {
            k: typed(props.get(k) or (extra if isinstance(extra, dict) else {}), v)
            for k, v in value.items()
        }
    if isinstance(value, list):
        return [typed(schema.get("items") or {}, v) for v in value]
    return value


def cel_errors(schema: dict[str, Any], value: Any) -> list[str]:
    """Evaluate every x-kubernetes-validations rule where its object is present (cel-python)."""
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    out: list[str] = []

    def visit(node: dict[str, Any], val: Any) -> None:
        for rule in node.get("x-kubernetes-validations", []):
            program = env.program(env.compile(rule["rule"]))
            result = program.evaluate({"self": celpy.json_to_cel(typed(node, val))})
            if result is not True and not (isinstance(result, celpy.celtypes.BoolType) and result):
                out.append(rule["message"])
        if isinstance(val, dict):
            for name, sub in node.get("properties", {}).items():
                if name in val:
                    visit(sub, val[name])
        if isinstance(val, list) and isinstance(node.get("items"), dict):
            for v in val:
                visit(node["items"], v)

    visit(schema, value)
    return out


def admit(schema: dict[str, Any], obj: dict[str, Any], cel: bool) -> list[str]:
    obj = apply_defaults(schema, copy.deepcopy(obj))
    errors = schema_errors(schema, obj)
    if not errors and cel:
        errors = cel_errors(schema, obj)
    return errors
