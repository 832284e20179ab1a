"""Kubernetes quantities parsed and compared by value ("2048Mi" is "2Gi")."""

from __future__ import annotations

from fractions import Fraction

import pytest

from deepseek_operator.api.quantity import compare_quantities, parse_quantity

GI = 1024**3


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("10Gi", 10 * GI),
        ("10737418240", 10 * GI),
        ("1Ti", 1024 * GI),
        ("1.5Gi", 3 * GI // 2),
        ("2048Mi", 2 * GI),
        ("500M", 500 * 10**6),
        ("1e12", 10**12),
        ("1E3", 1000),
        ("1E", 10**18),  # exa, not an exponent
        ("100m", Fraction(1, 10)),
        ("+.5k", 500),
        ("0", 0),
        (" 1Ki ", 1024),
        (1024, 1024),
    ],
)
def test_parse_quantity(text: str | int, value: int | Fraction) -> None:
    assert parse_quantity(text) == value


@pytest.mark.parametrize("text", ["", "Gi", "1GiB", "1 Gi", "1gi", "1e1.5", "1.2.3", "abc", None])
def test_not_a_quantity(text: str | None) -> None:
    assert parse_quantity(text) is None


def test_compare_quantities_by_value_not_by_text() -> None:
    assert compare_quantities("10Gi", "10737418240") == 0
    assert compare_quantities("2048Mi", "2Gi") == 0
    assert compare_quantities("1Ti", "10Gi") == 1
    assert compare_quantities("10G", "10Gi") == -1  # decimal giga is less than gibi
    assert compare_quantities("1x", "1Gi") is None
