"""The HTTP server around the app: uvicorn, with its connections bounded.

uvicorn alone holds a connection for as long as its client likes (nothing bounds the time a
request takes to arrive) and accepts connections until the process runs out of file descriptors,
where the server stops answering and every accept logs a traceback. Here a request must arrive
whole within requestReadTimeout (else 408, closed), at most maxConnections are open at once (one
more is answered 503, closed), idle keep-alive connections close after keepAliveTimeout, and
the open-file limit is raised to fit before the port opens.
"""

from __future__ import annotations

import asyncio
import json
import logging
import resource
import time
from http import HTTPStatus
from typing import Any

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from dsworker.contract.engine_config import EngineConfigError
from dsworker.engine.metrics import Metrics
from dsworker.serving.body import READ_TIMED_OUT
from dsworker.serving.protocol.errors import ApiError
from dsworker.serving.state import ServerState

log = logging.getLogger(__name__)

FD_RESERVE = 256  # open files beside the connections: shards, sockets of the process group, logs
LINGER_S = 1.0  # a refused connection is read (and dropped) this long, so the 503 is not reset
MAX_LINGERING = 64  # refused connections lingering at once; beyond, they are closed at once
LOG_EVERY_S = 10.0


def canned_response(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response with OpenAI's error body, written without the app."""
    kind = "service_unavailable" if status == 503 else "invalid_request_error"
    body = json.dumps(ApiError(message, status=status, type=kind, code=code).body()).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode() + body


class Throttled:
    """One log line per `every_s` at most, saying how many like it were folded in."""

    def __init__(self, level: int, every_s: float = LOG_EVERY_S) -> None:
        self.level = level
        self.every_s = every_s
        self._last = -every_s
        self._folded = 0

    def log(self, msg: str, *args: object) -> None:
        now = time.monotonic()
        if now - self._last < self.every_s:
            self._folded += 1
            return
        more = f" ({self._folded} more like it since the last report)" if self._folded else ""
        log.log(self.level, msg + more, *args)
        self._last, self._folded = now, 0


class ConnectionGuard:
    """The bounds of one server and what crossing them does: the canned answers, the counts,
    and throttled logs (a flood of refusals must not become a flood of log lines)."""

    def __init__(self, max_connections: int, read_timeout_s: float, metrics: Metrics) -> None:
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self.metrics = metrics
        self.lingering = 0
        self.busy = canned_response(
            503,
            "too_many_connections",
            f"the server holds its maxConnections ({max_connections}) open connections; retry",
        )
        self.too_slow = canned_response(
            408,
            "request_timeout",
            f"the request did not arrive whole within requestReadTimeout ({read_timeout_s:g} s)",
        )
        self._refusals = Throttled(logging.WARNING)
        self._timeouts = Throttled(logging.INFO)

    def refused(self) -> None:
        self.metrics.refused_connections.labels("max_connections").inc()
        self._refusals.log(
            "refused a connection: maxConnections (%d) are open", self.max_connections
        )

    def timed_out(self, client: tuple[str, int] | None) -> None:
        self.metrics.refused_connections.labels("read_timeout").inc()
        self._timeouts.log(
            "closed the connection of %s: its request did not arrive whole within "
            "requestReadTimeout (%g s)",
            client[0] if client else "?",
            self.read_timeout_s,
        )


class BoundedConfig(uvicorn.Config):
    """uvicorn's config, with the guard its connections (BoundedH11Protocol) answer to."""

    def __init__(self, app: FastAPI, guard: ConnectionGuard, **kwargs: Any) -> None:
        super().__init__(app, http=BoundedH11Protocol, **kwargs)
        self.guard = guard


class BoundedH11Protocol(H11Protocol):
    """uvicorn's h11 connection with a deadline for each request to arrive whole (from the
    connection's opening for the first, from its first byte for later ones) and a refusal
    when maxConnections are open already."""

    def __init__(self, config: uvicorn.Config, *args: Any, **kwargs: Any) -> None:
        super().__init__(config, *args, **kwargs)
        assert isinstance(config, BoundedConfig)
        self.guard = config.guard
        self.refused = False
        self.linger: asyncio.TimerHandle | None = None
        self.read_deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        if len(self.connections) >= self.guard.max_connections:
            self._refuse(transport)
            return
        super().connection_made(transport)  # type: ignore[arg-type]
        self._arm()

    def data_received(self, data: bytes) -> None:
        if self.refused:
            return  # read and dropped, so that closing does not reset the 503
        self._arm()
        super().data_received(data)
        self._track()

    def eof_received(self) -> bool | None:
        if self.refused:
            self._end_linger()
        return None  # the transport closes

    def on_response_complete(self) -> None:
        super().on_response_complete()
        self._track()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.refused:
            self._end_linger()
            return
        self._disarm()
        super().connection_lost(exc)

    def _refuse(self, transport: asyncio.BaseTransport) -> None:
        """Answer 503 at once; then read until the client closes (at most LINGER_S), since
        closing with its request unread would reset the connection, 503 and all."""
        assert isinstance(transport, asyncio.Transport)
        self.refused, self.transport = True, transport
        self.guard.refused()
        transport.write(self.guard.busy)
        if self.guard.lingering >= MAX_LINGERING or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        self.guard.lingering += 1
        self.linger = self.loop.call_later(LINGER_S, self._end_linger)

    def _end_linger(self) -> None:
        if self.linger is not None:
            self.linger.cancel()
            self.linger = None
            self.guard.lingering -= 1
            self.transport.close()

    def _arm(self) -> None:
        if self.read_deadline is None:
            self.read_deadline = self.loop.call_later(self.guard.read_timeout_s, self._timed_out)

    def _disarm(self) -> None:
        if self.read_deadline is not None:
            self.read_deadline.cancel()
            self.read_deadline = None

    def _track(self) -> None:
        """Keep the deadline while a request is partly here; drop it once it is whole, or
        while none is (an idle keep-alive connection is keepAliveTimeout's)."""
        state = self.conn.their_state
        if state is h11.SEND_BODY or (state is h11.IDLE and self.conn.trailing_data[0]):
            self._arm()
        else:
            self._disarm()

    def _timed_out(self) -> None:
        self.read_deadline = None
        if self.transport.is_closing():
            return
        self.guard.timed_out(self.client)
        cycle = self.cycle
        in_app = cycle is not None and not cycle.response_complete
        if in_app:
            cycle.scope[READ_TIMED_OUT] = True  # type: ignore[literal-required]
        if not (in_app and cycle.response_started):
            self.transport.write(self.guard.too_slow)
        self.transport.close()


def fit_open_files(max_connections: int) -> None:
    """Raise this process's open-file limit to hold maxConnections and FD_RESERVE, or fail
    naming the key: past the limit the server would stop accepting, logging tracebacks."""
    need = max_connections + FD_RESERVE
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or soft >= need:
        return
    if hard != resource.RLIM_INFINITY and hard < need:
        raise EngineConfigError(
            f"maxConnections {max_connections} needs {need} open files, but the open-file "
            f"limit is {hard}; lower maxConnections or raise the limit (ulimit -n)"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def server_config(app: FastAPI, state: ServerState, host: str, grace_s: float) -> uvicorn.Config:
    """uvicorn's config for `app` as rank 0 serves it, bounded by the engine config's keys."""
    cfg = state.config
    guard = ConnectionGuard(cfg.maxConnections, cfg.requestReadTimeout, state.metrics)
    return BoundedConfig(
        app,
        guard,
        host=host,
        port=cfg.port,
        log_level="warning",
        access_log=False,
        timeout_keep_alive=cfg.keepAliveTimeout,
        timeout_graceful_shutdown=max(1, int(grace_s / 2)),
    )
