"""The generated CRD: committed file up to date, structural, described, with every CEL rule, and
an emulated admission (defaulting, OpenAPI schema, CEL when cel-python is installed) that accepts
the valid examples and rejects the bad-spec table's admission cases."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from crd_admission import CRD_FILE, admit, apply_defaults, cel_errors, crd_schema, schema_errors
from deepseek_operator.generators import crd as crdgen
from spec_cases import all_rules, load_bad_specs, load_valid

BAD = load_bad_specs()
VALID = load_valid()

# The cross-field rules of shared/design/API.md; each must be a CEL rule in the CRD.
CROSS_FIELD_RULES = [
    "world-size",
    "dp-times-tp",
    "moeTp-times-moeEp",
    "cutoff-level-1",
    "topk-needs-enabled",
    "topk-level-1",
    "buffer-factor-pairs",
    "buffer-factors-descending",
    "direct-level-2-multinode",
    "expert-merge-sharding",
    "dlb-sharding",
    "v2-no-offline-sharding",
    "input-below-seq",
    "host-path-store-nodes",
    "trust-remote-code",
    "model-source-one",
    "store-pvc-shape",
    "store-one",
]


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return yaml.safe_load(CRD_FILE.read_text())


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd_schema()


def walk(node: dict[str, Any], path: str = ""):
    """Every schema node with its path (properties by name, list items as [], map values as *)."""
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from walk(sub, f"{path}.{name}" if path else name)
    if isinstance(node.get("items"), dict):
        yield from walk(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from walk(node["additionalProperties"], f"{path}.*")


def test_committed_crd_is_generated_output() -> None:
    assert CRD_FILE.read_text() == crdgen.render(), (
        "run: python -m deepseek_operator.generators.crd"
    )
    assert crdgen.render() == crdgen.render()
    assert crdgen.main(["--check"]) == 0


def test_check_mode_detects_a_stale_file(tmp_path: Path) -> None:
    out = tmp_path / "crd.yaml"
    assert crdgen.main(["--check", "--output", str(out)]) == 1
    assert crdgen.main(["--output", str(out)]) == 0
    assert crdgen.main(["--check", "--output", str(out)]) == 0
    out.write_text(out.read_text() + "# edited\n")
    assert crdgen.main(["--check", "--output", str(out)]) == 1


def test_is_a_valid_crd_object(crd: dict[str, Any]) -> None:
    kubernetes_validate.validate(crd, "1.34.0", strict=True)
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "deepseekdeployments.llm.dsop.io"
    assert spec["group"] == "llm.dsop.io" and spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "DeepSeekDeployment"
    assert spec["names"]["plural"] == "deepseekdeployments"
    assert spec["names"]["shortNames"] == ["dsd"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_schema_is_structural(schema: dict[str, Any]) -> None:
    banned = {"$ref", "$defs", "anyOf", "allOf", "oneOf", "not", "prefixItems", "const", "title"}
    for path, node in walk(schema):
        assert not banned & node.keys(), (path, banned & node.keys())
        assert (
            "type" in node
            or node.get("x-kubernetes-preserve-unknown-fields")
            or node.get("x-kubernetes-int-or-string")
        ), path
        assert not ("properties" in node and "additionalProperties" in node), path
        assert node.get("additionalProperties") is not False, path
        if node.get("type") == "array":
            assert isinstance(node.get("items"), dict), path
        if "exclusiveMinimum" in node:
            assert node["exclusiveMinimum"] is True and "minimum" in node, path
        if "default" in node:
            assert node["default"] is not None, path


def test_every_field_has_a_description(schema: dict[str, Any]) -> None:
    for path, node in walk(schema):
        if path in ("metadata",) or path.endswith("[]") or path.endswith(".*"):
            continue
        if path.startswith("spec.expertParallel.alltoallBufferScaleFactors[]"):
            continue
        assert node.get("description", "").strip(), path


def test_computed_defaults_are_left_to_the_operator(schema: dict[str, Any]) -> None:
    nodes = dict(walk(schema))
    for path in (
        "spec.model.name",
        "spec.model.architecture",
        "spec.parallelism.worldSize",
        "spec.parallelism.dp",
        "spec.parallelism.tp",
        "spec.parallelism.moeTp",
        "spec.parallelism.moeEp",
        "spec.sharding.processes",
        "spec.sharding.image",
        "spec.worker.image",
        "spec.worker.accelerator.resourceName",
    ):
        assert "default" not in nodes[path], path
    for path, value in {
        "spec.parallelism.nodes": 1,
        "spec.parallelism.devicesPerNode": 8,
        "spec.parallelism": {},
        "spec.expertParallel.level": 1,
        "spec.sharding.enabled": True,
        "spec.serving.maxSeqLen": 2560,
        "spec.serving.maxInputTokenLen": 2048,
        "spec.serving.port": 1025,
        "spec.serving.npuMemSize": -1,
        "spec.worker.restartBudget": 5,
        "spec.model.quantization": "auto",
    }.items():
        assert nodes[path]["default"] == value, path


def test_every_cel_rule_is_in_the_crd(schema: dict[str, Any]) -> None:
    in_crd = [
        (r["rule"], r["message"])
        for _, n in walk(schema)
        for r in n.get("x-kubernetes-validations", [])
    ]
    from_models = [(r.cel, r.message) for r in all_rules().values() if r.cel]
    # A model used at several places (a LabelSelector in pod affinity and anti-affinity...)
    # carries its rules at each.
    assert set(in_crd) == set(from_models)
    rules = all_rules()
    for name in CROSS_FIELD_RULES:
        assert rules[name].cel, name


def test_printer_columns(crd: dict[str, Any], schema: dict[str, Any]) -> None:
    columns = crd["spec"]["versions"][0]["additionalPrinterColumns"]
    assert [c["name"] for c in columns][:7] == [
        "Phase",
        "Ready",
        "Model",
        "Runtime",
        "World",
        "EP",
        "Age",
    ]
    by_name = {c["name"]: c for c in columns}
    # EP is the expert-parallel size, not the EP level (that is Level, with -o wide).
    assert by_name["EP"]["jsonPath"] == ".status.moeEp"
    assert by_name["Level"] == {
        "name": "Level",
        "type": "integer",
        "jsonPath": ".spec.expertParallel.level",
        "priority": 1,
    }
    nodes = dict(walk(schema))
    for col in columns:
        path = col["jsonPath"].lstrip(".")
        if not path.startswith("metadata."):
            assert path in nodes, path
            # Every printed field must be one the server stores (not an operator-side default).
            assert nodes[path]["type"] == col["type"], path


def test_cel_rules_use_has_for_optional_fields(schema: dict[str, Any]) -> None:
    """A rule may read an optional field without a default only behind has()."""
    nodes = dict(walk(schema))
    for path, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            for name, sub in node.get("properties", {}).items():
                if f"self.{name}" in rule["rule"] and "default" not in sub:
                    required = name in node.get("required", [])
                    assert required or f"has(self.{name})" in rule["rule"], (path, name)
    assert nodes["spec.expertParallel.alltoallBufferScaleFactors"]["maxItems"] <= 16


@pytest.mark.parametrize("name,obj", VALID, ids=[n for n, _ in VALID])
def test_valid_examples_pass_the_openapi_schema(
    schema: dict[str, Any], name: str, obj: dict[str, Any]
) -> None:
    assert admit(schema, obj, cel=False) == []


@pytest.mark.parametrize("name,obj", VALID, ids=[n for n, _ in VALID])
def test_valid_examples_pass_the_cel_rules(
    schema: dict[str, Any], name: str, obj: dict[str, Any]
) -> None:
    assert admit(schema, obj, cel=True) == []


def test_defaults_pass_their_own_schema_and_rules(schema: dict[str, Any]) -> None:
    """The API server refuses a CRD whose defaults (themselves defaulted) fail their node."""
    for path, node in walk(schema):
        if "default" in node:
            value = apply_defaults(node, copy.deepcopy(node["default"]))
            assert schema_errors(node, value) == [], path
            assert cel_errors(node, value) == [], path


def test_all_cel_rules_compile(schema: dict[str, Any]) -> None:
    celpy = pytest.importorskip("celpy")
    env = celpy.Environment()
    for _, node in walk(schema):
        for rule in node.get("x-kubernetes-validations", []):
            env.compile(rule["rule"])


ADMISSION = [c for c in BAD if c.get("cel")]


@pytest.mark.parametrize("case", ADMISSION, ids=[c["name"] for c in ADMISSION])
def test_admission_rejects_bad_spec(schema: dict[str, Any], case: dict[str, Any]) -> None:
    obj = apply_defaults(schema, copy.deepcopy(case["object"]))
    errors = schema_errors(schema, obj)
    if errors:
        return  # the OpenAPI schema rejects it; its wording is the API server's own
    messages = cel_errors(schema, obj)
    assert messages, f"{case['name']} passed the CRD"
    fragment = case.get("celExpect") or case["expect"]
    assert any(fragment in m for m in messages), messages


def test_admission_rejects_a_name_ending_in_ranks(schema: dict[str, Any]) -> None:
    """The client Service <name> must not be another deployment's <name>-ranks."""
    obj = copy.deepcopy(VALID[0][1])
    obj["metadata"] = {"name": "r1-ranks"}
    messages = admit(schema, obj, cel=True)
    assert any("metadata.name: a name ending in -ranks" in m for m in messages), messages
    obj["metadata"] = {"name": "r1-rank"}
    assert admit(schema, obj, cel=True) == []
