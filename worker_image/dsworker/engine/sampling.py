"""Turning one step's logits into next tokens: greedy, temperature, top-k and top-p with seeds,
and the verification of MTP drafts (speculative decoding).

Pure tensor math with no I/O, so unit tests pin it down exactly. Rank 0 samples on the device the
logits live on and moves only the chosen ids to the host; greedy rows are a single argmax.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from dsworker.engine.requests import SamplingParams, TokenLogprob


def make_generator(params: SamplingParams, device: torch.device | str = "cpu") -> torch.Generator:
    """A per-request generator: seeded requests repeat exactly, unseeded ones get a fresh seed."""
    g = torch.Generator(device=device)
    g.manual_seed(params.seed if params.seed is not None else random.getrandbits(63))
    return g


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float) -> torch.Tensor:
    """Mask (to -inf) the tokens outside top-k and outside the smallest top-p nucleus of one row.

    The most likely token always survives, so a row never ends up all -inf.
    """
    out = logits
    vocab = out.shape[-1]
    if 0 < top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Mass strictly before each token; keep tokens whose preceding mass is < top_p.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= top_p
        drop_sorted[..., 0] = False
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def sample_row(
    logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None
) -> torch.Tensor:
    """One token id (0-d tensor) from one row of logits [V]."""
    if params.greedy:
        return torch.argmax(logits, dim=-1)
    return torch.multinomial(_probs(logits, params), 1, generator=generator)[0]


def sample(
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
) -> list[int]:
    """Next token per row of `logits` [B, V]; rows are independent and seeded per request."""
    if logits.dim() != 2 or logits.shape[0] != len(params) or len(params) != len(generators):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(params)} params/"
            f"{len(generators)} generators"
        )
    if not params:
        return []
    greedy = [i for i, p in enumerate(params) if p.greedy]
    if len(greedy) == len(params):  # the common case: one kernel, one device->host copy
        return torch.argmax(logits, dim=-1).tolist()
    out = torch.empty(len(params), dtype=torch.long, device=logits.device)
    if greedy:
        idx = torch.tensor(greedy, device=logits.device)
        out[idx] = torch.argmax(logits.index_select(0, idx), dim=-1)
    for i, p in enumerate(params):
        if not p.greedy:
            out[i] = sample_row(logits[i], p, generators[i])
    return out.tolist()


def _probs(rows: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution a sampled request draws from: temperature, then top-k/top-p."""
    scaled = filter_logits(rows.float() / params.temperature, params.top_k, params.top_p)
    return torch.softmax(scaled, dim=-1)


def _accept_greedy(best: list[int], drafts: tuple[int, ...]) -> list[int]:
    """best[j] is the argmax after input j; a draft survives while it equals the one before."""
    out = [best[0]]
    for j, d in enumerate(drafts):
        if d != out[-1]:
            break
        out.append(best[j + 1])
    return out


def _accept_sampled(
    rows: torch.Tensor,
    drafts: tuple[int, ...],
    params: SamplingParams,
    generator: torch.Generator | None,
) -> list[int]:
    """Speculative sampling with a deterministic draft: keep draft d with probability p(d), else
    draw from p without d; the emitted tokens are distributed exactly as plain sampling's."""
    probs = _probs(rows, params)
    out: list[int] = []
    for j, d in enumerate(drafts):
        u = torch.rand((), generator=generator, device=probs.device)
        if bool(u < probs[j, d]):
            out.append(d)
            continue
        rest = probs[j].clone()
        rest[d] = 0.0
        out.append(int(torch.multinomial(rest, 1, generator=generator)[0]))
        return out
    out.append(int(torch.multinomial(probs[len(drafts)], 1, generator=generator)[0]))
    return out


def adjust_logits(
    rows: torch.Tensor, generated: Sequence[int], drafts: Sequence[int], params: SamplingParams
) -> torch.Tensor:
    """OpenAI's logit bias, presence and frequency penalties and vLLM's min_tokens on one item's
    rows (fp32 copy): row j follows the tokens generated so far plus the item's first j drafts."""
    out = rows.float().clone()
    vocab = out.shape[-1]
    if params.logit_bias:
        ids = torch.tensor([t for t, _ in params.logit_bias], dtype=torch.long, device=out.device)
        bias = torch.tensor([b for _, b in params.logit_bias], dtype=out.dtype, device=out.device)
        out[:, ids] += bias
    if params.min_tokens and params.stops:
        early = params.min_tokens - len(generated)  # rows whose token would come too soon
        if early > 0:
            ids = torch.tensor(sorted(params.stops), dtype=torch.long, device=out.device)
            out[:early, ids] = float("-inf")
    if not (params.presence_penalty or params.frequency_penalty):
        return out
    seen = list(generated)
    for j in range(out.shape[0]):
        if j:
            seen.append(drafts[j - 1])
        if not seen:
            continue
        ids = torch.tensor(seen, dtype=torch.long, device=out.device)
        counts = torch.bincount(ids, minlength=vocab)[:vocab].to(out.dtype)
        out[j] -= params.frequency_penalty * counts + params.presence_penalty * (counts > 0)
    return out


