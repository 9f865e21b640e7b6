"""The CPU attention kernels (qcjax/cpu/attention.cc through qcjax.cpu.attention), against float64 references: the
prompt kernel (causal attention within segments) around its tile sizes, for every GQA ratio of the family, its
gradient; the decode kernel (new queries against a cache) around its key block, bf16 caches, finished rows; what the
attention switch sends to each."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qcjax.attention import attend
from qcjax.cpu import attention as cpu, build
from qcjax.attention.xla import xla_attention

from test_attention import RATIOS, assert_close, packed_segments, qkv
from test_cpu_matmul import ISA_LEVELS, _x86_flags

pytestmark = pytest.mark.skipif(not build.available(), reason="the CPU kernels did not build here")


def reference(q, k, v, q_seg, kv_seg, scale):
    """float64 numpy: query i attends to keys j <= i of its own segment; a query that sees no key gets zeros."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    q_seg, kv_seg = np.asarray(q_seg), np.asarray(kv_seg)
    b, t, h, d = q.shape
    group = h // k.shape[2]
    out = np.zeros((b, t, h, d))
    see = (np.arange(t)[None, :] <= np.arange(t)[:, None])[None] & (q_seg[:, :, None] == kv_seg[:, None, :])
    for head in range(h):
        s = np.einsum("bid,bjd->bij", q[:, :, head], k[:, :, head // group]) * scale
        s = np.where(see, s, -np.inf)
        top = np.max(s, axis=-1, keepdims=True)
        p = np.where(see, np.exp(s - np.where(np.isfinite(top), top, 0)), 0.0)
        total = p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bij,bjd->bid", p / np.where(total > 0, total, 1), v[:, :, head // group])
    return out


def segments(rng, batch, length):
    return packed_segments(rng, batch, length) if length >= 8 else np.ones((batch, length), np.int32)


# around the query tile (48 positions), the register block (6 rows) and the key block (64 keys)
@pytest.mark.parametrize("length", [1, 7, 47, 48, 49, 64, 65, 130])
def test_matches_float64_around_the_tile_sizes(length):
    rng = np.random.default_rng(length)
    q, k, v = qkv(rng, 2, length, length, 14, 2, 64)
    seg = jnp.asarray(segments(rng, 2, length))
    got = cpu.causal_attention(q, k, v, seg, seg, 0.125)
    assert got.dtype == jnp.float32
    assert_close(got, reference(q, k, v, seg, seg, 0.125), jnp.float32)


@pytest.mark.parametrize("name", list(RATIOS))
def test_every_gqa_ratio_of_the_family(name):
    heads, kv_heads, head_dim = RATIOS[name]
    rng = np.random.default_rng(heads)
    q, k, v = qkv(rng, 1, 70, 70, heads, kv_heads, head_dim)
    seg = jnp.asarray(segments(rng, 1, 70))
    scale = head_dim**-0.5
    assert_close(cpu.causal_attention(q, k, v, seg, seg, scale), reference(q, k, v, seg, seg, scale), jnp.float32)


def test_prompts_of_different_lengths_as_the_sampler_pads_them():
    # right-padded rows: the queries are (position < length), the keys (slot < length), as the sampler's prefill
    rng = np.random.default_rng(0)
    lengths = np.array([100, 49, 1])
    q, k, v = qkv(rng, 3, 100, 100, 12, 2, 16)
    q_seg = jnp.asarray((np.arange(100)[None] < lengths[:, None]).astype(np.int32))
    got = np.asarray(cpu.causal_attention(q, k, v, q_seg, q_seg, 0.25))
    want = reference(q, k, v, q_seg, q_seg, 0.25)
    for row, n in enumerate(lengths):
        assert_close(got[row, :n], want[row, :n], jnp.float32, f"row {row}")


def test_bfloat16_is_the_float32_result_rounded():
    rng = np.random.default_rng(1)
    q, k, v = qkv(rng, 1, 90, 90, 14, 2, 64, jnp.bfloat16)
    seg = jnp.asarray(segments(rng, 1, 90))
    got = cpu.causal_attention(q, k, v, seg, seg, 0.125)
    assert got.dtype == jnp.bfloat16
    assert_close(got, reference(q, k, v, seg, seg, 0.125), jnp.bfloat16)


def test_a_query_that_sees_no_key_gets_zeros():
    rng = np.random.default_rng(2)
    q, k, v = qkv(rng, 1, 3, 3, 2, 1, 8)
    q_seg, kv_seg = jnp.asarray([[1, 2, 1]]), jnp.asarray([[1, 1, 1]])  # query 1's segment has no key
    got = np.asarray(cpu.causal_attention(q, k, v, q_seg, kv_seg, 0.3))
    assert np.all(got[0, 1] == 0)
    assert_close(got, reference(q, k, v, q_seg, kv_seg, 0.3), jnp.float32)


def test_gradient_is_the_references():
    rng = np.random.default_rng(3)
    q, k, v = qkv(rng, 1, 40, 40, 4, 2, 16)
    seg = jnp.asarray(segments(rng, 1, 40))
    off = jnp.zeros((1,), jnp.int32)
    w = jnp.asarray(rng.normal(size=q.shape), jnp.float32)
    ours = jax.grad(lambda *a: jnp.sum(w * cpu.causal_attention(*a, seg, seg, 0.25)), argnums=(0, 1, 2))(q, k, v)
    ref = jax.grad(lambda *a: jnp.sum(w * xla_attention(*a, seg, seg, off, scale=0.25)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        assert_close(a, b, jnp.float32, f"d{name}")


def test_the_switch_sends_only_prompts_to_the_kernel():
    rng = np.random.default_rng(4)
    q, k, v = qkv(rng, 1, 32, 32, 4, 2, 16)
    seg = jnp.ones((1, 32), jnp.int32)

    def lowered(prompt, impl):
        return jax.jit(lambda q, k, v: attend(q, k, v, seg, seg, scale=0.25, impl=impl, prompt=prompt)
                       ).lower(q, k, v).as_text()

    for impl in ("auto", "cpu"):  # "auto" picks the CPU kernels on the CPU
        assert build.ATTENTION_TARGET in lowered(True, impl)
        assert build.ATTENTION_TARGET not in lowered(False, impl)  # training: XLA's attention
    assert build.ATTENTION_TARGET not in lowered(True, "xla")  # "xla" means XLA and nothing else
    q8, k8, v8 = qkv(rng, 1, 32, 32, 4, 2, 12)  # head_dim not a multiple of 8: XLA's blocks
    assert not cpu.applies(q8, k8)
    assert build.ATTENTION_TARGET not in jax.jit(
        lambda q, k, v: attend(q, k, v, seg, seg, scale=0.25, impl="cpu", prompt=True)).lower(q8, k8, v8).as_text()


def test_bad_shapes_name_both():
    q, k, v = qkv(np.random.default_rng(5), 1, 8, 8, 4, 3, 16)
    with pytest.raises(ValueError, match=r"q \(1, 8, 4, 16\), k \(1, 8, 3, 16\)"):
        cpu.causal_attention(q, k, v, jnp.ones((1, 8), jnp.int32), jnp.ones((1, 8), jnp.int32), 0.25)


@pytest.mark.parametrize("march", sorted(ISA_LEVELS))
def test_older_instruction_sets_match_float64(march):
    if not ISA_LEVELS[march] <= _x86_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    build._load(march)
    rng = np.random.default_rng(6)
    q, k, v = qkv(rng, 1, 75, 75, 14, 2, 64)
    seg = jnp.asarray(segments(rng, 1, 75))
    got = jax.ffi.ffi_call(f"{build.ATTENTION_TARGET}_{march}", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, seg, seg, scale=np.float32(0.125))
    assert_close(got, reference(q, k, v, seg, seg, 0.125), jnp.float32)


# ---- the decode kernel: new queries against a cache (cpu.cache_attention) ----
def cache_reference(q, k, v, q_seg, kv_seg, q_offset, scale):
    """float64 numpy: query i of row b sees the cache slots j <= q_offset[b] + i of its own segment (zeros if none)."""
    q, k, v = (np.asarray(jnp.asarray(x, jnp.float32), np.float64) for x in (q, k, v))
    q_seg, kv_seg, q_offset = np.asarray(q_seg), np.asarray(kv_seg), np.asarray(q_offset)
    t, s = q.shape[1], k.shape[1]
    see = (np.arange(s)[None, None, :] <= (q_offset[:, None] + np.arange(t)[None, :])[:, :, None]) & (
        q_seg[:, :, None] == kv_seg[:, None, :])
    group = q.shape[2] // k.shape[2]
    out = np.zeros(q.shape)
    for head in range(q.shape[2]):
        sc = np.where(see, np.einsum("bid,bjd->bij", q[:, :, head], k[:, :, head // group]) * scale, -np.inf)
        top = np.max(sc, axis=-1, keepdims=True)
        p = np.where(see, np.exp(sc - np.where(np.isfinite(top), top, 0)), 0.0)
        total = p.sum(-1, keepdims=True)
        out[:, :, head] = np.einsum("bij,bjd->bid", p / np.where(total > 0, total, 1), v[:, :, head // group])
    return out


def decode_inputs(rng, offsets, slots, t=1, heads=14, kv_heads=2, head_dim=64, cache_dtype=jnp.float32):
    """As the sampler's decode step: row b's t new queries at offsets[b]; its cache valid up to offsets[b] + t."""
    b = len(offsets)
    q, k, v = qkv(rng, b, t, slots, heads, kv_heads, head_dim)
    offsets = jnp.asarray(offsets, jnp.int32)
    kv_seg = (jnp.arange(slots)[None] < offsets[:, None] + t).astype(jnp.int32)
    return q, k.astype(cache_dtype), v.astype(cache_dtype), jnp.ones((b, t), jnp.int32), kv_seg, offsets


# around the key block (256 slots per work item), short caches (the calling thread alone) and long ones (shared)
@pytest.mark.parametrize("slots, offsets", [(8, [0, 7]), (256, [254, 100]), (257, [256, 3]), (1000, [999, 511])])
def test_cache_attention_matches_float64_around_the_key_block(slots, offsets):
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(slots), offsets, slots)
    got = cpu.cache_attention(q, k, v, q_seg, kv_seg, off, 0.125)
    assert got.dtype == jnp.float32
    assert_close(got, cache_reference(q, k, v, q_seg, kv_seg, off, 0.125), jnp.float32)


@pytest.mark.parametrize("name", list(RATIOS))
def test_cache_attention_every_gqa_ratio_of_the_family(name):
    heads, kv_heads, head_dim = RATIOS[name]
    args = decode_inputs(np.random.default_rng(heads), [300, 41], 384, 1, heads, kv_heads, head_dim)
    scale = head_dim**-0.5
    assert_close(cpu.cache_attention(*args, scale), cache_reference(*args, scale), jnp.float32)


def test_cache_attention_several_new_queries_per_row():
    args = decode_inputs(np.random.default_rng(7), [5, 290, 0], 300, t=3, heads=6, kv_heads=2, head_dim=16)
    assert_close(cpu.cache_attention(*args, 0.25), cache_reference(*args, 0.25), jnp.float32)


@pytest.mark.parametrize("q_dtype", [jnp.float32, jnp.bfloat16])
def test_cache_attention_reads_a_bfloat16_cache_as_it_is(q_dtype):
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(8), [700, 20], 800, cache_dtype=jnp.bfloat16)
    q = q.astype(q_dtype)
    got = cpu.cache_attention(q, k, v, q_seg, kv_seg, off, 0.125)
    assert got.dtype == q_dtype
    assert_close(got, cache_reference(q, k, v, q_seg, kv_seg, off, 0.125), q_dtype)


def test_cache_attention_finished_rows_and_unseen_keys_as_the_reference():
    # a finished row feeds segment 0 (it sees the empty slots up to its offset); a row whose segment has no key: zeros
    q, k, v, _, kv_seg, off = decode_inputs(np.random.default_rng(9), [10, 30, 4], 40, heads=4, head_dim=8)
    q_seg = jnp.asarray([[1], [0], [2]], jnp.int32)
    got = np.asarray(cpu.cache_attention(q, k, v, q_seg, kv_seg, off, 0.3))
    assert np.all(got[2] == 0)
    assert_close(got, cache_reference(q, k, v, q_seg, kv_seg, off, 0.3), jnp.float32)


def test_the_switch_sends_decode_steps_to_the_cache_kernel():
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(10), [20, 3], 32, heads=4, head_dim=16,
                                                cache_dtype=jnp.bfloat16)

    def lowered(prompt, impl="auto"):
        return jax.jit(lambda q, k, v: attend(q, k, v, q_seg, kv_seg, off, scale=0.25, impl=impl, prompt=prompt)
                       ).lower(q, k, v).as_text()

    assert build.CACHE_ATTENTION_TARGET in lowered(False)
    assert "tensor<2x32x2x16xf32>" not in lowered(False)  # the bf16 cache goes in as it is, never widened
    for impl in ("xla", "pallas_gpu"):  # XLA only / interpret mode: their own attention, the cache widened
        assert "tensor<2x32x2x16xf32>" in lowered(False, impl)
        assert build.CACHE_ATTENTION_TARGET not in lowered(False, impl)
    got = attend(q, k, v, q_seg, kv_seg, off, scale=0.25, impl="cpu")
    want = xla_attention(q, k.astype(q.dtype), v.astype(q.dtype), q_seg, kv_seg, off, scale=0.25)
    assert_close(got, want, jnp.float32)


def test_cache_attention_bad_shapes_name_them():
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(11), [3], 16, heads=4, kv_heads=3, head_dim=16)
    with pytest.raises(ValueError, match=r"q \(1, 1, 4, 16\), k \(1, 16, 3, 16\)"):
        cpu.cache_attention(q, k, v, q_seg, kv_seg, off, 0.25)
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(11), [3], 16, heads=4, head_dim=16)
    with pytest.raises(ValueError, match=r"q_offset \(2,\)"):
        cpu.cache_attention(q, k, v, q_seg, kv_seg, jnp.zeros((2,), jnp.int32), 0.25)


@pytest.mark.parametrize("march", sorted(ISA_LEVELS))
def test_cache_attention_older_instruction_sets_match_float64(march):
    if not ISA_LEVELS[march] <= _x86_flags():
        pytest.skip(f"this CPU cannot run {march} code")
    build._load(march)
    q, k, v, q_seg, kv_seg, off = decode_inputs(np.random.default_rng(12), [600, 77], 700, cache_dtype=jnp.bfloat16)
    got = jax.ffi.ffi_call(f"{build.CACHE_ATTENTION_TARGET}_{march}", jax.ShapeDtypeStruct(q.shape, jnp.float32))(
        q, k, v, q_seg, kv_seg, off, scale=np.float32(0.125))
    assert_close(got, cache_reference(q, k, v, q_seg, kv_seg, off, 0.125), jnp.float32)
