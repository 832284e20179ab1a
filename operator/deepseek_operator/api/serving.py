"""spec.serving: the limits the engine serves within and its HTTP port."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field

from .base import ApiModel, Rule, section
from .model import DNS_SUBDOMAIN
from .names import HCCL_PORTS, RENDEZVOUS_PORT


class ApiKeySecret(ApiModel):
    """The Secret key that holds the API key clients must send (OpenAI's bearer token)."""

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
        description="Name of a Secret in the deployment's namespace.",
    )
    key: str = Field(
        "api-key",
        min_length=1,
        max_length=253,
        pattern=r"^[-._a-zA-Z0-9]+$",
        description="Key of the Secret holding the API key. It is mounted read-only into the "
        "worker pods (never read by the operator) and rank 0 answers 401 to a request without "
        "`Authorization: Bearer <key>`.",
    )


class NetworkPolicy(ApiModel):
    """An optional NetworkPolicy of the worker pods."""

    enabled: bool = Field(
        False,
        description="Create a NetworkPolicy for the worker pods: every port (the rendezvous, "
        "the collectives) is open only to the pods of the same group, the OpenAI port also to "
        "apiFrom. Needs a network plugin that enforces NetworkPolicy.",
    )
    api_from: list[dict[str, Any]] | None = Field(
        None,
        max_length=64,
        description="Who may reach the OpenAI port from outside the group (core/v1 "
        "NetworkPolicyPeer list: podSelector, namespaceSelector, ipBlock). Unset: any source; "
        "[]: none.",
    )


class Serving(ApiModel):
    """Serving limits (MindIE ModelDeployConfig / ScheduleConfig names)."""

    __rules__ = (
        Rule(
            "input-below-seq",
            "spec.serving.maxInputTokenLen must be less than spec.serving.maxSeqLen; lower "
            "maxInputTokenLen or raise maxSeqLen",
            lambda s: s.max_input_token_len < s.max_seq_len,
            # has(): the API server also checks the section's default ({}) against this rule,
            # before field defaults are filled in; real objects always have both fields.
            "!has(self.maxInputTokenLen) || !has(self.maxSeqLen) || "
            "self.maxInputTokenLen < self.maxSeqLen",
        ),
        Rule(
            "port-not-reserved",
            f"spec.serving.port must not be {RENDEZVOUS_PORT} (the workers' torch.distributed "
            f"rendezvous port) nor {HCCL_PORTS[0]}-{HCCL_PORTS[-1]} (HCCL's host ports on Ascend); "
            "choose another port, e.g. 1025 (the default) or 8000",
            lambda s: s.port != RENDEZVOUS_PORT and s.port not in HCCL_PORTS,
            f"!has(self.port) || (self.port != {RENDEZVOUS_PORT} && "
            f"(self.port < {HCCL_PORTS[0]} || self.port > {HCCL_PORTS[-1]}))",
        ),
    )

    max_seq_len: int = Field(
        2560, ge=2, le=1048576, description="Longest sequence, prompt plus output (maxSeqLen)."
    )
    max_input_token_len: int = Field(
        2048,
        ge=1,
        le=1048576,
        description="Longest prompt in tokens (maxInputTokenLen); must be below maxSeqLen.",
    )
    truncation: bool = Field(
        False,
        description="Truncate prompts longer than maxInputTokenLen instead of rejecting them.",
    )
    max_batch_size: int = Field(
        200, ge=1, le=65536, description="Most sequences decoded together (maxBatchSize)."
    )
    port: int = Field(
        1025,
        ge=1,
        le=65535,
        description="Port of the OpenAI-compatible HTTP API (and /metrics) on rank 0. Not "
        f"{RENDEZVOUS_PORT} (rendezvous) nor {HCCL_PORTS[0]}-{HCCL_PORTS[-1]} (HCCL).",
    )
    cpu_mem_size: int = Field(
        5,
        ge=0,
        description="Host memory in GiB for swapped-out KV cache blocks in MindIE (cpuMemSize). "
        "Accepted for MindIE compatibility and unused: the worker keeps no KV cache in host "
        "memory.",
    )
    cache_block_size: int = Field(
        128,
        ge=1,
        le=65536,
        description="KV cache page size in positions (cacheBlockSize): a sequence takes pages "
        "as its tokens fill them (the newest is preempted and recomputed when none is left), so "
        "npuMemSize holds many short requests or fewer long ones.",
    )
    prefix_caching: bool = Field(
        True,
        description="Keep the full KV pages of ended requests for later prompts that start with "
        "the same tokens (a shared system prompt is computed once).",
    )
    npu_mem_size: int = Field(
        -1,
        ge=-1,
        description="Device memory in GiB for the KV cache per device (npuMemSize): the pages "
        "the sequences fill; -1 = the memory left after the weights, less a reserve.",
    )
    cuda_graphs: bool = Field(
        True,
        description="Replay decode steps as device graphs (NVIDIA GPUs; Ascend NPUs where "
        "torch_npu has NPUGraph), at every world size, MTP draft steps included; not with the "
        "routing cutoff. false runs every step eagerly.",
    )
    torch_compile: bool = Field(
        False,
        description="Compile the decode step with torch.compile (inductor) before it is "
        "captured; traced during the warm-up, so start-up takes longer.",
    )
    speculative_tokens: int = Field(
        1,
        ge=1,
        le=4,
        description="Draft tokens per sequence and decode step when spec.model.mtp is true "
        "(num_speculative_tokens): the MTP layer's own draft, then the layer again on each "
        "draft; the main model verifies them all in one step.",
    )
    reasoning_parser: Literal["deepseek_r1"] | None = Field(
        None,
        description="deepseek_r1: chat answers carry DeepSeek-R1's thinking (the text up to "
        "`</think>`) as reasoning_content and the rest as content, as DeepSeek's API does "
        "(reasoningParser); unset returns the raw text.",
    )
    tool_call_parser: Literal["deepseek_v3"] | None = Field(
        None,
        description="deepseek_v3: chat requests may carry OpenAI `tools`, and the tool calls "
        "DeepSeek-V3/R1 write in their own markup come back as `tool_calls`, as vLLM's "
        "--tool-call-parser deepseek_v3 does (toolCallParser); unset refuses `tools`.",
    )
    api_key_secret: ApiKeySecret | None = Field(
        None,
        description="The API key clients must send as `Authorization: Bearer <key>` (OpenAI's "
        "bearer token), from a Secret mounted read-only into the workers. Unset: no key.",
    )
    network_policy: NetworkPolicy = section(
        NetworkPolicy, "An optional NetworkPolicy of the worker pods."
    )
