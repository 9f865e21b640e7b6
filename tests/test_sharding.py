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
    assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
    with pytest.raises(ValueError, match="needs 6 devices"):
        make_mesh({"data": 3, "fsdp": 2})
