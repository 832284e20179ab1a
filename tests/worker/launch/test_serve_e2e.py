"""`dsworker serve` end to end on CPU: 2 ranks (tp 2, EP level 2) serving a sharded tiny V3.

A real subprocess on a free 127.0.0.1 port, driven over HTTP: /health goes 503 -> 200, greedy
tokens equal transformers' DeepseekV3ForCausalLM on the unsharded checkpoint (fp32), streaming chat
uses the checkpoint's chat template, metrics move, bad requests get OpenAI-shaped 4xx, and killing
one rank takes the whole server down with a non-zero exit.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import psutil
import pytest
import torch
from engine_helpers import hf_penalized_greedy

from waiting import wait_until

ENGINE_CONFIG = {
    "modelName": "tiny-v3",
    "dtype": "float32",
    "device": "cpu",
    "ep_level": 2,
    "maxSeqLen": 128,
    "maxInputTokenLen": 64,
    "maxBatchSize": 4,
    "maxNewTokens": 32,
    "maxRequestBytes": 4096,
}
NEW_TOKENS = 8


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    url: str
    log: Path
    hold: Path

    def logs(self) -> str:
        return self.log.read_text(errors="replace")[-6000:]

    def get(self, path: str, **kw: object) -> httpx.Response:
        return httpx.get(self.url + path, timeout=30, **kw)  # type: ignore[arg-type]

    def post(self, path: str, **kw: object) -> httpx.Response:
        return httpx.post(self.url + path, timeout=60, **kw)  # type: ignore[arg-type]

    def wait_health(self, code: int, timeout: float = 120) -> httpx.Response:
        def answered() -> httpx.Response | None:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.logs()}")
            r = self.get("/health")
            return r if r.status_code == code else None

        try:
            what = f"/health to answer {code}"
            return wait_until(answered, timeout, what, retry_on=(httpx.TransportError,))
        except AssertionError as exc:
            raise AssertionError(f"{exc}\n{self.logs()}") from None

    def ranks(self) -> list[psutil.Process]:
        return psutil.Process(self.proc.pid).children()


@pytest.fixture(scope="module")
def checkpoints(synth_checkpoint, tmp_path_factory) -> tuple[Path, Path]:
    full = synth_checkpoint("v3", "tiny", "bf16", mtp=False)
    sharded = tmp_path_factory.mktemp("serve") / "sharded"
    subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "shard", "--model-path", str(full),
         "--save-directory", str(sharded), "--world-size", "2", "--tp", "2", "--moe-tp", "1"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    return full, sharded


def start_server(sharded: Path, tmp: Path) -> Server:
    cfg = tmp / "engine.json"
    cfg.write_text(json.dumps(ENGINE_CONFIG))
    port = free_port()
    hold = tmp / "go"
    log = tmp / "serve.log"
    env = {**os.environ, "DSWORKER_TEST_HOLD_FILE": str(hold), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "dsworker.cli", "serve", "--model", str(sharded), "--config",
         str(cfg), "--nproc-per-node", "2", "--host", "127.0.0.1", "--port", str(port),
         "--master-port", str(free_port()), "--grace-seconds", "10"],
        stdout=log.open("wb"), stderr=subprocess.STDOUT, env=env,
    )  # fmt: skip
    return Server(proc, f"http://127.0.0.1:{port}", log, hold)


@pytest.fixture(scope="module")
def server(checkpoints, tmp_path_factory) -> Iterator[Server]:
    srv = start_server(checkpoints[1], tmp_path_factory.mktemp("srv"))
    try:
        yield srv
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)


@pytest.fixture(scope="module")
def reference(checkpoints):
    """transformers' own DeepSeek-V3 on the unsharded checkpoint, fp32, and its tokenizer."""
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    model = DeepseekV3ForCausalLM.from_pretrained(checkpoints[0], dtype=torch.float32).eval()
    return model, AutoTokenizer.from_pretrained(checkpoints[0])


