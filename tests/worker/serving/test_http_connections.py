"""`dsworker serve`'s HTTP server under slow, idle, departing and too many clients (issue 16.9).

A real uvicorn, configured as rank 0 configures it, on a free port; raw sockets play the clients.
"""

from __future__ import annotations

import gc
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from counting_model import SlowRunner, counting_state, live_server
from tiny_vocab import WORDS

from dsworker.serving.state import ServerState
from waiting import wait_until

HEAD = "POST /v1/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"


@pytest.fixture()
def server_logs() -> Iterator[list[logging.LogRecord]]:
    """Every record logged meanwhile, uvicorn's too (its loggers do not propagate to root)."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = Keep(logging.DEBUG)
    loggers = [
        logging.getLogger(),
        logging.getLogger("uvicorn"),
        logging.getLogger("uvicorn.error"),
    ]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
    logging.getLogger("dsworker").setLevel(logging.INFO)
    try:
        yield records
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.removeHandler(handler)
            lg.setLevel(level)
        logging.getLogger("dsworker").setLevel(logging.NOTSET)


def errors_in(records: list[logging.LogRecord]) -> list[str]:
    return [f"{r.name}: {r.getMessage()}" for r in records if r.levelno >= logging.ERROR]


def read_until_closed(sock: socket.socket, within_s: float) -> bytes:
    """Everything the server sends until it closes the connection, which it must within
    `within_s` seconds."""
    sock.settimeout(within_s)
    got = b""
    start = time.monotonic()
    try:
        while chunk := sock.recv(65536):
            got += chunk
            sock.settimeout(max(0.01, within_s - (time.monotonic() - start)))
    except ConnectionResetError:
        pass
    except TimeoutError:
        raise AssertionError(f"the server held the connection {within_s} s; got {got!r}") from None
    return got


def counted(state: ServerState, endpoint: str, status: str) -> float:
    value = state.metrics.registry.get_sample_value(
        "dsworker_requests_total", {"endpoint": endpoint, "status": status}
    )
    return value or 0.0


def connect(port: int) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=10)


def test_connections_that_send_nothing_or_too_slowly_are_answered_408_and_closed(
    tmp_path: Path, server_logs: list[logging.LogRecord]
) -> None:
    with counting_state(tmp_path, requestReadTimeout=1) as state, live_server(state) as (_, port):
        silent, slow_head, slow_body, trickle = (connect(port) for _ in range(4))
        slow_head.sendall(HEAD.encode())  # and never the blank line
        slow_body.sendall(f"{HEAD}content-length: 100\r\n\r\n".encode() + b'{"prompt"')
        start = time.monotonic()
        for byte in f"{HEAD}content-length: 100\r\n\r\n".encode():  # a byte every 50 ms
            try:
                trickle.sendall(bytes([byte]))
            except OSError:
                break  # closed on us: the deadline counts from the first byte, not the last
            time.sleep(0.05)
        assert time.monotonic() - start < 6, "the trickling client was never cut off"
        for sock in (silent, slow_head, slow_body, trickle):
            with sock:
                answer = read_until_closed(sock, 5)
            assert answer.startswith(b"HTTP/1.1 408 "), answer
            assert json.loads(answer.split(b"\r\n\r\n", 1)[1])["error"]["code"] == "request_timeout"
        # The app was reading slow_body's body: that request is counted 408, not 500 or 499.
        wait_until(lambda: counted(state, "/v1/completions", "408"), 10, "the 408 to be counted")
        assert counted(state, "/v1/completions", "500") == 0
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=10).status_code == 200
    assert errors_in(server_logs) == []


def test_idle_keep_alive_connections_close_after_keep_alive_timeout(tmp_path: Path) -> None:
    with counting_state(tmp_path, keepAliveTimeout=1) as state, live_server(state) as (_, port):
        with connect(port) as sock:
            sock.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
            answer = read_until_closed(sock, 4)  # uvicorn's own default would hold it 5 s
        assert answer.startswith(b"HTTP/1.1 200 ")


def test_beyond_max_connections_new_ones_get_503_and_serving_goes_on(
    tmp_path: Path, server_logs: list[logging.LogRecord]
) -> None:
    with (
        counting_state(tmp_path, maxConnections=2) as state,
        live_server(state) as (server, port),
    ):
        held = [connect(port), connect(port)]
        wait_until(lambda: len(server.server_state.connections) == 2, 10, "2 open connections")
        for _ in range(20):
            with connect(port) as extra:
                extra.sendall(b"GET /health HTTP/1.1\r\nhost: x\r\n\r\n")
                answer = read_until_closed(extra, 5)
            assert answer.startswith(b"HTTP/1.1 503 "), answer
            assert b"maxConnections" in answer
        assert len(server.server_state.connections) == 2
        guard = server.config.guard
        wait_until(lambda: guard.lingering == 0, 10, "the refused connections to be closed")
        for sock in held:
            sock.close()

        def health() -> bool:
            return httpx.get(f"http://127.0.0.1:{port}/health", timeout=5).status_code == 200

        wait_until(
            health, 10, "/health once the held connections closed", retry_on=(httpx.HTTPError,)
        )
        assert (
            state.metrics.registry.get_sample_value(
                "dsworker_refused_connections_total", {"reason": "max_connections"}
            )
            == 20
        )
    assert errors_in(server_logs) == []
    refusals = [r for r in server_logs if "maxConnections" in r.getMessage()]
    assert 1 <= len(refusals) <= 2, [r.getMessage() for r in refusals]  # one, not one each


def test_a_client_leaving_mid_body_is_a_499_logged_at_info(
    tmp_path: Path, server_logs: list[logging.LogRecord]
) -> None:
    with counting_state(tmp_path) as state, live_server(state) as (_, port):
        with connect(port) as sock:
            sock.sendall(f"{HEAD}content-length: 100\r\n\r\n".encode() + b'{"prompt"')
            time.sleep(0.2)
        wait_until(lambda: counted(state, "/v1/completions", "499"), 10, "the 499 to be counted")
        assert counted(state, "/v1/completions", "500") == 0
    assert errors_in(server_logs) == []
    assert any(
        r.levelno == logging.INFO and "before sending the whole body" in r.getMessage()
        for r in server_logs
    ), [r.getMessage() for r in server_logs]


def test_a_client_leaving_a_non_streamed_request_leaves_no_unretrieved_exception(
    tmp_path: Path, server_logs: list[logging.LogRecord]
) -> None:
    runner = SlowRunner(len(WORDS))
    with counting_state(tmp_path, runner) as state, live_server(state) as (_, port):
        body = json.dumps({"prompt": "w1", "max_tokens": 30, "ignore_eos": True, "n": 2})
        for _ in range(2):
            with connect(port) as sock:
                sock.sendall(f"{HEAD}content-length: {len(body)}\r\n\r\n{body}".encode())
                time.sleep(0.2)  # a few steps in
        wait_until(lambda: counted(state, "/v1/completions", "499") == 2, 10, "two 499s")
        gc.collect()
        time.sleep(0.1)  # the server loop logs what the collected futures report
    assert errors_in(server_logs) == []
