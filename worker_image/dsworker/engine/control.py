"""The control channel: rank 0 broadcasts each step so every rank runs the same forward.

One fixed-size int64 broadcast per step on a CPU (gloo) group carries the length and, when it fits,
the whole message; longer messages (big prefills) follow in a second broadcast. Tensors only, never
pickled objects.
"""

from __future__ import annotations

from datetime import timedelta
from typing import Protocol

import torch
import torch.distributed as dist

from dsworker.engine.step_wire import Message, decode, encode

INLINE = (
    1024  # int64 values carried by the first broadcast (a batch-100 decode step, drafts included)
)
# Idle ranks wait in a broadcast between requests; rank 0 sends heartbeats well within this.
CONTROL_TIMEOUT = timedelta(hours=1)


class Channel(Protocol):
    def send(self, msg: Message) -> None: ...
    def recv(self) -> Message: ...


class LocalChannel:
    """World size 1: nobody to tell."""

    def send(self, msg: Message) -> None:
        return None

    def recv(self) -> Message:  # pragma: no cover - rank 0 never receives
        raise RuntimeError("a single-rank world has no control messages to receive")


class DistChannel:
    """Broadcast over a gloo group (created here, collectively, when the world is not gloo)."""

    def __init__(self, group: dist.ProcessGroup | None = None) -> None:
        if group is None:
            backend = dist.get_backend()
            group = (
                dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
                if backend != "gloo"
                else dist.group.WORLD
            )
        self.group = group
        self._src = 0
        self._buf = torch.zeros(INLINE + 1, dtype=torch.int64)

    def send(self, msg: Message) -> None:
        data = encode(msg)
        self._buf[0] = len(data)
        head = data[:INLINE]
        self._buf[1 : 1 + len(head)] = torch.tensor(head, dtype=torch.int64)
        dist.broadcast(self._buf, self._src, group=self.group)
        if len(data) > INLINE:
            dist.broadcast(torch.tensor(data[INLINE:], dtype=torch.int64), self._src, self.group)

    def recv(self) -> Message:
        dist.broadcast(self._buf, self._src, group=self.group)
        n = int(self._buf[0])
        data = self._buf[1 : 1 + min(n, INLINE)].tolist()
        if n > INLINE:
            rest = torch.empty(n - INLINE, dtype=torch.int64)
            dist.broadcast(rest, self._src, group=self.group)
            data += rest.tolist()
        return decode(data)
