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
    from qcjax.train.config import ModelFields, TrainConfig
    from qcjax.train.loop import ConfigError, model_config

    cfg = small(4, 2, 16, True)
    hf_model(cfg).save_pretrained(tmp_path / "hf")
    def c(num_layers):
        return TrainConfig(init_from=str(tmp_path / "hf"), model=ModelFields(preset="tiny", num_layers=num_layers,
                                                                             dtype="float32", remat="none"))

    with pytest.raises(ConfigError, match=rf"model.num_layers={cfg.num_layers + 1} conflicts with init_from"):
        model_config(c(cfg.num_layers + 1))
    assert model_config(c(cfg.num_layers)).num_layers == cfg.num_layers  # the same as the checkpoint's: fine


def test_a_run_directory_its_checkpoints_and_a_step_directory_name_one_checkpoint(tmp_path):
    """What users pass as --ckpt: train.py's --workdir, its checkpoints/, or checkpoints/STEP; all load."""
    from qcjax.loader import checkpoint_tokenizer, resolve_checkpoint

    cfg = small(4, 2, 16, True)
    params = jax.jit(lambda: qcjax.init_params(cfg, jax.random.key(0)))()
    run = tmp_path / "run"
    ck = save(str(run / "checkpoints"), 1, params, cfg, async_=False)
    ck.save(2, jax.tree.map(lambda x: x * 2, params), cfg, force=True)
    ck.close()
    ckpts = str(run / "checkpoints")
    assert resolve_checkpoint(str(run)) == (ckpts, None)
    assert resolve_checkpoint(str(run) + "/", 2) == (ckpts, 2)
    assert resolve_checkpoint(ckpts) == (ckpts, None)
    assert resolve_checkpoint(str(run / "checkpoints" / "1")) == (ckpts, 1)
    with pytest.raises(ValueError, match=r"the directory of step 1, but step 2 was asked for"):
        resolve_checkpoint(str(run / "checkpoints" / "1"), 2)
    assert resolve_checkpoint(str(tmp_path / "nowhere")) == (str(tmp_path / "nowhere"), None)  # the loaders say

    assert load_config(str(run)) == cfg
    _, one = qcjax.load(str(run / "checkpoints" / "1"))
    _, newest = qcjax.load(str(run))
    np.testing.assert_array_equal(np.asarray(jax.tree.leaves(one)[0]) * 2, np.asarray(jax.tree.leaves(newest)[0]))

    assert checkpoint_tokenizer(ckpts) is None  # no tokenizer anywhere: the caller says so
    (run / "tokenizer").mkdir()
    (run / "tokenizer" / "spm.model").write_bytes(b"")
    assert checkpoint_tokenizer(ckpts) == str(run / "tokenizer")  # the run's tokenizer/, beside checkpoints/
