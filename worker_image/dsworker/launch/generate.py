"""`dsworker generate`: greedy generation from token ids on N local ranks (the engine's smoke test).

Spawns one process per rank (gloo on CPU, nccl/hccl on accelerators), loads a sharded layout or an
unsharded HF checkpoint, splits the prompts over the dp groups (prompt i -> dp group i % dp), runs
one prefill step and max_new_tokens - 1 decode steps, and prints the generated ids as JSON. With
--dump-logits, rank 0 saves every prompt position's first-step logits (fp32, "prompt_<i>" [L, V]),
plus the MTP layer's ("mtp_<i>") when --mtp is on.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from dsworker.checkpoint.sharded_metadata import read_metadata
from dsworker.contract.errors import EXIT_BAD_INPUT, CheckpointError
from dsworker.contract.layout import ParallelPlan, PlanError
from dsworker.engine.loader import LoadStats, load_weights
from dsworker.engine.weight_files import check_sharded, is_sharded
from dsworker.model import Batch, DeepseekModel, EngineOptions, ExpertBufferOverflow, ModelArgs
from dsworker.model.moe import MoEOptions
from dsworker.model.quant_weights import held_bytes
from dsworker.parallel.device import Device, DeviceError
from dsworker.parallel.groups import ParallelGroups, build_groups, init_process_group, spawn_local

log = logging.getLogger("dsworker.launch.generate")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
EXPECTED = (CheckpointError, PlanError, ExpertBufferOverflow, DeviceError)


@dataclass(frozen=True)
class GenerateJob:
    """Everything a rank needs to run one generation (picklable: it crosses spawn)."""

    model: str
    plan: ParallelPlan
    prompts: list[list[int]]
    max_new_tokens: int
    moe: MoEOptions = field(default_factory=MoEOptions)
    mtp: bool = False
    dtype: str = "float32"
    device: str = "cpu"
    keep_logits: bool = False
    stop_at_eos: bool = False


@dataclass
class GenerateResult:
    """Generated ids per prompt; first-step logits when kept; MoE row counters over the world."""

    tokens: list[list[int]]
    logits: dict[str, torch.Tensor]
    routed_rows: int
    dropped_rows: int
    load: LoadStats
    weight_bytes: list[int] = field(default_factory=list)  # device bytes each rank's model holds


def _gather_rows(
    groups: ParallelGroups,
    mine: dict[int, torch.Tensor],
    lengths: list[int],
    width: int,
    fill: float,
) -> list[torch.Tensor]:
    """Per prompt [len, width] tensors from the ranks that ran them (tp rank 0 of each dp group).

    A MAX all-reduce on the host group: no pickling, and every rank ends with every row.
    """
    offs = [0]
    for n in lengths:
        offs.append(offs[-1] + n)
    flat = torch.full((offs[-1], width), fill, dtype=torch.float64)
    if groups.coords.tp_rank == 0:
        for i, t in mine.items():
            flat[offs[i] : offs[i + 1]] = t.double().cpu()
    groups.cpu.all_max(flat)
    return [flat[offs[i] : offs[i + 1]] for i in range(len(lengths))]


@torch.inference_mode()
def generate_on_rank(
    job: GenerateJob, rank: int, groups: ParallelGroups, device: Device
) -> GenerateResult:
    """Load the model for this rank and run the job; every rank of the world must call it."""
    args = ModelArgs.from_dir(job.model)
    opts = EngineOptions(moe=job.moe, mtp=job.mtp)
    model = DeepseekModel(args, groups, opts, DTYPES[job.dtype], device.torch)
    stats = load_weights(model.targets(), job.model, job.plan, rank, device, mtp=job.mtp)
    held = torch.zeros(job.plan.world_size, dtype=torch.float64)
    held[rank] = held_bytes(model)
    groups.cpu.all_reduce(held)
    mine = [i for i in range(len(job.prompts)) if i % job.plan.dp == groups.coords.dp_rank]
    longest = max(len(p) for p in job.prompts)
    cache = model.new_cache(max(1, len(mine)), longest + job.max_new_tokens + 1)
    eos = set(args.eos_token_ids) if job.stop_at_eos else set()

    seqs = [(slot, 0, job.prompts[i]) for slot, i in enumerate(mine)]
    batch = Batch.build(seqs, device.torch)
    out = model(batch, cache, all_logits=job.keep_logits)
    last = out.logits[batch.last] if job.keep_logits else out.logits
    nxt = last.argmax(-1).tolist()
    logits: dict[int, torch.Tensor] = {}
    mtp_logits: dict[int, torch.Tensor] = {}
    if job.keep_logits:
        flat = out.logits.float()
        for b, i in enumerate(mine):
            logits[i] = flat[batch.seq == b]
    if job.mtp and job.keep_logits:  # draft logits: position j reads h_j and token j+1
        ids = torch.cat([batch.input_ids[1:], batch.input_ids[:1]])
        ids[batch.last] = torch.tensor(nxt, dtype=torch.long, device=device.torch)
        draft = model.forward_mtp(batch.with_ids(ids), out.hidden, cache, all_logits=True)
        for b, i in enumerate(mine):
            mtp_logits[i] = draft.logits.float()[batch.seq == b]

    generated: dict[int, list[int]] = {i: [t] for i, t in zip(mine, nxt, strict=True)}
    for _ in range(job.max_new_tokens - 1):
        live = [(s, i) for s, i in enumerate(mine) if generated[i][-1] not in eos]
        step = [
            (s, len(job.prompts[i]) + len(generated[i]) - 1, [generated[i][-1]]) for s, i in live
        ]
        out = model(Batch.build(step, device.torch), cache)
        for (_, i), t in zip(live, out.logits.argmax(-1).tolist(), strict=True):
            generated[i].append(t)

    width = job.max_new_tokens
    toks = {i: torch.tensor([g + [-1] * (width - len(g))]) for i, g in generated.items()}
    rows = _gather_rows(groups, toks, [1] * len(job.prompts), width, -1)
    tokens = [[int(t) for t in r[0].tolist() if t >= 0] for r in rows]
    dumped: dict[str, torch.Tensor] = {}
    if job.keep_logits:
        lens = [len(p) for p in job.prompts]
        for key, part in (("prompt", logits), ("mtp", mtp_logits)):
            if key == "mtp" and not job.mtp:
                continue
            got = _gather_rows(groups, part, lens, args.vocab_size, float("-inf"))
            dumped.update({f"{key}_{i}": g.float() for i, g in enumerate(got)})
    counters = torch.tensor(
        [model.stats.routed_rows, model.stats.dropped_rows], dtype=torch.float64
    )
    groups.cpu.all_reduce(counters)
    return GenerateResult(
        tokens, dumped, int(counters[0]), int(counters[1]), stats, [int(b) for b in held]
    )


def _rank_main(rank: int, nproc: int, job: GenerateJob, result_dir: str) -> None:
    """One spawned rank: set up device and groups, run, rank 0 writes the result files."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr, format=f"[rank {rank}] %(message)s")
    try:
        device = Device.create(job.device, rank)
        device.cpu_threads(nproc)
        init_process_group(device, rank, nproc)
        groups = build_groups(job.plan, rank, device.backend)
        res = generate_on_rank(job, rank, groups, device)
    except EXPECTED as e:  # one line for the user, not a traceback per rank
        Path(result_dir, f"error.{rank}").write_text(str(e))
        sys.exit(EXIT_BAD_INPUT)
    if rank == 0:
        if res.logits:
            from safetensors.torch import save_file

            save_file(
                {k: v.contiguous() for k, v in res.logits.items()},
                f"{result_dir}/logits.safetensors",
            )
        record = {
            "generated": res.tokens,
            "routed_rows": res.routed_rows,
            "dropped_rows": res.dropped_rows,
            "weight_bytes": res.weight_bytes,
            "load": {**asdict(res.load), "gbps": res.load.gbps},
        }
        Path(result_dir, "result.json").write_text(json.dumps(record))


