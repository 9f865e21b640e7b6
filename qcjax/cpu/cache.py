"""The KV cache write on the CPU: the platform switch's "cpu" implementation of "cache_write" (qcjax.platform).

XLA:CPU runs a bfloat16 (or float16) scatter by converting the whole cache to float32 and back on every write;
scattered as uint16 bits the write touches only the new entries. The same scatter as the core's otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp


def applies(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array, slot: jax.Array) -> bool:
    """Whether the write needs the bits form: a 16-bit cache."""
    return jnp.dtype(cache.dtype).itemsize == 2


def write_cache_bits(cache: jax.Array, new: jax.Array, layer: jax.Array, index: jax.Array, slot: jax.Array
                     ) -> jax.Array:
    """`qcjax.model.scatter_cache` on the uint16 bits of a 16-bit cache."""
    from qcjax.model import scatter_cache

    dtype = cache.dtype
    bits = scatter_cache(jax.lax.bitcast_convert_type(cache, jnp.uint16),
                         jax.lax.bitcast_convert_type(new.astype(dtype), jnp.uint16), layer, index, slot)
    return jax.lax.bitcast_convert_type(bits, dtype)
