"""ModelArgs, the forward pass's view of the validated config.json (contract.model_config)."""

from __future__ import annotations

import pytest

from dsworker.contract.model_config import ModelConfigError
from dsworker.model.config import ModelArgs
from dsworker.tools.synth_presets import make_config


@pytest.mark.parametrize("arch", ["v2", "v3"])
def test_synthesized_configs_give_the_model_args(arch: str) -> None:
    cfg = make_config(arch, "tiny", "bf16")
    args = ModelArgs.from_config(cfg)
    assert args.arch == ("DeepseekV3" if arch == "v3" else "DeepseekV2")
    assert args.kv_lora_rank == cfg["kv_lora_rank"] and args.top_k == cfg["num_experts_per_tok"]
    assert args.topk_method == ("noaux_tc" if arch == "v3" else "greedy")
    rope = cfg["rope_scaling"]
    assert args.rope.kind == "yarn" and args.rope.factor == rope["factor"]
    assert args.rope.original_max_position == rope["original_max_position_embeddings"]


def test_a_size_only_the_engine_needs_is_named_when_missing() -> None:
    cfg = make_config("v3", "tiny", "bf16")
    del cfg["qk_rope_head_dim"]
    with pytest.raises(ModelConfigError, match="missing qk_rope_head_dim, which the engine needs"):
        ModelArgs.from_config(cfg)


def test_without_rope_scaling_the_rope_is_plain() -> None:
    cfg = make_config("v3", "small", "bf16")
    assert "rope_scaling" not in cfg
    args = ModelArgs.from_config(cfg)
    assert (args.rope.kind, args.rope.factor, args.rope.theta) == ("default", 1.0, 10000.0)
