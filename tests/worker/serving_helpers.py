"""Helpers of the serving-loop tests: an engine config on CPU, and every prompt through a real
rank-0 engine loop (build_runner, the scheduler it implies, the sampler), optionally through the
fixed-shape steps.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
from engine_helpers import NEW_TOKENS, PROMPTS

from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.model_runner import ModelRunner
from dsworker.engine.rank_setup import Loaded, build_runner
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.engine.step_wire import STOP, Message
from dsworker.model.decode_graphs import DecodeGraphs
from waiting import wait_until

MAX_LEN = 64


def engine_config(**kw: object) -> EngineConfig:
    # Pages of 8 positions: a sequence's keys span several pages.
    base = {"dtype": "float32", "device": "cpu", "maxBatchSize": 4, "cacheBlockSize": 8}
    base |= {"maxSeqLen": MAX_LEN, "maxInputTokenLen": MAX_LEN // 2}
    return EngineConfig.model_validate({**base, **kw})


def generate(
    ckpt: Path,
    cfg: EngineConfig,
    params: SamplingParams | None = None,
    rank: int = 0,
    world: int = 1,
    fixed: str | None = None,
    calls: dict[str, int] | None = None,
    logprobs: dict[int, list[float]] | None = None,
    prompt_logprobs: dict[int, list[float]] | None = None,
) -> tuple[list[list[int]], Metrics, int]:
    """Every prompt through one rank-0 engine loop: tokens per prompt, metrics, steps taken.
    `logprobs`, when given, receives each prompt's token logprobs; `prompt_logprobs` those of
    its prompt tokens after the first.

    fixed: run decode and draft passes as fixed-shape steps, eagerly ("eager-step"), traced by
    dynamo with fullgraph ("eager", the backend) or captured ("capture", cuda); `calls` counts them.
    """
    loaded = build_runner(ckpt, cfg, rank=rank, world_size=world, local_rank=rank)
    if fixed is not None:
        use_fixed_steps(loaded.runner, cfg, fixed, calls if calls is not None else {})
    greedy = params or SamplingParams(temperature=0.0)
    requests = [
        GenRequest(
            p,
            greedy,
            NEW_TOKENS,
            logprobs=0 if logprobs is not None else None,
            prompt_logprobs=0 if prompt_logprobs is not None else None,
        )
        for p in PROMPTS
    ]
    outs, metrics, steps = serve(loaded, cfg, requests)
    loaded.channel.send(Message(STOP))
    for i, mine in enumerate(outs):
        if logprobs is not None:
            logprobs[i] = [e.logprob for o in mine for e in o.logprobs]
        if prompt_logprobs is not None:
            prompt_logprobs[i] = [e.logprob for o in mine for e in o.prompt_logprobs]
    return [[t for o in mine for t in o.token_ids] for mine in outs], metrics, steps


def use_fixed_steps(
    runner: ModelRunner, cfg: EngineConfig, fixed: str, calls: dict[str, int]
) -> None:
    """Give the runner decode graphs of the kind `fixed` names (see `generate`), counted."""
    backend = None if fixed in ("eager-step", "capture") else fixed
    graphs = DecodeGraphs(
        runner.model,
        runner.cache,
        4,
        capture=fixed == "capture",
        compile_backend=backend,
        draft_tokens=cfg.num_speculative_tokens,
    )
    count(graphs, calls)
    runner.graphs = graphs


def serve(
    loaded: Loaded,
    cfg: EngineConfig,
    requests: Sequence[GenRequest],
    one_by_one: bool = False,
    errors: list[str] | None = None,
) -> tuple[list[list[Output]], Metrics, int]:
    """The requests through one rank-0 engine loop, submitted together or each after the one
    before has ended: every request's Outputs, the metrics and the steps taken. An Output's
    error fails the call unless `errors` is given, which then receives them."""
    metrics = Metrics()
    loop = EngineLoop(loaded.runner, loaded.scheduler(cfg), lambda ids: "", loaded.channel, metrics)
    outs: list[list[Output]] = [[] for _ in requests]
    lock = threading.Lock()
    steps = 0
    for i, req in enumerate(requests):

        def sink(out: Output, i: int = i) -> None:
            if out.error is not None and errors is not None:
                errors.append(out.error)
            else:
                assert out.error is None, out.error
            with lock:
                outs[i].append(out)

        loop.submit(req, sink)
        if one_by_one:
            steps += loop.run_until_idle()
    steps += loop.run_until_idle()
    return outs, metrics, steps


def count(graphs: DecodeGraphs, calls: dict[str, int]) -> None:
    for name in ("run", "draft"):
        fn = getattr(graphs, name)

        def counted(*a: object, fn: Any = fn, name: str = name, **kw: Any) -> Any:
            calls[name] = calls.get(name, 0) + 1
            return fn(*a, **kw)

        setattr(graphs, name, counted)


def counter(metrics: Metrics, name: str) -> float:
    value = metrics.registry.get_sample_value(name)
    assert value is not None, name
    return value


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextmanager
def dsworker_serve(model: Path, config: dict[str, Any], tmp: Path) -> Iterator[tuple[str, Path]]:
    """`dsworker serve` of one rank on CPU with this engine config, until /health says 200:
    its base URL and its log file; killed on exit."""
    (tmp / "engine.json").write_text(json.dumps(config))
    port = free_port()
    log = tmp / "serve.log"
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsworker.cli", "serve", "--model", str(model), "--config",
         str(tmp / "engine.json"), "--nproc-per-node", "1", "--host", "127.0.0.1", "--port",
         str(port), "--master-port", str(free_port()), "--grace-seconds", "10"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    url = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        assert proc.poll() is None, log.read_text(errors="replace")[-4000:]
        return httpx.get(url + "/health", timeout=5).status_code == 200

    try:
        try:
            wait_until(
                healthy, 120, f"{url}/health to answer 200", retry_on=(httpx.TransportError,)
            )
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{log.read_text(errors='replace')[-4000:]}") from None
        yield url, log
    finally:
        proc.kill()
        proc.wait(30)


def stream_choices(url: str, body: dict[str, Any], timeout: float = 120) -> list[dict[str, Any]]:
    """POST a streamed chat completion: each chunk's first choice, after checking that the
    stream was a 200 and ended with [DONE]."""
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    return [json.loads(ln.removeprefix("data: "))["choices"][0] for ln in lines[:-1]]
