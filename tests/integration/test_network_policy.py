"""spec.serving.networkPolicy and spec.serving.apiKeySecret on a real API server (issue 16.11):
the NetworkPolicy is stored as planned (the API server validates its peers), the key reaches the
engine container only as a read-only mount, and turning the policy off deletes ours."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes import client
from test_operator import deployment, sts_of

from conftest import Dsd, OperatorProcess
from deepseek_operator.planning import names

pytestmark = pytest.mark.integration


def test_network_policy_and_api_key(running_operator: OperatorProcess, dsd: Dsd, k8s: Any) -> None:
    net = client.NetworkingV1Api(k8s)
    peers = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    dsd.create(
        deployment(
            "guarded",
            serving={
                "networkPolicy": {"enabled": True, "apiFrom": peers},
                "apiKeySecret": {"name": "llm-key", "key": "token"},
            },
        )
    )
    dsd.wait_phase("guarded", "Ready")
    policy = net.read_namespaced_network_policy(names.network_policy("guarded"), dsd.namespace)
    group = names.selector_labels("guarded", names.WORKER)
    assert policy.spec.pod_selector.match_labels == group
    assert policy.spec.policy_types == ["Ingress"]
    inside, api = policy.spec.ingress
    assert inside.ports is None and inside._from[0].pod_selector.match_labels == group
    assert [(p.port, p.protocol) for p in api.ports] == [(1025, "TCP")]
    assert api._from[0].namespace_selector.match_labels == {"team": "apps"}
    assert policy.metadata.owner_references[0].name == "guarded"

    pod = sts_of(dsd, "guarded").spec.template.spec
    [volume] = [v for v in pod.volumes if v.name == "api-key"]
    assert volume.secret.secret_name == "llm-key" and volume.secret.items[0].key == "token"
    engine = pod.containers[0]
    [mount] = [m for m in engine.volume_mounts if m.name == "api-key"]
    assert mount.read_only is True
    env = {e.name: e.value for e in engine.env}
    assert env["DSWORKER_API_KEY_FILE"] == f"{mount.mount_path}/api-key"

    dsd.patch_spec("guarded", {"serving": {"networkPolicy": {"enabled": False}}})
    dsd.wait(
        "NetworkPolicy deleted",
        lambda: not net.list_namespaced_network_policy(dsd.namespace).items,
    )
