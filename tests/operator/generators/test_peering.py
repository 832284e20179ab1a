"""kopf's peering CRDs: generated, committed, one cluster-scoped and one namespaced."""

from __future__ import annotations

import yaml

from deepseek_operator.generators import peering


def test_peering_crds_are_generated_and_committed() -> None:
    assert peering.DEFAULT_OUTPUT.read_text() == peering.render()
    assert peering.main(["--check"]) == 0
    docs = list(yaml.safe_load_all(peering.render()))
    assert [d["metadata"]["name"] for d in docs] == [
        "clusterkopfpeerings.kopf.dev",
        "kopfpeerings.kopf.dev",
    ]
    assert [d["spec"]["scope"] for d in docs] == ["Cluster", "Namespaced"]
    assert peering.peering_object("dsop")["kind"] == "ClusterKopfPeering"
