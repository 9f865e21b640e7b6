"""qcjax.load tells an HF directory from a qcjax checkpoint and gives the same params from either."""
import jax
import numpy as np
import pytest

import qcjax
from qcjax.checkpoint import save
from qcjax.loader import load_config

from conftest import hf_model
from test_model import small


def test_hf_directory_and_its_checkpoint_load_the_same(tmp_path):
    cfg = small(4, 2, 16, True)
    hf_model(cfg).save_pretrained(tmp_path / "hf")
    hf_cfg, hf_params = qcjax.load(str(tmp_path / "hf"))
    save(str(tmp_path / "ckpt"), 3, hf_params, hf_cfg, async_=False).close()
    ck_cfg, ck_params = qcjax.load(str(tmp_path / "ckpt"))
    assert ck_cfg == hf_cfg == load_config(str(tmp_path / "hf")) == load_config(str(tmp_path / "ckpt"))
    for a, b in zip(jax.tree.leaves(hf_params), jax.tree.leaves(ck_params)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    with pytest.raises(ValueError, match="HF model directory: it has no steps"):
        qcjax.load(str(tmp_path / "hf"), step=3)
    with pytest.raises(FileNotFoundError, match="no such directory"):
        qcjax.load(str(tmp_path / "nowhere"))


def test_init_from_with_a_conflicting_layer_count_is_an_error(tmp_path):
    from ml_collections import ConfigDict

    from qcjax.train.loop import ConfigError, model_config

    cfg = small(4, 2, 16, True)
    hf_model(cfg).save_pretrained(tmp_path / "hf")
    c = ConfigDict(dict(init_from=str(tmp_path / "hf"), model=dict(preset="tiny", num_layers=cfg.num_layers + 1,
                                                                   vocab_size=0, dtype="float32",
                                                                   param_dtype="float32", remat="none",
                                                                   attention_impl="auto", yarn_factor=0.0)))
    with pytest.raises(ConfigError, match=rf"model.num_layers={cfg.num_layers + 1} conflicts with init_from"):
        model_config(c)
    c.model.num_layers = cfg.num_layers  # the same as the checkpoint's: fine
    assert model_config(c).num_layers == cfg.num_layers
