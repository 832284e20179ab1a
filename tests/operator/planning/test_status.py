"""Conditions, phase Events and the reading of Jobs and pods that status is computed from."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from typing import Any

from deepseek_operator.api import DeepSeekDeploymentStatus
from deepseek_operator.planning import observed as obs
from deepseek_operator.planning.status import (
    Cond,
    Summary,
    build_status,
    merge_conditions,
    ready_condition,
    transition_events,
)

T0 = datetime(2026, 1, 1, 0, 0, 0, tzinfo=UTC)
T1 = T0 + timedelta(minutes=5)


def status(**fields: Any) -> DeepSeekDeploymentStatus:
    return DeepSeekDeploymentStatus.model_validate(fields)


def test_transition_time_kept_while_status_holds_and_moved_when_it_changes() -> None:
    first = merge_conditions([], [Cond("Sharded", "False", "ShardingPending", "a")], 1, T0)
    assert first[0].last_transition_time == T0 and first[0].observed_generation == 1
    same = merge_conditions(first, [Cond("Sharded", "False", "ShardingInProgress", "b")], 2, T1)
    assert same[0].last_transition_time == T0  # reason and message changed, status did not
    assert same[0].reason == "ShardingInProgress" and same[0].observed_generation == 2
    flipped = merge_conditions(same, [Cond("Sharded", "True", "ShardsComplete")], 2, T1)
    assert flipped[0].last_transition_time == T1


def test_conditions_come_in_a_fixed_order_and_survive_a_round_trip() -> None:
    conds = [
        Cond("Ready", "False", "Sharding"),
        Cond("Validated", "True", "Valid"),
        Cond("WorkersReady", "False", "WaitingForShards"),
        Cond("Sharded", "False", "ShardingPending"),
    ]
    out = merge_conditions([], conds, 3, T0.replace(microsecond=123))
    assert [c.type for c in out] == ["Validated", "Sharded", "WorkersReady", "Ready"]
    summary = Summary(phase="Sharding", message="m", conditions=conds, generation=3)
    built = build_status(DeepSeekDeploymentStatus(), summary, T0)
    as_json = built.to_dict()
    assert as_json["conditions"][0]["lastTransitionTime"] == "2026-01-01T00:00:00Z"
    reread = DeepSeekDeploymentStatus.model_validate(json.loads(json.dumps(as_json)))
    assert build_status(reread, summary, T1).to_dict() == as_json


def test_one_event_per_phase_change_warning_for_failed_and_degraded() -> None:
    assert transition_events(status(phase="Sharding"), status(phase="Sharding")) == []
    [event] = transition_events(status(), status(phase="Sharding", message="job x"))
    assert (event.type, event.reason, event.message) == (
        "Normal",
        "Sharding",
        "new -> Sharding: job x",
    )
    [event] = transition_events(status(phase="Ready"), status(phase="Degraded"))
    assert event.type == "Warning"
    [event] = transition_events(status(phase="Sharding"), status(phase="Failed", message="x"))
    assert event.type == "Warning" and event.message == "Sharding -> Failed: x"


def test_ready_condition() -> None:
    assert ready_condition("Ready", False, "m") == Cond("Ready", "True", "Serving", "m")
    assert ready_condition("Sharding", True, "m").reason == "ServingPreviousPlan"
    assert ready_condition("Loading", False, "m") == Cond("Ready", "False", "Loading", "m")


# ------------------------------------------------------------------------ reading children


def _pod(terminated: dict[str, Any], **status: Any) -> dict[str, Any]:
    return {
        "metadata": {"name": "p", "uid": "u"},
        "status": {
            "containerStatuses": [{"name": "c", "state": {"terminated": terminated}}],
            **status,
        },
    }


def test_termination_summary_error_and_log_tail() -> None:
    summary = {"bytes": 10, "files": 2, "seconds": 1.5, "throughputMBps": 0.0}
    ok = obs.termination([_pod({"exitCode": 0, "message": json.dumps(summary)})], succeeded=True)
    assert ok is not None and ok.summary == summary and ok.error is None
    bad = obs.termination(
        [_pod({"exitCode": 2, "message": '{"error":"spec.parallelism.tp: 7 heads"}'})],
        succeeded=False,
    )
    assert bad is not None and bad.bad_input and bad.error == "spec.parallelism.tp: 7 heads"
    tail = obs.termination(
        [_pod({"exitCode": 137, "reason": "OOMKilled", "message": "Traceback ...\nMemoryError"})],
        succeeded=False,
    )
    assert tail is not None and not tail.bad_input and tail.error.endswith("MemoryError")
    silent = obs.termination([_pod({"exitCode": 1, "reason": "Error"})], succeeded=False)
    assert silent is not None and silent.error == "exit code 1 (Error)"
    assert obs.termination([_pod({"exitCode": 1})], succeeded=True) is None


def test_newest_termination_wins() -> None:
    pods = [
        _pod({"exitCode": 1, "message": '{"error":"old"}', "finishedAt": "2026-01-01T00:00:00Z"}),
        _pod({"exitCode": 1, "message": '{"error":"new"}', "finishedAt": "2026-01-01T00:05:00Z"}),
    ]
    found = obs.termination(pods, succeeded=False)
    assert found is not None and found.error == "new"


def test_job_state() -> None:
    def job(*conds: tuple[str, str]) -> dict[str, Any]:
        return {"status": {"conditions": [{"type": t, "status": s} for t, s in conds]}}

    assert obs.job_state({}) == "active"
    assert obs.job_state(job(("FailureTarget", "True"))) == "active"
    assert obs.job_state(job(("FailureTarget", "True"), ("Failed", "True"))) == "failed"
    assert obs.job_state(job(("SuccessCriteriaMet", "True"), ("Complete", "True"))) == "complete"


def test_worker_failure_detection() -> None:
    running = {
        "metadata": {"name": "w-0"},
        "status": {
            "phase": "Running",
            "containerStatuses": [{"name": "engine", "restartCount": 0}],
        },
    }
    assert obs.failure(running) is None
    restarted = {
        "metadata": {"name": "w-1"},
        "status": {
            "phase": "Running",
            "containerStatuses": [
                {
                    "name": "engine",
                    "restartCount": 2,
                    "lastState": {
                        "terminated": {"exitCode": 134, "reason": "Error", "message": "rank 9 died"}
                    },
                }
            ],
        },
    }
    why = obs.failure(restarted)
    assert why is not None and "w-1" in why and "exit code 134" in why and "rank 9 died" in why
    failed = {"metadata": {"name": "w-2"}, "status": {"phase": "Failed", "reason": "Evicted"}}
    assert "Evicted" in (obs.failure(failed) or "")


def test_pod_stage() -> None:
    def pod(**status: Any) -> dict[str, Any]:
        return {"metadata": {"name": "w-0"}, "status": status}

    assert obs.pod_stage(pod(conditions=[{"type": "Ready", "status": "True"}]))[0] == "ready"
    stuck = pod(
        conditions=[
            {"type": "PodScheduled", "status": "False", "message": "0/4 nodes: Insufficient"}
        ]
    )
    assert obs.pod_stage(stuck) == (
        "unschedulable",
        "pod w-0 cannot be scheduled: 0/4 nodes: Insufficient",
    )
    staging = pod(initContainerStatuses=[{"name": "stage", "state": {"running": {}}}])
    assert obs.pod_stage(staging)[0] == "staging"
    staged = pod(
        initContainerStatuses=[{"name": "stage", "state": {"terminated": {"exitCode": 0}}}],
        containerStatuses=[{"name": "engine", "state": {"running": {}}}],
    )
    assert obs.pod_stage(staged)[0] == "loading"
    assert obs.pod_stage(pod())[0] == "pending"
