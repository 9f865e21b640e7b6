"""Sharded params give the same logits as one device; the logical-axis rules map every name."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

import qcjax
from qcjax.model import abstract_params
from qcjax.sharding import logical_to_spec, make_mesh, param_shardings


@pytest.mark.parametrize("shape", [{"fsdp": 8}, {"data": 2, "fsdp": 2, "tensor": 2}, {"fsdp": 2, "tensor": 4}])
def test_sharded_logits_equal_single_device(shape):
    assert len(jax.devices()) == 8
    cfg = qcjax.get_config("tiny", vocab_size=512, num_heads=8, num_kv_heads=2)  # 2 KV heads over tensor=4: replicated
    params = qcjax.init_params(cfg, jax.random.key(0))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 512, (4, 16)))
    ref = np.asarray(qcjax.logits(cfg, params, tokens))
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, param_shardings(abstract_params(cfg), mesh))
        out = qcjax.logits(cfg, sharded, tokens)
    assert len(sharded["layers"]["mlp"]["up_proj"]["kernel"].sharding.device_set) == 8
    np.testing.assert_allclose(np.asarray(out), ref, rtol=1e-5, atol=1e-5)


def test_rules_replicate_dims_the_mesh_does_not_divide():
    mesh = make_mesh({"fsdp": 2, "tensor": 4})
    assert logical_to_spec(("embed", "kv_heads", "head_dim"), (64, 2, 16), mesh) == P("fsdp", None, None)
    assert logical_to_spec(("embed", "heads", "head_dim"), (64, 8, 16), mesh) == P("fsdp", "tensor", None)
    assert logical_to_spec(("act_batch", "act_length"), (6, 16), mesh) == P("fsdp", None)


def test_unknown_logical_name_is_an_error():
    with pytest.raises(KeyError, match="no rule"):
        logical_to_spec(("embd",))


def test_mesh_sizes_from_config_with_rest():
    mesh = make_mesh({"data": 2, "fsdp": -1, "tensor": 2})
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "context": 1, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"data": 3, "fsdp": 2})


def _packed(rng, rows, length):
    """Packed rows: 2-4 documents each (positions restart per document) and trailing padding (segment 0)."""
    seg = np.zeros((rows, length), np.int32)
    pos = np.zeros((rows, length), np.int32)
    for r in range(rows):
        cuts = np.sort(rng.choice(np.arange(4, length - 4), rng.integers(1, 4), replace=False))
        end = length - rng.integers(0, 4)
        start = 0
        for i, stop in enumerate(list(cuts) + [end]):
            seg[r, start:stop] = i + 1
            pos[r, start:stop] = np.arange(stop - start)
            start = stop
    return seg, pos


@pytest.mark.parametrize("shape, impl", [
    ({"context": 4, "fsdp": 2}, "xla"),
    ({"data": 2, "context": 2, "tensor": 2}, "xla"),
    ({"context": 8}, "xla"),
    ({"context": 4, "tensor": 2}, "pallas_gpu"),  # the Pallas kernel (interpreted) under shard_map
])
def test_context_parallel_logits_and_gradients_equal_one_device_with_packed_rows(shape, impl):
    """Activations split along the sequence over the context axis (keys and values gathered for attention) give the
    one-device logits and gradients, for packed rows with GQA and remat."""
    cfg = qcjax.get_config("tiny", vocab_size=512, hidden_size=128, num_heads=8, num_kv_heads=2, dtype="float32",
                           param_dtype="float32", remat="full", attention_impl=impl)
    params = qcjax.init_params(cfg, jax.random.key(1))
    rng = np.random.default_rng(2)
    tokens = jnp.asarray(rng.integers(0, 512, (4, 64)))
    seg, pos = (jnp.asarray(a) for a in _packed(rng, 4, 64))

    def loss(p):
        logits = qcjax.model.Qwen2(cfg).apply({"params": p}, tokens, pos, seg)
        lp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], -1)[..., 0]
        keep = (seg[:, 1:] == seg[:, :-1]) & (seg[:, 1:] != 0)
        return jnp.sum(nll * keep) / jnp.sum(keep), logits

    (ref_loss, ref_logits), ref_grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
    mesh = make_mesh(shape)
    with jax.set_mesh(mesh):
        sharded = jax.device_put(params, param_shardings(abstract_params(cfg), mesh))
        (got_loss, logits), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(sharded)
    assert logits.sharding.spec[1] == "context"  # the sequence really is split
    np.testing.assert_allclose(np.asarray(logits), np.asarray(ref_logits), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(float(got_loss), float(ref_loss), rtol=1e-6)
    for (path, g), r in zip(jax.tree_util.tree_leaves_with_path(grads), jax.tree.leaves(ref_grads)):
        scale = float(np.max(np.abs(np.asarray(r)))) or 1.0
        np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-5, atol=1e-5 * scale,
                                   err_msg=jax.tree_util.keystr(path))
