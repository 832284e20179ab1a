"""`dsworker serve`: resolve the engine config, then launch this pod's ranks (see launcher.py).

Everything that can be wrong with the configuration (unknown keys, a plan that does not match the
world or the shards, a malformed config.json) is reported here, once, before any rank starts (exit
code 2); the ranks get the resolved config as JSON and run dsworker.launch.rank_main.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from dsworker.checkpoint.fsutil import load_json, member_file
from dsworker.checkpoint.hf_checkpoint import read_model_config
from dsworker.contract.engine_config import EngineConfig, EngineConfigError, load_engine_config
from dsworker.contract.errors import EXIT_BAD_INPUT, CheckpointError
from dsworker.contract.layout import METADATA_FILE
from dsworker.launch.fit_check import check_start
from dsworker.launch.rank_processes import Launcher, python_module_command, rank_specs

log = logging.getLogger("dsworker.launch.serve_command")

PLAN_KEYS = ("worldSize", "dp", "tp", "moe_tp", "moe_ep")
DEFAULT_MASTER_PORT = 29500


def shard_plan(model_dir: Path) -> dict[str, Any] | None:
    """The plan recorded in the sharded layout's metadata, or None for a plain HF checkpoint."""
    path = model_dir / METADATA_FILE
    if not path.exists() and not path.is_symlink():
        return None
    metadata = load_json(member_file(model_dir, METADATA_FILE, METADATA_FILE), METADATA_FILE)
    plan = metadata.get("plan") if isinstance(metadata, dict) else None
    return plan if isinstance(plan, dict) else None


def resolve_config(
    cfg: EngineConfig,
    world: int,
    plan: dict[str, Any] | None,
    overrides: dict[str, Any],
) -> EngineConfig:
    """Fill the parallel plan when the config leaves it out, apply CLI overrides, check the world.

    Plan keys the config does not set come from the shards' metadata (the plan they were cut for),
    else tp = moe_ep = the world size (dp 1, moe_tp 1).
    """
    given = cfg.model_fields_set
    data = cfg.model_dump()
    if not given.intersection(PLAN_KEYS):
        if plan is not None:
            data.update(
                worldSize=int(plan.get("worldSize", world)),
                dp=int(plan.get("dp", 1)),
                tp=int(plan.get("tp", world)),
                moe_tp=int(plan.get("moeTp", 1)),
                moe_ep=int(plan.get("moeEp", world)),
            )
            if "mtp" not in given and "mtp" in plan:
                data["mtp"] = bool(plan["mtp"])
        else:
            data.update(worldSize=world, dp=1, tp=world, moe_tp=1, moe_ep=world)
    data.update({k: v for k, v in overrides.items() if v is not None})
    try:
        out = EngineConfig.model_validate(data)
    except ValueError as exc:
        raise EngineConfigError(f"engine config after applying the plan and flags: {exc}") from None
    if out.worldSize != world:
        raise EngineConfigError(
            f"worldSize {out.worldSize} in the engine config does not match --nodes x "
            f"--nproc-per-node = {world}; start one rank per device of the plan"
        )
    if plan is not None:
        mismatch = [
            f"{key}: shards {plan.get(meta_key)!r}, engine config {getattr(out, key)!r}"
            for key, meta_key in (
                ("worldSize", "worldSize"),
                ("dp", "dp"),
                ("tp", "tp"),
                ("moe_tp", "moeTp"),
                ("moe_ep", "moeEp"),
            )
            if meta_key in plan and plan[meta_key] != getattr(out, key)
        ]
        if mismatch:
            raise EngineConfigError(
                "the shards were cut for another plan: "
                + "; ".join(mismatch)
                + "; re-shard or fix "
                "the engine config"
            )
    return out


def with_api_key_file(cfg: EngineConfig, environ: Mapping[str, str]) -> EngineConfig:
    """apiKeyFile, from the environment when the config leaves it out, checked now: a key
    that cannot be read stops the launch before any rank starts."""
    from dsworker.serving.auth import API_KEY_FILE_ENV, load_api_key  # only `serve` needs them

    path = cfg.apiKeyFile or environ.get(API_KEY_FILE_ENV) or None
    if path is None:
        return cfg
    load_api_key(path)
    return cfg.model_copy(update={"apiKeyFile": path})


