"""The start-up memory check of `dsworker serve`: refuse a plan that cannot fit before any rank starts.

The same arithmetic the operator runs (contract/fit.py), on the real config.json (and msModelSlim's
description, which the operator cannot see) and the engine config. Device memory:
DSWORKER_DEVICE_MEMORY_GIB (the operator's spec.worker.accelerator.memory), else what the
accelerator of local rank 0 reports; on cpu there is no limit to check.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from dsworker.checkpoint.hf_checkpoint import read_model_config
from dsworker.checkpoint.quant_description import read_quant_description
from dsworker.contract.engine_config import EngineConfig, EngineConfigError
from dsworker.contract.fit import MEMORY_ENV, Fit, engine_fit
from dsworker.contract.kv_budget import GIB

log = logging.getLogger("dsworker.launch.fit")


def device_memory(cfg: EngineConfig) -> int | None:
    """Bytes of one device: the env override, else the accelerator's own figure, else None."""
    env = os.environ.get(MEMORY_ENV)
    if env:
        try:
            return int(float(env) * GIB)
        except ValueError:
            raise EngineConfigError(f"{MEMORY_ENV}={env!r}: give device memory in GiB") from None
    from dsworker.parallel.device import Device

    dev = Device.create(cfg.device, 0)
    if not dev.is_accelerator:
        return None
    return int(dev.module.get_device_properties(dev.torch).total_memory)


def check_start(model_dir: Path, cfg: EngineConfig) -> Fit | None:
    """Raise EngineConfigError (exit 2) naming the numbers and the fix when the plan does not fit."""
    mem = device_memory(cfg)
    if mem is None:
        return None
    desc = read_quant_description(Path(model_dir))  # the modules msModelSlim kept in float
    fit = engine_fit(read_model_config(model_dir).raw, cfg, mem, desc)
    if not fit.fits:
        raise EngineConfigError(f"{model_dir}: {fit.message()}")
    (log.warning if fit.low_headroom else log.info)("memory: %s", fit.message())
    return fit
