"""TPU training attention: jax's shipped Pallas splash attention, in its MQA form vmapped over KV heads (GQA).

Why splash: it is Mosaic-native, skips fully masked blocks from a static causal mask, takes packed segment ids and
has a differentiable (custom_vjp) backward. Its MQA kernel runs the query heads of one KV head against that single
K/V, so vmapping it over KV heads is GQA without repeating K/V. It has no softmax scale: q is scaled here.

Precondition (true for the model): q_len == kv_len and q_offset == 0 (training; a prefill filling the whole cache).
Cache decode against a longer cache goes to qcjax.attention.decode.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as splash
from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as splash_mask

HEAD_DIMS = (64, 128, 256)
_PAD_SEGMENT = -1  # segment id of padded positions: no real token has it


@dataclasses.dataclass(frozen=True)
class BlockSizes:
    """Splash tile sizes (multiples of 128): forward (block_q, block_kv, block_kv_compute), dK/dV (block_q_dkv,
    block_kv_dkv, block_kv_dkv_compute), dQ (block_q_dq, block_kv_dq). Shorter sequences shrink them to the
    sequence length rounded up to 128."""

    block_q: int = 512
    block_kv: int = 512
    block_kv_compute: int = 512
    block_q_dkv: int = 512
    block_kv_dkv: int = 512
    block_kv_dkv_compute: int = 512
    block_q_dq: int = 512
    block_kv_dq: int = 512

    def blocks(self) -> dict[str, int]:
        return dataclasses.asdict(self)

    def validate(self) -> None:
        for name, b in self.blocks().items():
            if b <= 0 or b % 128:
                raise ValueError(f"TPU splash attention {name}={b}: must be a positive multiple of 128")
        for memory, compute in (("block_kv", "block_kv_compute"), ("block_kv_dkv", "block_kv_dkv_compute")):
            if getattr(self, memory) % getattr(self, compute):
                raise ValueError(f"TPU splash attention {compute}={getattr(self, compute)} must divide "
                                 f"{memory}={getattr(self, memory)}")


# Per-chip defaults, matched by substring of `device.device_kind` ("TPU v5 lite", "TPU v5", "TPU v6 lite", "TPU v4");
# first match wins. 512 everywhere (MaxText's splash defaults); proven to compile and fit VMEM on v5e and v5p by
# tests/test_attention_tpu_aot.py, not tuned on hardware (none lent).
DEFAULT_BLOCK_SIZES: tuple[tuple[str, BlockSizes], ...] = (
    ("TPU v5 lite", BlockSizes()),
    ("TPU v6", BlockSizes()),
    ("TPU v5", BlockSizes()),
    ("TPU v4", BlockSizes()),
    ("", BlockSizes()),
)


def default_block_sizes(device_kind: str) -> BlockSizes:
    return next(b for key, b in DEFAULT_BLOCK_SIZES if key in device_kind)


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m


def fit_blocks(bs: BlockSizes, length: int) -> tuple[BlockSizes, int]:
    """(blocks that tile the padded length, padded length)."""
    tile = math.lcm(*bs.blocks().values())
    if length >= tile:
        return bs, _round_up(length, tile)
    padded = _round_up(length, 128)
    # Short sequences: each block becomes the largest multiple of 128, at most itself, that divides the padding.
    shrink = lambda b: max(c for c in range(128, min(b, padded) + 1, 128) if padded % c == 0)
    fitted = BlockSizes(**{k: shrink(b) for k, b in bs.blocks().items()})
    fitted.validate()
    return fitted, padded


def _kernel(length: int, groups: int, bs: BlockSizes, interpret: bool):
    """The splash MQA kernel for `groups` query heads per KV head. Built per trace: its block-mask arrays become
    constants of that trace (splash caches the numpy mask processing itself)."""
    mask = splash_mask.MultiHeadMask([splash_mask.CausalMask((length, length))] * groups)
    sizes = splash.BlockSizes(**bs.blocks())
    return splash.make_splash_mqa_single_device(mask=mask, block_sizes=sizes, interpret=interpret)


def check_head_dim(head_dim: int) -> None:
    if head_dim not in HEAD_DIMS:
        raise ValueError(f"TPU splash attention: head_dim={head_dim} unsupported; supported: {HEAD_DIMS}")


def splash_attention(
    q: jax.Array,  # [batch, T, heads, head_dim]
    k: jax.Array,  # [batch, T, kv_heads, head_dim]
    v: jax.Array,  # [batch, T, kv_heads, head_dim]
    q_segment_ids: jax.Array,  # [batch, T] int
    kv_segment_ids: jax.Array,  # [batch, T] int
    q_offset: jax.Array | None = None,  # unused: must be 0 (see module docstring)
    *,
    scale: float,
    block_sizes: BlockSizes,
    interpret: bool = False,
) -> jax.Array:  # [batch, T, heads, head_dim]
    """Causal segment-masked GQA self-attention through splash (differentiable)."""
    del q_offset
    b, t, h, d = q.shape
    kvh = k.shape[2]
    check_head_dim(d)
    if k.shape[1] != t:
        raise ValueError(f"splash_attention is self-attention: q_len={t} != kv_len={k.shape[1]}")
    block_sizes.validate()
    bs, tp = fit_blocks(block_sizes, t)
    g = h // kvh
    kernel = _kernel(tp, g, bs, interpret)

    pad = lambda x, c=0: jnp.pad(x, [(0, 0), (0, tp - t)] + [(0, 0)] * (x.ndim - 2), constant_values=c)
    qs = (q.astype(jnp.float32) * scale).astype(q.dtype)  # splash has no softmax scale
    qs = pad(qs).reshape(b, tp, kvh, g, d).transpose(0, 2, 3, 1, 4)  # [b, kvh, g, tp, d]
    ks = pad(k).transpose(0, 2, 1, 3)  # [b, kvh, tp, d]
    vs = pad(v).transpose(0, 2, 1, 3)
    seg = splash.SegmentIds(q=pad(q_segment_ids.astype(jnp.int32), _PAD_SEGMENT),
                            kv=pad(kv_segment_ids.astype(jnp.int32), _PAD_SEGMENT))  # [b, tp] each

    per_kv_head = jax.vmap(kernel, in_axes=(0, 0, 0, None))  # over KV heads: q [g, tp, d], k/v [tp, d]
    out = jax.vmap(per_kv_head, in_axes=(0, 0, 0, 0))(qs, ks, vs, seg)  # [b, kvh, g, tp, d]
    return out.transpose(0, 3, 1, 2, 4).reshape(b, tp, h, d)[:, :t]
