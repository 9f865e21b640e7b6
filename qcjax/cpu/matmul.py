"""The few-row matmul for decode steps on one CPU device (matmul.cc through jax.ffi): the platform switch's "cpu"
implementation of "matmul" (qcjax.platform), which the model's tied head takes ([vocab, embed] as stored).

Decoding reads every weight once per step for a handful of rows; the cost should be that read. XLA:CPU's GEMMs at
1-8 rows fall short of it (fp32 at 8 rows ~12-13 GB/s, bf16 at 1 row ~1.3 GB/s, on a machine that reads ~25 GB/s;
docs/sampling.md): here each weight row is read once, multiplied into every input row while in cache, and the rows
are shared over XLA's threads.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qcjax import platform
from qcjax.cpu import build

# Above these the rows are a prompt's GEMM, which XLA's kernels run well; the kernel is for decode and verify steps
# (bf16 prompts through the AMX tiles measured slower end to end: docs/sampling.md). The 0.5B's head on the EPYC Zen
# 5 VM, against XLA's dot (ms): bf16 16 rows 10.1 vs 14.2, 32 14.5 vs 19.7, 64 36.8 vs 38.2; fp32 16 24.7 vs 28.4,
# 32 42.8 vs 37.1.
MAX_ROWS = {jnp.dtype(jnp.bfloat16): 64, jnp.dtype(jnp.float32): 16}
_DTYPES = tuple(MAX_ROWS)


def applies(x: jax.Array, w: jax.Array) -> bool:
    """Whether x [M, K] . w [N, K]^T goes through the kernel: on one CPU device (the kernel is one device's custom
    call; sharded matmuls stay with XLA, which partitions them), 1..MAX_ROWS[dtype] rows, x and w of one dtype,
    float32 or bfloat16, kernel built."""
    return (x.dtype == w.dtype and jnp.dtype(x.dtype) in _DTYPES and 0 < x.shape[0] <= MAX_ROWS[jnp.dtype(x.dtype)]
            and platform.one_device() and build.available())


@jax.custom_vjp
def rows_matmul(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [M, K] . w [N, K]^T -> float32 [M, N]: both float32 or both bfloat16, float32 accumulation. Differentiable
    (the backward is XLA's dots), so a model applied on the CPU to a few tokens can still be differentiated."""
    if (x.ndim != 2 or w.ndim != 2 or x.shape[1] != w.shape[1] or x.dtype != w.dtype
            or jnp.dtype(x.dtype) not in _DTYPES):
        raise ValueError(f"rows_matmul: x {x.shape} {x.dtype} and w {w.shape} {w.dtype}: expected [M, K] and "
                         f"[N, K] of one dtype, float32 or bfloat16")
    if not build.available():
        raise RuntimeError("rows_matmul: the CPU kernels are unavailable (see the warning); check applies() first")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[0]), jnp.float32)
    return jax.ffi.ffi_call(build.MATMUL_TARGET, out, vmap_method="sequential")(x, w)


def _rows_matmul_fwd(x, w):
    return rows_matmul(x, w), (x, w)


def _rows_matmul_bwd(res, g):  # g [M, N] float32, kept so: autodiff of XLA's mixed-precision dot does the same
    x, w = res
    dx = jax.lax.dot_general(g, w.astype(jnp.float32), (((1,), (0,)), ((), ())))
    dw = jax.lax.dot_general(g, x.astype(jnp.float32), (((0,), (0,)), ((), ())))
    return dx.astype(x.dtype), dw.astype(w.dtype)


rows_matmul.defvjp(_rows_matmul_fwd, _rows_matmul_bwd)
