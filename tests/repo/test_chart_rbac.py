"""The chart's RBAC: least privilege in every scope, exactly the verbs the operator's calls need,
nothing cluster-wide in namespace scope."""

from __future__ import annotations

from pathlib import Path

import pytest
from helm_chart import FULL_VALUES, SCENARIOS, by_kind, one, operator_container, render, rules_of

# The operator's children and what it does to them (see the operator's handlers); the chart must
# grant exactly these verbs, nothing broader.
APPLY_VERBS = {"get", "list", "watch", "create", "patch"}


EXPECTED_RULES: dict[tuple[str, str], set[str]] = {
    ("llm.dsop.io", "deepseekdeployments"): {"get", "list", "watch"},
    ("llm.dsop.io", "deepseekdeployments/status"): {"patch"},
    ("llm.dsop.io", "deepseekdeployments/finalizers"): {"update"},
    ("", "configmaps"): APPLY_VERBS,
    ("", "services"): APPLY_VERBS,
    ("", "persistentvolumeclaims"): APPLY_VERBS,
    ("batch", "jobs"): APPLY_VERBS | {"delete"},
    ("apps", "statefulsets"): APPLY_VERBS,
    ("policy", "poddisruptionbudgets"): APPLY_VERBS,
    ("networking.k8s.io", "networkpolicies"): APPLY_VERBS | {"delete"},
    # patch: only to lift the node-pin scheduling gate of a node-local store's worker pods.
    ("", "pods"): {"get", "list", "watch", "patch", "delete"},
    ("scheduling.volcano.sh", "podgroups"): APPLY_VERBS,
    ("", "events"): {"create", "list"},
}


# Never granted: the operator reads no secrets and needs no escalation paths.
FORBIDDEN_RESOURCES = {"secrets", "*", "clusterroles", "roles", "rolebindings"}


def test_namespace_scope_grants_nothing_cluster_wide(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, FULL_VALUES, tmp_path)
    assert not by_kind(objects, "ClusterRole") and not by_kind(objects, "ClusterRoleBinding")
    roles = by_kind(objects, "Role")
    bindings = by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["llm", "llm-staging"]
    sa = one(objects, "ServiceAccount")
    for binding in bindings:
        assert binding["subjects"] == [
            {"kind": "ServiceAccount", "name": sa["metadata"]["name"], "namespace": "dsop-system"}
        ]
    args = operator_container(objects)["args"]
    assert "--namespace=llm" in args and "--namespace=llm-staging" in args
    assert "--peering=dsop-leader" in args
    assert sorted(p["metadata"]["namespace"] for p in by_kind(objects, "KopfPeering")) == [
        "llm",
        "llm-staging",
    ]


def test_namespace_scope_defaults_to_the_release_namespace(helm: Path, tmp_path: Path) -> None:
    objects = render(helm, SCENARIOS["namespace-scope-release-ns"], tmp_path)
    assert [r["metadata"]["namespace"] for r in by_kind(objects, "Role")] == ["dsop-system"]
    assert "--namespace=dsop-system" in operator_container(objects)["args"]


@pytest.mark.parametrize(
    "scenario", ["default", "full-namespaced", "cluster-listed-namespaces-peered"]
)
def test_rbac_is_least_privilege(helm: Path, tmp_path: Path, scenario: str) -> None:
    objects = render(helm, SCENARIOS[scenario], tmp_path)
    roles = by_kind(objects, "ClusterRole") + by_kind(objects, "Role")
    assert roles
    for role in roles:
        granted: dict[tuple[str, str], set[str]] = {}
        for group, resource, verbs in rules_of(role):
            assert "*" not in verbs and group != "*", role["rules"]
            assert resource not in FORBIDDEN_RESOURCES, resource
            assert not {"escalate", "bind", "impersonate", "deletecollection"} & verbs
            granted.setdefault((group, resource), set()).update(verbs)
        for key, verbs in EXPECTED_RULES.items():
            assert granted.get(key) == verbs, f"{role['kind']}: {key} has {granted.get(key)}"
        extra = set(granted) - set(EXPECTED_RULES)
        allowed_extra = {
            ("kopf.dev", "kopfpeerings"),
            ("kopf.dev", "clusterkopfpeerings"),
            ("", "namespaces"),
            ("apiextensions.k8s.io", "customresourcedefinitions"),
            ("", "nodes"),
        }
        assert extra <= allowed_extra, extra
        # Nodes: only get (a node-local store's bootIDs), and only cluster-wide.
        assert granted.get(("", "nodes")) == ({"get"} if role["kind"] == "ClusterRole" else None)
        for key in extra & {
            ("", "namespaces"),
            ("apiextensions.k8s.io", "customresourcedefinitions"),
        }:
            assert granted[key] == {"list", "watch"}, key  # read-only


def test_rbac_covers_every_call_the_operator_makes(helm: Path, tmp_path: Path) -> None:
    """Ties the ClusterRole to the operator's code: every kind its REST layer touches is granted
    (apply = create + patch for children; delete for the kinds the planner deletes)."""
    import typing

    k8s = pytest.importorskip("deepseek_operator.runtime.k8s")
    from deepseek_operator.planning import Delete

    granted: dict[tuple[str, str], set[str]] = {}
    for group, resource, verbs in rules_of(one(render(helm, {}, tmp_path), "ClusterRole")):
        granted.setdefault((group, resource), set()).update(verbs)
    deleted = set(typing.get_args(typing.get_type_hints(Delete)["kind"]))
    for kind, (prefix, plural) in k8s.RESOURCES.items():
        group = "" if prefix == "/api/v1" else prefix.split("/")[2]
        verbs = granted.get((group, plural), set())
        if kind == "Event":
            # kopf and the operator POST Events, never PATCH them; FailedCreate ones are listed.
            assert verbs == {"create", "list"}, verbs
            continue
        assert {"get", "list", "watch"} <= verbs, kind
        if kind not in ("Pod", "DeepSeekDeployment"):
            assert {"create", "patch"} <= verbs, f"{kind}: server-side apply needs create+patch"
        if kind in deleted:
            assert "delete" in verbs, kind
    assert "patch" in granted[("llm.dsop.io", "deepseekdeployments/status")]
    assert granted[("", "nodes")] == {"get"}  # Kube.boot_ids
