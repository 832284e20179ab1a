"""The base model of every API object and the cross-field rule type.

Each cross-field rule is written once with its message, a Python check and (where CEL can say it)
a CEL expression, so the operator and the API server reject the same specs with the same words.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel
from pydantic_core import PydanticCustomError

# pydantic error type of a failed cross-field rule; its ctx["messages"] lists every failed rule.
RULE_ERROR = "dsd_rule"


@dataclass(frozen=True)
class Rule:
    """A cross-field rule of one object of the API.

    `message` starts with the JSON path of the field to fix and says how; it is the same text in
    the CRD (x-kubernetes-validations) and in the operator. `ok` sees the object's own fields as
    written (its computed defaults not yet filled in), as `cel` does with `self` bound to the
    object; child objects are already resolved in Python but not in CEL, so a rule must not read a
    child's computed default. `cel` is None for a rule only the operator can check.
    """

    name: str
    message: str
    ok: Callable[[Any], bool]
    cel: str | None


def _add_cel_rules(schema: dict[str, Any], cls: type[BaseModel]) -> None:
    rules = getattr(cls, "__rules__", ())
    cel = [{"rule": r.cel, "message": r.message} for r in rules if r.cel]
    if cel:
        schema["x-kubernetes-validations"] = cel


class ApiModel(BaseModel):
    """Base of the spec objects: camelCase JSON names, unknown fields rejected, rules checked.

    After the rules pass, `_resolve` fills in defaults that depend on other fields, so code that
    reads a validated object never sees them unset.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        validate_by_alias=True,
        validate_by_name=True,
        extra="forbid",
        json_schema_extra=_add_cel_rules,
    )

    __rules__: ClassVar[tuple[Rule, ...]] = ()

    @model_validator(mode="after")
    def _check_rules_then_resolve(self) -> Self:
        failed = [r.message for r in type(self).__rules__ if not r.ok(self)]
        if failed:
            raise PydanticCustomError(RULE_ERROR, "; ".join(failed), {"messages": failed})
        self._resolve()
        return self

    def _resolve(self) -> None:
        """Fill in computed defaults; overridden where a section has some."""

    def to_dict(self) -> dict[str, Any]:
        """The object as Kubernetes JSON (camelCase names, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


class StatusModel(BaseModel):
    """Base of the status objects: written only by the operator; unknown fields are ignored so a
    status written by another operator version never stops the CR from being read."""

    model_config = ConfigDict(
        alias_generator=to_camel, validate_by_alias=True, validate_by_name=True, extra="ignore"
    )

    def to_dict(self) -> dict[str, Any]:
        """The status as Kubernetes JSON (camelCase names, unset fields left out)."""
        return self.model_dump(mode="json", by_alias=True, exclude_none=True)


def section(factory: Callable[[], Any], description: str) -> Any:
    """A spec section that may be left out: defaults to an empty object on the server too, so the
    API server fills in the section's own field defaults before CEL rules look at it. The server
    checks that default against the section's own rules, so those must accept the empty section."""
    return Field(
        default_factory=factory, description=description, json_schema_extra={"default": {}}
    )
