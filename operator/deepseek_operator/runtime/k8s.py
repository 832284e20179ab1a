"""The operator's only door to the API server: read the custom resource and its children as plain
JSON dicts, server-side apply children and status, delete children, post Events.

Everything goes through one generic REST call on the kubernetes client's ApiClient, so the
planner sees exactly the JSON the API server sends (camelCase, no model classes in between).
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import Any
from urllib.parse import quote

from kubernetes import client, config
from kubernetes.client.exceptions import ApiException
from urllib3.exceptions import HTTPError

from ..api import GROUP, KIND, PLURAL, VERSION
from ..planning import names, ownership
from ..planning.observed import Observed, short_of_pods
from ..planning.status import EventSpec

log = logging.getLogger("deepseek_operator.k8s")

APPLY_PATCH = "application/apply-patch+yaml"
TIMEOUT = 30

# kind -> (API path prefix, plural): the kinds the operator reads or writes.
RESOURCES: dict[str, tuple[str, str]] = {
    "ConfigMap": ("/api/v1", "configmaps"),
    "Service": ("/api/v1", "services"),
    "Pod": ("/api/v1", "pods"),
    "PersistentVolumeClaim": ("/api/v1", "persistentvolumeclaims"),
    "Event": ("/api/v1", "events"),
    "Job": ("/apis/batch/v1", "jobs"),
    "StatefulSet": ("/apis/apps/v1", "statefulsets"),
    "PodDisruptionBudget": ("/apis/policy/v1", "poddisruptionbudgets"),
    "NetworkPolicy": ("/apis/networking.k8s.io/v1", "networkpolicies"),
    "PodGroup": ("/apis/scheduling.volcano.sh/v1beta1", "podgroups"),
    KIND: (f"/apis/{GROUP}/{VERSION}", PLURAL),
}


def new_api_client(kubeconfig: str | None = None, pool_size: int = 16) -> client.ApiClient:
    """An ApiClient from in-cluster credentials, else the kubeconfig ($KUBECONFIG)."""
    configuration = client.Configuration()
    try:
        if kubeconfig:
            raise config.ConfigException("kubeconfig given")
        config.load_incluster_config(client_configuration=configuration)
    except config.ConfigException:
        config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    configuration.connection_pool_maxsize = pool_size
    return client.ApiClient(configuration)


def _path(kind: str, namespace: str, name: str | None = None, sub: str | None = None) -> str:
    prefix, plural = RESOURCES[kind]
    path = f"{prefix}/namespaces/{quote(namespace)}/{plural}"
    if name is not None:
        path += f"/{quote(name)}"
    if sub:
        path += f"/{sub}"
    return path


def refusal_message(exc: ApiException) -> str:
    """The message of a metav1.Status error body ("... is forbidden: only dynamically provisioned
    pvc can be resized ..."), else the HTTP status and reason."""
    try:
        status = json.loads(exc.body or "")
    except (TypeError, ValueError):
        status = None
    message = status.get("message") if isinstance(status, dict) else None
    return str(message or f"{exc.status} {exc.reason}")


def failure_message(exc: BaseException) -> str:
    """What went wrong storing a child, for the status: the API server's HTTP status and
    message, or the client's error (a timeout, a connection refused)."""
    if isinstance(exc, ApiException):
        return f"{exc.status} {exc.reason}: {refusal_message(exc)}"
    return f"{type(exc).__name__}: {exc}"


def _event_time(event: Mapping[str, Any]) -> str:
    series = event.get("series") or {}
    return str(
        series.get("lastObservedTime")
        or event.get("lastTimestamp")
        or event.get("eventTime")
        or event.get("firstTimestamp")
        or ""
    )


def _owned_by(obj: Mapping[str, Any], owner_uid: str) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or ()
    return any(r.get("controller") and r.get("uid") == owner_uid for r in refs)


class Kube:
    """Thin synchronous wrapper; safe to share between threads (urllib3 pools)."""

    def __init__(self, api: client.ApiClient) -> None:
        self.api = api
        self.instance = os.environ.get("POD_NAME") or socket.gethostname()
        self._node_errors: set[str] = set()  # logged once each (boot_ids)

    # ----------------------------------------------------------------------------- REST

    def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        query: Mapping[str, str] | None = None,
        content_type: str = "application/json",
    ) -> dict[str, Any] | None:
        headers = {"Accept": "application/json", "Content-Type": content_type}
        req = self.api.param_serialize(
            method=method,
            resource_path=path,
            query_params=list(query.items()) if query else None,
            header_params=headers,
            body=body,
            auth_settings=["BearerToken"],
        )
        resp = self.api.call_api(*req, _request_timeout=TIMEOUT)
        resp.read()
        if not 200 <= resp.status <= 299:
            raise ApiException.from_response(http_resp=resp, body=None, data=None)
        return json.loads(resp.data) if resp.data else None

    def get(self, kind: str, namespace: str, name: str) -> dict[str, Any] | None:
        try:
            return self.request("GET", _path(kind, namespace, name))
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def get_path(self, path: str) -> dict[str, Any] | None:
        """GET of an API path (discovery included); None when it is not served (404)."""
        try:
            return self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    def list(self, kind: str, namespace: str, selector: str) -> list[dict[str, Any]]:
        out = self.request("GET", _path(kind, namespace), query={"labelSelector": selector})
        return list((out or {}).get("items") or ())

    # -------------------------------------------------------------------------- reading

    def peering_status(self, name: str, namespace: str | None) -> dict[str, Any] | None:
        """The keep-alives of kopf's peering object (ClusterKopfPeering when no namespace)."""
        path = (
            f"/apis/kopf.dev/v1/clusterkopfpeerings/{quote(name)}"
            if namespace is None
            else f"/apis/kopf.dev/v1/namespaces/{quote(namespace)}/kopfpeerings/{quote(name)}"
        )
        try:
            body = self.request("GET", path)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise
        return dict((body or {}).get("status") or {})

    def deployment(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(KIND, namespace, name)

    def observe(self, namespace: str, name: str, owner_uid: str) -> Observed:
        """Every child of one custom resource (children of a deleted namesake are left out)."""
        selector = names.owned_selector(name)
        jobs = [j for j in self.list("Job", namespace, selector) if _owned_by(j, owner_uid)]
        statefulsets = [
            s for s in self.list("StatefulSet", namespace, selector) if _owned_by(s, owner_uid)
        ]
        observed = Observed(
            jobs=jobs,
            statefulsets=statefulsets,
            # Only the pods of our own Jobs and StatefulSets: labels alone prove nothing.
            pods=ownership.owned_pods(
                self.list("Pod", namespace, selector), [*jobs, *statefulsets]
            ),
            claims=[
                c
                for c in self.list("PersistentVolumeClaim", namespace, selector)
                if _owned_by(c, owner_uid)
            ],
            network_policies=[
                n
                for n in self.list("NetworkPolicy", namespace, selector)
                if _owned_by(n, owner_uid)
            ],
        )
        for kind, obj in short_of_pods(observed):
            why = self.failed_create(namespace, obj)
            if why:
                observed.creation_failures[f"{kind} {obj['metadata']['name']}"] = why
        return observed

    def boot_ids(self, nodes: list[str]) -> dict[str, str]:
        """status.nodeInfo.bootID of each named Node that can be read: one that cannot (gone,
        not allowed by a namespace-scoped RBAC, a timeout) is left out, as unknown."""
        out: dict[str, str] = {}
        for node in nodes:
            try:
                body = self.request("GET", f"/api/v1/nodes/{quote(node)}") or {}
            except (ApiException, HTTPError, OSError) as exc:
                why = failure_message(exc)
                log.log(
                    logging.DEBUG if why in self._node_errors else logging.WARNING,
                    "cannot read Node %s (its reboots go unnoticed): %s",
                    node,
                    why,
                )
                self._node_errors.add(why)
                continue
            boot = ((body.get("status") or {}).get("nodeInfo") or {}).get("bootID")
            if boot:
                out[node] = str(boot)
        return out

    def failed_create(self, namespace: str, obj: Mapping[str, Any]) -> str | None:
        """The message of the newest FailedCreate Event of a Job or StatefulSet (its controller
        could not create a pod: a ResourceQuota, a Pod Security level, a policy webhook)."""
        obj_uid = (obj.get("metadata") or {}).get("uid")
        if not obj_uid:
            return None
        out = self.request(
            "GET",
            _path("Event", namespace),
            query={"fieldSelector": f"involvedObject.uid={obj_uid},reason=FailedCreate"},
        )
        events = list((out or {}).get("items") or ())
        if not events:
            return None
        newest = max(events, key=_event_time)
        return str(newest.get("message") or "FailedCreate")

    # -------------------------------------------------------------------------- writing

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any] | None:
        """Server-side apply with the operator's field manager, taking over conflicting fields."""
        md = obj["metadata"]
        return self.request(
            "PATCH",
            _path(obj["kind"], md["namespace"], md["name"]),
            body=dict(obj),
            query={"fieldManager": names.MANAGER, "force": "true"},
            content_type=APPLY_PATCH,
        )

    def apply_or_refusal(self, obj: Mapping[str, Any]) -> str | None:
        """Apply; when the API server refuses the change itself (400 Bad Request, 403 from an
        admission plugin, 422 Invalid), return its message instead of raising, so the planner can
        report it. Other failures (conflicts, timeouts, 5xx) raise and the reconcile is retried."""
        try:
            self.apply(obj)
        except ApiException as exc:
            if exc.status == 404 and obj.get("kind") == "PodGroup":
                # The kind itself is not served: retrying cannot help until Volcano is installed.
                return (
                    f"the API server does not serve {obj.get('apiVersion')} PodGroup: install "
                    "Volcano, or unset spec.worker.schedulerName"
                )
            if exc.status not in (400, 403, 422):
                raise
            return refusal_message(exc)
        return None

    def apply_status(
        self, namespace: str, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Apply the status subresource only: the spec is never written."""
        body = {
            "apiVersion": f"{GROUP}/{VERSION}",
            "kind": KIND,
            "metadata": {"name": name, "namespace": namespace},
            "status": dict(status),
        }
        return self.request(
            "PATCH",
            _path(KIND, namespace, name, "status"),
            body=body,
            query={"fieldManager": names.MANAGER, "force": "true"},
            content_type=APPLY_PATCH,
        )

    def pin_pod(
        self, namespace: str, name: str, uid: str, node_selector: Mapping[str, str]
    ) -> None:
        """Set a gated pod's nodeSelector and lift its scheduling gates, only while it is the pod
        of this uid (a JSON patch test); gone, replaced or already placed is fine."""
        patch = [
            {"op": "test", "path": "/metadata/uid", "value": uid},
            {"op": "add", "path": "/spec/nodeSelector", "value": dict(node_selector)},
            {"op": "remove", "path": "/spec/schedulingGates"},
        ]
        try:
            self.request(
                "PATCH",
                _path("Pod", namespace, name),
                body=patch,
                content_type="application/json-patch+json",
            )
        except ApiException as exc:
            if exc.status in (404, 409, 422):
                log.info("pod %s/%s not pinned (%s %s)", namespace, name, exc.status, exc.reason)
            else:
                raise

    def delete(
        self, kind: str, namespace: str, name: str, uid: str, propagation: str = "Background"
    ) -> None:
        """Delete a child only while it is the object of this uid (a precondition); gone
        already, or replaced by a namesake, is fine. Background: a Job's pods follow; Foreground:
        the Job stays, terminating, until its pods are gone."""
        try:
            self.request(
                "DELETE",
                _path(kind, namespace, name),
                body={
                    "kind": "DeleteOptions",
                    "apiVersion": "v1",
                    "propagationPolicy": propagation,
                    "preconditions": {"uid": uid},
                },
            )
        except ApiException as exc:
            if exc.status == 409:
                log.info("%s %s/%s is no longer uid %s: left alone", kind, namespace, name, uid)
            elif exc.status != 404:
                raise

    def post_event(self, deployment: Mapping[str, Any], event: EventSpec) -> None:
        """A core/v1 Event on the custom resource (what kubectl describe shows)."""
        md = deployment.get("metadata") or {}
        namespace = md.get("namespace", "default")
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {
                "generateName": f"{md.get('name', 'dsd')[:200]}.",
                "namespace": namespace,
            },
            "involvedObject": {
                "apiVersion": f"{GROUP}/{VERSION}",
                "kind": KIND,
                "name": md.get("name"),
                "namespace": namespace,
                "uid": md.get("uid"),
                "resourceVersion": md.get("resourceVersion"),
            },
            "reason": event.reason,
            "message": event.message,
            "type": event.type,
            "source": {"component": names.MANAGER},
            "reportingComponent": f"{GROUP}/{names.MANAGER}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self.request("POST", _path("Event", namespace), body=body)
        except ApiException as exc:  # an Event lost is no reason to fail the reconcile
            log.warning(
                "could not post Event %s on %s/%s: %s %s",
                event.reason,
                namespace,
                md.get("name"),
                exc.status,
                exc.reason,
            )
