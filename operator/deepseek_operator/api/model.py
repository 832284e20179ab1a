"""spec.model: which checkpoint to serve and how to read it."""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from .base import ApiModel, Rule
from .paths import claim_path_rule, host_path_rule

Architecture = Literal["DeepseekV2", "DeepseekV3"]
Quantization = Literal["auto", "bf16", "fp8", "w8a8", "w8a16"]

DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class PvcModelSource(ApiModel):
    """A checkpoint on an existing PersistentVolumeClaim."""

    __rules__ = (claim_path_rule("model-pvc-path", "spec.model.source.pvc"),)

    claim_name: str = Field(
        description="Name of an existing PersistentVolumeClaim in the same namespace holding the "
        "HuggingFace-format checkpoint. It is mounted read-only.",
        min_length=1,
        max_length=253,
        pattern=DNS_SUBDOMAIN,
    )
    path: str = Field(
        "",
        description="Directory inside the claim that holds config.json and the *.safetensors "
        "files, relative to the claim's root (no leading /, no '..'). Empty means the root.",
        max_length=4096,
    )


class HostPathSource(ApiModel):
    """A directory on the node."""

    __rules__ = (
        host_path_rule("model-host-path", "spec.model.source.hostPath", "/models/DeepSeek-R1"),
    )

    path: str = Field(
        description="Absolute path of the directory on the node: clean (no '.', '..' or empty "
        "segment, no trailing /), not / and not a system directory (/etc, /usr, /proc, ...: "
        "see the operator guide).",
        min_length=1,
        max_length=4096,
    )


class ModelSource(ApiModel):
    """Where the full checkpoint lives: exactly one of pvc or hostPath."""

    __rules__ = (
        Rule(
            "model-source-one",
            "spec.model.source: set exactly one of pvc or hostPath",
            lambda s: (s.pvc is None) != (s.host_path is None),
            "has(self.pvc) != has(self.hostPath)",
        ),
    )

    pvc: PvcModelSource | None = Field(
        None, description="The checkpoint is on a PersistentVolumeClaim (mounted read-only)."
    )
    host_path: HostPathSource | None = Field(
        None,
        description="The checkpoint is in a directory on the node (mounted read-only). Every "
        "worker node and the sharding Job's node must have it.",
    )


class ModelSpec(ApiModel):
    """The model to serve."""

    __rules__ = (
        Rule(
            "trust-remote-code",
            "spec.model.trustRemoteCode must be false: only safetensors and JSON files are ever "
            "read and no code from the checkpoint runs; remove it or set it to false",
            lambda m: not m.trust_remote_code,
            "!has(self.trustRemoteCode) || !self.trustRemoteCode",
        ),
        Rule(
            "v2-mtp",
            "spec.model.mtp: DeepseekV2 has no MTP layer; set mtp: false",
            lambda m: not (m.architecture == "DeepseekV2" and m.mtp),
            "!has(self.architecture) || self.architecture != 'DeepseekV2' || "
            "!has(self.mtp) || !self.mtp",
        ),
    )

    name: str | None = Field(
        None,
        description="Served model name: the OpenAI API's `model` and MindIE's modelName. "
        "Default: the DeepSeekDeployment's metadata.name.",
        min_length=1,
        max_length=256,
    )
    source: ModelSource = Field(
        description="Where the full HuggingFace-format checkpoint (config.json, *.safetensors, "
        "tokenizer files) lives."
    )
    architecture: Architecture | None = Field(
        None,
        description="Model architecture: DeepseekV2 or DeepseekV3 (DeepSeek-R1 is DeepseekV3). "
        "Default: read from the checkpoint's config.json.",
    )
    quantization: Quantization = Field(
        "auto",
        description="Weight format of the checkpoint: bf16, fp8 (block-quantised, as DeepSeek "
        "ships V3/R1), w8a8 (int8 weights and activations), w8a16 (int8 weights). auto reads it "
        "from config.json quantization_config or quant_model_description*.json.",
    )
    dequantize_fp8: bool = Field(
        False,
        description="Convert an FP8 checkpoint to BF16 while sharding, for devices without FP8 "
        "support. Has no effect on other checkpoints.",
    )
    mtp: bool = Field(
        False,
        description="Include the multi-token-prediction layer (layer index num_hidden_layers) in "
        "the shards and the engine, which then decodes speculatively: the MTP layer drafts one "
        "token per sequence and step, the main model verifies it (MindIE DEEPSEEK_MTP=1). "
        "DeepseekV3 only.",
    )
    trust_remote_code: bool = Field(
        False,
        description="Must stay false: the operator and workers only read safetensors and JSON "
        "files and never run code shipped with a checkpoint.",
    )