def node_rank_from_host(explicit: int | None) -> int:
    """--node-rank, else NODE_RANK, else the StatefulSet ordinal at the end of the hostname."""
    if explicit is not None:
        return explicit
    if os.environ.get("NODE_RANK", "").isdigit():
        return int(os.environ["NODE_RANK"])
    from dsworker.tools.stage import StageError, pod_ordinal

    try:
        return pod_ordinal(None)
    except StageError as exc:
        raise EngineConfigError(str(exc).replace("--pod-ordinal", "--node-rank")) from None


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="run the engine ranks of one pod and serve the OpenAI API on rank 0",
        description=(
            "Start --nproc-per-node rank processes (global rank = node rank x nproc + local "
            "index); rank 0 serves HTTP. Any rank dying stops all and exits non-zero."
        ),
    )
    p.add_argument("--model", required=True, type=Path, help="model directory (sharded or HF)")
    p.add_argument("--config", type=Path, default=None, help="engine config JSON (ConfigMap)")
    p.add_argument("--nproc-per-node", type=int, default=1, help="ranks (devices) in this pod")
    p.add_argument(
        "--nodes",
        type=int,
        default=int(os.environ.get("NNODES", "1")),
        help="pods in the model instance (env NNODES)",
    )
    p.add_argument(
        "--node-rank",
        type=int,
        default=None,
        help="this pod's index; default NODE_RANK, else the hostname's StatefulSet ordinal",
    )
    p.add_argument(
        "--master-addr",
        default=os.environ.get("MASTER_ADDR"),
        help="rank 0's host (pod 0 via the headless Service); default 127.0.0.1 for one node",
    )
    p.add_argument(
        "--master-port",
        type=int,
        default=int(os.environ.get("MASTER_PORT", DEFAULT_MASTER_PORT)),
        help=f"torch.distributed rendezvous port (env MASTER_PORT, default {DEFAULT_MASTER_PORT})",
    )
    p.add_argument("--host", default="0.0.0.0", help="HTTP bind address of rank 0")
    p.add_argument("--port", type=int, default=None, help="HTTP port (overrides config port)")
    p.add_argument(
        "--device",
        choices=["auto", "cpu", "cuda", "npu"],
        default=None,
        help="overrides the config's device",
    )
    p.add_argument(
        "--dtype",
        choices=["bfloat16", "float16", "float32"],
        default=None,
        help="overrides the config's dtype",
    )
    p.add_argument("--grace-seconds", type=float, default=30.0, help="stop timeout per rank")
    p.add_argument(
        "--log-level",
        default=os.environ.get("DSWORKER_LOG_LEVEL", "INFO"),
        help="env DSWORKER_LOG_LEVEL",
    )
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=args.log_level.upper(), format="%(asctime)s launcher %(name)s %(message)s"
    )
    try:
        if not args.model.is_dir():
            raise EngineConfigError(f"--model {args.model}: not a directory")
        world = args.nodes * args.nproc_per_node
        cfg = resolve_config(
            load_engine_config(args.config),
            world,
            shard_plan(args.model),
            {"port": args.port, "device": args.device, "dtype": args.dtype},
        )
        read_model_config(args.model)  # a malformed config.json fails here, once, not per rank
        check_start(args.model, cfg)  # before any rank allocates
        node_rank = node_rank_from_host(args.node_rank) if args.nodes > 1 else 0
        master = args.master_addr or "127.0.0.1"
        if args.nodes > 1 and not args.master_addr:
            raise EngineConfigError(
                "--master-addr (or MASTER_ADDR) is required with --nodes > 1: pod 0's name "
                "through the headless Service"
            )
        specs = rank_specs(args.nproc_per_node, args.nodes, node_rank, master, args.master_port)
        cfg = with_api_key_file(cfg, os.environ)
    except (EngineConfigError, ValueError, CheckpointError) as exc:
        print(f"dsworker serve: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    rank_args = [
        "--model",
        str(args.model),
        "--config-json",
        cfg.model_dump_json(),
        "--host",
        args.host,
        "--log-level",
        args.log_level,
        "--grace-seconds",
        str(args.grace_seconds),
    ]
    launcher = Launcher(
        specs,
        python_module_command("dsworker.launch.rank_main", rank_args),
        grace_s=args.grace_seconds,
    )
    log.info(
        "node %d of %d: ranks %s, world %d, master %s:%d, HTTP port %d",
        node_rank,
        args.nodes,
        [s.rank for s in specs],
        world,
        master,
        args.master_port,
        cfg.port,
    )
    return launcher.run()
