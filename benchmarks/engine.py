"""Engine benchmark, side by side with HuggingFace transformers in one run (BENCHMARKS.md).

Figures, one JSON object per line:
  load     GB/s of the sharded loader (mmap + reused pinned buffers) vs safetensors.torch.load_file
  prefill  tokens/s of one prompt of --prefill-tokens
  decode   tokens/s of greedy generation at each --batch (--new-tokens per sequence, short prompts),
           timed from submission to the last token, as transformers' generate() is
and a ratio line per figure (dsworker / transformers). The engine runs through the serving path
(scheduler, sampler, text streaming) with world size 1.

  python benchmarks/engine.py                          # GPU, the "bench" config (3.54 B params)
  python benchmarks/engine.py --preset tiny --device cpu --new-tokens 8 --prefill-tokens 64
  python benchmarks/engine.py --no-graphs            # eager decode steps, for the graphs' share
  python benchmarks/engine.py --mtp --skip load hf     # speculative decoding with the MTP layer
  python benchmarks/engine.py --format fp8             # 8-bit weights kept 8-bit, beside BF16

With --format fp8|w8a8|w8a16 the checkpoint is synthesized in that format and served with its
weights 8-bit on the device; a BF16 twin of the same config is served too, and `memory` lines give
the device bytes each model holds, with decode tokens/s side by side ("dsworker-bf16"). transformers
runs the BF16 twin.

With --mtp the checkpoint carries a random MTP layer, whose drafts are almost never accepted: the
decode figures are then the floor of speculative decoding (its cost with nothing gained), and the
acceptance line says how many drafts were kept.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import torch

from dsworker.chat.tokenizer import TextTokenizer
from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.kv_budget import pages_for
from dsworker.contract.layout import ParallelPlan
from dsworker.engine.control import LocalChannel
from dsworker.engine.kv_pages import Paging
from dsworker.engine.loader import load_weights
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.model_runner import ModelRunner
from dsworker.engine.rank_setup import DTYPES, engine_options, fixed_shape_decode
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.engine.scheduler import Scheduler
from dsworker.model.quant_weights import held_bytes
from dsworker.parallel.device import Device


def emit(**record: Any) -> None:
    print(json.dumps(record), flush=True)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def prepare(
    args: argparse.Namespace, work: Path, fmt: str, overrides: dict[str, Any] | None = None
) -> tuple[Path, Path]:
    """The HF checkpoint (given or synthesized in `fmt`) and its world-1 sharded layout."""
    from dsworker.tools.shard import shard
    from dsworker.tools.synth import synthesize

    tag = f"{args.preset}-{fmt}{'-mtp' if args.mtp else ''}"
    if args.model and fmt == args.format:
        full = args.model
    else:
        full = synthesize(work / f"hf-{tag}", "v3", args.preset, fmt, args.mtp, overrides=overrides)
    sharded = work / f"sharded-{tag}"
    if not (sharded / "_COMPLETE").exists():
        shard(full, sharded, ParallelPlan(1, 1, 1, 1, 1), mtp=args.mtp)
    return Path(full), sharded


# config.json fields a BF16 twin copies from the quantised checkpoint (same model, other format)
TWIN_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "moe_intermediate_size",
    "num_hidden_layers",
    "n_routed_experts",
    "num_attention_heads",
    "q_lora_rank",
    "kv_lora_rank",
    "qk_nope_head_dim",
    "qk_rope_head_dim",
    "v_head_dim",
)


def bf16_twin(args: argparse.Namespace, work: Path, full: Path) -> tuple[Path, Path]:
    """A BF16 checkpoint of the quantised one's config, for side-by-side figures."""
    cfg = json.loads((full / "config.json").read_text())
    return prepare(args, work, "bf16", {k: cfg[k] for k in TWIN_FIELDS if k in cfg})


# -- load -----------------------------------------------------------------------------------------


