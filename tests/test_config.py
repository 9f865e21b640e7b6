"""Config presets and HF config.json reading/writing."""
import json

import pytest

from qcjax.config import PRESETS, ModelConfig, get_config
from qcjax.model import count_params

REAL_SIZES = ["0.5b", "1.5b", "3b", "7b", "14b", "32b"]


@pytest.mark.parametrize("size", REAL_SIZES)
def test_param_count_equals_transformers_meta_model(size):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    cfg = get_config(size)
    with torch.device("meta"):
        hf = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**cfg.to_hf_dict()))
    assert count_params(cfg) == sum(p.numel() for p in hf.parameters())


def test_presets_have_the_real_dimensions():
    c = PRESETS["0.5b"]
    assert (c.hidden_size, c.num_heads, c.num_kv_heads, c.dim_per_head, c.tie_word_embeddings) == (896, 14, 2, 64, True)
    c = PRESETS["32b"]
    assert (c.num_layers, c.intermediate_size, c.vocab_size, c.dim_per_head, c.tie_word_embeddings) == (
        64, 27648, 152064, 128, False)
    assert get_config("Qwen2.5-Coder-7B") == PRESETS["7b"]


def test_reads_rope_theta_from_rope_parameters_and_from_top_level():
    base = PRESETS["tiny"].to_hf_dict()
    new_style = {k: v for k, v in base.items() if k != "rope_theta"}
    new_style["rope_parameters"] = {"rope_type": "default", "rope_theta": 12345.0}
    old_style = {k: v for k, v in base.items() if k != "rope_parameters"}
    old_style["rope_theta"] = 54321.0
    assert ModelConfig.from_hf_dict(new_style).rope_theta == 12345.0
    assert ModelConfig.from_hf_dict(old_style).rope_theta == 54321.0


def test_reads_legacy_yarn_rope_scaling():
    d = PRESETS["7b"].to_hf_dict()
    del d["rope_parameters"]
    d["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 32768}
    y = ModelConfig.from_hf_dict(d).rope_scaling
    assert (y.factor, y.original_max_position_embeddings) == (4.0, 32768)


def test_hf_dict_round_trips(tmp_path):
    cfg = PRESETS["14b"].with_yarn()
    (tmp_path / "config.json").write_text(json.dumps(cfg.to_hf_dict()))
    assert ModelConfig.from_hf_json(str(tmp_path)) == cfg


def test_transformers_reads_our_yarn_config_the_same_way():
    transformers = pytest.importorskip("transformers")
    cfg = PRESETS["7b"].with_yarn()
    hf = transformers.Qwen2Config(**cfg.to_hf_dict())
    assert hf.rope_parameters["rope_type"] == "yarn" and hf.rope_parameters["factor"] == 4.0
    assert hf.rope_parameters["rope_theta"] == 1e6


def test_rejects_other_architectures_clearly():
    d = PRESETS["tiny"].to_hf_dict() | {"model_type": "llama", "architectures": ["LlamaForCausalLM"]}
    with pytest.raises(ValueError, match="llama.*Qwen2ForCausalLM"):
        ModelConfig.from_hf_dict(d)


def test_bad_field_names_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        PRESETS["tiny"].replace(num_heads=5)
    with pytest.raises(ValueError, match="remat"):
        PRESETS["tiny"].replace(remat="sometimes")
    with pytest.raises(ValueError, match=r"attention_impl='bogus': expected one of \('auto', 'xla'"):
        PRESETS["tiny"].replace(attention_impl="bogus")
