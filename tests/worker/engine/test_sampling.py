"""Sampling: greedy rows, seeded reproducibility, top-k/top-p masks, incremental text with stops."""

from __future__ import annotations

import pytest
import torch

from dsworker.engine import sampling
from dsworker.engine.requests import SamplingParams
from dsworker.engine.textstream import OutputText


def test_greedy_is_argmax_per_row() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2], [5.0, 1.0, 0.0]])
    params = [SamplingParams(temperature=0.0)] * 2
    assert sampling.sample(logits, params, [None, None]) == [1, 0]


def test_top_k_one_is_greedy_and_params_validate_shape() -> None:
    logits = torch.tensor([[0.1, 3.0, 0.2]])
    assert sampling.sample(logits, [SamplingParams(temperature=1.0, top_k=1)], [None]) == [1]
    with pytest.raises(ValueError, match="do not match"):
        sampling.sample(logits, [], [])


def test_seeded_sampling_repeats_and_differs_by_seed() -> None:
    torch.manual_seed(0)
    logits = torch.randn(1, 50)

    def draw(seed: int) -> list[int]:
        p = SamplingParams(temperature=1.0, seed=seed)
        g = sampling.make_generator(p)
        return [sampling.sample(logits, [p], [g])[0] for _ in range(20)]

    assert draw(1) == draw(1)
    assert draw(1) != draw(2)


def test_mixed_batch_keeps_greedy_rows_exact() -> None:
    logits = torch.tensor([[0.0, 9.0, 0.0], [1.0, 1.0, 1.0]])
    hot = SamplingParams(temperature=1.0, seed=3)
    out = sampling.sample(
        logits, [SamplingParams(temperature=0.0), hot], [None, sampling.make_generator(hot)]
    )
    assert out[0] == 1 and 0 <= out[1] < 3


def test_top_k_and_top_p_masks() -> None:
    logits = torch.log(torch.tensor([0.5, 0.3, 0.15, 0.05]))
    kept = sampling.filter_logits(logits, top_k=2, top_p=1.0)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    # nucleus 0.7: 0.5 alone is below, 0.5 + 0.3 covers it -> two tokens kept
    kept = sampling.filter_logits(logits, top_k=0, top_p=0.7)
    assert torch.isfinite(kept).tolist() == [True, True, False, False]
    # a tiny nucleus still keeps the most likely token
    kept = sampling.filter_logits(logits, top_k=0, top_p=1e-6)
    assert torch.isfinite(kept).tolist() == [True, False, False, False]


def test_sampling_never_picks_masked_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, -5.0, -5.0]])
    p = SamplingParams(temperature=2.0, top_k=2, seed=0)
    g = sampling.make_generator(p)
    seen = {sampling.sample(logits, [p], [g])[0] for _ in range(200)}
    assert seen == {0, 1}


# -- incremental text -------------------------------------------------------------------------

BYTES = {i: bytes([i]) for i in range(256)}


def byte_decode(ids: list[int]) -> str:
    return b"".join(BYTES[i] for i in ids).decode("utf-8", errors="replace")


def feed(out: OutputText, text: str) -> tuple[list[str], bool]:
    pieces = []
    stopped = False
    for b in text.encode():
        stopped = out.add(b)
        pieces.append(out.take())
        if stopped:
            break
    out.finish()
    pieces.append(out.take(final=True))
    return pieces, stopped


def test_stream_never_splits_a_utf8_character() -> None:
    out = OutputText(byte_decode)
    pieces, _ = feed(out, "héllo ✓")
    assert "".join(pieces) == "héllo ✓"
    assert all("\ufffd" not in p for p in pieces)


def test_stop_string_is_cut_and_never_streamed() -> None:
    out = OutputText(byte_decode, stop=["END"])
    pieces, stopped = feed(out, "abcENDxyz")
    assert stopped and "".join(pieces) == "abc"
    assert all("E" not in p for p in pieces)


def test_near_miss_of_stop_string_is_released() -> None:
    out = OutputText(byte_decode, stop=["END"])
    pieces, stopped = feed(out, "aENbEN")
    assert not stopped and "".join(pieces) == "aENbEN"


def test_prompt_context_does_not_leak_into_output() -> None:
    out = OutputText(byte_decode, prompt_tail=list(b"prompt "))
    pieces, _ = feed(out, "ok")
    assert "".join(pieces) == "ok"


def test_unfinished_character_is_flushed_at_the_end() -> None:
    out = OutputText(byte_decode)
    out.add(0xE2)  # first byte of a three-byte character
    assert out.take() == ""
    out.finish()
    assert out.take(final=True) == "\ufffd"


def test_greedy_verification_keeps_a_draft_only_where_it_is_the_argmax() -> None:
    logits = torch.zeros(5, 8)
    for row, tok in enumerate((3, 4, 1, 6, 2)):
        logits[row, tok] = 5.0
    greedy = SamplingParams(temperature=0.0)
    # item 0: rows 0-1, draft 3 == argmax(row 0): accepted, bonus 4; item 1: rows 2-3, draft 5
    # != 1: rejected; item 2: row 4, no draft.
    got = sampling.verify(logits, [(3,), (5,), ()], [greedy] * 3, [None] * 3)
    assert got == [[3, 4], [1], [2]]
    assert sampling.verify(logits[:2], [()] * 2, [greedy] * 2, [None] * 2) == [[3], [4]]
    with pytest.raises(ValueError, match="do not match"):
        sampling.verify(logits, [(3,)], [greedy], [None])