def bench_load(full: Path, sharded: Path, dev: Device, cfg: EngineConfig) -> None:
    from safetensors.torch import load_file

    from dsworker.model import DeepseekModel, ModelArgs
    from dsworker.parallel.groups import build_groups

    files = sorted(full.glob("*.safetensors"))
    nbytes = sum(f.stat().st_size for f in files)
    for f in files:  # both paths read from the page cache
        f.read_bytes()
    t0 = time.perf_counter()
    for f in files:
        tensors = load_file(f, device=str(dev.torch))
        del tensors
    sync(dev.torch)
    st_seconds = time.perf_counter() - t0
    emit(
        bench="load",
        path="safetensors.load_file",
        bytes=nbytes,
        seconds=round(st_seconds, 4),
        gbps=round(nbytes / st_seconds / 1e9, 3),
    )
    gc.collect()

    plan = ParallelPlan(1, 1, 1, 1, 1)
    model = DeepseekModel(
        ModelArgs.from_dir(sharded),
        build_groups(plan, 0, dev.backend),
        engine_options(cfg),
        DTYPES[cfg.dtype],
        dev.torch,
    )
    stats = load_weights(model.targets(), sharded, plan, 0, dev, mtp=cfg.mtp)
    sync(dev.torch)
    emit(
        bench="load",
        path="dsworker.engine.loader (sharded)",
        bytes=stats.bytes,
        seconds=round(stats.seconds, 4),
        gbps=round(stats.gbps, 3),
    )
    emit(
        bench="load",
        ratio=round(stats.gbps / (nbytes / st_seconds / 1e9), 2),
        what="sharded loader GB/s / load_file GB/s",
    )
    del model
    gc.collect()


# -- dsworker engine ------------------------------------------------------------------------------


class Engine:
    """World-size-1 serving path: runner + scheduler + sampler, driven synchronously."""

    def __init__(self, sharded: Path, dev: Device, cfg: EngineConfig) -> None:
        from dsworker.model import DeepseekModel, ModelArgs
        from dsworker.parallel.groups import build_groups

        plan = ParallelPlan(1, 1, 1, 1, 1)
        groups = build_groups(plan, 0, dev.backend)
        model = DeepseekModel(
            ModelArgs.from_dir(sharded), groups, engine_options(cfg), DTYPES[cfg.dtype], dev.torch
        )
        load_weights(model.targets(), sharded, plan, 0, dev, mtp=cfg.mtp)
        self.weight_bytes = held_bytes(model)
        self.cfg = cfg
        self.metrics = Metrics()
        # Paged like `dsworker serve`: every slot's maxSeqLen fits, so no request ever waits.
        page = min(cfg.cacheBlockSize, cfg.maxSeqLen)
        pages = cfg.maxBatchSize * pages_for(cfg.maxSeqLen, page)
        self.paging = Paging(page, pages)
        cache = model.new_cache(cfg.maxBatchSize, cfg.maxSeqLen, page, pages)
        graphs = fixed_shape_decode(model, cache, cfg, cfg.maxBatchSize)
        self.runner = ModelRunner(model, cache, groups, dev, graphs, cfg.num_speculative_tokens)
        self.decode = TextTokenizer(sharded).decode

    def generate(self, prompts: list[list[int]], new_tokens: int) -> tuple[float, int]:
        """Seconds from submission to the last token, and tokens generated."""
        loop = EngineLoop(
            self.runner,
            Scheduler(
                self.cfg.maxBatchSize,
                self.cfg.maxSeqLen,
                self.cfg.maxPrefillTokens,
                drafts=self.runner.draft_tokens,
                paging=self.paging,
            ),
            self.decode,
            LocalChannel(),
            self.metrics,
        )
        count = [0]
        lock = threading.Lock()

        def sink(out: Output) -> None:
            with lock:
                count[0] += len(out.token_ids)

        greedy = SamplingParams(temperature=0.0)
        t0 = time.perf_counter()
        for p in prompts:
            loop.submit(GenRequest(p, greedy, new_tokens), sink)
        loop.run_until_idle()
        sync(self.runner.device)
        return time.perf_counter() - t0, count[0]


