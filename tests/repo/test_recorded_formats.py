"""tests/data/formats: the recorded engine formats are well-formed and say what they claim.

The schemas must be valid draft 2020-12, accept the hand-written examples written after the
documentation, and reject the mistakes a renderer is likely to make. The vLLM option table, the
MindIE environment table and the Volcano CRD pin are checked for the structure other tests and
renderers rely on.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from jsonschema import Draft202012Validator

from dsworker.contract.quant import W8A8_STATIC, QuantFormat, stored
from dsworker.ops.quant_formats import quantize_static

REPO = Path(__file__).resolve().parents[2]
FORMATS = REPO / "tests" / "data" / "formats"
EXAMPLES = FORMATS / "examples"
CLUSTER = REPO / "tests" / "cluster"
SCHEMAS = sorted(FORMATS.glob("*.schema.json"))

sys.path.insert(0, str(CLUSTER))
from localcluster import VOLCANO_PODGROUP_CRD, build_binaries, volcano_podgroup_crd  # noqa: E402


def load(path: Path) -> Any:
    return json.loads(path.read_text())


def validator(name: str) -> Draft202012Validator:
    """A validator with format assertion on, so that IP addresses are checked too."""
    return Draft202012Validator(
        load(FORMATS / name), format_checker=Draft202012Validator.FORMAT_CHECKER
    )


def error_paths(v: Draft202012Validator, doc: Any) -> list[str]:
    """Each error as a JSON-pointer-like path; one error per failing property, not per subschema."""
    return ["/" + "/".join(str(p) for p in e.absolute_path) for e in v.iter_errors(doc)]


MINDIE = "mindie_service_config.schema.json"
RANK_TABLE = "hccl_rank_table.schema.json"
MINDIE_EXAMPLE = EXAMPLES / "mindie_config.deepseek_r1_two_node.json"
RANK_TABLE_EXAMPLE = EXAMPLES / "hccl_rank_table.two_node.json"


def test_there_are_schemas() -> None:
    assert {p.name for p in SCHEMAS} >= {MINDIE, RANK_TABLE}


@pytest.mark.parametrize("path", SCHEMAS, ids=lambda p: p.name)
def test_schema_is_valid_draft_2020_12_and_names_its_source(path: Path) -> None:
    schema = load(path)
    assert schema["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    Draft202012Validator.check_schema(schema)
    assert "Recorded 20" in schema["description"], "the description must give the date recorded"
    assert re.search(r"https://|github\.com/", schema["description"]), "no source named"


def test_readme_lists_every_recorded_file() -> None:
    readme = (FORMATS / "README.md").read_text()
    recorded = [p.name for p in FORMATS.iterdir() if p.is_file() and p.name != "README.md"]
    assert recorded
    missing = [name for name in recorded if f"`{name}`" not in readme]
    assert not missing, f"tests/data/formats/README.md does not list {missing}"


def test_mindie_example_from_the_docs_is_valid() -> None:
    v = validator(MINDIE)
    assert error_paths(v, load(MINDIE_EXAMPLE)) == []


def test_rank_table_example_is_valid_and_consistent() -> None:
    table = load(RANK_TABLE_EXAMPLE)
    assert error_paths(validator(RANK_TABLE), table) == []
    # The cross-field rules the schema lists but cannot express.
    assert int(table["server_count"]) == len(table["server_list"])
    ranks = [int(d["rank_id"]) for s in table["server_list"] for d in s["device"]]
    assert sorted(ranks) == list(range(len(ranks)))
    for server in table["server_list"]:
        ids = [int(d["device_id"]) for d in server["device"]]
        assert sorted(ids) == list(range(len(ids)))


Mutation = Callable[[dict[str, Any]], None]


def _model(doc: dict[str, Any]) -> dict[str, Any]:
    return doc["BackendConfig"]["ModelDeployConfig"]["ModelConfig"][0]


def _flat_device_ids(doc: dict[str, Any]) -> None:
    doc["BackendConfig"]["npuDeviceIds"] = [0, 1, 2, 3, 4, 5, 6, 7]


def _ep_level_3(doc: dict[str, Any]) -> None:
    _model(doc)["models"]["deepseekv2"]["ep_level"] = 3


def _topk_without_cutoff(doc: dict[str, Any]) -> None:
    _model(doc)["models"]["deepseekv2"]["topk_scaling_factor"] = 0.25


def _scale_factor_triplet(doc: dict[str, Any]) -> None:
    _model(doc)["models"]["deepseekv2"]["alltoall_ep_buffer_scale_factors"][0] = [1, 1.0, 2]


def _unknown_top_level(doc: dict[str, Any]) -> None:
    doc["Backendconfig"] = {}


def _bad_ip(doc: dict[str, Any]) -> None:
    doc["ServerConfig"]["ipAddress"] = "192.0.2.300"


def _low_port(doc: dict[str, Any]) -> None:
    doc["ServerConfig"]["port"] = 80


def _block_not_16(doc: dict[str, Any]) -> None:
    doc["BackendConfig"]["ScheduleConfig"]["cacheBlockSize"] = 100


def _npu_mem_zero(doc: dict[str, Any]) -> None:
    _model(doc)["npuMemSize"] = 0


def _missing_schedule(doc: dict[str, Any]) -> None:
    del doc["BackendConfig"]["ScheduleConfig"]


MINDIE_MISTAKES: dict[str, tuple[Mutation, str]] = {
    "npuDeviceIds flat": (_flat_device_ids, "/BackendConfig/npuDeviceIds/0"),
    "ep_level 3": (_ep_level_3, "/BackendConfig/ModelDeployConfig/ModelConfig/0/models/deepseekv2/ep_level"),
    "topk without cutoff": (_topk_without_cutoff, "/BackendConfig/ModelDeployConfig/ModelConfig/0/models/deepseekv2"),
    "scale factor triplet": (
        _scale_factor_triplet,
        "/BackendConfig/ModelDeployConfig/ModelConfig/0/models/deepseekv2/alltoall_ep_buffer_scale_factors/0",
    ),
    "unknown top-level key": (_unknown_top_level, "/"),
    "bad IPv4": (_bad_ip, "/ServerConfig/ipAddress"),
    "port below 1024": (_low_port, "/ServerConfig/port"),
    "cacheBlockSize 100": (_block_not_16, "/BackendConfig/ScheduleConfig/cacheBlockSize"),
    "npuMemSize 0": (_npu_mem_zero, "/BackendConfig/ModelDeployConfig/ModelConfig/0/npuMemSize"),
    "no ScheduleConfig": (_missing_schedule, "/BackendConfig"),
}  # fmt: skip


@pytest.mark.parametrize("name", MINDIE_MISTAKES)
def test_mindie_schema_rejects_mistake(name: str) -> None:
    mutate, where = MINDIE_MISTAKES[name]
    doc = copy.deepcopy(load(MINDIE_EXAMPLE))
    mutate(doc)
    paths = error_paths(validator(MINDIE), doc)
    assert where in paths, f"{name}: expected an error at {where}, got {paths}"


def _rank_as_int(t: dict[str, Any]) -> None:
    t["server_list"][0]["device"][0]["rank_id"] = 0


def _device_ip_bad(t: dict[str, Any]) -> None:
    t["server_list"][1]["device"][3]["device_ip"] = "10.20.1"


def _version_2(t: dict[str, Any]) -> None:
    t["version"] = "2.0"


def _count_as_int(t: dict[str, Any]) -> None:
    t["server_count"] = 2


def _typo_key(t: dict[str, Any]) -> None:
    t["server_list"][0]["device"][0]["rankid"] = "0"


RANK_TABLE_MISTAKES: dict[str, tuple[Mutation, str]] = {
    "rank_id not a string": (_rank_as_int, "/server_list/0/device/0/rank_id"),
    "device_ip not an IP": (_device_ip_bad, "/server_list/1/device/3/device_ip"),
    "version 2.0": (_version_2, "/version"),
    "server_count not a string": (_count_as_int, "/server_count"),
    "unknown device key": (_typo_key, "/server_list/0/device/0"),
}


@pytest.mark.parametrize("name", RANK_TABLE_MISTAKES)
def test_rank_table_schema_rejects_mistake(name: str) -> None:
    mutate, where = RANK_TABLE_MISTAKES[name]
    table = copy.deepcopy(load(RANK_TABLE_EXAMPLE))
    mutate(table)
    paths = error_paths(validator(RANK_TABLE), table)
    assert where in paths, f"{name}: expected an error at {where}, got {paths}"


VLLM_TYPES = {"int", "float", "str", "bool", "json", "list[str]"}


def _in_range(value: float, spec: dict[str, Any]) -> bool:
    return (
        value >= spec.get("min", value)
        and value <= spec.get("max", value)
        and value > spec.get("exclusive_min", value - 1)
    )


def test_vllm_options_structure() -> None:
    doc = load(FORMATS / "vllm_serve_options.json")
    assert re.fullmatch(r"\d+\.\d+\.\d+", doc["version"])
    assert doc["version"] in doc["source"]
    options: dict[str, dict[str, Any]] = doc["options"]
    for flag, spec in options.items():
        assert flag.startswith("--"), flag
        assert spec["type"] in VLLM_TYPES, f"{flag}: type {spec['type']}"
        assert spec["meaning"], flag
        assert ("negatable" in spec) == (spec["type"] == "bool"), f"{flag}: negatable is for bools"
        choices = spec.get("choices")
        if choices is not None:
            assert choices and len(set(map(str, choices))) == len(choices), flag
            default = spec.get("default")
            assert default is None or default in choices, f"{flag}: default not a choice"
        if {"min", "max", "exclusive_min"} & spec.keys():
            assert spec["type"] in {"int", "float"}, flag
            if spec.get("default") is not None:
                assert _in_range(spec["default"], spec), f"{flag}: default out of range"
    parallel = ("--tensor-parallel-size", "--data-parallel-size", "--data-parallel-size-local")
    parallel += (
        "--data-parallel-address",
        "--data-parallel-rpc-port",
        "--data-parallel-start-rank",
    )
    for flag in (*parallel, "--headless", "--enable-expert-parallel", "--all2all-backend"):
        assert flag in options, f"{flag} missing"
    assert "deepep_low_latency" in options["--all2all-backend"]["choices"]
    assert "deepseek_mtp" in options["--speculative-config"]["json_keys"]["method"]["choices"]
    assert options["--gpu-memory-utilization"] | {"max": 1} == options["--gpu-memory-utilization"]
    assert "VLLM_ALL2ALL_BACKEND" in doc["env"]


def test_vllm_ascend_section_matches_its_version() -> None:
    ascend = load(FORMATS / "vllm_serve_options.json")["vllm_ascend"]
    assert ascend["version"].startswith("0.13.0")
    # torchair/ascend scheduler were removed by 0.13.0; they are kept only as the 0.11.0 record.
    assert "torchair_graph_config" not in ascend["additional_config"]
    legacy = ascend["legacy_v0_11_0"]["additional_config"]
    assert {"torchair_graph_config", "ascend_scheduler_config"} <= legacy.keys()
    assert "ascend" in ascend["extra_cli_choices"]["--quantization"]
    options = load(FORMATS / "vllm_serve_options.json")["options"]
    for node in ("node0", "node1"):
        flags = [a for a in ascend["multi_node_deepseek_r1"][node] if a.startswith("--")]
        unknown = [f for f in flags if f not in options]
        assert not unknown, f"{node} uses options not recorded: {unknown}"


def test_mindie_env_and_endpoints() -> None:
    doc = load(FORMATS / "mindie_service.env_and_endpoints.json")
    for name, spec in doc["env"].items():
        assert re.fullmatch(r"[A-Z][A-Z0-9_]*", name), name
        assert spec["meaning"] and spec["source"], name
    # The rank table variable was renamed between releases; both must stay recorded.
    assert {
        "RANKTABLEFILE",
        "RANK_TABLE_FILE",
        "MIES_CONTAINER_IP",
        "MIES_CONFIG_JSON_PATH",
    } <= doc["env"].keys()
    timed = doc["endpoints"]["health_timed"]
    assert timed["params"]["TIMEOUT"] | {"min": 1, "max": 600} == timed["params"]["TIMEOUT"]
    assert doc["endpoints"]["metrics"]["port"] == "metricsPort"


def test_volcano_crd_pin_agrees_with_build_script() -> None:
    source = load(FORMATS / "volcano_podgroup.source.json")
    build = (CLUSTER / "build.sh").read_text()
    pinned = re.search(r"^volcano_podgroup_sha256=([0-9a-f]{64})$", build, re.M)
    assert pinned, "build.sh no longer pins the PodGroup CRD sha256"
    assert pinned.group(1) == source["rendered_sha256"] == source["published_yaml"]["sha256"]
    go_mod = (CLUSTER / "volcano" / "go.mod").read_text()
    apis = source["fetched_as_go_module"]
    assert f"require {apis['module']} {apis['version']}" in go_mod
    gen = source["generator"]
    assert f"{gen['module']} {gen['version']}" in go_mod
    assert f'"$out/{VOLCANO_PODGROUP_CRD}"' in build, "build.sh writes the CRD elsewhere"


def test_built_volcano_crd_has_the_pinned_bytes() -> None:
    """build.sh (a no-op when its cache is complete) left the CRD whose sha256 was recorded."""
    source = load(FORMATS / "volcano_podgroup.source.json")
    crd = volcano_podgroup_crd(build_binaries(lambda _msg: None))
    data = crd.read_bytes()
    assert hashlib.sha256(data).hexdigest() == source["rendered_sha256"]
    assert b"name: podgroups.scheduling.volcano.sh" in data
    assert b"name: v1beta1" in data


def test_w8a8_static_record_is_what_the_engine_stores_and_computes() -> None:
    """contract.quant.stored writes MindIE's bfloat16 table; the rounding cases hold."""
    rec = load(FORMATS / "w8a8_static.json")
    want = {k: v["dtype"] for k, v in rec["tensors"]["bfloat16"].items()}
    got = {
        n.rsplit(".", 1)[-1]: d for n, d, _ in stored("m.weight", (6, 4), QuantFormat(W8A8_STATIC))
    }
    assert got == want
    for case in rec["compute"]["cases"]:
        q = quantize_static(
            torch.tensor([case["x"]]),
            torch.tensor([case["input_scale"]]),
            torch.tensor([float(case["input_offset"])]),
        )
        assert q[0].tolist() == case["q"], case
