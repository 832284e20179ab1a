"""spec.runtime at admission: the CRD's CEL rules refuse what each runtime cannot honour with the
same message as the operator's own check, and accept what it can (the Python side is covered
with every other rule in test_api_rules)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from test_api_rules import BASE

from crd_admission import admit, crd_schema
from deepseek_operator.api import parse_deployment
from deepseek_operator.api.runtime import owned_config_keys, owned_flag
from runtime_cases import RUNTIME_RULE_CASES
from spec_cases import all_rules, merge_patch

CEL_CASES = sorted(n for n in RUNTIME_RULE_CASES if all_rules()[n].cel)


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd_schema()


def obj(patch: dict[str, Any]) -> dict[str, Any]:
    return merge_patch(copy.deepcopy(BASE), {"spec": patch})


@pytest.mark.parametrize("name", CEL_CASES)
def test_the_api_server_accepts_what_the_runtime_honours(schema: dict[str, Any], name: str) -> None:
    assert admit(schema, obj(RUNTIME_RULE_CASES[name][0]), cel=True) == []


@pytest.mark.parametrize("name", CEL_CASES)
def test_the_api_server_refuses_with_the_operators_message(
    schema: dict[str, Any], name: str
) -> None:
    messages = admit(schema, obj(RUNTIME_RULE_CASES[name][1]), cel=True)
    assert all_rules()[name].message in messages, messages


def test_every_refusal_names_the_field_and_the_runtime() -> None:
    for name in RUNTIME_RULE_CASES:
        rule = all_rules()[name]
        assert rule.message.startswith("spec."), name
        engine = name.split("-", 1)[0]
        if engine in ("vllm", "mindie"):
            assert f"runtime {engine}" in rule.message, name


def test_default_runtime_is_dsworker_with_the_worker_image() -> None:
    spec = parse_deployment(BASE).deployment.spec
    assert spec.runtime.engine == "dsworker"
    assert spec.runtime.image == spec.worker.image


@pytest.mark.parametrize(
    "accelerator,image",
    [("gpu", "vllm/vllm-openai:v0.13.0"), ("npu", "quay.io/ascend/vllm-ascend:v0.13.0")],
)
def test_vllm_image_defaults_per_accelerator(accelerator: str, image: str) -> None:
    patch = {
        **RUNTIME_RULE_CASES["vllm-sharding"][0],
        "worker": {"accelerator": {"type": accelerator}},
    }
    assert parse_deployment(obj(patch)).deployment.spec.runtime.image == image


@pytest.mark.parametrize(
    "arg,owned",
    [
        ("--tensor-parallel-size", "--tensor-parallel-size"),
        ("-tp=4", "-tp"),
        ("--max-model", "--max-model-len"),  # argparse would take the abbreviation
        ("--max-model=4", "--max-model-len"),
        ("--trust-remote-code", "--trust-remote-code"),
        ("--gpu-memory-utilization", None),
        ("0.9", None),
        ("--", None),
    ],
)
def test_owned_flags(arg: str, owned: str | None) -> None:
    assert owned_flag(arg) == owned


def test_owned_config_keys_see_objects_over_owned_keys() -> None:
    model = "BackendConfig.ModelDeployConfig.ModelConfig"
    assert owned_config_keys(
        {"BackendConfig": {"ModelDeployConfig": {"ModelConfig": {"models": 1}}}}
    )
    assert owned_config_keys({"ServerConfig": {"port": 1}}) == ["ServerConfig.port"]
    assert (
        owned_config_keys(
            {
                "BackendConfig": {
                    "ModelDeployConfig": {"ModelConfig": {"async_scheduler_wait_time": 9}}
                }
            }
        )
        == []
    )
    assert f"{model}.models.deepseekv2.ep_level" in owned_config_keys(
        {"BackendConfig": {"ModelDeployConfig": {"ModelConfig": {"models": {"deepseekv2": {}}}}}}
    )
