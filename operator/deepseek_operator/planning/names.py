"""Names, labels and annotations of the children of one DeepSeekDeployment.

A custom resource name may be a 253-character DNS subdomain with dots and a leading digit, while
Services, StatefulSets and label values want short DNS-1035 labels: every child name is derived
here, shortened with a hash when needed so two long names never collide.

Unique per custom resource by construction: a rewritten name always ends in "-" and 8 hex digits
(the hash of the whole name), and a name of that shape is never used as it is, so a rewritten
name can never equal another deployment's literal name (only two hashes can meet, 1 in 2**32,
and that is reported as a ForeignObject, never fought over: see planning/ownership.py).
"""

from __future__ import annotations

import hashlib
import re

from ..api import GROUP
from ..api.names import HEADLESS_SUFFIX

MANAGER = "deepseek-operator"
"""Field manager of every server-side apply and the managed-by label value."""

PART_OF = "deepseek-moe-serving"

# Labels (app.kubernetes.io/* are the recommended common labels).
NAME_LABEL = "app.kubernetes.io/name"
INSTANCE_LABEL = "app.kubernetes.io/instance"
COMPONENT_LABEL = "app.kubernetes.io/component"
MANAGED_BY_LABEL = "app.kubernetes.io/managed-by"
PART_OF_LABEL = "app.kubernetes.io/part-of"
FINGERPRINT_LABEL = f"{GROUP}/fingerprint"
POD_NAME_LABEL = "statefulset.kubernetes.io/pod-name"
JOB_NAME_LABEL = "batch.kubernetes.io/job-name"
REVISION_LABEL = "controller-revision-hash"

# Annotations.
FINGERPRINT_ANNOTATION = f"{GROUP}/fingerprint"
DEPLOYMENT_ANNOTATION = f"{GROUP}/deployment"
GENERATION_ANNOTATION = f"{GROUP}/generation"
WORLD_SIZE_ANNOTATION = f"{GROUP}/world-size"
ENGINE_CONFIG_ANNOTATION = f"{GROUP}/engine-config-sha256"
SHARD_DIR_ANNOTATION = f"{GROUP}/shard-dir"
TEMPLATE_ANNOTATION = f"{GROUP}/template-sha256"
RUNTIME_ANNOTATION = f"{GROUP}/runtime"
"""On the worker StatefulSet: the engine its pods run (status.runtime while it still serves)."""
MODEL_CONFIG_ANNOTATION = f"{GROUP}/model-config"
NODE_INDEX_ANNOTATION = f"{GROUP}/node-index"  # a node-local sharding Job's worker pod / node
# Volcano's annotation that puts a pod into a PodGroup (volcano.sh/apis scheduling/v1beta1).
VOLCANO_GROUP_ANNOTATION = "scheduling.k8s.io/group-name"
"""On the custom resource: the checkpoint's config.json inline, so the operator can check the plan
against the model before any Job runs (see docs/operator.md)."""

# Components.
SHARDER = "sharder"
CLEANUP = "shard-cleanup"
WORKER = "worker"
ENGINE_CONFIG = "engine-config"
SHARD_STORE = "shard-store"
SERVICE = "api"
HEADLESS = "rank-discovery"
DISRUPTION = "disruption-budget"
RANK_TABLE = "rank-table"
POD_GROUP = "pod-group"

BASE_MAX = 40  # leaves room for the longest suffix ("-clean-" + 10 hex) under 63
FP_SHORT = 16  # shard directory name: <store>/<fingerprint[:16]>
FP_JOB = 10  # in Job names

_INVALID = re.compile(r"[^a-z0-9-]+")
# The shape of a rewritten name: a literal name of this shape is rewritten too.
_REWRITTEN = re.compile(r".*-[0-9a-f]{8}")
_LABEL_VALUE = re.compile(r"[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?")


def _digest(text: str, n: int = 8) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:n]


def base_name(name: str) -> str:
    """A DNS-1035 label of at most BASE_MAX characters standing for the custom resource."""
    base = _INVALID.sub("-", name.lower()).strip("-") or "dsd"
    if not base[0].isalpha():
        base = "d-" + base
    if base != name or len(base) > BASE_MAX or _REWRITTEN.fullmatch(base):
        # "a.b" and "a-b" must not share children: anything rewritten carries the name's hash,
        # and a literal name that looks rewritten is rewritten, so the two sets never meet.
        base = base[: BASE_MAX - 9].rstrip("-") + "-" + _digest(name)
    return base


def instance(name: str) -> str:
    """The instance label value: the name itself when it is a valid label value that does not
    look rewritten, else the base name (so two deployments never share a label selector)."""
    if len(name) <= 63 and _LABEL_VALUE.fullmatch(name) and not _REWRITTEN.fullmatch(name):
        return name
    return base_name(name)


def short_fingerprint(fingerprint: str) -> str:
    return fingerprint[:FP_SHORT]


def shard_dir(fingerprint: str) -> str:
    """The directory of one plan's shards inside the store."""
    return short_fingerprint(fingerprint)


def config_map(name: str) -> str:
    return f"{base_name(name)}-engine"


def store_claim(name: str) -> str:
    return f"{base_name(name)}-shards"


def shard_job(name: str, fingerprint: str, node: int | None = None) -> str:
    """The sharding Job of a plan; with `node`, the one of that node of a node-local store."""
    suffix = "" if node is None else f"-n{node}"
    return f"{base_name(name)}-shard-{fingerprint[:FP_JOB]}{suffix}"


def cleanup_job(name: str, fingerprint: str, node: str | None = None) -> str:
    suffix = "" if node is None else f"-n{node}"
    return f"{base_name(name)}-clean-{fingerprint[:FP_JOB]}{suffix}"


def rank_table(name: str) -> str:
    return f"{base_name(name)}-hccl"


def pod_group(name: str) -> str:
    return f"{base_name(name)}-workers"


def statefulset(name: str) -> str:
    return f"{base_name(name)}-worker"


def headless_service(name: str) -> str:
    return f"{base_name(name)}{HEADLESS_SUFFIX}"


def client_service(name: str) -> str:
    """The API Service: the name itself, so the endpoint reads well. It cannot take another
    deployment's headless Service name: the API refuses names ending in HEADLESS_SUFFIX, and a
    rewritten base name ends in a hash."""
    return base_name(name)


def disruption_budget(name: str) -> str:
    return f"{base_name(name)}-workers"


def selector_labels(name: str, component: str) -> dict[str, str]:
    """The labels that select one component's objects (immutable in selectors: keep them few)."""
    return {
        INSTANCE_LABEL: instance(name),
        COMPONENT_LABEL: component,
        MANAGED_BY_LABEL: MANAGER,
    }


def labels(name: str, component: str) -> dict[str, str]:
    """The recommended app.kubernetes.io labels of one child."""
    return {
        NAME_LABEL: "deepseek",
        PART_OF_LABEL: PART_OF,
        **selector_labels(name, component),
    }


def owned_selector(name: str) -> str:
    """Label selector of every child of one custom resource."""
    return f"{MANAGED_BY_LABEL}={MANAGER},{INSTANCE_LABEL}={instance(name)}"
