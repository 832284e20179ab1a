"""The names that identify the DeepSeekDeployment API on the cluster."""

from __future__ import annotations

from deepseek_operator import __version__

GROUP = "llm.dsop.io"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "DeepSeekDeployment"
LIST_KIND = "DeepSeekDeploymentList"
PLURAL = "deepseekdeployments"
SINGULAR = "deepseekdeployment"
SHORT_NAMES = ("dsd",)
CRD_NAME = f"{PLURAL}.{GROUP}"

# The worker image used when spec.worker.image is unset: the one released with this operator.
DEFAULT_WORKER_IMAGE = f"dsworker:{__version__}"

# The suffix of the rank-discovery (headless) Service; the API Service carries no suffix, so a
# deployment's name must not end in this one.
HEADLESS_SUFFIX = "-ranks"

# The ports of a worker pod besides spec.serving.port, which must differ from them: the
# torch.distributed rendezvous of rank 0 (MASTER_PORT) and the 16 host ports HCCL listens on from
# its default HCCL_IF_BASE_PORT (Ascend).
RENDEZVOUS_PORT = 29500
HCCL_PORTS = range(60000, 60016)
