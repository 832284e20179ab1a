"""dsworker synth: checkpoints that transformers loads, deterministic, with well-formed quantisation."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from dsworker.checkpoint import number_formats
from dsworker.checkpoint.hf_checkpoint import open_checkpoint
from dsworker.checkpoint.safetensors_reader import SafetensorsReader
from dsworker.tools.synth import synthesize
from dsworker.tools.synth_presets import _TINY_FP8


def _tensors(root: Path) -> dict[str, np.ndarray]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with SafetensorsReader(f) as r:
            out.update({n: r.array(n) for n in r.tensors})
    return out


@pytest.mark.parametrize("arch", ["v3", "v2"])
def test_tiny_loads_in_transformers(synth_checkpoint, arch: str) -> None:
    from transformers import AutoTokenizer, DeepseekV2ForCausalLM, DeepseekV3ForCausalLM

    src = synth_checkpoint(arch, "tiny", "bf16", mtp=arch == "v3")
    cls = DeepseekV3ForCausalLM if arch == "v3" else DeepseekV2ForCausalLM
    model = cls.from_pretrained(src)
    assert model.dtype == torch.bfloat16
    cfg = model.config
    assert cfg.tie_word_embeddings is False
    assert cfg.num_key_value_heads == cfg.num_attention_heads
    tok = AutoTokenizer.from_pretrained(src)
    text = tok.apply_chat_template(
        [{"role": "user", "content": "Hello, MoE!"}], add_generation_prompt=True, tokenize=False
    )
    assert text.startswith("<｜begin▁of▁sentence｜><｜User｜>Hello, MoE!")
    ids = tok(text, return_tensors="pt").input_ids
    assert tok.decode(ids[0], skip_special_tokens=True) == "Hello, MoE!"
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size)
    assert torch.isfinite(logits).all()
    sd = model.state_dict()
    if arch == "v3":
        bias = sd["model.layers.1.mlp.gate.e_score_correction_bias"]
        assert bias.dtype == torch.float32 and bias.abs().sum() > 0  # randomised, not HF's zeros
        assert "model.layers.0.self_attn.q_a_proj.weight" in sd
    else:
        assert "model.layers.0.self_attn.q_proj.weight" in sd
        assert not any("e_score_correction_bias" in k for k in sd)


def test_config_fields(synth_checkpoint) -> None:
    v3 = json.loads((synth_checkpoint("v3", "tiny", "bf16", mtp=True) / "config.json").read_text())
    assert v3["model_type"] == "deepseek_v3" and v3["architectures"] == ["DeepseekV3ForCausalLM"]
    assert v3["torch_dtype"] == v3["dtype"] == "bfloat16"
    assert v3["num_nextn_predict_layers"] == 1 and v3["topk_method"] == "noaux_tc"
    assert v3["rope_scaling"]["type"] == "yarn"
    v2 = json.loads((synth_checkpoint("v2", "tiny", "bf16") / "config.json").read_text())
    assert v2["model_type"] == "deepseek_v2" and v2["q_lora_rank"] is None
    assert v2["topk_method"] == "greedy" and v2["scoring_func"] == "softmax"
    idx = json.loads((synth_checkpoint("v3", "tiny") / "model.safetensors.index.json").read_text())
    files = set(idx["weight_map"].values())
    assert len(files) >= 3


def test_same_seed_same_weights_any_file_split(tmp_path: Path) -> None:
    a = synthesize(tmp_path / "a", seed=7)
    b = synthesize(tmp_path / "b", seed=7, max_file_bytes=50_000)
    c = synthesize(tmp_path / "c", seed=8)
    ta, tb, tc = _tensors(a), _tensors(b), _tensors(c)
    assert len(list(b.glob("*.safetensors"))) > len(list(a.glob("*.safetensors")))
    assert ta.keys() == tb.keys()
    assert all(np.array_equal(ta[k], tb[k]) for k in ta)
    assert not np.array_equal(ta["lm_head.weight"], tc["lm_head.weight"])


def test_overrides_and_validation(tmp_path: Path) -> None:
    out = synthesize(tmp_path / "o", overrides={"num_hidden_layers": 2, "n_routed_experts": 4})
    ck = open_checkpoint(out)
    assert ck.dims.num_hidden_layers == 2 and ck.dims.n_routed_experts == 4
    assert "model.layers.1.mlp.experts.3.down_proj.weight" in ck.tensors


def test_fp8_codec_matches_torch() -> None:
    rng = np.random.default_rng(0)
    x = np.concatenate(
        [
            rng.standard_normal(20000).astype(np.float32) * 50,
            np.array(
                [0.0, -0.0, 448.0, -448.0, 1e-9, 2.0**-9, 3 * 2.0**-10, 500.0, -1000.0], np.float32
            ),
        ]
    )
    ours = number_formats.f32_to_fp8_e4m3(x)
    theirs = (
        torch.from_numpy(np.clip(x, -448, 448)).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    )
    assert np.array_equal(ours, theirs)
    codes = np.arange(256, dtype=np.uint8)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).to(torch.float32).numpy()
    ok = ~np.isnan(ref)
    assert np.array_equal(number_formats.fp8_e4m3_to_f32(codes)[ok], ref[ok])
    assert np.isnan(number_formats.fp8_e4m3_to_f32(codes)[~ok]).all()


def test_bf16_codec_matches_torch() -> None:
    x = np.random.default_rng(1).standard_normal(10000).astype(np.float32) * 3
    x[:4] = [np.nan, np.inf, -np.inf, 1e-40]
    ours = number_formats.f32_to_bf16(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.uint16).numpy().astype(np.uint16)
    assert np.array_equal(ours[4:], theirs[4:]) and np.array_equal(ours[1:3], theirs[1:3])
    assert np.isnan(number_formats.bf16_to_f32(ours[:1])).all()
    assert np.array_equal(
        number_formats.bf16_to_f32(theirs),
        torch.from_numpy(theirs.view(np.int16)).view(torch.bfloat16).float().numpy(),
        equal_nan=True,
    )


def test_quantised_formats_encode_the_same_weights(tmp_path: Path) -> None:
    """fp8 / w8a8 / w8a16 of a seed dequantise to (about) the bf16 weights of the same seed."""
    dims = dict(_TINY_FP8)
    ref = _tensors(synthesize(tmp_path / "bf16", fmt="bf16", overrides=dims))
    fp8 = _tensors(synthesize(tmp_path / "fp8", fmt="fp8"))
    w8a8 = _tensors(synthesize(tmp_path / "w8a8", fmt="w8a8", overrides=dims))
    w8a16 = _tensors(synthesize(tmp_path / "w8a16", fmt="w8a16", overrides=dims))
    desc = json.loads((tmp_path / "w8a8" / "quant_model_description_w8a8_dynamic.json").read_text())
    cfg16 = json.loads((tmp_path / "w8a16" / "config.json").read_text())
    assert cfg16["quantization_config"]["quant_method"] == "compressed-tensors"
    name = "model.layers.1.mlp.experts.3.down_proj"
    w = number_formats.bf16_to_f32(ref[f"{name}.weight"])
    deq = number_formats.fp8_e4m3_to_f32(fp8[f"{name}.weight"]) * number_formats.expand_block_scale(
        fp8[f"{name}.weight_scale_inv"], 0, w.shape[0], 0, w.shape[1]
    )
    assert np.abs(deq - w).max() <= 0.07 * np.abs(w).max()
    q8 = w8a8[f"{name}.weight"].astype(np.float32) - w8a8[f"{name}.weight_offset"]
    assert np.abs(q8 * w8a8[f"{name}.weight_scale"] - w).max() <= 0.01 * np.abs(w).max()
    assert desc[f"{name}.weight"] == "W8A8_DYNAMIC" and desc["lm_head.weight"] == "FLOAT"
    q16 = number_formats.unpack_int32_to_int8(w8a16[f"{name}.weight_packed"]).astype(np.float32)
    s16 = number_formats.bf16_to_f32(w8a16[f"{name}.weight_scale"])
    assert np.abs(q16 * s16 - w).max() <= 0.01 * np.abs(w).max()
    assert w8a16[f"{name}.weight_shape"].tolist() == list(w.shape)
    # not quantised: lm_head, router gate, norms
    for fmt in (fp8, w8a8, w8a16):
        assert "lm_head.weight" in fmt and fmt["lm_head.weight"].dtype == np.uint16
        assert "model.layers.1.mlp.gate.weight" in fmt


def test_cli_synth_small_and_config_override(tmp_path: Path) -> None:
    import subprocess
    import sys

    dsworker = str(Path(sys.executable).with_name("dsworker"))
    r = subprocess.run(
        [dsworker, "synth", "--arch", "v3", "--preset", "small", "--format", "bf16",
         "--config", '{"num_hidden_layers": 3}', "--seed", "1", "--out", str(tmp_path / "s")],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert r.returncode == 0, r.stderr
    info = json.loads(r.stdout)
    assert info["bytes"] > 50e6
    assert json.loads((tmp_path / "s" / "config.json").read_text())["num_hidden_layers"] == 3
    r = subprocess.run(
        [dsworker, "synth", "--config", "[1]", "--out", str(tmp_path / "x")],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2 and "JSON object" in r.stderr


def test_cli_keep_float_writes_and_declares_bf16_modules(tmp_path: Path) -> None:
    """--keep-float: the named modules are stored BF16 (no companions) and declared so in the
    format's own way; a BF16 checkpoint or a pattern naming nothing is refused."""
    import subprocess
    import sys

    dsworker = str(Path(sys.executable).with_name("dsworker"))

    def synth(fmt: str, *patterns: str) -> subprocess.CompletedProcess[str]:
        keep = [a for p in patterns for a in ("--keep-float", p)]
        out = str(tmp_path / fmt)
        cmd = [dsworker, "synth", "--format", fmt, *keep, "--out", out]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=300)

    r = synth(
        "w8a16", "model.layers.0.self_attn.o_proj", r"re:.*layers\.2\.mlp\.shared_experts\..*"
    )
    assert r.returncode == 0, r.stderr
    t = _tensors(tmp_path / "w8a16")
    assert t["model.layers.0.self_attn.o_proj.weight"].dtype == np.uint16  # BF16 bits
    assert "model.layers.0.self_attn.o_proj.weight_packed" not in t
    assert "model.layers.2.mlp.shared_experts.up_proj.weight" in t
    assert "model.layers.1.self_attn.o_proj.weight_packed" in t
    cfg = json.loads((tmp_path / "w8a16" / "config.json").read_text())
    assert cfg["quantization_config"]["ignore"][-1] == r"re:.*layers\.2\.mlp\.shared_experts\..*"
    open_checkpoint(tmp_path / "w8a16")  # the sharder's check: stored as declared
    assert synth("w8a8", "model.layers.0.mlp.down_proj").returncode == 0
    desc = json.loads((tmp_path / "w8a8" / "quant_model_description_w8a8_dynamic.json").read_text())
    assert desc["model.layers.0.mlp.down_proj.weight"] == "FLOAT"
    assert desc["model.layers.0.mlp.up_proj.weight"] == "W8A8_DYNAMIC"
    r = synth("bf16", "lm_head")
    assert r.returncode == 2 and "needs a quantised --format" in r.stderr
    r = synth("fp8", "model.layers.9.self_attn.o_proj")
    assert r.returncode == 2 and "names none of the model's linear modules" in r.stderr


@pytest.mark.parametrize(("arch", "fmt"), [("v3", "bf16"), ("v3", "fp8"), ("v2", "bf16")])
def test_tiny_context_holds_the_serving_defaults_and_a_tools_prompt(arch: str, fmt: str) -> None:
    """`maxSeqLen` over max_position_embeddings is refused by the operator: the tiny model must
    take the serving defaults, and a prompt offering tests/data/weather_tool.json must fit."""
    from dsworker.chat.byte_level import BOS, CHAT_TEMPLATE, EOS
    from dsworker.chat.template import render_chat
    from dsworker.contract.engine_config import EngineConfig
    from dsworker.tools.synth_presets import make_config

    tool = json.loads((Path(__file__).parents[2] / "data/weather_tool.json").read_text())
    defaults = EngineConfig()
    cfg = make_config(arch, "tiny", fmt)
    assert cfg["max_position_embeddings"] >= defaults.maxSeqLen
    prompt = render_chat(
        [{"role": "user", "content": "Weather in Paris?"}], CHAT_TEMPLATE, bos_token=BOS,
        eos_token=EOS, tools=[tool],
    )  # fmt: skip
    assert len(prompt.encode()) + 256 < defaults.maxInputTokenLen  # byte-level: a token a byte
