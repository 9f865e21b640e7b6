"""The cache-decode kernels (TPU and GPU flavours, interpret mode) compute what the XLA reference computes on a
ragged batch: new tokens against a KV cache with per-sequence lengths, the model's cache semantics (kv segment 1 for
filled slots, query segment 0 for padding new tokens), every GQA ratio of the family."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.attention import attend, decode
from qcjax.attention.xla import xla_attention

from test_attention import RATIOS, assert_close, qkv

# Small tiles so a 256-slot cache spans several K/V blocks (GPU: and several splits).
SMALL_BLOCKS = {
    "pallas_tpu": decode.BlockSizes(block_rows=16, block_k=128),
    "pallas_gpu": decode.BlockSizes(block_rows=16, block_k=32, kv_splits=4),
}
KERNELS = list(SMALL_BLOCKS)


def ragged_cache(lengths, new_tokens, t: int, max_len: int):
    """The model's cache call: q_offset = previous lengths; new_tokens[i] real tokens then padding up to t."""
    off = jnp.asarray(lengths, jnp.int32)
    n = jnp.asarray(new_tokens, jnp.int32)
    q_seg = (jnp.arange(t)[None, :] < n[:, None]).astype(jnp.int32)
    kv_seg = (jnp.arange(max_len)[None, :] < (off + n)[:, None]).astype(jnp.int32)
    return q_seg, kv_seg, off


def _decode(impl, q, k, v, q_seg, kv_seg, off, **kw):
    scale = q.shape[-1] ** -0.5
    return jax.jit(lambda *a: attend(*a, scale=scale, impl=impl, decode_block_sizes=SMALL_BLOCKS[impl], **kw))(
        q, k, v, q_seg, kv_seg, off)


@pytest.mark.parametrize("ratio", [r if r == "0.5b-14/2-hd64" else pytest.param(r, marks=pytest.mark.slow)
                                   for r in RATIOS])  # the not-slow set: one ratio; the others with the slow tests
@pytest.mark.parametrize("impl", KERNELS)
def test_decode_step_matches_reference(impl, ratio):
    """One new token per sequence; lengths from empty to nearly full, crossing block boundaries."""
    h, kvh, d = RATIOS[ratio]
    rng = np.random.default_rng(0)
    q, k, v = qkv(rng, 4, 1, 256, h, kvh, d)  # cache slots past each length hold random junk
    q_seg, kv_seg, off = ragged_cache([0, 31, 128, 254], [1, 1, 1, 1], 1, 256)
    assert_close(_decode(impl, q, k, v, q_seg, kv_seg, off),
                 xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5), jnp.float32, f"{impl} {ratio}")


@pytest.mark.parametrize("impl", KERNELS)
def test_few_new_tokens_with_padding_match_reference(impl):
    """Several new tokens per row, some rows padded (fewer real tokens): padding rows too follow the reference."""
    h, kvh, d = RATIOS["7b-28/4"]
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 3, 4, 256, h, kvh, d)
    q_seg, kv_seg, off = ragged_cache([5, 130, 0], [4, 2, 1], 4, 256)
    assert_close(_decode(impl, q, k, v, q_seg, kv_seg, off),
                 xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5), jnp.float32)


@pytest.mark.parametrize("impl", KERNELS)
def test_prefill_into_longer_cache_matches_reference(impl):
    """A prompt prefill (many rows, several row tiles) into an empty, longer cache goes through the same kernel."""
    h, kvh, d = RATIOS["0.5b-14/2-hd64"]
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 2, 37, 256, h, kvh, d)
    q_seg, kv_seg, off = ragged_cache([0, 0], [37, 20], 37, 256)
    assert_close(_decode(impl, q, k, v, q_seg, kv_seg, off),
                 xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5), jnp.float32)


@pytest.mark.parametrize("impl", KERNELS)
def test_decode_bf16_matches_reference(impl):
    h, kvh, d = RATIOS["32b-40/8"]
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 3, 2, 256, h, kvh, d, jnp.bfloat16)
    q_seg, kv_seg, off = ragged_cache([7, 200, 64], [2, 1, 2], 2, 256)
    ours = _decode(impl, q, k, v, q_seg, kv_seg, off)
    assert ours.dtype == jnp.bfloat16
    assert_close(ours, xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5), jnp.bfloat16)


