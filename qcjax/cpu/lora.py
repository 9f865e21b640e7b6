"""Per-row LoRA adapters for decode steps on one CPU device (lora.cc through jax.ffi): the platform switch's "cpu"
implementation of "lora" (qcjax.platform), which `qcjax.row_lora.delta` hands each projection's adapters to.

XLA:CPU gathers every row's adapter out of the bank into a new array before its dots (and widens a bfloat16 one to
float32 in a slow loop); the kernel reads each row's A and B in place. Prompts (more than MAX_ROWS tokens) keep
XLA's gathered GEMMs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qcjax import platform
from qcjax.cpu import build
from qcjax.cpu.layers import MAX_TOKENS as MAX_ROWS  # the steps the layer loop takes: decode and verify steps
_DTYPES = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))


def applies(x, a, b, index, scale) -> bool:
    """Whether the kernel takes this call: x [B, T, in] with B x T <= MAX_ROWS, a bank of float32 or bfloat16 with
    rank <= 256, one CPU device, kernels built."""
    return (x.shape[0] * x.shape[1] <= MAX_ROWS and jnp.dtype(a.dtype) in _DTYPES and a.shape[-1] <= 256
            and platform.one_device() and build.available())


def row_lora(x: jax.Array, a: jax.Array, b: jax.Array, index: jax.Array, scale: jax.Array) -> jax.Array:
    """x [B, T, in]; a [A, in, R] and b [A, R, out] (the bank's stacks, layers x slots flattened); index [B] (row b's
    adapter in them, -1: none); scale [B] -> float32 [B, T, out]: each row's scale * (x A) B, as
    `qcjax.row_lora`'s XLA formulation computes it (x in the bank's dtype, h rounded to it)."""
    bsz, t, k = x.shape
    rows = x.reshape(bsz * t, k).astype(a.dtype)
    idx = jnp.repeat(index.astype(jnp.int32), t)
    sc = jnp.repeat(scale.astype(jnp.float32), t)
    out = jax.ShapeDtypeStruct((bsz * t, b.shape[2]), jnp.float32)
    y = jax.ffi.ffi_call(build.LORA_TARGET, out, vmap_method="sequential")(rows, a, b, idx, sc)
    return y.reshape(bsz, t, -1)
