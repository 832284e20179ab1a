"""The core/v1 placement types spec.worker passes to its pods: Toleration, Affinity, nodeSelector.

Typed with Kubernetes' own OpenAPI shapes (field names, enums, required fields) and its own
validation of them (operators and their values), so a wrong type or a typo is refused at admission
with the field to fix, never by the API server when the operator creates the StatefulSet. Unknown
fields are refused too: a field newer than these models needs a newer operator. Lists are bounded
so the API server can bound the cost of the CEL rules.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field

from .base import ApiModel, Rule

MAX_TERMS = 32
MAX_EXPRESSIONS = 32
MAX_VALUES = 256
MAX_TOLERATIONS = 64
MAX_LABELS = 64
# A label value (core/v1 validation): at most 63 characters, alphanumeric at both ends.
LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# A qualified name (label key): an optional DNS-subdomain prefix and a name of <= 63 characters.
_LABEL_KEY = (
    r"([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?"
)
LABEL_KEY = f"^{_LABEL_KEY}$"
_INTEGER = r"^-?[0-9]+$"

LabelValue = Annotated[str, Field(max_length=63, pattern=LABEL_VALUE)]
# Values of a node requirement: label values, or node names for matchFields (metadata.name).
NodeValue = Annotated[str, Field(max_length=253)]
Name = Annotated[str, Field(max_length=316)]

NodeOperator = Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
LabelOperator = Literal["In", "NotIn", "Exists", "DoesNotExist"]


def _key(description: str) -> Any:
    return Field(min_length=1, max_length=316, description=description)


def _values() -> Any:
    return Field(
        None,
        max_length=MAX_VALUES,
        description="The values; non-empty for In and NotIn, empty for Exists and DoesNotExist, "
        "one integer for Gt and Lt.",
    )


def _values_ok(r: NodeSelectorRequirement | LabelSelectorRequirement) -> bool:
    if r.operator in ("In", "NotIn"):
        return bool(r.values)
    if r.operator in ("Exists", "DoesNotExist"):
        return not r.values
    return len(r.values or ()) == 1 and re.fullmatch(_INTEGER[1:-1], r.values[0]) is not None


def _values_rule(where: str) -> Rule:
    return Rule(
        f"{where}-values",
        f"spec.worker.affinity: a matchExpressions entry ({where}) with operator In or NotIn "
        "needs values, one with Exists or DoesNotExist has none, one with Gt or Lt exactly one "
        "integer; set values to match the operator",
        _values_ok,
        "(self.operator in ['In', 'NotIn']) ? (has(self.values) && size(self.values) > 0) : "
        "(self.operator in ['Exists', 'DoesNotExist']) ? "
        "(!has(self.values) || size(self.values) == 0) : "
        "(has(self.values) && size(self.values) == 1 && self.values[0].matches('^-?[0-9]+$'))",
    )


class NodeSelectorRequirement(ApiModel):
    """A node label (or field) compared with values (core/v1 NodeSelectorRequirement)."""

    __rules__ = (_values_rule("nodeSelectorRequirement"),)

    key: str = _key("The label key the selector applies to.")
    operator: NodeOperator = Field(description="In, NotIn, Exists, DoesNotExist, Gt or Lt.")
    values: list[NodeValue] | None = _values()


class NodeSelectorTerm(ApiModel):
    """Requirements that must all hold (core/v1 NodeSelectorTerm)."""

    match_expressions: list[NodeSelectorRequirement] | None = Field(
        None, max_length=MAX_EXPRESSIONS, description="Requirements on node labels."
    )
    match_fields: list[NodeSelectorRequirement] | None = Field(
        None, max_length=MAX_EXPRESSIONS, description="Requirements on node fields."
    )


class NodeSelector(ApiModel):
    """Terms of which at least one must hold (core/v1 NodeSelector)."""

    node_selector_terms: list[NodeSelectorTerm] = Field(
        min_length=1, max_length=MAX_TERMS, description="The terms, ORed."
    )


class PreferredSchedulingTerm(ApiModel):
    """A weighted preference for nodes (core/v1 PreferredSchedulingTerm)."""

    weight: int = Field(ge=1, le=100, description="Weight, 1-100.")
    preference: NodeSelectorTerm = Field(description="The nodes preferred.")


class NodeAffinity(ApiModel):
    """Node affinity (core/v1 NodeAffinity)."""

    required_during_scheduling_ignored_during_execution: NodeSelector | None = Field(
        None, description="Nodes the pods must run on."
    )
    preferred_during_scheduling_ignored_during_execution: list[PreferredSchedulingTerm] | None = (
        Field(None, max_length=MAX_TERMS, description="Nodes the pods prefer.")
    )


class LabelSelectorRequirement(ApiModel):
    """A label compared with values (meta/v1 LabelSelectorRequirement)."""

    __rules__ = (_values_rule("labelSelectorRequirement"),)

    key: str = _key("The label key the selector applies to.")
    operator: LabelOperator = Field(description="In, NotIn, Exists or DoesNotExist.")
    values: list[LabelValue] | None = _values()


class LabelSelector(ApiModel):
    """A label query (meta/v1 LabelSelector)."""

    match_labels: dict[str, LabelValue] | None = Field(
        None, max_length=MAX_LABELS, description="Labels that must all match."
    )
    match_expressions: list[LabelSelectorRequirement] | None = Field(
        None, max_length=MAX_EXPRESSIONS, description="Requirements, ANDed."
    )


class PodAffinityTerm(ApiModel):
    """Pods this pod should run near, or away from (core/v1 PodAffinityTerm)."""

    label_selector: LabelSelector | None = Field(None, description="The pods.")
    namespace_selector: LabelSelector | None = Field(
        None, description="Namespaces of the pods; with namespaces, the union."
    )
    namespaces: list[LabelValue] | None = Field(
        None, max_length=MAX_TERMS, description="Namespaces of the pods. Default: the pod's own."
    )
    topology_key: str = Field(
        min_length=1,
        max_length=316,
        description="Node label whose equal values count as near, e.g. kubernetes.io/hostname.",
    )
    match_label_keys: list[Name] | None = Field(
        None,
        max_length=MAX_TERMS,
        description="Pod label keys whose values are added to labelSelector (In).",
    )
    mismatch_label_keys: list[Name] | None = Field(
        None,
        max_length=MAX_TERMS,
        description="Pod label keys whose values are added to labelSelector (NotIn).",
    )


class WeightedPodAffinityTerm(ApiModel):
    """A weighted pod affinity term (core/v1 WeightedPodAffinityTerm)."""

    weight: int = Field(ge=1, le=100, description="Weight, 1-100.")
    pod_affinity_term: PodAffinityTerm = Field(description="The term.")


class PodAffinity(ApiModel):
    """Pod affinity or anti-affinity (core/v1 PodAffinity, PodAntiAffinity)."""

    required_during_scheduling_ignored_during_execution: list[PodAffinityTerm] | None = Field(
        None, max_length=MAX_TERMS, description="Terms that must all hold."
    )
    preferred_during_scheduling_ignored_during_execution: list[WeightedPodAffinityTerm] | None = (
        Field(None, max_length=MAX_TERMS, description="Terms preferred, by weight.")
    )


class Affinity(ApiModel):
    """Scheduling constraints of the worker pods (core/v1 Affinity)."""

    node_affinity: NodeAffinity | None = Field(None, description="Nodes the pods run on.")
    pod_affinity: PodAffinity | None = Field(None, description="Pods the pods run near.")
    pod_anti_affinity: PodAffinity | None = Field(None, description="Pods the pods avoid.")


class Toleration(ApiModel):
    """A taint the worker pods tolerate (core/v1 Toleration)."""

    __rules__ = (
        Rule(
            "toleration-exists-no-value",
            "spec.worker.tolerations: an entry with operator Exists has no value; remove the "
            "value or use operator Equal",
            lambda t: t.operator != "Exists" or not t.value,
            "!has(self.operator) || self.operator != 'Exists' || !has(self.value) || "
            "size(self.value) == 0",
        ),
        Rule(
            "toleration-empty-key-exists",
            "spec.worker.tolerations: an entry without key must have operator Exists (it "
            "tolerates every taint); set a key or operator: Exists",
            lambda t: bool(t.key) or t.operator == "Exists",
            "(has(self.key) && size(self.key) > 0) || "
            "(has(self.operator) && self.operator == 'Exists')",
        ),
        Rule(
            "toleration-seconds-no-execute",
            "spec.worker.tolerations: tolerationSeconds applies only to effect NoExecute; set "
            "effect: NoExecute or remove tolerationSeconds",
            lambda t: t.toleration_seconds is None or t.effect == "NoExecute",
            "!has(self.tolerationSeconds) || (has(self.effect) && self.effect == 'NoExecute')",
        ),
    )

    key: str | None = Field(
        None,
        max_length=316,
        pattern=f"^({_LABEL_KEY})?$",
        description="Taint key; empty with operator Exists tolerates every taint.",
    )
    operator: Literal["Exists", "Equal", ""] | None = Field(
        None, description="Exists or Equal (default Equal)."
    )
    value: str | None = Field(
        None, max_length=63, description="Taint value to match (operator Equal)."
    )
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute", ""] | None = Field(
        None, description="NoSchedule, PreferNoSchedule or NoExecute; empty matches all."
    )
    toleration_seconds: int | None = Field(
        None,
        description="How long a NoExecute taint is tolerated before eviction; default forever.",
    )


def node_selector_keys_ok(selector: dict[str, str] | None) -> bool:
    """Every key of a nodeSelector is a label key (the values are checked by the schema)."""
    return all(len(k) <= 316 and re.fullmatch(_LABEL_KEY, k) for k in selector or {})


NODE_SELECTOR_RULE = Rule(
    "node-selector-keys",
    "spec.worker.nodeSelector: each key must be a label key (an optional DNS prefix and '/', then "
    "up to 63 letters, digits, '-', '_' or '.'), e.g. kubernetes.io/hostname",
    lambda w: node_selector_keys_ok(w.node_selector),
    "!has(self.nodeSelector) || self.nodeSelector.all(k, size(k) <= 316 && "
    f"k.matches('{LABEL_KEY.replace(chr(92), chr(92) * 2)}'))",
)
