"""Our Pallas GPU (Triton) flash attention for training: causal, packed segment ids, GQA, forward and backward.

Why our own: jax's Pallas GPU `mha` is deprecated upstream and has no GQA. This kernel is FlashAttention-2:
the forward streams K/V blocks past a resident Q block with an online softmax and saves the log-sum-exp; the
backward recomputes probabilities blockwise in two kernels (dQ per query block; dK/dV per KV block, summing the
query heads of the group inside the kernel, so K/V are never repeated in memory and dK/dV never materialise per
query head). Matmuls take the input dtype (bf16) and accumulate in fp32; the softmax runs in fp32 base 2.

The mask is the reference's (qcjax.attention.xla.attention_mask): key j is visible to query i iff
j <= q_offset + i and both carry the same segment id. Key blocks past the causal frontier are skipped.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from qcjax.attention.xla import _MASK_VALUE

_LOG2E = math.log2(math.e)
HEAD_DIMS = (16, 32, 64, 128, 256)  # Triton tiles are powers of two


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Tile sizes (powers of two >= 16). Forward: (block_q, block_k); backward dK/dV: a KV block of block_k_dkv
    rows streams query blocks of block_q_dkv; backward dQ: a query block of block_q_dq streams KV blocks of
    block_k_dq. Shorter sequences shrink every block to the (padded) length."""

    block_q: int = 64
    block_k: int = 64
    block_q_dkv: int = 64
    block_k_dkv: int = 64
    block_q_dq: int = 64
    block_k_dq: int = 64
    num_warps: int | None = None  # None: 4 for head_dim <= 64, else 8
    num_stages: int = 2

    def blocks(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name.startswith("block_")}

    def validate(self) -> None:
        for name, b in self.blocks().items():
            if b < 16 or b & (b - 1):
                raise ValueError(f"GPU flash attention {name}={b}: must be a power of two >= 16 (Triton tiles)")


# Per-chip defaults, matched by substring of `device.device_kind`; first match wins. Starting points from the
# FlashAttention-2 Triton tutorial's configurations for Ampere/Hopper; checked on an H200 (tests/test_gpu.py), not
# tuned on our shapes.
DEFAULT_BLOCK_SIZES: tuple[tuple[str, BlockSizes], ...] = (
    ("H100", BlockSizes(128, 64, 64, 128, 128, 64, num_stages=3)),
    ("H200", BlockSizes(128, 64, 64, 128, 128, 64, num_stages=3)),
    ("H800", BlockSizes(128, 64, 64, 128, 128, 64, num_stages=3)),
    ("A100", BlockSizes(128, 64, 64, 64, 64, 64, num_stages=2)),
    ("", BlockSizes()),  # anything else (and interpret mode on CPU)
)


# Shared memory the tiles of one program may take, by device kind (first substring match wins): the chip's per-block
# maximum (Hopper 227 KiB, A100 163 KiB) less room for what the estimate leaves out. Measured on an H200 (jax
# 0.11.2): the bf16 Hopper tiles at head_dim 128 (estimate 160 KiB) compile and pass; the same tiles in fp32 do not
# (the forward asked for 295424 bytes of 232448: the estimate's 262144, the [block_q, block_k] fp32 score tile's
# 32768 and 512 more); the fitted fp32 tiles compile and pass.
SHARED_MEMORY_BUDGET: tuple[tuple[str, int], ...] = (
    ("H100", 160 << 10), ("H200", 160 << 10), ("H800", 160 << 10), ("A100", 112 << 10), ("", 64 << 10),
)

# Per kernel: (resident block, tiles of it, streamed block, tiles of it). The resident tiles stay for the whole
# program; the streamed ones are loaded every loop step, num_stages copies deep (Triton's software pipelining).
TILES = {
    "fwd": ("block_q", 1, "block_k", 2),  # q; k, v
    "dq": ("block_q_dq", 2, "block_k_dq", 2),  # q, do; k, v
    "dkv": ("block_k_dkv", 2, "block_q_dkv", 2),  # k, v; q, do
}


def shared_memory_estimate(bs: Any, tiles: dict, row_bytes: int) -> dict[str, int]:
    """Bytes of the K/V/Q/dO tiles each kernel keeps in shared memory (row_bytes = head_dim x itemsize). It leaves out
    the score tile and Triton's scratch buffers, which the budget's headroom covers."""
    return {name: (getattr(bs, res) * n_res + bs.num_stages * getattr(bs, st) * n_st) * row_bytes
            for name, (res, n_res, st, n_st) in tiles.items()}


