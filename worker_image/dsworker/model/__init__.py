"""The DeepSeek V2/V3 inference model: MLA, DeepSeekMoE with expert parallelism, MTP.

One rank, start to first step (every rank of the world runs the same calls)::

    device = Device.create(kind, local_rank); init_process_group(device, rank, world)
    groups = build_groups(plan, rank, device.backend)
    model = DeepseekModel(ModelArgs.from_dir(d), groups, EngineOptions(moe=..., mtp=...),
                          torch.bfloat16, device.torch)
    stats = load_weights(model.targets(), d, plan, rank, device, mtp=...)
    cache = model.new_cache(num_slots, max_len)
    out = model(Batch.build([(slot, start, new_token_ids), ...], device.torch), cache)
    out.logits  # [B, V]: each sequence's last new token (all_logits=True: [T, V])
"""

from dsworker.model.batch import Batch, KVCache
from dsworker.model.config import ModelArgs
from dsworker.model.model import DeepseekModel, EngineOptions, StepOutput
from dsworker.model.moe import ExpertBufferOverflow, MoEOptions, MoEStats

__all__ = [
    "Batch",
    "DeepseekModel",
    "EngineOptions",
    "ExpertBufferOverflow",
    "KVCache",
    "ModelArgs",
    "MoEOptions",
    "MoEStats",
    "StepOutput",
]
