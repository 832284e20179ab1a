"""Generates the DeepSeekDeployment CustomResourceDefinition from the pydantic models.

`python -m deepseek_operator.generators.crd` writes crds/deepseekdeployments.llm.dsop.io.yaml and the Helm
chart's copy (charts/deepseek-operator/crds/); `--check` exits 1 when a committed file differs.
The schema is structural (no $ref, every node typed), keeps defaults, enums and bounds, and
carries each model's CEL rules as x-kubernetes-validations.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from ..api import (
    CRD_NAME,
    GROUP,
    KIND,
    LIST_KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    DeepSeekDeployment,
)

REPO = Path(__file__).resolve().parents[3]
DEFAULT_OUTPUT = REPO / "crds" / f"{CRD_NAME}.yaml"
# Helm installs CRDs from the chart's own crds/ folder, so the chart carries a byte-equal copy.
CHART_OUTPUT = REPO / "charts" / "deepseek-operator" / "crds" / f"{CRD_NAME}.yaml"
# Starts with a document marker: `helm show crds` joins the chart's CRD files as they are, so a
# file without one would merge into the end of the previous file's last document.
HEADER = (
    "---\n"
    "# Generated from operator/deepseek_operator/api by `python -m deepseek_operator.generators.crd`.\n"
    "# Do not edit: change the models and regenerate.\n"
)

# JSON-schema keywords a structural schema keeps as they are.
_KEEP = {
    "type",
    "description",
    "default",
    "enum",
    "format",
    "pattern",
    "minimum",
    "maximum",
    "minLength",
    "maxLength",
    "minItems",
    "maxItems",
    "maxProperties",
    "required",
}

PRINTER_COLUMNS = [
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Ready", "type": "string", "jsonPath": ".status.readyWorkers"},
    {"name": "Model", "type": "string", "jsonPath": ".status.modelName"},
    {"name": "Runtime", "type": "string", "jsonPath": ".status.runtime"},
    {"name": "World", "type": "integer", "jsonPath": ".status.worldSize"},
    {"name": "EP", "type": "integer", "jsonPath": ".status.moeEp"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
    {"name": "Level", "type": "integer", "jsonPath": ".spec.expertParallel.level", "priority": 1},
    {"name": "Message", "type": "string", "jsonPath": ".status.message", "priority": 1},
]


class SchemaError(ValueError):
    """The models produced JSON schema that has no structural equivalent."""


def _inline(node: Any, defs: dict[str, Any]) -> Any:
    """Replace every $ref by its definition; keys beside the $ref (description) win."""
    if isinstance(node, list):
        return [_inline(n, defs) for n in node]
    if not isinstance(node, dict):
        return node
    node = {k: _inline(v, defs) for k, v in node.items()}
    ref = node.pop("$ref", None)
    if ref is None:
        return node
    target = _inline(defs[ref.rsplit("/", 1)[-1]], defs)
    return {**target, **node}


def _drop_null(node: dict[str, Any]) -> dict[str, Any]:
    """Optional[X] -> X: a Kubernetes field that may be left out, never null."""
    branches = [b for b in node["anyOf"] if b.get("type") != "null"]
    rest = {k: v for k, v in node.items() if k != "anyOf"}
    if len(branches) != 1:
        raise SchemaError(f"union of {len(branches)} types has no structural form: {node}")
    return {**branches[0], **rest}


def structural(node: dict[str, Any], where: str = "") -> dict[str, Any]:
    """Convert one (ref-free) pydantic JSON-schema node into a structural OpenAPI v3 node."""
    if "anyOf" in node:
        node = _drop_null(node)
    out: dict[str, Any] = {}
    for key, value in node.items():
        if key in ("title", "properties", "items", "additionalProperties"):
            continue
        if key == "const":
            out["enum"] = [value]
        elif key in ("exclusiveMinimum", "exclusiveMaximum"):
            out["minimum" if key == "exclusiveMinimum" else "maximum"] = value
            out[key] = True
        elif key == "default" and value is None:
            continue
        elif key in _KEEP or key.startswith("x-kubernetes-"):
            out[key] = value
        else:
            raise SchemaError(f"{where or '<root>'}: keyword {key!r} has no structural form")
    kind = out.get("type")
    if kind == "object":
        props = node.get("properties")
        extra = node.get("additionalProperties")
        if props:
            out["properties"] = {k: structural(v, f"{where}.{k}") for k, v in props.items()}
        elif isinstance(extra, dict) and extra:
            out["additionalProperties"] = structural(extra, f"{where}.*")
        else:
            out["x-kubernetes-preserve-unknown-fields"] = True
    elif kind == "array":
        out["items"] = structural(node["items"], f"{where}[]")
    elif kind is None and not out.get("x-kubernetes-preserve-unknown-fields"):
        raise SchemaError(f"{where or '<root>'}: node has no type: {node}")
    if kind == "string" and "enum" in out and "maxLength" not in out:
        out["maxLength"] = max(len(v) for v in out["enum"])  # bounds CEL's cost estimate
    return out


def model_schema(model: type[BaseModel]) -> dict[str, Any]:
    """The structural schema of a pydantic model (aliases as names, CEL rules attached)."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    defs = raw.pop("$defs", {})
    return structural(_inline(raw, defs), model.__name__)


def open_api_schema() -> dict[str, Any]:
    """The openAPIV3Schema of the one served version."""
    schema = model_schema(DeepSeekDeployment)
    props = schema["properties"]
    for key in ("apiVersion", "kind"):
        props[key] = {"type": "string", "description": props[key]["description"]}
    props["metadata"] = {"type": "object"}
    schema["required"] = ["spec"]
    return schema


def build_crd() -> dict[str, Any]:
    """The CustomResourceDefinition object."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": CRD_NAME},
        "spec": {
            "group": GROUP,
            "names": {
                "kind": KIND,
                "listKind": LIST_KIND,
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": list(SHORT_NAMES),
            },
            "scope": "Namespaced",
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": open_api_schema()},
                }
            ],
        },
    }


def render() -> str:
    """The CRD as YAML text, byte-identical on every run."""
    body = yaml.safe_dump(build_crd(), sort_keys=True, width=100, allow_unicode=True)
    return HEADER + body


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m deepseek_operator.generators.crd", description=__doc__
    )
    parser.add_argument(
        "--output", type=Path, help="CRD file to write (default: crds/ and the chart's crds/)"
    )
    parser.add_argument(
        "--check", action="store_true", help="exit 1 if a file differs from the models"
    )
    args = parser.parse_args(argv)
    text = render()
    outputs = [args.output] if args.output else [DEFAULT_OUTPUT, CHART_OUTPUT]
    if args.check:
        stale = [o for o in outputs if (o.read_text() if o.exists() else "") != text]
        for output in stale:
            print(
                f"{output} is stale: run python -m deepseek_operator.generators.crd",
                file=sys.stderr,
            )
        return 1 if stale else 0
    for output in outputs:
        output.parent.mkdir(parents=True, exist_ok=True)
        output.write_text(text)
        print(f"wrote {output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
