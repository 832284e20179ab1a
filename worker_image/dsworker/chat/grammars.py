"""Grammars for guided decoding, compiled with xgrammar against the model's vocabulary.

The vocabulary xgrammar sees is every token id's own bytes (TextTokenizer.token_bytes), so text
is exactly the tokens' bytes back to back, as byte-level BPE (DeepSeek's tokenizers) decodes;
special tokens other than EOS, and ids past the tokenizer (lm_head padding), are never allowed:
decoding leaves them out of the text. EOS is the grammar's stop token, allowed only once the
grammar is complete. Built once per tokenizer; compiled grammars are kept in a bounded LRU.
Torch-free, so the HTTP layer compiles a request's grammar before it reaches the engine
(dsworker.engine.grammar_masks applies it to the logits).
"""

from __future__ import annotations

import re
import threading
import weakref
from collections import OrderedDict
from typing import Protocol

import xgrammar as xgr

from dsworker.chat.grammar_spec import GrammarError, GrammarSpec

CACHE_SIZE = 64  # compiled grammars kept, least recently used first out
_LOG_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")  # xgrammar's "[time] file.cc:line: " prefix
_WORD = 0xFFFFFFFF


class Vocabulary(Protocol):
    """What guided decoding reads from the tokenizer (TextTokenizer has it)."""

    vocab_size: int  # the model's: the width of its logits' vocabulary
    eos_token_ids: frozenset[int]
    special_ids: frozenset[int]

    def token_bytes(self, token: int) -> bytes: ...


def tokenizer_info(vocab: Vocabulary) -> xgr.TokenizerInfo:
    """xgrammar's view of the vocabulary: raw bytes per id, b"" (never allowed) for special
    tokens and for ids the tokenizer does not have; EOS ids stop."""
    stops = sorted(t for t in vocab.eos_token_ids if 0 <= t < vocab.vocab_size)
    encoded = [
        b"" if t in vocab.special_ids and t not in vocab.eos_token_ids else vocab.token_bytes(t)
        for t in range(vocab.vocab_size)
    ]
    return xgr.TokenizerInfo(
        encoded, xgr.VocabType.RAW, vocab_size=vocab.vocab_size, stop_token_ids=stops or None
    )


def _reason(exc: Exception) -> str:
    """xgrammar's message without its log prefix, first line only."""
    lines = str(exc).strip().splitlines() or [type(exc).__name__]
    return _LOG_PREFIX.sub("", lines[0])


class Grammar:
    """A compiled grammar, shared by every sequence that follows it (n choices, equal specs)."""

    def __init__(self, compiled: xgr.CompiledGrammar, vocab_size: int, has_stop: bool) -> None:
        self.compiled = compiled
        self.vocab_size = vocab_size
        self.has_stop = has_stop  # else the grammar ends the sequence once complete


def _admits_output(grammar: Grammar) -> bool:
    """Some token of the vocabulary may come first (else, e.g. {"$ref": "#"}, no text follows)."""
    matcher = xgr.GrammarMatcher(
        grammar.compiled, terminate_without_stop_token=not grammar.has_stop
    )
    bitmask = xgr.allocate_token_bitmask(1, grammar.vocab_size)
    if not matcher.fill_next_token_bitmask(bitmask):
        return True  # nothing is ruled out
    for i, word in enumerate(bitmask[0].tolist()):
        bits = min(32, grammar.vocab_size - 32 * i)
        if bits <= 0:
            break
        if word & (_WORD >> (32 - bits)):
            return True
    return False


class Grammars:
    """Compiles specs against one tokenizer's vocabulary, thread-safe, with a bounded LRU."""

    def __init__(self, vocab: Vocabulary, cache_size: int = CACHE_SIZE) -> None:
        self.info = tokenizer_info(vocab)
        self.vocab_size = vocab.vocab_size
        self._has_stop = bool(self.info.stop_token_ids)
        # Our own cache: xgrammar's would grow without bound.
        self._compiler = xgr.GrammarCompiler(self.info, cache_enabled=False)
        self._cache: OrderedDict[tuple[str, str], Grammar] = OrderedDict()
        self._cache_size = cache_size
        self._lock = threading.Lock()

    def cached(self, spec: GrammarSpec) -> Grammar | None:
        """The compiled grammar of `spec` if it is in the cache (now the most recently used)."""
        with self._lock:
            hit = self._cache.get(spec.key)
            if hit is not None:
                self._cache.move_to_end(spec.key)
            return hit

    def compile(self, spec: GrammarSpec) -> Grammar:
        """The compiled grammar of `spec` (cached); GrammarError when xgrammar refuses it."""
        hit = self.cached(spec)
        if hit is not None:
            return hit
        try:
            if spec.kind == "json_schema":
                compiled = self._compiler.compile_json_schema(spec.text, any_whitespace=False)
            else:
                compiled = self._compiler.compile_structural_tag(spec.text)
        except (RuntimeError, ValueError) as exc:  # xgrammar's errors: bad schema, bad regex
            message = f"{spec.param}: cannot be compiled: {_reason(exc)}"
            raise GrammarError(message, spec.param) from None
        grammar = Grammar(compiled, self.vocab_size, self._has_stop)
        if not _admits_output(grammar):  # e.g. {"$ref": "#"}: no text follows it
            message = f"{spec.param}: the schema admits no output at all; fix it"
            raise GrammarError(message, spec.param)
        with self._lock:
            self._cache[spec.key] = grammar
            self._cache.move_to_end(spec.key)
            while len(self._cache) > self._cache_size:
                self._cache.popitem(last=False)
        return grammar

    def __len__(self) -> int:
        return len(self._cache)


_built: weakref.WeakKeyDictionary[object, Grammars] = weakref.WeakKeyDictionary()
_built_lock = threading.Lock()


def built_grammars(vocab: Vocabulary) -> Grammars | None:
    """The tokenizer's Grammars if they are built already (never waits for a build)."""
    if not _built_lock.acquire(blocking=False):
        return None
    try:
        return _built.get(vocab)
    finally:
        _built_lock.release()


def grammars_for(vocab: Vocabulary) -> Grammars:
    """The tokenizer's Grammars, built on first use (a pass over the whole vocabulary)."""
    with _built_lock:
        found = _built.get(vocab)
        if found is None:
            found = _built[vocab] = Grammars(vocab)
        return found
