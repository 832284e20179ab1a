"""The Validated condition of a valid spec: the settings that have no effect (spec warnings, a store
spec the claim cannot take), children the API server refused, and objects under a child's name
that are not ours. Each problem is posted as a Warning Event once, when its message is new."""

from __future__ import annotations

from ..api.status import VALIDATED
from . import ownership
from . import status as st
from .state import PassState
from .status import Cond, EventSpec

# The spec fields each kind of child passes through to the API server: where to look when one is
# refused.
CHILD_FIELDS = {
    "StatefulSet": "fix spec.worker: resources, env, nodeSelector, tolerations, affinity, "
    "podAnnotations, priorityClassName, schedulerName",
    # Paths are checked at admission; a hostPath the API server still refuses is one of these.
    "Job": "fix spec.sharding.resources, spec.model.source or spec.sharding.store paths, or "
    "spec.worker placement and imagePullPolicy",
    "PersistentVolumeClaim": "fix spec.sharding.store.pvc",
    "Service": "fix spec.serving.port",
    "PodDisruptionBudget": "fix spec.parallelism.nodes",
    "ConfigMap": "fix spec.serving",
}


def validated(state: PassState, store_warning: str) -> Cond:
    """Valid, with the settings that have no effect named; each warning is posted as an
    Event once, when it first appears in the condition's message."""
    spec_text = "; ".join(state.warnings)
    text = "; ".join(t for t in (store_warning, spec_text) if t)
    if not text:
        return Cond(VALIDATED, "True", st.VALID, "the spec is valid")
    old = st.condition(state.previous, VALIDATED)
    before = old.message if old is not None else ""
    if store_warning and store_warning not in before:
        state.events.append(EventSpec("Warning", "StoreSpecNotApplied", st.truncate(store_warning)))
    if spec_text and spec_text not in before:
        state.events.append(EventSpec("Warning", "SpecWarning", st.truncate(spec_text)))
    reason = st.STORE_SPEC_NOT_APPLIED if store_warning else st.VALID_WITH_WARNINGS
    return Cond(VALIDATED, "True", reason, text)


def rejected(state: PassState) -> str:
    """What the API server refused to store, with the spec fields the child is built from;
    a Warning Event when the message is new."""
    texts = [
        f"the API server refused {child} ({CHILD_FIELDS.get(child.split()[0], 'the spec')}): {why}"
        for child, why in sorted(state.observed.rejected.items())
    ]
    text = "; ".join(texts)
    if text:
        old = st.condition(state.previous, VALIDATED)
        if old is None or old.reason != st.CHILD_REJECTED or old.message != text:
            state.events.append(EventSpec("Warning", "ChildRejected", st.truncate(text)))
    return text


def foreign(state: PassState) -> str:
    """Objects under a child's name that are not ours: their children are held back (never
    applied over, adopted or deleted); a Warning Event when the message is new."""
    found = state.observed.foreign
    if not found:
        return ""
    state.apply = ownership.hold(state.apply, found)
    text = ownership.foreign_message(found, state.ctx.name)
    old = st.condition(state.previous, VALIDATED)
    if old is None or old.reason != st.FOREIGN_OBJECT or old.message != text:
        state.events.append(EventSpec("Warning", "ForeignObject", st.truncate(text)))
    return text
