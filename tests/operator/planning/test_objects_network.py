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


def test_no_network_policy_unless_asked() -> None:
    result = FakeCluster(TWO_NODES).step()
    assert not [o for o in result.apply if o["kind"] == "NetworkPolicy"]


def test_network_policy_opens_the_rendezvous_to_the_group_only() -> None:
    cluster = FakeCluster(TWO_NODES)
    peers = [{"namespaceSelector": {"matchLabels": {"team": "apps"}}}]
    cluster.change_spec(
        {"serving": {"port": 8000, "networkPolicy": {"enabled": True, "apiFrom": peers}}}
    )
    result = cluster.step()
    [policy] = [o for o in result.apply if o["kind"] == "NetworkPolicy"]
    assert policy["metadata"]["name"] == names.network_policy("r1") == "r1-net"
    group = {"matchLabels": names.selector_labels("r1", names.WORKER)}
    assert policy["spec"] == {
        "podSelector": group,
        "policyTypes": ["Ingress"],
        "ingress": [
            {"from": [{"podSelector": group}]},  # every port, from the group's own pods
            {"ports": [{"protocol": "TCP", "port": 8000}], "from": peers},
        ],
    }
    # The rendezvous port is in no rule open to others.
    assert all(
        "ports" not in r or r["ports"][0]["port"] != 29500 for r in policy["spec"]["ingress"]
    )


def test_network_policy_api_from_unset_is_any_source_and_empty_is_none() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.change_spec({"serving": {"networkPolicy": {"enabled": True}}})
    [policy] = [o for o in cluster.step().apply if o["kind"] == "NetworkPolicy"]
    assert policy["spec"]["ingress"][1] == {"ports": [{"protocol": "TCP", "port": 1025}]}
    cluster.change_spec({"serving": {"networkPolicy": {"apiFrom": []}}})
    [policy] = [o for o in cluster.step().apply if o["kind"] == "NetworkPolicy"]
    assert len(policy["spec"]["ingress"]) == 1


def test_turning_the_network_policy_off_deletes_ours() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.change_spec({"serving": {"networkPolicy": {"enabled": True}}})
    cluster.step()
    policy = cluster.objects[("NetworkPolicy", "r1-net")]
    cluster.change_spec({"serving": {"networkPolicy": {"enabled": False}}})
    result = cluster.step()
    assert [(d.kind, d.name, d.uid) for d in result.delete] == [
        ("NetworkPolicy", "r1-net", policy["metadata"]["uid"])
    ]
    assert not cluster.step().delete