def greedy(model, prompt: list[int], n: int) -> list[int]:
    ids = torch.tensor([prompt])
    out: list[int] = []
    with torch.no_grad():
        for _ in range(n):
            nxt = int(model(ids).logits[0, -1].argmax())
            out.append(nxt)
            ids = torch.cat([ids, torch.tensor([[nxt]])], dim=1)
    return out


def test_health_is_503_until_loaded_then_200(server: Server) -> None:
    r = server.wait_health(503)
    assert r.json()["status"] == "loading"
    r = server.post("/v1/completions", json={"prompt": "hi"})
    assert r.status_code == 503 and r.json()["error"]["type"] == "service_unavailable"
    server.hold.touch()
    assert server.wait_health(200).json() == {"status": "ok"}
    assert server.get("/v1/models").json()["data"][0]["id"] == "tiny-v3"


def test_greedy_completion_matches_transformers(server: Server, reference) -> None:
    model, _ = reference
    prompt = [5, 17, 42, 99, 7, 250, 3]
    r = server.post(
        "/v1/completions",
        json={"model": "tiny-v3", "prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0,
              "ignore_eos": True, "return_token_ids": True},
    )  # fmt: skip
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["token_ids"] == greedy(model, prompt, NEW_TOKENS)
    assert choice["finish_reason"] == "length"
    assert r.json()["usage"] == {"prompt_tokens": 7, "completion_tokens": 8, "total_tokens": 15}


def test_streamed_chat_matches_transformers(server: Server, reference) -> None:
    model, tok = reference
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    body = {"messages": messages, "max_tokens": NEW_TOKENS, "temperature": 0, "stream": True,
            "ignore_eos": True, "return_token_ids": True,
            "stream_options": {"include_usage": True}}  # fmt: skip
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln.removeprefix("data: ")) for ln in lines[:-1]]
    ids = [t for c in chunks if c["choices"] for t in c["choices"][0].get("token_ids", [])]
    text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"])
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt)
    assert chunks[-1]["usage"]["prompt_tokens"] == len(prompt)
    expected = greedy(model, prompt, NEW_TOKENS)
    assert ids == expected
    assert text == tok.decode(expected, skip_special_tokens=True)
    assert chunks[-2]["choices"][0]["finish_reason"] == "length"


def test_logprobs_match_transformers(server: Server, reference) -> None:
    """Each greedy token's logprob is transformers' log-softmax at that position (fp32)."""
    model, tok = reference
    prompt = [5, 17, 42, 99, 7, 250, 3]
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "logprobs": 3}  # fmt: skip
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    tokens, lp = choice["token_ids"], choice["logprobs"]
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens[:-1]])).logits[0, len(prompt) - 1 :]
    want = torch.log_softmax(logits.float(), -1)
    assert lp["token_logprobs"] == pytest.approx(
        [want[i, t].item() for i, t in enumerate(tokens)], abs=1e-4
    )
    assert lp["tokens"] == [tok.decode([t]) for t in tokens]
    for i, top in enumerate(lp["top_logprobs"]):
        best = want[i].topk(3)
        assert max(top.values()) == pytest.approx(best.values[0].item(), abs=1e-4)
        assert {tok.decode([t]) for t in best.indices.tolist()} <= set(top)


def test_echo_scores_the_prompt_like_transformers(server: Server, reference) -> None:
    """lm-evaluation-harness's loglikelihood request: echo, logprobs, one new token; the 2-rank
    EP level 2 server's prompt logprobs are transformers' log-softmax at each position."""
    model, tok = reference
    prompt = [5, 17, 42, 99, 7, 250, 3, 11, 12]
    body = {"prompt": prompt, "max_tokens": 1, "temperature": 0, "echo": True, "logprobs": 1}
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    lp = r.json()["choices"][0]["logprobs"]
    with torch.no_grad():
        want = torch.log_softmax(model(torch.tensor([prompt])).logits[0].float(), -1)
    assert lp["tokens"][:-1] == [tok.decode([t]) for t in prompt]
    assert lp["token_logprobs"][0] is None
    assert lp["token_logprobs"][1:-1] == pytest.approx(
        [want[i, t].item() for i, t in enumerate(prompt[1:])], abs=1e-4
    )
    assert lp["token_logprobs"][-1] == pytest.approx(want[-1].max().item(), abs=1e-4)


