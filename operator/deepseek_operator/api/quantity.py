"""Kubernetes resource quantities ("10Gi", "10737418240", "1.5Ti", "1e12", "500M") as exact
numbers, so a size in the spec compares with a claim's the way the API server compares them (it
stores "2048Mi" as "2Gi": the strings differ, the quantities do not). Pure: no kubernetes client.
"""

from __future__ import annotations

import re
from fractions import Fraction

# The suffixes of resource.Quantity: binary (Ki..Ei), decimal SI (n..E) and a decimal exponent.
_BINARY = {"Ki": 1, "Mi": 2, "Gi": 3, "Ti": 4, "Pi": 5, "Ei": 6}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}
_QUANTITY = re.compile(
    r"^(?P<number>[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))"
    r"(?:(?P<binary>[KMGTPE]i)|[eE](?P<exponent>[+-]?[0-9]+)|(?P<decimal>[numkMGTPE]?))$"
)


def parse_quantity(text: str | int | float | None) -> Fraction | None:
    """The exact value of a quantity, or None when it is not one the API server would accept."""
    if text is None or isinstance(text, bool):
        return None
    if isinstance(text, int):
        return Fraction(text)
    if isinstance(text, float):
        return Fraction(str(text))
    match = _QUANTITY.match(text.strip())
    if match is None:
        return None
    number = Fraction(match["number"])
    if match["binary"]:
        return number * 1024 ** _BINARY[match["binary"]]
    if match["exponent"] is not None:
        exponent = int(match["exponent"])
        if abs(exponent) > 64:  # the API server's own limit is far below; never build huge ints
            return None
        return number * Fraction(10) ** exponent
    return number * Fraction(10) ** _DECIMAL[match["decimal"] or ""]


def compare_quantities(a: str, b: str) -> int | None:
    """-1, 0 or 1 as quantity a is less than, equal to or greater than b; None if either is not
    a quantity."""
    x, y = parse_quantity(a), parse_quantity(b)
    if x is None or y is None:
        return None
    return (x > y) - (x < y)
