"""The engine config file: what the operator renders into a ConfigMap and `dsworker serve` reads.

Key names are MindIE's where MindIE has one (ModelDeployConfig / ScheduleConfig camelCase names,
`models.deepseekv2` snake_case names), so a MindIE user recognises them. Pure: the operator imports
this module to render the file, the worker to parse it; unknown keys are an error that names them.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

# MindIE's documented example table: [sequence-length threshold, buffer factor], descending.
DEFAULT_BUFFER_SCALE_FACTORS: list[tuple[int, float]] = [
    (1048576, 1.32),
    (524288, 1.4),
    (262144, 1.53),
    (131072, 1.8),
    (32768, 3.0),
    (8192, 5.2),
    (0, 8.0),
]


class EngineConfigError(ValueError):
    """An engine config that cannot run; the message names the key and the fix."""


class EngineConfig(BaseModel):
    """Everything a worker needs beyond the weights: serving limits and the parallel plan."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    modelName: str = Field("deepseek", description="Served model name (OpenAI `model`).")
    maxSeqLen: int = Field(2560, ge=2, description="Prompt plus generated tokens per sequence.")
    maxInputTokenLen: int = Field(2048, ge=1, description="Longest prompt accepted.")
    truncation: bool = Field(False, description="Truncate over-long prompts instead of refusing.")
    maxBatchSize: int = Field(16, ge=1, description="Sequences decoded together.")
    maxPrefillTokens: int = Field(
        8192,
        ge=1,
        description="Tokens per engine step (prompt chunks, one per decode plus its MTP drafts).",
    )
    cacheBlockSize: int = Field(
        128,
        ge=1,
        description="KV cache page size in positions: a sequence takes pages as its tokens "
        "fill them.",
    )
    prefixCaching: bool = Field(
        True,
        description="Keep the full KV pages of ended sequences for later prompts that start "
        "with the same tokens.",
    )
    reasoningParser: Literal["deepseek_r1"] | None = Field(
        None,
        description="deepseek_r1: chat answers carry the text up to `</think>` as "
        "reasoning_content, the rest as content (R1's thinking apart from its answer).",
    )
    toolCallParser: Literal["deepseek_v3"] | None = Field(
        None,
        description="deepseek_v3: chat requests may carry `tools`, and DeepSeek-V3/R1's "
        "tool-call markup in an answer comes back as OpenAI `tool_calls` (vLLM's "
        "--tool-call-parser deepseek_v3); unset refuses `tools`.",
    )
    maxRequestBytes: int = Field(1 << 20, ge=1024, description="Largest HTTP request body.")
    maxConnections: int = Field(
        1024,
        ge=1,
        le=65536,
        description="Open HTTP connections rank 0 holds at once; one more is answered 503 and "
        "closed. Start-up raises the open-file limit to fit, or fails naming this key.",
    )
    requestReadTimeout: int = Field(
        30,
        ge=1,
        description="Seconds a request may take to arrive whole (headers and body) from its "
        "first byte, or from the connection's opening; a slower one is answered 408 and closed.",
    )
    keepAliveTimeout: int = Field(
        5, ge=1, description="Seconds an idle keep-alive connection is held between requests."
    )
    apiKeyFile: str | None = Field(
        None,
        description="File holding the API key that /v1 requests must send as `Authorization: "
        "Bearer <key>` (401 without it); unset: env DSWORKER_API_KEY_FILE, else no key. "
        "/health and /metrics stay open.",
    )
    maxNewTokens: int = Field(1024, ge=1, description="Upper bound on a request's max_tokens.")
    port: int = Field(1025, ge=1, le=65535, description="HTTP port of rank 0.")
    cpuMemSize: int = Field(5, ge=0, description="Accepted for MindIE; unused (no host swap).")
    npuMemSize: int = Field(
        -1,
        ge=-1,
        description="KV-cache GiB per rank (its pages); -1 = free memory less a reserve.",
    )
    worldSize: int = Field(1, ge=1, description="Ranks in the model instance.")
    dp: int = Field(1, ge=1, description="Attention data-parallel groups.")
    tp: int = Field(1, ge=1, description="Attention/dense tensor-parallel size.")
    moe_tp: int = Field(1, ge=1, description="Tensor parallel inside each routed expert.")
    moe_ep: int = Field(1, ge=1, description="Expert-parallel size.")
    ep_level: Literal[1, 2] = Field(1, description="1 = AllGather EP, 2 = AllToAll EP.")
    enable_init_routing_cutoff: bool = Field(False, description="Cap routed rows (ep_level 1).")
    topk_scaling_factor: float = Field(1.0, gt=0, le=1, description="Routing cutoff factor.")
    alltoall_ep_buffer_scale_factors: list[tuple[int, float]] = Field(
        default_factory=lambda: list(DEFAULT_BUFFER_SCALE_FACTORS),
        description="[seqLenThreshold, factor] pairs, descending; ep_level 2 buffer sizing.",
    )
    grouped_matmul: Literal["auto", "on", "off"] = Field("auto", description="auto = moe_ep > 32.")
    mtp: bool = Field(
        False,
        description="Load the MTP layer and decode speculatively: draft tokens per sequence and "
        "step, verified by the main model (greedy output unchanged).",
    )
    num_speculative_tokens: int = Field(
        1,
        ge=1,
        le=4,
        description="MTP drafts per sequence and step (with mtp): the layer's own, then the "
        "layer again on each draft.",
    )
    cudaGraphs: bool = Field(
        True,
        description="Replay decode steps as device graphs (CUDA; NPU through torch_npu's "
        "NPUGraph) at every worldSize, MTP draft steps included; not with the routing cutoff.",
    )
    torchCompile: bool = Field(False, description="torch.compile the graphed decode step.")
    dtype: Literal["bfloat16", "float16", "float32"] = Field(
        "bfloat16", description="Compute dtype."
    )
    device: Literal["auto", "cpu", "cuda", "npu"] = Field("auto", description="Device backend.")

    @model_validator(mode="after")
    def _rules(self) -> EngineConfig:
        if self.maxInputTokenLen >= self.maxSeqLen:
            raise ValueError("maxInputTokenLen must be < maxSeqLen")
        if self.dp * self.tp != self.worldSize:
            raise ValueError(f"dp*tp ({self.dp}*{self.tp}) must equal worldSize ({self.worldSize})")
        if self.moe_tp * self.moe_ep != self.worldSize:
            raise ValueError(
                f"moe_tp*moe_ep ({self.moe_tp}*{self.moe_ep}) must equal worldSize ({self.worldSize})"
            )
        if self.enable_init_routing_cutoff and self.ep_level != 1:
            raise ValueError("enable_init_routing_cutoff requires ep_level 1")
        thresholds = [t for t, _ in self.alltoall_ep_buffer_scale_factors]
        if any(t < 0 for t in thresholds) or any(
            f <= 0 for _, f in self.alltoall_ep_buffer_scale_factors
        ):
            raise ValueError("alltoall_ep_buffer_scale_factors: thresholds >= 0, factors > 0")
        if any(a <= b for a, b in zip(thresholds, thresholds[1:], strict=False)):
            raise ValueError(
                "alltoall_ep_buffer_scale_factors must be strictly descending by threshold"
            )
        return self

    @property
    def use_grouped_matmul(self) -> bool:
        return self.grouped_matmul == "on" or (self.grouped_matmul == "auto" and self.moe_ep > 32)

    def buffer_factor(self, seq_len: int) -> float:
        """The first table entry whose threshold <= seq_len (MindIE's selection rule)."""
        for threshold, factor in self.alltoall_ep_buffer_scale_factors:
            if threshold <= seq_len:
                return factor
        return (
            self.alltoall_ep_buffer_scale_factors[-1][1]
            if self.alltoall_ep_buffer_scale_factors
            else 1.0
        )

    def to_json(self) -> str:
        return json.dumps(self.model_dump(mode="json"), indent=2, sort_keys=True) + "\n"


def parse_engine_config(data: dict[str, Any], source: str = "engine config") -> EngineConfig:
    """Validate a dict, turning pydantic errors into one message that names every bad key."""
    try:
        return EngineConfig.model_validate(data)
    except ValidationError as exc:
        problems = []
        for err in exc.errors():
            loc = ".".join(str(p) for p in err["loc"]) or "(root)"
            msg = (
                "unknown key (remove it or check its spelling)"
                if err["type"] == "extra_forbidden"
                else err["msg"]
            )
            problems.append(f"{loc}: {msg}")
        raise EngineConfigError(f"{source}: " + "; ".join(problems)) from None


def load_engine_config(path: str | Path | None) -> EngineConfig:
    """Read the JSON file (the operator's ConfigMap), or documented defaults when none is given."""
    if path is None:
        return EngineConfig()
    p = Path(path)
    try:
        data = json.loads(p.read_text())
    except FileNotFoundError:
        raise EngineConfigError(f"{p}: engine config file not found; check --config") from None
    except json.JSONDecodeError as exc:
        raise EngineConfigError(f"{p}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise EngineConfigError(f"{p}: must hold a JSON object")
    return parse_engine_config(data, str(p))
