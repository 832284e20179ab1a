"""Every child is owned, labelled and fingerprinted (planning/objects/context.py), under names
that are valid DNS labels (planning/names.py)."""

from __future__ import annotations

import pytest
from fake_cluster import (
    TWO_NODES,
    FakeCluster,
)

from deepseek_operator.planning import names


def test_every_child_is_owned_labelled_and_fingerprinted() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    children = list(cluster.objects.values())
    assert {o["kind"] for o in children} == {
        "Service",
        "Job",
        "ConfigMap",
        "StatefulSet",
        "PodDisruptionBudget",
    }
    for obj in children:
        md = obj["metadata"]
        assert md["ownerReferences"] == [
            {
                "apiVersion": "llm.dsop.io/v1alpha1",
                "kind": "DeepSeekDeployment",
                "name": "r1",
                "uid": "uid-r1",
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        labels = md["labels"]
        for key in ("name", "instance", "component", "managed-by", "part-of"):
            assert labels[f"app.kubernetes.io/{key}"], (md["name"], key)
        assert labels["app.kubernetes.io/managed-by"] == "deepseek-operator"
        assert labels["app.kubernetes.io/instance"] == "r1"
        assert md["annotations"][names.FINGERPRINT_ANNOTATION] == cluster.fp()
        assert md["annotations"][names.DEPLOYMENT_ANNOTATION] == "r1"
        assert md["namespace"] == "llm"


@pytest.mark.parametrize(
    "name",
    ["r1", "deepseek.r1.prod", "9lives", "a" * 253, "x" * 62 + ".y"],
)
def test_child_names_are_valid_dns_labels(name: str) -> None:
    fp = "f" * 64
    for child in (
        names.statefulset(name),
        names.headless_service(name),
        names.client_service(name),
        names.shard_job(name, fp),
        names.cleanup_job(name, fp),
        names.config_map(name),
    ):
        assert len(child) <= 63 and child[0].isalpha(), child
        assert all(c.isalnum() or c == "-" for c in child), child
    assert len(names.statefulset(name)) <= 52  # pod names and revision hashes stay valid
    assert len(names.instance(name)) <= 63
    assert names.base_name("a.b") != names.base_name("a-b")
