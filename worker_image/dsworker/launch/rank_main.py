"""One engine rank, as started by the launcher: load, then serve HTTP (rank 0) or follow rank 0.

Rank 0 binds its HTTP port first (so /health answers 503 while loading), loads and warms up on a
background thread, then flips /health to 200. Other ranks load and run whatever step rank 0
broadcasts. Any failure exits non-zero so the launcher stops the whole group.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Sequence as Seq
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING

from dsworker.contract.engine_config import EngineConfig, EngineConfigError, parse_engine_config

if TYPE_CHECKING:
    from dsworker.chat.tokenizer import TextTokenizer

log = logging.getLogger("dsworker.launch.rank_main")

# Test aid: rank 0 waits for this file before loading, so /health's 503 can be observed.
HOLD_ENV = "DSWORKER_TEST_HOLD_FILE"
WARMUP_PROMPT_TOKENS = 16


def _parse(argv: Seq[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m dsworker.launch.rank_main")
    p.add_argument("--model", required=True, type=Path)
    p.add_argument("--config-json", required=True)
    p.add_argument("--host", default="0.0.0.0")
    p.add_argument("--log-level", default="INFO")
    p.add_argument("--grace-seconds", type=float, default=30.0)
    return p.parse_args(argv)


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def main(argv: Seq[str] | None = None) -> int:
    args = _parse(argv)
    rank = _env_int("RANK", 0)
    logging.basicConfig(
        level=args.log_level.upper(),
        format=f"%(asctime)s rank{rank} %(name)s %(levelname)s %(message)s",
    )
    cfg = parse_engine_config(json.loads(args.config_json), "--config-json")
    if rank == 0:
        return _rank0(args, cfg)
    return _follower(args, cfg, rank)


def _load(args: argparse.Namespace, cfg: EngineConfig, rank: int):  # noqa: ANN202
    from dsworker.engine.rank_setup import build_runner

    return build_runner(
        args.model,
        cfg,
        rank=rank,
        world_size=_env_int("WORLD_SIZE", 1),
        local_rank=_env_int("LOCAL_RANK", 0),
        local_world_size=_env_int("LOCAL_WORLD_SIZE", 1),
    )


def _failed(what: str, exc: Exception) -> int:
    """Log a failure and return the rank's exit code: bad input (a corrupt or unfinished shard
    layout, a missing tokenizer, a plan or KV budget that cannot work) is one line and exit 2,
    so the group fails at once instead of spending restarts; anything else keeps its
    traceback and exits 1."""
    from dsworker.chat.tokenizer import TokenizerError
    from dsworker.contract.errors import EXIT_BAD_INPUT, CheckpointError
    from dsworker.contract.kv_budget import KVBudgetError
    from dsworker.contract.layout import PlanError

    if isinstance(
        exc, CheckpointError | TokenizerError | PlanError | KVBudgetError | EngineConfigError
    ):
        log.error("%s: %s", what, exc)
        return EXIT_BAD_INPUT
    log.error("%s", what, exc_info=exc)
    return 1


def _follower(args: argparse.Namespace, cfg: EngineConfig, rank: int) -> int:
    from dsworker.engine.loop import follow

    try:
        loaded = _load(args, cfg, rank)
        log.info("loaded in %.2fs; following rank 0", loaded.load_seconds)
        follow(loaded.runner, loaded.channel)
    except Exception as exc:
        return _failed(f"rank {rank} failed", exc)
    log.info("rank 0 said stop")
    loaded.close()
    return 0


def _rank0(args: argparse.Namespace, cfg: EngineConfig) -> int:
    import uvicorn

    from dsworker.engine.metrics import Metrics
    from dsworker.serving.app import create_app
    from dsworker.serving.auth import load_api_key
    from dsworker.serving.http_server import fit_open_files, server_config
    from dsworker.serving.state import ServerState

    try:
        fit_open_files(cfg.maxConnections)
        api_key = load_api_key(cfg.apiKeyFile) if cfg.apiKeyFile else None
    except EngineConfigError as exc:
        return _failed("cannot serve", exc)
    state = ServerState(config=cfg, metrics=Metrics(), status="loading", api_key=api_key)
    holder: dict[str, object] = {}
    loader = threading.Thread(
        target=_load_and_start, args=(args, cfg, state, holder), name="loader", daemon=True
    )
    server = uvicorn.Server(server_config(create_app(state), state, args.host, args.grace_seconds))
    loader.start()
    # uvicorn re-raises the signal that stopped it once it has drained; with a Python handler in
    # place that re-raise is harmless and rank 0 lives on to tell the other ranks to stop.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, _ignore_signal)
    server.run()  # returns after SIGTERM/SIGINT and a graceful drain
    log.info("HTTP server stopped")
    engine = holder.get("engine")
    if engine is None or not server.started:
        # Stopped while loading (nothing to drain), or the port could not be bound: the loader
        # thread may sit in a collective, so leave without waiting for it.
        logging.shutdown()
        os._exit(0 if server.started else 1)
    engine.stop(timeout=args.grace_seconds)  # type: ignore[attr-defined]
    loaded = holder.get("loaded")
    if loaded is not None:
        loaded.close()  # type: ignore[attr-defined]
    return 0


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    log.info("signal %d while stopping: already stopping", signum)


def _check_tool_markers(cfg: EngineConfig, tokenizer: TextTokenizer) -> None:
    """Warn when toolCallParser is on but the tokenizer marks the call markers special: decoding
    would drop them, so no call could be parsed (vLLM's parser needs them in the text too)."""
    from dsworker.chat.tool_calls import MARKERS

    hidden = tokenizer.marked_special(MARKERS) if cfg.toolCallParser else []
    if hidden:
        log.warning(
            "toolCallParser %s: the tokenizer marks %s special, so they never reach the text "
            "and tool calls cannot be parsed",
            cfg.toolCallParser,
            ", ".join(hidden),
        )


def _prepare_grammars(tokenizer: TextTokenizer) -> None:
    """Read the vocabulary for guided decoding while the weights load, so that the first
    request with a response_format does not wait for it."""
    t0 = time.monotonic()
    try:
        from dsworker.chat.grammars import grammars_for

        grammars_for(tokenizer)
    except Exception:  # guided requests will fail on their own; plain serving is unaffected
        log.exception("guided decoding is unavailable")
        return
    log.info("guided decoding ready in %.2fs", time.monotonic() - t0)


def _load_and_start(
    args: argparse.Namespace, cfg: EngineConfig, state: object, holder: dict[str, object]
) -> None:
    from dsworker.chat.tokenizer import TextTokenizer
    from dsworker.engine.loop import EngineLoop
    from dsworker.engine.metrics import Metrics
    from dsworker.engine.requests import GenRequest, SamplingParams
    from dsworker.serving.state import ServerState

    assert isinstance(state, ServerState)
    try:
        hold = os.environ.get(HOLD_ENV)
        while hold and not Path(hold).exists():
            time.sleep(0.05)
        tokenizer = TextTokenizer(args.model)
        _check_tool_markers(cfg, tokenizer)
        threading.Thread(
            target=_prepare_grammars, args=(tokenizer,), name="grammars", daemon=True
        ).start()
        loaded = _load(args, cfg, 0)
        holder["loaded"] = loaded
        m = state.metrics
        m.load_seconds.set(loaded.load_seconds)
        m.load_bytes.set(loaded.load_bytes)
        m.load_gbps.set(loaded.load_bytes / 1e9 / max(loaded.load_seconds, 1e-9))
        state.status = "warming up"
        # Warm-up traffic goes to a throwaway registry; the real one counts only requests.
        engine = EngineLoop(
            loaded.runner,
            loaded.scheduler(cfg),
            tokenizer.decode,
            loaded.channel,
            Metrics(),
            silent=tokenizer.special_ids,
        )
        t0 = time.monotonic()
        n = min(WARMUP_PROMPT_TOKENS, cfg.maxInputTokenLen)
        # Two sequences, one a token longer, decode at batch 2 and then 1: a compiled decode step
        # traces both shapes it will ever trace (batch 1 is specialised) here, not on a request.
        for i in range(min(2, loaded.max_batch_size)):
            engine.submit(
                GenRequest([0] * n, SamplingParams(temperature=0.0), max_tokens=2 + i),
                lambda out: None,
            )
        engine.run_until_idle()
        m.warmup_seconds.set(time.monotonic() - t0)
        engine.metrics = m
        engine.start()
        holder["engine"] = engine
        state.tokenizer, state.engine = tokenizer, engine
        state.ready, state.status = True, "ok"
        m.ready.set(1)
        log.info(
            "ready: loaded %.2f GB in %.2fs, warm-up %.2fs, serving %s on port %d",
            loaded.load_bytes / 1e9,
            loaded.load_seconds,
            time.monotonic() - t0,
            cfg.modelName,
            cfg.port,
        )
    except Exception as exc:
        code = _failed("loading failed", exc)
        state.status = "failed"
        logging.shutdown()
        os._exit(code)


if __name__ == "__main__":
    sys.exit(main())
