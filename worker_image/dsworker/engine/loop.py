"""The step loop: scheduler -> broadcast -> forward -> sample -> text, on one thread per rank.

Rank 0 owns requests: HTTP handlers submit() from the event loop's thread, the loop thread runs
steps and hands each request its new text through a thread-safe callback (`live_requests` keeps
each request's side of a step: logprobs, text, Outputs). Other ranks run `follow()`: receive
each step and run the same forward, so collectives inside the model line up.
With MTP, every step is followed by a draft message and pass (speculative decoding): the tokens
sampled after each position go to the MTP layer, whose drafts the next step verifies.
A failing forward is fatal for the whole group (the launcher restarts it), never silently skipped.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import traceback
from collections.abc import Callable
from typing import Protocol

import torch

from dsworker.engine.control import Channel
from dsworker.engine.live_requests import LiveRequests
from dsworker.engine.metrics import Metrics
from dsworker.engine.requests import GenRequest, Output, Sink
from dsworker.engine.scheduler import Scheduler
from dsworker.engine.step_wire import DRAFT, HEARTBEAT, STEP, STOP, Message
from dsworker.engine.steps import DraftInput, FinishReason, Sequence, Step, StepError, StepItem

log = logging.getLogger("dsworker.engine.loop")

HEARTBEAT_S = 10.0
FATAL_GRACE_S = 1.0  # after a fatal step, before exiting: in-flight requests get their 500


class Runner(Protocol):
    """What the loop needs from the model: one forward over a step, logits of sampled items."""

    device: torch.device
    drafting: bool  # the MTP layer is loaded: each step is followed by run_drafts

    def run(self, step: Step) -> torch.Tensor | None:
        """Logits [sum of rows of step.with_rows, V] on rank 0 (others may return None)."""
        ...

    def run_drafts(
        self, step: Step, inputs: tuple[DraftInput, ...]
    ) -> dict[int, tuple[int, ...]] | None:
        """The MTP pass after `step`: seq_id -> draft tokens on rank 0."""
        ...

    def dropped_rows(self) -> int:
        """Routed rows dropped so far (routing cutoff, AllToAll overflow); 0 when none."""
        ...


class EngineLoop:
    """Rank 0's engine thread: continuous batching over the runner."""

    def __init__(
        self,
        runner: Runner,
        scheduler: Scheduler,
        decode: Callable[[list[int]], str],
        channel: Channel,
        metrics: Metrics,
        on_fatal: Callable[[BaseException], None] | None = None,
        silent: frozenset[int] = frozenset(),
    ) -> None:
        """silent: token ids `decode` leaves out of the text (the tokenizer's special tokens)."""
        self.runner = runner
        self.scheduler = scheduler
        self.channel = channel
        self.on_fatal = on_fatal or _exit_process
        # (op, seq_id, request, sink, submitted at): "add" carries the last three, "abort" none.
        self._inbox: queue.SimpleQueue[tuple[str, int, GenRequest | None, Sink | None, float]] = (
            queue.SimpleQueue()
        )
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self.live = LiveRequests(scheduler, decode, metrics, runner.device, silent)
        self._next_id = 0
        self._id_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._dropped_seen = 0
        self.failed: BaseException | None = None

    @property
    def metrics(self) -> Metrics:
        """The registry the loop counts into; the live requests share it (`serve` swaps the
        warm-up's throwaway registry for the real one before the first request)."""
        return self.live.metrics

    @metrics.setter
    def metrics(self, metrics: Metrics) -> None:
        self.live.metrics = metrics

    # -- called from other threads -------------------------------------------------------------

    def submit(self, req: GenRequest, sink: Sink) -> int:
        """Queue a request; `sink` gets Outputs on the engine thread (make it thread-safe)."""
        if self.failed is not None:
            raise RuntimeError(f"engine failed: {self.failed}")
        with self._id_lock:
            seq_id = self._next_id
            self._next_id += 1
        self._inbox.put(("add", seq_id, req, sink, time.monotonic()))
        self._wake.set()
        return seq_id

    def abort(self, seq_id: int) -> None:
        """The client went away: free its slot at the next step boundary."""
        self._inbox.put(("abort", seq_id, None, None, 0.0))
        self._wake.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the current step, tell the other ranks to stop, end the thread."""
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        last_sent = time.monotonic()
        try:
            while not self._stopping.is_set():
                if self.step_once():
                    last_sent = time.monotonic()
                    continue
                if time.monotonic() - last_sent >= HEARTBEAT_S:
                    self.channel.send(Message(HEARTBEAT))
                    last_sent = time.monotonic()
                self._wake.wait(timeout=HEARTBEAT_S / 2)
                self._wake.clear()
            self.channel.send(Message(STOP))
        except BaseException as exc:  # noqa: BLE001 - any failure ends the group
            self.failed = exc
            log.error("engine loop failed:\n%s", traceback.format_exc())
            self.live.fail_all(f"engine failed: {exc}")
            self.on_fatal(exc)

    def _drain_inbox(self) -> None:
        while True:
            try:
                op, seq_id, req, sink, submitted = self._inbox.get_nowait()
            except queue.Empty:
                return
            if op == "add":
                assert req is not None and sink is not None
                self._admit(seq_id, req, sink, submitted)
            elif op == "abort" and self.live.drop(seq_id) is not None:
                self.scheduler.finish(seq_id, FinishReason.ABORT)
                self.metrics.finished.labels(FinishReason.ABORT.value).inc()

    def _admit(self, seq_id: int, req: GenRequest, sink: Sink, submitted: float) -> None:
        seq = Sequence(
            seq_id,
            list(req.prompt),
            req.max_tokens,
            stop_token_ids=req.stop_token_ids,
            score_prompt=req.prompt_logprobs is not None,
        )
        try:
            self.scheduler.add(seq)
        except ValueError as exc:
            sink(Output("", [], None, error=str(exc)))
            return
        self.live.open(seq_id, req, sink, submitted)

    def step_once(self) -> bool:
        """Run one step if there is work; False when idle."""
        self._drain_inbox()
        reused, preempted = self.scheduler.reused_tokens, self.scheduler.preemptions
        step = self.scheduler.schedule()
        if self.scheduler.reused_tokens > reused:
            self.metrics.prefix_cache_hits.inc(self.scheduler.reused_tokens - reused)
        if self.scheduler.preemptions > preempted:
            self.metrics.preemptions.inc(self.scheduler.preemptions - preempted)
        self.metrics.running.set(self.scheduler.num_running)
        self.metrics.waiting.set(len(self.scheduler.waiting))
        self.metrics.kv_usage.set(self.scheduler.kv_usage)
        if step is None:
            return False
        t0 = time.monotonic()
        self.live.start(step, t0)
        self.channel.send(Message(STEP, step))
        try:
            logits = self.runner.run(step)
        except StepError as exc:
            self._reject(step, exc)
            return True
        logits = self.live.score_prompts(step, logits)
        sampled_items = step.sampled
        sampled: dict[int, list[int]] = {}
        if sampled_items:
            assert logits is not None
            tokens = self.live.sample(sampled_items, logits)
            sampled = {it.seq_id: t for it, t in zip(sampled_items, tokens, strict=True)}
            self._count_drafts(sampled_items, tokens)
        logprobs = self.live.logprobs(sampled_items, logits, sampled)
        now = time.monotonic()
        self.metrics.step_seconds.observe(now - t0)
        for ev in self.scheduler.update(step, sampled):
            lps = logprobs.get(ev.seq_id)
            self.live.emit(ev.seq_id, ev.token, ev.finish_reason, now, lps.pop(0) if lps else None)
        if self.runner.drafting:
            self._draft(step)
        dropped = self.runner.dropped_rows()
        if dropped > self._dropped_seen:
            self.metrics.dropped_rows.inc(dropped - self._dropped_seen)
            self._dropped_seen = dropped
        return True

    def _count_drafts(self, items: list[StepItem], tokens: list[list[int]]) -> None:
        drafted = sum(it.drafts for it in items)
        if drafted:
            self.metrics.draft_tokens.inc(drafted)
            self.metrics.accepted_draft_tokens.inc(sum(len(t) - 1 for t in tokens))

    def _draft(self, step: Step) -> None:
        """The MTP pass: every rank reads the same inputs; the drafts ride in the next step."""
        inputs = self.scheduler.draft_inputs(step)
        self.channel.send(Message(DRAFT, drafts=inputs))
        try:
            drafts = self.runner.run_drafts(step, inputs)
        except StepError as exc:
            self._reject(Step(tuple(step.items[d.index] for d in inputs)), exc)
            return
        assert drafts is not None
        self.scheduler.drafted(step, inputs)
        # A draft of a guided sequence would be verified against unmasked logits: none for them.
        self.scheduler.set_drafts({i: d for i, d in drafts.items() if self.live.unguided(i)})

    def _reject(self, step: Step, exc: StepError) -> None:
        """Fail the step's sequences (their slots are reused, so stale KV entries do no harm)."""
        log.warning("step of %d sequences refused: %s", len(step.items), exc)
        self.metrics.rejected_steps.inc()
        for item in step.items:
            self.scheduler.finish(item.seq_id, FinishReason.ABORT)
            live = self.live.drop(item.seq_id)
            if live is not None:
                live.sink(Output("", [], None, error=f"engine refused the batch: {exc}"))

    def run_until_idle(self, max_steps: int = 1_000_000) -> int:
        """Synchronous stepping (warm-up and tests): steps run until nothing is left."""
        steps = 0
        while steps < max_steps and (self.step_once() or self.scheduler.has_work):
            steps += 1
        return steps


def follow(runner: Runner, channel: Channel) -> None:
    """Ranks > 0: run every step rank 0 broadcasts until it says stop."""
    while True:
        msg = channel.recv()
        if msg.kind == STOP:
            return
        if msg.kind == HEARTBEAT:
            continue
        assert msg.step is not None
        try:
            runner.run(msg.step)
            if runner.drafting:
                msg_drafts = channel.recv()
                if msg_drafts.kind != DRAFT:
                    raise RuntimeError(f"expected the draft message, got kind {msg_drafts.kind}")
                runner.run_drafts(msg.step, msg_drafts.drafts)
        except StepError as exc:  # rank 0 refused the same step the same way
            log.warning("step refused: %s", exc)


def _exit_process(exc: BaseException) -> None:
    """Default fatal handler: exit non-zero; the launcher stops the group, Kubernetes restarts.
    The pause first lets the server's event loop write the 500s the sinks were just given."""
    time.sleep(FATAL_GRACE_S)
    logging.shutdown()
    os._exit(70)
