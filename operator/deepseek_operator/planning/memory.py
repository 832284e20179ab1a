"""Does the plan fit the devices? The worker contract's memory model (weights, KV cache and
workspace per rank) on the model's config.json, the engine config the workers get and
spec.worker.accelerator's device memory: a plan that cannot fit never starts, and one with little
headroom is warned about, before hundreds of GB are sharded and staged."""

from __future__ import annotations

import functools
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.fit import Fit, engine_fit
from dsworker.contract.memory import HEADROOM_WARN, memory_config
from dsworker.contract.model_config import ModelConfig
from dsworker.contract.quant import quant_format

from ..api import DeepSeekDeploymentSpec
from .runtimes.dsworker import engine_config

# What the memory model reads as each weight format when config.json does not say it itself
# (an msModelSlim W8A8 checkpoint declares it in quant_model_description*.json).
_DECLARED: dict[str, dict[str, Any]] = {
    "w8a8": {"quantize": "w8a8"},
    "w8a16": {
        "quantization_config": {
            "quant_method": "compressed-tensors",
            "config_groups": {"group_0": {"weights": {"num_bits": 8, "type": "int"}}},
        }
    },
}


@dataclass(frozen=True)
class MemoryVerdict:
    """The fit of the largest rank and the text for the status: an error when the plan does not
    fit, a warning when it fits with under 10% headroom, else neither."""

    fit: Fit
    error: str = ""
    warning: str = ""


def weights_config(
    config: ModelConfig | Mapping[str, Any], quantization: str | None, dequantize_fp8: bool
) -> dict[str, Any]:
    """config.json as the workers will hold the weights: BF16 after dequantizeFp8, and the
    format the spec or the checkpoint's description files name when config.json is silent."""
    cfg = dict(config.raw if isinstance(config, ModelConfig) else config)
    fmt = quant_format(cfg)
    if dequantize_fp8 and fmt is not None and fmt.kind == "fp8":
        cfg.pop("quantization_config", None)
    elif fmt is None and quantization in _DECLARED:
        cfg.update(_DECLARED[quantization])
    return cfg


def check_memory(
    spec: DeepSeekDeploymentSpec, config: ModelConfig | Mapping[str, Any], quantization: str | None
) -> MemoryVerdict | None:
    """The verdict for a spec whose device memory is known (None when it is not). The memory
    model validates the config it counts: ModelConfigError names a key it lacks or cannot use."""
    device = spec.worker.accelerator.memory_bytes()
    if device is None:
        return None
    memory_config(config)  # a malformed key named as the config's source names it
    cfg = weights_config(config, quantization, spec.model.dequantize_fp8)
    fit = _fit(json.dumps(cfg, sort_keys=True), engine_config(spec).to_json(), device)
    where = _source(spec)
    if not fit.fits:
        return MemoryVerdict(fit, error=f"{fit.message()} ({where})")
    if fit.low_headroom:
        return MemoryVerdict(
            fit,
            warning=f"under {HEADROOM_WARN:.0%} of device memory is left over, {fit.message()} "
            f"({where})",
        )
    return MemoryVerdict(fit)


@functools.lru_cache(maxsize=64)
def _fit(config_json: str, engine_json: str, device: int) -> Fit:
    """Memoised: counting an R1-sized checkpoint's tensors takes about a second, and every
    reconcile pass of a deployment asks again with the same inputs."""
    return engine_fit(
        json.loads(config_json), EngineConfig.model_validate_json(engine_json), device
    )


def _source(spec: DeepSeekDeploymentSpec) -> str:
    acc = spec.worker.accelerator
    if acc.memory is not None:
        return f"spec.worker.accelerator.memory {acc.memory}"
    return f"spec.worker.accelerator.product {acc.product}"
