"""Reference attention in plain jnp: GQA by grouping query heads (K/V are never repeated in memory)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

# A large finite negative: a fully masked row (which the masks below never produce) would give junk, not NaN.
_MASK_VALUE = -0.7 * float(jnp.finfo(jnp.float32).max)


def attention_mask(q_segment_ids, kv_segment_ids, q_offset) -> jnp.ndarray:
    """[batch, q_len, kv_len] bool: same segment and causal in kv index order."""
    q_len, kv_len = q_segment_ids.shape[1], kv_segment_ids.shape[1]
    q_idx = q_offset[:, None] + jnp.arange(q_len)[None, :]  # [batch, q_len]
    causal = jnp.arange(kv_len)[None, None, :] <= q_idx[:, :, None]
    same = q_segment_ids[:, :, None] == kv_segment_ids[:, None, :]
    return causal & same


def xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, *, scale: float) -> jnp.ndarray:
    b, t, h, d = q.shape
    kvh = k.shape[2]
    g = h // kvh
    qg = q.reshape(b, t, kvh, g, d)  # query heads grouped under their KV head
    scores = jnp.einsum("btkgd,bskd->bkgts", qg, k, preferred_element_type=jnp.float32) * scale
    mask = attention_mask(q_segment_ids, kv_segment_ids, q_offset)  # [b, t, s]
    scores = jnp.where(mask[:, None, None, :, :], scores, _MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bskd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(b, t, h, d).astype(q.dtype)

