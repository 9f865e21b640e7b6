"""Our Pallas cache-attention kernels for the sampler: a few new query tokens per sequence against a KV cache.

The batch is ragged: every row has its own cache length (`q_offset`, the tokens before the new ones). Both kernels
pack the query heads of a GQA group and the new tokens into the rows of one tile ([tokens * groups, head_dim]), so
each K/V block is read from memory once per KV head, not once per query head, and they skip every K/V block past
the row's causal frontier (q_offset + new tokens): a short sequence in a long cache costs only its own length.
Masking is the reference's (same segment id and key index <= q_offset + query index), so padding tokens and empty
cache slots behave exactly as in qcjax.attention.xla. Forward only (sampling needs no gradients); any number of
new tokens works, so a prompt prefill into a longer cache runs here too (rows are tiled).

- TPU (Mosaic): grid (batch, row tiles, KV blocks); the per-row number of KV blocks is scalar-prefetched so the
  index map stops fetching (and the body stops computing) past the frontier. The cache is viewed as
  [batch, max_len, kv_heads * head_dim] (a free reshape) so one block holds every KV head and satisfies Mosaic's
  (8, 128) tiling for head_dim 64 as well as 128; heads are static lane slices of it.
- GPU (Triton): grid (row tiles, batch, kv_heads * kv_splits); each program loops over the KV blocks of its split
  up to the frontier (flash-decoding: splits keep the GPU busy at batch 1), and XLA merges the splits' partial
  softmaxes.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import tpu as pltpu
from jax.experimental.pallas import triton as plgpu

from qcjax.attention import gpu
from qcjax.attention.xla import _MASK_VALUE

_PAD_SEGMENT = -1  # segment id of padded query rows: matches no key


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """block_rows: query rows (new tokens x query heads of a group) per tile; block_k: cache slots per K/V block;
    kv_splits: (GPU only) independent programs per KV head along the cache, merged afterwards."""

    block_rows: int = 64
    block_k: int = 512
    kv_splits: int = 1
    num_warps: int = 4
    num_stages: int = 2


# Per-chip defaults, matched by substring of `device.device_kind`; first match wins. TPU: 512-slot K/V blocks of
# all KV heads (40/8 at head_dim 128: 1 MiB bf16 per block, 4 MiB double-buffered K+V) fit every generation's
# scoped VMEM. GPU: 16 splits give batch x kv_heads x 16 programs (>= 2 per SM on an H100 at batch 1, 2 KV heads).
# The GPU rows pass tests/test_gpu.py on an H200; neither is tuned on hardware.
DEFAULT_BLOCK_SIZES: tuple[tuple[str, BlockSizes], ...] = (
    ("TPU", BlockSizes(block_rows=128, block_k=512)),
    ("H100", BlockSizes(block_rows=64, block_k=64, kv_splits=16, num_warps=4, num_stages=3)),
    ("H200", BlockSizes(block_rows=64, block_k=64, kv_splits=16, num_warps=4, num_stages=3)),
    ("", BlockSizes(block_rows=64, block_k=64, kv_splits=8)),
)


# GPU: the query rows stay for the whole program; K and V blocks stream (see gpu.TILES).
GPU_TILES = {"cache": ("block_rows", 1, "block_k", 2)}


def default_block_sizes(device_kind: str, head_dim: int = 128, itemsize: int = 2) -> BlockSizes:
    """The chip's tiles; on a GPU shrunk to its shared memory for this head_dim and input size (gpu.py)."""
    bs = next(b for key, b in DEFAULT_BLOCK_SIZES if key in device_kind)
    if "TPU" in device_kind:
        return bs
    return gpu.fit_shared_memory(bs, GPU_TILES, head_dim * itemsize, device_kind)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def _rows(q, q_segment_ids, q_offset, kv_heads: int, block_rows: int):
    """q [b, t, h, d] -> rows [b, kvh, Rp, d] (row r = token r // g, query head r % g of the group), with the rows'
    positions and segment ids [b, Rp]; Rp is t * g rounded up to block_rows."""
    b, t, h, d = q.shape
    g = h // kv_heads
    r = t * g
    rp = _round_up(r, block_rows)
    rows = q.reshape(b, t, kv_heads, g, d).transpose(0, 2, 1, 3, 4).reshape(b, kv_heads, r, d)
    rows = jnp.pad(rows, ((0, 0), (0, 0), (0, rp - r), (0, 0)))
    tok = jnp.arange(r, dtype=jnp.int32) // g  # [r]
    pos = q_offset.astype(jnp.int32)[:, None] + tok[None, :]  # [b, r]
    seg = jnp.take(q_segment_ids.astype(jnp.int32), tok, axis=1)  # [b, r]
    # Padded rows sit at the last real position (so they never widen the causal frontier) and see nothing.
    pos = jnp.pad(pos, ((0, 0), (0, rp - r)), mode="edge")
    seg = jnp.pad(seg, ((0, 0), (0, rp - r)), constant_values=_PAD_SEGMENT)
    return rows, pos, seg


