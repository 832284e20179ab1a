"""kopf handlers: every one of them only says "look at this DeepSeekDeployment again".

The custom resource is watched with kopf.on.event, which covers creation, every update and the
resume after an operator restart (kopf lists all objects when it starts) without kopf writing
annotations or finalizers to the object: GitOps tools see no drift and deletion never waits for
the operator. Every kind of child (Jobs, StatefulSets, Pods, claims, Services, ConfigMaps,
PodDisruptionBudgets) is watched by the managed-by label and mapped back to its custom resource by
the llm.dsop.io/deployment annotation, so a child changed or deleted by hand is put back.
What no event reports is caught by the Reconciler's periodic resync (--resync-period), which is
not a kopf timer: kopf timers put a finalizer on every object.
"""

from __future__ import annotations

import logging
from typing import Any

import kopf

from ..api import GROUP, PLURAL, VERSION
from ..planning import names
from .reconcile import Reconciler

log = logging.getLogger("deepseek_operator.handlers")

OWNED = {names.MANAGED_BY_LABEL: names.MANAGER}

# Set by cli.main before kopf starts (kopf handlers are module-level functions).
RECONCILER: Reconciler | None = None
# True when the operator serves only named namespaces (set by cli.main).
NAMESPACED = False


def _reconciler() -> Reconciler:
    if RECONCILER is None:
        raise kopf.PermanentError("the operator was started without a Reconciler")
    return RECONCILER


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    """Quiet kopf's own Events (the operator posts its own) and keep watches fresh."""
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.networking.request_timeout = 60
    # A namespaced install may not list namespaces or CRDs cluster-wide: scanning would retry
    # forbidden lists for about a minute before the first reconcile.
    settings.scanning.disabled = NAMESPACED


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In-cluster service account, else the kubeconfig in $KUBECONFIG as set by --kubeconfig.

    kopf's default login goes through the kubernetes client, which reads $KUBECONFIG when it is
    imported, before the command line is parsed.
    """
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.cleanup()
def shutdown(**_: Any) -> None:
    if RECONCILER is not None:
        RECONCILER.close()


@kopf.on.event(GROUP, VERSION, PLURAL)
async def deployment_event(
    type: str | None, name: str, namespace: str, meta: kopf.Meta, **_: Any
) -> None:
    """Creation, any change (spec or status), or first sight after a restart."""
    reconciler = _reconciler()
    if type == "DELETED":
        reconciler.forget(namespace, name)
        return
    if type == "MODIFIED" and reconciler.is_own_write(namespace, name, meta.get("resourceVersion")):
        return  # the echo of our own status write
    await reconciler.trigger(namespace, name)


async def _child(meta: kopf.Meta, namespace: str | None) -> None:
    owner = (meta.annotations or {}).get(names.DEPLOYMENT_ANNOTATION)
    if owner and namespace:
        await _reconciler().trigger(namespace, owner)


async def child_event(meta: kopf.Meta, namespace: str | None, **_: Any) -> None:
    await _child(meta, namespace)


# Jobs, StatefulSets and claims move the deployment along; the others nobody else changes and are
# watched so that one edited or deleted by hand is put back. Pods have their own handler below.
CHILD_KINDS = (
    ("batch", "v1", "jobs"),
    ("apps", "v1", "statefulsets"),
    ("", "v1", "persistentvolumeclaims"),
    ("", "v1", "services"),
    ("", "v1", "configmaps"),
    ("policy", "v1", "poddisruptionbudgets"),
)
for _group, _version, _plural in CHILD_KINDS:
    kopf.on.event(_group, _version, _plural, labels=OWNED, id=f"child-{_plural}")(child_event)


@kopf.on.event("", "v1", "pods", labels=OWNED)
async def pod_event(
    type: str | None, body: kopf.Body, meta: kopf.Meta, namespace: str | None, **_: Any
) -> None:
    owner = (meta.annotations or {}).get(names.DEPLOYMENT_ANNOTATION)
    if not owner or not namespace:
        return
    if type != "DELETED" and meta.labels.get(names.COMPONENT_LABEL) == names.WORKER:
        _reconciler().pod_event(namespace, owner, dict(body))
    await _reconciler().trigger(namespace, owner)