def test_penalties_match_transformers(server: Server, reference) -> None:
    model, _ = reference
    prompt = [5, 17, 42, 99, 7, 250, 3]
    body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
            "return_token_ids": True, "presence_penalty": 0.5, "frequency_penalty": 1.5}  # fmt: skip
    r = server.post("/v1/completions", json=body)
    assert r.status_code == 200, r.text
    got = r.json()["choices"][0]["token_ids"]
    assert got == hf_penalized_greedy(model, prompt, NEW_TOKENS, 0.5, 1.5)
    assert got != greedy(model, prompt, NEW_TOKENS)  # the penalties changed something


def test_sampling_is_seeded(server: Server) -> None:
    body = {"prompt": [9, 8, 7], "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 4,
            "ignore_eos": True, "return_token_ids": True}  # fmt: skip
    a = server.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    b = server.post("/v1/completions", json=body).json()["choices"][0]["token_ids"]
    assert a == b and len(a) == 6
    # n choices: choice i is the same request seeded seed + i.
    both = server.post("/v1/completions", json={**body, "n": 2}).json()["choices"]
    c = server.post("/v1/completions", json={**body, "seed": 5}).json()["choices"][0]["token_ids"]
    assert [ch["token_ids"] for ch in both] == [a, c]


def test_bad_requests_are_openai_errors(server: Server) -> None:
    r = server.post(
        "/v1/completions", content=b'{"prompt": [1, 2', headers={"content-type": "application/json"}
    )
    assert r.status_code == 400
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = server.post("/v1/chat/completions", json={"messages": "hello"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "messages"
    r = server.post("/v1/completions", content=b"{" + b" " * 8000 + b"}")
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"
    r = server.post("/v1/completions", json={"prompt": list(range(65))})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_metrics_moved(server: Server) -> None:
    text = server.get("/metrics").text
    values = {
        ln.split(" ")[0]: float(ln.split(" ")[1])
        for ln in text.splitlines()
        if ln and not ln.startswith("#")
    }
    assert values['dsworker_requests_total{endpoint="/v1/completions",status="200"}'] >= 3
    assert values['dsworker_requests_total{endpoint="/v1/completions",status="400"}'] >= 2
    assert values["dsworker_generation_tokens_total"] >= 3 * NEW_TOKENS
    assert values["dsworker_prompt_tokens_total"] >= 7
    assert values["dsworker_time_to_first_token_seconds_count"] >= 3
    assert values["dsworker_inter_token_latency_seconds_count"] >= 3 * (NEW_TOKENS - 1)
    assert values["dsworker_load_bytes"] > 0 and values["dsworker_load_seconds"] > 0
    assert values["dsworker_ready"] == 1
    assert "dsworker_running_batch_size" in values
    assert "dsworker_dropped_routed_rows_total" in values


def test_killing_a_rank_stops_the_server_non_zero(server: Server) -> None:
    ranks = server.ranks()
    assert len(ranks) == 2
    follower = next(p for p in ranks if p.environ().get("RANK") == "1")
    follower.send_signal(signal.SIGKILL)
    rc = server.proc.wait(60)
    assert rc != 0, server.logs()
    assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)


def test_two_pods_serve_as_one_group_and_losing_one_stops_the_other(
    checkpoints, reference, tmp_path: Path
) -> None:
    """Two launchers of one rank each (`--nodes 2`, as two pods of the StatefulSet): rank 0
    serves the group's tokens; when the other pod goes away, rank 0's next broadcast (a request
    or the idle heartbeat) fails and its pod exits non-zero, so the operator restarts the group."""
    model, _ = reference
    cfg = tmp_path / "engine.json"
    cfg.write_text(json.dumps(ENGINE_CONFIG))
    port, master = free_port(), str(free_port())
    procs: list[subprocess.Popen[bytes]] = []
    logs = [tmp_path / f"node{i}.log" for i in range(2)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for node in range(2):
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "dsworker.cli",
                    "serve",
                    "--model",
                    str(checkpoints[1]),
                    "--config",
                    str(cfg),
                    "--nproc-per-node",
                    "1",
                    "--nodes",
                    "2",
                    "--node-rank",
                    str(node),
                    "--master-addr",
                    "127.0.0.1",
                    "--master-port",
                    master,
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(port),
                    "--grace-seconds",
                    "10",
                ],
                stdout=logs[node].open("wb"),
                stderr=subprocess.STDOUT,
                env=env,
                start_new_session=True,
            )  # fmt: skip
        )
    srv = Server(procs[0], f"http://127.0.0.1:{port}", logs[0], tmp_path / "unused")
    try:
        srv.wait_health(200)
        prompt = [5, 17, 42, 99, 7]
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = srv.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == greedy(model, prompt, NEW_TOKENS)
        os.killpg(procs[1].pid, signal.SIGKILL)  # the pod is gone, launcher and rank alike
        rc = procs[0].wait(60)
        assert rc != 0, srv.logs()
    finally:
        for p in procs:
            if p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait(30)


