"""The memory fit from the config.json the sharding Job read (issue 17): without the
llm.dsop.io/model-config annotation the operator learns the model only from the sharder's report
(status.shards.modelConfig), and checks the same fit with it before any worker starts."""

from __future__ import annotations

from typing import Any

from dsworker.contract.model_config import ModelConfigError, parse_model_config

from .memory import check_memory
from .shards import Shards
from .state import PassState


def reported_config(state: PassState, shards: Shards) -> tuple[dict[str, Any], str | None] | None:
    """(config.json keys, weight format) as the sharder reported them for this plan: from its
    termination message, else as recorded in the status for the same fingerprint."""
    summary = shards.summary or {}
    if isinstance(summary.get("modelConfig"), dict):
        quant = summary.get("quantization")
        return summary["modelConfig"], quant if isinstance(quant, str) else None
    old = state.previous.shards
    if (
        old is not None
        and old.model_config_keys
        and state.previous.fingerprint == state.ctx.fingerprint
    ):
        return old.model_config_keys, old.quantization
    return None


def check_reported_fit(state: PassState, shards: Shards) -> str:
    """The refusal (the plan does not fit) when the shards are complete and the sharder reported
    the model, else ""; a fit with little headroom sets state.memory_warning."""
    if state.config_known or not shards.complete or shards.failed:
        return ""
    reported = reported_config(state, shards)
    if reported is None:
        return ""  # an older sharder: the worker checks at start-up
    config, detected = reported
    spec = state.spec
    quantization = detected if spec.model.quantization == "auto" else spec.model.quantization
    try:
        verdict = check_memory(
            spec, parse_model_config(config, where="the sharding Job's config.json"), quantization
        )
    except ModelConfigError:
        return ""  # the sharder validated it; a report this version cannot read: the worker checks
    if verdict is None:
        return ""
    if verdict.error:
        return f"{verdict.error}; config.json as the sharding Job read it"
    state.memory_warning = verdict.warning
    return ""
