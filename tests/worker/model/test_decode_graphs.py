"""Fixed-shape decode steps (what CUDA graphs replay) give transformers' greedy tokens on CPU.

The padded step, its scratch slot and the sync-free MoE run eagerly here; with dynamo's
fullgraph tracing (backend "eager") the same step must trace without a single graph break, which
is what capture needs: no host sync, no data-dependent shape.
"""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from engine_helpers import NEW_TOKENS, PROMPTS, Reference, hf_reference

from dsworker.contract.engine_config import EngineConfig
from dsworker.contract.layout import ParallelPlan
from dsworker.engine.control import LocalChannel
from dsworker.engine.loader import load_weights
from dsworker.engine.loop import EngineLoop
from dsworker.engine.metrics import Metrics
from dsworker.engine.model_runner import ModelRunner
from dsworker.engine.rank_setup import fixed_shape_decode, fixed_shape_mode
from dsworker.engine.requests import GenRequest, Output, SamplingParams
from dsworker.engine.scheduler import Scheduler
from dsworker.model import Batch, DeepseekModel, EngineOptions, KVCache, ModelArgs, MoEOptions
from dsworker.model.decode_graphs import DecodeGraphs
from dsworker.model.experts import LocalExperts
from dsworker.model.graph_buckets import batch_buckets, key_buckets, pick
from dsworker.parallel.device import Device
from dsworker.parallel.groups import build_groups

P1 = ParallelPlan(1, 1, 1, 1, 1)
MAX_LEN = 64


@pytest.fixture(scope="module")
def ref(tiny_v3: Path) -> Reference:
    return hf_reference(tiny_v3)


needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device here: graph capture needs one"
)


