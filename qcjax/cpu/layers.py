"""The decoder layers of a decode step on one CPU device: the platform switch's "cpu" implementation of "layers"
(qcjax.platform), which `Qwen2.hidden_states` hands its layer scan to.

The model scans its layers over one stacked copy of the weights ([layers, ...] per param). Inside that scan XLA:CPU
copies each layer's weights out of the stack (a dynamic-slice per kernel) before the layer's dots, so a decode step
wrote and re-read every weight besides reading it (docs/sampling.md, "The CPU layer loop"). Here the loop over
the layers closes over the stacked params instead of scanning them, and the seven projections are
`stacked_matmul(x, kernel_stack, layer)`: stacked.cc reads layer `layer` of the stack in place (float32, bfloat16,
or qwix's int8 values with their per-output-channel scales, dequantized in the kernel's float32 sums). The rest of
the layer is the model's own functions (RMSNorm's formula, qcjax.rope, qcjax.model's cache targets/scatter/read,
qcjax.attention.attend), in the model's order and dtypes; tests/cpu/test_cpu_layers.py checks it against the
model's scan.

It applies to decode and verify steps (at most MAX_TOKENS tokens in the batch) with a cache, on one CPU device, for
the plain model and the int8-quantized one (not a tree with LoRA adapters, or nf4), and adds per-row adapters
(qcjax.row_lora) as the model does; longer prompts keep the model's scan, whose GEMMs XLA runs well.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from qcjax import platform, rope
from qcjax.config import LORA_PROJECTIONS
from qcjax.cpu import build

_FLOATS = (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
# Tokens in a forward at most: decode steps, speculative verify steps (rows x draft width) and short prompt chunks.
# Up to here the loop beats the model's scan (which copies every layer's weights out of the stack) at every size
# measured: 0.5B decode steps, tok/s, loop vs scan: bf16 16 rows 257 vs 146, 32 326 vs 190, 64 381 vs 199; fp32 16
# 172 vs 114, 32 218 vs 167, 64 231 vs 210 (EPYC Zen 5 VM, 2 threads).
MAX_TOKENS = 64
PROJECTIONS = tuple(LORA_PROJECTIONS.values())


def _int8(kernel: Any, n_in: int = 1) -> bool:
    """Whether a kernel leaf is qwix's int8 WithAux with one scale per output channel: values [L, in..., out...],
    scales [L, 1 (per input dim)..., out...]."""
    qarray = getattr(kernel, "array", None)
    qvalue, scale = getattr(qarray, "qvalue", None), getattr(qarray, "scale", None)
    if qvalue is None or scale is None or getattr(qarray, "zero_point", None) is not None:
        return False
    return (jnp.dtype(qvalue.dtype) == jnp.int8 and jnp.dtype(scale.dtype) in _FLOATS
            and tuple(scale.shape) == (qvalue.shape[0], *(1,) * n_in, *qvalue.shape[1 + n_in:]))


def _kernel_ok(kernel: Any, n_in: int) -> bool:
    if _int8(kernel, n_in):
        return True
    if hasattr(kernel, "array"):  # another quantized form (nf4's 4-bit values, whose WithAux reports a float dtype)
        return False
    dtype = getattr(kernel, "dtype", None)  # an array (or its shape and dtype)
    return dtype is not None and getattr(kernel, "ndim", 0) >= 1 + n_in + 1 and jnp.dtype(dtype) in _FLOATS


def stacked_matmul(x: jax.Array, kernel: Any, layer: jax.Array, n_in: int = 1) -> jax.Array:
    """x [M, in] (bfloat16 as it is, other floats widened to float32) . layer `layer` of `kernel` ([L, in...,
    out...]: float32 or bfloat16, or qwix's int8 WithAux with scales [L, 1, out...]), contracting the `n_in` input dims -> float32
    [M, out] (flattened out dims), summed in float32. The stack is read in place (no copy of the layer)."""
    scale = jnp.zeros((0,), jnp.float32)
    if _int8(kernel, n_in):
        w, scale = kernel.array.qvalue, kernel.array.scale
        scale = scale.reshape(scale.shape[0], -1)
    else:
        w = kernel
    lead = w.shape[0]
    k = 1
    for d in w.shape[1:1 + n_in]:
        k *= d
    w = w.reshape(lead, k, -1)  # a bitcast: the stack's own bytes
    if x.shape[-1] != k:
        raise ValueError(f"stacked_matmul: x {x.shape} against kernel {w.shape} (in {k})")
    out = jax.ShapeDtypeStruct((x.shape[0], w.shape[2]), jnp.float32)
    x = x if x.dtype == jnp.bfloat16 else x.astype(jnp.float32)  # bf16 rows: bf16 dot products where built
    return jax.ffi.ffi_call(build.STACKED_TARGET, out)(x, w, jnp.asarray(layer, jnp.int32), scale)


def applies(cfg, params, carry, cos, sin, q_seg, kv_seg, q_offset) -> bool:
    """Whether the layer loop takes this forward: a cache (inference), at most MAX_TOKENS tokens (decode steps), one
    CPU device, the plain or int8 model with every projection's kernel in a form stacked.cc reads, kernels built."""
    x, cache = carry
    if params is None or cache is None:
        return False
    if x.shape[0] * x.shape[1] > MAX_TOKENS or not platform.one_device() or not build.available():
        return False
    try:
        nodes = [(params[a][b], 2 if b == "o_proj" else 1) for a, b in PROJECTIONS]
        kernels = [(node["kernel"], n) for node, n in nodes]
    except (KeyError, TypeError):
        return False
    if any(set(node) - {"kernel", "bias"} for node, _ in nodes):  # LoRA adapters beside a kernel: the model's scan
        return False
    return all(_kernel_ok(k, n) for k, n in kernels) and jnp.dtype(cfg.dtype) in _FLOATS


def _rms_norm(cfg, x: jax.Array, scale: jax.Array) -> jax.Array:
    """qcjax.model.RMSNorm's formula on one layer's scale."""
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + cfg.rms_norm_eps)
    return (y * scale.astype(jnp.float32)).astype(cfg.dtype)


