"""Rotary position embeddings (rotate-half form) with optional static YaRN, matching transformers' Qwen2."""
from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from qcjax.config import ModelConfig


def base_powers(base: float, dim: int) -> np.ndarray:
    """base ** (2i / dim) for i < dim // 2, correctly rounded to float32 [dim // 2] (the exponents are exact in
    float32; the float64 power is within one float64 step, far inside half a float32 step)."""
    exponents = (np.arange(0, dim, 2, dtype=np.float32) / np.float32(dim)).astype(np.float64)
    return np.power(np.float64(base), exponents).astype(np.float32)


def inv_frequencies(cfg: ModelConfig) -> tuple[np.ndarray, float]:
    """(inverse frequencies [head_dim // 2] float32, attention factor applied to cos and sin).

    The same float32 steps as transformers (`_compute_default_rope_parameters`, `_compute_yarn_parameters`):
    exponents 2i/dim in float32, base**exponent, then reciprocals and the YaRN blend in float32. The one place
    float32 libraries disagree is the power: numpy's float32 `power` is off by one float32 step for 14 of the 64
    frequencies at head_dim 128 on some hosts (SIMD builds), an angle error that grows with the position (1.8e-3
    relative logit error at position 100000). So the power is taken in float64 and rounded once to float32: the
    correctly rounded value on every host (`base_powers`; tests/test_rope.py checks it against exact arithmetic
    and transformers)."""
    dim = cfg.dim_per_head
    base = cfg.rope_theta
    pos_freqs = base_powers(base, dim)
    y = cfg.rope_scaling
    if y is None:
        return (np.float32(1.0) / pos_freqs).astype(np.float32), 1.0

    def get_mscale(scale, mscale=1.0):
        return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0

    attention_factor = y.attention_factor
    if attention_factor is None:
        if y.mscale and y.mscale_all_dim:
            attention_factor = get_mscale(y.factor, y.mscale) / get_mscale(y.factor, y.mscale_all_dim)
        else:
            attention_factor = get_mscale(y.factor)

    def correction_dim(num_rotations):
        return (dim * math.log(y.original_max_position_embeddings / (num_rotations * 2 * math.pi))) / (
            2 * math.log(base)
        )

    low, high = correction_dim(y.beta_fast), correction_dim(y.beta_slow)
    if y.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # as transformers: avoid a zero-width ramp
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - np.float32(low)) / np.float32(high - low), 0, 1)
    extrapolation_factor = (np.float32(1) - ramp).astype(np.float32)
    inv_extra = np.float32(1.0) / pos_freqs
    inv_inter = np.float32(1.0) / (np.float32(y.factor) * pos_freqs)
    inv = inv_inter * (np.float32(1) - extrapolation_factor) + inv_extra * extrapolation_factor
    return inv.astype(np.float32), float(attention_factor)


def cos_sin(cfg: ModelConfig, positions: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """cos and sin tables for integer positions [batch, seq] -> two [batch, seq, head_dim] float32 arrays."""
    inv, scale = inv_frequencies(cfg)
    freqs = positions.astype(jnp.float32)[..., None] * jnp.asarray(inv)  # [batch, seq, head_dim // 2]
    emb = jnp.concatenate([freqs, freqs], axis=-1)
    return jnp.cos(emb) * scale, jnp.sin(emb) * scale


def apply_rope(x: jnp.ndarray, cos: jnp.ndarray, sin: jnp.ndarray) -> jnp.ndarray:
    """Rotate x [batch, seq, heads, head_dim] by tables [batch, seq, head_dim]; math in float32."""
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    out = x32 * cos[:, :, None, :] + rotated * sin[:, :, None, :]
    return out.astype(x.dtype)
