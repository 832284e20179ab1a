"""kopf's pause rule, read from a peering object's keep-alives."""

from __future__ import annotations

import datetime as dt

from deepseek_operator.runtime.leadership import outranking_peers

NOW = dt.datetime(2026, 11, 23, 12, 0, tzinfo=dt.UTC)


def alive(priority: int, seconds_ago: float = 5, lifetime: int = 60) -> dict[str, object]:
    seen = NOW - dt.timedelta(seconds=seconds_ago)
    return {"priority": priority, "lifetime": lifetime, "lastseen": seen.isoformat()}


def test_live_peers_of_higher_or_equal_priority_pause_this_one() -> None:
    status = {
        "me": alive(10),
        "higher": alive(20),
        "equal": alive(10),
        "lower": alive(5),
        "dead-higher": alive(99, seconds_ago=61),
    }
    assert outranking_peers(status, "me", 10, NOW) == ["equal", "higher"]
    assert outranking_peers(status, "me", 100, NOW) == []


def test_no_object_malformed_entries_and_naive_times() -> None:
    assert outranking_peers(None, "me", 1, NOW) == []
    status = {
        "no-lastseen": {"priority": 50},
        "bad-time": {"priority": 50, "lastseen": "yesterday"},
        "not-a-map": "x",
        "naive": {"priority": 50, "lifetime": 60, "lastseen": "2026-11-23T11:59:30"},
    }
    assert outranking_peers(status, "me", 1, NOW) == ["naive"]


def test_the_peering_wait_message_says_what_to_create() -> None:
    """kopf waits silently for missing peering objects: the operator says which and how."""
    from deepseek_operator.runtime.leadership import peering_wait_message

    text = peering_wait_message("dsop", [None], crd_missing=True)
    assert "waiting for ClusterKopfPeering 'dsop' (kopf.dev/v1)" in text
    assert "crds/kopf-peering.yaml" in text and "--standalone" in text
    assert '"kind": "ClusterKopfPeering", "metadata": {"name": "dsop"}}' in text
    text = peering_wait_message("dsop", ["llm"], crd_missing=False)
    assert "KopfPeering 'dsop' in namespace llm" in text and "kopf-peering.yaml" not in text
    assert '"metadata": {"name": "dsop", "namespace": "llm"}}' in text