def decoder_layers(cfg, params, carry, cos, sin, q_seg, kv_seg, q_offset):
    """`Qwen2.layers` (the scan of DecoderLayer) for a decode step: carry (x [B, T, E], (k pool, v pool, pages))
    -> the same after every layer, the layers' weights read in place from the stacks in `params` (params["layers"])."""
    from qcjax.attention import attend
    from qcjax import row_lora
    from qcjax.model import cache_targets, read_pages, scatter_cache

    x, (k_cache, v_cache, pages) = carry
    dt = cfg.dtype
    # A 16-bit cache is carried through the loop as its uint16 bits (cast once each way around the loop): inside
    # the loop XLA:CPU materialised the bitcasts of qcjax.cpu.cache's bits write as copies of the whole pool, two
    # per layer per array. The scatter itself is the core's (qcjax.model.scatter_cache), on the bits.
    cache_dt = k_cache.dtype
    bits = jnp.dtype(cache_dt).itemsize == 2
    to_bits = (lambda c: jax.lax.bitcast_convert_type(c, jnp.uint16)) if bits else (lambda c: c)  # noqa: E731
    from_bits = (lambda c: jax.lax.bitcast_convert_type(c, cache_dt)) if bits else (lambda c: c)  # noqa: E731
    b, t, e = x.shape
    h, kvh, d = cfg.num_heads, cfg.num_kv_heads, cfg.dim_per_head

    def proj(target, rows, layer, n_in=1):  # the model's Linear: dot in float32 -> dt, + bias in dt
        node = params[LORA_PROJECTIONS[target][0]][LORA_PROJECTIONS[target][1]]
        y = stacked_matmul(rows, node["kernel"], layer, n_in).astype(dt)
        if "bias" in node:
            y = y + jax.lax.dynamic_index_in_dim(node["bias"], layer, 0, keepdims=False).reshape(-1).astype(dt)
        lora = row_lora.delta(rows.reshape(b, t, -1), target, layer)  # per-row adapters, as the model adds them
        return y if lora is None else (y + lora.reshape(y.shape).astype(dt)).astype(dt)

    def layer_fn(layer, state):
        x, k_cache, v_cache = state
        norm = lambda name, v: _rms_norm(cfg, v, jax.lax.dynamic_index_in_dim(  # noqa: E731
            params[name]["scale"], layer, 0, keepdims=False))
        rows = norm("input_norm", x).reshape(b * t, e)
        q = rope.apply_rope(proj("q", rows, layer).reshape(b, t, h, d), cos, sin)
        k = rope.apply_rope(proj("k", rows, layer).reshape(b, t, kvh, d), cos, sin)
        v = proj("v", rows, layer).reshape(b, t, kvh, d)
        page_size = k_cache.shape[2]
        index, slot = cache_targets(q_offset, t, pages, page_size, q_seg != 0)
        k_cache, v_cache = (scatter_cache(c, to_bits(n.reshape(b, t, kvh * d).astype(cache_dt)), layer, index, slot)
                            for c, n in ((k_cache, k), (v_cache, v)))
        if pages is None:
            kc, vc = (jax.lax.dynamic_index_in_dim(c, layer, 0, keepdims=False) for c in (k_cache, v_cache))
        elif pages.shape[1] * page_size == t:
            kc, vc = (to_bits(n.astype(cache_dt)) for n in (k, v))
        else:
            kc, vc = (read_pages(c, layer, pages) for c in (k_cache, v_cache))
        kc, vc = (from_bits(c).reshape(b, -1, kvh, d) for c in (kc, vc))
        out = attend(q, kc, vc, q_seg, kv_seg, q_offset, scale=d**-0.5, impl=cfg.attention_impl,
                     prompt=q.shape[1] == kc.shape[1])
        x = x + proj("o", out.reshape(b * t, h * d), layer, 2).reshape(b, t, e)
        rows = norm("post_attn_norm", x).reshape(b * t, e)
        gate = proj("gate", rows, layer)
        up = proj("up", rows, layer)
        hidden = jax.nn.silu(gate) * up
        x = x + proj("down", hidden, layer).reshape(b, t, e)
        return x, k_cache, v_cache

    x, k_cache, v_cache = jax.lax.fori_loop(0, cfg.num_layers, layer_fn, (x, to_bits(k_cache), to_bits(v_cache)))
    return x, (from_bits(k_cache), from_bits(v_cache), pages)
