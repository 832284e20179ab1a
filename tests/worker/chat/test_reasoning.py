"""R1's reasoning apart from its answer, fed whole or in any pieces."""

from __future__ import annotations

import pytest

from dsworker.chat.reasoning import ReasoningSplitter, split_reasoning

CASES = [
    ("Let me think.\n</think>\n\nParis.", ("Let me think.\n", "\n\nParis.")),
    ("<think>\nhmm</think>Paris", ("\nhmm", "Paris")),
    ("  <think>x</think>y", ("x", "y")),
    ("still thinking <th", ("still thinking <th", "")),
    ("no tags at all", ("no tags at all", "")),
    ("</think>", ("", "")),
    ("<thin", ("<thin", "")),
    ("a</think>b</think>c", ("a", "b</think>c")),
]


@pytest.mark.parametrize(("text", "want"), CASES)
def test_whole_text(text: str, want: tuple[str, str]) -> None:
    assert split_reasoning(text) == want


@pytest.mark.parametrize(("text", "want"), CASES)
def test_every_two_and_three_piece_split_streams_the_same(text: str, want: tuple[str, str]) -> None:
    cuts = [(i, j) for i in range(len(text) + 1) for j in range(i, len(text) + 1)]
    for i, j in cuts:
        s = ReasoningSplitter()
        got = [s.feed(text[:i]), s.feed(text[i:j]), s.feed(text[j:], final=True)]
        assert ("".join(g[0] for g in got), "".join(g[1] for g in got)) == want, (i, j)
        assert all("</think>" not in g[0] for g in got)


def test_a_split_tag_is_held_back_until_whole() -> None:
    s = ReasoningSplitter()
    assert s.feed("abc</th") == ("abc", "")
    assert s.feed("ink>def") == ("", "def")
    assert s.feed("ghi") == ("", "ghi")
