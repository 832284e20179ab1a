"""Kubernetes resource quantities: the planner's name for deepseek_operator.api.quantity (the API
checks quantities in the spec with the same parser)."""

from ..api.quantity import compare_quantities, parse_quantity

__all__ = ["compare_quantities", "parse_quantity"]
