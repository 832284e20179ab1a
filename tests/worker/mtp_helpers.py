"""Helpers of the MTP tests: a checkpoint whose MTP layer agrees with the main model, and the
spawned ranks of the multi-rank MTP tests (eager against fixed-shape decode and draft steps).

Importable by name (spawn pickles `compare_mtp_runs` by reference), like engine_helpers.
"""

from __future__ import annotations

import faulthandler
import json
import shutil
from pathlib import Path
from typing import Any

import torch
from engine_helpers import NEW_TOKENS, PROMPTS
from safetensors.torch import load_file, save_file
from serving_helpers import counter, serve, use_fixed_steps

from dsworker.contract.engine_config import EngineConfig
from dsworker.engine.loop import follow
from dsworker.engine.rank_setup import Loaded, build_runner
from dsworker.engine.requests import GenRequest, SamplingParams
from dsworker.engine.step_wire import STOP, Message
from dsworker.model import Batch, ExpertBufferOverflow
from dsworker.model.decode_graphs import DecodeGraphs


def agreeing_mtp_copy(src: Path, dst: Path) -> Path:
    """A checkpoint whose MTP layer predicts exactly what the main model will say next.

    Attention outputs are zeroed everywhere and every main layer but the last is an identity, so
    the main model's next token is a function F of the current token alone; the MTP block is a
    copy of that last layer fed the (unit-RMS) embedding of the token it is given, so its draft is
    F of the token after, which is what the main model computes one position later.
    """
    shutil.copytree(src, dst)
    cfg = json.loads((src / "config.json").read_text())
    last, mtp = cfg["num_hidden_layers"] - 1, cfg["num_hidden_layers"]
    files = sorted(dst.glob("*.safetensors"))
    tensors = {f: load_file(f) for f in files}
    every = {k: v for t in tensors.values() for k, v in t.items()}
    emb = every["model.embed_tokens.weight"].float()
    emb = (emb / emb.pow(2).mean(-1, keepdim=True).sqrt()).to(every["model.embed_tokens.weight"])
    h = emb.shape[1]
    want: dict[str, torch.Tensor] = {
        "model.embed_tokens.weight": emb,
        f"model.layers.{mtp}.embed_tokens.weight": emb.clone(),
        f"model.layers.{mtp}.enorm.weight": torch.ones_like(
            every[f"model.layers.{mtp}.enorm.weight"]
        ),
        f"model.layers.{mtp}.eh_proj.weight": torch.cat([torch.eye(h), torch.zeros(h, h)], 1).to(
            emb
        ),
        f"model.layers.{mtp}.shared_head.norm.weight": every["model.norm.weight"].clone(),
        f"model.layers.{mtp}.shared_head.head.weight": every["lm_head.weight"].clone(),
    }
    for name, t in every.items():
        layer = name.split(".")[2] if name.startswith("model.layers.") else None
        if name.endswith("self_attn.o_proj.weight") or (
            layer is not None and int(layer) < last and name.endswith("down_proj.weight")
        ):
            want[name] = torch.zeros_like(t)
        prefix = f"model.layers.{last}."
        if name.startswith(prefix) and not name.endswith("o_proj.weight"):
            want[f"model.layers.{mtp}." + name[len(prefix) :]] = t.clone()
    for f, t in tensors.items():
        save_file({k: want.get(k, v).contiguous() for k, v in t.items()}, str(f))
    return dst


