"""Run a per-device attention kernel over the current mesh: batch over the batch axes, heads over the head axes.

Pallas kernels cannot be partitioned automatically (Mosaic refuses; Triton would run unsharded), so the kernels are
wrapped in `jax.shard_map` with specs from the one set of logical-axis rules (qcjax.sharding). GQA needs each shard
to hold the KV heads of its own query heads: when the rules shard query heads but cannot shard the (fewer) KV heads,
each shard slices the KV heads its query heads use out of the replicated K/V.
"""
from __future__ import annotations

import math
from typing import Callable

import jax
from jax import lax
from jax.sharding import PartitionSpec as P

from qcjax.sharding import logical_to_spec

Kernel = Callable[..., jax.Array]  # (q, k, v, q_segment_ids, kv_segment_ids, q_offset) -> out like q

_Q_AXES = ("act_batch", "act_length", "act_heads", "act_head_dim")
_KV_AXES = ("act_batch", "act_length", "act_kv_heads", "act_head_dim")


def _axes(entry) -> tuple[str, ...]:
    return () if entry is None else (entry,) if isinstance(entry, str) else tuple(entry)


def shard_kernel(kernel: Kernel, q, k, v, q_segment_ids, kv_segment_ids, q_offset) -> jax.Array:
    """`kernel(...)` on each shard of the current mesh (`jax.set_mesh`); a plain call without a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh is None or mesh.empty or mesh.size == 1:
        return kernel(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
    h, kvh = q.shape[2], k.shape[2]
    g = h // kvh
    q_spec = logical_to_spec(_Q_AXES, q.shape, mesh)
    kv_spec = logical_to_spec(_KV_AXES, k.shape, mesh)
    batch = q_spec[0] if kv_spec[0] == q_spec[0] else None  # same batch size, so the same axes in practice
    q_heads, kv_heads = _axes(q_spec[2]), _axes(kv_spec[2])

    kv_local, slice_kv = kvh, False
    if q_heads and q_heads != kv_heads:
        local_h = h // math.prod(mesh.shape[a] for a in q_heads)
        if not kv_heads and (local_h % g == 0 or g % local_h == 0):
            kv_local, slice_kv = max(1, local_h // g), True  # slice this shard's KV heads from replicated K/V
        else:
            q_heads, kv_heads = (), ()  # no consistent split: replicate heads
    elif q_heads:
        kv_local = kvh // math.prod(mesh.shape[a] for a in kv_heads)
    as_entry = lambda axes: None if not axes else axes[0] if len(axes) == 1 else axes
    q_spec = P(batch, None, as_entry(q_heads), None)
    kv_spec = P(batch, None, as_entry(kv_heads), None)
    seg_spec, off_spec = P(batch, None), P(batch)

    def body(q, k, v, qs, ks, off):
        if slice_kv:
            first = (lax.axis_index(q_heads) * q.shape[2]) // g  # KV head of this shard's first query head
            k = lax.dynamic_slice_in_dim(k, first, kv_local, axis=2)
            v = lax.dynamic_slice_in_dim(v, first, kv_local, axis=2)
        return kernel(q, k, v, qs, ks, off)

    return jax.shard_map(
        body, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec, seg_spec, seg_spec, off_spec), out_specs=q_spec,
        check_vma=False,
    )(q, k, v, q_segment_ids, kv_segment_ids, q_offset)
