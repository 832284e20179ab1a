"""Builders of the children of one DeepSeekDeployment, as the dicts the operator applies.

Each builder is a pure function of the validated deployment (and, for a few, of facts read from
the cluster such as the shard bytes); the decision of which ones to apply lives in plan.py.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from dsworker.contract.engine_config import EngineConfig

from ..api import API_VERSION, KIND, DeepSeekDeployment, DeepSeekDeploymentSpec
from ..api.quantity import parse_quantity
from . import names
from .observed import EXIT_BAD_INPUT

Obj = dict[str, Any]

SOURCE_MOUNT = "/source"
STORE_MOUNT = "/store"
STAGED_MOUNT = "/model"
ENGINE_CONFIG_DIR = "/etc/dsworker"
ENGINE_CONFIG_FILE = "engine.json"
MASTER_PORT = 29500
RUN_AS = 10001  # the uid of the dsworker images
GIB = 1 << 30
# /dev/shm of the engine (torch.distributed and NCCL/HCCL buffers): memory-backed, so bounded. An
# emptyDir of medium Memory counts against the pod's memory; past the limit the pod is evicted.
DSHM_SIZE = "16Gi"
CLEANUP_TTL_SECONDS = 3600

# Only rank 0 serves HTTP, but every pod of the group needs probes: readiness and start-up ask
# rank 0's /health (the group serves only when every rank has loaded); liveness is rank 0's alone,
# so a stuck rank 0 does not restart the other pods one by one.
PROBE_SCRIPT = (
    "import os,re,sys,urllib.request as u\n"
    "o=int(re.search(r'(\\d+)$',os.environ['POD_NAME']).group(1))\n"
    "if sys.argv[1]=='live' and o: sys.exit(0)\n"
    "h='127.0.0.1' if o==0 else sys.argv[2]\n"
    "u.urlopen('http://%s:%s/health'%(h,sys.argv[3]),timeout=5)\n"
)

DEVICE_BACKENDS = {"npu": "npu", "gpu": "cuda", "cpu": "cpu"}


@dataclass(frozen=True)
class Context:
    """The deployment a builder works for, with the facts every builder needs."""

    deployment: DeepSeekDeployment
    uid: str
    fingerprint: str
    generation: int

    @property
    def spec(self) -> DeepSeekDeploymentSpec:
        return self.deployment.spec

    @property
    def name(self) -> str:
        return self.deployment.name

    @property
    def namespace(self) -> str:
        return self.deployment.namespace


def owner_reference(ctx: Context) -> Obj:
    return {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "name": ctx.name,
        "uid": ctx.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    ctx: Context,
    name: str,
    component: str,
    annotations: Mapping[str, str] | None = None,
    fingerprint: str | None = None,
) -> Obj:
    """Standard metadata of a child: labels, fingerprint annotation, controller reference."""
    fp = fingerprint or ctx.fingerprint
    labels = names.labels(ctx.name, component)
    labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(fp)
    return {
        "name": name,
        "namespace": ctx.namespace,
        "labels": labels,
        "annotations": {
            names.FINGERPRINT_ANNOTATION: fp,
            names.DEPLOYMENT_ANNOTATION: ctx.name,
            **(annotations or {}),
        },
        "ownerReferences": [owner_reference(ctx)],
    }


# ----------------------------------------------------------------------------- engine config


def engine_config(spec: DeepSeekDeploymentSpec) -> EngineConfig:
    """The engine config (MindIE names) the workers read from the ConfigMap."""
    par, ep, serving = spec.parallelism, spec.expert_parallel, spec.serving
    plan = par.to_plan()
    extra: dict[str, Any] = {}
    if ep.init_routing_cutoff.topk_scaling_factor is not None:
        extra["topk_scaling_factor"] = ep.init_routing_cutoff.topk_scaling_factor
    if ep.alltoall_buffer_scale_factors:
        extra["alltoall_ep_buffer_scale_factors"] = [
            (int(n), float(f)) for n, f in ep.alltoall_buffer_scale_factors
        ]
    return EngineConfig(
        modelName=spec.model.name or "deepseek",
        maxSeqLen=serving.max_seq_len,
        maxInputTokenLen=serving.max_input_token_len,
        truncation=serving.truncation,
        maxBatchSize=serving.max_batch_size,
        port=serving.port,
        cpuMemSize=serving.cpu_mem_size,
        npuMemSize=serving.npu_mem_size,
        cacheBlockSize=serving.cache_block_size,
        prefixCaching=serving.prefix_caching,
        reasoningParser=serving.reasoning_parser,
        toolCallParser=serving.tool_call_parser,
        cudaGraphs=serving.cuda_graphs,
        torchCompile=serving.torch_compile,
        worldSize=plan.world_size,
        dp=plan.dp,
        tp=plan.tp,
        moe_tp=plan.moe_tp,
        moe_ep=plan.moe_ep,
        ep_level=ep.level,
        enable_init_routing_cutoff=ep.init_routing_cutoff.enabled,
        grouped_matmul="on" if ep.grouped_matmul_on(plan.moe_ep) else "off",
        mtp=spec.model.mtp,
        num_speculative_tokens=serving.speculative_tokens,
        device=DEVICE_BACKENDS[spec.worker.accelerator.type],
        **extra,
    )


def engine_config_map(ctx: Context) -> Obj:
    text = engine_config(ctx.spec).to_json()
    digest = hashlib.sha256(text.encode()).hexdigest()
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": metadata(
            ctx,
            names.config_map(ctx.name),
            names.ENGINE_CONFIG,
            {names.ENGINE_CONFIG_ANNOTATION: digest},
        ),
        "data": {ENGINE_CONFIG_FILE: text},
    }


# ------------------------------------------------------------------------------- volumes


def _source_path(spec: DeepSeekDeploymentSpec) -> str:
    source = spec.model.source
    sub = source.pvc.path.strip("/") if source.pvc is not None else ""
    return f"{SOURCE_MOUNT}/{sub}" if sub else SOURCE_MOUNT


def source_volume(spec: DeepSeekDeploymentSpec) -> Obj:
    source = spec.model.source
    if source.pvc is not None:
        return {
            "name": "source",
            "persistentVolumeClaim": {"claimName": source.pvc.claim_name, "readOnly": True},
        }
    assert source.host_path is not None
    return {"name": "source", "hostPath": {"path": source.host_path.path, "type": "Directory"}}


def store_claim_name(ctx: Context) -> str | None:
    store = ctx.spec.sharding.store
    if store is None or store.pvc is None:
        return None
    return store.pvc.claim_name or names.store_claim(ctx.name)


def store_volume(ctx: Context, read_only: bool) -> Obj:
    store = ctx.spec.sharding.store
    assert store is not None
    if store.host_path is not None:
        return {
            "name": "store",
            "hostPath": {"path": store.host_path.path, "type": "DirectoryOrCreate"},
        }
    claim: Obj = {"claimName": store_claim_name(ctx)}
    if read_only:
        claim["readOnly"] = True
    return {"name": "store", "persistentVolumeClaim": claim}


def host_path_store(spec: DeepSeekDeploymentSpec) -> bool:
    store = spec.sharding.store
    return spec.sharding.enabled and store is not None and store.host_path is not None


def stages(spec: DeepSeekDeploymentSpec) -> bool:
    """Whether workers copy their ranks into tmpfs first (a pvc store with stageToTmpfs)."""
    store = spec.sharding.store
    return (
        spec.sharding.enabled
        and store is not None
        and store.pvc is not None
        and spec.sharding.stage_to_tmpfs
    )


def shard_path(fingerprint: str) -> str:
    return f"{STORE_MOUNT}/{names.shard_dir(fingerprint)}"


def model_dir(ctx: Context) -> str:
    """Where the engine loads the model from inside the worker container."""
    if not ctx.spec.sharding.enabled:
        return _source_path(ctx.spec)
    if stages(ctx.spec):
        return STAGED_MOUNT
    return shard_path(ctx.fingerprint)


def store_claim(ctx: Context) -> Obj | None:
    """The ReadWriteMany claim for the shards, when the spec asks the operator to create it."""
    store = ctx.spec.sharding.store
    if not ctx.spec.sharding.enabled or store is None or store.pvc is None:
        return None
    if store.pvc.claim_name is not None:
        return None
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": metadata(ctx, names.store_claim(ctx.name), names.SHARD_STORE),
        "spec": {
            "accessModes": ["ReadWriteMany"],
            "storageClassName": store.pvc.storage_class_name,
            "resources": {"requests": {"storage": store.pvc.size}},
        },
    }


def resized_store_claim(ctx: Context, observed: Mapping[str, Any], size: str) -> Obj:
    """The store claim as the operator applied it, with only the storage request changed.

    A claim's spec is immutable but for resources.requests, so every other field the operator
    owns (access modes, storage class, fingerprint label and annotation) is applied again with the
    value the claim has: a server-side apply that left one out would try to remove it.
    """
    claim = store_claim(ctx)
    assert claim is not None
    md = observed.get("metadata") or {}
    fingerprint = (md.get("annotations") or {}).get(names.FINGERPRINT_ANNOTATION)
    claim["metadata"] = metadata(
        ctx, claim["metadata"]["name"], names.SHARD_STORE, None, fingerprint
    )
    spec = observed.get("spec") or {}
    for key in ("accessModes", "storageClassName"):
        if key in spec:
            claim["spec"][key] = spec[key]
    claim["spec"]["resources"] = {"requests": {"storage": size}}
    return claim


# ------------------------------------------------------------------------------ pod basics


def pod_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def container_security_context() -> Obj:
    return {
        "runAsNonRoot": True,
        "allowPrivilegeEscalation": False,
        "readOnlyRootFilesystem": True,
        "capabilities": {"drop": ["ALL"]},
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _env_pod_name() -> list[Obj]:
    return [
        {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
        {"name": "POD_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
    ]


def merge_env(own: list[Obj], user: list[Obj]) -> list[Obj]:
    """The operator's variables with spec.worker.env merged in by name: a user's entry replaces
    the operator's of the same name in place, the others follow. The API server keys env by name
    and refuses a list that names a variable twice."""
    by_name = {e["name"]: e for e in user}
    merged = [by_name.pop(e["name"], e) for e in own]
    return merged + [e for e in user if e["name"] in by_name]


def _placement(spec: DeepSeekDeploymentSpec) -> Obj:
    worker = spec.worker
    out: Obj = {}
    if worker.node_selector:
        out["nodeSelector"] = dict(worker.node_selector)
    if worker.tolerations:
        out["tolerations"] = [t.to_dict() for t in worker.tolerations]
    if worker.affinity and (affinity := worker.affinity.to_dict()):
        out["affinity"] = affinity
    return out


# ---------------------------------------------------------------------------- sharding Job


def shard_args(ctx: Context) -> list[str]:
    """`dsworker shard` with the plan: the same numbers the workers run."""
    spec = ctx.spec
    plan = spec.parallelism.to_plan()
    args = [
        "shard",
        "--model-path",
        _source_path(spec),
        "--save-directory",
        shard_path(ctx.fingerprint),
        "--world-size",
        str(plan.world_size),
        "--dp",
        str(plan.dp),
        "--tp",
        str(plan.tp),
        "--moe-tp",
        str(plan.moe_tp),
        "--moe-ep",
        str(plan.moe_ep),
    ]
    if spec.model.mtp:
        args.append("--mtp")
    if spec.model.dequantize_fp8:
        args.append("--dequantize-fp8")
    args += ["--processes", str(spec.sharding.processes), "--fingerprint", ctx.fingerprint]
    # The rules that need config.json, which only the Job reads: it exits 2 naming the field.
    args += ["--expect-architecture", "DeepseekV3"]
    args += ["--expect-quantization", spec.model.quantization]
    args += ["--max-seq-len", str(spec.serving.max_seq_len)]
    return args


def shard_job(ctx: Context) -> Obj:
    spec = ctx.spec
    sharding, worker = spec.sharding, spec.worker
    name = names.shard_job(ctx.name, ctx.fingerprint)
    container: Obj = {
        "name": "shard",
        "image": sharding.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": shard_args(ctx),
        "env": _env_pod_name(),
        # The sharder writes its JSON summary, or {"error": ...}, here; the log tail otherwise.
        "terminationMessagePath": "/dev/termination-log",
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
        "volumeMounts": [
            {"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True},
            {"name": "store", "mountPath": STORE_MOUNT},
            {"name": "tmp", "mountPath": "/tmp"},
        ],
    }
    if sharding.resources:
        container["resources"] = dict(sharding.resources)
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [container],
        "volumes": [
            source_volume(spec),
            store_volume(ctx, read_only=False),
            {"name": "tmp", "emptyDir": {}},
        ],
    }
    if host_path_store(spec) or spec.model.source.host_path is not None:
        # A hostPath store: the shards must land on the workers' node. A hostPath checkpoint: it
        # is on the nodes the workers are placed on, not necessarily on any other.
        pod_spec.update(_placement(spec))
    labels = names.labels(ctx.name, names.SHARDER)
    labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            ctx,
            name,
            names.SHARDER,
            {
                names.GENERATION_ANNOTATION: str(ctx.generation),
                names.SHARD_DIR_ANNOTATION: names.shard_dir(ctx.fingerprint),
            },
        ),
        "spec": {
            "backoffLimit": sharding.backoff_limit,
            "activeDeadlineSeconds": sharding.active_deadline_seconds,
            # Bad input (exit code 2: the checkpoint or plan cannot work) fails the Job at once;
            # the retries of backoffLimit are for what may pass (a node lost, out of memory).
            "podFailurePolicy": {
                "rules": [
                    {
                        "action": "FailJob",
                        "onExitCodes": {
                            "containerName": "shard",
                            "operator": "In",
                            "values": [EXIT_BAD_INPUT],
                        },
                    }
                ]
            },
            "template": {
                "metadata": {
                    "labels": labels,
                    "annotations": {
                        names.FINGERPRINT_ANNOTATION: ctx.fingerprint,
                        names.DEPLOYMENT_ANNOTATION: ctx.name,
                    },
                },
                "spec": pod_spec,
            },
        },
    }


def cleanup_job(ctx: Context, old_job: Mapping[str, Any]) -> Obj | None:
    """A Job that deletes the shard directory an old sharding Job wrote, on the same store.

    The store volume and node placement are copied from the old Job, since the spec may since
    have moved to another store.
    """
    fp = (old_job.get("metadata") or {}).get("annotations", {}).get(names.FINGERPRINT_ANNOTATION)
    template = ((old_job.get("spec") or {}).get("template") or {}).get("spec") or {}
    store = next((v for v in template.get("volumes") or () if v.get("name") == "store"), None)
    if not fp or store is None:
        return None
    pod_spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": pod_security_context(),
        "containers": [
            {
                "name": "cleanup",
                "image": ctx.spec.sharding.image,
                "imagePullPolicy": ctx.spec.worker.image_pull_policy,
                "command": ["rm"],
                "args": ["-rf", "--", shard_path(fp)],
                "securityContext": container_security_context(),
                "volumeMounts": [{"name": "store", "mountPath": STORE_MOUNT}],
            }
        ],
        "volumes": [store],
    }
    for key in ("nodeSelector", "tolerations", "affinity"):
        if template.get(key):
            pod_spec[key] = template[key]
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": metadata(
            ctx,
            names.cleanup_job(ctx.name, fp),
            names.CLEANUP,
            {names.SHARD_DIR_ANNOTATION: names.shard_dir(fp)},
            fingerprint=fp,
        ),
        "spec": {
            "backoffLimit": 2,
            "activeDeadlineSeconds": 3600,
            "ttlSecondsAfterFinished": CLEANUP_TTL_SECONDS,
            "template": {
                "metadata": {"labels": names.labels(ctx.name, names.CLEANUP)},
                "spec": pod_spec,
            },
        },
    }


# -------------------------------------------------------------------------------- Services


def _ports(spec: DeepSeekDeploymentSpec) -> list[Obj]:
    return [
        {"name": "http", "port": spec.serving.port, "targetPort": "http", "protocol": "TCP"},
    ]


def headless_service(ctx: Context) -> Obj:
    """Rank discovery: pod DNS names resolve before the pods are Ready."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, names.headless_service(ctx.name), names.HEADLESS),
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": names.selector_labels(ctx.name, names.WORKER),
            "ports": [
                *_ports(ctx.spec),
                {"name": "dist", "port": MASTER_PORT, "targetPort": "dist", "protocol": "TCP"},
            ],
        },
    }