def build(
    ckpt: Path,
    opts: EngineOptions | None = None,
    kind: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> tuple[DeepseekModel, KVCache]:
    dev = Device.create(kind)
    model = DeepseekModel(
        ModelArgs.from_dir(ckpt), build_groups(P1, 0, "gloo"), opts, dtype, dev.torch
    )
    load_weights(model.targets(), ckpt, P1, 0, dev)
    return model, model.new_cache(4, MAX_LEN)


def greedy(model: DeepseekModel, cache: KVCache, graphs: DecodeGraphs) -> list[list[int]]:
    """Prefill every prompt with an ordinary step, then decode through the fixed-shape steps."""
    out = model.forward(
        Batch.build([(i, 0, p) for i, p in enumerate(PROMPTS)], model.device), cache
    )
    tokens = [[t] for t in out.logits.argmax(-1).tolist()]
    for _ in range(NEW_TOKENS - 1):
        slots = list(range(len(PROMPTS)))
        positions = [len(p) + len(t) - 1 for p, t in zip(PROMPTS, tokens, strict=True)]
        logits = graphs.run(slots, positions, [[t[-1]] for t in tokens])
        assert logits.shape == (len(PROMPTS), model.args.vocab_size)
        for t, nxt in zip(tokens, logits.argmax(-1).tolist(), strict=True):
            t.append(nxt)
    return tokens


def test_buckets() -> None:
    assert batch_buckets(1) == [1]
    assert batch_buckets(16) == [1, 2, 4, 8, 16]
    assert batch_buckets(40) == [1, 2, 4, 8, 16, 32, 40]
    assert key_buckets(100) == [100]
    assert key_buckets(2560) == [256, 512, 1024, 2048, 2560]
    assert [pick([1, 2, 4], n) for n in (1, 2, 3, 4)] == [1, 2, 4, 4]
    with pytest.raises(ValueError, match="exceeds the largest bucket 4"):
        pick([1, 2, 4], 5)
    with pytest.raises(ValueError, match="max_batch"):
        batch_buckets(0)


@pytest.mark.parametrize("backend", [None, "eager"], ids=["eager-step", "dynamo-fullgraph"])
def test_fixed_shape_decode_gives_transformers_tokens(
    tiny_v3: Path, ref: Reference, backend: str | None
) -> None:
    """Three sequences ride in the 4-row bucket: the padding row must not disturb them."""
    model, cache = build(tiny_v3)
    graphs = DecodeGraphs(model, cache, 4, capture=False, compile_backend=backend)
    before = cache.kv[:, : len(PROMPTS)].clone()
    assert greedy(model, cache, graphs) == ref.tokens
    assert not torch.equal(cache.kv[:, : len(PROMPTS)], before)
    assert cache.kv[:, len(PROMPTS) : cache.num_slots].abs().sum() == 0  # slot 3 untouched
    assert cache.kv[:, cache.scratch_slot].abs().sum() > 0  # the padding row wrote here


def test_model_runner_takes_the_fixed_shape_path(tiny_v3: Path, ref: Reference) -> None:
    """The serving loop's decode steps go through the graphs and still give the same tokens."""
    model, cache = build(tiny_v3)
    graphs = DecodeGraphs(model, cache, 4, capture=False)
    calls = [0]
    run = graphs.run

    def counted(*a: list[int], **kw: int) -> torch.Tensor:
        calls[0] += 1
        return run(*a, **kw)

    graphs.run = counted  # type: ignore[method-assign]
    runner = ModelRunner(model, cache, build_groups(P1, 0, "gloo"), Device.create("cpu"), graphs)
    loop = EngineLoop(runner, Scheduler(4, MAX_LEN, 256), lambda ids: "", LocalChannel(), Metrics())
    got: dict[int, list[int]] = {}
    lock = threading.Lock()
    for i, p in enumerate(PROMPTS):

        def sink(out: Output, i: int = i) -> None:
            with lock:
                got.setdefault(i, []).extend(out.token_ids)

        loop.submit(GenRequest(p, SamplingParams(temperature=0.0), NEW_TOKENS), sink)
    loop.run_until_idle()
    assert [got[i] for i in range(len(PROMPTS))] == ref.tokens
    assert calls[0] >= NEW_TOKENS - 1


def test_routing_cutoff_keeps_the_exchange_path(tiny_v3: Path) -> None:
    """The cutoff drops rows data-dependently, so such a model never takes the static MoE path."""
    model, _ = build(tiny_v3, EngineOptions(moe=MoEOptions(routing_cutoff=0.5)))
    moe = model.layers[-1].mlp
    assert not moe.local_only
    assert not moe._sync_free(torch.zeros(1, model.args.hidden_size), fixed_shape=True)


def test_graphs_refuse_what_they_cannot_run(tiny_v3: Path) -> None:
    model, cache = build(tiny_v3)
    with pytest.raises(ValueError, match="graph capture needs a cuda device or an npu"):
        DecodeGraphs(model, cache, 4, capture=True)
    two = ParallelPlan(2, 2, 1, 1, 2)  # rank 1 of a world of two: its MoE exchanges span both
    args = ModelArgs.from_dir(tiny_v3)
    wide = DeepseekModel(args, build_groups(two, 1, "gloo"), EngineOptions(mtp=True))
    # MTP draft steps take fixed shapes on a wider world too (test_decode_graphs_world_mtp.py),
    # compiled as well (test_decode_graphs_world.py runs compiled world-2 steps).
    graphs = DecodeGraphs(wide, wide.new_cache(2, MAX_LEN), 2, capture=False, draft_tokens=2)
    assert graphs.max_batch == 2 and graphs.width == 3 and set(graphs.inputs) == {"decode", "draft"}


def test_fixed_shape_steps_are_chosen_where_they_apply(tiny_v3: Path) -> None:
    """cpu: only torchCompile asks for them (no capture there), at every world size; never for a
    routing cutoff."""
    model, cache = build(tiny_v3)
    assert fixed_shape_decode(model, cache, EngineConfig(), 4) is None  # cudaGraphs, but cpu
    compiled = fixed_shape_decode(model, cache, EngineConfig(torchCompile=True), 4)
    assert compiled is not None and not compiled.capture and compiled.max_batch == 4
    cutoff = EngineConfig(torchCompile=True, enable_init_routing_cutoff=True)
    assert fixed_shape_decode(model, cache, cutoff, 4) is None
    wider = EngineConfig(torchCompile=True, worldSize=2, dp=2, moe_ep=2)
    assert fixed_shape_mode(wider, "cpu") == (False, "inductor")


@pytest.mark.parametrize("mtp", [False, True], ids=["plain", "mtp"])
def test_wider_worlds_capture_their_decode_steps(
    mtp: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """worldSize 2 on a GPU captures the decode steps, with MTP drafts too (they used to run
    eagerly there), compiled first where asked; only the routing cutoff, or a device without a
    graph API and no compile, runs them eagerly."""
    import sys

    wide = {"worldSize": 2, "dp": 2, "moe_ep": 2, "mtp": mtp, "num_speculative_tokens": 2}
    assert fixed_shape_mode(EngineConfig(**wide), "cuda") == (True, None)
    assert fixed_shape_mode(EngineConfig(**wide, torchCompile=True), "cuda") == (True, "inductor")
    assert fixed_shape_mode(EngineConfig(**wide, enable_init_routing_cutoff=True), "cuda") is None
    assert fixed_shape_mode(EngineConfig(**wide, cudaGraphs=False), "cuda") is None
    assert fixed_shape_mode(EngineConfig(**wide), "cpu") is None
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # an image without torch_npu
    assert fixed_shape_mode(EngineConfig(**wide), "npu") is None
    one = {k: v for k, v in wide.items() if k not in ("worldSize", "dp", "moe_ep")}
    assert fixed_shape_mode(EngineConfig(**one, torchCompile=True), "cuda") == (True, "inductor")


@pytest.mark.parametrize("path", ["grouped", "dense"])
def test_static_expert_paths_equal_the_expert_loop(path: str) -> None:
    torch.manual_seed(0)
    ex = LocalExperts(4, 0, 16, 8, torch.float32, torch.device("cpu"))
    ex.w13.normal_()
    ex.w2.normal_()
    x = torch.randn(9, 16)
    ids = torch.randint(0, 4, (9, 3))
    ids[ids == 2] = 1  # an expert with no rows
    weights = torch.rand(9, 3)
    rows = torch.arange(9).repeat_interleave(3)
    want = torch.zeros_like(x).index_add_(
        0, rows, ex(x[rows], ids.reshape(-1), grouped=False) * weights.reshape(-1, 1)
    )
    got = getattr(ex, f"combine_{path}")(x, ids, weights)
    torch.testing.assert_close(got, want)


def test_inductor_compiled_step(tiny_v3: Path, ref: Reference) -> None:
    """torchCompile's backend (inductor) on the CPU: the same greedy tokens."""
    model, cache = build(tiny_v3)
    graphs = DecodeGraphs(model, cache, 1, capture=False, compile_backend="inductor")
    prompt = PROMPTS[0]
    out = model.forward(Batch.build([(0, 0, prompt)], model.device), cache)
    tokens = [int(out.logits.argmax(-1))]
    for _ in range(NEW_TOKENS - 1):
        logits = graphs.run([0], [len(prompt) + len(tokens) - 1], [[tokens[-1]]])
        tokens.append(int(logits.argmax(-1)))
    assert tokens == ref.tokens[0]


@needs_cuda
def test_cuda_graphs_give_transformers_tokens(tiny_v3: Path, ref: Reference) -> None:
    """fp32 on the GPU: captured steps (dense expert path) against transformers on the CPU."""
    model, cache = build(tiny_v3, kind="cuda")
    graphs = DecodeGraphs(model, cache, 4, capture=True)
    assert greedy(model, cache, graphs) == ref.tokens
    assert set(graphs.graphs) == {("decode", 4, MAX_LEN)}


@needs_cuda
@pytest.mark.parametrize("backend", [None, "inductor"])
def test_cuda_graph_replay_equals_the_eager_step_in_bf16(
    tiny_v3: Path, backend: str | None
) -> None:
    """bf16 takes torch._grouped_mm; a replay must give the eager step's tokens and logits."""
    runs = []
    for capture in (False, True):
        model, cache = build(tiny_v3, kind="cuda", dtype=torch.bfloat16)
        graphs = DecodeGraphs(model, cache, 4, capture=capture, compile_backend=backend)
        runs.append(greedy(model, cache, graphs))
    assert runs[0] == runs[1]


def test_grouped_matmul_refused_by_the_device_falls_back_to_dense(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An old GPU refuses torch._grouped_mm at warm-up: the step goes on with the dense path."""
    from dsworker.model import experts

    def refuse(*a: object, **k: object) -> torch.Tensor:
        raise RuntimeError("grouped gemm is only supported on sm90")

    torch.manual_seed(0)
    ex = LocalExperts(4, 0, 16, 8, torch.float32, torch.device("cpu"))
    ex.w13.normal_()
    ex.w2.normal_()
    x, ids, weights = torch.randn(5, 16), torch.randint(0, 4, (5, 2)), torch.rand(5, 2)
    want = ex.combine_dense(x, ids, weights)
    monkeypatch.setattr(experts, "native_grouped_mm", lambda x: True)
    monkeypatch.setattr(torch, "_grouped_mm", refuse)
    torch.testing.assert_close(ex.combine(x, ids, weights), want)
    assert not ex._native_grouped


def test_compiled_step_traces_once_for_every_batch_bucket(tiny_v3: Path) -> None:
    """Symbolic sizes: buckets 2 and 4 share one trace, batch 1 gets its own; no more."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # forget the traces of other tests (the step's code object is shared)
    model, cache = build(tiny_v3)
    graphs = DecodeGraphs(model, cache, 4, capture=False, compile_backend="eager")
    before = counters["stats"]["unique_graphs"]
    for n in (1, 2, 3, 4, 1):
        logits = graphs.run(list(range(n)), [5] * n, [[7]] * n)
        assert logits.shape == (n, model.args.vocab_size)
    assert counters["stats"]["unique_graphs"] - before == 2
