"""Print the per-rank memory of each example under examples/ for DeepSeek-V3/R1's public config.json,
as the operator computes it before any pod starts (docs/memory.md shows the output).

    .venv/bin/python scripts/memory_table.py [examples/*.yaml] [--config tests/data/deepseek-v3-config.json]
    .venv/bin/python scripts/memory_table.py --formats   # weights per rank by format and world
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import yaml

from deepseek_operator.api import parse_deployment
from deepseek_operator.planning.memory import check_memory
from dsworker.contract.kv_budget import GIB
from dsworker.contract.layout import ParallelPlan
from dsworker.contract.memory import weight_bytes

ROOT = Path(__file__).resolve().parents[1]


def row(path: Path, fp8_config: dict) -> str | None:
    """One markdown table row, or None for an example without accelerator memory (cpu)."""
    spec = parse_deployment(yaml.safe_load(path.read_text())).deployment.spec
    quant = spec.model.quantization
    config = (
        fp8_config
        if quant == "fp8"
        else {k: v for k, v in fp8_config.items() if k != "quantization_config"}
    )
    verdict = check_memory(spec, config, quant)
    if verdict is None:
        return None
    fit, par = verdict.fit, spec.parallelism
    plan = (
        f"{par.world()} ranks: dp {par.dp} x tp {par.tp}, moeTp {par.moe_tp} x moeEp {par.moe_ep}"
    )
    serving = f"{spec.serving.max_seq_len} x {spec.serving.max_batch_size}"
    state = "does not fit" if not fit.fits else "low headroom" if fit.low_headroom else "fits"

    def g(n: int) -> str:
        return f"{n / GIB:.1f}"

    return (
        f"| `{path.name}` | {quant}{' + MTP' if spec.model.mtp else ''} | {plan} | {serving} | "
        f"{g(fit.weights)} | {g(fit.kv)} | {g(fit.workspace)} | {g(fit.total)} | {g(fit.device)} "
        f"| {fit.headroom:.0%} ({state}) |"
    )


def formats(fp8_config: dict) -> None:
    """Weights per rank (the largest rank, GiB, with MTP) by checkpoint format and world size:
    attention tp 8 in world/8 dp groups, experts over all ranks."""
    bf16 = {k: v for k, v in fp8_config.items() if k != "quantization_config"}
    w8a16 = {"quant_method": "compressed-tensors"}
    w8a16["config_groups"] = {"g": {"weights": {"num_bits": 8, "type": "int"}}}
    configs = {
        "bf16": bf16,
        "fp8": fp8_config,
        "w8a8": {**bf16, "quantize": "w8a8"},
        "w8a16": {**bf16, "quantization_config": w8a16},
    }
    worlds = (8, 16, 32)
    print("| format | " + " | ".join(f"{w} ranks" for w in worlds) + " |")
    print("|---|" + "---|" * len(worlds))
    for name, cfg in configs.items():
        cells = [
            f"{max(weight_bytes(cfg, ParallelPlan(w, w // 8, 8, 1, w), True).device) / GIB:.1f}"
            for w in worlds
        ]
        print(f"| {name} | " + " | ".join(cells) + " |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", nargs="*", type=Path)
    parser.add_argument("--config", type=Path, default=ROOT / "tests/data/deepseek-v3-config.json")
    parser.add_argument("--formats", action="store_true", help=formats.__doc__.splitlines()[0])
    args = parser.parse_args()
    config = json.loads(args.config.read_text())
    if args.formats:
        formats(config)
        return
    print(
        "| example | weights | plan | maxSeqLen x maxBatchSize | weights GiB | KV GiB | "
        "workspace GiB | total GiB | device GiB | headroom |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|")
    for path in args.examples or sorted((ROOT / "examples").glob("*.yaml")):
        line = row(path, config)
        if line:
            print(line)


if __name__ == "__main__":
    main()
