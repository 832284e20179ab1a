"""`dsworker::mla_cache_store`: a step's MLA cache entries written in one op.

The latent half of kv_a_proj's output is normalised (kv_a_layernorm), the rope half is rotated by
its position's cos/sin, and both land in their paged cache rows. The normalised latent is needed
nowhere else (absorbed attention reads it back from the cache), so one pass over the row replaces
a norm, the rope's slices and products, and two scattered writes. Numerics are model/layers.py's
norm and Rope.apply's rotation: fp32 inside, rounded to the cache dtype once.
"""

import torch

from dsworker.ops import backends, npu_fused, quant_npu
from dsworker.ops.mla_decode import rotate
from dsworker.ops.norm import rms_norm_reference


def _check(
    kv_a: torch.Tensor, kv: torch.Tensor, pe: torch.Tensor, layer: int, write: torch.Tensor
) -> None:
    if kv.dim() != 4 or pe.shape[:3] != kv.shape[:3] or not 0 <= layer < kv.shape[0]:
        raise ValueError(
            f"mla_cache_store: caches [layers, pages, page_size, rank|rope] and a layer in "
            f"range expected, got kv {tuple(kv.shape)}, pe {tuple(pe.shape)}, layer {layer}"
        )
    if kv_a.dim() != 2 or kv_a.shape[1] != kv.shape[-1] + pe.shape[-1]:
        raise ValueError(
            f"mla_cache_store: kv_a [T, rank + rope] = [T, {kv.shape[-1]} + {pe.shape[-1]}] "
            f"expected, got {tuple(kv_a.shape)}"
        )
    if write.shape != kv_a.shape[:1]:
        raise ValueError(f"mla_cache_store: write {tuple(write.shape)} for {kv_a.shape[0]} rows")


def store_reference(
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    layer: int,
    write: torch.Tensor,
    interleave: bool,
) -> None:
    """Norm, rotate, then index_put into the flattened pages of `layer`."""
    kv_cache, pe_cache = kv_cache[layer], pe_cache[layer]
    rank = kv_cache.shape[-1]
    latent, k_pe = kv_a.split([rank, kv_a.shape[1] - rank], dim=-1)
    normed = rms_norm_reference(latent, norm_weight, eps)
    rotated = rotate(k_pe[:, None, :], cos, sin, interleave)[:, 0]
    kv_cache.view(-1, rank)[write] = normed.to(kv_cache.dtype)
    pe_cache.view(-1, pe_cache.shape[-1])[write] = rotated.to(pe_cache.dtype)


@torch.library.custom_op("dsworker::mla_cache_store", mutates_args=("kv_cache", "pe_cache"))
def mla_cache_store(
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    layer: int,
    write: torch.Tensor,
    interleave: bool,
) -> None:
    """kv_a [T, rank + rope] (kv_a_proj_with_mqa's output), norm_weight [rank], cos/sin
    [T, rope/2] of each row's position, kv_cache [L, P, page, rank] and pe_cache [L, P, page, rope]
    (every layer of KVCache: the op mutates its inputs themselves, never views of them, which
    inductor has been seen to write back wrongly), layer (the one written), write [T] (each row's
    index in that layer's flattened pages)."""
    _check(kv_a, kv_cache, pe_cache, layer, write)
    store_reference(kv_a, norm_weight, eps, cos, sin, kv_cache, pe_cache, layer, write, interleave)


@mla_cache_store.register_fake
def _mla_cache_store_fake(
    kv_a: torch.Tensor,
    norm_weight: torch.Tensor,
    eps: float,
    cos: torch.Tensor,
    sin: torch.Tensor,
    kv_cache: torch.Tensor,
    pe_cache: torch.Tensor,
    layer: int,
    write: torch.Tensor,
    interleave: bool,
) -> None:
    return None


if backends.triton_available():

    @mla_cache_store.register_kernel("cuda")
    def _mla_cache_store_cuda(
        kv_a: torch.Tensor,
        norm_weight: torch.Tensor,
        eps: float,
        cos: torch.Tensor,
        sin: torch.Tensor,
        kv_cache: torch.Tensor,
        pe_cache: torch.Tensor,
        layer: int,
        write: torch.Tensor,
        interleave: bool,
    ) -> None:
        from dsworker.ops.triton.mla_cache import mla_cache_store_triton

        _check(kv_a, kv_cache, pe_cache, layer, write)
        mla_cache_store_triton(
            kv_a, norm_weight, eps, cos, sin, kv_cache[layer], pe_cache[layer], write, interleave
        )


if backends.npu_available() and quant_npu.load():
    mla_cache_store.register_kernel("npu")(npu_fused.mla_cache_store_npu)
