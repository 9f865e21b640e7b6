"""The attention switch: the one function the model calls for attention, whatever the backend.

`impl` picks the implementation: "xla" is the reference (plain jnp, any platform); "auto" picks the best available
one for the platform (the XLA reference until Pallas kernels are registered here).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from qcjax.attention.xla import attention_mask, xla_attention

IMPLS = ("auto", "xla")


def resolve_impl(impl: str) -> str:
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} unknown; choose one of {IMPLS}")
    if impl == "auto":
        return "xla"
    return impl


def attend(
    q: jnp.ndarray,  # [batch, q_len, heads, head_dim]
    k: jnp.ndarray,  # [batch, kv_len, kv_heads, head_dim]
    v: jnp.ndarray,  # [batch, kv_len, kv_heads, head_dim]
    q_segment_ids: jnp.ndarray,  # [batch, q_len] int; 0 = padding
    kv_segment_ids: jnp.ndarray,  # [batch, kv_len] int; 0 = padding / empty cache slot
    q_offset: jnp.ndarray | None = None,  # [batch] int: index of the first query in the kv sequence (cache decode)
    *,
    scale: float,
    impl: str = "auto",
) -> jnp.ndarray:  # [batch, q_len, heads, head_dim]
    """Causal grouped-query attention within segments: query i sees keys j <= q_offset + i of its own segment."""
    impl = resolve_impl(impl)
    if q_offset is None:
        q_offset = jnp.zeros((q.shape[0],), jnp.int32)
    return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale=scale)


__all__ = ["attend", "attention_mask", "resolve_impl", "IMPLS"]
