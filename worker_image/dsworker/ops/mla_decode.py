"""`dsworker::mla_decode`: absorbed MLA decode attention over the paged latent cache in one op.

The cache (model/batch.py KVCache) holds per position the normalised latent c [kv_rank] and the
rope key k_pe [rope_dim], already rotated and, for interleaved rope, stored as [even | odd] halves.
A query row's score of position j is (q_nope·W_UK)·c_j + rope(q_pe)·k_pe_j, and its output
sum_j p_j c_j stays in latent space (W_UV is applied by the caller, as in model/attention.py).
Rope of the query happens inside the op from the row's cos/sin; pass cos=sin=None when q_pe is
already rotated. The key rope cannot move inside: the cache must hold rotated keys (positions
differ per key and the cache is written once), exactly as the engine stores them.
"""

import torch

from dsworker.ops import backends


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, interleave: bool) -> torch.Tensor:
    """Rope.apply's rotation of x [N, H, dim] by per-row cos/sin [N, dim/2]: [even|odd] output."""
    c, s = cos.float()[:, None, :], sin.float()[:, None, :]
    xf = x.float()
    a, b = (xf[..., 0::2], xf[..., 1::2]) if interleave else xf.chunk(2, dim=-1)
    return torch.cat((a * c - b * s, b * c + a * s), dim=-1).to(x.dtype)


def mla_decode_reference(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    interleave: bool,
) -> torch.Tensor:
    """Gather each row's pages, fp32 scores and softmax, fp32 weighted latents; no host sync."""
    if cos is not None and sin is not None:
        q_pe = rotate(q_pe, cos, sin, interleave)
    rows, cols = page_table.shape
    page = kv_cache.shape[1]
    keys = kv_cache[page_table].reshape(rows, cols * page, -1).float()
    keys_pe = pe_cache[page_table].reshape(rows, cols * page, -1).float()
    scores = torch.einsum("nhc,nkc->nhk", q_nope.float(), keys)
    scores = (scores + torch.einsum("nhr,nkr->nhk", q_pe.float(), keys_pe)) * softmax_scale
    visible = torch.arange(cols * page, device=keys.device)[None, :] < lengths[:, None]
    scores = scores.masked_fill(~visible[:, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).nan_to_num(0.0)  # a row with no keys gives zeros
    return torch.einsum("nhk,nkc->nhc", probs, keys).to(q_nope.dtype).contiguous()


def _check(q_nope: torch.Tensor, q_pe: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor) -> None:
    if q_nope.dim() != 3 or q_pe.shape[:2] != q_nope.shape[:2]:
        raise ValueError(f"mla_decode: q_nope {tuple(q_nope.shape)} / q_pe {tuple(q_pe.shape)}")
    if kv.dim() != 3 or pe.shape[:2] != kv.shape[:2] or kv.shape[-1] != q_nope.shape[-1]:
        raise ValueError(
            f"mla_decode: caches [pages, page_size, rank|rope] expected, got kv "
            f"{tuple(kv.shape)}, pe {tuple(pe.shape)} for q rank {q_nope.shape[-1]}"
        )
    if pe.shape[-1] != q_pe.shape[-1] or pe.shape[-1] % 2:
        raise ValueError(f"mla_decode: rope dims q {q_pe.shape[-1]} vs cache {pe.shape[-1]}")


@torch.library.custom_op("dsworker::mla_decode", mutates_args=())
def mla_decode(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    interleave: bool,
) -> torch.Tensor:
    """Attention of N query rows over their sequences' cached latents -> [N, H, kv_rank].

    q_nope [N, H, rank] (already absorbed: q_nope·W_UK), q_pe [N, H, rope] (un-rotated when
    cos/sin [N, rope/2] are given), kv_cache [P, page, rank] and pe_cache [P, page, rope] (one
    layer of KVCache), page_table [N, n] (the pages of each row's sequence, in order), lengths [N]
    (keys visible to each row: its position + 1). A row with length 0 gives zeros.
    """
    _check(q_nope, q_pe, kv_cache, pe_cache)
    return mla_decode_reference(
        q_nope, q_pe, kv_cache, pe_cache, page_table, lengths, softmax_scale, cos, sin, interleave
    )


@mla_decode.register_fake
def _mla_decode_fake(
    q_nope: torch.Tensor,
    q_pe: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    page_table: torch.Tensor,
    lengths: torch.Tensor,
    softmax_scale: float,
    cos: torch.Tensor | None,
    sin: torch.Tensor | None,
    interleave: bool,
) -> torch.Tensor:
    """Contiguous, as every implementation returns it, whatever q_nope's strides (compiled steps
    check the real output's strides against this)."""
    return q_nope.new_empty(q_nope.shape)


if backends.triton_available():

    @mla_decode.register_kernel("cuda")
    def _mla_decode_cuda(
        q_nope: torch.Tensor,
        q_pe: torch.Tensor,
        kv_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        page_table: torch.Tensor,
        lengths: torch.Tensor,
        softmax_scale: float,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
        interleave: bool,
    ) -> torch.Tensor:
        from dsworker.ops.triton.mla_decode import mla_decode_triton

        _check(q_nope, q_pe, kv_cache, pe_cache)
        return mla_decode_triton(
            q_nope,
            q_pe,
            kv_cache,
            pe_cache,
            page_table,
            lengths,
            softmax_scale,
            cos,
            sin,
            interleave,
        )
