"""Turning a DeepSeekDeployment dict into a validated model, with messages a user can act on."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from .advice import spec_warnings
from .base import RULE_ERROR
from .spec import DeepSeekDeployment


@dataclass
class ParseResult:
    """A validated deployment (None when invalid), the errors that made it invalid, and warnings."""

    deployment: DeepSeekDeployment | None
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.deployment is not None


def json_path(loc: Sequence[int | str]) -> str:
    """('spec', 'x', 0, 'y') -> 'spec.x[0].y'."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += f".{part}" if out else str(part)
    return out


def error_messages(exc: ValidationError) -> list[str]:
    """One line per problem, each starting with the JSON path of the field to fix."""
    out: list[str] = []
    for err in exc.errors(include_url=False):
        path = json_path(err["loc"]) or "(object)"
        if err["type"] == RULE_ERROR:
            out.extend(err["ctx"]["messages"])
        elif err["type"] == "extra_forbidden":
            out.append(f"{path}: unknown field; remove it (field names are camelCase)")
        elif err["type"] == "missing":
            out.append(f"{path}: required field is missing")
        else:
            out.append(f"{path}: {err['msg']}")
    return out


def parse_deployment(obj: Mapping[str, Any]) -> ParseResult:
    """Validate a whole DeepSeekDeployment (as the API server returns it); never raises on bad
    input. Field names must be the camelCase JSON names, as on the server. The status is left out:
    it is the operator's own and never makes a spec invalid."""
    body = {k: v for k, v in obj.items() if k != "status"} if isinstance(obj, Mapping) else obj
    try:
        dep = DeepSeekDeployment.model_validate(body, by_name=False)
    except ValidationError as exc:
        return ParseResult(None, error_messages(exc))
    return ParseResult(dep, [], spec_warnings(dep.spec))