def fit_shared_memory(bs: Any, tiles: dict, row_bytes: int, device_kind: str) -> Any:
    """`bs` shrunk until every kernel's estimate fits the chip's budget: pipeline stages down to 2 first, then the
    larger of each offending kernel's two blocks halved (the resident one on a tie), never below 16. A kernel whose
    tiles are all at 16 and still over is left to the compiler to report. On the CPU (interpret mode) there is no
    shared memory to fit: `bs` as given."""
    if device_kind == "cpu":
        return bs
    budget = next(v for key, v in SHARED_MEMORY_BUDGET if key in device_kind)
    while True:
        over = [n for n, v in shared_memory_estimate(bs, tiles, row_bytes).items() if v > budget]
        if over and bs.num_stages > 2:
            bs = dataclasses.replace(bs, num_stages=bs.num_stages - 1)
            continue
        shrink = {}
        for kernel in over:
            res, _, st, _ = tiles[kernel]
            name = max((res, st), key=lambda n: (getattr(bs, n), n == res))  # the larger; the resident on a tie
            if getattr(bs, name) > 16:
                shrink[name] = getattr(bs, name) // 2
        if not shrink:
            return bs
        bs = dataclasses.replace(bs, **shrink)


def default_block_sizes(device_kind: str, head_dim: int = 128, itemsize: int = 2) -> BlockSizes:
    """The chip's tiles (tuned for 2-byte inputs), shrunk to its shared memory for this head_dim and input size."""
    bs = next(b for key, b in DEFAULT_BLOCK_SIZES if key in device_kind)
    return fit_shared_memory(bs, TILES, head_dim * itemsize, device_kind)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def _next_pow2(x: int) -> int:
    return 1 << max(0, (x - 1).bit_length())


def fit_blocks(bs: BlockSizes, length: int) -> tuple[BlockSizes, int]:
    """(blocks shrunk to the sequence, padded length): every block divides the padded length."""
    largest = max(bs.blocks().values())
    if length >= largest:
        return bs, _round_up(length, largest)
    padded = max(16, _next_pow2(length))
    return dataclasses.replace(bs, **{k: min(b, padded) for k, b in bs.blocks().items()}), padded


def _dot_nt(a, b):  # a [m, d] . b [n, d] -> [m, n] fp32
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)


