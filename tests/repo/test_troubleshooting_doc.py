"""docs/troubleshooting.md lists every condition reason and Event reason the operator writes, so
a user who reads one in `kubectl describe` finds what to do. The reasons are read from the
operator's code (planning/status.py constants, EventSpec(...) literals), not from a copy."""

from __future__ import annotations

import ast
import re
from pathlib import Path

from deepseek_operator.api import PHASES
from deepseek_operator.planning import status as st

REPO = Path(__file__).resolve().parents[2]
PAGE = REPO / "docs" / "troubleshooting.md"
PLANNING = REPO / "operator" / "deepseek_operator" / "planning"


def condition_reasons() -> set[str]:
    """The reason constants of planning/status.py: CamelCase string values."""
    tree = ast.parse((PLANNING / "status.py").read_text())
    out = set()
    for node in tree.body:
        if (
            isinstance(node, ast.Assign)
            and isinstance(node.value, ast.Constant)
            and isinstance(node.value.value, str)
            and all(isinstance(t, ast.Name) and t.id.isupper() for t in node.targets)
            and re.fullmatch(r"[A-Z][A-Za-z]+", node.value.value)
        ):
            out.add(node.value.value)
    return out


def event_reasons() -> set[str]:
    """Reasons of every EventSpec(type, "Reason", ...) the planner builds."""
    out = set()
    for path in PLANNING.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if (
                isinstance(node, ast.Call)
                and getattr(node.func, "id", None) == "EventSpec"
                and len(node.args) >= 2
                and isinstance(node.args[1], ast.Constant)
            ):
                out.add(node.args[1].value)
    return out


def documented() -> set[str]:
    return set(re.findall(r"`([A-Z][A-Za-z]+)`", PAGE.read_text()))


def test_found_the_reasons() -> None:
    reasons = condition_reasons()
    assert {st.SHARDING_FAILED, st.RESTART_BUDGET_EXHAUSTED, st.CONFIG_MISMATCH} <= reasons
    assert "GroupRestart" in event_reasons()


def test_every_condition_reason_is_documented() -> None:
    missing = condition_reasons() - documented()
    assert not missing, f"add to docs/troubleshooting.md: {sorted(missing)}"


def test_every_event_reason_and_phase_is_documented() -> None:
    missing = (event_reasons() | set(PHASES)) - documented()
    assert not missing, f"add to docs/troubleshooting.md: {sorted(missing)}"


def test_no_stale_reasons() -> None:
    """Every reason-looking name in the reason tables still exists in the code."""
    text = PAGE.read_text()
    tables = re.findall(r"^\| `([A-Z][A-Za-z]+)`", text, re.M)
    known = condition_reasons() | event_reasons() | set(PHASES) | {"Validated", "Sharded"}
    stale = set(tables) - known
    assert not stale, f"no longer written by the operator: {sorted(stale)}"
