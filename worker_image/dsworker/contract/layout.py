"""The parallel plan and the split rules of the "dsop-sharded/1" layout, as pure functions.

The sharder, the loader, the merge/reshard tools and the operator's config checks all decide
"which rank holds which slice of which tensor" here, so they can never disagree. No I/O, no
numpy, no torch: the operator image imports this module too. PlanError (contract.errors),
ModelDims (contract.model_config) and ParallelPlan (contract.parallel_plan) are imported here for
the split rules and their callers.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from dsworker.contract.errors import PlanError
from dsworker.contract.model_config import FP8_BLOCK, ModelDims
from dsworker.contract.parallel_plan import ParallelPlan, moe_dir, rank_dir

FORMAT = "dsop-sharded/1"
METADATA_FILE = "model_sharded_metadata.json"
COMPLETE_MARKER = "_COMPLETE"

# Directory groups of SHARDED_FORMAT.md.
VOCAB = "vocab"  # model-{rank}: embed_tokens / lm_head, split over tp on dim 0
NORM = "norm"  # model-norm: replicated everywhere
ATTN = "attn"  # model-attn-tp-{tp_rank}
DENSE = "dense"  # model-dense-tp-{tp_rank}: dense MLP and shared experts
MOE = "moe"  # model-moe-tp-{moe_tp_rank}-ep-{moe_ep_rank}: routed experts


@dataclass(frozen=True)
class Placement:
    """Where a module's weight goes: its directory group, split dim (None = whole) and expert."""

    group: str
    dim: int | None
    expert: int | None = None


_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")
_EXPERT = re.compile(r"^mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)$")
# Companion suffixes that travel with "<module>.weight".
WEIGHT_SUFFIXES = (
    ".weight_scale_inv",
    ".weight_packed",
    ".qweight",
    ".weight_shape",
    ".weight_scale",
    ".weight_offset",
    ".input_scale",  # static W8A8 (contract.quant.STATIC_COMPANIONS): [1], whole on every rank
    ".input_offset",
    ".quant_bias",  # [N]: split with a dim-0 split, whole with a dim-1 split
    ".deq_scale",
    ".weight",
)


def split_name(name: str) -> tuple[str, str]:
    """'a.b.weight_scale_inv' -> ('a.b', 'weight_scale_inv'); other tensors -> (name, '')."""
    for suf in WEIGHT_SUFFIXES:
        if name.endswith(suf):
            return name[: -len(suf)], suf[1:]
    if name.endswith(".bias"):
        return name[:-5], "bias"
    return name, ""


def layer_index(name: str) -> int | None:
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def is_mtp(name: str, dims: ModelDims) -> bool:
    """MTP tensors live under layer index >= num_hidden_layers."""
    idx = layer_index(name)
    return idx is not None and idx >= dims.num_hidden_layers


def place(name: str, dims: ModelDims) -> Placement:
    """The directory group and split dim of a tensor (companions share their weight's placement)."""
    module, _ = split_name(name)
    if module in ("model.embed_tokens", "lm_head"):
        return Placement(VOCAB, 0)
    m = _LAYER.match(module)
    if not m:
        return Placement(NORM, None)  # model.norm and anything global
    layer, rest = int(m.group(1)), m.group(2)
    if rest in ("embed_tokens", "shared_head.head"):  # MTP's own vocab tensors
        return Placement(VOCAB, 0)
    if rest.startswith("self_attn."):
        sub = rest[len("self_attn.") :]
        if sub in ("q_b_proj", "q_proj", "kv_b_proj"):
            return Placement(ATTN, 0)
        if sub == "o_proj":
            return Placement(ATTN, 1)
        return Placement(NORM, None)  # q_a_proj, kv_a_proj_with_mqa and their norms
    em = _EXPERT.match(rest)
    if em:
        return Placement(MOE, 0 if em.group(2) != "down_proj" else 1, expert=int(em.group(1)))
    if rest.startswith("mlp.shared_experts.") or (
        rest.startswith("mlp.") and layer < dims.first_k_dense_replace
    ):
        proj = rest.rsplit(".", 1)[-1]
        if proj in ("gate_proj", "up_proj"):
            return Placement(DENSE, 0)
        if proj == "down_proj":
            return Placement(DENSE, 1)
    return Placement(NORM, None)  # norms, router gate and bias, MTP enorm/hnorm/eh_proj


