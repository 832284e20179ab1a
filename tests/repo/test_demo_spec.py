"""`make demo`'s DeepSeekDeployment passes the operator's config review against the synthesized
tiny model it serves: its maxSeqLen (room for a prompt offering tools) is within the model's
max_position_embeddings."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from deepseek_operator.api.config_rules import check_against_config
from deepseek_operator.api.spec import DeepSeekDeploymentSpec
from dsworker.tools.synth_presets import make_config

REPO = Path(__file__).resolve().parents[2]


def test_the_demo_spec_fits_the_tiny_model(tmp_path: Path) -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import demo
    finally:
        sys.path.remove(str(REPO / "scripts"))
    config = make_config("v3", "tiny", "bf16")
    (tmp_path / "config.json").write_text(json.dumps(config))
    spec = DeepSeekDeploymentSpec.model_validate(demo.custom_resource(tmp_path)["spec"])
    assert check_against_config(spec, config) == []
    assert spec.serving.max_input_token_len >= 1024  # the tools prompt alone is ~700 tokens
