"""The KV cache in pages (`Paging`: how many, how big, per dp group) and one dp group's pool, as
the scheduler hands them out: pure bookkeeping, no torch.

A page is free, in use by one or more sequences (counted), or idle: full, registered under the
hash of every token up to its end, and kept after its sequences ended, so a later prompt that
starts with the same tokens takes it instead of computing it again (prefix caching). Idle pages
are reused least recently released first when no free page is left (a sequence's last pages
before its first, since a later page is only reachable through the ones before it).

With an MTP layer, a page's last MTP entry read the token after the page, so its key covers that
token too (`lookahead`). Keys are keyed BLAKE2b digests: a prompt cannot be crafted to collide
with another's pages and read their cache.
"""

from __future__ import annotations

import hashlib
import os
from array import array
from collections import OrderedDict, deque
from collections.abc import Sequence
from dataclasses import dataclass

from dsworker.contract.kv_budget import pages_for

_KEY = os.urandom(16)  # per process: keys are never shared between processes


@dataclass(frozen=True)
class Paging:
    """The KV cache in pages: `pages` of `page_size` positions in each of the dp groups."""

    page_size: int
    pages: int
    dp: int = 1
    prefix_caching: bool = True  # keep full pages for later prompts with the same tokens

    def needed(self, positions: int) -> int:
        return pages_for(positions, self.page_size)


class PagePool:
    def __init__(
        self, pages: int, page_size: int, prefix_caching: bool = True, lookahead: int = 0
    ) -> None:
        """lookahead: tokens after a page that its content depends on (1 with MTP)."""
        self.page_size = page_size
        self.prefix_caching = prefix_caching
        self.lookahead = lookahead
        self.free: deque[int] = deque(range(pages))
        self.refs: dict[int, int] = {}
        self.by_hash: dict[int, int] = {}
        self.hash_of: dict[int, int] = {}
        self.idle: OrderedDict[int, None] = OrderedDict()

    @staticmethod
    def chain(previous: int, tokens: Sequence[int]) -> int:
        """The key of a page's tokens (and lookahead) and of every page before it."""
        h = hashlib.blake2b(previous.to_bytes(16, "little"), digest_size=16, key=_KEY)
        h.update(array("q", tokens).tobytes())
        return int.from_bytes(h.digest(), "little")

    def match(self, tokens: Sequence[int]) -> tuple[list[int], int]:
        """Registered pages holding the longest run of full pages `tokens` starts with (at least
        one token is left over, whose logits the prompt's last step must compute), and the hash
        of the last of them (0 for none)."""
        pages: list[int] = []
        h = 0
        if not self.prefix_caching:
            return pages, h
        p = self.page_size
        for i in range((len(tokens) - 1) // p):  # the lookahead token is always there
            nxt = self.chain(h, tokens[i * p : (i + 1) * p + self.lookahead])
            page = self.by_hash.get(nxt)
            if page is None:
                break
            pages.append(page)
            h = nxt
        return pages, h

    def available(self, matched: Sequence[int]) -> int:
        """Pages a sequence reusing `matched` could still take."""
        return len(self.free) + len(self.idle) - sum(1 for m in matched if m in self.idle)

    def take(self, matched: Sequence[int], extra: int) -> list[int]:
        """Use `matched` and `extra` fresh pages (free ones first, then the oldest idle ones)."""
        if self.available(matched) < extra:
            raise ValueError(f"{extra} pages asked, {self.available(matched)} available")
        for page in matched:
            self.idle.pop(page, None)
            self.refs[page] = self.refs.get(page, 0) + 1
        fresh: list[int] = []
        for _ in range(extra):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.idle.popitem(last=False)
                del self.by_hash[self.hash_of.pop(page)]
            self.refs[page] = 1
            fresh.append(page)
        return [*matched, *fresh]

    def register(self, page: int, h: int) -> None:
        """`page` is full and final under hash `h`; the first page with a hash keeps it."""
        if self.prefix_caching and h not in self.by_hash and page not in self.hash_of:
            self.by_hash[h] = page
            self.hash_of[page] = h

    def release(self, pages: Sequence[int]) -> None:
        """A sequence ended: its registered pages idle (last page first, so first evicted), the
        others are free again."""
        for page in reversed(pages):
            self.refs[page] -= 1
            if self.refs[page]:
                continue
            del self.refs[page]
            if page in self.hash_of:
                self.idle[page] = None
            else:
                self.free.append(page)
