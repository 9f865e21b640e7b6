"""The per-row LoRA kernel (lora.cc, qcjax.cpu.lora) against float64 and against the core's gathered formulation
(qcjax.row_lora): float32 and bfloat16 banks, ranks and widths past the vector length, rows without an adapter."""
import numpy as np
import pytest

import jax
import jax.numpy as jnp

from qcjax import row_lora
from qcjax.cpu import build, lora

pytestmark = pytest.mark.skipif(not build.available(), reason="no C++ compiler to build the CPU kernels")


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("b, t, k, r, n", [(8, 1, 64, 16, 48), (3, 2, 130, 5, 37), (1, 1, 645, 33, 300)])
def test_each_row_gets_its_own_adapter(dtype, b, t, k, r, n):
    rng = np.random.default_rng(b * k + r)
    adapters = 7
    a = jnp.asarray(rng.normal(0, 0.3, (adapters, k, r)), dtype)
    bm = jnp.asarray(rng.normal(0, 0.3, (adapters, r, n)), dtype)
    x = jnp.asarray(rng.normal(size=(b, t, k)), dtype)
    index = jnp.asarray(rng.integers(-1, adapters, b), jnp.int32).at[0].set(-1 if b > 1 else 3)
    scale = jnp.asarray(rng.uniform(0.5, 2.0, b), jnp.float32)
    assert lora.applies(x, a, bm, index, scale)
    got = np.asarray(jax.jit(lora.row_lora)(x, a, bm, index, scale))
    want = np.asarray(jax.jit(row_lora._gathered)(x, a, bm, index, jnp.where(index >= 0, scale, 0.0)))
    x64, a64, b64 = (np.asarray(jnp.asarray(v, jnp.float32), np.float64) for v in (x, a, bm))
    for i in range(b):
        if index[i] < 0:
            assert not np.any(got[i]), "a row without an adapter gets zeros"
            continue
        h = float(scale[i]) * (x64[i] @ a64[int(index[i])])
        if dtype == "float32":  # float64 bound: float32 sums of k and r terms
            ref = h @ b64[int(index[i])]
            tol = 1e-5 * np.sqrt(k) * np.abs(ref).max()
            np.testing.assert_allclose(got[i], ref, atol=tol, rtol=0)
    # the core's formulation: the same roundings (h to the bank's dtype), sums in another order
    np.testing.assert_allclose(got, want, atol=1e-5 * np.abs(want).max() * (1 if dtype == "float32" else 8), rtol=0)


def test_prompts_keep_the_gathered_dots():
    x = jnp.zeros((4, 32, 64), jnp.float32)  # 128 tokens: a prompt chunk
    a, b = jnp.zeros((2, 64, 8)), jnp.zeros((2, 8, 64))
    assert not lora.applies(x, a, b, jnp.zeros(4, jnp.int32), jnp.zeros(4))
    assert lora.applies(x[:, :1], a, b, jnp.zeros(4, jnp.int32), jnp.zeros(4))