def bench_twin(
    sharded: Path,
    dev: Device,
    cfg: EngineConfig,
    args: argparse.Namespace,
    prompts: torch.Tensor,
    results: dict[tuple[str, str, int], float],
    held: dict[str, int],
) -> None:
    """The BF16 twin through the same serving path: its decode tokens/s and held bytes."""
    gc.collect()
    engine = Engine(sharded, dev, cfg)
    held["bf16"] = engine.weight_bytes
    engine.generate([prompts[0, :8].tolist()], 2)  # warm-up
    if "decode" not in args.skip:
        for b in args.batch:
            runs = [
                engine.generate(prompts[:b].tolist(), args.new_tokens) for _ in range(args.repeat)
            ]
            secs, toks = min(runs)
            results[("decode", "dsworker-bf16", b)] = toks / secs
    del engine
    gc.collect()


# -- transformers ---------------------------------------------------------------------------------


class Reference:
    def __init__(self, full: Path, dev: Device, dtype: torch.dtype) -> None:
        from transformers import DeepseekV3ForCausalLM

        self.model = DeepseekV3ForCausalLM.from_pretrained(full, dtype=dtype).to(dev.torch).eval()
        self.device = dev.torch

    @torch.inference_mode()
    def prefill(self, ids: torch.Tensor) -> float:
        t0 = time.perf_counter()
        self.model(ids.to(self.device), use_cache=False)
        sync(self.device)
        return time.perf_counter() - t0

    @torch.inference_mode()
    def generate(self, ids: torch.Tensor, new_tokens: int) -> tuple[float, int]:
        ids = ids.to(self.device)
        t0 = time.perf_counter()
        out = self.model.generate(
            ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            min_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=0,
        )
        sync(self.device)
        return time.perf_counter() - t0, int(out[:, ids.shape[1] :].numel())