def parts_for(group: str, plan: ParallelPlan) -> int:
    """How many slices a split tensor of this group has."""
    return {VOCAB: plan.tp, NORM: 1, ATTN: plan.tp, DENSE: plan.tp, MOE: plan.moe_tp}[group]


def owner_dirs(placement: Placement, dims: ModelDims, plan: ParallelPlan) -> list[tuple[str, int]]:
    """(directory, part index) for every copy of a tensor with this placement."""
    g = placement.group
    if g == NORM:
        return [("model-norm", 0)]
    if g == VOCAB:
        return [(rank_dir(r), r % plan.tp) for r in range(plan.world_size)]
    if g in (ATTN, DENSE):
        return [(f"model-{g}-tp-{t:03d}", t) for t in range(plan.tp)]
    assert placement.expert is not None
    per = dims.n_routed_experts // plan.moe_ep
    ep = placement.expert // per
    return [(moe_dir(t, ep), t) for t in range(plan.moe_tp)]


@dataclass(frozen=True)
class Slice:
    """One tensor's cut: take [start, stop) on `dim` (dim None = the whole tensor)."""

    dim: int | None
    start: int
    stop: int


def tensor_slice(
    name: str, shape: tuple[int, ...] | list[int], placement: Placement, part: int, parts: int
) -> Slice:
    """The slice of tensor `name` (a weight or a companion) that part `part` of `parts` holds.

    Companions follow their weight: FP8 block scales split in whole blocks along the same dim,
    per-channel [out, 1] scales (and static W8A8's [out] deq_scale and quant_bias) split with a
    dim-0 split and stay whole with a dim-1 split, per-tensor [1] input scales stay whole, W8A16
    packed int32 columns split by 4-column words. Raises PlanError naming the tensor and dim.
    """
    shape = tuple(shape)
    d = placement.dim
    _, suffix = split_name(name)
    if d is None or parts == 1 or suffix == "weight_shape" or len(shape) <= d or shape[d] == 1:
        return Slice(None, 0, shape[d] if d is not None and len(shape) > d else 0)
    n = shape[d]
    if n % parts:
        raise PlanError(
            f"tensor {name}: dim {d} of size {n} does not divide into {parts} parts; "
            f"choose a tp/moeTp that divides {n}"
        )
    step = n // parts
    return Slice(d, part * step, (part + 1) * step)


def local_shape(shape: tuple[int, ...] | list[int], sl: Slice) -> tuple[int, ...]:
    out = list(shape)
    if sl.dim is not None:
        out[sl.dim] = sl.stop - sl.start
    return tuple(out)


