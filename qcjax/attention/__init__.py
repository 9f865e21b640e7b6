"""The attention switch: the one function the model calls for attention, whatever the backend.

Implementations (`impl`, also `ModelConfig.attention_impl`):
- "xla": the reference (plain jnp, any platform; qcjax.attention.xla), and nothing else. A prompt's attention for
  inference (`prompt=True`, the sampler's prefill) runs in causal query blocks (xla.PROMPT_QUERY_BLOCKS).
- "cpu": the C++ kernels of the optional qcjax.cpu package for prompts and decode steps on one CPU device, the
  reference elsewhere (training included).
- "pallas_tpu": training: jax's splash attention (qcjax.attention.tpu); cache decode: our Mosaic kernel.
- "pallas_gpu": training: our Triton flash attention (qcjax.attention.gpu); cache decode: our Triton kernel.
- "cudnn": training: cuDNN flash attention through jax.nn.dot_product_attention (packed segments become a dense
  [batch, 1, q_len, kv_len] mask, so prefer "pallas_gpu" for packed rows); cache decode: our Triton kernel.
- "auto": the platform switch's pick (qcjax.platform.AUTO): "pallas_tpu" on TPU, "pallas_gpu" on GPU, "cpu" on the
  CPU ("xla" where the CPU kernels are off or could not be built). cuDNN is not auto-picked: it has not been
  measured faster here (bench/attention.py measures both; see bench/RESULTS.md).

The call is training/prefill ("self": q_len == kv_len; q_offset must then be 0) or cache decode (q_len < kv_len:
the new tokens against the whole cache). The target platform is the current mesh's (`jax.set_mesh`, which is how
ahead-of-time TPU compiles on a CPU host see a TPU), else the default backend's. On CPU the Pallas impls run in
interpret mode (slow; for tests). Pallas kernels run under `jax.shard_map` over the mesh (qcjax.attention.sharded).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp

from qcjax import platform as switch
from qcjax.attention import decode, gpu, tpu
from qcjax.attention.sharded import shard_kernel
from qcjax.attention.xla import PROMPT_QUERY_BLOCKS, attention_mask, xla_attention
from qcjax.platform import ATTENTION_IMPLS, target_device

IMPLS = ATTENTION_IMPLS  # ("auto", "xla", "pallas_tpu", "pallas_gpu", "cudnn", "cpu"): named in qcjax.platform


def resolve_impl(impl: str, platform: str | None = None, head_dim: int | None = None) -> str:
    """The concrete implementation `impl` names on `platform` (default: the target platform). "auto" falls back to
    "xla" on TPU for head dims the TPU kernels do not tile (e.g. 16 in the tiny CPU configs), so every config runs."""
    if impl not in IMPLS:
        raise ValueError(f"attention impl {impl!r} unknown; choose one of {IMPLS}")
    chosen = switch.choose("attention", impl, platform)
    if impl == "auto" and chosen == "pallas_tpu" and head_dim is not None and head_dim not in tpu.HEAD_DIMS:
        return "xla"
    return chosen


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
    block_sizes: Any = None,  # training kernel tiles: tpu.BlockSizes / gpu.BlockSizes; None: per-chip default
    decode_block_sizes: decode.BlockSizes | None = None,  # cache kernel tiles; None: per-chip default
    interpret: bool | None = None,  # Pallas interpret mode; None: on CPU only
    prompt: bool = False,  # a prompt's self-attention for inference (the sampler's prefill), see below
) -> jnp.ndarray:  # [batch, q_len, heads, head_dim]
    """Causal grouped-query attention within segments: query i sees keys j <= q_offset + i of its own segment.

    `prompt` marks self-attention over a prompt for inference: "xla" then runs it in causal query blocks
    (xla.PROMPT_QUERY_BLOCKS), "cpu" as its C++ kernel where that applies. k/v may come in the cache's dtype: the
    CPU decode kernel reads them as they are; every other path widens them to q's dtype."""
    platform, kind = target_device()
    impl = resolve_impl(impl, platform, q.shape[-1])
    if q_offset is None:
        q_offset = jnp.zeros((q.shape[0],), jnp.int32)
    if q.shape[2] % k.shape[2]:
        raise ValueError(f"attention: {q.shape[2]} query heads are not a multiple of {k.shape[2]} KV heads")
    if impl == "cpu":
        kernels = switch.plugin("attention", "cpu")
        if platform != "cpu" or kernels is None:
            raise ValueError(f"attention impl 'cpu' needs a CPU target and the qcjax.cpu kernels (built, "
                             f"QCJAX_CPU_KERNELS not 0); the target is {platform}"
                             + ("" if kernels is not None else ", kernels unavailable") + "; use 'auto' or 'xla'")
        return kernels.fn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale=scale, prompt=prompt)
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if impl == "xla":
        return xla_attention(q, k, v, q_segment_ids, kv_segment_ids, q_offset, scale=scale,
                             query_blocks=PROMPT_QUERY_BLOCKS if prompt else 1)
    interpret = platform == "cpu" if interpret is None else interpret
    needs = switch.NEEDS[impl]
    if not interpret and platform not in needs:
        raise ValueError(f"attention impl {impl!r} needs a {'/'.join(needs)} device; the target is {platform}")
    on_tpu = impl == "pallas_tpu"

    if q.shape[1] != k.shape[1]:  # cache decode: the new tokens against the whole cache
        bs = decode_block_sizes or decode.default_block_sizes("TPU" if on_tpu else kind, q.shape[-1],
                                                                 q.dtype.itemsize)
        fn = decode.tpu_cache_attention if on_tpu else decode.gpu_cache_attention
        kernel = functools.partial(fn, scale=scale, block_sizes=bs, interpret=interpret)
    elif impl == "cudnn":
        if interpret:
            raise ValueError("attention impl 'cudnn' has no interpret mode; it needs a CUDA GPU")
        kernel = functools.partial(_cudnn, scale=scale)
    elif on_tpu:
        bs = block_sizes or tpu.default_block_sizes(kind)
        kernel = functools.partial(tpu.splash_attention, scale=scale, block_sizes=bs, interpret=interpret)
    else:
        bs = block_sizes or gpu.default_block_sizes(kind, q.shape[-1], q.dtype.itemsize)
        kernel = functools.partial(gpu.flash_attention, scale=scale, block_sizes=bs, interpret=interpret)
    return shard_kernel(kernel, q, k, v, q_segment_ids, kv_segment_ids, q_offset)


def _cudnn(q, k, v, q_segment_ids, kv_segment_ids, q_offset, *, scale: float) -> jax.Array:
    """cuDNN flash attention (causal, q_offset 0); segment ids as a dense boolean mask."""
    del q_offset
    mask = (q_segment_ids[:, :, None] == kv_segment_ids[:, None, :])[:, None]  # [b, 1, t, s]
    return jax.nn.dot_product_attention(q, k, v, mask=mask, scale=scale, is_causal=True, implementation="cudnn")


__all__ = ["attend", "attention_mask", "resolve_impl", "target_device", "IMPLS"]