def client_service(ctx: Context) -> Obj:
    """The OpenAI API: rank 0 only (pod 0 of the StatefulSet)."""
    selector = names.selector_labels(ctx.name, names.WORKER)
    selector[names.POD_NAME_LABEL] = f"{names.statefulset(ctx.name)}-0"
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(ctx, names.client_service(ctx.name), names.SERVICE),
        "spec": {"type": "ClusterIP", "selector": selector, "ports": _ports(ctx.spec)},
    }


def endpoint(ctx: Context) -> str:
    return f"http://{names.client_service(ctx.name)}.{ctx.namespace}.svc:{ctx.spec.serving.port}/v1"


def disruption_budget(ctx: Context) -> Obj:
    """Every worker is needed: a voluntary eviction of one would take the whole group down, so a
    drain waits while the group is healthy. A group that is not serving anyway (a pod not Ready)
    must not block a drain: its pods may always be evicted."""
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(ctx, names.disruption_budget(ctx.name), names.DISRUPTION),
        "spec": {
            "minAvailable": ctx.spec.parallelism.nodes,
            "selector": {"matchLabels": names.selector_labels(ctx.name, names.WORKER)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


# ----------------------------------------------------------------------------- StatefulSet


def staged_bytes(spec: DeepSeekDeploymentSpec, shard_bytes: int) -> int:
    """An upper bound of the bytes one pod stages: every directory group is cut in equal parts,
    so a pod holds at most its largest share of any group; replicated files are small."""
    plan = spec.parallelism.to_plan()
    d = spec.parallelism.devices_per_node
    share = 0.0
    for pod in range(spec.parallelism.nodes):
        coords = [plan.coords(r) for r in range(pod * d, (pod + 1) * d)]
        tp_parts = len({c.tp_rank for c in coords}) / plan.tp
        moe_parts = len({(c.moe_tp_rank, c.moe_ep_rank) for c in coords}) / (
            plan.moe_tp * plan.moe_ep
        )
        share = max(share, tp_parts, moe_parts, d / plan.world_size)
    return math.ceil(shard_bytes * share * 1.05) + GIB


def _quantity(n: int) -> str:
    return f"{math.ceil(n / (1 << 20))}Mi"


def _resources(spec: DeepSeekDeploymentSpec, staged: int | None = None) -> Obj:
    """spec.worker.resources with the devices added and, when the pod stages its shards into
    memory, the staged bytes added to the memory request (and to the limit, if one is set): the
    tmpfs is memory the pod uses on top of what the engine needs."""
    worker = spec.worker
    res: Obj = {k: dict(v) for k, v in (worker.resources or {}).items() if isinstance(v, Mapping)}
    resource = worker.accelerator.resource_name
    if worker.accelerator.type != "cpu" and resource:
        count = str(spec.parallelism.devices_per_node)
        res.setdefault("limits", {})[resource] = count
        res.setdefault("requests", {})[resource] = count
    if staged:
        requests = res.setdefault("requests", {})
        limits = res.get("limits") or {}
        # A limit without a request is also the request (Kubernetes' default): keep it so.
        base = requests.get("memory", limits.get("memory"))
        requests["memory"] = _quantity(_bytes(base) + staged)
        if "memory" in limits:
            limits["memory"] = _quantity(_bytes(limits["memory"]) + staged)
    return res


def _bytes(quantity: Any) -> int:
    """A memory quantity of the spec in bytes (validated already; absent is 0)."""
    value = parse_quantity(quantity) if quantity is not None else None
    return math.ceil(value) if value is not None else 0


def _probe(kind: str, ctx: Context) -> Obj:
    rank0 = (
        f"{names.statefulset(ctx.name)}-0.{names.headless_service(ctx.name)}.{ctx.namespace}.svc"
    )
    return {
        "exec": {
            "command": [
                "python3",
                "-c",
                PROBE_SCRIPT,
                kind,
                rank0,
                str(ctx.spec.serving.port),
            ]
        },
        "timeoutSeconds": 8,
    }


def worker_probes(ctx: Context) -> Obj:
    return {
        # Loading hundreds of GB and warming up may take long: up to an hour before liveness.
        "startupProbe": {**_probe("ready", ctx), "periodSeconds": 10, "failureThreshold": 360},
        "readinessProbe": {**_probe("ready", ctx), "periodSeconds": 10, "failureThreshold": 3},
        "livenessProbe": {**_probe("live", ctx), "periodSeconds": 20, "failureThreshold": 6},
    }


def statefulset(ctx: Context, config_digest: str, shard_bytes: int | None) -> Obj:
    spec = ctx.spec
    worker, par = spec.worker, spec.parallelism
    sts_name = names.statefulset(ctx.name)
    headless = names.headless_service(ctx.name)
    master = f"{sts_name}-0.{headless}.{ctx.namespace}.svc"
    mounts: list[Obj] = [
        {"name": "engine-config", "mountPath": ENGINE_CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
        {"name": "dshm", "mountPath": "/dev/shm"},
    ]
    volumes: list[Obj] = [
        {"name": "engine-config", "configMap": {"name": names.config_map(ctx.name)}},
        {"name": "tmp", "emptyDir": {}},
        {"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": DSHM_SIZE}},
    ]
    init: list[Obj] = []
    staged_size: int | None = None
    if not spec.sharding.enabled:
        volumes.append(source_volume(spec))
        mounts.append({"name": "source", "mountPath": SOURCE_MOUNT, "readOnly": True})
    else:
        volumes.append(store_volume(ctx, read_only=True))
        if stages(spec):
            staged: Obj = {"medium": "Memory"}
            if shard_bytes:
                staged_size = staged_bytes(spec, shard_bytes)
                staged["sizeLimit"] = _quantity(staged_size)
            volumes.append({"name": "model", "emptyDir": staged})
            mounts.append({"name": "model", "mountPath": STAGED_MOUNT, "readOnly": True})
            init.append(
                {
                    "name": "stage",
                    "image": worker.image,
                    "imagePullPolicy": worker.image_pull_policy,
                    "command": ["dsworker"],
                    "args": [
                        "stage",
                        "--store",
                        shard_path(ctx.fingerprint),
                        "--dest",
                        STAGED_MOUNT,
                        "--devices-per-node",
                        str(par.devices_per_node),
                    ],
                    "env": _env_pod_name(),
                    "terminationMessagePolicy": "FallbackToLogsOnError",
                    "securityContext": container_security_context(),
                    "volumeMounts": [
                        {"name": "store", "mountPath": STORE_MOUNT, "readOnly": True},
                        {"name": "model", "mountPath": STAGED_MOUNT},
                    ],
                }
            )
        else:
            mounts.append({"name": "store", "mountPath": STORE_MOUNT, "readOnly": True})

    env = [
        *_env_pod_name(),
        {"name": "MASTER_ADDR", "value": master},
        {"name": "MASTER_PORT", "value": str(MASTER_PORT)},
        {"name": "NNODES", "value": str(par.nodes)},
        {"name": "DSOP_FINGERPRINT", "value": ctx.fingerprint},
    ]
    if spec.model.mtp:
        env.append({"name": "DEEPSEEK_MTP", "value": "1"})
    env = merge_env(env, [e.to_dict() for e in worker.env or ()])
    engine: Obj = {
        "name": "engine",
        "image": worker.image,
        "imagePullPolicy": worker.image_pull_policy,
        "command": ["dsworker"],
        "args": [
            "serve",
            "--model",
            model_dir(ctx),
            "--config",
            f"{ENGINE_CONFIG_DIR}/{ENGINE_CONFIG_FILE}",
            "--nproc-per-node",
            str(par.devices_per_node),
            "--nodes",
            str(par.nodes),
            "--master-addr",
            master,
            "--master-port",
            str(MASTER_PORT),
            "--port",
            str(spec.serving.port),
        ],
        "env": env,
        "ports": [
            {"name": "http", "containerPort": spec.serving.port, "protocol": "TCP"},
            {"name": "dist", "containerPort": MASTER_PORT, "protocol": "TCP"},
        ],
        "terminationMessagePolicy": "FallbackToLogsOnError",
        "securityContext": container_security_context(),
        "volumeMounts": mounts,
        **worker_probes(ctx),
    }
    resources = _resources(spec, staged_size)
    if resources:
        engine["resources"] = resources
        if init:
            init[0]["resources"] = _without_devices(resources, worker.accelerator.resource_name)

    pod_labels = names.labels(ctx.name, names.WORKER)
    pod_labels[names.FINGERPRINT_LABEL] = names.short_fingerprint(ctx.fingerprint)
    pod_annotations = {
        **(worker.pod_annotations or {}),
        names.FINGERPRINT_ANNOTATION: ctx.fingerprint,
        names.DEPLOYMENT_ANNOTATION: ctx.name,
        names.ENGINE_CONFIG_ANNOTATION: config_digest,
    }
    pod_spec: Obj = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": 60,
        "securityContext": pod_security_context(),
        "initContainers": init,
        "containers": [engine],
        "volumes": volumes,
        **_placement(spec),
    }
    if not init:
        del pod_spec["initContainers"]
    if worker.priority_class_name:
        pod_spec["priorityClassName"] = worker.priority_class_name
    if worker.scheduler_name:
        pod_spec["schedulerName"] = worker.scheduler_name
    return {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": metadata(
            ctx,
            sts_name,
            names.WORKER,
            {names.WORLD_SIZE_ANNOTATION: str(par.world())},
        ),
        "spec": {
            "serviceName": headless,
            "replicas": par.nodes,
            "podManagementPolicy": "Parallel",
            # The ranks form one torch.distributed group: the operator replaces all pods together.
            "updateStrategy": {"type": "OnDelete"},
            "selector": {"matchLabels": names.selector_labels(ctx.name, names.WORKER)},
            "template": {
                "metadata": {"labels": pod_labels, "annotations": pod_annotations},
                "spec": pod_spec,
            },
        },
    }


def _without_devices(resources: Obj, resource: str | None) -> Obj:
    return {
        kind: {k: v for k, v in values.items() if k != resource}
        for kind, values in resources.items()
        if isinstance(values, Mapping)
    }
