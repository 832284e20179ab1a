"""The requests rank 0's engine is running, and what each step means for them.

Each live request has its client's sink, its text so far, its sampler and grammar state and its
timings. After a forward, the step's logits become their prompt and token logprobs and its sampled
tokens their text and Outputs (and the latency metrics); a stop string or a finished grammar ends a
sequence here, in the scheduler too. All of it runs on the engine thread.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from dsworker.engine import sampling
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, Output, Sink, TokenLogprob
from dsworker.engine.scheduler import Scheduler
from dsworker.engine.steps import FinishReason, Step, StepItem
from dsworker.engine.textstream import OutputText

if TYPE_CHECKING:  # xgrammar loads only when a request is guided
    from dsworker.engine.grammar_masks import Matcher

log = logging.getLogger("dsworker.engine.live_requests")


@dataclass
class LiveRequest:
    req: GenRequest
    sink: Sink
    text: OutputText
    generator: torch.Generator | None
    arrived: float
    last_token_at: float | None = None
    started: bool = False  # in a step yet (the queue time is observed then)
    prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    matcher: Matcher | None = None  # guided: where the output is in its grammar


class LiveRequests:
    """seq_id -> the live request, with the per-request side of each step."""

    def __init__(
        self,
        scheduler: Scheduler,
        decode: Callable[[list[int]], str],
        metrics: Metrics,
        device: torch.device,
        silent: frozenset[int],
    ) -> None:
        self.scheduler = scheduler
        self.decode = decode
        self.metrics = metrics
        self.device = device
        self.silent = silent
        self.by_id: dict[int, LiveRequest] = {}

    def __contains__(self, seq_id: int) -> bool:
        return seq_id in self.by_id

    def open(self, seq_id: int, req: GenRequest, sink: Sink, submitted: float) -> None:
        """A request the scheduler took: its sampler, grammar matcher and text start here."""
        gen = None
        if not req.params.greedy:
            gen = sampling.make_generator(req.params, self.device)
        matcher = None
        if req.grammar is not None:  # xgrammar loads only when a request is guided
            from dsworker.engine.grammar_masks import Matcher

            matcher = Matcher(req.grammar)
        self.by_id[seq_id] = LiveRequest(
            req,
            sink,
            OutputText(self.decode, req.stop, req.prompt, self.silent),
            gen,
            submitted,
            matcher=matcher,
        )
        self.metrics.prompt_tokens.inc(len(req.prompt))

    def drop(self, seq_id: int) -> LiveRequest | None:
        return self.by_id.pop(seq_id, None)

    def fail_all(self, error: str) -> None:
        """Every live request gets `error` (the engine is going down)."""
        for live in self.by_id.values():
            live.sink(Output("", [], None, error=error))
        self.by_id.clear()

    def start(self, step: Step, now: float) -> None:
        """Observe the queue time of the requests whose first step this is."""
        for item in step.items:
            live = self.by_id.get(item.seq_id)
            if live is not None and not live.started:
                live.started = True
                self.metrics.queue_seconds.observe(now - live.arrived)

    def unguided(self, seq_id: int) -> bool:
        """Live and without a grammar: its drafts may ride in the next step."""
        live = self.by_id.get(seq_id)
        return live is not None and live.matcher is None

    def sample(self, items: list[StepItem], logits: torch.Tensor) -> list[list[int]]:
        """The tokens each sampling item emits: verified drafts, then the next token."""
        lives = [self.by_id[i.seq_id] for i in items]
        return sampling.verify(
            logits,
            [it.tokens[len(it.tokens) - it.drafts :] for it in items],
            [lv.req.params for lv in lives],
            [lv.generator for lv in lives],
            [self.scheduler.running[it.seq_id].output for it in items],
            self._masks(lives),
        )

    @staticmethod
    def _masks(lives: list[LiveRequest]) -> list[sampling.Mask | None] | None:
        """Guided sequences' masks for this step's rows (each fills its next-token mask now)."""
        if not any(lv.matcher is not None for lv in lives):
            return None
        out: list[sampling.Mask | None] = []
        for lv in lives:
            if lv.matcher is not None:
                lv.matcher.fill()
            out.append(lv.matcher.mask if lv.matcher is not None else None)
        return out

    def score_prompts(self, step: Step, logits: torch.Tensor | None) -> torch.Tensor | None:
        """Take the prompt rows out of the runner's logits into their requests' prompt logprobs;
        what remains are the sampled items' verify rows."""
        if logits is None or not any(it.prompt_rows for it in step.items):
            return logits
        keep: list[int] = []
        at = 0
        for it in step.with_rows:
            if it.prompt_rows:
                live = self.by_id[it.seq_id]
                top = live.req.prompt_logprobs
                assert top is not None, "only a scoring sequence has prompt rows"
                first = it.start + len(it.tokens) - it.rows + 1  # the prompt token row 0 scores
                targets = live.req.prompt[first : first + it.prompt_rows]
                rows = logits[at : at + it.prompt_rows]
                live.prompt_logprobs += sampling.token_logprobs(rows, targets, top)
            keep += range(at + it.prompt_rows, at + it.rows)
            at += it.rows
        return logits[keep]

    def logprobs(
        self,
        items: list[StepItem],
        logits: torch.Tensor | None,
        sampled: dict[int, list[int]],
    ) -> dict[int, list[TokenLogprob]]:
        """Per sequence that asked: its emitted tokens' logprobs (token j from verify row j).

        A guided sequence's come from the grammar-masked logits, before penalties, bias and
        temperature: what vLLM reports, its bitmask being applied before its sampler."""
        out: dict[int, list[TokenLogprob]] = {}
        at = 0
        for it in items:
            live = self.by_id[it.seq_id]
            top = live.req.logprobs
            if top is not None and logits is not None:
                toks = sampled[it.seq_id]
                rows = logits[at : at + len(toks)]
                if live.matcher is not None:
                    rows = live.matcher.mask(rows)
                out[it.seq_id] = sampling.token_logprobs(rows, toks, top)
            at += it.verify_rows
        return out

    def emit(
        self,
        seq_id: int,
        token: int,
        reason: FinishReason | None,
        now: float,
        logprob: TokenLogprob | None = None,
    ) -> None:
        """Hand the request its new text (and end it on a stop string or its grammar's end)."""
        live = self.by_id.get(seq_id)
        if live is None:
            return
        self.metrics.generation_tokens.inc()
        if live.last_token_at is None:
            self.metrics.ttft.observe(now - live.arrived)
        else:
            self.metrics.itl.observe(now - live.last_token_at)
        live.last_token_at = now
        if live.matcher is not None and reason is None and _grammar_ends(seq_id, live, token):
            self.scheduler.finish(seq_id, FinishReason.STOP)
            reason = FinishReason.STOP
        if reason is FinishReason.STOP and token in live.req.stop_token_ids:
            pass  # a stop token ends the sequence without being part of its text
        elif live.text.add(token):  # a stop string ended the text, even on the last allowed token
            if reason is None:
                self.scheduler.finish(seq_id, FinishReason.STOP)
            reason = FinishReason.STOP
        if reason is not None:
            live.text.finish()
        text = live.text.take(final=reason is not None)
        lps = (logprob,) if logprob is not None else ()
        prompt_lps, live.prompt_logprobs = tuple(live.prompt_logprobs), []
        live.sink(
            Output(
                text,
                [token],
                reason.value if reason else None,
                logprobs=lps,
                prompt_logprobs=prompt_lps,
            )
        )
        if reason is not None:
            del self.by_id[seq_id]
            self.metrics.finished.labels(reason.value).inc()
            self.metrics.e2e.observe(now - live.arrived)


def _grammar_ends(seq_id: int, live: LiveRequest, token: int) -> bool:
    """Follow a guided sequence's token; True when that ends its grammar (its stop token
    after a complete text, which ignore_eos would otherwise let through)."""
    assert live.matcher is not None
    if not live.matcher.accept(token):  # the mask allowed it: a bug, not the client's
        log.error("sequence %d: token %d is outside its grammar; ending it", seq_id, token)
        return True
    return live.matcher.terminated
