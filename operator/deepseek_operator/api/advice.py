"""Accepted settings that have no effect: reported as Warning Events and in a condition."""

from __future__ import annotations

from .spec import DeepSeekDeploymentSpec


def spec_warnings(spec: DeepSeekDeploymentSpec) -> list[str]:
    """Warnings for a validated spec; each names the field and why it does nothing."""
    out: list[str] = []
    ep, sharding, model = spec.expert_parallel, spec.sharding, spec.model
    if ep.alltoall_buffer_scale_factors and ep.level == 1:
        out.append(
            "spec.expertParallel.alltoallBufferScaleFactors has no effect with level 1 "
            "(AllGather EP); it applies to level 2 only"
        )
    if not sharding.enabled and sharding.store is not None:
        out.append("spec.sharding.store has no effect while spec.sharding.enabled is false")
    if (
        sharding.enabled
        and sharding.store is not None
        and sharding.store.host_path is not None
        and sharding.stage_to_tmpfs
        and "stage_to_tmpfs" in sharding.model_fields_set
    ):
        out.append(
            "spec.sharding.stageToTmpfs has no effect with a hostPath store: workers load the "
            "node-local shards in place"
        )
    if model.dequantize_fp8 and model.quantization not in ("auto", "fp8"):
        out.append(
            f"spec.model.dequantizeFp8 has no effect: spec.model.quantization is "
            f"{model.quantization}, not fp8"
        )
    if spec.serving.speculative_tokens > 1 and not model.mtp:  # the API server fills in 1
        out.append(
            "spec.serving.speculativeTokens has no effect while spec.model.mtp is false: the "
            "MTP layer drafts the tokens"
        )
    acc = spec.worker.accelerator
    if acc.type == "cpu" and acc.resource_name is not None:
        out.append("spec.worker.accelerator.resourceName is ignored for type cpu")
    return out
