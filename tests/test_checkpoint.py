"""qcjax.checkpoint: the Orbax layout training and conversion share; restore onto other meshes, params alone out of
a full training checkpoint, train state with optimizer and data-iterator state, the streamed per-param writer."""
import json
import os

import jax
import numpy as np
import pytest

from qcjax import checkpoint
from qcjax.config import ModelConfig
from qcjax.model import abstract_params, init_params
from qcjax.sharding import make_mesh, param_shardings

CFG = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
                  tie_word_embeddings=False, remat="full")


@pytest.fixture(scope="module")
def params():
    return init_params(CFG, jax.random.key(0))


def on_mesh(params, mesh):
    return jax.device_put(params, param_shardings(abstract_params(CFG), mesh))


def assert_same(a, b):
    assert jax.tree.structure(a) == jax.tree.structure(b)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_async_save_then_restore_gives_params_and_full_config(tmp_path, params):
    cfg = CFG.replace(dtype="bfloat16", attention_impl="xla")
    ck = checkpoint.save(tmp_path, 7, params, cfg)  # async by default
    ck.close()  # waits for the save
    got_cfg, got = checkpoint.restore_params(tmp_path)
    assert got_cfg == cfg  # run fields too: the checkpoint alone describes the model
    assert_same(got, params)


def test_saved_on_fsdp8_restores_on_tensor2_fsdp4_and_on_one_device(tmp_path, params):
    with checkpoint.Checkpointer(tmp_path, async_=False) as ck:
        ck.save(0, on_mesh(params, make_mesh({"fsdp": 8})), CFG)
    mesh = make_mesh({"fsdp": 4, "tensor": 2})
    _, got = checkpoint.restore_params(tmp_path, mesh=mesh)
    assert_same(got, params)
    want = param_shardings(abstract_params(CFG), mesh)
    for x, s in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert x.sharding == s
    assert got["layers"]["mlp"]["gate_proj"]["kernel"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "tensor")

    _, one = checkpoint.restore_params(tmp_path)
    assert_same(one, params)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one))


def test_restore_casts_to_requested_dtype(tmp_path, params):
    checkpoint.save(tmp_path, 0, params, CFG, async_=False).close()
    cfg, got = checkpoint.restore_params(tmp_path, dtype="bfloat16")
    assert cfg.param_dtype == "bfloat16"
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        assert x.dtype == jax.numpy.bfloat16
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y.astype(jax.numpy.bfloat16)))


def test_full_train_state_round_trip_and_params_alone(tmp_path, params):
    optax = pytest.importorskip("optax")
    grain = pytest.importorskip("grain")
    tx = optax.adamw(1e-3)
    opt_state = tx.init(params)
    grads = jax.tree.map(lambda p: 0.01 * jax.numpy.ones_like(p), params)
    _, opt_state = tx.update(grads, opt_state, params)  # non-trivial moments
    it = iter(grain.MapDataset.range(100).map(lambda x: x * 3).to_iter_dataset())
    seen = [next(it) for _ in range(5)]
    with checkpoint.Checkpointer(tmp_path, max_to_keep=2) as ck:
        ck.save(10, params, CFG, opt_state=opt_state, data_iter=it, extra_config={"train": {"lr": 1e-3}})
    remaining = [next(it) for _ in range(3)]

    # params alone, out of the full training checkpoint
    cfg, got = checkpoint.restore_params(tmp_path)
    assert cfg == CFG
    assert_same(got, params)

    fresh = iter(grain.MapDataset.range(100).map(lambda x: x * 3).to_iter_dataset())
    state = checkpoint.restore_train_state(
        tmp_path, params=checkpoint.param_targets(CFG), opt_state=jax.tree.map(jax.numpy.zeros_like, opt_state),
        data_iter=fresh)
    assert state["step"] == 10 and state["config"] == CFG and state["meta"]["train"] == {"lr": 1e-3}
    assert_same(state["params"], params)
    assert_same(state["opt_state"], opt_state)
    assert seen == [0, 3, 6, 9, 12]
    assert [next(state["data_iter"]) for _ in range(3)] == remaining == [15, 18, 21]


@pytest.mark.parametrize("partial_api", [True, False], ids=["partial-save", "older-orbax-fallback"])
def test_streamed_per_param_save_is_the_standard_layout(tmp_path, params, monkeypatch, partial_api):
    if not partial_api:
        monkeypatch.setattr(checkpoint, "_partial_api", lambda: None)
    paths = [tuple(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]]
    asked = []

    def get_leaf(path):
        asked.append(path)
        x = params
        for key in path:
            x = x[key]
        return x

    streamed = tmp_path / "streamed"
    checkpoint.save_params_streaming(streamed, CFG, paths, get_leaf, extra_config={"source": {"format": "test"}})
    assert asked == paths  # one at a time, in order
    assert sorted(os.listdir(streamed)) == ["0"]  # no scratch left behind
    assert sorted(os.listdir(streamed / "0")) == ["_CHECKPOINT_METADATA", "commit_success.txt", "config", "params"]
    handlers = json.loads((streamed / "0" / "_CHECKPOINT_METADATA").read_text())["item_handlers"]
    assert handlers["params"].endswith("StandardCheckpointHandler")

    cfg, got = checkpoint.restore_params(streamed, mesh=make_mesh({"fsdp": 8}))
    assert cfg == CFG
    assert_same(got, params)
    reader = checkpoint.ParamsReader(streamed)
    np.testing.assert_array_equal(reader(("layers", "attn", "o_proj", "kernel")),
                                  np.asarray(params["layers"]["attn"]["o_proj"]["kernel"]))
    assert reader.meta["source"] == {"format": "test"}


def test_bad_restores_name_the_problem(tmp_path, params):
    with pytest.raises(FileNotFoundError, match="no checkpoint directory"):
        checkpoint.restore_params(tmp_path / "absent")
    checkpoint.save(tmp_path, 3, params, CFG, async_=False).close()
    with pytest.raises(FileNotFoundError, match=r"no step 4; it has steps \[3\]"):
        checkpoint.restore_params(tmp_path, step=4)
    with pytest.raises(ValueError, match="hidden_size"):
        checkpoint.restore_params(tmp_path, remat="none", hidden_size=32)
    with pytest.raises(ValueError, match=r"num_layers: 2 in checkpoint .*, 3 requested"):
        checkpoint.restore_params(tmp_path, expect=CFG.replace(num_layers=3))
    with pytest.raises(ValueError, match='"model"'):
        checkpoint.save(tmp_path / "x", 0, params, CFG, extra_config={"model": 1})


def test_keep_checkpoints_never_deletes_the_protected_step(tmp_path, params):
    ck = checkpoint.Checkpointer(str(tmp_path), max_to_keep=1, async_=False)
    ck.save(1, params, CFG, force=True)
    ck.protect(1)  # the newest step known to train finitely; later saves are not
    ck.save(2, params, CFG, force=True)
    ck.save(3, params, CFG, force=True)
    ck.close()
    assert sorted(int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()) == [1, 3]


def test_checksums_do_not_depend_on_the_sharding(params):
    mesh = make_mesh({"fsdp": 8})
    one, _ = checkpoint.checksums(params)
    eight, finite = checkpoint.checksums(on_mesh(params, mesh))
    assert one == eight and finite
    bumped = jax.tree.map(lambda x: x, params)
    bumped["embed"] = params["embed"].at[3, 5].add(1e-3)
    assert checkpoint.checksums(bumped)[0]["embed"] != one["embed"]
