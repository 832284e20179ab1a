"""Checkers of rendered engine configuration against the formats recorded under tests/data/formats.

`mindie_config_errors` validates a config.json against MindIE's JSON schema (format assertion on)
plus the cross-field rules the schema lists in x-crossFieldRules; `vllm_args_errors` parses a
`vllm serve` argument list as vLLM 0.13's argparse would, with the recorded types, choices and
ranges (and vllm-ascend's additions on npu).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path
from typing import Any

from jsonschema import Draft202012Validator

FORMATS = Path(__file__).resolve().parent / "data" / "formats"


@cache
def load(name: str) -> Any:
    return json.loads((FORMATS / name).read_text())


def mindie_config_errors(config: dict[str, Any], multi_node: bool) -> list[str]:
    schema = load("mindie_service_config.schema.json")
    v = Draft202012Validator(schema, format_checker=Draft202012Validator.FORMAT_CHECKER)
    out = [f"/{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in v.iter_errors(config)]
    if out:
        return out
    backend = config["BackendConfig"]
    deploy, sched = backend["ModelDeployConfig"], backend["ScheduleConfig"]
    if sched["maxPrefillBatchSize"] > sched["maxBatchSize"]:
        out.append("maxPrefillBatchSize > maxBatchSize")
    if sched["maxPrefillTokens"] < deploy["maxInputTokenLen"]:
        out.append("maxPrefillTokens < maxInputTokenLen")
    if sched["maxIterTimes"] > deploy["maxSeqLen"]:
        out.append("maxIterTimes > maxSeqLen")
    if sched["maxPreemptCount"] > sched["maxBatchSize"]:
        out.append("maxPreemptCount > maxBatchSize")
    for model in deploy["ModelConfig"]:
        if sched["maxPreemptCount"] > 0 and model["cpuMemSize"] == 0:
            out.append("maxPreemptCount > 0 needs cpuMemSize > 0")
        firsts = [
            p[0] for p in model["models"]["deepseekv2"].get("alltoall_ep_buffer_scale_factors", [])
        ]
        if firsts != sorted(firsts, reverse=True) or len(set(firsts)) != len(firsts):
            out.append("alltoall_ep_buffer_scale_factors not descending")
    if multi_node and backend["modelInstanceNumber"] != 1:
        out.append("modelInstanceNumber must be 1 for multi-node inference")
    server = config["ServerConfig"]
    if server["ipAddress"] == "0.0.0.0" and not server["allowAllZeroIpListening"]:
        out.append("ipAddress 0.0.0.0 needs allowAllZeroIpListening")
    return out


def _options(accelerator: str) -> dict[str, dict[str, Any]]:
    """Every option name (aliases and --no- forms included) -> its recorded spec."""
    recorded = load("vllm_serve_options.json")
    added = recorded["vllm_ascend"]["extra_cli_choices"] if accelerator == "npu" else {}
    out: dict[str, dict[str, Any]] = {}
    for name, spec in recorded["options"].items():
        spec = {**spec, "canonical": name}
        if name in added and "choices" in spec:
            spec["choices"] = spec["choices"] + added[name]
        for key in (name, *spec.get("aliases", [])):
            out[key] = spec
        if spec["type"] == "bool" and spec.get("negatable"):
            out["--no-" + name[2:]] = spec
    return out


def _value_errors(name: str, spec: dict[str, Any], value: str, accelerator: str) -> list[str]:
    kind = spec["type"]
    try:
        parsed: Any = {"int": int, "float": float, "json": json.loads}.get(kind, str)(value)
    except ValueError:
        return [f"{name} {value!r} is not {kind}"]
    out: list[str] = []
    if "choices" in spec and parsed not in spec["choices"]:
        out.append(f"{name} {value!r} not in {spec['choices']}")
    if "min" in spec and parsed < spec["min"]:
        out.append(f"{name} {value} < {spec['min']}")
    if "max" in spec and parsed > spec["max"]:
        out.append(f"{name} {value} > {spec['max']}")
    if "exclusive_min" in spec and parsed <= spec["exclusive_min"]:
        out.append(f"{name} {value} <= {spec['exclusive_min']}")
    if kind == "json" and "json_keys" in spec:
        if not isinstance(parsed, dict):
            return [f"{name} is not a JSON object"]
        extra = load("vllm_serve_options.json")["vllm_ascend"]["extra_cli_choices"]
        for key, value_ in parsed.items():
            key_spec = spec["json_keys"].get(key)
            if key_spec is None:
                out.append(f"{name}: unknown key {key}")
                continue
            key_spec = dict(key_spec)
            if accelerator == "npu" and "choices" in key_spec:
                key_spec["choices"] = key_spec["choices"] + extra.get(f"{name}.{key}", [])
            out += _value_errors(
                f"{name}.{key}",
                key_spec,
                json.dumps(value_) if key_spec["type"] == "json" else str(value_),
                accelerator,
            )
    return out


def vllm_args_errors(args: list[str], accelerator: str) -> list[str]:
    """What vLLM 0.13 (vllm-ascend 0.13 on npu) would refuse in `vllm serve ARGS`."""
    options = _options(accelerator)
    out: list[str] = []
    if not args or args[0].startswith("-"):
        return ["the model path must come first"]
    seen: set[str] = set()
    i = 1
    while i < len(args):
        token = args[i]
        name, _, inline = token.partition("=")
        spec = options.get(name)
        if spec is None:
            out.append(f"unknown option {token}")
            i += 1
            continue
        canonical = spec["canonical"]
        if canonical in seen:
            out.append(f"{name} given twice")
        seen.add(canonical)
        if spec["type"] == "bool":
            if inline:
                out.append(f"{name} takes no value")
            i += 1
            continue
        value = inline or (args[i + 1] if i + 1 < len(args) else None)
        if value is None or (not inline and value.startswith("--")):
            out.append(f"{name} needs a value")
            i += 1
            continue
        out += _value_errors(name, spec, value, accelerator)
        i += 1 if inline else 2
    if "--headless" in seen and "--api-server-count" in seen:
        out.append("--headless cannot be combined with --api-server-count")
    return out
