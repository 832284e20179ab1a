"""How many sequences a KV page budget keeps running: the real scheduler on a simulated workload.

Drives dsworker.engine.scheduler.Scheduler (pure Python: no model, no device) through a chat-like
workload whose requests ask for far more max_tokens than they use (they stop on an EOS token),
and prints what the page policy gives: the mean running batch, the steps to drain the workload
(a memory-bound decode step costs about the same at any batch, so fewer steps is more
throughput), preemptions and the positions computed again after them. Every number comes from
the scheduler's own decisions; the sampled token is EOS once a request reaches its drawn length.

    python benchmarks/kv_pages.py                      # the defaults below
    python benchmarks/kv_pages.py --pages 320 --requests 512
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker_image"))

from dsworker.engine.kv_pages import Paging  # noqa: E402
from dsworker.engine.scheduler import Scheduler  # noqa: E402
from dsworker.engine.steps import Sequence  # noqa: E402

EOS = 1


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--max-batch-size", type=int, default=64)
    p.add_argument("--max-seq-len", type=int, default=8192)
    p.add_argument("--page-size", type=int, default=128)
    p.add_argument("--pages", type=int, default=640, help="default: 10 sequences of maxSeqLen")
    p.add_argument("--prefill-tokens", type=int, default=8192, help="maxPrefillTokens")
    p.add_argument("--prompt", type=int, nargs=2, default=[500, 2000], help="uniform range")
    p.add_argument("--output", type=int, nargs=2, default=[100, 2000], help="tokens used")
    p.add_argument("--max-tokens", type=int, default=4096, help="asked for by every request")
    p.add_argument("--seed", type=int, default=0)
    return p.parse_args(argv)


def run(args: argparse.Namespace) -> dict[str, float]:
    rng = random.Random(args.seed)
    paging = Paging(args.page_size, args.pages, prefix_caching=False)
    s = Scheduler(args.max_batch_size, args.max_seq_len, args.prefill_tokens, paging=paging)
    wants: dict[int, int] = {}
    for i in range(args.requests):
        prompt = [2 + rng.randrange(30000) for _ in range(rng.randint(*args.prompt))]
        wants[i] = rng.randint(*args.output)
        s.add(Sequence(i, prompt, args.max_tokens, stop_token_ids=frozenset({EOS})))
    steps, running, computed = 0, [], 0
    t0 = time.perf_counter()
    while s.has_work:
        step = s.schedule()
        if step is None:
            raise SystemExit("the scheduler stalled with work left")
        steps += 1
        running.append(s.num_running)
        computed += step.num_tokens
        sampled = {}
        for it in step.sampled:
            seq = s.running[it.seq_id]
            sampled[it.seq_id] = [EOS if len(seq.output) + 1 >= wants[it.seq_id] else 2]
        s.update(step, sampled)
    needed = sum(min(wants[i], args.max_tokens) for i in wants)
    return {
        "steps": steps,
        "mean_running": statistics.mean(running),
        "preemptions": getattr(s, "preemptions", 0),
        "tokens_computed": computed,
        "output_tokens": needed,
        "seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    r = run(args)
    print(
        f"{args.requests} requests, prompts {args.prompt[0]}-{args.prompt[1]}, outputs "
        f"{args.output[0]}-{args.output[1]} of max_tokens {args.max_tokens}; "
        f"{args.pages} pages of {args.page_size}, maxBatchSize {args.max_batch_size}"
    )
    print(f"steps to drain         {r['steps']}")
    print(f"mean running batch     {r['mean_running']:.1f}")
    print(f"preemptions            {r['preemptions']}")
    print(f"positions computed     {r['tokens_computed']}")
    print(f"scheduler wall seconds {r['seconds']:.2f}")


if __name__ == "__main__":
    main()
