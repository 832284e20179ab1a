"""The core/v1 fields the spec passes through to pods (ResourceRequirements, EnvVar).

They are free-form in the CRD (a quantity may be a number or a string there), so the operator
checks them itself: a typo is then reported on the spec, with the field to fix, instead of as a
StatefulSet or Job the API server refuses to store.
"""

from __future__ import annotations

from typing import Any

from pydantic import Field
from pydantic_core import PydanticCustomError

from .base import ApiModel, Rule
from .quantity import parse_quantity

# The Kubernetes resource.Quantity syntax, e.g. 2Ti, 500Gi, 1e12.
QUANTITY = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))(([KMGTPE]i)|[numkMGTPE]|"
    r"([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
RESOURCE_KEYS = ("limits", "requests", "claims")
# Printable ASCII but "=": what the API server accepts as an environment variable name.
ENV_NAME = r"^[ -<>-~]+$"


def resource_errors(value: Any) -> list[str]:
    """What the API server would refuse in a ResourceRequirements, each as '<sub-path>: why'."""
    if not isinstance(value, dict):
        return ["must be an object with limits and/or requests"]
    out = [
        f"{key}: unknown field; use limits, requests or claims"
        for key in value
        if key not in RESOURCE_KEYS
    ]
    parsed: dict[str, dict[str, Any]] = {}
    for kind in ("limits", "requests"):
        values = value.get(kind)
        if values is None:
            continue
        if not isinstance(values, dict):
            out.append(f"{kind}: must map resource names to quantities")
            continue
        parsed[kind] = {}
        for name, quantity in values.items():
            number = parse_quantity(quantity) if isinstance(quantity, str | int | float) else None
            if number is None:
                out.append(f"{kind}.{name}: {quantity!r} is not a quantity (e.g. 64Gi, 500m, 8)")
            elif number < 0:
                out.append(f"{kind}.{name}: must not be negative")
            else:
                parsed[kind][name] = number
    for name, request in (parsed.get("requests") or {}).items():
        limit = (parsed.get("limits") or {}).get(name)
        if limit is not None and request > limit:
            out.append(
                f"requests.{name}: {value['requests'][name]} is more than limits.{name} "
                f"{value['limits'][name]}; raise the limit or lower the request"
            )
    return out


def check_resources(value: dict[str, Any] | None) -> dict[str, Any] | None:
    """pydantic field validator of a resources field: every problem, in one error."""
    errors = resource_errors(value) if value is not None else []
    if errors:
        raise PydanticCustomError("dsd_resources", "{detail}", {"detail": "; ".join(errors)})
    return value


class EnvVar(ApiModel):
    """One environment variable of the engine (core/v1 EnvVar)."""

    __rules__ = (
        Rule(
            "env-value-or-value-from",
            "spec.worker.env: an entry sets value or valueFrom, not both; remove one of them",
            lambda e: not (e.value and e.value_from is not None),
            "!has(self.valueFrom) || !has(self.value) || size(self.value) == 0",
        ),
    )

    name: str = Field(
        min_length=1,
        max_length=1024,
        pattern=ENV_NAME,
        description="Name of the variable. The same name as one the operator sets (POD_NAME, "
        "MASTER_ADDR, ...) replaces the operator's value.",
    )
    value: str | None = Field(None, max_length=65536, description="The value.")
    value_from: dict[str, Any] | None = Field(
        None,
        description="Where the value comes from (core/v1 EnvVarSource: fieldRef, "
        "configMapKeyRef, secretKeyRef, resourceFieldRef).",
    )