Mask = Callable[[torch.Tensor], torch.Tensor]  # rows -> a copy with ruled-out tokens at -inf


def _constrain(
    raw: torch.Tensor, rows: torch.Tensor, mask: Mask, params: SamplingParams
) -> torch.Tensor:
    """`rows` (the adjusted `raw`) under a grammar's mask, which wins over the adjustments.

    Where min_tokens rules out the only tokens the grammar allows (EOS once it is complete), the
    grammar's choice stands on the unadjusted logits; where no token of the vocabulary continues
    the grammar at all, the rows go unmasked and the caller ends the sequence on the token that
    its grammar refuses (a distribution with nothing left would fail to sample)."""
    out = mask(rows)
    if bool(torch.isneginf(out).all(dim=-1).any()):
        out = mask(raw) if params.adjusted else out
        if bool(torch.isneginf(out).all(dim=-1).any()):
            return raw
    return out


def verify(
    logits: torch.Tensor,
    drafts: list[tuple[int, ...]],
    params: list[SamplingParams],
    generators: list[torch.Generator | None],
    generated: Sequence[Sequence[int]] | None = None,
    masks: Sequence[Mask | None] | None = None,
) -> list[list[int]]:
    """Tokens each item emits from its 1 + len(drafts) rows of `logits` (items back to back).

    Row j of an item holds the logits after its j-th input (the last real token, then each
    draft). `generated` (each item's tokens so far) feeds the penalties of requests that set
    them; `masks` (guided decoding) rules tokens out of an item's rows after every adjustment.
    Without drafts, penalties, logit bias or masks this is `sample`: one token per item.
    """
    n_rows = sum(1 + len(d) for d in drafts)
    if (
        logits.dim() != 2
        or logits.shape[0] != n_rows
        or not (len(drafts) == len(params) == len(generators))
        or (masks is not None and len(masks) != len(params))
    ):
        raise ValueError(
            f"logits {tuple(logits.shape)} do not match {len(drafts)} items with {n_rows} rows"
        )
    masks = masks or [None] * len(params)
    if not any(drafts) and not any(p.adjusted for p in params) and not any(masks):
        return [[t] for t in sample(logits, params, generators)]
    best = torch.argmax(logits, dim=-1).tolist()
    out: list[list[int]] = []
    at = 0
    for i, (d, p, g, m) in enumerate(zip(drafts, params, generators, masks, strict=True)):
        span = slice(at, at + 1 + len(d))
        rows = logits[span]
        if p.adjusted:
            rows = adjust_logits(rows, generated[i] if generated else (), d, p)
        if m is not None:
            rows = _constrain(logits[span], rows, m, p)
        if p.greedy:
            changed = p.adjusted or m is not None
            out.append(_accept_greedy(rows.argmax(-1).tolist() if changed else best[span], d))
        else:
            out.append(_accept_sampled(rows, d, p, g))
        at += 1 + len(d)
    return out


def token_logprobs(rows: torch.Tensor, tokens: Sequence[int], top: int) -> list[TokenLogprob]:
    """rows[j]: the logits tokens[j] was chosen from. Log-probabilities are the model's own
    (before temperature, top-k and top-p, as vLLM reports them), with `top` alternatives each."""
    lp = torch.log_softmax(rows.float(), dim=-1)
    index = torch.tensor(list(tokens), dtype=torch.long, device=lp.device)[:, None]
    chosen = lp.gather(1, index)[:, 0].tolist()
    alts: list[tuple[tuple[int, float], ...]] = [()] * len(chosen)
    if top > 0:
        values, ids = lp.topk(min(top, lp.shape[-1]), dim=-1)
        alts = [
            tuple(zip(i, v, strict=True))
            for i, v in zip(ids.tolist(), values.tolist(), strict=True)
        ]
    return [TokenLogprob(t, c, a) for t, c, a in zip(tokens, chosen, alts, strict=True)]