@pytest.mark.parametrize("impl", KERNELS)
def test_blocks_past_each_sequence_are_never_read(impl):
    """Ragged batch: a short sequence in a long cache reads only its own K/V blocks. Cache blocks wholly past each
    row's frontier hold NaN; any read of them (even masked: 0 x NaN) would poison the output."""
    h, kvh, d = RATIOS["1.5b-12/2"]
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 2, 1, 256, h, kvh, d)
    lengths = [3, 100]
    q_seg, kv_seg, off = ragged_cache(lengths, [1, 1], 1, 256)
    ref = xla_attention(q, k, v, q_seg, kv_seg, off, scale=d**-0.5)
    block = 128 if impl == "pallas_tpu" else 32
    k, v = np.array(k), np.array(v)
    for row, n in enumerate(lengths):
        first_unread = -(-(n + 1) // block) * block  # first block boundary past the new token
        k[row, first_unread:] = np.nan
        v[row, first_unread:] = np.nan
    assert_close(_decode(impl, q, jnp.asarray(k), jnp.asarray(v), q_seg, kv_seg, off), ref, jnp.float32)


def test_tpu_cache_length_must_tile_into_blocks():
    q, k, v = qkv(np.random.default_rng(0), 1, 1, 640, 2, 1, 64)
    q_seg, kv_seg, off = ragged_cache([3], [1], 1, 640)
    with pytest.raises(ValueError, match="max_len=640 is not a multiple of block_k=512"):
        attend(q, k, v, q_seg, kv_seg, off, scale=0.125, impl="pallas_tpu",
               decode_block_sizes=decode.BlockSizes(block_rows=16, block_k=512))


@pytest.mark.slow
@pytest.mark.parametrize("impl", KERNELS)
def test_model_cache_decode_with_kernel(impl):
    """The model's prefill + decode steps through a KV cache give the reference's logits with the Pallas impl."""
    from qcjax.config import get_config
    from qcjax.model import Qwen2, init_cache, init_params

    cfg = get_config("tiny", hidden_size=256, num_heads=4, num_kv_heads=2, num_layers=2, vocab_size=512)
    params = init_params(cfg, jax.random.key(0))
    rng = np.random.default_rng(5)
    prompt = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 6)))
    prompt_seg = jnp.asarray([[1] * 6, [1] * 4 + [0] * 2], jnp.int32)  # ragged prompts
    steps = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 2, 1)))

    def generate(impl):
        model = Qwen2(cfg.replace(attention_impl=impl))
        cache = init_cache(cfg, 2, 128, jnp.float32)
        def step(tok, seg, cache):
            pos = cache["lengths"][:, None] + jnp.arange(tok.shape[1])[None, :]
            return model.apply({"params": params}, tok, positions=pos, segment_ids=seg, cache=cache)

        apply = jax.jit(step)
        logits, cache = apply(prompt, prompt_seg, cache)
        outs = [logits]
        for tok in steps:
            logits, cache = apply(tok, jnp.ones_like(tok, dtype=jnp.int32), cache)
            outs.append(logits)
        return outs

    for i, (a, b) in enumerate(zip(generate(impl), generate("xla"))):
        assert_close(a, b, jnp.float32, f"logits at step {i}")


@pytest.mark.parametrize("impl", KERNELS)
def test_unused_cache_kernel_is_dead_code(impl):
    """jax never drops a bare pallas_call; the kernels' jit boundary lets dead-code elimination drop an unused one,
    which flax's nn.scan check relies on (with flax 0.12.12 / jax 0.11.2 the model's cache decode through a kernel
    failed: "broadcasted variable has a data dependency on the scan body")."""
    from jax._src.interpreters import partial_eval as pe  # no public DCE entry point

    h, kvh, d = RATIOS["0.5b-14/2-hd64"]
    q, k, v = qkv(np.random.default_rng(0), 2, 1, 256, h, kvh, d)
    q_seg, kv_seg, off = ragged_cache([3, 9], [1, 1], 1, 256)
    fn = lambda q, k, v: attend(q, k, v, q_seg, kv_seg, off, scale=d**-0.5, impl=impl,
                                decode_block_sizes=SMALL_BLOCKS[impl])
    jaxpr = jax.make_jaxpr(fn)(q, k, v).jaxpr
    assert "pallas_call" in str(jaxpr)
    dead, used_inputs = pe.dce_jaxpr(jaxpr, [False] * len(jaxpr.outvars))
    assert "pallas_call" not in str(dead) and not any(used_inputs)
