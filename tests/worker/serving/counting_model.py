"""The counting model the HTTP tests serve, and a real uvicorn server around an app.

The runner predicts "previous token + 1" over a word-level vocabulary, so every expected output is
known exactly while the real engine loop, scheduler, sampler and text streaming run underneath.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import uvicorn
from tiny_vocab import EOS_ID, WORDS, write_model_dir

from dsworker.chat.tokenizer import TextTokenizer
from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.control import LocalChannel
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.scheduler import Scheduler
from dsworker.engine.steps import Step
from dsworker.serving.app import create_app
from dsworker.serving.http_server import server_config
from dsworker.serving.state import ServerState
from waiting import wait_until


class CountingRunner:
    """Logits peak at (last token + 1) % V; token 'w9' is followed by EOS."""

    device = torch.device("cpu")
    drafting = False

    def __init__(self, vocab: int) -> None:
        self.vocab = vocab
        self.steps: list[Step] = []
        self.fail: Exception | None = None

    def run(self, step: Step) -> torch.Tensor:
        self.steps.append(step)
        if self.fail is not None:
            raise self.fail
        rows = []
        for it in step.with_rows:
            for tok in it.tokens[len(it.tokens) - it.rows :]:
                nxt = EOS_ID if tok == WORDS.index("w9") else (tok + 1) % self.vocab
                row = torch.zeros(self.vocab)
                row[nxt] = 10.0
                rows.append(row)
        return torch.stack(rows) if rows else torch.zeros(0, self.vocab)

    def dropped_rows(self) -> int:
        return 0


class SlowRunner(CountingRunner):
    """A step takes 20 ms, so a 30-token request lasts well over half a second."""

    def run(self, step: Step) -> torch.Tensor:
        time.sleep(0.02)
        return super().run(step)


@contextmanager
def counting_state(
    tmp_path: Path, runner: CountingRunner | None = None, **config: object
) -> Iterator[ServerState]:
    """A ready ServerState: the counting model's engine loop (running) and tokenizer, with a
    small engine config updated by `config`."""
    base: dict[str, object] = {"modelName": "tiny", "maxSeqLen": 40, "maxInputTokenLen": 20,
                               "maxBatchSize": 2}  # fmt: skip
    cfg = EngineConfig.model_validate(base | config)
    state = ServerState(config=cfg, metrics=Metrics())
    runner = runner or CountingRunner(len(WORDS))
    loop = EngineLoop(
        runner, Scheduler(cfg.maxBatchSize, cfg.maxSeqLen, 64), str, LocalChannel(), state.metrics
    )
    loop.start()
    state.tokenizer = TextTokenizer(write_model_dir(tmp_path))
    state.engine, state.ready = loop, True
    try:
        yield state
    finally:
        loop.stop()


@contextmanager
def live_server(state: ServerState) -> Iterator[tuple[uvicorn.Server, int]]:
    """The app of `state` behind uvicorn as `dsworker serve` configures it, on a free port of
    127.0.0.1, in a thread: the server and its port."""
    config = server_config(create_app(state), state, "127.0.0.1", grace_s=2)
    config.port = 0  # a free one
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        wait_until(lambda: server.started, 60, "uvicorn to start")
        yield server, server.servers[0].sockets[0].getsockname()[1]
    finally:
        server.should_exit = True
        thread.join(10)
