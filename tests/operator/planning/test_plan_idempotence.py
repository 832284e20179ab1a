"""Planning is level-triggered: planning again changes nothing, and a condition that holds keeps
its lastTransitionTime."""

from __future__ import annotations

from fake_cluster import (
    TWO_NODES,
    FakeCluster,
    cond,
)


def test_planning_again_changes_nothing() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.until_ready()
    first = cluster.step()
    second = cluster.step()
    assert not first.status_changed and not second.status_changed
    assert first.apply == second.apply and not second.delete and not second.events
    gens = {k: o["metadata"]["generation"] for k, o in cluster.objects.items()}
    cluster.step()
    assert gens == {k: o["metadata"]["generation"] for k, o in cluster.objects.items()}


def test_last_transition_time_is_kept_while_status_holds() -> None:
    cluster = FakeCluster(TWO_NODES)
    cluster.step()
    first = cond(cluster.body["status"], "Validated")["lastTransitionTime"]
    cluster.step()
    cluster.step()
    assert cond(cluster.body["status"], "Validated")["lastTransitionTime"] == first
    sharded = cond(cluster.body["status"], "Sharded")["lastTransitionTime"]
    cluster.finish_job(cluster.job())
    cluster.step()
    assert cond(cluster.body["status"], "Sharded")["lastTransitionTime"] > sharded