def _dot_tn(a, b):  # a [m, n]^T . b [m, d] -> [n, d] fp32
    return lax.dot_general(a, b, (((0,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _dot(a, b):  # a [m, n] . b [n, d] -> [m, d] fp32
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())), preferred_element_type=jnp.float32)


def _masked_logits(q, k, qpos, qseg, kpos, kseg, scale):
    """Base-2 logits [bq, bk] with invisible entries at the mask value."""
    s = _dot_nt(q, k) * (scale * _LOG2E)
    visible = (kpos[None, :] <= qpos[:, None]) & (kseg[None, :] == qseg[:, None])
    return jnp.where(visible, s, _MASK_VALUE)


def _num_visible_blocks(max_qpos, block_k: int, num_blocks: int):
    """KV blocks up to the causal frontier of the query block: cdiv(max_qpos + 1, block_k), at most num_blocks."""
    return jnp.minimum(lax.div(max_qpos + block_k, block_k), num_blocks)


# ---- forward ---------------------------------------------------------------------------------------------------
def _fwd_kernel(qpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, scale, block_k):
    # qpos/qseg [bq]; kseg [S]; q [bq, d]; k, v [S, d] (this query head's KV head); o [bq, d]; lse [bq]
    bq, d = q_ref.shape
    num_kv_blocks = k_ref.shape[0] // block_k
    q, qpos, qseg = q_ref[...], qpos_ref[...], qseg_ref[...]

    def body(j, carry):
        acc, m, l = carry
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        s = _masked_logits(q, k_ref[ks, :], qpos, qseg, kpos, kseg_ref[ks], scale)
        m_new = jnp.maximum(m, jnp.max(s, axis=1))
        alpha = jnp.exp2(m - m_new)
        p = jnp.exp2(s - m_new[:, None])
        v = v_ref[ks, :]
        acc = acc * alpha[:, None] + _dot(p.astype(v.dtype), v)
        return acc, m_new, l * alpha + jnp.sum(p, axis=1)

    init = (jnp.zeros((bq, d), jnp.float32), jnp.full((bq,), -jnp.inf, jnp.float32), jnp.zeros((bq,), jnp.float32))
    acc, m, l = lax.fori_loop(0, _num_visible_blocks(jnp.max(qpos), block_k, num_kv_blocks), body, init)
    o_ref[...] = (acc / l[:, None]).astype(o_ref.dtype)
    lse_ref[...] = m + jnp.log2(l)


def _forward(q, k, v, qseg, kseg, qpos, *, scale, bs: BlockSizes, interpret: bool):
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    bq = bs.block_q
    warps = bs.num_warps or (4 if d <= 64 else 8)
    return pl.pallas_call(
        functools.partial(_fwd_kernel, scale=scale, block_k=bs.block_k),
        grid=(t // bq, b, h),
        in_specs=[
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),  # qpos
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),  # qseg
            pl.BlockSpec((None, s_len), lambda i, bi, hi: (bi, 0)),  # kseg
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),  # q
            pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),  # k: the group's KV head
            pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),  # v
        ],
        out_specs=[
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_shape=[jax.ShapeDtypeStruct(q.shape, q.dtype), jax.ShapeDtypeStruct((b, h, t), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=warps, num_stages=bs.num_stages),
        interpret=interpret,
        name="qcjax_flash_fwd",
    )(qpos, qseg, kseg, q, k, v)


# ---- backward --------------------------------------------------------------------------------------------------
def _dq_kernel(qpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *,
               scale, block_k):
    # q, do, dq [bq, d]; lse, delta [bq]; k, v [S, d]
    bq, d = q_ref.shape
    num_kv_blocks = k_ref.shape[0] // block_k
    q, do, qpos, qseg = q_ref[...], do_ref[...], qpos_ref[...], qseg_ref[...]
    lse, delta = lse_ref[...], delta_ref[...]

    def body(j, dq):
        ks = pl.ds(pl.multiple_of(j * block_k, block_k), block_k)
        kpos = j * block_k + lax.broadcasted_iota(jnp.int32, (block_k,), 0)
        k = k_ref[ks, :]
        p = jnp.exp2(_masked_logits(q, k, qpos, qseg, kpos, kseg_ref[ks], scale) - lse[:, None])
        ds = p * (_dot_nt(do, v_ref[ks, :]) - delta[:, None])
        return dq + _dot(ds.astype(k.dtype), k)

    n = _num_visible_blocks(jnp.max(qpos), block_k, num_kv_blocks)
    dq = lax.fori_loop(0, n, body, jnp.zeros((bq, d), jnp.float32))
    dq_ref[...] = (dq * scale).astype(dq_ref.dtype)


def _dkv_kernel(qpos_ref, qseg_ref, kseg_ref, q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *,
                scale, block_q, groups):
    # k, v, dk, dv [bk, d] (one KV head); q, do [T, H, d]; lse, delta [H, T]; qpos, qseg [T]; kseg [bk]
    bk, d = k_ref.shape
    t = q_ref.shape[0]
    ki, kv_head = pl.program_id(0), pl.program_id(2)
    k, v, kseg = k_ref[...], v_ref[...], kseg_ref[...]
    kpos = ki * bk + lax.broadcasted_iota(jnp.int32, (bk,), 0)
    # Query blocks entirely before this KV block see none of it: positions are q_offset + row, so the first query
    # block that can is floor((kv_start - q_offset) / block_q).
    first = jnp.maximum(ki * bk - qpos_ref[0], 0) // block_q

    def q_block(i, carry, head):
        dk, dv = carry
        qs = pl.ds(pl.multiple_of(i * block_q, block_q), block_q)
        q, do = q_ref[qs, head, :], do_ref[qs, head, :]
        p = jnp.exp2(_masked_logits(q, k, qpos_ref[qs], qseg_ref[qs], kpos, kseg, scale)
                     - lse_ref[head, qs][:, None])
        dv = dv + _dot_tn(p.astype(do.dtype), do)
        ds = p * (_dot_nt(do, v) - delta_ref[head, qs][:, None])
        return dk + _dot_tn(ds.astype(q.dtype), q), dv

    def one_head(gi, carry):  # the query heads of this KV head's group, summed here
        return lax.fori_loop(first, t // block_q, functools.partial(q_block, head=kv_head * groups + gi), carry)

    zeros = jnp.zeros((bk, d), jnp.float32)
    dk, dv = lax.fori_loop(0, groups, one_head, (zeros, zeros))
    dk_ref[...] = (dk * scale).astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _backward(q, k, v, qseg, kseg, qpos, o, lse, do, *, scale, bs: BlockSizes, interpret: bool):
    b, t, h, d = q.shape
    s_len, kvh = k.shape[1], k.shape[2]
    g = h // kvh
    warps = bs.num_warps or (4 if d <= 64 else 8)
    params = plgpu.CompilerParams(num_warps=warps, num_stages=bs.num_stages)
    delta = jnp.einsum("bthd,bthd->bht", o.astype(jnp.float32), do.astype(jnp.float32))  # [b, h, t]

    bq = bs.block_q_dq
    dq = pl.pallas_call(
        functools.partial(_dq_kernel, scale=scale, block_k=bs.block_k_dq),
        grid=(t // bq, b, h),
        in_specs=[
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, bq), lambda i, bi, hi: (bi, i)),
            pl.BlockSpec((None, s_len), lambda i, bi, hi: (bi, 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, s_len, None, d), lambda i, bi, hi: (bi, 0, hi // g, 0)),
            pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
            pl.BlockSpec((None, None, bq), lambda i, bi, hi: (bi, hi, i)),
        ],
        out_specs=pl.BlockSpec((None, bq, None, d), lambda i, bi, hi: (bi, i, hi, 0)),
        out_shape=jax.ShapeDtypeStruct(q.shape, q.dtype),
        compiler_params=params,
        interpret=interpret,
        name="qcjax_flash_bwd_dq",
    )(qpos, qseg, kseg, q, k, v, do, lse, delta)

    bk = bs.block_k_dkv
    dk, dv = pl.pallas_call(
        functools.partial(_dkv_kernel, scale=scale, block_q=bs.block_q_dkv, groups=g),
        grid=(s_len // bk, b, kvh),
        in_specs=[
            pl.BlockSpec((None, t), lambda j, bi, kh: (bi, 0)),
            pl.BlockSpec((None, t), lambda j, bi, kh: (bi, 0)),
            pl.BlockSpec((None, bk), lambda j, bi, kh: (bi, j)),
            pl.BlockSpec((None, t, h, d), lambda j, bi, kh: (bi, 0, 0, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bi, kh: (bi, j, kh, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bi, kh: (bi, j, kh, 0)),
            pl.BlockSpec((None, t, h, d), lambda j, bi, kh: (bi, 0, 0, 0)),
            pl.BlockSpec((None, h, t), lambda j, bi, kh: (bi, 0, 0)),
            pl.BlockSpec((None, h, t), lambda j, bi, kh: (bi, 0, 0)),
        ],
        out_specs=[
            pl.BlockSpec((None, bk, None, d), lambda j, bi, kh: (bi, j, kh, 0)),
            pl.BlockSpec((None, bk, None, d), lambda j, bi, kh: (bi, j, kh, 0)),
        ],
        out_shape=[jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)],
        compiler_params=params,
        interpret=interpret,
        name="qcjax_flash_bwd_dkv",
    )(qpos, qseg, kseg, q, k, v, do, lse, delta)
    return dq, dk, dv


# ---- differentiable entry point --------------------------------------------------------------------------------
@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7, 8))
def _flash(q, k, v, qseg, kseg, qpos, scale, bs, interpret):
    return _forward(q, k, v, qseg, kseg, qpos, scale=scale, bs=bs, interpret=interpret)[0]


def _flash_fwd(q, k, v, qseg, kseg, qpos, scale, bs, interpret):
    o, lse = _forward(q, k, v, qseg, kseg, qpos, scale=scale, bs=bs, interpret=interpret)
    return o, (q, k, v, qseg, kseg, qpos, o, lse)


def _flash_bwd(scale, bs, interpret, res, do):
    q, k, v, qseg, kseg, qpos, o, lse = res
    dq, dk, dv = _backward(q, k, v, qseg, kseg, qpos, o, lse, do, scale=scale, bs=bs, interpret=interpret)
    return dq, dk, dv, None, None, None


_flash.defvjp(_flash_fwd, _flash_bwd)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"GPU flash attention: head_dim={head_dim} unsupported; supported: {HEAD_DIMS}")


def flash_attention(
    q: jax.Array,  # [batch, T, heads, head_dim]
    k: jax.Array,  # [batch, T, kv_heads, head_dim]
    v: jax.Array,  # [batch, T, kv_heads, head_dim]
    q_segment_ids: jax.Array,  # [batch, T] int
    kv_segment_ids: jax.Array,  # [batch, T] int
    q_offset: jax.Array,  # [batch] int
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:  # [batch, T, heads, head_dim]
    """Causal segment-masked GQA self-attention (q_len == kv_len), differentiable."""
    b, t, h, d = q.shape
    check_head_dim(d)
    if k.shape[1] != t:
        raise ValueError(f"flash_attention is self-attention: q_len={t} != kv_len={k.shape[1]}")
    block_sizes.validate()
    bs, tp = fit_blocks(block_sizes, t)
    pad = tp - t
    # Padding rows get segment -1, which no real token has: real queries never see padded keys and each padded
    # query sees at least itself (no empty softmax row).
    pad_seq = lambda x, c=0: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2), constant_values=c)
    qpos = q_offset.astype(jnp.int32)[:, None] + jnp.arange(tp, dtype=jnp.int32)[None, :]  # [b, tp]
    qseg, kseg = (pad_seq(s.astype(jnp.int32), -1) for s in (q_segment_ids, kv_segment_ids))
    out = _flash(pad_seq(q), pad_seq(k), pad_seq(v), qseg, kseg, qpos, scale, bs, interpret)
    return out[:, :t]
