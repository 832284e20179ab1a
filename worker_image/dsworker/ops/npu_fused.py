"""Ascend bodies of the routing, cache-store and BF16 expert ops through torch_npu (registered
import-guarded).

Each function has its op's exact signature (tests/worker/ops/test_npu_fused.py checks it against
the op schema) and is registered for the `npu` device by the op's module only where torch_npu
imports (`backends.npu_available() and quant_npu.load()`). UNTESTED numerically here (no Ascend
machine): run tests/worker/ops on a device to compare them with the references.

Sources (hiascend.com, torch_npu "PyTorch adapter" API reference, 7.0.0 unless noted):
- npu_moe_gating_top_k: ptaoplist pages of 7.0.0 (as ops/routing.py had it before this module).
- npu_rms_norm(self, gamma, epsilon=1e-06) -> (y, rstd), bf16/fp16/fp32, Atlas A2/A3:
  https://www.hiascend.com/document/detail/zh/Pytorch/700/apiref/apilist/ptaoplist_000860.html
- npu_scatter_nd_update_(input, indices, updates) -> input (in place; indices [N, a] int32/int64,
  updates [N, *input.shape[a:]], bf16 on Atlas A2/A3):
  https://www.hiascend.com/doc_center/source/zh/Pytorch/700/apiref/apilist/ptaoplist_001254.html
- npu.matmul.allow_hf32 (default False; True lets fp32 matmuls round operands to HF32), 7.2.0:
  https://www.hiascend.com/document/detail/zh/Pytorch/720/apiref/torchnpuCustomsapi/context/torch_npu-npu-matmul-allow_hf32.md
- npu_grouped_matmul (the BF16 experts, through quant_npu.grouped as the 8-bit ones): see
  ops/quant_npu.py; with neither scale nor antiquant_scale the weights are float, in x's dtype.
Not used: npu_fused_infer_attention_score for mla_decode (7.0.0, ptaoplist_001232). Its
actual_seq_lengths_kv is a host list (SymInt[]), so each step would read the lengths back to the
host, which NPU graph capture cannot replay (TorchAir's variant takes a device tensor, but only in
its own graph mode), and its MLA form (query_rope/key_rope) needs rank 512 and rope 64; the
reference (a page gather and two einsums, no host sync) serves NPUs and is captured with the step.
Not used: npu_kv_rmsnorm_rope_cache (7.0.0, ptaoplist_002368) fuses the whole cache store but
takes only rank 512 + rope 64, and CANN's aclnnKvRmsNormRopeCache page (8.3.RC1) lists Atlas A2
and A3 as unsupported; the engine must also run the tiny and small presets' dims.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from dsworker.ops import quant_npu
from dsworker.ops.mla_decode import rotate


@contextlib.contextmanager
def _full_fp32_matmul() -> Iterator[None]:
    """HF32 off for the duration: the router's logits are fp32 of fp32 operands, as transformers'."""
    mm = quant_npu._npu().npu.matmul
    was = mm.allow_hf32
    mm.allow_hf32 = False
    try:
        yield
    finally:
        mm.allow_hf32 = was


def router_logits_npu(x: torch.Tensor, gate: torch.Tensor) -> torch.Tensor:
    """fp32 matmul (the gate is held in fp32; x up-cast once), HF32 kept off."""
    with _full_fp32_matmul():
        return torch.mm(x.float(), gate.float().t())


def moe_route_npu(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int,
    topk_group: int,
    topk_method: str,
    score_func: str,
    norm_topk_prob: bool,
    routed_scaling_factor: float,
    n_shared: int = 0,
    shared_first: int = 0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """npu_moe_gating_top_k covers V3's rule (it always renormalises); others take the reference.
    The shared columns are appended after it."""
    from dsworker.ops.routing import _check, _check_shared, append_shared, route_reference

    _check(top_k, n_group, topk_group, topk_method, score_func)
    _check_shared(n_shared, shared_first)
    args = (top_k, n_group, topk_group, topk_method, score_func, norm_topk_prob)
    if topk_method != "noaux_tc" or bias is None or not norm_topk_prob or not logits.shape[0]:
        return route_reference(logits, bias, *args, routed_scaling_factor, n_shared, shared_first)
    weights, ids, _ = quant_npu._npu().npu_moe_gating_top_k(
        logits.float(),
        top_k,
        bias=bias.float(),
        k_group=topk_group,
        group_count=n_group,
        group_select_mode=1,  # groups ranked by the sum of their top two
        renorm=0,
        norm_type=1 if score_func == "sigmoid" else 0,
        out_flag=False,
        routed_scaling_factor=routed_scaling_factor,
        eps=1e-20,
    )
    return append_shared(weights.float(), ids.to(torch.int32), n_shared, shared_first)


def mla_cache_store_npu(
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
    """npu_rms_norm on the latent, the reference rotation on the rope half, then one
    npu_scatter_nd_update_ per cache into the layer's flattened pages (rows = `write`)."""
    from dsworker.ops.mla_cache import _check

    _check(kv_a, kv_cache, pe_cache, layer, write)
    rank = kv_cache.shape[-1]
    latent, k_pe = kv_a.split([rank, kv_a.shape[1] - rank], dim=-1)
    npu = quant_npu._npu()
    normed = npu.npu_rms_norm(latent, norm_weight.to(latent.dtype), epsilon=eps)[0]
    rotated = rotate(k_pe[:, None, :], cos, sin, interleave)[:, 0]
    rows = write.long()[:, None]  # [T, 1]: one flattened page row each
    npu.npu_scatter_nd_update_(kv_cache[layer].view(-1, rank), rows, normed.to(kv_cache.dtype))
    pe = pe_cache[layer].view(-1, pe_cache.shape[-1])
    npu.npu_scatter_nd_update_(pe, rows, rotated.to(pe_cache.dtype))


def moe_gate_up_npu(x: torch.Tensor, topk_ids: torch.Tensor, w13: torch.Tensor) -> torch.Tensor:
    """The (token, k) rows sorted by expert through one npu_grouped_matmul (-1 rows zero), then
    SiLU(gate) * up in x's dtype: no host sync, unlike the reference's loop over the experts."""
    from dsworker.ops.moe_experts import _check_ids

    _check_ids(topk_ids, w13.shape[0], "moe_gate_up")
    t, k = topk_ids.shape
    if not t:
        return x.new_zeros(0, k, w13.shape[1] // 2)
    rows = x[:, None, :].expand(t, k, x.shape[1]).reshape(t * k, x.shape[1])
    gate, up = quant_npu.grouped(rows, topk_ids, w13).chunk(2, dim=-1)
    return (F.silu(gate) * up).view(t, k, -1)


def moe_down_npu(
    h: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, w2: torch.Tensor
) -> torch.Tensor:
    """One npu_grouped_matmul over the sorted (token, k) rows, then the fp32 weighted sum over k."""
    from dsworker.ops.moe_experts import _check_ids

    _check_ids(topk_ids, w2.shape[0], "moe_down")
    t, k = topk_ids.shape
    if not t:
        return h.new_zeros(0, w2.shape[1])
    ys = quant_npu.grouped(h.reshape(t * k, h.shape[-1]), topk_ids, w2).view(t, k, -1)
    weights = topk_weights.float().masked_fill(topk_ids < 0, 0.0)
    return (ys.float() * weights[..., None]).sum(1).to(h.dtype)
