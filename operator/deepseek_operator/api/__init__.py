"""The DeepSeekDeployment API (llm.dsop.io/v1alpha1) as pydantic models: the one source of truth
from which the CRD is generated and against which the operator validates every object.

Typical use: `result = parse_deployment(body)`; if `result.ok`, `result.deployment.spec` is fully
defaulted, else `result.errors` says what to fix. `result.warnings` lists settings with no effect.
"""

from .advice import spec_warnings
from .base import ApiModel, Rule, StatusModel
from .expert_parallel import ExpertParallel, InitRoutingCutoff
from .features import Features
from .model import (
    Architecture,
    HostPathSource,
    ModelSource,
    ModelSpec,
    PvcModelSource,
    Quantization,
)
from .names import (
    API_VERSION,
    CRD_NAME,
    DEFAULT_WORKER_IMAGE,
    GROUP,
    KIND,
    LIST_KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
)
from .parallelism import Parallelism
from .parse import ParseResult, error_messages, json_path, parse_deployment
from .runtime import ENGINES, Engine, Runtime
from .serving import Serving
from .sharding import HostPathStore, PvcStore, Sharding, ShardStore
from .spec import DeepSeekDeployment, DeepSeekDeploymentSpec
from .status import (
    CONDITION_TYPES,
    PHASES,
    Condition,
    DeepSeekDeploymentStatus,
    Phase,
    ShardsStatus,
)
from .worker import DEFAULT_RESOURCE_NAMES, Accelerator, Worker

__all__ = [
    "API_VERSION",
    "CONDITION_TYPES",
    "CRD_NAME",
    "DEFAULT_RESOURCE_NAMES",
    "DEFAULT_WORKER_IMAGE",
    "ENGINES",
    "GROUP",
    "KIND",
    "LIST_KIND",
    "PHASES",
    "PLURAL",
    "SHORT_NAMES",
    "SINGULAR",
    "VERSION",
    "Accelerator",
    "ApiModel",
    "Architecture",
    "Condition",
    "DeepSeekDeployment",
    "DeepSeekDeploymentSpec",
    "DeepSeekDeploymentStatus",
    "Engine",
    "ExpertParallel",
    "Features",
    "HostPathSource",
    "HostPathStore",
    "InitRoutingCutoff",
    "ModelSource",
    "ModelSpec",
    "Parallelism",
    "ParseResult",
    "Phase",
    "PvcModelSource",
    "PvcStore",
    "Quantization",
    "Rule",
    "Runtime",
    "Serving",
    "ShardStore",
    "Sharding",
    "ShardsStatus",
    "StatusModel",
    "Worker",
    "error_messages",
    "json_path",
    "parse_deployment",
    "spec_warnings",
]