def check_plan(dims: ModelDims, plan: ParallelPlan) -> list[str]:
    """Every way `plan` fails to divide the model, as messages naming the field and the fix."""
    errs: list[str] = []

    def need(value: int, by: int, what: str, field: str) -> None:
        if value % by:
            errs.append(
                f"{what} ({value}) is not divisible by {field} ({by}); choose a {field} that divides {value}"
            )

    need(dims.num_attention_heads, plan.tp, "num_attention_heads", "tp")
    need(dims.vocab_size, plan.tp, "vocab_size", "tp")
    need(dims.intermediate_size, plan.tp, "intermediate_size (dense MLP)", "tp")
    if dims.n_shared_experts:
        need(
            dims.n_shared_experts * dims.moe_intermediate_size,
            plan.tp,
            "n_shared_experts*moe_intermediate_size (shared experts)",
            "tp",
        )
    need(dims.moe_intermediate_size, plan.moe_tp, "moe_intermediate_size (routed experts)", "moeTp")
    need(dims.n_routed_experts, plan.moe_ep, "n_routed_experts", "moeEp")
    if dims.fp8_block:
        blk = dims.fp8_block[0]
        n, dn, dr, dv = (
            dims.num_attention_heads,
            dims.qk_nope_head_dim,
            dims.qk_rope_head_dim,
            dims.v_head_dim,
        )
        checks = [
            ("intermediate_size", dims.intermediate_size, plan.tp, "tp"),
            ("moe_intermediate_size", dims.moe_intermediate_size, plan.moe_tp, "moeTp"),
        ]
        if dims.n_shared_experts:
            shared = dims.n_shared_experts * dims.moe_intermediate_size
            checks.append(("n_shared_experts*moe_intermediate_size", shared, plan.tp, "tp"))
        if dn and dr and dv:
            checks += [
                (
                    "q_b_proj rows num_attention_heads*(qk_nope+qk_rope)",
                    n * (dn + dr),
                    plan.tp,
                    "tp",
                ),
                (
                    "kv_b_proj rows num_attention_heads*(qk_nope+v_head_dim)",
                    n * (dn + dv),
                    plan.tp,
                    "tp",
                ),
                ("o_proj columns num_attention_heads*v_head_dim", n * dv, plan.tp, "tp"),
            ]
        for what, size, parts, field in checks:
            if parts > 1 and size % parts == 0 and (size // parts) % blk:
                errs.append(
                    f"FP8 block quantisation: {what}/{field} = {size // parts} is not a multiple of "
                    f"{blk}; use a smaller {field} or dequantizeFp8"
                )
    return errs


def fp8_shard_ok(
    weight_shape: tuple[int, ...], dim: int, parts: int, block: int = FP8_BLOCK
) -> bool:
    """An FP8 block-quantised weight may only be cut in whole 128-blocks."""
    return parts == 1 or (weight_shape[dim] // parts) % block == 0


def blocks(n: int, block: int = FP8_BLOCK) -> int:
    return math.ceil(n / block)


# ------------------------------------------------------------------ what one pod holds
# The stager copies, and a node-local sharding Job writes, exactly the directories of one pod's
# ranks plus the top-level files; the operator sizes the pod's memory by the same rule, from the
# bytes per directory that the sharder reports. One rule, three users: it lives here.

TOP = "top"  # the group of the top-level files (config, tokenizer, metadata)


def pod_ranks(pod: int, devices_per_node: int) -> range:
    """The global ranks of pod (StatefulSet ordinal, node index) `pod`: devicesPerNode each."""
    return range(pod * devices_per_node, (pod + 1) * devices_per_node)


def pod_dirs(plan: ParallelPlan, ranks: range) -> list[str]:
    """The directories `ranks` read, each once, in load order."""
    seen: dict[str, None] = {}
    for r in ranks:
        for d in plan.rank_dirs(r):
            seen.setdefault(d, None)
    return list(seen)


def dir_group(rel: str) -> str:
    """The group of a file of the layout (its top directory's kind; TOP for a top-level file)."""
    if "/" not in rel:
        return TOP
    top = rel.split("/", 1)[0]
    if top == "model-norm":
        return NORM
    for group in (ATTN, DENSE, MOE):
        if top.startswith(f"model-{group}-"):
            return group
    return VOCAB  # model-{rank}


def dir_bytes_by_group(files: dict[str, int]) -> dict[str, int]:
    """Bytes per directory of each group, the largest directory of the group (every directory
    of a group holds equal cuts, so they differ only by a header's digits), and TOP: the sum of
    the top-level files. `files`: path relative to the layout -> bytes."""
    per_dir: dict[str, int] = {}
    top = 0
    for rel, n in files.items():
        if "/" not in rel:
            top += n
        else:
            d = rel.split("/", 1)[0]
            per_dir[d] = per_dir.get(d, 0) + n
    out: dict[str, int] = {TOP: top}
    for d, n in per_dir.items():
        g = dir_group(f"{d}/")
        out[g] = max(out.get(g, 0), n)
    return out


def staged_bytes(plan: ParallelPlan, ranks: range, group_bytes: dict[str, int]) -> int:
    """The bytes a pod holding `ranks` stages: its directories by the group sizes, plus TOP."""
    return group_bytes.get(TOP, 0) + sum(
        group_bytes.get(dir_group(f"{d}/"), 0) for d in pod_dirs(plan, ranks)
    )
