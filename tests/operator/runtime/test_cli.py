"""The operator's command line: defaults, exclusive choices, the resync period from a flag or
the environment."""

from __future__ import annotations

import pytest

from deepseek_operator.runtime.cli import parse_args


def test_command_line_defaults_and_choices() -> None:
    args = parse_args([])
    assert not args.standalone and args.peering == "deepseek-operator"
    assert args.liveness == "http://0.0.0.0:8080/healthz" and args.metrics_port == 8081
    assert args.namespace == [] and args.priority is None
    args = parse_args(["--standalone", "-n", "llm", "-n", "llm-canary", "--metrics-port", "0"])
    assert args.standalone and args.namespace == ["llm", "llm-canary"] and args.metrics_port == 0
    with pytest.raises(SystemExit):
        parse_args(["--standalone", "--peering", "x"])


def test_resync_period_flag_and_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("DSOP_RESYNC_PERIOD", raising=False)
    assert parse_args([]).resync_period == 300
    assert parse_args(["--resync-period", "2.5"]).resync_period == 2.5
    assert parse_args(["--resync-period=0"]).resync_period == 0  # off
    monkeypatch.setenv("DSOP_RESYNC_PERIOD", "60")
    assert parse_args([]).resync_period == 60
    assert parse_args(["--resync-period", "5"]).resync_period == 5  # the flag wins
    for bad in ("-1", "5m", "nan", "inf", ""):
        with pytest.raises(SystemExit):
            parse_args(["--resync-period", bad])
    monkeypatch.setenv("DSOP_RESYNC_PERIOD", "often")
    with pytest.raises(SystemExit):
        parse_args([])