def test_sigterm_stops_all_ranks_cleanly(checkpoints, tmp_path: Path) -> None:
    srv = start_server(checkpoints[1], tmp_path)
    srv.hold.touch()
    try:
        srv.wait_health(200)
        ranks = srv.ranks()
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.logs()
        assert "rank 0 said stop" in srv.logs()  # the follower left through the STOP message
        assert not any(p.is_running() and p.status() != psutil.STATUS_ZOMBIE for p in ranks)
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()


def test_mtp_server_decodes_speculatively_with_transformers_tokens(
    synth_checkpoint, tmp_path: Path
) -> None:
    """Shards cut with --mtp: the server takes mtp from them and drafts; greedy output unchanged."""
    from transformers import DeepseekV3ForCausalLM

    full = synth_checkpoint("v3", "tiny", "bf16", mtp=True)
    sharded = tmp_path / "sharded-mtp"
    subprocess.run(
        [sys.executable, "-m", "dsworker.cli", "shard", "--model-path", str(full),
         "--save-directory", str(sharded), "--world-size", "2", "--tp", "2", "--moe-tp", "1",
         "--mtp"],
        check=True, capture_output=True, timeout=300,
    )  # fmt: skip
    model = DeepseekV3ForCausalLM.from_pretrained(full, dtype=torch.float32).eval()
    srv = start_server(sharded, tmp_path)
    try:
        srv.hold.touch()
        srv.wait_health(200)
        prompt = [5, 17, 42, 99, 7, 250, 3]
        body = {"prompt": prompt, "max_tokens": NEW_TOKENS, "temperature": 0, "ignore_eos": True,
                "return_token_ids": True}  # fmt: skip
        r = srv.post("/v1/completions", json=body)
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["token_ids"] == greedy(model, prompt, NEW_TOKENS)
        with httpx.stream("POST", srv.url + "/v1/completions", json={**body, "stream": True},
                          timeout=60) as s:  # fmt: skip
            lines = [ln for ln in s.iter_lines() if ln.startswith("data: {")]
        streamed = [t for ln in lines for t in json.loads(ln[6:])["choices"][0]["token_ids"]]
        assert streamed == greedy(model, prompt, NEW_TOKENS)
        metrics = srv.get("/metrics").text
        drafted = next(
            float(ln.split(" ")[1])
            for ln in metrics.splitlines()
            if ln.startswith("dsworker_spec_draft_tokens_total ")
        )
        # Two requests, each at least (NEW_TOKENS - 1) / 2 drafted steps (every draft kept).
        assert drafted >= NEW_TOKENS - 1, metrics
        srv.proc.send_signal(signal.SIGTERM)
        assert srv.proc.wait(60) == 0, srv.logs()
    finally:
        if srv.proc.poll() is None:
            srv.proc.kill()
            srv.proc.wait(30)
