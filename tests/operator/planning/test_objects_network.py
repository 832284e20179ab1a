"""The Services and the disruption budget (planning/objects/network.py)."""

from __future__ import annotations

from fake_cluster import (
    TWO_NODES,
    FakeCluster,
)

from deepseek_operator.planning import names


def test_services() -> None:
    result = FakeCluster(TWO_NODES).step()
    headless, client = (o for o in result.apply if o["kind"] == "Service")
    assert headless["spec"]["clusterIP"] == "None"
    assert headless["spec"]["publishNotReadyAddresses"] is True
    assert client["spec"]["selector"][names.POD_NAME_LABEL] == "r1-worker-0"
    assert client["spec"]["ports"] == [
        {"name": "http", "port": 1025, "targetPort": "http", "protocol": "TCP"}
    ]


def test_disruption_budget_blocks_drains_of_a_healthy_group_only() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    pdb = cluster.objects[("PodDisruptionBudget", names.disruption_budget("r1"))]["spec"]
    assert pdb["minAvailable"] == 2
    assert pdb["unhealthyPodEvictionPolicy"] == "AlwaysAllow"