def steps_when_all_drafts_hold(drafts: int) -> int:
    """Prefill (the first token), then 1 + drafts tokens a step for the rest."""
    return 1 + -(-(NEW_TOKENS - 1) // (1 + drafts))


def _record_fixed_steps(loaded: Loaded) -> dict[str, list[Any]]:
    """Each fixed-shape decode step's sequences on this rank (0: it ran the padded step), and
    the (kind, batch, keys) bucket of every fixed-shape step it launched."""
    graphs = loaded.runner.graphs
    assert graphs is not None
    seen: dict[str, list[Any]] = {"seqs": [], "launches": []}
    run, launch = graphs.run, graphs._launch

    def recorded(slots: list[int], *a: Any, **kw: Any) -> torch.Tensor:
        seen["seqs"].append(len(slots))
        return run(slots, *a, **kw)

    def launched(kind: str, b: int, k: int) -> torch.Tensor:
        seen["launches"].append([kind, b, k])
        return launch(kind, b, k)

    graphs.run = recorded  # type: ignore[method-assign]
    graphs._launch = launched  # type: ignore[method-assign]
    return seen


def _serve_recorded(loaded: Loaded, cfg: EngineConfig) -> tuple[dict[str, Any], list[torch.Tensor]]:
    """Rank 0: every prompt greedily through the loop; what it saw, and each step's logits."""
    logits: list[torch.Tensor] = []
    run = loaded.runner.run

    def recorded(step: Any) -> torch.Tensor | None:
        out = run(step)
        if out is not None:
            logits.append(out.float().cpu().clone())
        return out

    loaded.runner.run = recorded  # type: ignore[method-assign]
    errors: list[str] = []
    greedy = SamplingParams(temperature=0.0)
    requests = [GenRequest(p, greedy, NEW_TOKENS) for p in PROMPTS]
    outs, metrics, steps = serve(loaded, cfg, requests, errors=errors)
    loaded.channel.send(Message(STOP))
    record = {
        "tokens": [[t for o in mine for t in o.token_ids] for mine in outs],
        "drafted": counter(metrics, "dsworker_spec_draft_tokens_total"),
        "accepted": counter(metrics, "dsworker_spec_accepted_tokens_total"),
        "steps": steps,
        "errors": errors,
    }
    return record, logits


def compare_mtp_runs(
    rank: int,
    nproc: int,
    ckpts: dict[str, str],
    configs: dict[str, str],
    out: str,
    overflow: tuple[str, str] | None = None,
) -> None:
    """One rank: each scenario's prompts through the serving loop (rank 0; the others follow its
    messages), with eager steps and then with the fixed-shape decode and draft steps (eager on
    cpu, or inductor-compiled where the config sets torchCompile). Rank 0 writes what it saw and each step's logits; every rank its fixed steps. Then, with
    `overflow` (checkpoint, config), `draft_overflow` (one spawn saves the start-up's seconds)."""
    faulthandler.enable()
    for name, cfg_json in configs.items():
        cfg = EngineConfig.model_validate_json(cfg_json)
        record: dict[str, Any] = {}
        logits: dict[str, torch.Tensor] = {}
        for mode in ("eager", "fixed"):
            loaded = build_runner(Path(ckpts[name]), cfg, rank=rank, world_size=nproc,
                                  local_rank=rank, local_world_size=nproc)  # fmt: skip
            calls: dict[str, int] = {}
            if mode == "eager":
                loaded.runner.graphs = None  # torchCompile's scenarios compile the fixed ones
            else:
                fixed = "inductor" if cfg.torchCompile else "eager-step"
                use_fixed_steps(loaded.runner, cfg, fixed, calls)
                record["fixed_steps"] = _record_fixed_steps(loaded)
            if rank != 0:
                follow(loaded.runner, loaded.channel)
            else:
                record[mode], steps = _serve_recorded(loaded, cfg)
                logits |= {f"{mode}.{i}": t for i, t in enumerate(steps)}
            record[f"{mode}_calls"] = calls
        (Path(out) / f"{name}.{rank}.json").write_text(json.dumps(record))
        if rank == 0:
            save_file(logits, str(Path(out) / f"{name}.safetensors"))
    if overflow is not None:
        record = draft_overflow(rank, nproc, *overflow)
        (Path(out) / f"draft-overflow.{rank}.json").write_text(json.dumps(record))


def draft_overflow(rank: int, nproc: int, ckpt: str, cfg_json: str) -> dict[str, Any]:
    """Fixed-shape decode steps that fit the EP level 2 buffers, each followed by a draft step
    whose chained MTP pass (fewer tokens, a tighter factor) would not. Mid-sequence, with drafts
    for dp group 0 only (the others' rows are padding, sending nothing), it is refused ("mid":
    the refusal); at the cache's end every chained row is padding, so the step runs ("end": its
    refusal, None, and the drafts' lengths)."""
    cfg = EngineConfig.model_validate_json(cfg_json)
    loaded = build_runner(Path(ckpt), cfg, rank=rank, world_size=nproc, local_rank=rank,
                          local_world_size=nproc)  # fmt: skip
    model, d, max_len = loaded.runner.model, cfg.num_speculative_tokens, cfg.maxSeqLen
    graphs = DecodeGraphs(model, model.new_cache(4, max_len), 4, capture=False, draft_tokens=d)
    dp, me = cfg.dp, model.groups.coords.dp_rank
    mine = [i for i in range(len(PROMPTS)) if i % dp == me]
    model.forward(Batch.build([(i // dp, 0, PROMPTS[i]) for i in mine], model.device), graphs.cache)
    rows = max(sum(1 for i in range(len(PROMPTS)) if i % dp == g) for g in range(dp))
    record: dict[str, Any] = {}
    for where, starts in (
        ("mid", [len(PROMPTS[i]) for i in mine]),
        ("end", [max_len - 1 - d for _ in mine]),  # the last draft row reads the last position
    ):
        reach = max(map(len, PROMPTS)) + 1 + d if where == "mid" else max_len
        graphs.run([i // dp for i in mine], starts, [[7, *[5] * d] for _ in mine], rows=rows,
                   reach=reach)  # fmt: skip
        given = [*[5] * d, 9] if where == "end" or me == 0 else None
        try:
            record[f"{where}_drafts"] = [len(t) for t in graphs.draft([given] * len(mine))]
            record[where] = None
        except ExpertBufferOverflow as e:
            record[where] = str(e)
    return record