def _unrows(rows, t: int, h: int):
    """rows [b, kvh, Rp, d] -> [b, t, h, d]."""
    b, kvh, _, d = rows.shape
    g = h // kvh
    return rows[:, :, : t * g].reshape(b, kvh, t, g, d).transpose(0, 2, 1, 3, 4).reshape(b, t, h, d)


def _visible_blocks(pos, block_rows: int, block_k: int, num_blocks: int):
    """[b, row tiles] number of K/V blocks up to each tile's causal frontier (>= 1)."""
    b, rp = pos.shape
    last = jnp.max(pos.reshape(b, rp // block_rows, block_rows), axis=2)
    return jnp.clip((last + block_k) // block_k, 1, num_blocks).astype(jnp.int32)


def _check(q, k) -> None:
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"cache attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if q.shape[3] != k.shape[3]:
        raise ValueError(f"cache attention: q head_dim={q.shape[3]} != cache head_dim={k.shape[3]}")


# ---- TPU -------------------------------------------------------------------------------------------------------
def _tpu_block_k(max_len: int, block_k: int) -> int:
    """A K/V block that tiles the cache: block_k if it divides max_len, else the whole (short) cache."""
    if block_k % 128:
        raise ValueError(f"TPU cache attention: block_k={block_k} must be a multiple of 128 (lane width)")
    if max_len % block_k == 0:
        return block_k
    if max_len <= block_k:
        return max_len
    raise ValueError(f"TPU cache attention: cache max_len={max_len} is not a multiple of block_k={block_k}; "
                     "allocate the cache in multiples of the block")


def _tpu_kernel(nblk_ref, q_ref, pos_ref, qseg_ref, k_ref, v_ref, kseg_ref, o_ref, m_sc, l_sc, acc_sc, *,
                scale, block_k, head_dim):
    # q, o, acc [kvh, br, d]; pos, qseg [br, 1]; k, v [bk, kvh * d]; kseg [1, bk]; m, l [kvh, br, 1]
    bi, ri, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    kv_heads = q_ref.shape[0]

    @pl.when(j == 0)
    def _init():
        m_sc[...] = jnp.full(m_sc.shape, -jnp.inf, jnp.float32)
        l_sc[...] = jnp.zeros(l_sc.shape, jnp.float32)
        acc_sc[...] = jnp.zeros(acc_sc.shape, jnp.float32)

    @pl.when(j < nblk_ref[bi, ri])
    def _compute():
        kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (1, block_k), 1)
        visible = (kpos <= pos_ref[...]) & (kseg_ref[...] == qseg_ref[...])  # [br, bk]
        for h in range(kv_heads):
            lanes = slice(h * head_dim, (h + 1) * head_dim)
            s = lax.dot_general(q_ref[h], k_ref[:, lanes], (((1,), (1,)), ((), ())),
                                preferred_element_type=jnp.float32) * scale
            s = jnp.where(visible, s, _MASK_VALUE)
            m_prev = m_sc[h]
            m_new = jnp.maximum(m_prev, jnp.max(s, axis=1, keepdims=True))
            alpha = jnp.exp(m_prev - m_new)
            p = jnp.exp(s - m_new)
            l_sc[h] = alpha * l_sc[h] + jnp.sum(p, axis=1, keepdims=True)
            v = v_ref[:, lanes]
            acc_sc[h] = alpha * acc_sc[h] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                            preferred_element_type=jnp.float32)
            m_sc[h] = m_new

    @pl.when(j == pl.num_programs(2) - 1)
    def _finish():
        o_ref[...] = (acc_sc[...] / l_sc[...]).astype(o_ref.dtype)


def _dce_able(kernel):
    """A jit boundary around a cache kernel: jax never dead-code-eliminates a bare pallas_call, a jit whose outputs
    are unused it does. flax's nn.scan (0.12.12 with jax 0.11.2) traces the model's layer body and drops what the
    broadcast outputs do not need; a bare pallas_call fed by the scanned cache survives that and fails its check
    ("broadcasted variable has a data dependency on the scan body"). The training kernels sit in a custom_vjp,
    which DCE drops the same way."""
    return functools.partial(jax.jit, static_argnames=("scale", "block_sizes", "interpret"))(kernel)


@_dce_able
def tpu_cache_attention(
    q: jax.Array,  # [batch, t, heads, head_dim]: the new tokens
    k: jax.Array,  # [batch, max_len, kv_heads, head_dim]: the whole cache (new tokens already written)
    v: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    q_segment_ids: jax.Array,  # [batch, t] int; 0 = padding
    kv_segment_ids: jax.Array,  # [batch, max_len] int; 0 = empty slot
    q_offset: jax.Array,  # [batch] int: cache length before the new tokens
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:  # [batch, t, heads, head_dim]
    _check(q, k)
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    if d % 64:
        raise ValueError(f"TPU cache attention: head_dim={d} must be a multiple of 64")
    bk = _tpu_block_k(s_len, block_sizes.block_k)
    sub = 16 if q.dtype == jnp.bfloat16 else 8
    if block_sizes.block_rows % sub:
        raise ValueError(f"TPU cache attention: block_rows={block_sizes.block_rows} must be a multiple of {sub} "
                         f"for {q.dtype} (sublane tiling)")
    br = min(block_sizes.block_rows, _round_up(t * (h // kvh), sub))
    rows, pos, seg = _rows(q, q_segment_ids, q_offset, kvh, br)  # [b, kvh, Rp, d], [b, Rp], [b, Rp]
    rp = rows.shape[2]
    nk = s_len // bk
    nblk = _visible_blocks(pos, br, bk, nk)  # [b, Rp // br]

    def kv_map(bi, ri, j, nblk_ref):  # past the frontier: keep the last needed block (no new DMA)
        return bi, jnp.minimum(j, nblk_ref[bi, ri] - 1), 0

    def kseg_map(bi, ri, j, nblk_ref):
        return bi, 0, jnp.minimum(j, nblk_ref[bi, ri] - 1)

    grid_spec = pltpu.PrefetchScalarGridSpec(
        num_scalar_prefetch=1,
        grid=(b, rp // br, nk),
        in_specs=[
            pl.BlockSpec((None, kvh, br, d), lambda bi, ri, j, n: (bi, 0, ri, 0)),
            pl.BlockSpec((None, br, 1), lambda bi, ri, j, n: (bi, ri, 0)),
            pl.BlockSpec((None, br, 1), lambda bi, ri, j, n: (bi, ri, 0)),
            pl.BlockSpec((None, bk, kvh * d), kv_map),
            pl.BlockSpec((None, bk, kvh * d), kv_map),
            pl.BlockSpec((None, 1, bk), kseg_map),
        ],
        out_specs=pl.BlockSpec((None, kvh, br, d), lambda bi, ri, j, n: (bi, 0, ri, 0)),
        scratch_shapes=[
            pltpu.VMEM((kvh, br, 1), jnp.float32),
            pltpu.VMEM((kvh, br, 1), jnp.float32),
            pltpu.VMEM((kvh, br, d), jnp.float32),
        ],
    )
    out = pl.pallas_call(
        functools.partial(_tpu_kernel, scale=scale, block_k=bk, head_dim=d),
        grid_spec=grid_spec,
        out_shape=jax.ShapeDtypeStruct(rows.shape, q.dtype),
        compiler_params=pltpu.CompilerParams(dimension_semantics=("parallel", "parallel", "arbitrary")),
        interpret=interpret,
        name="qcjax_cache_attention_tpu",
    )(nblk, rows, pos[..., None], seg[..., None], k.reshape(b, s_len, kvh * d), v.reshape(b, s_len, kvh * d),
      kv_segment_ids.astype(jnp.int32)[:, None, :])
    return _unrows(out, t, h)


# ---- GPU -------------------------------------------------------------------------------------------------------
def _gpu_blocks(max_len: int, bs: BlockSizes) -> tuple[int, int]:
    """(block_k, kv_splits) that tile the cache: powers of two, shrunk until they divide max_len."""
    bk, splits = bs.block_k, bs.kv_splits
    for name, x in (("block_k", bk), ("kv_splits", splits), ("block_rows", bs.block_rows)):
        if x < 1 or x & (x - 1) or (name != "kv_splits" and x < 16):
            raise ValueError(f"GPU cache attention: {name}={x} must be a power of two (>= 16 for block sizes)")
    if max_len % 16:
        raise ValueError(f"GPU cache attention: cache max_len={max_len} must be a multiple of 16")
    while max_len % bk:
        bk //= 2
    while splits > 1 and max_len % (splits * bk):
        splits //= 2
    return bk, splits


def _gpu_kernel(pos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, m_ref, l_ref, *,
                scale, block_k, split_blocks, kv_splits):
    # q [br, d]; pos, qseg [br]; k, v [S, d] (one KV head); kseg [S]; o [br, d] fp32; m, l [br]
    br, d = q_ref.shape
    split = pl.program_id(2) % kv_splits
    q, pos, qseg = q_ref[...], pos_ref[...], qseg_ref[...]
    first = split * split_blocks
    frontier = lax.div(jnp.max(pos) + block_k, block_k)  # blocks up to the causal frontier
    last = jnp.minimum(first + split_blocks, frontier)

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        s = lax.dot_general(q, k_ref[ks, :], (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32) * scale
        visible = (kpos[None, :] <= pos[:, None]) & (kseg_ref[ks][None, :] == qseg[:, None])
        s = jnp.where(visible, s, _MASK_VALUE)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp(m - m_new)
        p = jnp.exp(s - m_new[:, None])
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + lax.dot_general(p.astype(v.dtype), v, (((1,), (0,)), ((), ())),
                                                     preferred_element_type=jnp.float32)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((br, d), jnp.float32), jnp.full((br,), -jnp.inf, jnp.float32), jnp.zeros((br,), jnp.float32))
    acc, m, l = lax.fori_loop(first, last, body, init)
    o_ref[...] = acc  # unnormalised: the splits are merged outside
    m_ref[...] = m
    l_ref[...] = l


@_dce_able
def gpu_cache_attention(
    q: jax.Array,  # [batch, t, heads, head_dim]
    k: jax.Array,  # [batch, max_len, kv_heads, head_dim]
    v: jax.Array,
    q_segment_ids: jax.Array,  # [batch, t]
    kv_segment_ids: jax.Array,  # [batch, max_len]
    q_offset: jax.Array,  # [batch]
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:  # [batch, t, heads, head_dim]
    _check(q, k)
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    if d < 16 or d & (d - 1):
        raise ValueError(f"GPU cache attention: head_dim={d} must be a power of two >= 16 (Triton tiles)")
    bk, splits = _gpu_blocks(s_len, block_sizes)
    br = min(block_sizes.block_rows, max(16, _next_pow2(t * (h // kvh))))
    rows, pos, seg = _rows(q, q_segment_ids, q_offset, kvh, br)
    rp = rows.shape[2]
    split_len = s_len // splits
    part = (splits, b, kvh, rp)
    o, m, l = pl.pallas_call(
        functools.partial(_gpu_kernel, scale=scale, block_k=bk, split_blocks=split_len // bk, kv_splits=splits),
        grid=(rp // br, b, kvh * splits),
        in_specs=[
            pl.BlockSpec((None, br), lambda ri, bi, p: (bi, ri)),
            pl.BlockSpec((None, br), lambda ri, bi, p: (bi, ri)),
            pl.BlockSpec((None, s_len), lambda ri, bi, p: (bi, 0)),
            pl.BlockSpec((None, None, br, d), lambda ri, bi, p: (bi, p // splits, ri, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda ri, bi, p: (bi, 0, p // splits, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda ri, bi, p: (bi, 0, p // splits, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, None, None, br, d), lambda ri, bi, p: (p % splits, bi, p // splits, ri, 0)),
            pl.BlockSpec((None, None, None, br), lambda ri, bi, p: (p % splits, bi, p // splits, ri)),
            pl.BlockSpec((None, None, None, br), lambda ri, bi, p: (p % splits, bi, p // splits, ri)),
        ],
        out_shape=[
            jax.ShapeDtypeStruct((*part, d), jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
            jax.ShapeDtypeStruct(part, jnp.float32),
        ],
        compiler_params=plgpu.CompilerParams(num_warps=block_sizes.num_warps, num_stages=block_sizes.num_stages),
        interpret=interpret,
        name="qcjax_cache_attention_gpu",
    )(pos, seg, kv_segment_ids.astype(jnp.int32), rows, k, v)
    # Merge the splits' partial softmaxes (a split past the frontier has m = -inf, l = 0: weight 0).
    m_all = jnp.max(m, axis=0)  # [b, kvh, rp]
    w = jnp.exp(m - m_all[None])  # [splits, b, kvh, rp]
    out = jnp.sum(w[..., None] * o, axis=0) / jnp.sum(w * l, axis=0)[..., None]
    return _unrows(out.astype(q.dtype), t, h)
