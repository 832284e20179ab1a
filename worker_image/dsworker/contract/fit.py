"""Does a plan fit its accelerators? Weights + KV + workspace per rank against device memory.

Pure: the operator calls `check_fit` with config.json and the deployment's numbers before any pod
starts; `dsworker serve` calls it again at start-up and exits 2 with the same message. Device
memory comes from `spec.worker.accelerator.memory` / the engine config's deviceMemory, or from
the table of known accelerators below (GiB as sold; what the runtime reports is a little less).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.kv_budget import GIB
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import (
    HEADROOM_WARN,
    kv_cache_bytes,
    memory_config,
    weight_bytes,
    workspace_bytes,
)
from dsworker.contract.model_config import ModelConfig
from dsworker.contract.precision import QuantDescription
from dsworker.contract.quant import quant_format

# Bytes per element of the engine config's compute dtypes.
COMPUTE_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
# What the worker reads as one device's memory in GiB (the operator sets it from the spec).
MEMORY_ENV = "DSWORKER_DEVICE_MEMORY_GIB"

# Device memory per accelerator, bytes (vendor figures).
ACCELERATORS: dict[str, int] = {
    "ascend-910b1": 64 * GIB,
    "ascend-910b2": 64 * GIB,
    "ascend-910b3": 64 * GIB,
    "ascend-910b4": 32 * GIB,
    "ascend-a3": 64 * GIB,  # per die of an Atlas A3 (910C: two dies of 64 GB)
    "nvidia-a100-40gb": 40 * GIB,
    "nvidia-a100-80gb": 80 * GIB,
    "nvidia-h100": 80 * GIB,
    "nvidia-h200": 141 * GIB,
    "nvidia-b200": 180 * GIB,
}


@dataclass(frozen=True)
class Fit:
    """One rank's budget (the largest rank's), and the verdict with a message naming the numbers."""

    weights: int
    kv: int  # the KV the plan asks for: npuMemSize, else maxBatchSize sequences of maxSeqLen
    kv_min: int  # one maxSeqLen sequence: less than this cannot serve
    workspace: int
    device: int
    quantised: bool = False  # already 8-bit: the fix is ranks or a smaller KV, not a format

    @property
    def total(self) -> int:
        return self.weights + self.kv + self.workspace

    @property
    def fits(self) -> bool:
        """Weights, workspace and at least one maxSeqLen sequence of KV fit."""
        return self.weights + self.kv_min + self.workspace <= self.device

    @property
    def headroom(self) -> float:
        return (self.device - self.total) / self.device

    @property
    def low_headroom(self) -> bool:
        return self.fits and self.headroom < HEADROOM_WARN

    def message(self) -> str:
        def g(n: int) -> str:
            return f"{n / GIB:.1f} GiB"

        head = (
            f"per rank: weights {g(self.weights)} + KV {g(self.kv)} (one maxSeqLen sequence "
            f"{g(self.kv_min)}) + workspace {g(self.workspace)} = {g(self.total)} against "
            f"{g(self.device)} of device memory"
        )
        if not self.fits:
            fmt = "" if self.quantised else "a quantised format (fp8, w8a8, w8a16), "
            return (
                f"the plan does not fit: {head}; use more ranks (tp / moeEp), {fmt}"
                "or a smaller maxSeqLen x maxBatchSize"
            )
        if self.kv > self.device - self.weights - self.workspace:
            return (
                f"fits with fewer concurrent sequences than maxBatchSize: {head}; the KV cache "
                "takes what is left, or use more ranks or a smaller maxSeqLen x maxBatchSize"
            )
        return f"fits: {head} ({self.headroom:.0%} headroom)"


def check_fit(
    cfg: Mapping[str, Any] | ModelConfig,
    plan: ParallelPlan,
    device_bytes: int,
    *,
    max_seq_len: int,
    max_batch_size: int,
    page_size: int = 128,
    prefill_tokens: int = 8192,
    npu_mem_size: int = -1,
    mtp: bool = False,
    dtype_bytes: int = 2,
    description: QuantDescription | None = None,
) -> Fit:
    """The largest rank's budget for this plan (config.json, validated here when a dict, and
    engine-config numbers; msModelSlim's description where the caller has the checkpoint);
    ModelConfigError names a malformed key."""
    cfg = memory_config(cfg)
    weights = max(weight_bytes(cfg, plan, mtp, dtype_bytes, description).device)
    page = min(page_size, max_seq_len)
    one, wanted = kv_cache_bytes(cfg, plan, max_seq_len, max_batch_size, page, mtp, dtype_bytes)
    kv = npu_mem_size * GIB if npu_mem_size >= 0 else wanted
    work = workspace_bytes(cfg, prefill_tokens, dtype_bytes)
    return Fit(weights, kv, one, work, device_bytes, quant_format(cfg) is not None)


def engine_fit(
    cfg: Mapping[str, Any] | ModelConfig,
    engine: EngineConfig,
    device_bytes: int,
    description: QuantDescription | None = None,
) -> Fit:
    """check_fit with an engine config's numbers: the one mapping the operator and `dsworker
    serve` share, so both reach the same verdict."""
    return check_fit(
        cfg,
        ParallelPlan(engine.worldSize, engine.dp, engine.tp, engine.moe_tp, engine.moe_ep),
        device_bytes,
        max_seq_len=engine.maxSeqLen,
        max_batch_size=engine.maxBatchSize,
        page_size=engine.cacheBlockSize,
        prefill_tokens=engine.maxPrefillTokens,
        npu_mem_size=engine.npuMemSize,
        mtp=engine.mtp,
        dtype_bytes=COMPUTE_DTYPE_BYTES[engine.dtype],
        description=description,
    )
