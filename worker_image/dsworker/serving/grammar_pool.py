"""Guided decoding's grammars, compiled on threads of their own, a few at a time.

A costly schema then holds up neither the event loop nor tokenization; a request whose grammar
takes longer than the timeout gets a 400, and a new schema while every thread is busy a 503.
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from dsworker.chat.grammar_spec import GrammarError, GrammarSpec
from dsworker.serving.protocol.errors import ApiError

if TYPE_CHECKING:
    from dsworker.chat.grammars import Grammar
    from dsworker.serving.state import Tokenizer

GRAMMAR_THREADS = 2
GRAMMAR_TIMEOUT_S = 30.0


class GrammarPool:
    """The compile threads and their slots: one slot per compile running now, freed when the
    compile ends (a timed-out one keeps its slot until then), so none waits in a queue."""

    def __init__(
        self, threads: int = GRAMMAR_THREADS, timeout_s: float = GRAMMAR_TIMEOUT_S
    ) -> None:
        self.slots = threading.BoundedSemaphore(threads)
        self.timeout_s = timeout_s
        self._threads = ThreadPoolExecutor(threads, thread_name_prefix="grammar")

    async def compile(self, spec: GrammarSpec | None, tokenizer: Tokenizer) -> Grammar | None:
        """The compiled grammar of `spec`: from the cache at once, else compiled on a free
        thread (503 when every one is busy compiling); None for free text."""
        if spec is None:
            return None
        from dsworker.chat.grammars import built_grammars, grammars_for  # loaded at start-up

        built = built_grammars(tokenizer)
        hit = built.cached(spec) if built is not None else None
        if hit is not None:
            return hit
        if not self.slots.acquire(blocking=False):
            raise ApiError(
                "every grammar thread is busy compiling other schemas; retry shortly",
                status=503,
                param=spec.param,
                code="server_busy",
            )

        def compile_it() -> Grammar:
            try:
                return grammars_for(tokenizer).compile(spec)
            finally:
                self.slots.release()

        loop = asyncio.get_running_loop()
        try:
            return await asyncio.wait_for(
                loop.run_in_executor(self._threads, compile_it), self.timeout_s
            )
        except GrammarError as exc:
            raise ApiError(exc.message, param=exc.param) from None
        except TimeoutError:
            raise ApiError(
                f"{spec.param}: the grammar took more than {self.timeout_s:.0f} s to compile; "
                "simplify it",
                param=spec.param,
            ) from None
