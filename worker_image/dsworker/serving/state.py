"""What the handlers share: the engine config, the metrics, and once loading has ended the
tokenizer and the engine; the engine and tokenizer as the HTTP layer sees them (no torch)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol

from fastapi import Request

from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, Sink
from dsworker.serving.grammar_pool import GrammarPool
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.protocol.limits import Limits


class Engine(Protocol):
    def submit(self, req: GenRequest, sink: Sink) -> int: ...
    def abort(self, seq_id: int) -> None: ...


class Tokenizer(Protocol):
    bos_token: str
    eos_token: str
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]
    chat_template: str | None
    vocab_size: int
    fim_tokens: tuple[str, ...] | None

    def encode(self, text: str, add_bos: bool = True) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...
    def token_bytes(self, token: int) -> bytes: ...


@dataclass
class ServerState:
    """`engine` and `tokenizer` are set and `ready` flipped once loading and warm-up end."""

    config: EngineConfig
    metrics: Metrics = field(default_factory=Metrics)
    tokenizer: Tokenizer | None = None
    engine: Engine | None = None
    ready: bool = False
    status: str = "starting"
    created: int = field(default_factory=lambda: int(time.time()))
    grammars: GrammarPool = field(default_factory=GrammarPool)
    api_key: str | None = None  # /v1 requests must bear it (auth.require_api_key)

    @property
    def limits(self) -> Limits:
        assert self.tokenizer is not None
        c = self.config
        return Limits(
            c.maxInputTokenLen, c.maxSeqLen, c.maxNewTokens, c.truncation, self.tokenizer.vocab_size
        )

    def serving(self) -> tuple[Engine, Tokenizer]:
        """The engine and tokenizer, or a 503 while the model is still loading."""
        if not self.ready or self.engine is None or self.tokenizer is None:
            raise ApiError(
                "the model is still loading; retry when /health answers 200",
                status=503,
                type="service_unavailable",
            )
        return self.engine, self.tokenizer


def server_state(request: Request) -> ServerState:
    """The state of the app serving `request` (create_app puts it there)."""
    state: ServerState = request.app.state.server
    return state
