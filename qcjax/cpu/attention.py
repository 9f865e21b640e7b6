"""Attention on one CPU device as C++ kernels (attention.cc) through jax.ffi: a prompt's causal self-attention
(`causal_attention`) and the sampler's decode steps against the KV cache (`cache_attention`). `attend` is the
platform switch's "cpu" attention (qcjax.platform; what "auto" picks on the CPU): each call takes a kernel where one
applies and XLA's reference (qcjax.attention.xla) otherwise, training included.

XLA:CPU runs the reference (qcjax.attention.xla) as many small ops per layer: the scores are written, masked,
reduced and normalised in separate passes, with transposes between. The kernel keeps each tile's scores in cache
with an online softmax, skips key blocks above the diagonal and packs each key block once for a KV head's whole
group of query heads: 24 layers of the 0.5B shapes 1.6x faster at 512 tokens, 2.7x at 2048 (fp32, 2 Zen 3 cores;
bench/cpu_attention.py, bench/RESULTS.md). The sampler's prefill takes it (`attend(..., prompt=True)`); training
keeps XLA's attention (the kernel's backward would be the reference's anyway).

Built with the decode matmul into one library (qcjax.cpu.build: compiled on first use, cached, off without a
compiler or with QCJAX_CPU_KERNELS=0). Computes in float32; bfloat16 q/k/v are widened for it and the output
rounded back.

Decode steps: XLA:CPU ran the reference over every slot of the cache, widening a bf16 cache to a float32 copy per
layer per step (0.5B, a 4096-token prompt: bf16 steps 58 -> 194 ms, fp32 75 -> 148 ms against a 32-token one).
`cache_attention` reads the cache in its own dtype, only up to each row's last visible position.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from qcjax import platform
from qcjax.attention.xla import PROMPT_QUERY_BLOCKS, xla_attention
from qcjax.cpu import build


def attend(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
           q_offset: jax.Array, *, scale: float, prompt: bool) -> jax.Array:
    """The "cpu" attention implementation, with `qcjax.attention.attend`'s arguments (k/v in the cache's dtype):
    decode steps against a cache take `cache_attention`, a prompt's self-attention `causal_attention`, where they
    apply; everything else (training, a sharded mesh, shapes the kernels do not take) XLA's reference."""
    if not prompt and cache_applies(q, k):  # decode steps read the cache in its own dtype
        return cache_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if prompt and applies(q, k):
        return causal_attention(q, k, v, q_segment_ids, kv_segment_ids, scale)
    return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale=scale,
                         query_blocks=PROMPT_QUERY_BLOCKS if prompt else 1)


def applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether the kernel takes this attention: self-attention (q_len == kv_len) on one CPU device (sharded
    attention stays with XLA, which partitions it), head_dim a multiple of 8, float32 or bfloat16, kernel built."""
    return (q.shape[1] == k.shape[1] and q.shape[-1] % 8 == 0
            and jnp.dtype(q.dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
            and platform.one_device() and build.available())


def _check(fn: str, q, k, v, q_segment_ids, kv_segment_ids, q_offset=None) -> None:
    """One-line errors naming the tensors, for both kernels: self-attention (k/v as long as q) or, with q_offset,
    queries against a cache (k/v any length S); head_dim a multiple of 8; the kernels built."""
    b, t, h, d = q.shape
    s = t if q_offset is None else k.shape[1]
    if k.shape != v.shape or k.dtype != v.dtype or k.shape[:2] != (b, s) or k.shape[3] != d or h % k.shape[2]:
        raise ValueError(f"{fn}: q {q.shape}, k {k.shape} {k.dtype}, v {v.shape} {v.dtype}: expected q [B, T, H, D] "
                         f"and k, v [B, {'T' if q_offset is None else 'S'}, KV, D] of one dtype with KV dividing H")
    want = [(b, t), (b, s)] + ([] if q_offset is None else [(b,)])
    got = [q_segment_ids.shape, kv_segment_ids.shape] + ([] if q_offset is None else [q_offset.shape])
    if got != want:
        raise ValueError(f"{fn}: segment ids {got[0]} and {got[1]}" + ("" if q_offset is None else
                         f", q_offset {got[2]}") + f": expected {', '.join(map(str, want))}")
    if d % 8:
        raise ValueError(f"{fn}: head_dim {d} is not a multiple of 8")
    if not build.available():
        raise RuntimeError(f"{fn}: the CPU kernels are unavailable (see the warning); check the applies functions")


@functools.partial(jax.custom_vjp, nondiff_argnums=(5,))
def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array,
                     kv_segment_ids: jax.Array, scale: float) -> jax.Array:
    """q [B, T, H, D], k/v [B, T, KV, D], segment ids [B, T] -> [B, T, H, D] in q's dtype: query i attends to keys
    j <= i with the same segment id, as `xla_attention` with q_offset 0 (a query that sees no key gets zeros, where
    the reference averages every value; with segment ids equal on the diagonal, as the sampler's are, none does).
    Differentiable: the backward is the reference's."""
    _check("causal_attention", q, k, v, q_segment_ids, kv_segment_ids)
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    out = jax.ffi.ffi_call(build.ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           vmap_method="sequential")(f32(q), f32(k), f32(v), i32(q_segment_ids),
                                                     i32(kv_segment_ids), scale=np.float32(scale))
    return out.astype(q.dtype)


def _causal_attention_fwd(q, k, v, q_segment_ids, kv_segment_ids, scale):
    return causal_attention(q, k, v, q_segment_ids, kv_segment_ids, scale), (q, k, v, q_segment_ids, kv_segment_ids)


def _causal_attention_bwd(scale, res, g):
    q, k, v, qs, ks = res
    offset = jnp.zeros((q.shape[0],), jnp.int32)
    _, vjp = jax.vjp(lambda q, k, v: xla_attention(q, k, v, qs, ks, offset, scale=scale), q, k, v)
    return (*vjp(g), None, None)


causal_attention.defvjp(_causal_attention_fwd, _causal_attention_bwd)


def cache_applies(q: jax.Array, k: jax.Array) -> bool:
    """Whether the decode kernel takes this attention: queries against a cache (q_len < kv_len) on one CPU device,
    head_dim a multiple of 8, q float32 or bfloat16, the cache float32 or bfloat16, kernel built."""
    dtypes = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
    return (q.shape[1] < k.shape[1] and q.shape[-1] % 8 == 0 and jnp.dtype(q.dtype) in dtypes
            and jnp.dtype(k.dtype) in dtypes and platform.one_device() and build.available())


def cache_attention(q: jax.Array, k: jax.Array, v: jax.Array, q_segment_ids: jax.Array, kv_segment_ids: jax.Array,
                    q_offset: jax.Array, scale: float) -> jax.Array:
    """q [B, T, H, D] against a cache k/v [B, S, KV, D] (its own dtype, float32 or bfloat16), segment ids [B, T] and
    [B, S], q_offset [B] -> [B, T, H, D] in q's dtype: query i of row b sees the keys j <= q_offset[b] + i with its
    own segment id, as `xla_attention` (a query that sees no key gets zeros, where the reference averages every
    value). For inference: not differentiable."""
    _check("cache_attention", q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    i32 = lambda x: x.astype(jnp.int32)  # noqa: E731
    out = jax.ffi.ffi_call(build.CACHE_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                           vmap_method="sequential")(q.astype(jnp.float32), k, v, i32(q_segment_ids),
                                                     i32(kv_segment_ids), i32(q_offset), scale=np.float32(scale))
    return out.astype(q.dtype)
