"""qcjax.load_hf reads a saved transformers checkpoint directory and gives transformers' logits."""
import json

import numpy as np
import pytest

import qcjax
from qcjax.config import ModelConfig

from conftest import hf_logits, hf_model

CFG_TIED = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4,
                       num_kv_heads=2, tie_word_embeddings=True)
CFG_UNTIED = CFG_TIED.replace(tie_word_embeddings=False)


@pytest.mark.parametrize("cfg", [CFG_TIED, CFG_UNTIED], ids=["tied", "untied"])
def test_load_hf_directory_gives_transformers_logits(tmp_path, cfg):
    model = hf_model(cfg)
    model.save_pretrained(tmp_path)
    names = json.loads((tmp_path / "model.safetensors").read_bytes()[8:8 + int.from_bytes(
        (tmp_path / "model.safetensors").read_bytes()[:8], "little")])
    assert ("lm_head.weight" in names) == (not cfg.tie_word_embeddings)  # tied checkpoints have no lm_head
    loaded_cfg, params = qcjax.load_hf(str(tmp_path))
    assert loaded_cfg.tie_word_embeddings == cfg.tie_word_embeddings
    tokens = np.random.default_rng(0).integers(0, cfg.vocab_size, (2, 10))
    ref = hf_logits(model, tokens)
    np.testing.assert_allclose(np.asarray(qcjax.logits(loaded_cfg, params, tokens)), ref, atol=1e-4 * np.abs(ref).max())


def test_load_bf16_checkpoint_keeps_exact_bf16_values(tmp_path):
    import torch

    model = hf_model(CFG_UNTIED).to(torch.bfloat16)
    model.save_pretrained(tmp_path)
    cfg, params = qcjax.load_hf(str(tmp_path), dtype="bfloat16")
    assert params["embed"].dtype == np.dtype("bfloat16")
    want = model.model.embed_tokens.weight.detach().float().numpy()
    np.testing.assert_array_equal(np.asarray(params["embed"], np.float32), want)


def test_misshapen_tensor_names_the_tensor_and_both_shapes(tmp_path):
    model = hf_model(CFG_TIED)
    model.save_pretrained(tmp_path)
    conf = json.loads((tmp_path / "config.json").read_text())
    conf["intermediate_size"] = 128
    (tmp_path / "config.json").write_text(json.dumps(conf))
    with pytest.raises(ValueError, match=r"model\.layers\.0\.mlp\.gate_proj\.weight.*\(96, 64\).*\(128, 64\)"):
        qcjax.load_hf(str(tmp_path))