def run(job: GenerateJob, nproc: int) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Run the job on nproc local ranks; (result record, dumped logits). Errors raise."""
    with tempfile.TemporaryDirectory(prefix="dsgen-") as tmp:
        try:
            if nproc == 1:
                _rank_main(0, 1, job, tmp)
            else:
                spawn_local(nproc, _rank_main, job, tmp)
        except (SystemExit, Exception) as e:
            errs = sorted(Path(tmp).glob("error.*"))
            if errs:
                raise CheckpointError(errs[0].read_text()) from None
            if isinstance(e, SystemExit):
                raise RuntimeError(f"generate: a rank exited with {e.code}") from None
            raise
        record = json.loads(Path(tmp, "result.json").read_text())
        logits: dict[str, torch.Tensor] = {}
        if Path(tmp, "logits.safetensors").exists():
            from safetensors.torch import load_file

            logits = load_file(f"{tmp}/logits.safetensors")
        return record, logits


def parse_prompts(text: str) -> list[list[int]]:
    """'1,2,3;4,5' -> [[1,2,3],[4,5]]."""
    try:
        out = [[int(t) for t in p.split(",") if t.strip()] for p in text.split(";")]
    except ValueError:
        raise CheckpointError(
            f"--prompt-ids {text!r}: use comma-separated ids, ';' between prompts"
        ) from None
    if not out or any(not p for p in out):
        raise CheckpointError("--prompt-ids: every prompt needs at least one token id")
    return out


def parse_buffer_factors(text: str | None) -> tuple[tuple[int, float], ...]:
    if not text:
        return MoEOptions().buffer_scale_factors
    try:
        table = json.loads(text)
        out = tuple((int(a), float(b)) for a, b in table)
    except (ValueError, TypeError, json.JSONDecodeError):
        raise CheckpointError(
            f"--buffer-scale-factors {text!r}: give a JSON list of [seqLenThreshold, factor] pairs"
        ) from None
    if any(f <= 0 or t < 0 for t, f in out) or any(
        a[0] <= b[0] for a, b in zip(out, out[1:], strict=False)
    ):
        raise CheckpointError(
            "--buffer-scale-factors: thresholds >= 0 and strictly descending, factors > 0"
        )
    return out


def resolve_plan(args: argparse.Namespace) -> tuple[ParallelPlan, bool]:
    """The runtime plan and MTP flag: flags where given, else the shards' tp/moe_tp/mtp, else 1.

    dp and moe_ep default to world / tp and world / moe_tp; the loader then compares the result
    with the shards' plan and names every field that differs.
    """
    world = args.world_size or args.nproc
    if world != args.nproc:
        raise CheckpointError(
            f"--world-size {world} != --nproc {args.nproc}: generate runs one host"
        )
    tp, moe_tp, mtp = 1, 1, bool(args.mtp)
    if is_sharded(args.model):
        p = read_metadata(args.model).plan
        if p["worldSize"] != world:
            raise CheckpointError(
                f"{args.model}: worldSize: the shards were cut for {p['worldSize']}, the runtime "
                f"uses {world}; run with --nproc {p['worldSize']} or shard for {world} ranks"
            )
        tp, moe_tp = int(p["tp"]), int(p["moeTp"])
        mtp = bool(p.get("mtp")) if args.mtp is None else mtp
    tp = args.tp or tp
    moe_tp = args.moe_tp or moe_tp
    dp = args.dp or max(1, world // tp)
    moe_ep = args.moe_ep or max(1, world // moe_tp)
    return ParallelPlan(world, dp, tp, moe_tp, moe_ep), mtp


def add_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "generate",
        help="greedy generation from token ids on N local ranks",
        description=__doc__,
    )
    p.add_argument("--model", required=True, help="sharded layout or HF checkpoint directory")
    p.add_argument("--nproc", type=int, required=True, help="local ranks to spawn")
    p.add_argument("--world-size", "--world_size", type=int, dest="world_size")
    p.add_argument("--dp", type=int)
    p.add_argument("--tp", type=int)
    p.add_argument("--moe-tp", "--moe_tp", type=int, dest="moe_tp")
    p.add_argument("--moe-ep", "--moe_ep", type=int, dest="moe_ep")
    p.add_argument("--ep-level", type=int, choices=(1, 2), default=1)
    p.add_argument("--routing-cutoff", type=float, help="topk_scaling_factor (EP level 1)")
    p.add_argument("--grouped-matmul", choices=("auto", "on", "off"), default="auto")
    p.add_argument("--buffer-scale-factors", help="JSON [[seqLenThreshold, factor], ...]")
    p.add_argument("--mtp", action="store_true", default=None, help="load and run the MTP layer")
    p.add_argument("--dtype", choices=tuple(DTYPES), default="bfloat16")
    p.add_argument("--device", choices=("auto", "cpu", "cuda", "npu"), default="auto")
    p.add_argument("--prompt-ids", required=True, help="'1,2,3;4,5': prompts separated by ';'")
    p.add_argument("--max-new-tokens", type=int, default=16)
    p.add_argument("--stop-at-eos", action="store_true", help="end a sequence at config's eos id")
    p.add_argument("--dump-logits", help="save first-step logits to this .safetensors file")
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    if args.nproc < 1 or args.max_new_tokens < 1:
        raise CheckpointError("--nproc and --max-new-tokens must be >= 1")
    if args.routing_cutoff is not None and not 0 < args.routing_cutoff <= 1:
        raise CheckpointError("--routing-cutoff is topk_scaling_factor: a number in (0, 1]")
    if args.routing_cutoff is not None and args.ep_level != 1:
        raise CheckpointError("--routing-cutoff needs --ep-level 1 (MindIE: ep_level 1 only)")
    plan, mtp = resolve_plan(args)
    if is_sharded(args.model):
        check_sharded(args.model, plan, mtp)  # refuse before spawning anything
    grouped = args.grouped_matmul == "on" or (args.grouped_matmul == "auto" and plan.moe_ep > 32)
    moe = MoEOptions(
        ep_level=args.ep_level,
        routing_cutoff=args.routing_cutoff,
        buffer_scale_factors=parse_buffer_factors(args.buffer_scale_factors),
        grouped_matmul=grouped,
    )
    job = GenerateJob(
        model=str(args.model),
        plan=plan,
        prompts=parse_prompts(args.prompt_ids),
        max_new_tokens=args.max_new_tokens,
        moe=moe,
        mtp=mtp,
        dtype=args.dtype,
        device=args.device,
        keep_logits=bool(args.dump_logits),
        stop_at_eos=args.stop_at_eos,
    )
    record, logits = run(job, args.nproc)
    if args.dump_logits:
        from safetensors.torch import save_file

        save_file(logits, args.dump_logits)
    print(json.dumps(record))
    return 0