# -- main -----------------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--preset", default="bench", choices=["tiny", "small", "bench"])
    p.add_argument("--model", type=Path, default=None, help="HF checkpoint (default: synthesize)")
    p.add_argument("--work-dir", type=Path, default=None, help="default: /dev/shm or a temp dir")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "npu"])
    p.add_argument("--dtype", default=None, choices=sorted(DTYPES), help="default bf16 (cpu: f32)")
    p.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--prompt-tokens", type=int, default=16, help="prompt length for decode runs")
    p.add_argument("--prefill-tokens", type=int, default=512)
    p.add_argument("--repeat", type=int, default=2, help="timed runs per figure (best is kept)")
    p.add_argument("--no-graphs", action="store_true", help="decode without CUDA graphs")
    p.add_argument("--compile", action="store_true", help="torch.compile the decode step")
    p.add_argument("--mtp", action="store_true", help="speculative decoding with an MTP layer")
    p.add_argument(
        "--speculative-tokens", type=int, default=1, help="MTP drafts per step (with --mtp)"
    )
    p.add_argument(
        "--format",
        default="bf16",
        choices=["bf16", "fp8", "w8a8", "w8a16"],
        help="checkpoint format (8-bit ones stay 8-bit on the device; a BF16 twin runs beside)",
    )
    p.add_argument("--skip", nargs="*", default=[], choices=["load", "prefill", "decode", "hf"])
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    dev = Device.create(args.device, 0)
    dtype_name = args.dtype or ("float32" if dev.kind == "cpu" else "bfloat16")
    max_batch = max(args.batch)
    cfg = EngineConfig(
        dtype=dtype_name,
        maxBatchSize=max_batch,
        maxSeqLen=max(args.prefill_tokens, args.prompt_tokens + args.new_tokens) + 1,
        maxInputTokenLen=max(args.prefill_tokens, args.prompt_tokens),
        maxPrefillTokens=max(args.prefill_tokens, max_batch * args.prompt_tokens),
        maxNewTokens=args.new_tokens,
        cudaGraphs=not args.no_graphs,
        torchCompile=args.compile,
        mtp=args.mtp,
        num_speculative_tokens=args.speculative_tokens,
    )
    root = args.work_dir or (Path("/dev/shm") if Path("/dev/shm").is_dir() else None)
    with tempfile.TemporaryDirectory(dir=root, prefix="dsbench-") as tmp:
        work = args.work_dir or Path(tmp)
        full, sharded = prepare(args, work, args.format)
        twin = bf16_twin(args, work, full) if args.format != "bf16" else None
        emit(
            bench="setup",
            preset=args.preset,
            device=str(dev.torch),
            dtype=dtype_name,
            torch=torch.__version__,
            gpu=torch.cuda.get_device_name(dev.torch) if dev.kind == "cuda" else None,
            cuda_graphs=cfg.cudaGraphs and dev.kind == "cuda",
            torch_compile=cfg.torchCompile,
            mtp=cfg.mtp,
            speculative_tokens=cfg.num_speculative_tokens if cfg.mtp else None,
            checkpoint_bytes=sum(f.stat().st_size for f in full.glob("*.safetensors")),
            format=args.format,
        )
        if "load" not in args.skip:
            bench_load(full, sharded, dev, cfg)
        vocab = json.loads((full / "config.json").read_text())["vocab_size"]
        gen = torch.Generator().manual_seed(0)
        prefill_ids = torch.randint(0, vocab, (1, args.prefill_tokens), generator=gen)
        prompts = torch.randint(0, vocab, (max_batch, args.prompt_tokens), generator=gen)
        results: dict[tuple[str, str, int], float] = {}

        engine = Engine(sharded, dev, cfg)
        engine.generate([prefill_ids[0, :8].tolist()], 2)  # warm-up
        if "prefill" not in args.skip:
            best = min(engine.generate([prefill_ids[0].tolist()], 1)[0] for _ in range(args.repeat))
            results[("prefill", "dsworker", 1)] = args.prefill_tokens / best
        if "decode" not in args.skip:
            for b in args.batch:
                runs = [
                    engine.generate(prompts[:b].tolist(), args.new_tokens)
                    for _ in range(args.repeat)
                ]
                secs, toks = min(runs)
                results[("decode", "dsworker", b)] = toks / secs
        held = {args.format: engine.weight_bytes}
        if twin is not None:
            bench_twin(twin[1], dev, cfg, args, prompts, results, held)
            emit(
                bench="memory",
                weight_bytes=held,
                ratio=round(held[args.format] / held["bf16"], 3),
                what=f"{args.format} / bf16 device bytes of the weights",
            )
        else:
            emit(bench="memory", weight_bytes=held)
        if cfg.mtp:
            sample = engine.metrics.registry.get_sample_value
            drafted = sample("dsworker_spec_draft_tokens_total") or 0.0
            accepted = sample("dsworker_spec_accepted_tokens_total") or 0.0
            emit(
                bench="mtp",
                steps=int(sample("dsworker_step_seconds_count") or 0),
                drafts=int(drafted),
                accepted=int(accepted),
                acceptance=round(accepted / drafted, 4) if drafted else None,
            )
        del engine
        gc.collect()

        if "hf" not in args.skip:
            ref = Reference(twin[0] if twin else full, dev, DTYPES[dtype_name])
            ref.prefill(prefill_ids[:, :8])  # warm-up
            if "prefill" not in args.skip:
                best = min(ref.prefill(prefill_ids) for _ in range(args.repeat))
                results[("prefill", "transformers", 1)] = args.prefill_tokens / best
            if "decode" not in args.skip:
                for b in args.batch:
                    runs = [ref.generate(prompts[:b], args.new_tokens) for _ in range(args.repeat)]
                    secs, toks = min(runs)
                    results[("decode", "transformers", b)] = toks / secs
            del ref
            gc.collect()

        for (bench, engine_name, b), tps in results.items():
            emit(
                bench=bench,
                engine=engine_name,
                batch=b,
                tokens_per_s=round(tps, 2),
                new_tokens=args.new_tokens if bench == "decode" else None,
                prompt_tokens=args.prefill_tokens if bench == "prefill" else args.prompt_tokens,
            )
        for (bench, engine_name, b), tps in results.items():
            ref_tps = results.get((bench, "transformers", b))
            if engine_name == "dsworker" and ref_tps:
                emit(
                    bench=bench,
                    batch=b,
                    ratio=round(tps / ref_tps, 2),
                    what="dsworker tokens/s / transformers tokens/s",
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
