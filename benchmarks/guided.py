"""What guided decoding costs on the host: reading the vocabulary, compiling grammars, and per
step filling a sequence's mask, applying it to a logits row and accepting the token.

Runs dsworker.chat.grammars and dsworker.engine.grammar_masks (real xgrammar) on a synthetic byte-level vocabulary of DeepSeek-V3's size
(129,280 ids): the 256 bytes, then words and identifiers found in the Python standard library's
sources, with and without a leading space, as BPE pieces look. Compile and mask times depend on
the vocabulary's size and shape, so real tokenizers give figures of this order, not these.

    python benchmarks/guided.py                  # V3's vocabulary size, 200 guided steps
    python benchmarks/guided.py --vocab 32000 --steps 500
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import sysconfig
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "worker_image"))

import torch  # noqa: E402

from dsworker.chat import grammar_spec as gs  # noqa: E402
from dsworker.chat.grammars import Grammars  # noqa: E402
from dsworker.engine.grammar_masks import Matcher  # noqa: E402

SCHEMA = json.loads((Path(__file__).parents[1] / "tests/data/pick_schema.json").read_text())
NESTED = {
    "type": "object",
    "properties": {
        f"field_{i}": (
            {"type": "string", "maxLength": 40}
            if i % 3 == 0
            else {"type": "array", "items": {"type": "number"}, "maxItems": 8}
            if i % 3 == 1
            else {"type": "object", "properties": {"a": {"type": "boolean"}, "b": {"enum": [1, 2]}}}
        )
        for i in range(20)
    },
    "required": [f"field_{i}" for i in range(0, 20, 2)],
}
TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
        "required": ["city"]}}},
    {"type": "function", "function": {"name": "get_time"}},
]  # fmt: skip


class SyntheticVocabulary:
    """A byte-level vocabulary: EOS, 256 bytes, then distinct pieces up to `size`."""

    def __init__(self, size: int) -> None:
        pieces: dict[bytes, None] = {b"<eos>": None}
        pieces.update((bytes([b]), None) for b in range(256))
        words = re.compile(rb"[A-Za-z_][A-Za-z0-9_]{1,14}|[(){}\[\]:,.=\"'#]{2,3}")
        stdlib = Path(sysconfig.get_paths()["stdlib"])
        for path in sorted(stdlib.rglob("*.py")):
            for w in words.findall(path.read_bytes()):
                for piece in (w, b" " + w):
                    pieces.setdefault(piece, None)
                if len(pieces) >= size:
                    break
            if len(pieces) >= size:
                break
        self._pieces = list(pieces)[:size]
        self.vocab_size = size
        self.eos_token_ids = frozenset({0})
        self.special_ids = frozenset({0})

    def token_bytes(self, token: int) -> bytes:
        return self._pieces[token] if token < len(self._pieces) else b""


def timed(fn, *args):  # type: ignore[no-untyped-def]
    t0 = time.perf_counter()
    out = fn(*args)
    return out, time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--vocab", type=int, default=129280)
    p.add_argument("--steps", type=int, default=200, help="guided steps per grammar walked")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    vocab, t = timed(SyntheticVocabulary, args.vocab)
    print(f"vocabulary: {args.vocab} ids ({len(vocab._pieces)} pieces) built in {t:.2f} s")
    grammars, t = timed(Grammars, vocab)
    print(f"Grammars (TokenizerInfo from token_bytes + compiler): {t:.2f} s")
    specs = {
        "json_object": gs.json_object(),
        "schema (enum + bounded integer)": gs.json_schema(SCHEMA),
        "schema (20 properties, nested)": gs.json_schema(NESTED),
        "tool_choice required (2 tools)": gs.forced_tool_calls(TOOLS, None),
    }
    for name, spec in specs.items():
        _, cold = timed(grammars.compile, spec)
        _, hit = timed(grammars.compile, spec)
        print(f"compile {name}: {cold * 1e3:.1f} ms (cache hit {hit * 1e6:.0f} us)")
    row = torch.randn(1, args.vocab)
    for name, spec in specs.items():
        m = Matcher(grammars.compile(spec))
        fill, mask, accept = [], [], []
        for _ in range(args.steps):
            if m.terminated:
                m = Matcher(grammars.compile(spec))
            _, t = timed(m.fill)
            fill.append(t)
            masked, t = timed(m.mask, row + torch.randn(1, args.vocab) * 3)
            mask.append(t)
            token = int(torch.multinomial(torch.softmax(masked[0], -1), 1))
            ok, t = timed(m.accept, token)
            assert ok
            accept.append(t)
        med = {k: statistics.median(v) * 1e6 for k, v in
               (("fill", fill), ("mask", mask), ("accept", accept))}  # fmt: skip
        print(
            f"per step, {name}: fill {med['fill']:.0f} us, mask (fp32 CPU row) "
            f"{med['mask']:.0f} us, accept {med['accept']:.0f} us (medians of {args.steps})"
        )
    compare_masks(grammars, specs["json_object"], args)
    return 0


def compare_masks(grammars: Grammars, spec: gs.GrammarSpec, args: argparse.Namespace) -> None:
    """dsworker's mask against xgrammar's own CPU kernel, where nearly every token is ruled out
    (the start of a JSON object: only `{`), the case that made dsworker unpack the bits itself."""
    import xgrammar as xgr

    m = Matcher(grammars.compile(spec))
    m.fill()
    bitmask = xgr.allocate_token_bitmask(1, args.vocab)
    xgr.GrammarMatcher(grammars.compile(spec).compiled).fill_next_token_bitmask(bitmask)
    ours, theirs = [], []
    for _ in range(args.steps):
        row = torch.randn(1, args.vocab)
        ours.append(timed(m.mask, row)[1])
        theirs.append(timed(xgr.apply_token_bitmask_inplace, row, bitmask)[1])
    print(
        f"mask with one token allowed: dsworker {statistics.median(ours) * 1e6:.0f} us, "
        f"xgrammar apply_token_bitmask_inplace (cpu) {statistics.median(theirs) * 1e6:.0f} us "
        f"(medians of {args.steps})"
    )


if __name__ == "__main__":
    sys.exit(main())
