"""Prompt chunks and decodes share engine steps (the scheduler's token budget), and a mixed step
runs each part its own way (the chunk through SDPA, the decodes through the decode op): the
greedy tokens are transformers' own, as when every request runs alone."""

from __future__ import annotations

from pathlib import Path

import pytest
from engine_helpers import NEW_TOKENS, PROMPTS, Reference, hf_reference
from serving_helpers import engine_config, serve

from dsworker.engine.rank_setup import build_runner
from dsworker.engine.requests import GenRequest, SamplingParams
from dsworker.engine.step_wire import STOP, Message
from dsworker.engine.steps import Step
from dsworker.model.batch import DECODE_MAX_Q


@pytest.fixture(scope="module")
def ref(tiny_v3: Path) -> Reference:
    return hf_reference(tiny_v3)


def is_mixed(step: Step) -> bool:
    """A prompt chunk too long for the decode op beside at least one decode item."""
    chunk = any(len(it.tokens) > DECODE_MAX_Q for it in step.items)
    decode = any(it.sample and len(it.tokens) <= 1 + it.drafts for it in step.items)
    return chunk and decode


@pytest.mark.parametrize("kw", [{"maxPrefillTokens": 8}, {"maxPrefillTokens": 9, "mtp": True}])
def test_mixed_steps_give_the_tokens_of_requests_run_alone(
    tiny_v3: Path, ref: Reference, kw: dict
) -> None:
    cfg = engine_config(prefixCaching=False, **kw)
    tokens = {}
    mixed = {}
    for together in (True, False):
        loaded = build_runner(tiny_v3, cfg, rank=0, world_size=1, local_rank=0)
        steps: list[Step] = []
        run = loaded.runner.run

        def spy(step: Step, run=run, steps=steps):  # type: ignore[no-untyped-def]
            steps.append(step)
            return run(step)

        loaded.runner.run = spy  # type: ignore[method-assign]
        greedy = SamplingParams(temperature=0.0)
        requests = [GenRequest(p, greedy, NEW_TOKENS) for p in PROMPTS]
        outs, _, _ = serve(loaded, cfg, requests, one_by_one=not together)
        loaded.channel.send(Message(STOP))
        tokens[together] = [[t for o in mine for t in o.token_ids] for mine in outs]
        mixed[together] = sum(is_mixed(s) for s in steps)
    assert mixed[True] > 0, "no step mixed a prompt chunk with decodes"
    assert mixed[False] == 0
    assert tokens[True] == tokens[False] == ref.tokens
