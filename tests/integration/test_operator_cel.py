"""The CRD's schema and CEL rules on a real API server: every `cel: true` case of
tests/data/bad_specs.yaml is refused at admission with its message, every valid example is
accepted (both as server-side dry runs, so nothing is stored)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from spec_cases import load_bad_specs, load_valid

pytestmark = pytest.mark.integration

GROUP, VERSION, PLURAL = "llm.dsop.io", "v1alpha1", "deepseekdeployments"
CEL_CASES = [c for c in load_bad_specs() if c.get("cel")]


def _create(api: client.ApiClient, obj: dict[str, Any], strict: bool) -> Any:
    return client.CustomObjectsApi(api).create_namespaced_custom_object(
        GROUP,
        VERSION,
        "default",
        PLURAL,
        obj,
        dry_run="All",
        field_validation="Strict" if strict else None,
    )


@pytest.fixture(scope="module")
def served(dsd_crd: str, k8s: client.ApiClient, kube_cluster: Any) -> client.ApiClient:
    """Right after Established the endpoint may 404 for a moment: wait until it serves."""
    valid = load_valid()[0][1]

    def serves() -> bool:
        try:
            _create(k8s, {**valid, "metadata": {"name": "probe"}}, strict=True)
            return True
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise

    kube_cluster.wait_for("DeepSeekDeployment endpoint", serves)
    return k8s


def test_the_table_has_admission_cases() -> None:
    assert len(CEL_CASES) >= 40


@pytest.mark.parametrize("case", CEL_CASES, ids=[c["name"] for c in CEL_CASES])
def test_bad_spec_is_refused_by_the_api_server(
    served: client.ApiClient, case: dict[str, Any]
) -> None:
    obj = {**case["object"], "metadata": {"name": "bad"}}
    with pytest.raises(ApiException) as err:
        _create(served, obj, strict=bool(case.get("strict")))
    assert err.value.status in (400, 422), err.value.body
    message = json.loads(err.value.body)["message"]
    assert (case.get("celExpect") or case["expect"]) in message, message


@pytest.mark.parametrize("name,obj", load_valid(), ids=[n for n, _ in load_valid()])
def test_valid_example_is_accepted(
    served: client.ApiClient, name: str, obj: dict[str, Any]
) -> None:
    created = _create(served, {**obj, "metadata": {"name": name}}, strict=True)
    assert created["spec"]["model"]["source"] == obj["spec"]["model"]["source"]
    # The server filled the defaults the CEL rules rely on.
    assert created["spec"]["serving"]["maxSeqLen"] >= 2
    assert created["spec"]["expertParallel"]["level"] in (1, 2)


def test_a_name_ending_in_ranks_is_refused(served: client.ApiClient) -> None:
    """Its API Service would be the rank-discovery Service of the deployment named without it."""
    valid = load_valid()[0][1]
    with pytest.raises(ApiException) as err:
        _create(served, {**valid, "metadata": {"name": "r1-ranks"}}, strict=True)
    assert err.value.status == 422, err.value.body
    assert "metadata.name: a name ending in -ranks" in json.loads(err.value.body)["message"]
    _create(served, {**valid, "metadata": {"name": "r1-rank"}}, strict=True)


def test_env_names_are_a_list_map(served: client.ApiClient) -> None:
    """A repeated env name is refused at admission (the StatefulSet could never be applied)."""
    valid = load_valid()[0][1]
    obj = json.loads(json.dumps(valid))
    obj["metadata"] = {"name": "twice"}
    obj["spec"].setdefault("worker", {})["env"] = [
        {"name": "A", "value": "1"},
        {"name": "A", "value": "2"},
    ]
    with pytest.raises(ApiException) as err:
        _create(served, obj, strict=True)
    assert err.value.status == 422, err.value.body
    assert "Duplicate value" in json.loads(err.value.body)["message"]