@pytest.mark.parametrize("draft", [0, 2], ids=["likely-draft", "unlikely-draft"])
def test_speculative_sampling_keeps_the_model_distribution(draft: int) -> None:
    """Whatever the draft, the first emitted token is distributed as plain sampling's p."""
    p = torch.tensor([0.5, 0.3, 0.15, 0.05])
    rows = torch.stack([p.log(), torch.tensor([0.0, 50.0, 0.0, 0.0])])
    params = SamplingParams(temperature=1.0, seed=1)
    gen = sampling.make_generator(params)
    n = 20_000
    counts = torch.zeros(4)
    bonus = 0
    for _ in range(n):
        out = sampling.verify(rows, [(draft,)], [params], [gen])[0]
        counts[out[0]] += 1
        if len(out) == 2:
            assert out[0] == draft
            bonus += out[1] == 1
    freq = counts / n
    assert (freq - p).abs().max() < 0.015, freq
    assert counts[draft] > 0 and bonus == int(counts[draft])  # every acceptance brings its bonus


def test_penalties_follow_the_generated_tokens_and_the_drafts_before_each_row() -> None:
    rows = torch.zeros(3, 6)
    p = SamplingParams(temperature=0.0, presence_penalty=0.5, frequency_penalty=1.0)
    got = sampling.adjust_logits(rows, [1, 1, 2], [4, 4], p)
    # row 0: token 1 twice, 2 once; row 1 adds draft 4 once; row 2 adds it again
    assert got[0].tolist() == [0, -2.5, -1.5, 0, 0, 0]
    assert got[1].tolist() == [0, -2.5, -1.5, 0, -1.5, 0]
    assert got[2].tolist() == [0, -2.5, -1.5, 0, -2.5, 0]
    assert rows.abs().sum() == 0  # the caller's logits are left alone


def test_greedy_with_penalties_moves_off_repeated_tokens() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    plain = SamplingParams(temperature=0.0)
    pen = SamplingParams(temperature=0.0, frequency_penalty=1.0)
    assert sampling.verify(logits, [(), ()], [plain, pen], [None, None], [[1], [1]]) == [[1], [2]]
    # With a draft: row 0 (after [1]) picks 2, so draft 1 is rejected for the penalised request.
    got = sampling.verify(logits, [(1,)], [pen], [None], [[1]])
    assert got == [[2]]
    assert sampling.verify(logits, [(1,)], [plain], [None], [[1]]) == [[1, 1]]


def test_logit_bias_applies_to_every_row_of_an_item() -> None:
    logits = torch.tensor([[0.0, 3.0, 2.5, 0.0], [0.0, 3.0, 2.5, 0.0]])
    bias = SamplingParams(temperature=0.0, logit_bias=((2, 1.0), (1, -0.1)))
    assert bias.adjusted and not SamplingParams().adjusted
    assert sampling.verify(logits[:1], [()], [bias], [None]) == [[2]]
    # Draft 2 is what the biased row 0 picks, so it is kept and row 1 adds its own pick.
    assert sampling.verify(logits, [(2,)], [bias], [None]) == [[2, 2]]
    got = sampling.adjust_logits(logits, [], [2], bias)
    assert got[0].tolist() == pytest.approx([0.0, 2.9, 3.5, 0.0]) and torch.equal(got[0], got[1])


def test_min_tokens_rules_out_the_stop_tokens_for_the_rows_that_come_too_soon() -> None:
    rows = torch.zeros(3, 4)
    p = SamplingParams(temperature=0.0, min_tokens=3, stops=frozenset({1, 3}))
    assert p.adjusted and not SamplingParams(min_tokens=3).adjusted  # nothing to rule out
    got = sampling.adjust_logits(rows, [7], [2, 2], p)  # 1 generated: rows 0, 1 are tokens 2, 3
    inf = float("-inf")
    assert got.tolist() == [[0, inf, 0, inf], [0, inf, 0, inf], [0, 0, 0, 0]]
    assert sampling.adjust_logits(rows, [7, 7, 7], [2, 2], p).tolist() == rows.tolist()


def test_special_tokens_stay_out_of_the_decode_window() -> None:
    """EOS after EOS (ignore_eos) decodes to nothing; kept in the window, each would make every
    later decode longer."""
    widths: list[int] = []

    def decode(ids: list[int]) -> str:
        widths.append(len(ids))
        return byte_decode([i for i in ids if i != EOS])

    EOS = 300
    out = OutputText(decode, silent=frozenset({EOS}))
    for _ in range(1000):
        assert not out.add(EOS)
    pieces, _ = feed(out, "ok")
    assert "".join(pieces) == "ok" and max(widths) <= 3
    plain = OutputText(decode)
    for _ in range(1000):
        plain.add(EOS)
    assert max(widths) > 900  # the window the silent set avoids
